//! `ember train` for `[model] kind = "gru4rec"`: GRU4Rec through the shards.
//!
//! The shards are started as for every job (child `ps-server` processes,
//! in-process servers or `cluster.shard_addrs`; TLS + token); the item
//! tables `gru4rec_emb`, `gru4rec_out`, `gru4rec_bias` and the dense GRU
//! live there (`ember_worker::train::seqrec`). `cluster.workers` workers run
//! as tasks of this process, each on its share of every epoch's sequences,
//! pulling and pushing over gRPC. After every epoch the launcher pulls the
//! whole model back, ranks every training item for each test user (the
//! protocol of `ember gru4rec`, `crate::seqrec`), checkpoints every shard,
//! and writes `metrics.json` and `curves.png`; the final table puts GRU4Rec next to the
//! popularity and co-occurrence baselines.
//!
//! A shard that dies or hangs (no Health answer for `cluster.shard_timeout_s`)
//! aborts the epoch: hung shard processes are killed, dead ones restarted
//! from their checkpoints, every shard restored to the last epoch's
//! checkpoint, and the epoch rerun (at most `cluster.max_restarts` times;
//! the rerun draws the same negatives).
//!
//! `--resume` continues a run after its last completed epoch: the shards
//! restore that epoch's checkpoint, the workers continue from their saved
//! push steps (`seq_state.json` in the run directory, written after every
//! epoch), and the epochs already in `metrics.json` are kept.
//!
//! With `cluster.checkpoint_every_steps = N` every worker stops after N
//! steps of its share, every shard is checkpointed, and `seq_state.json`
//! keeps each worker's [`SeqCursor`] (its batcher position, its slots'
//! hidden states, its loss so far): a failure rolls back to that
//! checkpoint and reruns from those cursors, and `--resume` continues
//! inside the epoch. Segments draw their negatives from where they start,
//! so a run stopped and resumed at a mid-epoch checkpoint trains exactly
//! what the uninterrupted run with the same N trains. Checkpoints are
//! numbered by the sum of the workers' push steps (it grows with every
//! step of any worker). Not (yet) like the CTR jobs: workers are tasks of
//! the launcher, not separate processes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_worker::metrics::FullRankEval;
use ember_worker::model::gru4rec::{Gru4RecConfig, ItemStats};
use ember_worker::train::backend::Backend;
use ember_worker::train::client::{PsClient, RetryPolicy};
use ember_worker::train::config::{
    ClusterConfig, CountMode, DataConfig, DenseConfig, JobConfig, SecurityConfig, SparseConfig,
    SyncMode, TrainSettings,
};
use ember_worker::train::seqrec::{self, SeqCursor, SeqWorker};
use ember_worker::train::TrainError;
use serde::{Deserialize, Serialize};

use super::{io_err, setup, shards, LaunchOptions};
use crate::health::{guarded, Guarded, HealthWatch};
use crate::seqrec::{
    baselines, evaluate_model, events, last_item_ranks, load_sequences, EvalRows, Holdout, RankRow,
    SeedRun, SeqEpoch, SeqReport, KS,
};
use crate::ClusterError;

/// The `[data]` section of a GRU4Rec job.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeqData {
    /// Training sequences (`train.seq` of `ember-data prepare`).
    pub train: PathBuf,
    /// Test sequences (full; the last item is the target).
    pub test: PathBuf,
    /// Target rows: `"test"` (default) or `"valid"`.
    #[serde(default)]
    pub holdout: Holdout,
    /// Cut-off K of the per-epoch Recall@K and MRR@K (20).
    #[serde(default = "d_k")]
    pub k: usize,
}

fn d_k() -> usize {
    20
}

/// A GRU4Rec job of `ember train`: `[model]` (`kind = "gru4rec"` and the
/// fields of [`Gru4RecConfig`] but its in-process optimizer), `[data]`
/// ([`SeqData`]), and the `[sparse]`, `[dense]`, `[cluster]` (`sync`
/// defaults to `"async"` here), `[train]`, `[security]` sections of every job.
#[derive(Debug, Clone)]
pub struct SeqTrainJob {
    /// Job name.
    pub name: String,
    /// Model hyper-parameters (their `seed` is replaced by `train.seed` at launch).
    pub model: Gru4RecConfig,
    /// Input sequences.
    pub data: SeqData,
    /// The job's other sections (its `model` and `data` unused).
    pub job: JobConfig,
}

/// True when the job file's `[model] kind` is `"gru4rec"`.
pub fn is_seq_job(text: &str) -> bool {
    toml::from_str::<toml::Table>(text)
        .ok()
        .and_then(|t| {
            t.get("model")
                .and_then(|m| m.get("kind"))
                .and_then(|k| k.as_str().map(|s| s == "gru4rec"))
        })
        .unwrap_or(false)
}

fn section<T: serde::de::DeserializeOwned>(
    table: &mut toml::Table,
    name: &str,
    origin: &str,
) -> Result<Option<T>, ClusterError> {
    let Some(v) = table.remove(name) else {
        return Ok(None);
    };
    serde_path_to_error::deserialize(v).map(Some).map_err(|e| {
        let path = e.path().to_string();
        cfg_err(format!("{origin}: {name}.{path}: {}", e.into_inner()))
    })
}

fn cfg_err(msg: String) -> ClusterError {
    ClusterError::Train(TrainError::Config(msg))
}

impl SeqTrainJob {
    /// Parses a job file's text (`origin` names it in errors) and validates it.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ClusterError> {
        let mut t: toml::Table =
            toml::from_str(text).map_err(|e| cfg_err(format!("{origin}: {e}")))?;
        let name = match t.remove("name") {
            Some(toml::Value::String(s)) => s,
            Some(v) => return Err(cfg_err(format!("{origin}: name = {v}: expected a string"))),
            None => "gru4rec".to_string(),
        };
        let mut model_t = match t.remove("model") {
            Some(toml::Value::Table(m)) => m,
            _ => return Err(cfg_err(format!("{origin}: [model] is missing"))),
        };
        model_t.remove("kind");
        // The in-process optimizer fields have no meaning here: the shards'
        // optimizers are [sparse] and [dense].
        for f in ["lr", "momentum", "init_acc", "adagrad_eps", "seed"] {
            if model_t.contains_key(f) {
                return Err(cfg_err(format!(
                    "{origin}: model.{f}: not used by `ember train` (the optimizers are \
                     sparse.optimizer and dense.optimizer, the seed is train.seed)"
                )));
            }
        }
        let mut wrap = toml::Table::new();
        wrap.insert("model".into(), toml::Value::Table(model_t));
        let model: Gru4RecConfig = section(&mut wrap, "model", origin)?.unwrap_or_default();
        let data: SeqData = section(&mut t, "data", origin)?
            .ok_or_else(|| cfg_err(format!("{origin}: [data] is missing")))?;
        let sparse: SparseConfig = section(&mut t, "sparse", origin)?.unwrap_or_default();
        let dense: DenseConfig = section(&mut t, "dense", origin)?.unwrap_or_default();
        // Asynchronous dense updates unless the file says otherwise (then
        // validation explains why "sync" cannot work).
        match t.get_mut("cluster") {
            Some(toml::Value::Table(c)) => {
                c.entry("sync").or_insert_with(|| "async".into());
            }
            Some(_) => {}
            None => {
                let mut c = toml::Table::new();
                c.insert("sync".into(), "async".into());
                t.insert("cluster".into(), toml::Value::Table(c));
            }
        }
        let cluster: ClusterConfig = section(&mut t, "cluster", origin)?.unwrap_or_default();
        let train: TrainSettings = section(&mut t, "train", origin)?.unwrap_or_default();
        let security: SecurityConfig = section(&mut t, "security", origin)?.unwrap_or_default();
        if let Some(k) = t.keys().next() {
            return Err(cfg_err(format!("{origin}: unknown field `{k}`")));
        }
        let job = JobConfig {
            name: name.clone(),
            model: Default::default(),
            data: DataConfig {
                train: data.train.clone(),
                test: data.test.clone(),
                counts: None,
                batch_size: model.batch_size,
                eval_batch_size: 1024,
                max_len: 100,
                shuffle_buffer: 0,
                skip_malformed: false,
            },
            sparse,
            dense,
            cluster,
            train,
            security,
            features: Vec::new(),
            prepare: None,
        };
        let j = SeqTrainJob {
            name,
            model,
            data,
            job,
        };
        j.validate()
            .map_err(|e| cfg_err(format!("{origin}: {e}")))?;
        Ok(j)
    }

    /// Reads and validates a job file.
    pub fn load(path: &Path) -> Result<Self, ClusterError> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Checks every field; the error names the bad one.
    pub fn validate(&self) -> Result<(), String> {
        self.job.validate()?;
        seqrec::validate(&self.model)?;
        if self.data.k == 0 {
            return Err("data.k must be >= 1".into());
        }
        if self.job.cluster.sync != SyncMode::Async {
            return Err(
                "cluster.sync: GRU4Rec's workers run different numbers of steps per epoch, \
                 so its dense GRU is updated asynchronously: set sync = \"async\""
                    .into(),
            );
        }
        if self.job.cluster.external_workers() {
            return Err(
                "cluster.worker_mode = \"external\": GRU4Rec's workers run in the launcher".into(),
            );
        }
        Ok(())
    }
}

/// Trains the job; returns the report (also written to `metrics.json`).
pub async fn train_seq(job: SeqTrainJob, opts: &LaunchOptions) -> Result<SeqReport, ClusterError> {
    let SeqTrainJob {
        model: mut mcfg,
        data,
        job: mut cfg,
        ..
    } = job;
    mcfg.seed = cfg.train.seed;
    let out = cfg.out_dir();
    std::fs::create_dir_all(&out).map_err(io_err(&out))?;
    // Read the data before any shard is touched: a bad file fails first.
    let (train, targets) = load_sequences(&data.train, &data.test, data.holdout)?;
    let items = Arc::new(ItemStats::new(&train, mcfg.sample_alpha));
    if items.is_empty() {
        return Err(cfg_err(format!(
            "{}: no training sequence with an item",
            data.train.display()
        )));
    }
    let train_idx = Arc::new(items.index_sequences(&train));
    let (rows, skipped) = EvalRows::build(&targets, &items.vocab);
    setup::resolve_security(&mut cfg)?;
    let ckpt = cfg.checkpoint_dir();
    let resume = if opts.resume {
        Some(SeqState::read(&out, &cfg)?)
    } else {
        None
    };
    if resume.is_none()
        && ckpt.starts_with(&out)
        && ckpt.exists()
        && cfg.cluster.shard_addrs.is_empty()
    {
        std::fs::remove_dir_all(&ckpt).map_err(io_err(&ckpt))?;
    }
    std::fs::create_dir_all(&ckpt).map_err(io_err(&ckpt))?;
    let mut shards = shards::start_shards(&cfg, resume.is_some()).await?;
    // A client that cannot be built leaves the shard processes to their
    // drop (killed).
    let ps = client(&cfg, &shards.addrs())?;
    let result = run(
        &cfg,
        &ps,
        &mcfg,
        &data,
        &mut shards,
        &items,
        &train,
        &train_idx,
        &rows,
        skipped,
        resume,
        opts,
    )
    .await;
    shards.stop(&ps).await;
    result
}

/// Where a GRU4Rec run stands after an epoch: `<out_dir>/seq_state.json`,
/// written (atomically) after the epoch's checkpoint and `metrics.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeqState {
    /// The last completed epoch.
    pub epoch: usize,
    /// The cluster checkpoint taken at its end.
    pub ckpt_step: u64,
    /// Each worker's next push step.
    pub steps: Vec<u64>,
    /// The run's seed.
    pub seed: u64,
    /// The epoch in progress, when the state was written at a mid-epoch
    /// checkpoint (`cluster.checkpoint_every_steps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial: Option<PartialEpoch>,
}

/// An epoch in progress at a mid-epoch checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartialEpoch {
    /// The epoch (the state's `epoch + 1`).
    pub epoch: usize,
    /// Each worker's position in it.
    pub cursors: Vec<SeqCursor>,
    /// Seconds of training spent on it so far.
    pub secs: f64,
}

/// The id of the cluster checkpoint taken when the workers' next push steps
/// are `steps`: their sum, which grows with every step of any worker (the
/// largest alone would repeat when only workers behind it advance).
fn ckpt_id(steps: &[u64]) -> u64 {
    steps.iter().sum()
}

impl SeqState {
    fn path(out: &Path) -> PathBuf {
        out.join("seq_state.json")
    }

    /// The state of the run in `out`, checked against the job (same seed and
    /// workers: the sequences' split and negatives depend on both).
    fn read(out: &Path, cfg: &JobConfig) -> Result<Self, ClusterError> {
        let p = Self::path(out);
        let text = std::fs::read_to_string(&p).map_err(|e| {
            cfg_err(format!(
                "--resume: {} ({e}): no completed epoch to continue from",
                p.display()
            ))
        })?;
        let st: SeqState = serde_json::from_str(&text)
            .map_err(|e| cfg_err(format!("--resume: {}: {e}", p.display())))?;
        if let Some(p) = st
            .partial
            .as_ref()
            .filter(|p| p.epoch != st.epoch + 1 || p.cursors.len() != st.steps.len())
        {
            return Err(cfg_err(format!(
                "--resume: {}: the epoch in progress ({}, {} workers) does not follow epoch {} of {} workers",
                Self::path(out).display(),
                p.epoch,
                p.cursors.len(),
                st.epoch,
                st.steps.len()
            )));
        }
        if st.steps.len() != cfg.cluster.workers || st.seed != cfg.train.seed {
            return Err(cfg_err(format!(
                "--resume: {} was written with {} workers and seed {}, the job has {} workers and seed {}",
                p.display(),
                st.steps.len(),
                st.seed,
                cfg.cluster.workers,
                cfg.train.seed
            )));
        }
        Ok(st)
    }

    fn write(&self, out: &Path) -> Result<(), ClusterError> {
        let text =
            serde_json::to_string_pretty(self).map_err(|e| ClusterError::Report(e.to_string()))?;
        ember_proto::atomic::write_atomic(&Self::path(out), |f| {
            std::io::Write::write_all(f, text.as_bytes())
        })?;
        Ok(())
    }
}

fn client(cfg: &JobConfig, addrs: &[String]) -> Result<Backend, ClusterError> {
    let retry = RetryPolicy {
        deadline: Duration::from_secs(cfg.cluster.retry_deadline_s),
        ..RetryPolicy::default()
    };
    Ok(Backend::Remote(PsClient::new(
        addrs,
        retry,
        &cfg.security.client()?,
    )?))
}

#[allow(clippy::too_many_arguments)]
async fn run(
    cfg: &JobConfig,
    ps: &Backend,
    mcfg: &Gru4RecConfig,
    data: &SeqData,
    shards: &mut shards::Shards,
    items: &Arc<ItemStats>,
    train: &[Vec<u64>],
    train_idx: &Arc<Vec<Vec<usize>>>,
    rows: &EvalRows,
    skipped: usize,
    resume: Option<SeqState>,
    opts: &LaunchOptions,
) -> Result<SeqReport, ClusterError> {
    let out = cfg.out_dir();
    shards
        .wait_external(ps, Duration::from_secs(cfg.cluster.retry_deadline_s))
        .await?;
    let info = shards.info();
    let info_path = out.join("cluster.json");
    std::fs::write(
        &info_path,
        serde_json::to_string_pretty(&info).unwrap_or_default(),
    )
    .map_err(io_err(&info_path))?;
    let seed = cfg.train.seed;
    let keep = cfg.cluster.keep_checkpoints.max(2);
    let control = Duration::from_secs(cfg.cluster.control_timeout_s);
    if let Some(st) = &resume {
        crate::health::with_deadline(control, ps.restore(st.ckpt_step))
            .await
            .map_err(|e| {
                ClusterError::Launch(format!("--resume: restore of step {}: {e}", st.ckpt_step))
            })?;
        tracing::info!(
            epoch = st.epoch,
            step = st.ckpt_step,
            "gru4rec: resumed after the last completed epoch"
        );
    } else {
        for t in seqrec::tables(mcfg, &cfg.sparse, items.len(), seed) {
            ps.create_table(&t).await?;
            if cfg.sparse.count_mode == CountMode::Exact {
                let counts: Vec<(u64, u32)> = items
                    .ids
                    .iter()
                    .zip(&items.counts)
                    .map(|(&id, &c)| (id, c as u32))
                    .collect();
                ps.load_counts(&t.name, &counts).await?;
            }
        }
        ps.init_dense(
            &seqrec::initial_dense(mcfg, seed)?,
            &cfg.dense.optimizer.to_proto(),
        )
        .await?;
        ps.checkpoint(0, keep).await?;
    }
    let m = cfg.cluster.workers;
    let mut report = SeqReport {
        baselines: baselines(train_idx, items.len(), rows),
        runs: Vec::new(),
        skipped,
    };
    let mut run = SeedRun {
        seed,
        epochs: Vec::new(),
        row: RankRow::from_eval("gru4rec", &FullRankEval::new(&KS)),
    };
    let total_events = events(train_idx);
    let mut health = HealthWatch::new(
        shards.addrs().len(),
        Duration::from_secs(cfg.cluster.shard_timeout_s),
    );
    // Each worker's next push step (continues across epochs and reruns).
    let mut steps = vec![0u64; m];
    let mut ckpt_step = 0u64;
    let mut first_epoch = 1;
    let mut partial: Option<PartialEpoch> = None;
    if let Some(st) = &resume {
        steps.clone_from(&st.steps);
        ckpt_step = st.ckpt_step;
        first_epoch = st.epoch + 1;
        partial.clone_from(&st.partial);
        let old: Option<SeqReport> = std::fs::read_to_string(out.join("metrics.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        if let Some(old_run) = old.and_then(|r| r.runs.into_iter().next()) {
            run.epochs = old_run
                .epochs
                .into_iter()
                .filter(|e| e.epoch <= st.epoch)
                .collect();
            run.row = old_run.row;
        }
        if let Some(p) = &partial {
            tracing::info!(
                epoch = p.epoch,
                step = st.ckpt_step,
                "gru4rec: resumed inside epoch {} at its mid-epoch checkpoint",
                p.epoch
            );
        }
    }
    let every = cfg.cluster.checkpoint_every_steps;
    for epoch in first_epoch..=cfg.train.epochs {
        let mut restarts = 0u32;
        // The epoch at the last checkpoint: each worker's cursor (None: at
        // the epoch's start), the push steps and the training seconds.
        let (mut saved, mut secs) = match partial.take() {
            Some(p) if p.epoch == epoch => (p.cursors.into_iter().map(Some).collect(), p.secs),
            _ => (vec![None; m], 0.0),
        };
        let mut saved_steps = steps.clone();
        let (cursors, model) = loop {
            // A segment (or the rest of the epoch), then the model pulled
            // back at the epoch's end, then a checkpoint: one attempt, watched.
            let mut cursors = saved.clone();
            let attempt = async {
                let t = Instant::now();
                let done = train_segment(
                    mcfg,
                    items,
                    ps,
                    train_idx,
                    seed,
                    epoch,
                    &mut steps,
                    &mut cursors,
                    every,
                )
                .await?;
                let secs = t.elapsed().as_secs_f64();
                let model = if done {
                    Some(seqrec::pull_model(ps, mcfg, train).await?)
                } else {
                    None
                };
                ps.checkpoint(ckpt_id(&steps), keep).await?;
                Ok::<_, TrainError>((model, secs))
            };
            match guarded(ps, &mut health, Duration::MAX, attempt).await {
                Ok((model, dt)) => {
                    secs += dt;
                    ckpt_step = ckpt_id(&steps);
                    saved_steps.clone_from(&steps);
                    if let Some(model) = model {
                        break (cursors, model);
                    }
                    saved = cursors;
                    let cursors: Vec<SeqCursor> = saved.iter().flatten().cloned().collect();
                    tracing::info!(
                        epoch,
                        step = ckpt_step,
                        trained = cursors.iter().map(|c| c.steps).sum::<u64>(),
                        "gru4rec: mid-epoch checkpoint"
                    );
                    SeqState {
                        epoch: epoch - 1,
                        ckpt_step,
                        steps: steps.clone(),
                        seed,
                        partial: Some(PartialEpoch {
                            epoch,
                            cursors,
                            secs,
                        }),
                    }
                    .write(&out)?;
                }
                Err(Guarded::Failed(e)) if e.is_deterministic() => return Err(e.into()),
                Err(g) => {
                    restarts += 1;
                    if restarts > cfg.cluster.max_restarts {
                        return Err(ClusterError::Launch(format!(
                            "epoch {epoch} failed {restarts} times, giving up; last failure: {g}"
                        )));
                    }
                    tracing::warn!(
                        epoch,
                        restarts,
                        "{g}; rolling the cluster back to step {ckpt_step}"
                    );
                    if let Guarded::Hung(h) = &g {
                        shards.kill_hung(h);
                    }
                    let restarted = shards.restart_dead()?;
                    if !restarted.is_empty() {
                        tracing::warn!(?restarted, "restarted shards");
                    }
                    health.reset();
                    guarded(ps, &mut health, control, ps.restore(ckpt_step))
                        .await
                        .map_err(|e| {
                            ClusterError::Launch(format!("restore of step {ckpt_step}: {e}"))
                        })?;
                    // The workers restart from the checkpoint's cursors and steps.
                    steps.clone_from(&saved_steps);
                    tracing::info!(step = ckpt_step, "cluster rolled back");
                }
            }
        };
        let (loss, step_count) = cursors
            .iter()
            .flatten()
            .fold((0.0, 0u64), |(l, n), c| (l + c.loss_sum, n + c.steps));
        let (recall, mrr, row) = tokio::task::block_in_place(|| {
            let ranks = last_item_ranks(&model, rows)?;
            let (r, mr) = ember_worker::metrics::recall_mrr_at_k(&ranks, data.k);
            Ok::<_, ClusterError>((r, mr, evaluate_model(&model, rows)?))
        })?;
        let rec = SeqEpoch {
            epoch,
            restarts,
            loss: loss / step_count.max(1) as f64,
            recall,
            mrr,
            users: rows.len(),
            events_per_s: total_events as f64 / secs.max(1e-9),
        };
        tracing::info!(
            epoch,
            loss = rec.loss,
            recall,
            mrr,
            events_per_s = rec.events_per_s as u64,
            "gru4rec epoch done (Recall@{k}, MRR@{k})",
            k = data.k
        );
        if !opts.quiet {
            eprintln!(
                "epoch {epoch}: loss {:.4}  Recall@{k} {recall:.4}  MRR@{k} {mrr:.4}  ({:.0} events/s, {secs:.1} s)",
                rec.loss,
                rec.events_per_s,
                k = data.k
            );
        }
        run.epochs.push(rec);
        run.row = RankRow::from_eval("gru4rec", &row);
        let mut r = report.clone();
        r.runs.push(run.clone());
        let text =
            serde_json::to_string_pretty(&r).map_err(|e| ClusterError::Report(e.to_string()))?;
        let path = out.join("metrics.json");
        ember_proto::atomic::write_atomic(&path, |f| {
            std::io::Write::write_all(f, text.as_bytes())
        })?;
        SeqState {
            epoch,
            ckpt_step,
            steps: steps.clone(),
            seed,
            partial: None,
        }
        .write(&out)?;
        let png = out.join("curves.png");
        if let Err(e) = crate::plot::plot_seq_curves(&png, &cfg.name, data.k, &run.epochs) {
            tracing::warn!("could not draw curves: {e}");
        }
    }
    report.runs.push(run);
    Ok(report)
}

/// A spawned task aborted when dropped (an abandoned epoch leaves no worker
/// running behind it).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One segment of `epoch`: every worker whose share is not done (a task,
/// fresh from its step in `steps` and its cursor in `cursors`, `None` at the
/// epoch's start) trains at most `every` steps (0: the rest of its share);
/// advances `steps` and `cursors` and returns whether every share is done.
/// Dropping the future aborts the workers (and leaves both unchanged).
#[allow(clippy::too_many_arguments)]
async fn train_segment(
    mcfg: &Gru4RecConfig,
    items: &Arc<ItemStats>,
    ps: &Backend,
    train_idx: &Arc<Vec<Vec<usize>>>,
    seed: u64,
    epoch: usize,
    steps: &mut [u64],
    cursors: &mut [Option<SeqCursor>],
    every: u64,
) -> Result<bool, TrainError> {
    let m = steps.len();
    let mut tasks = Vec::with_capacity(m);
    for (w, (&step, cur)) in steps.iter().zip(cursors.iter()).enumerate() {
        if cur.as_ref().is_some_and(SeqCursor::done) {
            continue;
        }
        let mut wk = SeqWorker::new(mcfg, items.clone(), ps.clone(), w, m, seed)?;
        wk.step = step;
        let idx = train_idx.clone();
        let cur = cur.clone();
        tasks.push((
            w,
            AbortOnDrop(tokio::spawn(async move {
                let r = wk.train_segment(&idx, epoch, cur.as_ref(), every).await;
                r.map(|c| (c, wk.step))
            })),
        ));
    }
    let mut next = Vec::with_capacity(tasks.len());
    for (w, t) in &mut tasks {
        let (cur, step) = (&mut t.0).await.map_err(|e| TrainError::Task {
            what: "gru4rec worker",
            source: e,
        })??;
        next.push((*w, cur, step));
    }
    for (w, cur, step) in next {
        steps[w] = step;
        cursors[w] = Some(cur);
    }
    Ok(cursors
        .iter()
        .all(|c| c.as_ref().is_some_and(SeqCursor::done)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOB: &str =
        "[model]\nkind = \"gru4rec\"\nhidden = 8\n[data]\ntrain = \"a.seq\"\ntest = \"b.seq\"\n";

    #[test]
    fn parses_with_async_dense_by_default_and_names_bad_fields() {
        assert!(is_seq_job(JOB));
        assert!(!is_seq_job("[model]\nkind = \"din\"\n"));
        let j = SeqTrainJob::parse(JOB, "job.toml").unwrap();
        assert_eq!(j.model.hidden, 8);
        assert_eq!(j.job.cluster.sync, SyncMode::Async);
        assert_eq!(j.data.k, 20);
        let e = SeqTrainJob::parse(&format!("{JOB}[cluster]\nsync = \"sync\"\n"), "job.toml")
            .unwrap_err();
        assert!(e.to_string().contains("cluster.sync"), "{e}");
        let e =
            SeqTrainJob::parse(&format!("{JOB}[cluster]\nshardz = 2\n"), "job.toml").unwrap_err();
        assert!(e.to_string().contains("shardz"), "{e}");
        let e =
            SeqTrainJob::parse(&JOB.replace("hidden = 8", "hiden = 8"), "job.toml").unwrap_err();
        assert!(e.to_string().contains("hiden"), "{e}");
        let e = SeqTrainJob::parse(&format!("{JOB}[extra]\nx = 1\n"), "job.toml").unwrap_err();
        assert!(e.to_string().contains("extra"), "{e}");
        let e = SeqTrainJob::parse("[model]\nkind = \"gru4rec\"\n", "job.toml").unwrap_err();
        assert!(e.to_string().contains("[data]"), "{e}");
    }
}
