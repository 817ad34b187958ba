//! `worker`: one Ember training worker for one epoch against running shards.
//!
//! Started by the launcher (`ember train`) or by an orchestrator. It reads its
//! share (worker i of M) of the training file, trains `--steps` steps from
//! global step `--start-step`, and prints machine-readable lines on stdout:
//! `EMBER_PROGRESS {json}` every `train.log_every` steps and one
//! `EMBER_REPORT {json}` at the end. Logs go to stderr.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use ember_worker::train::backend::Backend;
use ember_worker::train::client::{PsClient, RetryPolicy};
use ember_worker::train::config::JobConfig;
use ember_worker::train::worker::{run_epoch, Progress, WorkerJob};

/// One Ember training worker (one epoch of one data split).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Job configuration (TOML).
    #[arg(long)]
    config: PathBuf,
    /// Comma-separated shard addresses `host:port`, shard 0 first.
    #[arg(long, value_delimiter = ',', required = true)]
    shards: Vec<String>,
    /// This worker's index, 0-based (0 is the chief).
    #[arg(long, default_value_t = 0)]
    worker_index: usize,
    /// Number of workers.
    #[arg(long, default_value_t = 1)]
    num_workers: usize,
    /// Epoch number, from 1 (varies the shuffle).
    #[arg(long, default_value_t = 1)]
    epoch: usize,
    /// Global step at the start of this epoch.
    #[arg(long, default_value_t = 0)]
    start_step: u64,
    /// Steps to run (default: the whole split).
    #[arg(long)]
    steps: Option<u64>,
    /// File holding the shards' bearer token (or set EMBER_AUTH_TOKEN).
    #[arg(long)]
    auth_token_file: Option<PathBuf>,
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
    let config = JobConfig::load(&args.config)?;
    let token = match &args.auth_token_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| format!("{}: {e}", p.display()))?
                .trim()
                .to_string(),
        ),
        None => std::env::var("EMBER_AUTH_TOKEN").ok(),
    };
    let retry = RetryPolicy {
        deadline: Duration::from_secs(config.cluster.retry_deadline_s),
        ..RetryPolicy::default()
    };
    let job = WorkerJob {
        config,
        worker_index: args.worker_index,
        num_workers: args.num_workers,
        epoch: args.epoch,
        start_step: args.start_step,
        steps: args.steps,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = rt.block_on(async {
        let client = PsClient::new(&args.shards, retry, token.as_deref())?;
        let emit = |p: &Progress| {
            if let Ok(j) = serde_json::to_string(p) {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "EMBER_PROGRESS {j}");
                let _ = out.flush();
            }
        };
        run_epoch(&job, &Backend::Remote(client), &emit).await
    })?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "EMBER_REPORT {}", serde_json::to_string(&report)?)?;
    out.flush()?;
    Ok(())
}
