//! Where a worker's parameters live: a sharded parameter server reached over
//! gRPC ([`PsClient`]), or shards in this process called directly
//! ([`LocalPs`], no serialisation, used by single-process runs, tests and the
//! baseline of the end-to-end benchmark). Both route ids with the same
//! [`ember_proto::route::Router`].

use std::sync::Arc;

use ember_proto::v1 as pb;

use super::client::PsClient;
use super::local::LocalPs;
use super::TrainError;

/// A parameter store the training loop pulls from and pushes to.
#[derive(Clone, Debug)]
pub enum Backend {
    /// Remote shards over gRPC.
    Remote(PsClient),
    /// In-process shards.
    Local(Arc<LocalPs>),
}

macro_rules! dispatch {
    ($self:ident, $b:ident => $e:expr) => {
        match $self {
            Backend::Remote($b) => $e,
            Backend::Local($b) => $e,
        }
    };
}

impl Backend {
    /// Rows of `ids` in request order, and the row width.
    pub async fn pull(&self, table: &str, ids: &[u64]) -> Result<(Vec<f32>, usize), TrainError> {
        dispatch!(self, b => b.pull(table, ids).await)
    }

    /// Pushes gradients of unique ids with their in-batch counts.
    pub async fn push(
        &self,
        table: &str,
        ids: &[u64],
        grads: &[f32],
        counts: &[u32],
        step: u64,
    ) -> Result<(), TrainError> {
        dispatch!(self, b => b.push(table, ids, grads, counts, step).await)
    }

    /// Creates a table on every shard.
    pub async fn create_table(&self, config: &pb::TableConfig) -> Result<(), TrainError> {
        dispatch!(self, b => b.create_table(config).await)
    }

    /// Loads exact feature counts.
    pub async fn load_counts(&self, table: &str, counts: &[(u64, u32)]) -> Result<(), TrainError> {
        dispatch!(self, b => b.load_counts(table, counts).await)
    }

    /// Registers dense parameters (existing ones keep their values).
    pub async fn init_dense(
        &self,
        params: &[(String, Vec<f32>)],
        optimizer: &pb::OptimizerConfig,
    ) -> Result<(), TrainError> {
        dispatch!(self, b => b.init_dense(params, optimizer).await)
    }

    /// All dense parameters once every owning shard reached `min_step`.
    pub async fn pull_dense(
        &self,
        min_step: u64,
    ) -> Result<(Vec<(String, Vec<f32>)>, u64), TrainError> {
        dispatch!(self, b => b.pull_dense(min_step).await)
    }

    /// Pushes dense gradients of `step`.
    pub async fn push_dense(
        &self,
        grads: &[(String, Vec<f32>)],
        step: u64,
        num_workers: u32,
        worker_index: u32,
    ) -> Result<(), TrainError> {
        dispatch!(self, b => b.push_dense(grads, step, num_workers, worker_index).await)
    }

    /// Overwrites dense state buffers.
    pub async fn assign_dense(&self, params: &[(String, Vec<f32>)]) -> Result<(), TrainError> {
        dispatch!(self, b => b.assign_dense(params).await)
    }

    /// Checkpoints every shard at `step`.
    pub async fn checkpoint(&self, step: u64, keep: u32) -> Result<(), TrainError> {
        dispatch!(self, b => b.checkpoint(step, keep).await.map(|_| ()))
    }

    /// Restores every shard to `step` (0 = latest); returns the steps restored.
    pub async fn restore(&self, step: u64) -> Result<Vec<u64>, TrainError> {
        dispatch!(self, b => b.restore(step).await.map(|r| r.iter().map(|x| x.step).collect()))
    }

    /// Steps for which every shard has a good checkpoint.
    pub async fn common_checkpoints(&self) -> Result<Vec<u64>, TrainError> {
        dispatch!(self, b => b.common_checkpoints().await)
    }

    /// Per-shard statistics.
    pub async fn stats(&self) -> Result<Vec<pb::StatsResponse>, TrainError> {
        dispatch!(self, b => b.stats().await)
    }
}
