//! One worker's pass over its share of the training data.
//!
//! For each batch: dedup ids per table (done by [`Batch`]), pull the rows of
//! every table from all shards in parallel, forward/backward, push sparse
//! gradients with per-id occurrence counts, push dense gradients.
//!
//! Pipelining with a staleness bound `s` (`cluster.staleness`):
//! - `s = 0`: pull, compute, push strictly in sequence (deterministic).
//! - `s >= 1`: a prefetch task pulls rows for the next batches while the
//!   current one computes (at most `s` batches ahead), and pushes run in the
//!   background (at most `s` outstanding), so a row may be read up to `s`
//!   updates stale.
//!
//! Dense parameters: in synchronous mode the worker reads them at exactly its
//! step (`PullDense(min_step = step)`, which waits until every worker's
//! gradients of the previous step were averaged and applied; with
//! `cluster.dense_staleness = s`, `min_step = step - s`) and pushes with
//! `num_workers = M`; in asynchronous mode they are read (prefetched) and
//! pushed with `num_workers = 1`, applied as they arrive.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use futures_util::future::try_join_all;
use tokio::sync::mpsc;

use super::backend::Backend;
use super::config::JobConfig;
use super::TrainError;
use crate::batch::{Batch, SparseIds};
use crate::data::reader::{BatchReader, DataPosition, ReaderOptions};
use crate::model::{build_model, CtrModel, SparseRows, StepOutput};

/// What one worker does in one epoch.
#[derive(Debug, Clone)]
pub struct WorkerJob {
    /// The job.
    pub config: JobConfig,
    /// This worker's index (0 = chief).
    pub worker_index: usize,
    /// Number of workers.
    pub num_workers: usize,
    /// Epoch number, from 1.
    pub epoch: usize,
    /// Global step at the start of the epoch.
    pub start_step: u64,
    /// Steps of this epoch already done before this job (a mid-epoch
    /// segment): the reader skips `skip_steps * batch_size` samples of the
    /// split (exact resume of the epoch's shuffle) and the first step is
    /// `start_step + skip_steps`. 0 = from the epoch start.
    pub skip_steps: u64,
    /// Run exactly this many steps (synchronous mode needs every worker to
    /// run the same number); None = the whole split.
    pub steps: Option<u64>,
}

/// Progress of a worker, reported every `train.log_every` steps and at the end.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Progress {
    /// Worker index.
    pub worker: usize,
    /// Steps done in this epoch.
    pub steps: u64,
    /// Samples done in this epoch.
    pub samples: u64,
    /// Mean loss over the steps since the previous report.
    pub loss: f64,
}

/// A worker's account of one epoch.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct WorkerReport {
    /// Worker index.
    pub worker: usize,
    /// Steps run.
    pub steps: u64,
    /// Samples trained on.
    pub samples: u64,
    /// Sum of per-batch mean losses (divide by `steps`).
    pub loss_sum: f64,
    /// Seconds spent in pull RPCs.
    pub pull_s: f64,
    /// Seconds of forward/backward.
    pub compute_s: f64,
    /// Seconds spent in push RPCs.
    pub push_s: f64,
    /// Seconds the compute loop waited for prefetched data or for pushes.
    pub wait_s: f64,
    /// Sum of per-batch dedup ratios (divide by `steps`).
    pub dedup_sum: f64,
    /// Malformed lines skipped (with `data.skip_malformed`).
    pub skipped: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Salt of the id-dropout seeds (`sparse.id_dropout`).
const ID_DROPOUT_SALT: u64 = 0x001d_d00b_5a17;

/// A batch with its pulled rows (and dense parameters in async mode).
struct Ready {
    batch: Batch,
    rows: SparseRows,
    dense: Option<Vec<(String, Vec<f32>)>>,
    pull_s: f64,
}

/// The ids of `table` in `batch`.
fn ids_of<'a>(batch: &'a Batch, table: &str) -> Result<&'a SparseIds, TrainError> {
    batch
        .tables()
        .into_iter()
        .find(|t| t.table == table)
        .ok_or_else(|| {
            TrainError::Model(crate::model::ModelError::Batch(format!(
                "the model needs table {table:?}, which batches do not carry"
            )))
        })
}

/// Pulls the rows the model needs (`tables`, concurrently) for `batch`.
pub async fn pull_rows(
    ps: &Backend,
    batch: &Batch,
    tables: &[(String, usize)],
) -> Result<SparseRows, TrainError> {
    let futs = tables.iter().map(|(t, _)| async move {
        let ids = ids_of(batch, t)?;
        let (rows, _) = ps.pull(t, &ids.unique).await?;
        Ok::<_, TrainError>((t.as_str(), rows))
    });
    let mut out = SparseRows::new();
    for (t, rows) in try_join_all(futs).await? {
        out.insert(t, rows);
    }
    Ok(out)
}

/// Pushes the sparse gradients of every table in `grads` for `batch`.
async fn push_rows(
    ps: &Backend,
    batch: &Batch,
    grads: &BTreeMap<String, Vec<f32>>,
    step: u64,
) -> Result<(), TrainError> {
    let futs = grads.iter().map(|(t, g)| async move {
        let ids = ids_of(batch, t)?;
        ps.push(t, &ids.unique, g, &ids.counts, step).await
    });
    try_join_all(futs).await?;
    Ok(())
}

/// Builds the job's model on the CPU, seeded by `train.seed`.
pub fn build_job_model(cfg: &JobConfig) -> Result<Box<dyn CtrModel>, TrainError> {
    let mut mc = cfg.model.clone();
    mc.seed = cfg.train.seed;
    let mut model = build_model(&mc, &Device::Cpu).map_err(TrainError::Model)?;
    model.set_threads(cfg.cluster.worker_threads);
    Ok(model)
}

/// Loads dense values pulled from the PS into the model (parameters and state).
pub fn load_dense(
    model: &mut dyn CtrModel,
    values: &[(String, Vec<f32>)],
) -> Result<(), TrainError> {
    let state: std::collections::HashSet<String> =
        model.dense_state().into_iter().map(|(n, _)| n).collect();
    for (name, v) in values {
        let r = if state.contains(name) {
            model.set_state(name, v)
        } else {
            model.set_dense(name, v)
        };
        r.map_err(TrainError::Model)?;
    }
    Ok(())
}

/// A spawned task that is aborted when dropped (an abandoned epoch leaves no
/// prefetch or push running behind it).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> AbortOnDrop<T> {
    /// Waits for the task.
    async fn join(&mut self) -> Result<T, tokio::task::JoinError> {
        (&mut self.0).await
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs one epoch of one worker. `on_progress` is called every
/// `train.log_every` steps.
pub async fn run_epoch(
    job: &WorkerJob,
    ps: &Backend,
    on_progress: &(dyn Fn(&Progress) + Send + Sync),
) -> Result<WorkerReport, TrainError> {
    run_epoch_cancellable(job, ps, on_progress, &AtomicBool::new(false)).await
}

/// [`run_epoch`] that stops before the next step once `cancel` is set: it
/// then aborts its outstanding pushes and prefetch and returns the report of
/// the steps done so far (the caller knows it cancelled). Dropping the
/// returned future also aborts everything it spawned.
pub async fn run_epoch_cancellable(
    job: &WorkerJob,
    ps: &Backend,
    on_progress: &(dyn Fn(&Progress) + Send + Sync),
    cancel: &AtomicBool,
) -> Result<WorkerReport, TrainError> {
    let cfg = &job.config;
    let started = Instant::now();
    let sync = cfg.cluster.is_sync() && job.num_workers > 1;
    let staleness = cfg.cluster.staleness;
    let mut model = build_job_model(cfg)?;
    let tables = model.sparse_tables();
    let dense_lag = cfg.cluster.dense_staleness as u64;
    let mut feed = Feed::start(job, ps, &tables, !sync, step_limit(job))?;
    let mut report = WorkerReport {
        worker: job.worker_index,
        ..WorkerReport::default()
    };
    let mut window = (0u64, 0.0f64);
    let ps_arc = Arc::new(ps.clone());
    let mut pushes = Pushes::new(staleness);
    let first_step = job.start_step + job.skip_steps;
    loop {
        if cancel.load(Ordering::Relaxed) {
            // Abandoned: drop (abort) outstanding pushes and the prefetch.
            drop(pushes);
            drop(feed);
            report.seconds = started.elapsed().as_secs_f64();
            return Ok(report);
        }
        let step = first_step + report.steps;
        // 1. Next batch with its rows.
        let Some(mut ready) = feed.next(&mut report, ps, &tables).await? else {
            break;
        };
        if cfg.sparse.id_dropout > 0.0 {
            // Seeded by seed, step and worker: a rerun drops the same ids.
            let key = step.wrapping_mul(job.num_workers as u64) + job.worker_index as u64;
            let seed = ember_proto::rng::derive_seed(cfg.train.seed ^ ID_DROPOUT_SALT, key);
            let mut rng = ember_proto::rng::SplitMix64::new(seed);
            ready.batch.drop_item_ids(cfg.sparse.id_dropout, &mut rng);
        }
        report.pull_s += ready.pull_s;
        // 2. Dense parameters at this step.
        let dense = dense_at(ps, ready.dense, step, dense_lag, &mut report).await?;
        load_dense(model.as_mut(), &dense)?;
        // 3. Forward/backward.
        let t = Instant::now();
        let out = tokio::task::block_in_place(|| model.step(&ready.batch, &ready.rows, true))
            .map_err(TrainError::Model)?;
        report.compute_s += t.elapsed().as_secs_f64();
        if !out.loss.is_finite() {
            return Err(TrainError::NonFiniteLoss {
                loss: out.loss,
                step,
            });
        }
        let batch = ready.batch;
        count_step(job, &mut report, &batch, out.loss, step);
        window.0 += 1;
        window.1 += f64::from(out.loss);
        // 4. Push (in the background when pipelined).
        let num_workers = if sync { job.num_workers as u32 } else { 1 };
        let push = push_step(
            ps_arc.clone(),
            batch,
            out,
            step,
            num_workers,
            job.worker_index as u32,
        );
        pushes.submit(push, &mut report).await?;
        if window.0 >= cfg.train.log_every.max(1) {
            emit_progress(job, &report, &mut window, on_progress);
        }
    }
    pushes.drain(&mut report).await?;
    report.skipped = feed.finish().await?;
    publish_state(job, model.dense_state(), ps).await?;
    if window.0 > 0 {
        emit_progress(job, &report, &mut window, on_progress);
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Steps to run: the task's, capped by `train.max_steps_per_epoch`.
fn step_limit(job: &WorkerJob) -> Option<u64> {
    match (job.steps, job.config.train.max_steps_per_epoch) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// At the end of a task the chief (worker 0) publishes the model's `state`
/// (Dice running statistics) to the shards for evaluation and export.
async fn publish_state(
    job: &WorkerJob,
    state: Vec<(String, Vec<f32>)>,
    ps: &Backend,
) -> Result<(), TrainError> {
    if job.worker_index == 0 && !state.is_empty() {
        ps.assign_dense(&state).await?;
    }
    Ok(())
}

/// The dense parameters for `step`: those prefetched with the batch (async
/// mode), else pulled now, the newest the shards have once they applied
/// every step before `step - lag` (sync mode, `lag = cluster.dense_staleness`:
/// waits for the other workers; the wait counts as `wait_s`). Read at
/// compute time rather than with the prefetched rows, so that they are as
/// fresh as the shards allow: prefetched, a step always computed with the
/// oldest version the bound permits, which cost DIN 0.015 AUC after 250
/// steps (BENCHMARKS.md).
async fn dense_at(
    ps: &Backend,
    prefetched: Option<Vec<(String, Vec<f32>)>>,
    step: u64,
    lag: u64,
    report: &mut WorkerReport,
) -> Result<Vec<(String, Vec<f32>)>, TrainError> {
    if let Some(d) = prefetched {
        return Ok(d);
    }
    let t = Instant::now();
    let d = ps.pull_dense(step.saturating_sub(lag)).await?.0;
    report.wait_s += t.elapsed().as_secs_f64();
    Ok(d)
}

/// A worker's pushes: awaited at once (staleness 0), or run in the
/// background with at most `staleness` outstanding. Dropping it aborts them.
struct Pushes {
    staleness: usize,
    inflight: VecDeque<AbortOnDrop<Result<f64, TrainError>>>,
}

impl Pushes {
    fn new(staleness: usize) -> Pushes {
        Pushes {
            staleness,
            inflight: VecDeque::new(),
        }
    }

    /// Runs `push` (inline, or spawned and then waits for the oldest while
    /// more than `staleness` are outstanding); push time goes to `push_s`,
    /// time spent waiting for the pipeline to `wait_s` as well.
    async fn submit(
        &mut self,
        push: impl std::future::Future<Output = Result<f64, TrainError>> + Send + 'static,
        report: &mut WorkerReport,
    ) -> Result<(), TrainError> {
        if self.staleness == 0 {
            report.push_s += push.await?;
            return Ok(());
        }
        self.inflight.push_back(AbortOnDrop(tokio::spawn(push)));
        while self.inflight.len() > self.staleness {
            self.wait_oldest(report).await?;
        }
        Ok(())
    }

    /// Waits for every outstanding push.
    async fn drain(&mut self, report: &mut WorkerReport) -> Result<(), TrainError> {
        while !self.inflight.is_empty() {
            self.wait_oldest(report).await?;
        }
        Ok(())
    }

    async fn wait_oldest(&mut self, report: &mut WorkerReport) -> Result<(), TrainError> {
        if let Some(h) = self.inflight.pop_front() {
            let t = Instant::now();
            report.push_s += join(h).await?;
            report.wait_s += t.elapsed().as_secs_f64();
        }
        Ok(())
    }
}

/// The push of one step: the sparse gradients of every table, then the
/// dense gradients (averaged over `num_workers` workers: all of them in
/// synchronous mode, 1 = applied alone). Returns its seconds.
async fn push_step(
    ps: Arc<Backend>,
    batch: Batch,
    out: StepOutput,
    step: u64,
    num_workers: u32,
    worker: u32,
) -> Result<f64, TrainError> {
    let t = Instant::now();
    push_rows(&ps, &batch, &out.sparse_grads, step).await?;
    ps.push_dense(&out.dense_grads, step, num_workers, worker)
        .await?;
    Ok(t.elapsed().as_secs_f64())
}

/// Counts one trained step in `report` and in the worker's Prometheus series
/// (no-ops unless the process installed an exporter: `worker
/// --metrics-addr`, or the launcher's).
fn count_step(job: &WorkerJob, report: &mut WorkerReport, batch: &Batch, loss: f32, step: u64) {
    report.steps += 1;
    report.samples += batch.batch_size as u64;
    report.loss_sum += f64::from(loss);
    report.dedup_sum += batch.dedup_ratio();
    let wl = job.worker_index.to_string();
    metrics::counter!("ember_worker_steps_total", "worker" => wl.clone()).increment(1);
    metrics::counter!("ember_worker_samples_total", "worker" => wl.clone())
        .increment(batch.batch_size as u64);
    metrics::gauge!("ember_worker_loss", "worker" => wl.clone()).set(f64::from(loss));
    metrics::gauge!("ember_worker_step", "worker" => wl).set((step + 1) as f64);
}

/// Reports the mean loss of the steps in `window` and empties it.
fn emit_progress(
    job: &WorkerJob,
    report: &WorkerReport,
    window: &mut (u64, f64),
    on_progress: &(dyn Fn(&Progress) + Send + Sync),
) {
    on_progress(&Progress {
        worker: job.worker_index,
        steps: report.steps,
        samples: report.samples,
        loss: window.1 / window.0 as f64,
    });
    *window = (0, 0.0);
}

/// The reader of this worker's split for `job` (its epoch's shuffle,
/// resumed `skip_steps` batches in).
fn open_reader(job: &WorkerJob) -> Result<BatchReader, TrainError> {
    let cfg = &job.config;
    let opts = ReaderOptions {
        batch_size: cfg.data.batch_size,
        max_len: cfg.data.max_len,
        shuffle_buffer: cfg.data.shuffle_buffer,
        seed: cfg
            .train
            .seed
            .wrapping_mul(1_000_003)
            .wrapping_add(job.epoch as u64),
        worker_index: job.worker_index,
        num_workers: job.num_workers,
        epochs: 1,
        skip_malformed: cfg.data.skip_malformed,
        drop_last: false,
        schema: cfg.schema(),
        negatives: cfg.model.kind == crate::model::ModelKind::Dien && cfg.model.aux_loss,
    };
    let files = std::slice::from_ref(&cfg.data.train);
    let reader = if job.skip_steps > 0 {
        let pos = DataPosition {
            epoch: 0,
            samples: job.skip_steps.saturating_mul(cfg.data.batch_size as u64),
        };
        BatchReader::resume(files, opts, pos)
    } else {
        BatchReader::new(files, opts)
    };
    reader.map_err(TrainError::Data)
}

/// Reads the next batch and pulls its rows (and, with `async_dense`, the
/// dense parameters): the one read-and-pull step, inline or in the prefetch
/// task. `None` at the end of the split.
async fn read_and_pull(
    reader: &mut BatchReader,
    ps: &Backend,
    tables: &[(String, usize)],
    async_dense: bool,
) -> Result<Option<Ready>, TrainError> {
    let Some(batch) = reader.next_batch().map_err(TrainError::Data)? else {
        return Ok(None);
    };
    let t = Instant::now();
    let rows = pull_rows(ps, &batch, tables).await?;
    let dense = match async_dense {
        true => Some(ps.pull_dense(0).await?.0),
        false => None,
    };
    Ok(Some(Ready {
        batch,
        rows,
        dense,
        pull_s: t.elapsed().as_secs_f64(),
    }))
}

/// Where the compute loop gets its batches: read and pulled inline
/// (staleness 0), or by a prefetch task up to `staleness` batches ahead.
enum Feed {
    Inline {
        reader: Box<BatchReader>,
        limit: Option<u64>,
        async_dense: bool,
    },
    Prefetch {
        rx: mpsc::Receiver<Result<Ready, TrainError>>,
        task: AbortOnDrop<u64>,
    },
}

impl Feed {
    fn start(
        job: &WorkerJob,
        ps: &Backend,
        tables: &[(String, usize)],
        async_dense: bool,
        limit: Option<u64>,
    ) -> Result<Feed, TrainError> {
        let mut reader = open_reader(job)?;
        let staleness = job.config.cluster.staleness;
        if staleness == 0 {
            return Ok(Feed::Inline {
                reader: Box::new(reader),
                limit,
                async_dense,
            });
        }
        let (tx, rx) = mpsc::channel::<Result<Ready, TrainError>>(staleness);
        let (ps, tables) = (ps.clone(), tables.to_vec());
        let task = AbortOnDrop(tokio::spawn(async move {
            let mut n = 0u64;
            while limit.is_none_or(|l| n < l) {
                let Some(item) = read_and_pull(&mut reader, &ps, &tables, async_dense)
                    .await
                    .transpose()
                else {
                    break;
                };
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    break;
                }
                n += 1;
            }
            reader.skipped_malformed()
        }));
        Ok(Feed::Prefetch { rx, task })
    }

    /// The next batch with its rows; `None` when the split or the step limit
    /// is reached. Time spent waiting for the prefetch counts as `wait_s`.
    async fn next(
        &mut self,
        report: &mut WorkerReport,
        ps: &Backend,
        tables: &[(String, usize)],
    ) -> Result<Option<Ready>, TrainError> {
        match self {
            Feed::Inline {
                reader,
                limit,
                async_dense,
            } => {
                if limit.is_some_and(|l| report.steps >= l) {
                    return Ok(None);
                }
                read_and_pull(reader, ps, tables, *async_dense).await
            }
            Feed::Prefetch { rx, .. } => {
                let wait = Instant::now();
                let r = rx.recv().await.transpose();
                report.wait_s += wait.elapsed().as_secs_f64();
                r
            }
        }
    }

    /// Malformed lines the reader skipped (after the prefetch task ended).
    async fn finish(self) -> Result<u64, TrainError> {
        match self {
            Feed::Inline { reader, .. } => Ok(reader.skipped_malformed()),
            Feed::Prefetch { mut task, .. } => {
                task.join().await.map_err(|source| TrainError::Task {
                    what: "prefetch",
                    source,
                })
            }
        }
    }
}

async fn join(mut h: AbortOnDrop<Result<f64, TrainError>>) -> Result<f64, TrainError> {
    h.join().await.map_err(|source| TrainError::Task {
        what: "push",
        source,
    })?
}
