//! The training loop against the parameter server.
//!
//! ```text
//! reader -> Batch -> dedup (batch.rs) -> route + pull (client.rs, parallel per shard)
//!        -> forward/backward (model) -> push sparse grads + counts, push dense grads
//! ```
//! [`client::PsClient`] talks to a sharded parameter server over gRPC.

pub mod backend;
pub mod client;
pub mod config;
pub mod eval;
pub mod local;
pub mod remote;
pub mod seqrec;
pub mod setup;
pub mod worker;

use tonic::Status;

/// Errors of the training loop.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A shard rejected a request or stayed unreachable past the retry deadline.
    #[error("shard {shard} ({addr}) failed {what}: {} ({:?})", status.message(), status.code())]
    Ps {
        /// Shard index.
        shard: usize,
        /// Shard address.
        addr: String,
        /// The call that failed.
        what: &'static str,
        /// The final status.
        status: Status,
    },
    /// The coordinator rejected a call, or stayed unreachable past the
    /// deadline (transient for the job: the worker gives up, its
    /// orchestrator or the launcher restarts it).
    #[error("coordinator {addr} failed {what}: {} ({:?})", status.message(), status.code())]
    Coordinator {
        /// The coordinator's address (`in-process` for the launcher's tasks).
        addr: String,
        /// The call that failed.
        what: &'static str,
        /// The final status.
        status: Status,
    },
    /// A shard answered something that breaks the contract.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A configuration problem.
    #[error("config: {0}")]
    Config(String),
    /// TLS or token files are unusable.
    #[error("security: {0}")]
    Security(#[from] ember_proto::security::SecurityError),
    /// An in-process shard rejected a request.
    #[error("in-process shard: {0}")]
    Local(String),
    /// The model failed (a shape mismatch, a missing input, a tensor error).
    #[error("model: {0}")]
    Model(#[from] crate::model::ModelError),
    /// The training loss stopped being finite.
    #[error("model: loss is {loss} at step {step}")]
    NonFiniteLoss {
        /// The loss.
        loss: f32,
        /// The global step.
        step: u64,
    },
    /// Reading data failed (a malformed line names its file, line and column).
    #[error("data: {0}")]
    Data(#[from] crate::data::DataError),
    /// The data and the job disagree (e.g. feature counts without a table
    /// the model needs).
    #[error("data: {0}")]
    DataMismatch(String),
    /// A task of this worker (prefetch, push) panicked or was cancelled.
    #[error("{what} task failed: {source}")]
    Task {
        /// Which task.
        what: &'static str,
        /// Why.
        #[source]
        source: tokio::task::JoinError,
    },
    /// File-system error.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl TrainError {
    /// Whether the same input fails the same way on every attempt: bad data
    /// (a malformed line), a bad configuration, or a model error (a shape
    /// mismatch, a non-finite loss). Rerunning such an epoch is pointless, so
    /// the launcher ends the job on the first one. Everything else (a shard
    /// that is unreachable, restarting or rejecting a request of a rolled-back
    /// state) is transient and retried.
    pub fn is_deterministic(&self) -> bool {
        matches!(
            self,
            TrainError::Data(_)
                | TrainError::DataMismatch(_)
                | TrainError::Config(_)
                | TrainError::Security(_)
                | TrainError::Model(_)
                | TrainError::NonFiniteLoss { .. }
        )
    }
}

/// Copies one shard's answer into request order: `rows[k]` (width `dim`)
/// goes to position `pos[k]` of `out`.
pub(crate) fn scatter_rows(out: &mut [f32], pos: &[usize], rows: &[f32], dim: usize) {
    for (k, &p) in pos.iter().enumerate() {
        out[p * dim..(p + 1) * dim].copy_from_slice(&rows[k * dim..(k + 1) * dim]);
    }
}

/// The gradients (width `dim`) and counts of the positions `pos` owned by one
/// shard, in that order (a missing count is 1).
pub(crate) fn gather_rows(
    grads: &[f32],
    counts: &[u32],
    pos: &[usize],
    dim: usize,
) -> (Vec<f32>, Vec<u32>) {
    let mut g = Vec::with_capacity(pos.len() * dim);
    let mut c = Vec::with_capacity(pos.len());
    for &p in pos {
        g.extend_from_slice(&grads[p * dim..(p + 1) * dim]);
        c.push(counts.get(p).copied().unwrap_or(1));
    }
    (g, c)
}
