//! `ember train`: one command runs a whole job. The job loop, in order:
//!
//! 0. Security: `security.mode = "auto"` makes a CA, certificate and token
//!    for this run (`<out_dir>/secrets/`); every connection below is TLS with
//!    the token ([`setup`]).
//! 1. Shards ([`shards`]): child `ps-server` processes on loopback ports,
//!    in-process gRPC shards, or `cluster.shard_addrs`.
//! 2. The coordinator (`crate::coordinator`), the only control plane of the
//!    workers, and the workers ([`workers`]): child `worker` processes that
//!    reach it over gRPC, tasks of this process that call it directly, or
//!    (`worker_mode = "external"`) workers started elsewhere. They are
//!    started once and live across segments and epochs.
//! 3. A fresh run creates the tables, loads the exact feature counts n_j,
//!    registers the dense parameters and checkpoints step 0; `--resume`
//!    continues from the last complete cluster checkpoint ([`setup`]).
//! 4. Per epoch (K steps per worker), per segment of
//!    `cluster.checkpoint_every_steps` steps (the whole epoch when 0): publish
//!    the segment to the workers and watch shards and workers ([`segment`]);
//!    at the epoch end evaluate on the test set; checkpoint every shard at
//!    the segment's end step; write the metrics JSON and the PNG.
//! 5. A shard or worker that dies, or a shard that hangs (no answer to Health
//!    for `cluster.shard_timeout_s`, see `crate::health`): the attempt is
//!    abandoned, hung shard processes are killed, dead shards and workers
//!    restarted, and every shard rolled back to the last complete cluster
//!    checkpoint; the segment reruns from its step and data position
//!    ([`recovery`]). A worker that fails deterministically (bad data,
//!    config or model) ends the job at once with its cause.

mod cluster;
mod recovery;
mod segment;
pub mod seq;
mod setup;
mod shards;
mod workers;

use std::path::{Path, PathBuf};
use std::time::Instant;

use ember_worker::train::config::JobConfig;
use ember_worker::train::eval::{evaluate, EvalResult};
use ember_worker::train::setup::count_rows;
use ember_worker::train::worker::WorkerReport;
use serde::{Deserialize, Serialize};

use crate::health::guarded;
use crate::report::{EpochRecord, RunReport};
use crate::ClusterError;
use cluster::Cluster;
use recovery::guard_failure;
use segment::{EpochBar, Segment};
pub use seq::{is_seq_job, train_seq, SeqTrainJob};

/// Options of `ember train` beyond the job file.
#[derive(Debug, Clone, Default)]
pub struct LaunchOptions {
    /// Path of the job file (passed on to worker processes).
    pub config_path: PathBuf,
    /// Continue from the last complete cluster checkpoint.
    pub resume: bool,
    /// No progress bar (logs only).
    pub quiet: bool,
    /// Serve the launcher's training metrics (per-worker samples and loss,
    /// test AUC/GAUC, restarts) in Prometheus format on this address.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// Addresses of a running cluster, written to `<run>/cluster.json` so that
/// users and tests can scrape `/metrics` or kill a shard.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// gRPC address of each shard.
    pub shards: Vec<String>,
    /// Metrics address of each shard (empty when none).
    pub metrics: Vec<String>,
    /// Process id of each shard (0 for in-process shards).
    pub pids: Vec<u32>,
    /// Process id of the launcher.
    pub launcher_pid: u32,
    /// The launcher's own `/metrics` address (training progress), if served.
    #[serde(default)]
    pub launcher_metrics: String,
    /// The coordinator's gRPC address (empty with in-process workers).
    #[serde(default)]
    pub coordinator: String,
}

/// Why an attempt failed.
#[derive(Debug)]
enum Failure {
    /// A shard process died.
    ShardDied(Vec<usize>),
    /// Shards stopped answering Health for `cluster.shard_timeout_s`.
    ShardHung(Vec<usize>),
    /// A worker failed, died or went silent (transient: retried).
    Worker(usize, String),
    /// A worker failed deterministically (data, config, model): not retried.
    Rejected(usize, String),
    /// The launcher's own calls (evaluation, checkpoint, restore) failed.
    Coordinator(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::ShardDied(s) => write!(f, "shard(s) {s:?} died"),
            Failure::ShardHung(s) => write!(f, "shard(s) {s:?} hung (no Health answer)"),
            Failure::Worker(w, e) | Failure::Rejected(w, e) => write!(f, "worker {w} failed: {e}"),
            Failure::Coordinator(e) => write!(f, "{e}"),
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ClusterError + '_ {
    move |e| ClusterError::Io {
        path: path.display().to_string(),
        source: e,
    }
}

/// Runs the whole job; returns the report of all epochs.
pub async fn train(mut cfg: JobConfig, opts: &LaunchOptions) -> Result<RunReport, ClusterError> {
    let out = cfg.out_dir();
    std::fs::create_dir_all(&out).map_err(io_err(&out))?;
    setup::resolve_security(&mut cfg)?;
    let ckpt = cfg.checkpoint_dir();
    if !opts.resume && ckpt.starts_with(&out) && ckpt.exists() && cfg.cluster.shard_addrs.is_empty()
    {
        tracing::info!(dir = %ckpt.display(), "fresh run: removing old checkpoints (use --resume to continue)");
        std::fs::remove_dir_all(&ckpt).map_err(io_err(&ckpt))?;
    }
    std::fs::create_dir_all(&ckpt).map_err(io_err(&ckpt))?;
    ember_worker::train::setup::check_data(&cfg)?;
    let mut cl = Cluster::start(cfg, opts).await?;
    let k = steps_per_epoch(&cl.cfg)?;
    let report_path = out.join("metrics.json");
    let mut report = RunReport {
        name: cl.cfg.name.clone(),
        model: format!("{:?}", cl.cfg.model.kind).to_lowercase(),
        shards: cl.addrs.len(),
        workers: cl.cfg.cluster.workers,
        epochs: Vec::new(),
    };
    let mut last_ckpt = if opts.resume {
        setup::resume(&cl, &report_path, &mut report).await?
    } else {
        setup::start_fresh(&cl).await?
    };
    // A resumed run may start inside an epoch (a mid-epoch checkpoint).
    let first_epoch = (last_ckpt / k) as usize + 1;
    for epoch in first_epoch..=cl.cfg.train.epochs {
        let rec = train_epoch(&mut cl, opts, epoch, k, &mut last_ckpt).await?;
        report.epochs.push(rec);
        report.write_json(&report_path)?;
        if let Err(e) =
            crate::plot::plot_curves(&out.join("curves.png"), &report.name, &report.epochs)
        {
            tracing::warn!("could not draw curves: {e}");
        }
    }
    cl.finish().await;
    Ok(report)
}

/// Steps per worker per epoch, equal for all workers.
fn steps_per_epoch(cfg: &JobConfig) -> Result<u64, ClusterError> {
    let rows = count_rows(&cfg.data.train)?;
    let per_worker = rows / cfg.cluster.workers as u64;
    let k = per_worker.div_ceil(cfg.data.batch_size as u64).max(1);
    Ok(match cfg.train.max_steps_per_epoch {
        Some(m) => k.min(m.max(1)),
        None => k,
    })
}

/// Trains epoch `epoch` (K = `k` steps per worker) from the cluster
/// checkpoint `last_ckpt` (which it advances), segment by segment,
/// recovering from failures; returns the epoch's record.
async fn train_epoch(
    cl: &mut Cluster,
    opts: &LaunchOptions,
    epoch: usize,
    k: u64,
    last_ckpt: &mut u64,
) -> Result<EpochRecord, ClusterError> {
    let epoch_start = (epoch as u64 - 1) * k;
    let end_step = epoch_start + k;
    // Checkpoint cadence: every `checkpoint_every_steps` steps of an epoch
    // (a segment) and always at its end; 0 = at epoch ends only.
    let seg = match cl.cfg.cluster.checkpoint_every_steps {
        0 => k,
        n => n.min(k),
    };
    let per_step = cl.samples_per_step();
    let bar = EpochBar::new(
        opts.quiet,
        epoch,
        k * per_step,
        (*last_ckpt - epoch_start) * per_step,
    );
    let (mut restarts, mut reports, mut seconds, mut test) = (0u32, Vec::new(), 0.0, None);
    while *last_ckpt < end_step {
        let done_steps = *last_ckpt - epoch_start;
        let part = Segment {
            epoch,
            start_step: epoch_start,
            skip_steps: done_steps,
            steps: seg.min(k - done_steps),
        };
        let seg_end = *last_ckpt + part.steps;
        match attempt(cl, &part, &bar, seg_end == end_step).await {
            Ok((r, secs, t)) => {
                reports.extend(r);
                seconds += secs;
                test = t.or(test);
                *last_ckpt = seg_end;
                if seg_end < end_step {
                    tracing::info!(epoch, step = seg_end, "mid-epoch cluster checkpoint");
                }
            }
            Err(f) => recovery::recover(cl, epoch, f, &mut restarts, *last_ckpt).await?,
        }
    }
    bar.finish();
    let Some(test) = test else {
        return Err(ClusterError::Launch(format!(
            "epoch {epoch} ended without an evaluation (resumed at its end step?)"
        )));
    };
    Ok(record_epoch(
        epoch, end_step, &reports, seconds, restarts, test,
    ))
}

/// One attempt of `part`: the workers train it, then (at the epoch's end,
/// `last`) the test set is evaluated, then every shard is checkpointed at
/// the segment's end step. Returns the reports, the seconds of training
/// and the evaluation.
async fn attempt(
    cl: &mut Cluster,
    part: &Segment,
    bar: &EpochBar,
    last: bool,
) -> Result<(Vec<WorkerReport>, f64, Option<EvalResult>), Failure> {
    let t = Instant::now();
    let reports = segment::run_segment(cl, part, bar).await?;
    let secs = t.elapsed().as_secs_f64();
    let test = if last {
        let eval = evaluate(
            &cl.cfg,
            &cl.ps,
            &cl.cfg.data.test,
            cl.cfg.train.max_eval_samples,
        );
        let r = guarded(&cl.ps, &mut cl.health, cl.control, eval)
            .await
            .map_err(|e| guard_failure("evaluation", e))?;
        Some(r.0)
    } else {
        None
    };
    let step = part.start_step + part.skip_steps + part.steps;
    let keep = cl.cfg.cluster.keep_checkpoints.max(2);
    guarded(
        &cl.ps,
        &mut cl.health,
        cl.control,
        cl.ps.checkpoint(step, keep),
    )
    .await
    .map_err(|e| guard_failure(&format!("checkpoint at step {step}"), e))?;
    Ok((reports, secs, test))
}

/// The epoch's record (logged and exported as launcher metrics).
fn record_epoch(
    epoch: usize,
    step: u64,
    reports: &[WorkerReport],
    seconds: f64,
    restarts: u32,
    test: EvalResult,
) -> EpochRecord {
    let rec = EpochRecord::from_reports(epoch, step, reports, seconds, restarts, &test);
    tracing::info!(
        epoch,
        loss = rec.train_loss,
        auc = test.auc,
        gauc = test.gauc,
        samples_per_s = rec.samples_per_s as u64,
        "epoch done"
    );
    metrics::gauge!("ember_train_epoch").set(epoch as f64);
    metrics::gauge!("ember_test_auc").set(test.auc);
    metrics::gauge!("ember_test_gauc").set(test.gauc);
    metrics::gauge!("ember_test_logloss").set(test.logloss);
    metrics::counter!("ember_train_restarts_total").increment(u64::from(restarts));
    rec
}
