//! `ps-server`: one shard of an Ember parameter server (thin binary: flags ->
//! `ember_ps::ServerConfig` -> `ember_ps::spawn`), plus the `bench` subcommand.

use clap::{Args, Parser, Subcommand};
use ember_ps::bench::BenchArgs;
use ember_ps::ServerConfig;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

/// One shard of an Ember parameter server.
#[derive(Parser, Debug)]
#[command(name = "ps-server", version, about)]
struct Cli {
    #[command(flatten)]
    serve: ServeFlags,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Measure the store and the service (prints a Markdown table).
    Bench(BenchArgs),
}

#[derive(Args, Debug)]
struct ServeFlags {
    /// gRPC listen address (default 127.0.0.1:50051; port 0 = any free port).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Index of this shard (0-based).
    #[arg(long)]
    shard_index: Option<u32>,
    /// Number of shards in the cluster.
    #[arg(long)]
    num_shards: Option<u32>,
    /// Checkpoint root directory.
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Prometheus /metrics address (port 0 allowed); none = no exporter.
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// TOML file with the same settings (field names of ServerConfig); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Restore the latest good checkpoint at start.
    #[arg(long)]
    restore: bool,
    /// Largest gRPC message in bytes (default 64 MiB).
    #[arg(long)]
    max_message_bytes: Option<usize>,
    /// File with the shared bearer token required on every RPC (else env EMBER_AUTH_TOKEN).
    #[arg(long)]
    auth_token_file: Option<PathBuf>,
    /// TLS certificate chain (PEM); with --tls-key the server speaks TLS only.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA whose client certificates are accepted; makes client certificates mandatory (mTLS).
    #[arg(long)]
    tls_client_ca: Option<PathBuf>,
    /// Serve without TLS and/or without a token (logs a warning). Without this
    /// flag the server refuses to start unless both are configured.
    #[arg(long)]
    insecure: bool,
    /// Write a checkpoint with this step on exit (SIGTERM/SIGINT/Shutdown RPC).
    #[arg(long)]
    checkpoint_on_exit: Option<u64>,
    /// Log format on stderr: text or compact.
    #[arg(long)]
    log_format: Option<String>,
    /// Memory budget of the sparse tables (bytes, or with a unit: 8GiB,
    /// 500M); past it new rows replace cold ones. 0 = unlimited.
    #[arg(long, value_parser = ember_ps::server::parse_bytes)]
    max_bytes: Option<u64>,
    /// Half-life in steps of a row's count in the eviction score.
    #[arg(long)]
    evict_half_life_steps: Option<u64>,
    /// Delta checkpoints after a base before the next base (0 = every checkpoint is a base; default 8).
    #[arg(long)]
    max_deltas: Option<u32>,
    /// Write a base instead of a delta once the chain's delta rows would pass this percentage of the base's rows (default 50).
    #[arg(long)]
    delta_chain_percent: Option<u32>,
}

fn config_from(f: ServeFlags) -> anyhow::Result<ServerConfig> {
    let mut c = match &f.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()))?;
            toml::from_str::<ServerConfig>(&text)
                .map_err(|e| anyhow::anyhow!("parsing {}: {e}", p.display()))?
        }
        None => ServerConfig::default(),
    };
    if let Some(v) = f.listen {
        c.listen = v;
    }
    if let Some(v) = f.shard_index {
        c.shard_index = v;
    }
    if let Some(v) = f.num_shards {
        c.num_shards = v;
    }
    if f.checkpoint_dir.is_some() {
        c.checkpoint_dir = f.checkpoint_dir;
    }
    if f.metrics_addr.is_some() {
        c.metrics_addr = f.metrics_addr;
    }
    if f.restore {
        c.restore = true;
    }
    if let Some(v) = f.max_message_bytes {
        c.max_message_bytes = v;
    }
    if f.auth_token_file.is_some() {
        c.auth_token_file = f.auth_token_file;
        c.auth_token = None;
    }
    if f.checkpoint_on_exit.is_some() {
        c.checkpoint_on_exit = f.checkpoint_on_exit;
    }
    if let Some(v) = f.log_format {
        c.log_format = v;
    }
    if let Some(v) = f.max_deltas {
        c.max_deltas = v;
    }
    if let Some(v) = f.delta_chain_percent {
        c.delta_chain_percent = v;
    }
    if f.tls_cert.is_some() {
        c.tls_cert = f.tls_cert;
        c.tls_key = f.tls_key;
    }
    if f.tls_client_ca.is_some() {
        c.tls_client_ca = f.tls_client_ca;
    }
    if f.insecure {
        c.insecure = true;
    }
    if let Some(v) = f.max_bytes {
        c.max_bytes = v;
    }
    if let Some(v) = f.evict_half_life_steps {
        c.evict_half_life_steps = v;
    }
    c.resolve_token()?;
    c.validate()?;
    c.check_secure()?;
    Ok(c)
}

fn init_logs(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "compact" {
        b.compact().init();
    } else {
        b.init();
    }
}

async fn wait_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Cmd::Bench(args)) = cli.cmd {
        init_logs("text");
        let report = ember_ps::bench::run(args).await?;
        println!("{report}");
        return Ok(());
    }
    let config = config_from(cli.serve)?;
    init_logs(&config.log_format);
    let running = ember_ps::spawn(config).await?;
    let metrics = running
        .metrics_addr
        .map_or_else(|| "none".to_string(), |a| a.to_string());
    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "EMBER_PS_READY addr={} metrics={metrics}",
            running.addr
        )?;
        out.flush()?;
    }
    tracing::info!(addr = %running.addr, metrics = %metrics, "serving");
    let stop = running.shutdown_handle();
    let mut join = running.join;
    tokio::select! {
        r = &mut join => r??,
        _ = wait_signal() => {
            tracing::info!("signal received, shutting down");
            stop.shutdown();
            join.await??;
        }
    }
    Ok(())
}
