//! `worker`: one Ember training worker for one epoch against running shards.
//!
//! Started by the launcher (`ember train`) or by an orchestrator. It reads its
//! share (worker i of M) of the training file, trains `--steps` steps from
//! global step `--start-step`, and prints machine-readable lines on stdout:
//! `EMBER_PROGRESS {json}` every `train.log_every` steps and one
//! `EMBER_REPORT {json}` at the end, or `EMBER_FAILURE {json}` (the error and
//! whether it is deterministic, see `FailureReport`) before exiting with an
//! error. Logs go to stderr.
//!
//! With `--coordinator HOST:PORT` (the job's `cluster.worker_mode =
//! "external"`: Compose services, a Kubernetes Indexed Job) it instead pulls
//! its tasks from the coordinator that `ember train` serves, epoch after
//! epoch, until it answers DONE (see `ember_worker::train::remote`).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use ember_worker::train::backend::Backend;
use ember_worker::train::client::{PsClient, RetryPolicy};
use ember_worker::train::config::JobConfig;
use ember_worker::train::worker::{run_epoch, FailureReport, Progress, WorkerJob};
use ember_worker::train::TrainError;

/// One Ember training worker (one epoch of one data split).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Job configuration (TOML).
    #[arg(long)]
    config: PathBuf,
    /// Comma-separated shard addresses `host:port`, shard 0 first (not with
    /// --coordinator: its tasks name the shards).
    #[arg(long, value_delimiter = ',', required_unless_present = "coordinator")]
    shards: Vec<String>,
    /// External-worker mode: pull tasks from the coordinator of `ember train`
    /// (`[cluster] worker_mode = "external"`) at `host:port` until it says
    /// DONE, instead of running one epoch (see ember_worker::train::remote).
    #[arg(long)]
    coordinator: Option<String>,
    /// This worker's index, 0-based (0 is the chief); an Indexed Job's
    /// JOB_COMPLETION_INDEX when the flag is absent.
    #[arg(long, env = "JOB_COMPLETION_INDEX", default_value_t = 0)]
    worker_index: usize,
    /// Number of workers (default: 1, or the config's cluster.workers with
    /// --coordinator).
    #[arg(long)]
    num_workers: Option<usize>,
    /// Epoch number, from 1 (varies the shuffle).
    #[arg(long, default_value_t = 1)]
    epoch: usize,
    /// Global step at the start of this epoch.
    #[arg(long, default_value_t = 0)]
    start_step: u64,
    /// Steps of this epoch already trained (resume at a mid-epoch
    /// checkpoint): the first `skip_steps * batch_size` samples of this
    /// worker's split are skipped and training starts at global step
    /// `start_step + skip_steps`.
    #[arg(long, default_value_t = 0)]
    skip_steps: u64,
    /// Steps to run (default: the whole split).
    #[arg(long)]
    steps: Option<u64>,
    /// File holding the bearer token (else security.token_file, else the
    /// EMBER_AUTH_TOKEN variable). Never pass the token itself on a command line.
    #[arg(long)]
    auth_token_file: Option<PathBuf>,
    /// CA certificate (PEM) of the shards and coordinator: speak TLS
    /// (overrides the config's [security]).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Name to verify the servers' certificates against (default: each address's host).
    #[arg(long)]
    tls_domain: Option<String>,
    /// Client certificate (PEM) for servers that require mTLS.
    #[arg(long, requires = "tls_client_key")]
    tls_client_cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, requires = "tls_client_cert")]
    tls_client_key: Option<PathBuf>,
    /// Serve this worker's Prometheus metrics (ember_worker_samples_total,
    /// _steps_total, _loss, _step) at this address's `/metrics` (port 0 = any).
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Plaintext gRPC (logs a warning); overrides the config's [security].
    #[arg(long, conflicts_with = "tls_ca")]
    insecure: bool,
}

/// The config's `[security]` with the command-line overrides applied.
fn security_of(config: &JobConfig, args: &Args) -> ember_worker::train::config::SecurityConfig {
    let mut s = config.security.clone();
    if args.insecure {
        s.mode = "insecure".into();
    }
    if let Some(ca) = &args.tls_ca {
        s.mode = "tls".into();
        s.ca = Some(ca.clone());
    }
    if args.tls_domain.is_some() {
        s.domain = args.tls_domain.clone();
    }
    if args.tls_client_cert.is_some() {
        s.client_cert = args.tls_client_cert.clone();
        s.client_key = args.tls_client_key.clone();
    }
    if args.auth_token_file.is_some() {
        s.token_file = args.auth_token_file.clone();
    }
    s
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    // Reuse large tensor buffers instead of returning them to the OS every step (1.4-2x).
    ember_worker::model::tune_allocator();
    if let Err(e) = run(args) {
        eprintln!("worker: error: {e}");
        std::process::exit(1);
    }
}

/// Prints the `EMBER_FAILURE {json}` line the launcher reads (see
/// [`FailureReport`]) for worker `worker` failing with `e`.
fn print_failure(worker: usize, e: &TrainError) {
    if let Ok(j) = serde_json::to_string(&FailureReport::of(worker, e)) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "EMBER_FAILURE {j}");
        let _ = out.flush();
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let config = match JobConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            print_failure(
                args.worker_index,
                &TrainError::Config(format!("{}: {e}", args.config.display())),
            );
            return Err(e.into());
        }
    };
    let security = security_of(&config, &args).client()?;
    if let Some(addr) = args.metrics_addr {
        let bound = serve_worker_metrics(addr)?;
        eprintln!("worker: metrics at http://{bound}/metrics");
    }
    let retry = RetryPolicy {
        deadline: Duration::from_secs(config.cluster.retry_deadline_s),
        ..RetryPolicy::default()
    };
    if let Some(coordinator) = &args.coordinator {
        return run_external(&config, &args, coordinator, retry, &security);
    }
    let job = WorkerJob {
        config,
        worker_index: args.worker_index,
        num_workers: args.num_workers.unwrap_or(1),
        epoch: args.epoch,
        start_step: args.start_step,
        skip_steps: args.skip_steps,
        steps: args.steps,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = rt.block_on(async {
        let client = PsClient::new(&args.shards, retry, &security)?;
        let emit = |p: &Progress| {
            if let Ok(j) = serde_json::to_string(p) {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "EMBER_PROGRESS {j}");
                let _ = out.flush();
            }
        };
        run_epoch(&job, &Backend::Remote(client), &emit).await
    });
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            print_failure(job.worker_index, &e);
            return Err(e.into());
        }
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "EMBER_REPORT {}", serde_json::to_string(&report)?)?;
    out.flush()?;
    Ok(())
}

/// `--coordinator`: run tasks from the coordinator until it says DONE.
fn run_external(
    config: &JobConfig,
    args: &Args,
    coordinator: &str,
    retry: RetryPolicy,
    security: &ember_proto::security::ClientSecurity,
) -> Result<(), Box<dyn std::error::Error>> {
    use ember_worker::train::remote;
    let opts = remote::RemoteOptions {
        coordinator: coordinator.to_string(),
        worker_index: args.worker_index,
        num_workers: args.num_workers.unwrap_or(config.cluster.workers),
        worker_id: remote::default_worker_id(),
        unreachable_deadline: Duration::from_secs(config.cluster.retry_deadline_s.max(60)),
        heartbeat: Duration::from_secs(1),
    };
    remote::run_remote_blocking(config, &opts, security, |addrs| {
        Ok(Backend::Remote(PsClient::new(
            addrs,
            retry.clone(),
            security,
        )?))
    })?;
    Ok(())
}

/// Serves the process's Prometheus exporter on `addr` from a small thread of
/// its own (both worker modes build their runtimes later); returns the bound
/// address.
fn serve_worker_metrics(
    addr: std::net::SocketAddr,
) -> Result<std::net::SocketAddr, Box<dyn std::error::Error>> {
    let handle = ember_ps::metrics::install_exporter()?;
    let listener = std::net::TcpListener::bind(addr)
        .map_err(|e| format!("cannot bind metrics address {addr}: {e}"))?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            rt.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => {
                        ember_ps::metrics::serve_metrics(l, handle, std::future::pending()).await
                    }
                    Err(e) => tracing::warn!("metrics listener: {e}"),
                }
            })
        })?;
    Ok(bound)
}
