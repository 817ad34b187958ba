//! `ember-data`: Ember's data path: fetch, prepare, read, count, synthesize.
//! No model and no network: batches come out, a trainer consumes them.
//!
//! - [`batch`]: samples and the deduplicated mini-batch (ids per sparse table).
//! - `scripts/fetch-ml100k.sh` downloads MovieLens-100k (see `shared/DATA.md`).
//! - [`format`]: the DIEN sample text format and the user-sequence format.
//! - [`prepare`]: raw ML-100k -> train/test sample files (DIN protocol, or the
//!   rating >= 4 protocol), id maps, `meta.json`, GRU4Rec sequence files.
//! - [`reader`]: streams sample files into [`crate::batch::Batch`]es: bounded
//!   shuffle, worker split, epochs, resume from a [`reader::DataPosition`].
//! - [`counts`]: the offline counting pass (n_j per id per sparse table) and
//!   its binary file.
//! - [`schema`]: the declared feature schema (`[[features]]`: user profile,
//!   behaviours, ad, context) and [`schema_format`], the sample files with a
//!   header that carry any number of such features.
//! - [`tabular`]: `ember-data prepare --config`: CSV / TSV / Parquet events
//!   and side tables -> [`schema_format`] files for a job's declared features.
//! - [`synth`]: a seeded synthetic generator (Zipf items, user interests).
//!
//! Every fallible function returns [`DataError`].

use std::path::PathBuf;

pub mod batch;
pub mod counts;
pub mod format;
pub mod prepare;
pub mod progress;
pub mod reader;
pub mod schema;
pub mod schema_format;
pub mod synth;
pub mod tabular;

/// Errors of the data path.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// An I/O error on a file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A malformed line in a sample, sequence or raw data file.
    #[error("{path}:{line}: column {column}: {reason} (value {value:?})")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// Column name (for example `hist_item_ids`), or `line` for the whole line.
        column: String,
        /// The offending value (shortened).
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// Raw data that parses but is inconsistent (for example an item without
    /// metadata).
    #[error("{path}: {reason}")]
    Inconsistent {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A counts file that is not valid (bad magic, version, checksum, length).
    #[error("counts file {path}: {reason}")]
    Counts {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An invalid option value.
    #[error("invalid option {field}: {reason}")]
    InvalidOption {
        /// The option name.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// JSON (de)serialization of `meta.json`.
    #[error("{path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
}

impl DataError {
    /// Wraps an I/O error with its file.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }

    /// Whether this is a malformed-line error (skippable by readers that
    /// count and skip bad lines).
    pub fn is_malformed(&self) -> bool {
        matches!(self, DataError::Malformed { .. })
    }
}
