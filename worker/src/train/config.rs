//! The job configuration: one TOML file read by the launcher (`ember train`)
//! and by every worker process. Every field has a default; `validate()` names
//! the bad field.
//!
//! ```toml
//! name = "din-ml100k"
//! [model]          # see ember_worker::model::ModelConfig
//! kind = "din"
//! [data]
//! train = "data/ml100k-din/train.txt"
//! test = "data/ml100k-din/test.txt"
//! [sparse]
//! optimizer = { kind = "adam", lr = 0.001 }
//! [cluster]
//! shards = 2
//! workers = 2
//! ```

use std::path::{Path, PathBuf};

use ember_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use super::TrainError;
use crate::model::ModelConfig;

/// A whole training job.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    /// Job name (used for the run directory).
    #[serde(default = "default_name")]
    pub name: String,
    /// The model.
    #[serde(default)]
    pub model: ModelConfig,
    /// Input data.
    pub data: DataConfig,
    /// Sparse embedding tables on the parameter server.
    #[serde(default)]
    pub sparse: SparseConfig,
    /// Dense parameters on the parameter server.
    #[serde(default)]
    pub dense: DenseConfig,
    /// Shards and workers.
    #[serde(default)]
    pub cluster: ClusterConfig,
    /// Epochs, seed, output.
    #[serde(default)]
    pub train: TrainSettings,
    /// TLS and the bearer token of every gRPC connection.
    #[serde(default)]
    pub security: SecurityConfig,
    /// The declared features (`[[features]]`, see `ember_data::schema`):
    /// [`JobConfig::parse`] validates them and moves them into
    /// `model.features`, so this list is empty after parsing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<ember_data::schema::Feature>,
    /// How `ember-data prepare --config` builds `data.train` / `data.test`
    /// from tabular files (CSV/TSV/Parquet) by the schema; unused by training.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepare: Option<ember_data::tabular::PrepareSpec>,
}

fn default_name() -> String {
    "ember-job".into()
}

/// Input files and batching.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Training samples (DIEN text format).
    pub train: PathBuf,
    /// Test samples.
    pub test: PathBuf,
    /// Feature counts file from the counting pass (needed for `count_mode = "exact"`;
    /// computed from `train` when absent).
    #[serde(default)]
    pub counts: Option<PathBuf>,
    /// Samples per training batch.
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// Samples per evaluation batch.
    #[serde(default = "d_eval_batch")]
    pub eval_batch_size: usize,
    /// History truncation length.
    #[serde(default = "d_max_len")]
    pub max_len: usize,
    /// Size of the shuffle buffer (0 = no shuffling).
    #[serde(default = "d_shuffle")]
    pub shuffle_buffer: usize,
    /// Skip and count malformed lines instead of stopping.
    #[serde(default)]
    pub skip_malformed: bool,
}

fn d_batch() -> usize {
    128
}
fn d_eval_batch() -> usize {
    1024
}
fn d_max_len() -> usize {
    100
}
fn d_shuffle() -> usize {
    20_000
}

/// Spells an enum the way the job file does (`"rowwise_adagrad"`): `as_str`,
/// `Display` and `FromStr`.
macro_rules! spelled {
    ($t:ty { $($v:ident => $s:literal),+ $(,)? }) => {
        impl $t {
            /// The spelling in the job file.
            pub fn as_str(&self) -> &'static str {
                match self { $(Self::$v => $s),+ }
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl std::str::FromStr for $t {
            type Err = String;
            /// Parses the job file's spelling (for command-line flags).
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($s => Ok(Self::$v),)+
                    other => Err(format!(
                        "{other:?}: expected one of {}",
                        [$($s),+].join(", ")
                    )),
                }
            }
        }
    };
}

/// An optimizer (`kind = "adam"`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// Plain SGD.
    Sgd,
    /// Adagrad (one accumulator per weight).
    Adagrad,
    /// Adam (two moments per weight).
    #[default]
    Adam,
    /// FTRL-proximal (sparse tables only).
    Ftrl,
    /// Row-wise Adagrad: one accumulator per row (sparse tables).
    RowwiseAdagrad,
    /// Row-wise Adam: first moment per weight, second moment per row.
    RowwiseAdam,
}
spelled!(OptimizerKind { Sgd => "sgd", Adagrad => "adagrad", Adam => "adam", Ftrl => "ftrl",
    RowwiseAdagrad => "rowwise_adagrad", RowwiseAdam => "rowwise_adam" });

/// Initializer of new embedding rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitKind {
    /// All zeros.
    Zero,
    /// Uniform in `[-scale, scale]`.
    Uniform,
    /// Normal with sd `scale`.
    #[default]
    Normal,
    /// Normal with sd `scale`, redrawn beyond 2 sd.
    TruncatedNormal,
}
spelled!(InitKind { Zero => "zero", Uniform => "uniform", Normal => "normal",
    TruncatedNormal => "truncated_normal" });

/// Where the feature counts n_j of mini-batch-aware L2 come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CountMode {
    /// No counts (MBA needs counts).
    None,
    /// The counting pass over the training file, loaded before training.
    #[default]
    Exact,
    /// Counted on the shards as pushes arrive.
    Online,
}
spelled!(CountMode { None => "none", Exact => "exact", Online => "online" });

impl CountMode {
    /// The wire form.
    pub fn to_proto(self) -> pb::CountMode {
        match self {
            CountMode::None => pb::CountMode::CountNone,
            CountMode::Exact => pb::CountMode::CountExact,
            CountMode::Online => pb::CountMode::CountOnline,
        }
    }
}

/// Storage precision of embedding weights on the shards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// 32-bit floats.
    #[default]
    F32,
    /// IEEE half precision, stochastically rounded updates.
    F16,
    /// bfloat16, stochastically rounded updates.
    Bf16,
}
spelled!(Precision { F32 => "f32", F16 => "f16", Bf16 => "bf16" });

impl Precision {
    /// The wire value.
    pub fn to_proto(self) -> pb::Precision {
        match self {
            Precision::F32 => pb::Precision::F32,
            Precision::F16 => pb::Precision::F16,
            Precision::Bf16 => pb::Precision::Bf16,
        }
    }
}

/// How `ember train` hosts the shards and its own workers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClusterMode {
    /// Child processes on loopback.
    #[default]
    Process,
    /// gRPC servers and worker tasks inside the launcher.
    Inprocess,
}
spelled!(ClusterMode { Process => "process", Inprocess => "inprocess" });

/// How dense gradients of the workers are combined.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    /// Averaged per step over all workers.
    #[default]
    Sync,
    /// Applied as they arrive.
    Async,
}
spelled!(SyncMode { Sync => "sync", Async => "async" });

/// Who starts the workers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerMode {
    /// `ember train` (child processes, or tasks with `mode = "inprocess"`).
    #[default]
    Process,
    /// An orchestrator (Compose, Kubernetes, `worker --coordinator`).
    External,
}
spelled!(WorkerMode { Process => "process", External => "external" });

/// Transport security of every gRPC connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityMode {
    /// `ember train` makes a CA, certificate and token for the run.
    #[default]
    Auto,
    /// TLS with the given files and a bearer token.
    Tls,
    /// Plaintext (a warning is logged).
    Insecure,
}
spelled!(SecurityMode { Auto => "auto", Tls => "tls", Insecure => "insecure" });

/// An optimizer and its hyper-parameters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OptimizerSpec {
    /// "sgd", "adagrad", "adam", "ftrl", or for sparse tables
    /// "rowwise_adagrad" / "rowwise_adam" (one second moment per row).
    #[serde(default)]
    pub kind: OptimizerKind,
    /// Learning rate (FTRL: alpha).
    #[serde(default = "d_lr")]
    pub lr: f32,
    /// Adam beta1.
    #[serde(default = "d_beta1")]
    pub beta1: f32,
    /// Adam beta2.
    #[serde(default = "d_beta2")]
    pub beta2: f32,
    /// Adam / Adagrad epsilon.
    #[serde(default = "d_eps")]
    pub eps: f32,
    /// Adagrad initial accumulator.
    #[serde(default = "d_acc")]
    pub initial_accumulator: f32,
    /// FTRL beta.
    #[serde(default = "d_ftrl_beta")]
    pub ftrl_beta: f32,
    /// FTRL L1.
    #[serde(default)]
    pub l1: f32,
    /// FTRL L2.
    #[serde(default)]
    pub l2: f32,
}

fn d_lr() -> f32 {
    0.001
}
fn d_beta1() -> f32 {
    0.9
}
fn d_beta2() -> f32 {
    0.999
}
fn d_eps() -> f32 {
    1e-8
}
fn d_acc() -> f32 {
    0.1
}
fn d_ftrl_beta() -> f32 {
    1.0
}

impl Default for OptimizerSpec {
    fn default() -> Self {
        OptimizerSpec {
            kind: OptimizerKind::default(),
            lr: d_lr(),
            beta1: d_beta1(),
            beta2: d_beta2(),
            eps: d_eps(),
            initial_accumulator: d_acc(),
            ftrl_beta: d_ftrl_beta(),
            l1: 0.0,
            l2: 0.0,
        }
    }
}

impl OptimizerSpec {
    /// The wire form.
    pub fn to_proto(&self) -> pb::OptimizerConfig {
        use pb::optimizer_config::Kind;
        let kind = match self.kind {
            OptimizerKind::Sgd => Kind::Sgd(pb::Sgd { lr: self.lr }),
            OptimizerKind::Adagrad => Kind::Adagrad(pb::Adagrad {
                lr: self.lr,
                initial_accumulator: self.initial_accumulator,
                eps: self.eps,
            }),
            OptimizerKind::Adam => Kind::Adam(pb::Adam {
                lr: self.lr,
                beta1: self.beta1,
                beta2: self.beta2,
                eps: self.eps,
            }),
            OptimizerKind::Ftrl => Kind::Ftrl(pb::Ftrl {
                alpha: self.lr,
                beta: self.ftrl_beta,
                l1: self.l1,
                l2: self.l2,
            }),
            OptimizerKind::RowwiseAdagrad => Kind::RowwiseAdagrad(pb::Adagrad {
                lr: self.lr,
                initial_accumulator: self.initial_accumulator,
                eps: self.eps,
            }),
            OptimizerKind::RowwiseAdam => Kind::RowwiseAdam(pb::Adam {
                lr: self.lr,
                beta1: self.beta1,
                beta2: self.beta2,
                eps: self.eps,
            }),
        };
        pb::OptimizerConfig { kind: Some(kind) }
    }
}

/// Configuration shared by the sparse tables (item, cat, user).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SparseConfig {
    /// Optimizer of the embedding rows.
    #[serde(default)]
    pub optimizer: OptimizerSpec,
    /// Initializer: "zero", "uniform", "normal" or "truncated_normal".
    #[serde(default)]
    pub init: InitKind,
    /// Spread of the initializer.
    #[serde(default = "d_init_scale")]
    pub init_scale: f32,
    /// Mini-batch-aware L2 lambda (DIN); 0 disables.
    #[serde(default)]
    pub mba_lambda: f32,
    /// Plain L2 on touched rows (for comparison with MBA); 0 disables.
    #[serde(default)]
    pub plain_l2: f32,
    /// Source of n_j: "exact" (counting pass), "online" (streaming) or "none".
    #[serde(default)]
    pub count_mode: CountMode,
    /// Feature admission threshold (0 = admit all).
    #[serde(default)]
    pub admit_min_count: u32,
    /// Evict rows not updated for this many steps (0 = never).
    #[serde(default)]
    pub ttl_steps: u64,
    /// Storage precision of the embedding weights on the shards: "f32",
    /// "f16" or "bf16" (stochastically rounded updates; workers compute in f32).
    #[serde(default)]
    pub precision: Precision,
    /// Storage precision of row-wise Adam's first moment: "f32" (default),
    /// "f16" or "bf16" (stochastically rounded; `rowwise_adam` only).
    #[serde(default)]
    pub moment_precision: Precision,
    /// Per-table overrides (`[sparse.tables.<name>]`: `optimizer`,
    /// `precision`, `moment_precision`), e.g. row-wise Adagrad in f16 for
    /// the huge `item` table and Adam for the small `cat` table. A table
    /// without an entry takes the settings above.
    #[serde(default)]
    pub tables: std::collections::BTreeMap<String, TableOverride>,
    /// Id dropout in training (the DIN paper's "Dropout" baseline): each
    /// goods-id occurrence of a training sample (target and history) is
    /// replaced by the zero row with this probability, seeded by
    /// `train.seed`, worker and step. 0 (default) disables; in [0, 1).
    #[serde(default)]
    pub id_dropout: f64,
}

fn d_init_scale() -> f32 {
    0.01
}

impl Default for SparseConfig {
    fn default() -> Self {
        SparseConfig {
            optimizer: OptimizerSpec::default(),
            init: InitKind::default(),
            init_scale: d_init_scale(),
            mba_lambda: 0.0,
            plain_l2: 0.0,
            count_mode: CountMode::default(),
            admit_min_count: 0,
            ttl_steps: 0,
            precision: Precision::default(),
            moment_precision: Precision::default(),
            tables: Default::default(),
            id_dropout: 0.0,
        }
    }
}

impl SparseConfig {
    /// The wire config of table `name` with width `dim`.
    pub fn table(&self, name: &str, dim: usize, seed: u64) -> pb::TableConfig {
        use pb::initializer::Kind;
        let o = self.tables.get(name);
        let optimizer = o
            .and_then(|o| o.optimizer.as_ref())
            .unwrap_or(&self.optimizer);
        let precision = o.and_then(|o| o.precision).unwrap_or(self.precision);
        let moment = o
            .and_then(|o| o.moment_precision)
            .unwrap_or(self.moment_precision);
        let kind = match self.init {
            InitKind::Zero => Kind::Zero,
            InitKind::Uniform => Kind::Uniform,
            InitKind::Normal => Kind::Normal,
            InitKind::TruncatedNormal => Kind::TruncatedNormal,
        };
        let count_mode = self.count_mode.to_proto();
        let precision = precision.to_proto();
        pb::TableConfig {
            name: name.to_string(),
            dim: dim as u32,
            init: Some(pb::Initializer {
                kind: kind as i32,
                scale: self.init_scale,
            }),
            seed: seed ^ ember_proto::route::fnv1a64(name.as_bytes()),
            optimizer: Some(optimizer.to_proto()),
            mba_lambda: self.mba_lambda,
            count_mode: count_mode as i32,
            admit_min_count: self.admit_min_count,
            ttl_steps: self.ttl_steps,
            plain_l2: self.plain_l2,
            precision: precision as i32,
            moment_precision: moment.to_proto() as i32,
        }
    }
}

/// What `[sparse.tables.<name>]` may change for one table.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TableOverride {
    /// The table's optimizer (instead of `sparse.optimizer`).
    #[serde(default)]
    pub optimizer: Option<OptimizerSpec>,
    /// The table's weight precision (instead of `sparse.precision`).
    #[serde(default)]
    pub precision: Option<Precision>,
    /// The table's row-wise Adam moment precision.
    #[serde(default)]
    pub moment_precision: Option<Precision>,
}

/// Dense parameters on the parameter server.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenseConfig {
    /// Optimizer of the dense parameters ("sgd" or "adam").
    #[serde(default)]
    pub optimizer: OptimizerSpec,
}

/// Where processes run and how they synchronise.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Number of parameter-server shards to start.
    #[serde(default = "d_shards")]
    pub shards: usize,
    /// Number of workers.
    #[serde(default = "d_workers")]
    pub workers: usize,
    /// Compute threads of each worker: every training step is split
    /// data-parallel over the batch into this many parts (at least 8
    /// samples each), whose gradients add up to the whole batch's. 1
    /// (default) = one thread. Not split: training with Dice (batch
    /// statistics). Candle's own ops stay single-threaded.
    #[serde(default = "d_worker_threads")]
    pub worker_threads: usize,
    /// "process": shards and workers are child processes on loopback;
    /// "inprocess": shards are gRPC servers and workers tasks of the launcher.
    #[serde(default)]
    pub mode: ClusterMode,
    /// Use these running shards instead of starting any (`host:port`, shard i first).
    #[serde(default)]
    pub shard_addrs: Vec<String>,
    /// "sync": dense gradients of all workers are averaged per step;
    /// "async": applied as they arrive.
    #[serde(default)]
    pub sync: SyncMode,
    /// How many batches the pull of rows may run ahead of compute, and pushes
    /// may lag behind it (0 = strictly sequential and deterministic).
    #[serde(default = "d_staleness")]
    pub staleness: usize,
    /// Synchronous mode with several workers: how many steps the dense
    /// parameters a worker computes with may lag behind its own step. 0
    /// (default): step `k` reads them with every worker's steps `< k`
    /// averaged and applied (a barrier each step; deterministic). `s > 0`:
    /// bounded staleness, step `k` reads them once steps `< k - s` are
    /// applied, so a worker does not wait for the slower one's last `s`
    /// steps; the shards still apply each step's mean once, in step order.
    #[serde(default)]
    pub dense_staleness: usize,
    /// Checkpoint directory of the shards.
    #[serde(default)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Newest checkpoints kept per shard.
    #[serde(default = "d_keep")]
    pub keep_checkpoints: u32,
    /// Also checkpoint every shard every this many steps inside an epoch
    /// (0 = only at epoch ends). A failure then loses at most this many
    /// steps: workers resume at the checkpoint's data position. In a
    /// GRU4Rec job: every this many steps of each worker, which resumes at
    /// its saved session-batcher position and hidden states.
    #[serde(default)]
    pub checkpoint_every_steps: u64,
    /// Give up on an unreachable shard after this many seconds.
    #[serde(default = "d_retry")]
    pub retry_deadline_s: u64,
    /// Restarts of the cluster after a shard or worker failure before giving up.
    #[serde(default = "d_restarts")]
    pub max_restarts: u32,
    /// Who starts the workers. "process": `ember train` starts them itself
    /// (child processes, or tasks with `mode = "inprocess"`), per epoch;
    /// "external": they are started elsewhere (Compose services, a Kubernetes
    /// Indexed Job, `worker --coordinator URL`) and pull their tasks from the
    /// coordinator service `ember train` serves on `coordinator_listen`.
    #[serde(default)]
    pub worker_mode: WorkerMode,
    /// Address of the coordinator service (`worker_mode = "external"`).
    #[serde(default = "d_coordinator_listen")]
    pub coordinator_listen: String,
    /// An external worker that holds a task and has not reported (progress or
    /// heartbeat) for this many seconds counts as failed.
    #[serde(default = "d_worker_timeout")]
    pub worker_timeout_s: u64,
    /// An external worker that has not asked for its task this many seconds
    /// after the coordinator published it counts as failed (it covers
    /// scheduling and image pulls, so it is longer than `worker_timeout_s`).
    #[serde(default = "d_worker_start_timeout")]
    pub worker_start_timeout_s: u64,
    /// Memory budget of each shard's sparse tables in bytes (0 = none):
    /// past it new rows replace cold ones (sampled LFU with decay) instead of
    /// growing the shard. Passed to every shard started by `ember train`.
    #[serde(default)]
    pub shard_max_bytes: u64,
    /// A shard that does not answer Health for this many seconds is hung (a
    /// stopped process, a partition, a blocked disk): the launcher kills and
    /// restarts a shard process it started, or waits for an external one
    /// with backoff, and rolls the cluster back.
    #[serde(default = "d_shard_timeout")]
    pub shard_timeout_s: u64,
    /// Deadline of each control call of the launcher to the shards
    /// (checkpoint, restore, list, stats, shutdown, evaluation).
    #[serde(default = "d_control_timeout")]
    pub control_timeout_s: u64,
}

fn d_shards() -> usize {
    2
}
fn d_workers() -> usize {
    2
}
fn d_worker_threads() -> usize {
    1
}
fn d_staleness() -> usize {
    1
}
fn d_keep() -> u32 {
    3
}
fn d_retry() -> u64 {
    60
}
fn d_restarts() -> u32 {
    3
}
fn d_coordinator_listen() -> String {
    "0.0.0.0:50060".into()
}
fn d_worker_timeout() -> u64 {
    60
}
fn d_worker_start_timeout() -> u64 {
    600
}
fn d_shard_timeout() -> u64 {
    15
}
fn d_control_timeout() -> u64 {
    600
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            shards: d_shards(),
            workers: d_workers(),
            worker_threads: d_worker_threads(),
            mode: ClusterMode::default(),
            shard_addrs: Vec::new(),
            sync: SyncMode::default(),
            staleness: d_staleness(),
            dense_staleness: 0,
            checkpoint_dir: None,
            keep_checkpoints: d_keep(),
            checkpoint_every_steps: 0,
            retry_deadline_s: d_retry(),
            max_restarts: d_restarts(),
            worker_mode: WorkerMode::default(),
            coordinator_listen: d_coordinator_listen(),
            shard_max_bytes: 0,
            worker_timeout_s: d_worker_timeout(),
            worker_start_timeout_s: d_worker_start_timeout(),
            shard_timeout_s: d_shard_timeout(),
            control_timeout_s: d_control_timeout(),
        }
    }
}

impl ClusterConfig {
    /// True in synchronous mode.
    pub fn is_sync(&self) -> bool {
        self.sync == SyncMode::Sync
    }

    /// True when the workers are started elsewhere and pull their tasks from
    /// the coordinator (`worker_mode = "external"`).
    pub fn external_workers(&self) -> bool {
        self.worker_mode == WorkerMode::External
    }
}

/// Epochs, seeds and outputs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSettings {
    /// Passes over the training data.
    #[serde(default = "d_epochs")]
    pub epochs: usize,
    /// Seed of the model initialisation, shuffling and embedding initialisers.
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// Run directory (plots, metrics JSON, checkpoints by default).
    #[serde(default)]
    pub out_dir: Option<PathBuf>,
    /// Steps per epoch per worker cap (for quick runs); None = the whole split.
    #[serde(default)]
    pub max_steps_per_epoch: Option<u64>,
    /// Evaluate on at most this many test samples (None = all).
    #[serde(default)]
    pub max_eval_samples: Option<usize>,
    /// Report progress every this many steps.
    #[serde(default = "d_log_every")]
    pub log_every: u64,
    /// Scale runs: before training, store the rows of item ids
    /// `1..=prefill_ids` (their initial values, pushed with a zero gradient
    /// at step 0, count 1) so the tables hold at least this many distinct
    /// ids. 0 = none.
    #[serde(default)]
    pub prefill_ids: u64,
    /// The table `prefill_ids` fills.
    #[serde(default = "d_prefill_table")]
    pub prefill_table: String,
}

fn d_prefill_table() -> String {
    "item".into()
}

fn d_epochs() -> usize {
    2
}
fn d_seed() -> u64 {
    1
}
fn d_log_every() -> u64 {
    10
}

impl Default for TrainSettings {
    fn default() -> Self {
        TrainSettings {
            epochs: d_epochs(),
            seed: d_seed(),
            out_dir: None,
            max_steps_per_epoch: None,
            max_eval_samples: None,
            log_every: d_log_every(),
            prefill_ids: 0,
            prefill_table: d_prefill_table(),
        }
    }
}

/// Transport security of the cluster (shards and coordinator):
///
/// ```toml
/// [security]
/// mode = "tls"                  # "auto" (default), "tls" or "insecure"
/// ca = "certs/ca.pem"           # CA that signed the servers' certificates
/// cert = "certs/server.pem"     # server certificate of the shards / coordinator
/// key = "certs/server.key"      #   that the launcher starts
/// token_file = "certs/token"    # bearer token (else env EMBER_AUTH_TOKEN)
/// ```
///
/// `auto`: the launcher makes a fresh CA, server certificate and token for
/// each run of a local (`process`) cluster under `<out_dir>/secrets/` and
/// uses TLS + token everywhere; with external shards it needs `tls` or
/// `insecure`. `insecure` (plaintext, token optional) logs a warning.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// "auto" (the default), "tls" or "insecure".
    pub mode: SecurityMode,
    /// CA certificate (PEM) that clients trust.
    pub ca: Option<PathBuf>,
    /// Server certificate chain (PEM) for servers the launcher starts.
    pub cert: Option<PathBuf>,
    /// Server private key (PEM).
    pub key: Option<PathBuf>,
    /// Client certificate (PEM) for servers that require mTLS.
    pub client_cert: Option<PathBuf>,
    /// Client private key (PEM).
    pub client_key: Option<PathBuf>,
    /// Require client certificates signed by `ca` on the servers (mTLS).
    pub mtls: bool,
    /// Name to verify server certificates against (default: each address's host).
    pub domain: Option<String>,
    /// File holding the bearer token (else the EMBER_AUTH_TOKEN variable).
    pub token_file: Option<PathBuf>,
}

impl SecurityConfig {
    /// The mode.
    pub fn mode(&self) -> SecurityMode {
        self.mode
    }

    /// Checks the fields; the error names the bad one.
    pub fn validate(&self) -> Result<(), String> {
        if self.cert.is_some() != self.key.is_some() {
            return Err("security.cert and security.key must be given together".into());
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            return Err(
                "security.client_cert and security.client_key must be given together".into(),
            );
        }
        if self.mode == SecurityMode::Tls && self.ca.is_none() {
            return Err("security.mode = \"tls\" needs security.ca".into());
        }
        if self.mtls && (self.ca.is_none() || self.client_cert.is_none()) {
            return Err(
                "security.mtls needs security.ca and security.client_cert/client_key".into(),
            );
        }
        Ok(())
    }

    /// Client-side settings (workers, launcher, tools). `auto` must have been
    /// resolved by the launcher first (it is an error here); `insecure` warns.
    pub fn client(&self) -> Result<ember_proto::security::ClientSecurity, TrainError> {
        use ember_proto::security::{ClientSecurity, ClientTlsFiles};
        match self.mode {
            SecurityMode::Tls => {
                let ca = self.ca.clone().ok_or_else(|| {
                    TrainError::Config("security.mode = \"tls\" needs security.ca".into())
                })?;
                let files = ClientTlsFiles {
                    ca,
                    domain: self.domain.clone(),
                    identity: self.client_cert.clone().zip(self.client_key.clone()),
                };
                let sec = ClientSecurity::load(Some(&files), self.token_file.as_deref())
                    .map_err(TrainError::Security)?;
                if sec.token.is_none() {
                    return Err(TrainError::Config(
                        "security.mode = \"tls\" needs a token: security.token_file or EMBER_AUTH_TOKEN"
                            .into(),
                    ));
                }
                Ok(sec)
            }
            SecurityMode::Insecure => {
                tracing::warn!(
                    "INSECURE: security.mode = \"insecure\": gRPC traffic is plaintext (use only on a trusted network)"
                );
                ClientSecurity::load(None, self.token_file.as_deref()).map_err(TrainError::Security)
            }
            SecurityMode::Auto => Err(TrainError::Config(
                "security.mode = \"auto\" has not been resolved: a worker or tool needs \"tls\" (with security.ca) or \"insecure\"; `ember train` resolves \"auto\" for the clusters it starts".into()
            )),
        }
    }

    /// Server-side settings (the coordinator). Same rules as [`Self::client`];
    /// `tls` needs `cert` and `key`.
    pub fn server(&self) -> Result<ember_proto::security::ServerSecurity, TrainError> {
        use ember_proto::security::{ServerSecurity, ServerTlsFiles};
        match self.mode {
            SecurityMode::Tls => {
                let (cert, key) = self.cert.clone().zip(self.key.clone()).ok_or_else(|| {
                    TrainError::Config(
                        "security.mode = \"tls\" on a server needs security.cert and security.key"
                            .into(),
                    )
                })?;
                let files = ServerTlsFiles {
                    cert,
                    key,
                    client_ca: if self.mtls { self.ca.clone() } else { None },
                };
                let sec = ServerSecurity::load(Some(&files), self.token_file.as_deref())
                    .map_err(TrainError::Security)?;
                if sec.token.is_none() {
                    return Err(TrainError::Config(
                        "security.mode = \"tls\" needs a token: security.token_file or EMBER_AUTH_TOKEN"
                            .into(),
                    ));
                }
                Ok(sec)
            }
            SecurityMode::Insecure => {
                ServerSecurity::load(None, self.token_file.as_deref()).map_err(TrainError::Security)
            }
            SecurityMode::Auto => Err(TrainError::Config(
                "security.mode = \"auto\" has not been resolved (expected tls or insecure)".into(),
            )),
        }
    }

    /// The flags for a `ps-server` or `worker` process started with these
    /// settings (paths only: the token travels in a file or the inherited
    /// environment, never on the command line). `server` selects the shard
    /// flags (`--tls-cert/--tls-key`) instead of the client ones (`--tls-ca`).
    pub fn process_args(&self, server: bool) -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = Vec::new();
        let flag = |a: &mut Vec<std::ffi::OsString>, k: &str, v: &Path| {
            a.push(k.into());
            a.push(v.as_os_str().to_owned());
        };
        if self.mode == SecurityMode::Insecure {
            if let Some(t) = &self.token_file {
                flag(&mut a, "--auth-token-file", t);
            }
            a.push("--insecure".into());
            return a;
        }
        if server {
            if let (Some(c), Some(k)) = (&self.cert, &self.key) {
                flag(&mut a, "--tls-cert", c);
                flag(&mut a, "--tls-key", k);
            }
            if self.mtls {
                if let Some(ca) = &self.ca {
                    flag(&mut a, "--tls-client-ca", ca);
                }
            }
        } else {
            if let Some(ca) = &self.ca {
                flag(&mut a, "--tls-ca", ca);
            }
            if let Some(d) = &self.domain {
                a.push("--tls-domain".into());
                a.push(d.into());
            }
            if let (Some(c), Some(k)) = (&self.client_cert, &self.client_key) {
                flag(&mut a, "--tls-client-cert", c);
                flag(&mut a, "--tls-client-key", k);
            }
        }
        if let Some(t) = &self.token_file {
            flag(&mut a, "--auth-token-file", t);
        }
        a
    }
}

impl JobConfig {
    /// Reads and validates a TOML job file. Relative data paths are taken
    /// relative to the current directory.
    pub fn load(path: &Path) -> Result<JobConfig, TrainError> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<JobConfig, TrainError> {
        let de = toml::Deserializer::parse(text)
            .map_err(|e| TrainError::Config(format!("{origin}: {e}")))?;
        // The error names the dotted path of the bad field (`cluster.sync`).
        let cfg: JobConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            TrainError::Config(format!("{origin}: {path}: {}", e.into_inner()))
        })?;
        let mut cfg = cfg;
        if !cfg.features.is_empty() {
            if cfg.model.features.is_some() {
                return Err(TrainError::Config(format!(
                    "{origin}: features: declared both as [[features]] and in [model]; keep one"
                )));
            }
            let schema = ember_data::schema::FeatureSchema::new(std::mem::take(&mut cfg.features))
                .map_err(|e| TrainError::Config(format!("{origin}: features: {e}")))?;
            cfg.model.features = Some(schema);
        }
        cfg.validate()
            .map_err(|e| TrainError::Config(format!("{origin}: {e}")))?;
        Ok(cfg)
    }

    /// The feature schema the data files must follow (`None`: legacy files).
    pub fn schema(&self) -> Option<std::sync::Arc<ember_data::schema::FeatureSchema>> {
        self.model.features.clone().map(std::sync::Arc::new)
    }

    /// Checks every field; the error names the bad one.
    pub fn validate(&self) -> Result<(), String> {
        if self.data.batch_size == 0 {
            return Err("data.batch_size must be >= 1".into());
        }
        if self.data.eval_batch_size == 0 {
            return Err("data.eval_batch_size must be >= 1".into());
        }
        if self.data.max_len == 0 {
            return Err("data.max_len must be >= 1".into());
        }
        if self.cluster.shards == 0 && self.cluster.shard_addrs.is_empty() {
            return Err("cluster.shards must be >= 1".into());
        }
        if self.cluster.workers == 0 {
            return Err("cluster.workers must be >= 1".into());
        }
        if self.cluster.worker_threads == 0 || self.cluster.worker_threads > 256 {
            return Err("cluster.worker_threads must be in 1..=256".into());
        }
        if self.cluster.dense_staleness > 64 {
            return Err(format!(
                "cluster.dense_staleness must be in 0..=64 (got {})",
                self.cluster.dense_staleness
            ));
        }
        if self.cluster.dense_staleness > 0 && !self.cluster.is_sync() {
            return Err(
                "cluster.dense_staleness bounds synchronous training; with sync = \"async\" the dense parameters are not waited for at all (remove it)"
                    .into(),
            );
        }
        if self.cluster.external_workers() {
            if self
                .cluster
                .coordinator_listen
                .parse::<std::net::SocketAddr>()
                .is_err()
            {
                return Err(format!(
                    "cluster.coordinator_listen = {:?}: expected ip:port",
                    self.cluster.coordinator_listen
                ));
            }
            if self.cluster.worker_timeout_s == 0 {
                return Err("cluster.worker_timeout_s must be >= 1".into());
            }
        }
        if self.cluster.shard_timeout_s == 0 || self.cluster.control_timeout_s == 0 {
            return Err(
                "cluster.shard_timeout_s and cluster.control_timeout_s must be >= 1".into(),
            );
        }
        if self.train.epochs == 0 {
            return Err("train.epochs must be >= 1".into());
        }
        const TABLES: [&str; 6] = [
            "item",
            "cat",
            "user",
            "gru4rec_emb",
            "gru4rec_out",
            "gru4rec_bias",
        ];
        let mut known: Vec<String> = TABLES.iter().map(|t| t.to_string()).collect();
        if let Some(schema) = &self.model.features {
            known.extend(schema.tables().into_iter().map(|(t, _)| t));
        }
        if let Some(t) = self.sparse.tables.keys().find(|t| !known.contains(t)) {
            return Err(format!(
                "sparse.tables.{t}: no such table (the tables are {})",
                known.join(", ")
            ));
        }
        if !(0.0..1.0).contains(&self.sparse.id_dropout) {
            return Err(format!(
                "sparse.id_dropout = {}: must be in [0, 1)",
                self.sparse.id_dropout
            ));
        }
        self.security.validate()?;
        if self.dense.optimizer.kind == OptimizerKind::Ftrl {
            return Err(
                "dense.optimizer.kind = \"ftrl\": dense parameters take sgd, adagrad or adam"
                    .into(),
            );
        }
        // The same rule and message as the shard's table validation.
        ember_proto::table::check_mba(self.sparse.mba_lambda, self.sparse.count_mode.to_proto())
            .map_err(|e| format!("sparse: {e}"))?;
        Ok(())
    }

    /// The run directory (`train.out_dir`, default `runs/<name>`).
    pub fn out_dir(&self) -> PathBuf {
        self.train
            .out_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("runs").join(&self.name))
    }

    /// The checkpoint directory (`cluster.checkpoint_dir`, default `<out_dir>/checkpoints`).
    pub fn checkpoint_dir(&self) -> PathBuf {
        self.cluster
            .checkpoint_dir
            .clone()
            .unwrap_or_else(|| self.out_dir().join("checkpoints"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[data]\ntrain = \"a.txt\"\ntest = \"b.txt\"\n";

    #[test]
    fn defaults_fill_a_minimal_file() {
        let c = JobConfig::parse(MINIMAL, "job.toml").unwrap();
        assert_eq!(c.data.batch_size, 128);
        assert_eq!(c.cluster.shards, 2);
        assert!(c.cluster.is_sync());
        assert_eq!(c.sparse.optimizer.kind, OptimizerKind::Adam);
        assert_eq!(
            c.checkpoint_dir(),
            PathBuf::from("runs/ember-job/checkpoints")
        );
    }

    #[test]
    fn errors_name_the_field() {
        let e = JobConfig::parse(
            &format!("{MINIMAL}[cluster]\nsync = \"sometimes\"\n"),
            "job.toml",
        )
        .unwrap_err();
        assert!(e.to_string().contains("cluster.sync"), "{e}");
        let e = JobConfig::parse(
            &format!("{MINIMAL}[sparse]\noptimizer = {{ kind = \"lbfgs\" }}\n"),
            "job.toml",
        )
        .unwrap_err();
        assert!(e.to_string().contains("sparse.optimizer.kind"), "{e}");
        let e = JobConfig::parse(
            &format!("{MINIMAL}[sparse]\nmba_lambda = 0.01\ncount_mode = \"none\"\n"),
            "j",
        )
        .unwrap_err();
        assert!(e.to_string().contains("mba_lambda"), "{e}");
        let e =
            JobConfig::parse(&format!("{MINIMAL}[cluster]\nshardz = 3\n"), "job.toml").unwrap_err();
        assert!(e.to_string().contains("shardz"), "{e}");
        let e = JobConfig::parse(
            &format!("{MINIMAL}[cluster]\nworker_mode = \"remote\"\n"),
            "job.toml",
        )
        .unwrap_err();
        assert!(e.to_string().contains("cluster.worker_mode"), "{e}");
        let e = JobConfig::parse(
            &format!("{MINIMAL}[sparse]\nid_dropout = 1.0\n"),
            "job.toml",
        )
        .unwrap_err();
        assert!(e.to_string().contains("sparse.id_dropout"), "{e}");
        for bad in [
            "[cluster]\ndense_staleness = 65\n",
            "[cluster]\nsync = \"async\"\ndense_staleness = 1\n",
        ] {
            let e = JobConfig::parse(&format!("{MINIMAL}{bad}"), "job.toml").unwrap_err();
            assert!(e.to_string().contains("cluster.dense_staleness"), "{e}");
        }
        let c = JobConfig::parse(
            &format!("{MINIMAL}[cluster]\ndense_staleness = 2\n"),
            "job.toml",
        )
        .unwrap();
        assert_eq!(c.cluster.dense_staleness, 2);
        let e = JobConfig::parse("[data]\ntrain = \"a\"\n", "job.toml").unwrap_err();
        assert!(e.to_string().contains("test"), "{e}");
    }

    #[test]
    fn table_config_carries_settings() {
        let s = SparseConfig {
            mba_lambda: 0.01,
            ..Default::default()
        };
        let t = s.table("item", 18, 7);
        assert_eq!(t.dim, 18);
        assert_eq!(t.count_mode, pb::CountMode::CountExact as i32);
        assert!((t.mba_lambda - 0.01).abs() < 1e-9);
        assert!(matches!(
            t.optimizer.unwrap().kind,
            Some(pb::optimizer_config::Kind::Adam(_))
        ));
    }

    #[test]
    fn per_table_overrides_apply_to_their_table_only() {
        let cfg = JobConfig::parse(
            &format!(
                "{MINIMAL}[sparse]\nprecision = \"f16\"\n\
                 optimizer = {{ kind = \"rowwise_adagrad\", lr = 0.0001, initial_accumulator = 0.0 }}\n\
                 [sparse.tables.cat]\noptimizer = {{ kind = \"adam\", lr = 0.001 }}\nprecision = \"f32\"\n"
            ),
            "job.toml",
        )
        .unwrap();
        let item = cfg.sparse.table("item", 18, 1);
        let cat = cfg.sparse.table("cat", 18, 1);
        assert_eq!(item.precision, pb::Precision::F16 as i32);
        assert_eq!(cat.precision, pb::Precision::F32 as i32);
        assert!(matches!(
            item.optimizer.unwrap().kind,
            Some(pb::optimizer_config::Kind::RowwiseAdagrad(_))
        ));
        assert!(matches!(
            cat.optimizer.unwrap().kind,
            Some(pb::optimizer_config::Kind::Adam(_))
        ));
        let e = JobConfig::parse(
            &format!("{MINIMAL}[sparse.tables.items]\nprecision = \"f16\"\n"),
            "job.toml",
        )
        .unwrap_err();
        assert!(e.to_string().contains("sparse.tables.items"), "{e}");
        let e = JobConfig::parse(
            &format!("{MINIMAL}[sparse.tables.cat]\nlr = 0.1\n"),
            "job.toml",
        )
        .unwrap_err();
        assert!(e.to_string().contains("lr"), "{e}");
    }
}
