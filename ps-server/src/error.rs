//! Typed errors of the shard and their one mapping to gRPC status codes.

use std::path::PathBuf;

/// Result alias of the shard library.
pub type Result<T, E = PsError> = std::result::Result<T, E>;

/// Everything that can go wrong in a shard operation.
///
/// Mapped to a `tonic::Status` in exactly one place (`impl From<PsError> for
/// tonic::Status`), following the codes documented in `ps.proto`.
#[derive(Debug, thiserror::Error)]
pub enum PsError {
    /// Unknown sparse table.
    #[error("unknown table `{0}`")]
    UnknownTable(String),
    /// Unknown dense parameter.
    #[error("unknown dense parameter `{0}`")]
    UnknownDense(String),
    /// No checkpoint for the requested step (or none at all).
    #[error("no checkpoint {0}")]
    NoCheckpoint(String),
    /// A malformed request: wrong lengths, NaN/Inf, duplicate ids, bad config.
    #[error("{0}")]
    InvalidArgument(String),
    /// A request or response larger than the configured limit.
    #[error("{0}")]
    TooLarge(String),
    /// An id that routes to another shard, or a checkpoint of another shard.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A checkpoint file that failed its checks.
    #[error("corrupt checkpoint {path}: {reason}")]
    CorruptCheckpoint {
        /// The offending file.
        path: PathBuf,
        /// What check failed.
        reason: String,
    },
    /// Waiting for a dense step timed out.
    #[error("timed out after {ms} ms waiting for dense step {min_step} (now {step})")]
    Timeout {
        /// The awaited step.
        min_step: u64,
        /// The dense step when giving up.
        step: u64,
        /// The wait in milliseconds.
        ms: u64,
    },
    /// Missing or wrong bearer token on an admin RPC.
    #[error("{0}")]
    Unauthenticated(String),
    /// The shard is shutting down.
    #[error("shard is shutting down")]
    ShuttingDown,
    /// An I/O error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done (names the file).
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A restore failed after the shard had dropped its live state (the
    /// files passed verification, then loading them failed): the shard is
    /// empty and must be restored again.
    #[error("restore of step {step} failed after the live state was dropped; the shard is empty: {source}")]
    RestoreAborted {
        /// The step being restored.
        step: u64,
        /// What failed.
        #[source]
        source: Box<PsError>,
    },
    /// Anything else that is a bug or an environment problem.
    #[error("{0}")]
    Internal(String),
}

impl PsError {
    /// Shorthand for [`PsError::InvalidArgument`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        PsError::InvalidArgument(msg.into())
    }

    /// Wraps an I/O error with its context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        PsError::Io {
            context: context.into(),
            source,
        }
    }

    /// The gRPC code this error maps to.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            PsError::UnknownTable(_) | PsError::UnknownDense(_) | PsError::NoCheckpoint(_) => {
                Code::NotFound
            }
            PsError::InvalidArgument(_) => Code::InvalidArgument,
            PsError::TooLarge(_) => Code::ResourceExhausted,
            PsError::FailedPrecondition(_) | PsError::CorruptCheckpoint { .. } => {
                Code::FailedPrecondition
            }
            PsError::Timeout { .. } => Code::DeadlineExceeded,
            PsError::Unauthenticated(_) => Code::Unauthenticated,
            PsError::ShuttingDown => Code::Unavailable,
            PsError::Io { .. } | PsError::Internal(_) => Code::Internal,
            PsError::RestoreAborted { .. } => Code::DataLoss,
        }
    }

    /// A short stable label for the `reason` of `ember_ps_rejected_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            PsError::UnknownTable(_) => "unknown_table",
            PsError::UnknownDense(_) => "unknown_dense",
            PsError::NoCheckpoint(_) => "no_checkpoint",
            PsError::InvalidArgument(_) => "invalid_argument",
            PsError::TooLarge(_) => "too_large",
            PsError::FailedPrecondition(_) => "failed_precondition",
            PsError::CorruptCheckpoint { .. } => "corrupt_checkpoint",
            PsError::Timeout { .. } => "timeout",
            PsError::Unauthenticated(_) => "unauthenticated",
            PsError::ShuttingDown => "shutting_down",
            PsError::Io { .. } => "io",
            PsError::RestoreAborted { .. } => "restore_aborted",
            PsError::Internal(_) => "internal",
        }
    }
}

impl From<ember_proto::CodecError> for PsError {
    fn from(e: ember_proto::CodecError) -> Self {
        PsError::InvalidArgument(e.to_string())
    }
}

impl From<PsError> for tonic::Status {
    fn from(e: PsError) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}
