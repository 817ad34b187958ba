//! `worker`: one Ember training worker.
//!
//! It pulls its tasks from the coordinator of `ember train` (`--coordinator
//! HOST:PORT`), segment after segment and epoch after epoch, until the
//! coordinator answers DONE (see `ember_worker::train::remote`). `ember
//! train` starts it as a child process on loopback (`[cluster] mode =
//! "process"`); an orchestrator starts it elsewhere (`worker_mode =
//! "external"`: Compose services, a Kubernetes Indexed Job). Progress and
//! the final report of every task go to the coordinator; logs go to stderr.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use ember_worker::train::backend::Backend;
use ember_worker::train::client::{PsClient, RetryPolicy};
use ember_worker::train::config::{JobConfig, SecurityMode};

/// One Ember training worker: runs the tasks of `ember train`'s coordinator.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Job configuration (TOML).
    #[arg(long)]
    config: PathBuf,
    /// The coordinator of `ember train` at `host:port` (`https://` with TLS
    /// is chosen by the security settings): tasks come from it until it
    /// says DONE.
    #[arg(long)]
    coordinator: String,
    /// This worker's index, 0-based (0 is the chief); an Indexed Job's
    /// JOB_COMPLETION_INDEX when the flag is absent.
    #[arg(long, env = "JOB_COMPLETION_INDEX", default_value_t = 0)]
    worker_index: usize,
    /// Number of workers (default: the config's cluster.workers).
    #[arg(long)]
    num_workers: Option<usize>,
    /// Interval of the progress reports (and heartbeats) to the coordinator
    /// while a task runs, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
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
        s.mode = SecurityMode::Insecure;
    }
    if let Some(ca) = &args.tls_ca {
        s.mode = SecurityMode::Tls;
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

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let config =
        JobConfig::load(&args.config).map_err(|e| format!("{}: {e}", args.config.display()))?;
    let security = security_of(&config, &args).client()?;
    if let Some(addr) = args.metrics_addr {
        let bound = serve_worker_metrics(addr)?;
        eprintln!("worker: metrics at http://{bound}/metrics");
    }
    let retry = RetryPolicy {
        deadline: Duration::from_secs(config.cluster.retry_deadline_s),
        ..RetryPolicy::default()
    };
    use ember_worker::train::remote;
    let opts = remote::RemoteOptions {
        coordinator: args.coordinator.clone(),
        worker_index: args.worker_index,
        num_workers: args.num_workers.unwrap_or(config.cluster.workers),
        worker_id: remote::default_worker_id(),
        unreachable_deadline: Duration::from_secs(config.cluster.retry_deadline_s.max(60)),
        heartbeat: Duration::from_millis(args.heartbeat_ms.max(10)),
    };
    remote::run_remote_blocking(&config, &opts, &security, |addrs| {
        Ok(Backend::Remote(PsClient::new(
            addrs,
            retry.clone(),
            &security,
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
