//! `ember`: the user-facing launcher.
//!
//! - `ember train --config configs/din_ml100k.toml [--resume]`: a local cluster
//!   (shards + workers) trains, evaluates and checkpoints every epoch.
//! - `ember export --config ... --out DIR`: a self-contained model directory.
//! - `ember predict --model DIR --input FILE --output FILE`: scores without a cluster.
//! - `ember gru4rec --config ...`: next-item recommendation with GRU4Rec (in-process).
//! - `ember bench-e2e --config ...`: training throughput over loopback shards
//!   against the in-process store.
//! - `ember plan --ids N --dim D --optimizer X --precision P [--shards S |
//!   --memory-per-shard B]`: bytes per row and shard, shards needed.
//! - `ember certs --out DIR --host NAME...`: a test CA, server and client
//!   certificates and a bearer token for TLS deployments.
//! - `ember checkpoint verify DIR`: reads and checks every file of a cluster
//!   checkpoint directory; exits 1 when a file is damaged.
//! - `ember reshard --from DIR --to-shards M --out DIR`: an N-shard cluster
//!   checkpoint rewritten for M shards (offline).

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use ember_cluster::launcher::{train, LaunchOptions};
use ember_worker::train::config::JobConfig;

/// Ember: a parameter-server trainer for deep-interest CTR models.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Train a job on a local cluster (shards and workers on this machine).
    Train {
        /// Job configuration (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Continue from the last complete cluster checkpoint of this run.
        #[arg(long)]
        resume: bool,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        /// Override `train.epochs`.
        #[arg(long)]
        epochs: Option<usize>,
        /// Override `train.seed`.
        #[arg(long)]
        seed: Option<u64>,
        /// Override `train.out_dir` (the run directory).
        #[arg(long)]
        out_dir: Option<PathBuf>,
        /// Serve training metrics (samples, loss, AUC/GAUC per epoch) at
        /// this address's `/metrics` (port 0 = any; see cluster.json).
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
    },
    /// Export the latest (or a given) cluster checkpoint as a model directory.
    Export {
        /// Job configuration (TOML) of the run.
        #[arg(long)]
        config: PathBuf,
        /// Checkpoint step (default: the latest complete one).
        #[arg(long)]
        step: Option<u64>,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Score a sample file with an exported model; one probability per line.
    Predict {
        /// Exported model directory.
        #[arg(long)]
        model: PathBuf,
        /// Sample file (DIEN text format).
        #[arg(long)]
        input: PathBuf,
        /// Output file.
        #[arg(long)]
        output: PathBuf,
    },
    /// Next-item recommendation with GRU4Rec on user sequences (in-process).
    Gru4rec {
        /// GRU4Rec job (TOML: train, test, epochs, k, seeds, holdout, [model]).
        #[arg(long)]
        config: PathBuf,
        /// Override `epochs`.
        #[arg(long)]
        epochs: Option<usize>,
    },
    /// Make a test CA, a server certificate for the given hosts, a client
    /// certificate (mTLS) and a random bearer token (keys/token mode 0600).
    Certs {
        /// Output directory (ca.pem, ca.key, server.pem, server.key, client.pem, client.key, token).
        #[arg(long)]
        out: PathBuf,
        /// DNS names, wildcards (*.ps.ember.svc.cluster.local) or IP addresses
        /// the server certificate is valid for (repeat or comma-separate).
        #[arg(long = "host", value_delimiter = ',', default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        hosts: Vec<String>,
    },
    /// Size a table: bytes per row, bytes per shard, and how many shards a
    /// job needs (from the store's own layout and growth rules).
    Plan {
        /// Distinct ids the table will hold; with --config, `table=N` pairs
        /// separated by commas (tables left out take the distinct ids of the
        /// job's counts file).
        #[arg(long)]
        ids: Option<String>,
        /// Size every sparse table of this job (its [[features]] tables, or
        /// item, cat, user) with each table's optimizer and precision.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Embedding width.
        #[arg(long, default_value_t = 18)]
        dim: usize,
        /// Optimizer: sgd, adagrad, adam, ftrl, rowwise_adagrad, rowwise_adam.
        #[arg(long, default_value = "rowwise_adagrad")]
        optimizer: ember_worker::train::config::OptimizerKind,
        /// Weight precision: f32, f16 or bf16.
        #[arg(long, default_value = "f16")]
        precision: ember_worker::train::config::Precision,
        /// Storage precision of row-wise Adam's first moment: f32, f16 or bf16.
        #[arg(long, default_value = "f32")]
        moment_precision: ember_worker::train::config::Precision,
        /// Size for this many shards.
        #[arg(long, conflicts_with = "memory_per_shard")]
        shards: Option<u32>,
        /// Find the fewest shards whose process fits in this much memory (8GiB, 500M, bytes).
        #[arg(long, value_parser = ember_ps::server::parse_bytes)]
        memory_per_shard: Option<u64>,
    },
    /// Offline tools for cluster checkpoint directories.
    Checkpoint {
        #[command(subcommand)]
        cmd: CheckpointCmd,
    },
    /// Rewrite an N-shard cluster checkpoint for M shards (offline), routing
    /// every row and dense parameter as the workers do; then
    /// `ember train --resume` with `cluster.shards = M` and this directory as
    /// the run's checkpoint directory.
    Reshard {
        /// Cluster checkpoint directory (holds shard-<i>-of-<n>/).
        #[arg(long)]
        from: PathBuf,
        /// Number of shards to write.
        #[arg(long)]
        to_shards: u32,
        /// Output directory (must not exist).
        #[arg(long)]
        out: PathBuf,
        /// Step to reshard (default: the latest step every shard can restore).
        #[arg(long)]
        step: Option<u64>,
    },
    /// End-to-end throughput: the same worker against loopback shards and the in-process store.
    BenchE2e {
        /// Job configuration (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Training steps per measurement.
        #[arg(long, default_value_t = 200)]
        steps: u64,
        /// Shards for the loopback measurement.
        #[arg(long, default_value_t = 2)]
        shards: usize,
    },
    /// Draw several runs in one PNG: test logloss and AUC per epoch.
    PlotRuns {
        /// Title of the two panels.
        #[arg(long, default_value = "runs")]
        title: String,
        /// Output PNG.
        #[arg(long)]
        out: PathBuf,
        /// Runs as LABEL=RUN_DIR (each RUN_DIR holds the metrics.json of `ember train`);
        /// LABEL=DIR1,DIR2,... draws the per-epoch mean of several runs (seeds).
        #[arg(required = true)]
        runs: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum CheckpointCmd {
    /// Read every file of a cluster checkpoint directory: checksums, chain
    /// order, the same steps on every shard, finite weights and optimizer
    /// state. Prints a summary; exits 1 when a file is damaged.
    Verify {
        /// Cluster checkpoint directory (holds shard-<i>-of-<n>/).
        dir: PathBuf,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    // Reuse large tensor buffers instead of returning them to the OS every step (1.4-2x).
    ember_worker::model::tune_allocator();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ember: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    // SIGTERM or SIGINT drops the command's future and then the runtime
    // (with every task), so the shard and worker processes the command
    // started are killed by their owners' `Drop` instead of outliving it.
    let outcome = rt.block_on(async {
        tokio::select! {
            r = run(cli) => r.map(|()| None),
            sig = terminated() => Ok(Some(sig)),
        }
    });
    rt.shutdown_timeout(std::time::Duration::from_secs(10));
    match outcome {
        Ok(None) => {}
        Ok(Some((name, code))) => {
            eprintln!("ember: stopped by {name}; its child processes were stopped");
            std::process::exit(128 + code);
        }
        Err(e) => {
            eprintln!("ember: error: {e}");
            std::process::exit(1);
        }
    }
}

/// Waits for SIGTERM or SIGINT; returns the signal's name and number.
async fn terminated() -> (&'static str, i32) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => return ("SIGTERM", 15),
                _ = tokio::signal::ctrl_c() => return ("SIGINT", 2),
            }
        }
    }
    match tokio::signal::ctrl_c().await {
        Ok(()) => ("SIGINT", 2),
        // No signal handling on this platform: never resolve.
        Err(_) => std::future::pending().await,
    }
}

/// The per-epoch table of one GRU4Rec run (Recall@k and MRR@k of the last
/// item, events trained per second).
fn print_seq_epochs(run: &ember_cluster::seqrec::SeedRun, k: usize) {
    println!(
        "{:>5} {:>8} {:>10} {:>8} {:>10}",
        "epoch",
        "loss",
        format!("Recall@{k}"),
        format!("MRR@{k}"),
        "events/s"
    );
    for r in &run.epochs {
        println!(
            "{:>5} {:>8.4} {:>10.4} {:>8.4} {:>10.0}",
            r.epoch, r.loss, r.recall, r.mrr, r.events_per_s
        );
    }
}

/// `ember train` of a GRU4Rec job (`[model] kind = "gru4rec"`).
async fn train_gru4rec(
    text: &str,
    config: &Path,
    epochs: Option<usize>,
    seed: Option<u64>,
    out_dir: Option<PathBuf>,
    opts: &LaunchOptions,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut job = ember_cluster::launcher::SeqTrainJob::parse(text, &config.display().to_string())?;
    if let Some(e) = epochs {
        job.job.train.epochs = e;
    }
    if let Some(s) = seed {
        job.job.train.seed = s;
    }
    if let Some(o) = out_dir {
        job.job.train.out_dir = Some(o);
    }
    job.validate()
        .map_err(|e| format!("{}: {e}", config.display()))?;
    let out = job.job.out_dir();
    let k = job.data.k;
    let report = ember_cluster::launcher::train_seq(job, opts).await?;
    if let Some(run) = report.runs.first() {
        print_seq_epochs(run, k);
        println!(
            "full ranking of every training item, last item of each user ({} users, {} skipped), ties against the target",
            run.row.users, report.skipped
        );
    }
    print!("{}", ember_cluster::seqrec::format_table(&report));
    println!(
        "run directory: {} (metrics.json, curves.png, checkpoints/, logs/)",
        out.display()
    );
    Ok(())
}

async fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    match cli.command {
        Cmd::Train {
            config,
            resume,
            quiet,
            epochs,
            seed,
            out_dir,
            metrics_addr,
        } => {
            let text = std::fs::read_to_string(&config)
                .map_err(|e| format!("{}: {e}", config.display()))?;
            if ember_cluster::launcher::is_seq_job(&text) {
                let opts = LaunchOptions {
                    config_path: config.clone(),
                    resume,
                    quiet,
                    metrics_addr,
                };
                return train_gru4rec(&text, &config, epochs, seed, out_dir, &opts).await;
            }
            let mut cfg = JobConfig::load(&config)?;
            if let Some(e) = epochs {
                cfg.train.epochs = e;
            }
            if let Some(s) = seed {
                cfg.train.seed = s;
            }
            if let Some(o) = out_dir {
                cfg.train.out_dir = Some(o);
            }
            cfg.validate()
                .map_err(|e| format!("{}: {e}", config.display()))?;
            let opts = LaunchOptions {
                config_path: config.clone(),
                resume,
                quiet,
                metrics_addr,
            };
            let report = train(cfg.clone(), &opts).await?;
            println!("{}", report.summary_table());
            if let Some(last) = report.epochs.last().and_then(|r| r.test.clone()) {
                println!(
                    "final test: AUC {:.4}  GAUC {:.4}  logloss {:.4}  ({} rows)",
                    last.auc, last.gauc, last.logloss, last.rows
                );
            }
            let out = cfg.out_dir();
            println!(
                "run directory: {} (metrics.json, curves.png, checkpoints/, logs/)",
                out.display()
            );
        }
        Cmd::Export { config, step, out } => {
            let cfg = JobConfig::load(&config)?;
            let m = ember_cluster::export::export(&cfg, &config, step, &out).await?;
            println!(
                "exported step {} ({} shards, {}) to {}",
                m.step,
                m.shards,
                m.model,
                out.display()
            );
        }
        Cmd::Predict {
            model,
            input,
            output,
        } => {
            let r = ember_cluster::export::predict(&model, &input, &output).await?;
            println!(
                "scored {} rows to {}: AUC {:.4}  GAUC {:.4}  logloss {:.4}",
                r.rows,
                output.display(),
                r.auc,
                r.gauc,
                r.logloss
            );
        }
        Cmd::Gru4rec { config, epochs } => {
            let text = std::fs::read_to_string(&config)
                .map_err(|e| format!("{}: {e}", config.display()))?;
            let mut job: ember_cluster::seqrec::SeqJob =
                toml::from_str(&text).map_err(|e| format!("{}: {e}", config.display()))?;
            if let Some(e) = epochs {
                job.epochs = e;
            }
            let k = job.k;
            let report = tokio::task::block_in_place(|| ember_cluster::seqrec::run(&job))?;
            for run in &report.runs {
                println!("seed {}", run.seed);
                print_seq_epochs(run, k);
            }
            let users = report.runs.first().map_or(0, |r| r.row.users);
            println!(
                "full ranking of every training item, last item of each user ({users} users, {} skipped), ties against the target",
                report.skipped
            );
            print!("{}", ember_cluster::seqrec::format_table(&report));
        }
        Cmd::Certs { out, hosts } => {
            let files = ember_proto::pki::write_test_pki(&out, &hosts)?;
            let token = out.join("token");
            ember_proto::pki::write_token(&token)?;
            println!(
                "wrote {} (CA), {} + {} (server: {}), {} + {} (client), {} (token)",
                files.ca.display(),
                files.server_cert.display(),
                files.server_key.display(),
                hosts.join(", "),
                files.client_cert.display(),
                files.client_key.display(),
                token.display()
            );
        }
        Cmd::Plan {
            ids,
            config,
            dim,
            optimizer,
            precision,
            moment_precision,
            shards,
            memory_per_shard,
        } => {
            if let Some(config) = config {
                let cfg = JobConfig::load(&config)?;
                let ids = ember_cluster::plan::parse_table_ids(ids.as_deref().unwrap_or(""))?;
                let (_, _, text) =
                    ember_cluster::plan::run_job(&cfg, &ids, shards, memory_per_shard)?;
                print!("{text}");
                return Ok(());
            }
            let ids = ids
                .ok_or("--ids N (or --config JOB.toml for every table of a job)")?
                .replace('_', "")
                .parse::<u64>()
                .map_err(|e| format!("--ids: {e}"))?;
            let req = ember_cluster::plan::PlanRequest {
                ids,
                dim,
                optimizer,
                precision,
                moment_precision,
                shards,
                memory_per_shard,
            };
            let (_, text) = ember_cluster::plan::run(&req)?;
            print!("{text}");
        }
        Cmd::Checkpoint {
            cmd: CheckpointCmd::Verify { dir },
        } => {
            let rep = tokio::task::block_in_place(|| ember_cluster::ckpt_verify::verify(&dir))?;
            print!("{}", rep.summary());
            if !rep.damaged.is_empty() {
                std::process::exit(1);
            }
        }
        Cmd::Reshard {
            from,
            to_shards,
            out,
            step,
        } => {
            let r = tokio::task::block_in_place(|| {
                ember_cluster::reshard::reshard(&from, to_shards, &out, step)
            })?;
            println!(
                "resharded step {} from {} to {} shards: {} rows, {} dense parameters, {} files under {}",
                r.step,
                r.from_shards,
                r.to_shards,
                r.rows,
                r.dense,
                r.files.len(),
                out.display()
            );
        }
        Cmd::BenchE2e {
            config,
            steps,
            shards,
        } => {
            let cfg = JobConfig::load(&config)?;
            let r = ember_cluster::bench::bench_e2e(&cfg, steps, shards).await?;
            println!("{r}");
        }
        Cmd::PlotRuns { title, out, runs } => {
            let mut loaded = Vec::new();
            for arg in &runs {
                let (label, dir) = arg
                    .split_once('=')
                    .ok_or_else(|| format!("plot-runs: `{arg}` is not LABEL=RUN_DIR"))?;
                let mut seeds = Vec::new();
                for d in dir.split(',') {
                    let report = ember_cluster::report::RunReport::read_json(
                        &Path::new(d).join("metrics.json"),
                    )?;
                    seeds.push(report.epochs);
                }
                let epochs = if seeds.len() == 1 {
                    seeds.remove(0)
                } else {
                    ember_cluster::report::mean_over_runs(&seeds)?
                };
                loaded.push((label.to_string(), epochs));
            }
            ember_cluster::plot::plot_compare(&out, &title, &loaded)?;
            println!("wrote {}", out.display());
        }
    }
    Ok(())
}
