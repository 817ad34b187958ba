//! Ember's launcher: from one TOML job file it starts the parameter-server
//! shards and the workers on this machine, creates the tables, loads feature
//! counts, trains epoch by epoch, evaluates and checkpoints all shards at the
//! same step after every epoch, recovers from a crashed shard or worker by
//! rolling the whole cluster back to the last complete checkpoint, and writes
//! a metrics JSON and a PNG of the curves.

pub mod bench;
pub mod ckpt_verify;
pub mod coordinator;
pub mod export;
pub mod health;
pub mod launcher;
pub mod plan;
pub mod plot;
pub mod procs;
pub mod report;
pub mod reshard;
pub mod seqrec;

/// Errors of the launcher.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A process could not be started or did not become ready.
    #[error("launch: {0}")]
    Launch(String),
    /// Writing a report or plot failed.
    #[error("report: {0}")]
    Report(String),
    /// Training failed.
    #[error(transparent)]
    Train(#[from] ember_worker::train::TrainError),
    /// A child process (`ps-server`, `worker`) could not be started.
    #[error("cannot start {bin}: {source}")]
    Spawn {
        /// The binary.
        bin: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A listening address could not be bound.
    #[error("cannot bind {what} address {addr}: {source}")]
    Bind {
        /// What listens there (metrics, coordinator).
        what: &'static str,
        /// The address.
        addr: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The run's certificates or token could not be made (`security.mode = "auto"`).
    #[error("security.mode = \"auto\": {0}")]
    Pki(#[from] ember_proto::pki::PkiError),
    /// TLS or token settings of a server are unusable.
    #[error("security: {0}")]
    Security(#[from] ember_proto::security::SecurityError),
    /// A file written atomically (temp file, fsync, rename) could not be.
    #[error(transparent)]
    Write(#[from] ember_proto::atomic::AtomicWriteError),
    /// An in-process shard or the metrics exporter failed.
    #[error("parameter server: {0}")]
    Ps(#[from] ember_ps::error::PsError),
    /// File-system error.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
}
