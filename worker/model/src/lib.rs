//! `ember-model`: Ember's models on candle. [`layer`] holds the
//! gradient-checked layers and fused kernels, [`metrics`] the evaluation
//! metrics (AUC, GAUC, logloss, ranking); this crate has no network and no
//! parameter server (sparse rows come in, gradients go out).
//!
//! CTR models (BaseModel, DIN, DIEN) behind one trainer-facing trait, plus
//! GRU4Rec (its own session-parallel API), a small local dense optimizer and an
//! in-memory embedding store for tests.
//!
//! # How the trainer drives a CTR model
//!
//! ```no_run
//! use ember_data::batch::Batch;
//! use ember_model::{build_model, CtrModel, ModelConfig, SparseRows, DenseOptimizer};
//! # fn pull(_: &Batch, _: &[(String, usize)]) -> SparseRows { SparseRows::new() }
//! # fn batches() -> Vec<Batch> { vec![] }
//! let cfg: ModelConfig = toml::from_str("kind = \"din\"").unwrap();
//! let mut model = build_model(&cfg, &candle_core::Device::Cpu).unwrap();
//! let tables = model.sparse_tables(); // [("item", 18), ("cat", 18)] (+ ("user", 18))
//! let mut opt = DenseOptimizer::adam(1e-3);
//! for batch in batches() {
//!     // 1. pull the rows of batch.<table>.unique from the PS, row-major [U, D]
//!     let rows = pull(&batch, &tables);
//!     // 2. forward + backward
//!     let out = model.step(&batch, &rows, true).unwrap();
//!     // 3. push out.sparse_grads[table] ([U*D], gradient of the MEAN loss) to the PS,
//!     //    and apply out.dense_grads (locally or via the PS):
//!     opt.apply(&mut *model, &out.dense_grads).unwrap();
//! }
//! ```
//!
//! * [`ModelConfig`] (serde, every field defaulted per `shared/MODELS.md`)
//!   selects the model; [`build_model`] builds it (`f32`), and
//!   [`build_model_with_dtype`] in any float dtype (gradient checks use `f64`).
//! * [`CtrModel::step`] consumes a [`Batch`] and the pulled rows
//!   ([`SparseRows`]: table name -> flat `[U * D]` `f32`, `U =
//!   batch.<table>.unique.len()`), and returns a [`StepOutput`]. Padded
//!   positions (index `U`) read a constant zero row and never receive gradient.
//! * Dense parameters have stable dotted names (e.g. `att.fc0.weight`,
//!   `mlp.act0.alpha`, `gru.w_ih`), listed by [`CtrModel::dense_params`] and
//!   written back by [`CtrModel::set_dense`]. Dice running statistics are
//!   *state*, not parameters: [`CtrModel::dense_state`] / [`CtrModel::set_state`]
//!   (checkpoint and export them together with the parameters).
//! * Errors are [`ModelError`]; a wrong row block names the table and sizes.
//!
//! * In-process training without a server: [`DenseOptimizer`] (SGD / Adagrad /
//!   Adam on named slices or `Var`s) and, for tests and examples only,
//!   [`testing::InMemoryStore`] (id -> row maps with SGD/Adagrad on pushed
//!   sparse gradients) with [`testing::train_epoch`] / [`testing::evaluate`].
//! * Call [`tune_allocator`] once at process start: candle allocates every
//!   intermediate, and glibc's default mmap/trim thresholds cost 1.4-2x in
//!   page faults (see `model::alloc`).
//! * Speed: on CPU with `fused = true` (default) the DIN attention unit, the
//!   GRU / AUGRU / AGRU recurrences and the DIEN auxiliary net run as fused
//!   kernels with hand-written backward passes (`layer::fused_*`), computing
//!   only valid history steps; other devices use the composed candle ops.
//!   Both paths are gradient-checked against finite differences.
//! * [`gru4rec::Gru4Rec`] is separate (next-item model with its own
//!   session-parallel batcher over `Vec<Vec<u64>>` and in-process Adagrad).
//!
//! Dense parameter names per model (`l` = layer index, `mlp` hidden `[200, 80]`):
//! - all: `mlp.fc{0,1,2}.{weight,bias}` (weights `[in, out]`),
//!   `mlp.act{0,1}.alpha`; with Dice also state `mlp.act{0,1}.running_{mean,var}`;
//! - DIN and DIEN: `att.fc{0,1,2}.{weight,bias}` (activation unit);
//! - DIEN: `gru.{w_ih,w_hh,bias}` (extractor), `evolve.{w_ih,w_hh,bias}`
//!   (AUGRU/AGRU/AIGRU/GRU; none for `attpool`), `aux.fc{0,1,2}.{weight,bias}` (when aux loss on).

pub mod alloc;
pub mod base;
pub mod config;
pub mod dien;
pub mod din;
pub mod gru4rec;
pub mod layer;
pub mod metrics;
pub mod net;
pub mod optim;
pub mod testing;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use candle_core::{DType, Device};

use ember_data::batch::Batch;

pub use alloc::tune_allocator;
pub use config::{DienAttention, ModelConfig, ModelKind};
pub use net::CtrNet;
pub use optim::{DenseOptimizer, OptimizerKind};

/// Errors of model construction and of a step.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A pulled row block has the wrong number of values.
    #[error("sparse rows of table `{table}`: expected {expected} values ({unique} ids x dim {dim}), got {actual}")]
    RowShape {
        /// Table name.
        table: String,
        /// Unique ids in the batch for this table.
        unique: usize,
        /// Row width the model expects.
        dim: usize,
        /// `unique * dim`.
        expected: usize,
        /// Values supplied.
        actual: usize,
    },
    /// Rows of a table the model needs were not supplied.
    #[error("sparse rows of table `{0}` missing")]
    MissingTable(String),
    /// `set_dense` / `set_state` with an unknown name.
    #[error("unknown dense parameter or state `{0}`")]
    UnknownParam(String),
    /// `set_dense` / `set_state` with the wrong number of values.
    #[error("dense `{name}`: expected {expected} values, got {actual}")]
    ParamShape {
        /// Parameter name.
        name: String,
        /// Values the parameter holds.
        expected: usize,
        /// Values supplied.
        actual: usize,
    },
    /// The batch is inconsistent or lacks inputs the model needs.
    #[error("batch: {0}")]
    Batch(String),
    /// An invalid configuration field.
    #[error("model config field `{field}`: {msg}")]
    Config {
        /// Field name.
        field: &'static str,
        /// What is wrong.
        msg: String,
    },
    /// A tensor operation failed.
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, ModelError>;

/// Pulled embedding rows of one batch, per table name (`"item"`, `"cat"`,
/// `"user"`): a flat row-major `[U, D]` block with `U =
/// batch.<table>.unique.len()`, rows in the order of `unique`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SparseRows {
    /// Table name -> `[U * D]` values.
    pub tables: BTreeMap<String, Vec<f32>>,
}

impl SparseRows {
    /// Empty set of row blocks.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (replaces) the block of `table`.
    pub fn insert(&mut self, table: &str, rows: Vec<f32>) {
        self.tables.insert(table.to_string(), rows);
    }

    /// The block of `table`, if present.
    pub fn get(&self, table: &str) -> Option<&[f32]> {
        self.tables.get(table).map(|v| v.as_slice())
    }
}

/// What one [`CtrModel::step`] returns.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepOutput {
    /// Mean binary cross entropy of the click predictions (the target loss).
    pub loss: f32,
    /// DIEN auxiliary loss `L_aux` when computed (training with aux on).
    /// Gradients are of `loss + aux_alpha * aux_loss`.
    pub aux_loss: Option<f32>,
    /// Click probabilities `[B]`.
    pub probs: Vec<f32>,
    /// Per table, the `[U * D]` gradient of the mean loss w.r.t. the pulled
    /// rows (already averaged over the batch; push as is). Empty in eval.
    pub sparse_grads: BTreeMap<String, Vec<f32>>,
    /// Per dense parameter (same names/order as [`CtrModel::dense_params`]),
    /// the gradient of the mean loss. Empty in eval.
    pub dense_grads: Vec<(String, Vec<f32>)>,
}

/// A CTR model the trainer can drive (BaseModel, DIN, DIEN).
pub trait CtrModel: Send {
    /// The configuration the model was built from.
    fn config(&self) -> &ModelConfig;

    /// Sparse tables to pull for each batch, with their row widths, e.g.
    /// `[("item", 18), ("cat", 18)]`, plus `("user", 18)` when `use_user`;
    /// with a feature schema, its tables in schema order.
    fn sparse_tables(&self) -> Vec<(String, usize)>;

    /// Forward (and, when `train`, backward) on one batch. In training Dice
    /// uses batch statistics and updates its running averages; in eval it uses
    /// the running averages and no gradients are computed.
    fn step(&mut self, batch: &Batch, rows: &SparseRows, train: bool) -> Result<StepOutput>;

    /// Splits each step across `threads` threads, data-parallel over the
    /// batch (parts of at least 8 samples; the parts' gradients, weighted by
    /// their share of the samples and of DIEN's auxiliary pairs, add up to
    /// the whole batch's). Training with Dice (batch statistics) is not split.
    /// Run with one intra-op thread (`RAYON_NUM_THREADS=1`). Default 1.
    fn set_threads(&mut self, _threads: usize) {}

    /// Dense trained parameters `(name, values)` in a stable order.
    fn dense_params(&self) -> Vec<(String, Vec<f32>)>;

    /// Shapes of the dense parameters, same order as [`Self::dense_params`].
    fn dense_shapes(&self) -> Vec<(String, Vec<usize>)>;

    /// Overwrites one dense parameter (length must match).
    fn set_dense(&mut self, name: &str, values: &[f32]) -> Result<()>;

    /// Non-trained state (Dice running mean/var), `(name, values)`.
    fn dense_state(&self) -> Vec<(String, Vec<f32>)>;

    /// Overwrites one state tensor (length must match).
    fn set_state(&mut self, name: &str, values: &[f32]) -> Result<()>;
}

/// Builds the CTR model `cfg` describes, in `f32` on `device`.
pub fn build_model(cfg: &ModelConfig, device: &Device) -> Result<Box<dyn CtrModel>> {
    build_model_with_dtype(cfg, device, DType::F32)
}

/// Builds the CTR model `cfg` describes in `dtype` (`F32` or `F64`).
pub fn build_model_with_dtype(
    cfg: &ModelConfig,
    device: &Device,
    dtype: DType,
) -> Result<Box<dyn CtrModel>> {
    cfg.validate()?;
    Ok(match cfg.kind {
        ModelKind::Base => Box::new(CtrNet::<base::BaseModel>::new(cfg, device, dtype)?),
        ModelKind::Din => Box::new(CtrNet::<din::Din>::new(cfg, device, dtype)?),
        ModelKind::Dien => Box::new(CtrNet::<dien::Dien>::new(cfg, device, dtype)?),
    })
}
