//! `ember-data prepare --config JOB.toml`: ordinary tabular files (CSV, TSV,
//! Parquet) -> sample files with a header ([`crate::schema_format`]) for the
//! job's declared features ([`crate::schema`]).
//!
//! # Inputs ([`PrepareSpec`], the job file's `[prepare]` section)
//! An events file (one row per interaction: user, item, time, optionally a
//! 0/1 label) and optional users / items side tables joined on the events'
//! user / item column. The format comes from the extension: `.csv` is
//! comma-separated, `.tsv`, `.txt`, `.tab`, `.inter`, `.user`, `.item` are
//! tab-separated, `.parquet` / `.pq` are Parquet; `delimiter` (one byte)
//! overrides it for text files. Text files have a header line; with a
//! delimiter other than tab, fields may be quoted as in RFC 4180 (`"a, b"`,
//! `""` for a quote); tab-separated fields are never unquoted. Header names
//! are matched with a RecBole-style `:type` suffix stripped (`user_id:token`
//! is `user_id`). Parquet columns are read by name through the record API:
//! numbers as decimal text, booleans as `true`/`false`, dates and timestamps
//! as Unix seconds, lists as their elements joined by one space, nulls as
//! missing. In errors, `line` is the file's line for text files and the
//! 1-based row for Parquet files.
//!
//! # Features
//! Every non-behaviour feature is found by [`Feature::column_name`] in the
//! events, then the users table, then the items table (an error names the
//! feature, the column and every file searched). A feature read from the
//! events' user column (or the users table's key) is a function of the user,
//! one read from the events' item column (or the items table's key) or from
//! the items table a function of the item, any other events column a
//! function of the event. Its value becomes ids or a float by
//! [`Feature::transform_or_default`] (see [`Transform`]; a bucket, weekday or
//! hour is a token like any other). Tokens become ids per embedding table
//! ([`Feature::table_name`]: two features sharing a table share ids): `1..`
//! over the table's sorted tokens, numerically when all are unsigned
//! integers, else as strings; 0 is padding / missing. A table's tokens are
//! the values the features emit over the events' rows, users and items (a
//! side-table row no event refers to adds nothing). A multi-hot feature keeps
//! the first `max_len` parts.
//!
//! Missing values: an empty cell (or a Parquet null) is a missing value: id
//! 0 for a sparse feature, no ids for a multi-hot one, 0.0 for a dense one. A
//! user (item) without a row in the users (items) table is not an error:
//! every feature of that table is missing for it (`meta.json` counts them).
//! A value a transform cannot read (a bucket of `abc`) is an error naming the
//! file, line and column.
//!
//! A behaviour feature is the history of its aligned ad feature (which must
//! use the same table): that feature's values over the user's earlier
//! positive events, oldest first, truncated to the last `max_len`. DIEN's
//! `neg:<behaviour>` columns (`with_neg`) hold the aligned ad feature of one
//! sampled negative item per history step, so that ad feature must be a
//! function of the item.
//!
//! # Protocol "din" (the default without `label`)
//! Exactly [`crate::prepare`]'s DIN protocol, feature by feature: users and
//! items are remapped over their sorted keys (the sample's `user` column is
//! the user's id so remapped; negatives are drawn over the item ids so
//! remapped); each user's events sorted by `(time, row)`; per user a
//! SplitMix64 seeded with `derive_seed(seed, user)` draws one target
//! negative per position, then one DIEN history negative per position, each
//! uniform over the items and redrawn while among the user's items; for
//! positions `1..n` a positive row and a sampled-negative row, the last
//! position to the test set; training rows shuffled with `derive_seed(seed,
//! SHUFFLE_KEY)`. On ML-100k with the ids-only schema the rows equal
//! `ember-data prepare --raw-dir`'s. A sampled-negative row takes its
//! item features from the negative item and every other feature (user,
//! context) from the positive event at that position. Every ad feature must
//! therefore be a function of the item: an ad feature read from another
//! events column (a position, say) is an error, since a sampled item has no
//! event to read it from.
//!
//! # Protocol "labels" (the default with `label`)
//! Each event is a row with its label (`0`, `1`, `0.0`, `1.0`, `true`,
//! `false`); the history is the user's earlier events labelled 1 (possibly
//! empty); per user the last event in time goes to the test set, the others
//! to the (shuffled) training set. No target negatives are drawn. With
//! `with_neg`, the DIEN history negatives are drawn as in "din" (per user,
//! the same generator, one per position, never among the user's items,
//! whatever their labels) without the target-negative draws before them.
//!
//! # Outputs (in `out`)
//! `train.txt`, `test.txt` ([`crate::schema_format`] header + rows),
//! `vocab/<table>.tsv` (`token \t id`, a header line, ids ascending; tabs,
//! line breaks and backslashes in tokens escaped as `\t`, `\n`, `\r`, `\\`),
//! `meta.json` ([`TabularMeta`]). Every file is written under a hidden
//! `.NAME.tmp` name and renamed when complete.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ember_proto::rng::{derive_seed, SplitMix64};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::batch::Sample;
use crate::format::{parse_u64, show};
use crate::prepare::{AtomicFile, DEFAULT_MAX_LEN, DEFAULT_SEED, SHUFFLE_KEY};
use crate::progress::rows_bar;
use crate::schema::{Feature, FeatureGroup, FeatureKind, FeatureSchema, Transform};
use crate::schema_format;
use crate::DataError;

/// `format` of [`TabularMeta`]: the sample files' magic and version.
pub const FORMAT_NAME: &str = "ember-samples-v2";

/// How rows and labels are made from the events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TabularProtocol {
    /// Implicit feedback: every event positive plus one sampled negative
    /// target per position ([`crate::prepare`]'s DIN protocol).
    Din,
    /// Explicit 0/1 labels from the `label` column; no sampled targets.
    Labels,
}

impl fmt::Display for TabularProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TabularProtocol::Din => "din",
            TabularProtocol::Labels => "labels",
        })
    }
}

/// A side table joined on the events' user or item column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SideTable {
    /// CSV, TSV or Parquet file (relative paths: to the current directory).
    pub path: PathBuf,
    /// Its key column (matched against the events' user / item values).
    pub key: String,
    /// Field delimiter (one byte) of a text file; default: by extension.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delimiter: Option<String>,
}

fn default_max_len() -> usize {
    DEFAULT_MAX_LEN
}

fn default_seed() -> u64 {
    DEFAULT_SEED
}

fn default_true() -> bool {
    true
}

/// The `[prepare]` section of a job file: where the raw tables are and how
/// to turn them into samples (see the module docs).
///
/// ```toml
/// [prepare]
/// events = "data/ml-100k/ml-100k.inter"
/// user = "user_id"
/// item = "item_id"
/// time = "timestamp"
/// users = { path = "data/ml-100k/ml-100k.user", key = "user_id" }
/// items = { path = "data/ml-100k/ml-100k.item", key = "item_id" }
/// out = "data/ml100k-full"
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrepareSpec {
    /// The events file (CSV, TSV or Parquet; relative to the current directory).
    pub events: PathBuf,
    /// Field delimiter (one byte) of the events if text; default: by extension.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delimiter: Option<String>,
    /// The events' user column.
    pub user: String,
    /// The events' item column (the candidate's goods id).
    pub item: String,
    /// The events' time column (numbers, e.g. Unix seconds): the sort key
    /// of each user's events.
    pub time: String,
    /// The events' 0/1 label column (protocol "labels").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// "din" or "labels"; default: "labels" when `label` is set, else "din".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<TabularProtocol>,
    /// Side table joined on the user column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<SideTable>,
    /// Side table joined on the item column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<SideTable>,
    /// Output directory (created if missing; `--out` overrides it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out: Option<PathBuf>,
    /// History truncation (the last `max_len` steps), at least 1.
    #[serde(default = "default_max_len")]
    pub max_len: usize,
    /// Seed of the negatives and the shuffle.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Write DIEN's `neg:<behaviour>` columns.
    #[serde(default = "default_true")]
    pub with_neg: bool,
}

impl PrepareSpec {
    /// The protocol in effect (explicit, or by the presence of `label`).
    pub fn resolved_protocol(&self) -> Result<TabularProtocol, DataError> {
        match (self.protocol, &self.label) {
            (None | Some(TabularProtocol::Din), None) => Ok(TabularProtocol::Din),
            (None | Some(TabularProtocol::Labels), Some(_)) => Ok(TabularProtocol::Labels),
            (Some(TabularProtocol::Din), Some(l)) => Err(DataError::InvalidOption {
                field: "prepare.protocol",
                reason: format!(
                    "\"din\" makes every event a positive and samples the negatives, but `label = {l:?}` \
                     names explicit labels: use protocol \"labels\" or drop `label`"
                ),
            }),
            (Some(TabularProtocol::Labels), None) => Err(DataError::InvalidOption {
                field: "prepare.label",
                reason: "protocol \"labels\" needs `label`, the events' 0/1 label column".into(),
            }),
        }
    }

    /// Checks option values, naming the bad field.
    pub fn validate(&self) -> Result<(), DataError> {
        if self.max_len == 0 {
            return Err(DataError::InvalidOption {
                field: "prepare.max_len",
                reason: "must be at least 1".into(),
            });
        }
        for (field, v) in [
            ("prepare.user", &self.user),
            ("prepare.item", &self.item),
            ("prepare.time", &self.time),
        ] {
            if v.is_empty() {
                return Err(DataError::InvalidOption {
                    field,
                    reason: "must name a column".into(),
                });
            }
        }
        self.resolved_protocol().map(|_| ())
    }
}

/// Loads the `[[features]]` and `[prepare]` sections of a job file (other
/// sections are ignored).
pub fn load_job(path: &Path) -> Result<(FeatureSchema, PrepareSpec), DataError> {
    #[derive(Deserialize)]
    struct Job {
        #[serde(default)]
        features: Vec<Feature>,
        prepare: Option<PrepareSpec>,
    }
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    let bad = |reason: String| DataError::Inconsistent {
        path: path.to_path_buf(),
        reason,
    };
    let job: Job = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let spec = job
        .prepare
        .ok_or_else(|| bad("no [prepare] section (where the raw tables are)".into()))?;
    if job.features.is_empty() {
        return Err(bad("no [[features]] (the features to prepare)".into()));
    }
    let schema = FeatureSchema::new(job.features).map_err(|e| bad(e.to_string()))?;
    Ok((schema, spec))
}

/// One input file in [`TabularMeta::sources`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceFile {
    /// `events`, `users` or `items`.
    pub role: String,
    /// The path as given.
    pub path: PathBuf,
    /// sha256 of its bytes.
    pub sha256: String,
}

/// Contents of `meta.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TabularMeta {
    /// Sample format ([`FORMAT_NAME`]).
    pub format: String,
    /// Protocol used.
    pub protocol: TabularProtocol,
    /// Seed used.
    pub seed: u64,
    /// History truncation used.
    pub max_len: usize,
    /// Whether the `neg:` columns are present.
    pub with_neg: bool,
    /// Training rows.
    pub train_rows: u64,
    /// Test rows.
    pub test_rows: u64,
    /// Events read.
    pub events: u64,
    /// Distinct users of the events.
    pub n_users: u64,
    /// Distinct items of the events.
    pub n_items: u64,
    /// Per embedding table: its size including the padding id 0 (max id + 1).
    pub vocab: BTreeMap<String, u64>,
    /// The schema's feature names, in declaration order.
    pub features: Vec<String>,
    /// The input files.
    pub sources: Vec<SourceFile>,
    /// Users of the events without a row in the users table.
    pub users_without_row: u64,
    /// Items of the events without a row in the items table.
    pub items_without_row: u64,
}

impl TabularMeta {
    /// Reads `meta.json` from a prepared directory.
    pub fn load(dir: &Path) -> Result<TabularMeta, DataError> {
        let path = dir.join("meta.json");
        let f = File::open(&path).map_err(|e| DataError::io(&path, e))?;
        serde_json::from_reader(std::io::BufReader::new(f))
            .map_err(|source| DataError::Json { path, source })
    }
}

/// What [`prepare_tabular`] did.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The metadata written to `meta.json`.
    pub meta: TabularMeta,
    /// The output directory.
    pub out: PathBuf,
    /// Wall time.
    pub elapsed: Duration,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let vocab: Vec<String> = self
            .meta
            .vocab
            .iter()
            .map(|(t, n)| format!("{t} {n}"))
            .collect();
        write!(
            f,
            "prepare --config ({}): {} train, {} test rows ({} events, {} users, {} items; vocab {}) in {:.2} s -> {}",
            self.meta.protocol,
            self.meta.train_rows,
            self.meta.test_rows,
            self.meta.events,
            self.meta.n_users,
            self.meta.n_items,
            vocab.join(", "),
            self.elapsed.as_secs_f64(),
            self.out.display()
        )
    }
}

// ---------------------------------------------------------------------------
// Reading tables.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Text { delim: u8 },
    Parquet,
}

fn format_of(
    path: &Path,
    delimiter: Option<&str>,
    field: &'static str,
) -> Result<Format, DataError> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    if matches!(ext.as_deref(), Some("parquet" | "pq")) {
        return Ok(Format::Parquet);
    }
    if let Some(d) = delimiter {
        return match d.as_bytes() {
            [b] if !matches!(b, b'"' | b'\n' | b'\r') => Ok(Format::Text { delim: *b }),
            _ => Err(DataError::InvalidOption {
                field,
                reason: format!(
                    "{d:?} is not one single-byte character other than a quote or a line break"
                ),
            }),
        };
    }
    match ext.as_deref() {
        Some("csv") => Ok(Format::Text { delim: b',' }),
        Some("tsv" | "txt" | "tab" | "inter" | "user" | "item") => Ok(Format::Text { delim: b'\t' }),
        _ => Err(DataError::InvalidOption {
            field,
            reason: format!(
                "{}: cannot tell the format from the extension (.csv, .tsv, .txt, .inter, .user, .item, .parquet): set it",
                path.display()
            ),
        }),
    }
}

/// Splits a text file into records (see the module docs for the quoting).
struct Records<'a> {
    data: &'a [u8],
    pos: usize,
    line: u64,
    delim: u8,
    quotes: bool,
    /// The current record's fields, unquoted, back to back.
    buf: Vec<u8>,
    /// Field ranges in `buf`.
    fields: Vec<(usize, usize)>,
}

impl<'a> Records<'a> {
    fn new(data: &'a [u8], delim: u8) -> Self {
        let data = data.strip_prefix(b"\xef\xbb\xbf").unwrap_or(data);
        Records {
            data,
            pos: 0,
            line: 1,
            delim,
            quotes: delim != b'\t',
            buf: Vec::new(),
            fields: Vec::new(),
        }
    }

    fn field(&self, k: usize) -> &[u8] {
        let (a, b) = self.fields[k];
        &self.buf[a..b]
    }

    /// Advances to the next non-empty record; returns its first line, or
    /// `Err(line)` for an unterminated quote starting at `line`.
    fn next_record(&mut self) -> Option<Result<u64, u64>> {
        let d = self.data;
        while self.pos < d.len() {
            let start = self.line;
            self.buf.clear();
            self.fields.clear();
            loop {
                let from = self.buf.len();
                if self.quotes && d.get(self.pos) == Some(&b'"') {
                    self.pos += 1;
                    loop {
                        match d.get(self.pos) {
                            None => return Some(Err(start)),
                            Some(b'"') if d.get(self.pos + 1) == Some(&b'"') => {
                                self.buf.push(b'"');
                                self.pos += 2;
                            }
                            Some(b'"') => {
                                self.pos += 1;
                                break;
                            }
                            Some(&c) => {
                                if c == b'\n' {
                                    self.line += 1;
                                }
                                self.buf.push(c);
                                self.pos += 1;
                            }
                        }
                    }
                }
                while let Some(&c) = d.get(self.pos) {
                    if c == self.delim || c == b'\n' {
                        break;
                    }
                    self.buf.push(c);
                    self.pos += 1;
                }
                self.fields.push((from, self.buf.len()));
                match d.get(self.pos) {
                    Some(&c) if c == self.delim => self.pos += 1,
                    Some(_) => {
                        self.pos += 1;
                        self.line += 1;
                        break;
                    }
                    None => break,
                }
            }
            if let Some(last) = self.fields.last_mut() {
                if last.1 > last.0 && self.buf[last.1 - 1] == b'\r' {
                    last.1 -= 1;
                }
            }
            if self.fields.len() == 1 && self.fields[0].0 == self.fields[0].1 {
                continue;
            }
            return Some(Ok(start));
        }
        None
    }
}

/// One loaded column: its cells back to back.
#[derive(Debug, Default)]
struct Column {
    buf: String,
    ends: Vec<usize>,
}

impl Column {
    fn push(&mut self, v: &str) {
        self.buf.push_str(v);
        self.ends.push(self.buf.len());
    }

    fn get(&self, i: usize) -> &str {
        let a = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.buf[a..self.ends[i]]
    }
}

/// An input table: its header, then the columns asked for.
struct Table {
    role: &'static str,
    path: PathBuf,
    format: Format,
    names: Vec<String>,
    /// A text file's bytes (dropped once loaded).
    data: Vec<u8>,
    cols: Vec<Option<Column>>,
    lines: Vec<u64>,
    sha256: String,
}

fn strip_type(name: &str) -> String {
    name.trim().split(':').next().unwrap_or("").to_string()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parquet_reader(path: &Path) -> Result<SerializedFileReader<File>, DataError> {
    let f = File::open(path).map_err(|e| DataError::io(path, e))?;
    SerializedFileReader::new(f).map_err(|e| DataError::Inconsistent {
        path: path.to_path_buf(),
        reason: format!("not a readable Parquet file: {e}"),
    })
}

fn unix_seconds(v: i64, per_second: i64) -> String {
    if v % per_second == 0 {
        (v / per_second).to_string()
    } else {
        (v as f64 / per_second as f64).to_string()
    }
}

/// A Parquet value as text (see the module docs).
fn field_text(f: &Field) -> Result<String, String> {
    Ok(match f {
        Field::Null => String::new(),
        Field::Str(s) => s.clone(),
        Field::Bytes(b) => b
            .as_utf8()
            .map_err(|_| "binary value is not UTF-8".to_string())?
            .to_string(),
        Field::Bool(b) => b.to_string(),
        Field::Byte(v) => v.to_string(),
        Field::Short(v) => v.to_string(),
        Field::Int(v) => v.to_string(),
        Field::Long(v) => v.to_string(),
        Field::UByte(v) => v.to_string(),
        Field::UShort(v) => v.to_string(),
        Field::UInt(v) => v.to_string(),
        Field::ULong(v) => v.to_string(),
        Field::Float(v) => v.to_string(),
        Field::Double(v) => v.to_string(),
        Field::Date(d) => (i64::from(*d) * 86_400).to_string(),
        Field::TimestampMillis(v) => unix_seconds(*v, 1_000),
        Field::TimestampMicros(v) => unix_seconds(*v, 1_000_000),
        Field::ListInternal(l) => {
            let parts: Result<Vec<String>, String> = l.elements().iter().map(field_text).collect();
            parts?.join(" ")
        }
        other => other.to_string(),
    })
}

impl Table {
    fn open(role: &'static str, path: &Path, format: Format) -> Result<Table, DataError> {
        let mut t = Table {
            role,
            path: path.to_path_buf(),
            format,
            names: Vec::new(),
            data: Vec::new(),
            cols: Vec::new(),
            lines: Vec::new(),
            sha256: String::new(),
        };
        match format {
            Format::Text { delim } => {
                t.data = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
                t.sha256 = hex(&Sha256::digest(&t.data));
                let mut r = Records::new(&t.data, delim);
                match r.next_record() {
                    Some(Ok(_)) => {
                        t.names = (0..r.fields.len())
                            .map(|k| strip_type(&String::from_utf8_lossy(r.field(k))))
                            .collect();
                    }
                    Some(Err(line)) => return Err(t.unterminated(line)),
                    None => {
                        return Err(DataError::Inconsistent {
                            path: path.to_path_buf(),
                            reason: "empty file: no header line".into(),
                        })
                    }
                }
            }
            Format::Parquet => {
                let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
                t.sha256 = hex(&Sha256::digest(&bytes));
                let reader = parquet_reader(path)?;
                t.names = reader
                    .metadata()
                    .file_metadata()
                    .schema()
                    .get_fields()
                    .iter()
                    .map(|f| strip_type(f.name()))
                    .collect();
            }
        }
        t.cols = t.names.iter().map(|_| None).collect();
        Ok(t)
    }

    fn unterminated(&self, line: u64) -> DataError {
        DataError::Malformed {
            path: self.path.clone(),
            line,
            column: "line".into(),
            value: String::new(),
            reason: "a quoted field is never closed".into(),
        }
    }

    fn find(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    fn describe(&self) -> String {
        format!(
            "{} file {} (columns: {})",
            self.role,
            self.path.display(),
            self.names.join(", ")
        )
    }

    /// The column `name` of a `[prepare]` option, or an error naming both.
    fn need(&self, name: &str, option: &str) -> Result<usize, DataError> {
        self.find(name).ok_or_else(|| DataError::Inconsistent {
            path: self.path.clone(),
            reason: format!(
                "[prepare] {option} = {name:?}: no such column (columns: {})",
                self.names.join(", ")
            ),
        })
    }

    fn rows(&self) -> usize {
        self.lines.len()
    }

    fn cell(&self, col: usize, row: usize) -> &str {
        self.cols[col].as_ref().map_or("", |c| c.get(row))
    }

    fn err(&self, col: usize, row: usize, value: &str, reason: impl Into<String>) -> DataError {
        DataError::Malformed {
            path: self.path.clone(),
            line: self.lines.get(row).copied().unwrap_or(0),
            column: self.names.get(col).cloned().unwrap_or_default(),
            value: show(value.as_bytes()),
            reason: reason.into(),
        }
    }

    /// Reads the cells of the columns `wanted` (header indices).
    fn load(&mut self, wanted: &[usize]) -> Result<(), DataError> {
        let mut wanted = wanted.to_vec();
        wanted.sort_unstable();
        wanted.dedup();
        for &w in &wanted {
            self.cols[w] = Some(Column::default());
        }
        match self.format {
            Format::Text { delim } => {
                let data = std::mem::take(&mut self.data);
                let mut r = Records::new(&data, delim);
                let mut header = true;
                while let Some(rec) = r.next_record() {
                    let line = rec.map_err(|l| self.unterminated(l))?;
                    if std::mem::take(&mut header) {
                        continue;
                    }
                    for &w in &wanted {
                        if w >= r.fields.len() {
                            return Err(DataError::Malformed {
                                path: self.path.clone(),
                                line,
                                column: self.names[w].clone(),
                                value: show(&r.buf),
                                reason: format!(
                                    "missing: the row has {} fields, the header {}",
                                    r.fields.len(),
                                    self.names.len()
                                ),
                            });
                        }
                        let v =
                            std::str::from_utf8(r.field(w)).map_err(|_| DataError::Malformed {
                                path: self.path.clone(),
                                line,
                                column: self.names[w].clone(),
                                value: show(r.field(w)),
                                reason: "not UTF-8".into(),
                            })?;
                        if let Some(c) = self.cols[w].as_mut() {
                            c.push(v);
                        }
                    }
                    self.lines.push(line);
                }
            }
            Format::Parquet => {
                let reader = parquet_reader(&self.path)?;
                let rows = reader
                    .get_row_iter(None)
                    .map_err(|e| DataError::Inconsistent {
                        path: self.path.clone(),
                        reason: format!("cannot read rows: {e}"),
                    })?;
                for (i, row) in rows.enumerate() {
                    let line = i as u64 + 1;
                    let row = row.map_err(|e| DataError::Inconsistent {
                        path: self.path.clone(),
                        reason: format!("row {line}: {e}"),
                    })?;
                    let mut seen = 0usize;
                    for (k, (_, field)) in row.get_column_iter().enumerate() {
                        if let Some(c) = self.cols.get_mut(k).and_then(Option::as_mut) {
                            let v = field_text(field).map_err(|reason| DataError::Malformed {
                                path: self.path.clone(),
                                line,
                                column: self.names[k].clone(),
                                value: String::new(),
                                reason,
                            })?;
                            c.push(&v);
                            seen += 1;
                        }
                    }
                    if seen != wanted.len() {
                        return Err(DataError::Inconsistent {
                            path: self.path.clone(),
                            reason: format!(
                                "row {line}: {} of {} columns read",
                                seen,
                                wanted.len()
                            ),
                        });
                    }
                    self.lines.push(line);
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Features.

/// What a feature's value is a function of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    Event,
    User,
    Item,
}

/// Where a non-behaviour feature's raw value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// An events column other than the user and item columns.
    Event(usize),
    /// The user key itself.
    UserKey,
    /// The item key itself.
    ItemKey,
    /// A column of the users table.
    UserCol(usize),
    /// A column of the items table.
    ItemCol(usize),
}

impl Source {
    fn unit(self) -> Unit {
        match self {
            Source::Event(_) => Unit::Event,
            Source::UserKey | Source::UserCol(_) => Unit::User,
            Source::ItemKey | Source::ItemCol(_) => Unit::Item,
        }
    }
}

/// Tokens interned in first-seen order, then ranked (see the module docs).
#[derive(Debug, Default)]
struct Vocab {
    map: FxHashMap<Box<str>, u32>,
    tokens: Vec<Box<str>>,
    /// Interned index -> id (after [`Vocab::finish`]).
    ids: Vec<u32>,
    /// Ids - 1 -> interned index (after [`Vocab::finish`]).
    order: Vec<u32>,
}

impl Vocab {
    fn intern(&mut self, s: &str) -> u32 {
        if let Some(&i) = self.map.get(s) {
            return i;
        }
        let i = self.tokens.len() as u32;
        self.tokens.push(s.into());
        self.map.insert(s.into(), i);
        i
    }

    /// Ranks the tokens: as strings, then (stably) as numbers when all are
    /// unsigned integers; ids `1..`.
    fn finish(&mut self) {
        let t = &self.tokens;
        let mut order: Vec<u32> = (0..t.len() as u32).collect();
        order.sort_by(|&a, &b| t[a as usize].cmp(&t[b as usize]));
        if t.iter().all(|k| parse_u64(k.as_bytes()).is_some()) {
            order.sort_by_key(|&i| parse_u64(t[i as usize].as_bytes()).unwrap_or(0));
        }
        self.ids = vec![0; t.len()];
        for (rank, &i) in order.iter().enumerate() {
            self.ids[i as usize] = rank as u32 + 1;
        }
        self.order = order;
    }

    /// The token of id `id` (1-based).
    fn token(&self, id: u32) -> &str {
        &self.tokens[self.order[id as usize - 1] as usize]
    }

    fn len(&self) -> usize {
        self.tokens.len()
    }
}

/// A non-behaviour feature's values per unit (event row, user id or item id).
#[derive(Debug)]
struct Values {
    unit: Unit,
    /// Sparse / multi-hot: CSR offsets over the units.
    offs: Vec<usize>,
    /// Interned token indices, then (after the vocab is ranked) ids.
    ids: Vec<u32>,
    /// Dense: one float per unit.
    dense: Vec<f32>,
}

impl Values {
    fn ids_of(&self, k: usize) -> &[u32] {
        &self.ids[self.offs[k]..self.offs[k + 1]]
    }
}

fn split_parts<'a>(
    raw: &'a str,
    sep: &'a Option<String>,
) -> Box<dyn Iterator<Item = &'a str> + 'a> {
    match sep {
        None => Box::new(raw.split_whitespace()),
        Some(s) => Box::new(
            raw.split(s.as_str())
                .map(str::trim)
                .filter(|p| !p.is_empty()),
        ),
    }
}

fn number(raw: &str) -> Result<Option<f64>, String> {
    let t = raw.trim();
    if t.is_empty() {
        return Ok(None);
    }
    match t.parse::<f64>() {
        Ok(x) if x.is_finite() => Ok(Some(x)),
        _ => Err("not a finite number".into()),
    }
}

/// Calls `emit` with each token `t` makes of `raw` (at most `limit`).
fn tokens_of(
    t: &Transform,
    raw: &str,
    limit: usize,
    emit: &mut dyn FnMut(&str),
) -> Result<(), String> {
    match t {
        Transform::Token => {
            if !raw.trim().is_empty() {
                emit(raw);
            }
        }
        Transform::Split { sep } => split_parts(raw, sep).take(limit).for_each(emit),
        Transform::First { sep } => {
            if let Some(p) = split_parts(raw, sep).next() {
                emit(p);
            }
        }
        Transform::Prefix { chars } => {
            if !raw.trim().is_empty() {
                let end = raw.char_indices().nth(*chars).map_or(raw.len(), |(i, _)| i);
                emit(&raw[..end]);
            }
        }
        Transform::Bucket { boundaries } => {
            if let Some(x) = number(raw)? {
                let n = boundaries.iter().filter(|&&b| b <= x).count();
                emit(&(1 + n).to_string());
            }
        }
        Transform::Weekday => {
            if let Some(x) = number(raw)? {
                // 1970-01-01 was a Thursday; Monday = 1 .. Sunday = 7.
                let days = (x / 86_400.0).floor() as i64;
                emit(&((days + 3).rem_euclid(7) + 1).to_string());
            }
        }
        Transform::Hour => {
            if let Some(x) = number(raw)? {
                let hours = (x / 3_600.0).floor() as i64;
                emit(&(hours.rem_euclid(24) + 1).to_string());
            }
        }
        Transform::Float | Transform::Log1p => {
            return Err("a float transform makes no tokens".into())
        }
    }
    Ok(())
}

fn float_of(t: &Transform, raw: &str) -> Result<f32, String> {
    Ok(match number(raw)? {
        None => 0.0,
        Some(x) if *t == Transform::Log1p => x.max(0.0).ln_1p() as f32,
        Some(x) => x as f32,
    })
}

/// Refuses transforms that do not fit the feature's kind.
fn check_transform(f: &Feature) -> Result<(), DataError> {
    let t = f.transform_or_default();
    let bad = |reason: String| DataError::InvalidOption {
        field: "features.transform",
        reason: format!("feature `{}`: {reason}", f.name),
    };
    match (&t, f.kind) {
        (Transform::Float | Transform::Log1p, FeatureKind::Dense) => {}
        (_, FeatureKind::Dense) => {
            return Err(bad(format!("a dense feature needs transform float or log1p, not {t:?}")))
        }
        (Transform::Float | Transform::Log1p, _) => {
            return Err(bad(format!("transform {t:?} makes a float: declare the feature kind = \"dense\"")))
        }
        (Transform::Split { .. }, FeatureKind::Sparse) => {
            return Err(bad(
                "transform split makes several ids: declare kind = \"multi_hot\" or use transform first".into(),
            ))
        }
        _ => {}
    }
    match &t {
        Transform::Split { sep: Some(s) } | Transform::First { sep: Some(s) } if s.is_empty() => {
            Err(bad("`sep` must not be empty".into()))
        }
        Transform::Bucket { boundaries } => {
            if boundaries.iter().any(|b| !b.is_finite())
                || boundaries.windows(2).any(|w| w[0] > w[1])
            {
                Err(bad(
                    "bucket `boundaries` must be finite and ascending".into()
                ))
            } else {
                Ok(())
            }
        }
        Transform::Prefix { chars: 0 } => Err(bad("prefix `chars` must be at least 1".into())),
        _ => Ok(()),
    }
}

fn check_table_name(name: &str) -> Result<(), DataError> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(DataError::InvalidOption {
            field: "features.table",
            reason: format!(
                "table {name:?} cannot name vocab/{name}.tsv: use letters, digits, '_', '-', '.'"
            ),
        })
    }
}

fn parse_label(raw: &str) -> Option<bool> {
    match raw.trim() {
        "1" | "1.0" | "true" => Some(true),
        "0" | "0.0" | "false" => Some(false),
        _ => None,
    }
}

/// One output row.
#[derive(Debug, Clone, Copy)]
struct RowRef {
    user: u32,
    /// Position in the user's sorted events.
    pos: u32,
    /// DIN: the target is the sampled negative of this position.
    neg_target: bool,
    label: bool,
}

/// Everything a row is encoded from.
struct Rows<'a> {
    schema: &'a FeatureSchema,
    values: &'a [Option<Values>],
    /// Behaviour feature -> its aligned ad feature.
    align: Vec<Option<usize>>,
    /// The schema's layout ([`FeatureSchema::sparse`], `dense`, `pairs`).
    sparse: Vec<usize>,
    dense: Vec<usize>,
    pairs: Vec<crate::schema::AlignedPair>,
    ev_item: &'a [u32],
    /// CSR by user id - 1: the user's event rows sorted by (time, row).
    uoff: &'a [usize],
    urows: &'a [u32],
    /// Per position: number of positive events before it in the user's order.
    pbefore: &'a [u32],
    /// CSR by user id - 1: the user's positive positions.
    poff: &'a [usize],
    ppos: &'a [u32],
    neg: &'a [u32],
    dien: &'a [u32],
    max_len: usize,
    with_neg: bool,
}

fn unit_index(unit: Unit, ev: usize, user: usize, item: u32) -> usize {
    match unit {
        Unit::Event => ev,
        Unit::User => user,
        Unit::Item => item as usize,
    }
}

fn push_step(out: &mut Vec<u64>, ids: &[u32], f: &Feature) {
    if f.kind == FeatureKind::Sparse {
        out.push(ids.first().map_or(0, |&i| u64::from(i)));
    } else {
        let w = f.width();
        out.extend(ids.iter().take(w).map(|&i| u64::from(i)));
        out.extend(std::iter::repeat_n(0, w - ids.len().min(w)));
    }
}

impl Rows<'_> {
    fn fill(&self, r: RowRef, s: &mut Sample) {
        let feats = self.schema.features();
        let user = r.user as usize;
        let base = self.uoff[user - 1];
        let i = r.pos as usize;
        let ev = self.urows[base + i] as usize;
        let item = if r.neg_target {
            self.neg[base + i]
        } else {
            self.ev_item[ev]
        };
        let k = self.pbefore[base + i] as usize;
        let pp = &self.ppos[self.poff[user - 1]..self.poff[user]];
        let hist = &pp[k.saturating_sub(self.max_len)..k];

        s.label = if r.label { 1.0 } else { 0.0 };
        s.user = user as u64;
        let sparse = &self.sparse;
        s.fields.resize_with(sparse.len(), Vec::new);
        for (slot, &fi) in sparse.iter().enumerate() {
            let f = &feats[fi];
            let out = &mut s.fields[slot];
            out.clear();
            if let Some(ad) = self.align[fi] {
                let Some(vals) = self.values[ad].as_ref() else {
                    continue;
                };
                for &p in hist {
                    let pe = self.urows[base + p as usize] as usize;
                    let idx = unit_index(vals.unit, pe, user, self.ev_item[pe]);
                    push_step(out, vals.ids_of(idx), f);
                }
            } else if let Some(vals) = self.values[fi].as_ref() {
                let ids = vals.ids_of(unit_index(vals.unit, ev, user, item));
                if f.kind == FeatureKind::Sparse {
                    out.push(ids.first().map_or(0, |&x| u64::from(x)));
                } else {
                    out.extend(ids.iter().map(|&x| u64::from(x)));
                }
            }
        }
        s.dense.clear();
        for &fi in &self.dense {
            let v = self.values[fi].as_ref().map_or(0.0, |vals| {
                vals.dense[unit_index(vals.unit, ev, user, item)]
            });
            s.dense.push(v);
        }
        s.neg_fields.clear();
        if self.with_neg {
            for p in &self.pairs {
                let f = &feats[p.behaviour];
                let mut out = Vec::new();
                if let Some(vals) = self.values[p.ad].as_ref() {
                    for &q in hist {
                        let q = base + q as usize;
                        let idx = unit_index(vals.unit, self.urows[q] as usize, user, self.dien[q]);
                        push_step(&mut out, vals.ids_of(idx), f);
                    }
                }
                s.neg_fields.push(out);
            }
        }
    }

    fn write(
        &self,
        path: &Path,
        rows: &[RowRef],
        bar: &indicatif::ProgressBar,
    ) -> Result<(), DataError> {
        let mut w = AtomicFile::create(path)?;
        w.write_all(schema_format::header(self.schema, self.with_neg).as_bytes())?;
        let mut line = Vec::with_capacity(1 << 20);
        let mut s = Sample::default();
        for chunk in rows.chunks(4096) {
            line.clear();
            for &r in chunk {
                self.fill(r, &mut s);
                schema_format::encode(&mut line, &s, self.schema, self.with_neg);
            }
            w.write_all(&line)?;
            bar.inc(chunk.len() as u64);
        }
        w.commit()
    }
}

fn escape_token(t: &str) -> String {
    let mut s = String::with_capacity(t.len());
    for c in t.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '\t' => s.push_str("\\t"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            c => s.push(c),
        }
    }
    s
}

fn write_text(path: &Path, text: &str) -> Result<(), DataError> {
    let mut w = AtomicFile::create(path)?;
    w.write_all(text.as_bytes())?;
    w.commit()
}

/// Joins a side table on the events' keys: row of each key id (index 0 unused).
fn join(table: &Table, key_col: usize, keys: &Vocab) -> Result<(Vec<Option<u32>>, u64), DataError> {
    let mut rows: FxHashMap<&str, u32> = FxHashMap::default();
    for r in 0..table.rows() {
        let k = table.cell(key_col, r);
        if let Some(&first) = rows.get(k) {
            return Err(table.err(
                key_col,
                r,
                k,
                format!(
                    "duplicate key (first at line {})",
                    table.lines[first as usize]
                ),
            ));
        }
        rows.insert(k, r as u32);
    }
    let mut out = vec![None; keys.len() + 1];
    let mut missing = 0u64;
    for (id, slot) in out.iter_mut().enumerate().skip(1) {
        *slot = rows.get(keys.token(id as u32)).copied();
        missing += u64::from(slot.is_none());
    }
    Ok((out, missing))
}

/// Builds train/test sample files, vocabularies and `meta.json` from
/// tabular files (see the module docs for the protocols). `progress` draws a
/// bar on stderr.
pub fn prepare_tabular(
    schema: &FeatureSchema,
    spec: &PrepareSpec,
    progress: bool,
) -> Result<Summary, DataError> {
    let t0 = Instant::now();
    spec.validate()?;
    let protocol = spec.resolved_protocol()?;
    let out = spec.out.clone().ok_or_else(|| DataError::InvalidOption {
        field: "prepare.out",
        reason: "no output directory (set `out` in [prepare] or pass --out)".into(),
    })?;
    let feats = schema.features();
    for f in feats {
        if f.is_sparse() {
            check_table_name(f.table_name())?;
        }
    }

    let mut events = Table::open(
        "events",
        &spec.events,
        format_of(&spec.events, spec.delimiter.as_deref(), "prepare.delimiter")?,
    )?;
    let mut users = match &spec.users {
        Some(t) => Some(Table::open(
            "users",
            &t.path,
            format_of(&t.path, t.delimiter.as_deref(), "prepare.users.delimiter")?,
        )?),
        None => None,
    };
    let mut items = match &spec.items {
        Some(t) => Some(Table::open(
            "items",
            &t.path,
            format_of(&t.path, t.delimiter.as_deref(), "prepare.items.delimiter")?,
        )?),
        None => None,
    };
    let c_user = events.need(&spec.user, "user")?;
    let c_item = events.need(&spec.item, "item")?;
    let c_time = events.need(&spec.time, "time")?;
    let c_label = match (protocol, &spec.label) {
        (TabularProtocol::Labels, Some(l)) => Some(events.need(l, "label")?),
        _ => None,
    };
    let u_key = match (&users, &spec.users) {
        (Some(t), Some(s)) => Some(t.need(&s.key, "users.key")?),
        _ => None,
    };
    let i_key = match (&items, &spec.items) {
        (Some(t), Some(s)) => Some(t.need(&s.key, "items.key")?),
        _ => None,
    };

    // Where every non-behaviour feature comes from.
    let mut sources: Vec<Option<Source>> = vec![None; feats.len()];
    for (fi, f) in feats.iter().enumerate() {
        if f.is_behaviour() {
            continue;
        }
        check_transform(f)?;
        let c = f.column_name();
        let src = if let Some(k) = events.find(c) {
            if k == c_user {
                Source::UserKey
            } else if k == c_item {
                Source::ItemKey
            } else {
                Source::Event(k)
            }
        } else if let Some(k) = users.as_ref().and_then(|t| t.find(c)) {
            if Some(k) == u_key {
                Source::UserKey
            } else {
                Source::UserCol(k)
            }
        } else if let Some(k) = items.as_ref().and_then(|t| t.find(c)) {
            if Some(k) == i_key {
                Source::ItemKey
            } else {
                Source::ItemCol(k)
            }
        } else {
            let mut searched = vec![events.describe()];
            searched.extend(users.as_ref().map(Table::describe));
            searched.extend(items.as_ref().map(Table::describe));
            return Err(DataError::Inconsistent {
                path: spec.events.clone(),
                reason: format!(
                    "feature `{}`: column `{c}` is in none of: {} (set the feature's `column`, or add a users / items table)",
                    f.name,
                    searched.join("; ")
                ),
            });
        };
        sources[fi] = Some(src);
    }
    let mut align: Vec<Option<usize>> = vec![None; feats.len()];
    for p in schema.pairs() {
        let (b, a) = (&feats[p.behaviour], &feats[p.ad]);
        align[p.behaviour] = Some(p.ad);
        if b.table_name() != a.table_name() {
            return Err(DataError::InvalidOption {
                field: "features.table",
                reason: format!(
                    "feature `{}`: table `{}` differs from table `{}` of `{}`, which it is aligned with \
                     (a behaviour step holds that feature's ids)",
                    b.name,
                    b.table_name(),
                    a.table_name(),
                    a.name
                ),
            });
        }
        let unit = sources[p.ad].map(Source::unit);
        if spec.with_neg && unit != Some(Unit::Item) {
            return Err(DataError::InvalidOption {
                field: "prepare.with_neg",
                reason: format!(
                    "feature `{}` (aligned with `{}`): DIEN's negative steps need `{}` of sampled items, but its \
                     column `{}` comes from the events, not from the item column or the items table; \
                     set with_neg = false or read it from the items table",
                    b.name,
                    a.name,
                    a.name,
                    a.column_name()
                ),
            });
        }
    }
    if protocol == TabularProtocol::Din {
        for (fi, f) in feats.iter().enumerate() {
            if f.group == FeatureGroup::Ad && sources[fi].map(Source::unit) != Some(Unit::Item) {
                return Err(DataError::InvalidOption {
                    field: "prepare.protocol",
                    reason: format!(
                        "feature `{}` (group ad): protocol \"din\" samples negative target items, whose ad features \
                         must be computable per item, but column `{}` comes from the {} table, not from the item \
                         column or the items table; read it from the items table, or use protocol \"labels\"",
                        f.name,
                        f.column_name(),
                        if sources[fi].map(Source::unit) == Some(Unit::User) {
                            "users"
                        } else {
                            "events"
                        }
                    ),
                });
            }
        }
    }

    // Load the columns used.
    let mut want_ev = vec![c_user, c_item, c_time];
    want_ev.extend(c_label);
    let (mut want_u, mut want_i): (Vec<usize>, Vec<usize>) =
        (u_key.into_iter().collect(), i_key.into_iter().collect());
    for s in sources.iter().flatten() {
        match *s {
            Source::Event(k) => want_ev.push(k),
            Source::UserCol(k) => want_u.push(k),
            Source::ItemCol(k) => want_i.push(k),
            Source::UserKey | Source::ItemKey => {}
        }
    }
    events.load(&want_ev)?;
    if let Some(t) = users.as_mut() {
        t.load(&want_u)?;
    }
    if let Some(t) = items.as_mut() {
        t.load(&want_i)?;
    }
    let n_ev = events.rows();
    if n_ev == 0 {
        return Err(DataError::Inconsistent {
            path: spec.events.clone(),
            reason: "no events".into(),
        });
    }

    // Events: keys, times, labels.
    let mut user_keys = Vocab::default();
    let mut item_keys = Vocab::default();
    let mut ev_user = Vec::with_capacity(n_ev);
    let mut ev_item = Vec::with_capacity(n_ev);
    let mut ev_time = Vec::with_capacity(n_ev);
    let mut ev_label = Vec::with_capacity(n_ev);
    for r in 0..n_ev {
        let u = events.cell(c_user, r);
        if u.is_empty() {
            return Err(events.err(c_user, r, u, "empty user"));
        }
        let i = events.cell(c_item, r);
        if i.is_empty() {
            return Err(events.err(c_item, r, i, "empty item"));
        }
        ev_user.push(user_keys.intern(u));
        ev_item.push(item_keys.intern(i));
        let t = events.cell(c_time, r);
        match number(t) {
            Ok(Some(x)) => ev_time.push(x),
            Ok(None) => return Err(events.err(c_time, r, t, "empty time")),
            Err(e) => {
                return Err(events.err(
                    c_time,
                    r,
                    t,
                    format!("{e} (the time column holds numbers, e.g. Unix seconds)"),
                ))
            }
        }
        ev_label.push(match c_label {
            Some(c) => {
                let v = events.cell(c, r);
                parse_label(v).ok_or_else(|| events.err(c, r, v, "label must be 0 or 1"))?
            }
            None => true,
        });
    }
    user_keys.finish();
    item_keys.finish();
    for u in ev_user.iter_mut() {
        *u = user_keys.ids[*u as usize];
    }
    for i in ev_item.iter_mut() {
        *i = item_keys.ids[*i as usize];
    }
    let (n_users, n_items) = (user_keys.len(), item_keys.len());
    // The first event of every user / item (error context of key features).
    let mut user_first = vec![0usize; n_users + 1];
    let mut item_first = vec![0usize; n_items + 1];
    for r in (0..n_ev).rev() {
        user_first[ev_user[r] as usize] = r;
        item_first[ev_item[r] as usize] = r;
    }
    let (user_row, users_missing) = match (&users, u_key) {
        (Some(t), Some(k)) => join(t, k, &user_keys)?,
        _ => (vec![None; n_users + 1], 0),
    };
    let (item_row, items_missing) = match (&items, i_key) {
        (Some(t), Some(k)) => join(t, k, &item_keys)?,
        _ => (vec![None; n_items + 1], 0),
    };

    // Feature values and vocabularies.
    let tables = schema.tables();
    let table_idx = |f: &Feature| {
        tables
            .iter()
            .position(|(t, _)| t == f.table_name())
            .unwrap_or(0)
    };
    let mut vocabs: Vec<Vocab> = tables.iter().map(|_| Vocab::default()).collect();
    let mut values: Vec<Option<Values>> = Vec::with_capacity(feats.len());
    for (fi, f) in feats.iter().enumerate() {
        let Some(src) = sources[fi] else {
            values.push(None);
            continue;
        };
        let unit = src.unit();
        let n_units = match unit {
            Unit::Event => n_ev,
            Unit::User => n_users + 1,
            Unit::Item => n_items + 1,
        };
        let transform = f.transform_or_default();
        let mut v = Values {
            unit,
            offs: Vec::with_capacity(if f.is_sparse() { n_units + 1 } else { 0 }),
            ids: Vec::new(),
            dense: Vec::new(),
        };
        v.offs.push(0);
        let vocab = &mut vocabs[table_idx(f)];
        for k in 0..n_units {
            // (raw value, its table, column and row) of unit k.
            let cell: Option<(&str, &Table, usize, usize)> = match src {
                Source::Event(c) => Some((events.cell(c, k), &events, c, k)),
                Source::UserKey => {
                    (k > 0).then(|| (user_keys.token(k as u32), &events, c_user, user_first[k]))
                }
                Source::ItemKey => {
                    (k > 0).then(|| (item_keys.token(k as u32), &events, c_item, item_first[k]))
                }
                Source::UserCol(c) => match (&users, user_row.get(k).copied().flatten()) {
                    (Some(t), Some(r)) => Some((t.cell(c, r as usize), t, c, r as usize)),
                    _ => None,
                },
                Source::ItemCol(c) => match (&items, item_row.get(k).copied().flatten()) {
                    (Some(t), Some(r)) => Some((t.cell(c, r as usize), t, c, r as usize)),
                    _ => None,
                },
            };
            let fail = |reason: String| match cell {
                Some((raw, t, c, r)) => t.err(c, r, raw, format!("feature `{}`: {reason}", f.name)),
                None => DataError::Inconsistent {
                    path: spec.events.clone(),
                    reason,
                },
            };
            if f.is_sparse() {
                if let Some((raw, ..)) = cell {
                    let limit = if f.kind == FeatureKind::Sparse {
                        1
                    } else {
                        f.width()
                    };
                    let ids = &mut v.ids;
                    tokens_of(&transform, raw, limit, &mut |tok| {
                        ids.push(vocab.intern(tok))
                    })
                    .map_err(fail)?;
                }
                v.offs.push(v.ids.len());
            } else {
                let x = match cell {
                    Some((raw, ..)) => float_of(&transform, raw).map_err(fail)?,
                    None => 0.0,
                };
                v.dense.push(x);
            }
        }
        values.push(Some(v));
    }
    for vocab in vocabs.iter_mut() {
        vocab.finish();
    }
    for (fi, v) in values.iter_mut().enumerate() {
        if let Some(v) = v.as_mut() {
            let ids = &vocabs[table_idx(&feats[fi])].ids;
            for x in v.ids.iter_mut() {
                *x = ids[*x as usize];
            }
        }
    }

    // Each user's events in time order (ties: file order).
    let mut uoff = vec![0usize; n_users + 1];
    for &u in &ev_user {
        uoff[u as usize] += 1;
    }
    for u in 1..=n_users {
        uoff[u] += uoff[u - 1];
    }
    let mut urows = vec![0u32; n_ev];
    let mut fill = uoff.clone();
    for (r, &u) in ev_user.iter().enumerate() {
        let slot = &mut fill[u as usize - 1];
        urows[*slot] = r as u32;
        *slot += 1;
    }
    for u in 0..n_users {
        urows[uoff[u]..uoff[u + 1]].sort_by(|&a, &b| {
            ev_time[a as usize]
                .total_cmp(&ev_time[b as usize])
                .then(a.cmp(&b))
        });
    }
    let mut pbefore = vec![0u32; n_ev];
    let mut poff = vec![0usize; n_users + 1];
    let mut ppos = Vec::new();
    for u in 0..n_users {
        let rows = &urows[uoff[u]..uoff[u + 1]];
        for (i, &r) in rows.iter().enumerate() {
            pbefore[uoff[u] + i] = (ppos.len() - poff[u]) as u32;
            if ev_label[r as usize] {
                ppos.push(i as u32);
            }
        }
        poff[u + 1] = ppos.len();
    }

    // Negatives (the order of crate::prepare's DIN protocol).
    let draw_targets = protocol == TabularProtocol::Din;
    let mut neg = Vec::new();
    let mut dien = Vec::new();
    if draw_targets || spec.with_neg {
        let mut mine = vec![false; n_items + 1];
        for u in 0..n_users {
            let rows = &urows[uoff[u]..uoff[u + 1]];
            let mut distinct = 0usize;
            for &r in rows {
                let it = ev_item[r as usize] as usize;
                if !mine[it] {
                    mine[it] = true;
                    distinct += 1;
                }
            }
            if distinct >= n_items {
                return Err(DataError::Inconsistent {
                    path: spec.events.clone(),
                    reason: format!(
                        "user {:?} has every item: no negative can be drawn",
                        user_keys.token(u as u32 + 1)
                    ),
                });
            }
            let mut rng = SplitMix64::new(derive_seed(spec.seed, u as u64 + 1));
            let mut draw = || loop {
                let x = 1 + rng.below(n_items as u64);
                if !mine[x as usize] {
                    return x as u32;
                }
            };
            if draw_targets {
                for _ in rows {
                    neg.push(draw());
                }
            }
            if spec.with_neg {
                for _ in rows {
                    dien.push(draw());
                }
            }
            for &r in rows {
                mine[ev_item[r as usize] as usize] = false;
            }
        }
    }

    // Rows and the split.
    let mut train = Vec::new();
    let mut test = Vec::new();
    for u in 1..=n_users {
        let n = uoff[u] - uoff[u - 1];
        match protocol {
            TabularProtocol::Din => {
                for i in 1..n {
                    let out = if i + 1 < n { &mut train } else { &mut test };
                    for positive in [true, false] {
                        out.push(RowRef {
                            user: u as u32,
                            pos: i as u32,
                            neg_target: !positive,
                            label: positive,
                        });
                    }
                }
            }
            TabularProtocol::Labels => {
                for i in 0..n {
                    let out = if i + 1 < n { &mut train } else { &mut test };
                    out.push(RowRef {
                        user: u as u32,
                        pos: i as u32,
                        neg_target: false,
                        label: ev_label[urows[uoff[u - 1] + i] as usize],
                    });
                }
            }
        }
    }
    SplitMix64::new(derive_seed(spec.seed, SHUFFLE_KEY)).shuffle(&mut train);

    // Write.
    let vocab_dir = out.join("vocab");
    std::fs::create_dir_all(&vocab_dir).map_err(|e| DataError::io(&vocab_dir, e))?;
    let rows = Rows {
        schema,
        values: &values,
        align,
        sparse: schema.sparse(),
        dense: schema.dense(),
        pairs: schema.pairs(),
        ev_item: &ev_item,
        uoff: &uoff,
        urows: &urows,
        pbefore: &pbefore,
        poff: &poff,
        ppos: &ppos,
        neg: &neg,
        dien: &dien,
        max_len: spec.max_len,
        with_neg: spec.with_neg,
    };
    let bar = rows_bar("prepare", Some((train.len() + test.len()) as u64), progress);
    rows.write(&out.join("train.txt"), &train, &bar)?;
    rows.write(&out.join("test.txt"), &test, &bar)?;
    bar.finish_and_clear();
    let mut vocab_sizes = BTreeMap::new();
    for ((table, _), vocab) in tables.iter().zip(&vocabs) {
        let mut text = String::from("token\tid\n");
        for id in 1..=vocab.len() as u32 {
            text.push_str(&escape_token(vocab.token(id)));
            text.push('\t');
            text.push_str(&id.to_string());
            text.push('\n');
        }
        write_text(&vocab_dir.join(format!("{table}.tsv")), &text)?;
        vocab_sizes.insert(table.clone(), vocab.len() as u64 + 1);
    }
    let mut sources_meta = Vec::new();
    for t in std::iter::once(&events)
        .chain(users.as_ref())
        .chain(items.as_ref())
    {
        sources_meta.push(SourceFile {
            role: t.role.to_string(),
            path: t.path.clone(),
            sha256: t.sha256.clone(),
        });
    }
    let meta = TabularMeta {
        format: FORMAT_NAME.to_string(),
        protocol,
        seed: spec.seed,
        max_len: spec.max_len,
        with_neg: spec.with_neg,
        train_rows: train.len() as u64,
        test_rows: test.len() as u64,
        events: n_ev as u64,
        n_users: n_users as u64,
        n_items: n_items as u64,
        vocab: vocab_sizes,
        features: feats.iter().map(|f| f.name.clone()).collect(),
        sources: sources_meta,
        users_without_row: users_missing,
        items_without_row: items_missing,
    };
    let meta_path = out.join("meta.json");
    let json = serde_json::to_string_pretty(&meta).map_err(|source| DataError::Json {
        path: meta_path.clone(),
        source,
    })?;
    write_text(&meta_path, &(json + "\n"))?;
    Ok(Summary {
        meta,
        out,
        elapsed: t0.elapsed(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::prepare::{prepare, PrepareOptions};
    use crate::schema_format::Layout;

    const EVENTS: &str = "uid:token,iid,ts,clicked,pos\n\
        u1,i1,100,1,3\n\
        u1,i3,300,1,2\n\
        u1,i2,200,0,1\n\
        \n\
        u2,i2,50,1,1\n\
        u2,i4,60,1,4\n\
        u3,i1,10,0,2\n\
        u3,i3,20,1,1\n";
    // u3 has no row: its user features are missing (id 0).
    const USERS: &str = "user_id,age,gender,zip\nu1,25,F,94043\nu2,40,M,10001\n";
    const ITEMS: &str = "item_id,title,genres,price\r\n\
        i1,\"Heat, The\",Drama|Comedy,9.5\r\n\
        i2,Up,Action,3\r\n\
        i3,\"Say \"\"Hi\"\"\",Comedy,\r\n\
        i4,Alien,Drama|Action|Horror,1\r\n";

    fn sparse(name: &str, group: &str, extra: &str) -> String {
        format!("[[features]]\nname = \"{name}\"\nkind = \"sparse\"\ngroup = \"{group}\"\ndim = 4\n{extra}\n")
    }

    fn full_schema(extra: &str) -> FeatureSchema {
        let mut t = String::new();
        t += &sparse("user", "user", "column = \"uid\"");
        t += &sparse("gender", "user", "");
        t += &sparse(
            "age",
            "user",
            "transform = { kind = \"bucket\", boundaries = [30] }",
        );
        t += &sparse(
            "zip",
            "user",
            "transform = { kind = \"prefix\", chars = 2 }",
        );
        t += &sparse("item", "ad", "column = \"iid\"");
        t += "[[features]]\nname = \"genres\"\nkind = \"multi_hot\"\nmax_len = 2\ngroup = \"ad\"\n\
              table = \"genre\"\ndim = 4\ntransform = { kind = \"split\", sep = \"|\" }\n";
        t += &sparse(
            "hist_item",
            "behaviour",
            "table = \"item\"\nalign = \"item\"",
        );
        t += "[[features]]\nname = \"hist_genres\"\nkind = \"multi_hot\"\nmax_len = 2\npooling = \"mean\"\n\
              group = \"behaviour\"\ntable = \"genre\"\ndim = 4\nalign = \"genres\"\n";
        t += &sparse("pos", "context", "");
        t += "[[features]]\nname = \"price\"\nkind = \"dense\"\ngroup = \"ad\"\n";
        t += &sparse(
            "hour",
            "context",
            "column = \"ts\"\ntransform = { kind = \"hour\" }",
        );
        t += extra;
        FeatureSchema::from_toml(&t).unwrap()
    }

    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new(events: &str, users: &str, items: &str) -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("events.csv"), events).unwrap();
            std::fs::write(dir.path().join("users.csv"), users).unwrap();
            std::fs::write(dir.path().join("items.csv"), items).unwrap();
            Fixture { dir }
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        fn spec(&self, label: bool) -> PrepareSpec {
            PrepareSpec {
                events: self.path("events.csv"),
                delimiter: None,
                user: "uid".into(),
                item: "iid".into(),
                time: "ts".into(),
                label: label.then(|| "clicked".to_string()),
                protocol: None,
                users: Some(SideTable {
                    path: self.path("users.csv"),
                    key: "user_id".into(),
                    delimiter: None,
                }),
                items: Some(SideTable {
                    path: self.path("items.csv"),
                    key: "item_id".into(),
                    delimiter: None,
                }),
                out: Some(self.path("out")),
                max_len: 100,
                seed: 7,
                with_neg: false,
            }
        }
    }

    /// The data lines of a sample file (the header checked and dropped).
    fn lines(path: &Path, schema: &FeatureSchema, with_neg: bool) -> Vec<String> {
        let text = std::fs::read_to_string(path).unwrap();
        let mut it = text.lines();
        assert_eq!(
            format!("{}\n", it.next().unwrap()),
            schema_format::header(schema, with_neg)
        );
        it.map(str::to_string).collect()
    }

    fn sorted(mut v: Vec<String>) -> Vec<String> {
        v.sort();
        v
    }

    #[test]
    fn labels_protocol_vocab_and_histories() {
        let fx = Fixture::new(EVENTS, USERS, ITEMS);
        let schema = full_schema("");
        let sum = prepare_tabular(&schema, &fx.spec(true), false).unwrap();
        let m = &sum.meta;
        assert_eq!(m.protocol, TabularProtocol::Labels);
        assert_eq!(
            (m.train_rows, m.test_rows, m.events, m.n_users, m.n_items),
            (4, 3, 7, 3, 4)
        );
        assert_eq!((m.users_without_row, m.items_without_row), (1, 0));
        let sizes: Vec<(&str, u64)> = m.vocab.iter().map(|(t, n)| (t.as_str(), *n)).collect();
        assert_eq!(
            sizes,
            vec![
                ("age", 3),
                ("gender", 3),
                ("genre", 4),
                ("hour", 2),
                ("item", 5),
                ("pos", 5),
                ("user", 4),
                ("zip", 3)
            ]
        );
        let vocab =
            |t: &str| std::fs::read_to_string(fx.path(&format!("out/vocab/{t}.tsv"))).unwrap();
        // Only the first max_len = 2 genres count: no Horror.
        assert_eq!(
            vocab("genre"),
            "token\tid\nAction\t1\nComedy\t2\nDrama\t3\n"
        );
        // Numeric order when all tokens are unsigned integers.
        assert_eq!(vocab("zip"), "token\tid\n10\t1\n94\t2\n");
        assert_eq!(vocab("item"), "token\tid\ni1\t1\ni2\t2\ni3\t3\ni4\t4\n");
        // Columns: label user | user gender age zip item genres hist_item
        // hist_genres pos price hour. u1's second event (i2) is labelled 0:
        // not in the later history; u3 has no users row.
        assert_eq!(
            lines(&fx.path("out/test.txt"), &schema, false),
            vec![
                "1\t1\t1\t1\t1\t2\t3\t2\t1\t3\x032\t2\t0\t1",
                "1\t2\t2\t2\t2\t1\t4\t3\x021\t2\t1\t4\t1\t1",
                "1\t3\t3\t0\t0\t0\t3\t2\t\t\t1\t0\t1",
            ]
        );
        assert_eq!(
            sorted(lines(&fx.path("out/train.txt"), &schema, false)),
            sorted(vec![
                "1\t1\t1\t1\t1\t2\t1\t3\x022\t\t\t3\t9.5\t1".into(),
                "0\t1\t1\t1\t1\t2\t2\t1\t1\t3\x032\t1\t3\t1".into(),
                "1\t2\t2\t2\t2\t1\t2\t1\t\t\t1\t3\t1".into(),
                "0\t3\t3\t0\t0\t0\t1\t3\x022\t\t\t2\t9.5\t1".into(),
            ])
        );
        // The files read back with the schema (and with a subset of it).
        let text = std::fs::read(fx.path("out/test.txt")).unwrap();
        let mut it = text.split(|&c| c == b'\n');
        let head = it.next().unwrap();
        let sub = schema
            .subset(&["item", "hist_item", "genres", "hist_genres"])
            .unwrap();
        for s in [&schema, &sub] {
            let layout = Layout::from_header(Path::new("test.txt"), head, s, true).unwrap();
            let mut sample = Sample::default();
            let first = it.clone().next().unwrap();
            layout
                .parse_into(s, Path::new("test.txt"), 2, first, &mut sample)
                .unwrap();
        }
        assert_eq!(TabularMeta::load(&fx.path("out")).unwrap(), sum.meta);
        assert!(sum.to_string().contains("4 train, 3 test rows"), "{sum}");
    }

    #[test]
    fn din_protocol_negatives_and_context() {
        let fx = Fixture::new(EVENTS, USERS, ITEMS);
        let schema = full_schema("");
        let mut spec = fx.spec(false);
        spec.with_neg = true;
        let sum = prepare_tabular(&schema, &spec, false).unwrap();
        assert_eq!((sum.meta.train_rows, sum.meta.test_rows), (2, 6));
        let items_of = |user: &str| -> Vec<u64> {
            match user {
                "1" => vec![1, 2, 3],
                "2" => vec![2, 4],
                _ => vec![1, 3],
            }
        };
        let genres = ["", "3\x022", "1", "2", "3\x021"];
        let test = lines(&fx.path("out/test.txt"), &schema, true);
        let train = lines(&fx.path("out/train.txt"), &schema, true);
        for l in test.iter().chain(&train) {
            let c: Vec<&str> = l.split('\t').collect();
            let mine = items_of(c[1]);
            let item: u64 = c[6].parse().unwrap();
            assert_eq!(mine.contains(&item), c[0] == "1", "{l:?}");
            assert_eq!(c[7], genres[item as usize], "{l:?}");
            let negs: Vec<u64> = c[13].split('\x02').map(|x| x.parse().unwrap()).collect();
            assert!(negs.iter().all(|x| !mine.contains(x)), "{l:?}");
            // Steps joined by 0x02, a step's ids by 0x03.
            let neg_genres: Vec<String> = negs
                .iter()
                .map(|&x| genres[x as usize].replace('\x02', "\x03"))
                .collect();
            assert_eq!(c[14], neg_genres.join("\x02"), "{l:?}");
        }
        // Test rows come in pairs (positive, negative) sharing user and
        // context features; u1 owns i1..i3, so its negatives are all i4.
        for pair in test.chunks(2) {
            let (p, n): (Vec<&str>, Vec<&str>) =
                (pair[0].split('\t').collect(), pair[1].split('\t').collect());
            for k in [1, 2, 3, 4, 5, 8, 9, 10, 12, 13, 14] {
                assert_eq!(p[k], n[k], "column {k}: {pair:?}");
            }
        }
        assert!(
            test[1].starts_with("0\t1\t1\t1\t1\t2\t4\t3\x021\t1\x022\t3\x032\x021\t"),
            "{:?}",
            test[1]
        );
    }

    #[test]
    fn neg_columns_of_multi_hot_steps() {
        // One step of hist_genres per history step, each its ids joined by 0x03.
        let fx = Fixture::new(EVENTS, USERS, ITEMS);
        let schema = full_schema("");
        let mut spec = fx.spec(true);
        spec.with_neg = true;
        prepare_tabular(&schema, &spec, false).unwrap();
        let test = lines(&fx.path("out/test.txt"), &schema, true);
        // u1's test row: history [i1]; its negative is i4 (the only item not its own).
        assert_eq!(
            test[0],
            "1\t1\t1\t1\t1\t2\t3\t2\t1\t3\x032\t2\t0\t1\t4\t3\x031"
        );
    }

    fn err_of(schema: &FeatureSchema, spec: &PrepareSpec) -> String {
        prepare_tabular(schema, spec, false)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn errors_name_feature_column_and_file() {
        let fx = Fixture::new(EVENTS, USERS, ITEMS);
        let spec = fx.spec(true);
        let e = err_of(&full_schema(&sparse("color", "ad", "")), &spec);
        for want in [
            "feature `color`",
            "column `color`",
            "events.csv",
            "users.csv",
            "items.csv",
        ] {
            assert!(e.contains(want), "{want}: {e}");
        }
        // A value the transform cannot read: file, line, column, feature.
        let fx2 = Fixture::new(EVENTS, &USERS.replace("u2,40", "u2,forty"), ITEMS);
        match prepare_tabular(&full_schema(""), &fx2.spec(true), false) {
            Err(DataError::Malformed {
                path,
                line,
                column,
                reason,
                ..
            }) => {
                assert!(path.ends_with("users.csv"));
                assert_eq!((line, column.as_str()), (3, "age"));
                assert!(reason.contains("feature `age`"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let fx3 = Fixture::new(&EVENTS.replace("u2,i4,60", "u2,i4,sixty"), USERS, ITEMS);
        let e = err_of(&full_schema(""), &fx3.spec(true));
        assert!(e.contains("events.csv:7: column ts"), "{e}");
        let fx4 = Fixture::new(
            &EVENTS.replace("u3,i3,20,1", "u3,i3,20,maybe"),
            USERS,
            ITEMS,
        );
        let e = err_of(&full_schema(""), &fx4.spec(true));
        assert!(
            e.contains("events.csv:9: column clicked") && e.contains("0 or 1"),
            "{e}"
        );
        // Duplicate side-table keys.
        let fx5 = Fixture::new(EVENTS, &format!("{USERS}u1,30,F,1\n"), ITEMS);
        let e = err_of(&full_schema(""), &fx5.spec(true));
        assert!(
            e.contains("users.csv:4: column user_id") && e.contains("duplicate key"),
            "{e}"
        );
        // A [prepare] column that is not there.
        let mut bad = fx.spec(true);
        bad.time = "when".into();
        let e = err_of(&full_schema(""), &bad);
        assert!(
            e.contains("time = \"when\"") && e.contains("events.csv"),
            "{e}"
        );
        // Missing output directory, unknown extension.
        let mut bad = fx.spec(true);
        bad.out = None;
        assert!(err_of(&full_schema(""), &bad).contains("prepare.out"));
        let mut bad = fx.spec(true);
        bad.events = fx.path("events.dat");
        assert!(err_of(&full_schema(""), &bad).contains("extension"));
    }

    #[test]
    fn din_and_neg_refuse_event_ad_features() {
        let fx = Fixture::new(EVENTS, USERS, ITEMS);
        // `slot` (the event's position column) as an ad feature.
        let slot = sparse("slot", "ad", "column = \"pos\"");
        let e = err_of(&full_schema(&slot), &fx.spec(false));
        assert!(
            e.contains("feature `slot`") && e.contains("protocol \"din\"") && e.contains("`pos`"),
            "{e}"
        );
        // Fine under "labels" without negatives ...
        let hist = format!(
            "{slot}{}",
            sparse(
                "hist_slot",
                "behaviour",
                "table = \"slot\"\nalign = \"slot\""
            )
        );
        prepare_tabular(&full_schema(&hist), &fx.spec(true), false).unwrap();
        // ... but not with DIEN negatives.
        let mut spec = fx.spec(true);
        spec.with_neg = true;
        let e = err_of(&full_schema(&hist), &spec);
        assert!(
            e.contains("feature `hist_slot`") && e.contains("with_neg"),
            "{e}"
        );
        // Transforms that do not fit the kind.
        let e = err_of(
            &full_schema(&sparse(
                "g2",
                "ad",
                "column = \"genres\"\ntransform = { kind = \"split\" }",
            )),
            &fx.spec(true),
        );
        assert!(e.contains("feature `g2`") && e.contains("multi_hot"), "{e}");
        // A behaviour feature on another table than its ad feature.
        let t = full_schema("")
            .features()
            .iter()
            .cloned()
            .map(|mut f| {
                if f.name == "hist_item" || f.name == "item" {
                    f.table = Some(if f.name == "item" {
                        "a".into()
                    } else {
                        "b".into()
                    });
                }
                f
            })
            .collect();
        let e = err_of(&FeatureSchema::new(t).unwrap(), &fx.spec(true));
        assert!(
            e.contains("feature `hist_item`") && e.contains("table `b`"),
            "{e}"
        );
    }

    #[test]
    fn spec_parsing_defaults_and_conflicts() {
        let text = "[prepare]\nevents = \"e.csv\"\nuser = \"u\"\nitem = \"i\"\ntime = \"t\"\n";
        #[derive(Deserialize)]
        struct J {
            prepare: PrepareSpec,
        }
        let s = toml::from_str::<J>(text).unwrap().prepare;
        assert_eq!((s.max_len, s.seed, s.with_neg), (100, 1234, true));
        assert_eq!(s.resolved_protocol().unwrap(), TabularProtocol::Din);
        let e = toml::from_str::<J>(&format!("{text}maxlen = 3\n"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("maxlen"), "{e}");
        let mut l = s.clone();
        l.label = Some("y".into());
        assert_eq!(l.resolved_protocol().unwrap(), TabularProtocol::Labels);
        l.protocol = Some(TabularProtocol::Din);
        assert!(l.validate().unwrap_err().to_string().contains("protocol"));
        let mut l = s;
        l.protocol = Some(TabularProtocol::Labels);
        assert!(l.validate().unwrap_err().to_string().contains("label"));
    }

    #[test]
    fn transforms() {
        let toks = |t: &Transform, raw: &str, limit: usize| {
            let mut v = Vec::new();
            tokens_of(t, raw, limit, &mut |s| v.push(s.to_string())).map(|_| v)
        };
        // 2024-01-01 00:30 UTC was a Monday.
        assert_eq!(
            toks(&Transform::Weekday, "1704069000", 1).unwrap(),
            vec!["1"]
        );
        assert_eq!(toks(&Transform::Hour, "1704069000", 1).unwrap(), vec!["1"]);
        assert_eq!(
            toks(&Transform::Hour, "1704069000.0", 1).unwrap(),
            vec!["1"]
        );
        assert_eq!(toks(&Transform::Weekday, "0", 1).unwrap(), vec!["4"]);
        assert_eq!(toks(&Transform::Hour, "86399", 1).unwrap(), vec!["24"]);
        let b = Transform::Bucket {
            boundaries: vec![18.0, 25.0],
        };
        assert_eq!(toks(&b, "18", 1).unwrap(), vec!["2"]);
        assert_eq!(toks(&b, "7", 1).unwrap(), vec!["1"]);
        assert!(toks(&b, "", 1).unwrap().is_empty());
        assert!(toks(&b, "x", 1).is_err());
        assert_eq!(
            toks(&Transform::Split { sep: None }, " a  b c ", 2).unwrap(),
            vec!["a", "b"]
        );
        assert_eq!(
            toks(
                &Transform::First {
                    sep: Some("|".into())
                },
                "|x|y",
                1
            )
            .unwrap(),
            vec!["x"]
        );
        assert_eq!(
            toks(&Transform::Prefix { chars: 2 }, "é9x", 1).unwrap(),
            vec!["é9"]
        );
        assert_eq!(float_of(&Transform::Log1p, "-3").unwrap(), 0.0);
        assert_eq!(float_of(&Transform::Float, "").unwrap(), 0.0);
        assert_eq!(escape_token("a\tb\\"), "a\\tb\\\\");
    }

    fn write_parquet(path: &Path) {
        use parquet::basic::Compression;
        use parquet::data_type::{ByteArray, ByteArrayType, Int32Type, Int64Type};
        use parquet::file::properties::WriterProperties;
        use parquet::file::writer::SerializedFileWriter;
        use parquet::schema::parser::parse_message_type;
        use std::sync::Arc;

        let rows: Vec<Vec<&str>> = EVENTS
            .lines()
            .skip(1)
            .filter(|l| !l.is_empty())
            .map(|l| l.split(',').collect())
            .collect();
        let schema = Arc::new(
            parse_message_type(
                "message events { REQUIRED BYTE_ARRAY uid (UTF8); REQUIRED BYTE_ARRAY iid (UTF8); \
                 REQUIRED INT64 ts; REQUIRED INT32 clicked; REQUIRED INT64 pos; }",
            )
            .unwrap(),
        );
        let props = Arc::new(
            WriterProperties::builder()
                .set_compression(Compression::SNAPPY)
                .build(),
        );
        let mut w = SerializedFileWriter::new(File::create(path).unwrap(), schema, props).unwrap();
        let mut rg = w.next_row_group().unwrap();
        for k in 0..5 {
            let mut col = rg.next_column().unwrap().unwrap();
            match k {
                0 | 1 => {
                    let v: Vec<ByteArray> = rows.iter().map(|r| ByteArray::from(r[k])).collect();
                    col.typed::<ByteArrayType>()
                        .write_batch(&v, None, None)
                        .unwrap();
                }
                3 => {
                    let v: Vec<i32> = rows.iter().map(|r| r[k].parse().unwrap()).collect();
                    col.typed::<Int32Type>()
                        .write_batch(&v, None, None)
                        .unwrap();
                }
                _ => {
                    let v: Vec<i64> = rows.iter().map(|r| r[k].parse().unwrap()).collect();
                    col.typed::<Int64Type>()
                        .write_batch(&v, None, None)
                        .unwrap();
                }
            }
            col.close().unwrap();
        }
        rg.close().unwrap();
        w.close().unwrap();
    }

    #[test]
    fn parquet_events_equal_csv_events() {
        let fx = Fixture::new(EVENTS, USERS, ITEMS);
        let schema = full_schema("");
        let mut spec = fx.spec(true);
        spec.with_neg = true;
        prepare_tabular(&schema, &spec, false).unwrap();
        write_parquet(&fx.path("events.parquet"));
        spec.events = fx.path("events.parquet");
        spec.out = Some(fx.path("out-pq"));
        let sum = prepare_tabular(&schema, &spec, false).unwrap();
        assert_eq!(sum.meta.events, 7);
        for f in [
            "train.txt",
            "test.txt",
            "vocab/item.tsv",
            "vocab/genre.tsv",
            "vocab/pos.tsv",
        ] {
            assert_eq!(
                std::fs::read(fx.path("out").join(f)).unwrap(),
                std::fs::read(fx.path("out-pq").join(f)).unwrap(),
                "{f}"
            );
        }
        let e = prepare_tabular(
            &schema,
            &PrepareSpec {
                events: fx.path("users.csv").with_extension("parquet"),
                ..spec.clone()
            },
            false,
        );
        assert!(e.is_err());
        std::fs::write(fx.path("bad.parquet"), b"not parquet").unwrap();
        let e = prepare_tabular(
            &schema,
            &PrepareSpec {
                events: fx.path("bad.parquet"),
                ..spec
            },
            false,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("bad.parquet") && e.to_string().contains("Parquet"),
            "{e}"
        );
    }

    fn workspace() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    /// Reports a skip for lack of ML-100k (a failure when `EMBER_REQUIRE`
    /// names `data` or `all`), as integration-tests' `skip` does.
    pub(crate) fn skip_without_data(test: &str) {
        let line = format!("SKIPPED: {test}: data/ml-100k not fetched (scripts/fetch-ml100k.sh)");
        let req = std::env::var("EMBER_REQUIRE").unwrap_or_default();
        if req
            .split(',')
            .map(str::trim)
            .any(|x| x == "data" || x == "all")
        {
            panic!("{line} -- but EMBER_REQUIRE requires it");
        }
        eprintln!("{line}");
        let file = std::env::var_os("EMBER_SKIPS_FILE")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace().join("target/ember-skips.txt"));
        if let Some(d) = file.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&file)
        {
            use std::io::Write;
            let _ = writeln!(f, "{line}");
        }
    }

    const IDS: &str = r#"
[[features]]
name = "user"
kind = "sparse"
group = "user"
dim = 18
column = "user_id"
[[features]]
name = "movie"
kind = "sparse"
group = "ad"
table = "item"
dim = 18
column = "item_id"
[[features]]
name = "cat"
kind = "sparse"
group = "ad"
dim = 18
column = "class"
transform = { kind = "first" }
[[features]]
name = "hist_movie"
kind = "sparse"
group = "behaviour"
table = "item"
dim = 18
align = "movie"
[[features]]
name = "hist_cat"
kind = "sparse"
group = "behaviour"
table = "cat"
dim = 18
align = "cat"
"#;

    /// The DIN protocol reproduces `crate::prepare` row for row on ML-100k.
    #[test]
    fn ml100k_din_rows_equal_legacy_prepare() {
        let raw = workspace().join("data/ml-100k");
        if !raw.join("ml-100k.inter").exists() || !raw.join("ml-100k.item").exists() {
            skip_without_data("tabular::tests::ml100k_din_rows_equal_legacy_prepare");
            return;
        }
        let legacy = tempfile::tempdir().unwrap();
        prepare(&PrepareOptions {
            raw_dir: raw.clone(),
            out_dir: legacy.path().to_path_buf(),
            ..PrepareOptions::default()
        })
        .unwrap();
        let out = tempfile::tempdir().unwrap();
        let schema = FeatureSchema::from_toml(IDS).unwrap();
        let spec = PrepareSpec {
            events: raw.join("ml-100k.inter"),
            delimiter: None,
            user: "user_id".into(),
            item: "item_id".into(),
            time: "timestamp".into(),
            label: None,
            protocol: Some(TabularProtocol::Din),
            users: None,
            items: Some(SideTable {
                path: raw.join("ml-100k.item"),
                key: "item_id".into(),
                delimiter: None,
            }),
            out: Some(out.path().to_path_buf()),
            max_len: 100,
            seed: 1234,
            with_neg: true,
        };
        let sum = prepare_tabular(&schema, &spec, false).unwrap();
        assert_eq!((sum.meta.train_rows, sum.meta.test_rows), (196_228, 1_886));
        assert_eq!(sum.meta.vocab["item"], 1683);
        assert_eq!(sum.meta.vocab["cat"], 20);
        assert_eq!(sum.meta.vocab["user"], 944);
        for name in ["train.txt", "test.txt"] {
            let want = std::fs::read_to_string(legacy.path().join(name)).unwrap();
            let got = lines(&out.path().join(name), &schema, true);
            let want: Vec<&str> = want.lines().collect();
            assert_eq!(got.len(), want.len(), "{name}");
            for (k, (g, w)) in got.iter().zip(&want).enumerate() {
                // label user | user movie cat hist_movie hist_cat neg:hist_movie neg:hist_cat
                let mut c: Vec<&str> = g.split('\t').collect();
                assert_eq!(
                    c[1], c[2],
                    "{name} row {k}: the user feature is the user id"
                );
                c.remove(2);
                assert_eq!(&c.join("\t"), w, "{name} row {k}");
            }
        }
        let vocab = std::fs::read_to_string(out.path().join("vocab/cat.tsv")).unwrap();
        let cats = std::fs::read_to_string(legacy.path().join("cat_map.tsv")).unwrap();
        assert_eq!(
            vocab.lines().skip(1).collect::<Vec<_>>(),
            cats.lines().skip(1).collect::<Vec<_>>()
        );
    }

    /// The full ML-100k job (configs/din_ml100k_full.toml): it parses, its
    /// ids-only subset is a valid schema, and (with the data) it prepares
    /// the DIN protocol's row counts.
    #[test]
    fn ml100k_full_config() {
        let root = workspace();
        let (schema, mut spec) = load_job(&root.join("configs/din_ml100k_full.toml")).unwrap();
        schema
            .subset(&["movie", "cat", "hist_movie", "hist_cat"])
            .unwrap();
        let raw = root.join("data/ml-100k");
        if !["inter", "item", "user"]
            .iter()
            .all(|e| raw.join(format!("ml-100k.{e}")).exists())
        {
            skip_without_data("tabular::tests::ml100k_full_config");
            return;
        }
        let out = tempfile::tempdir().unwrap();
        spec.events = root.join(&spec.events);
        for t in [spec.users.as_mut(), spec.items.as_mut()]
            .into_iter()
            .flatten()
        {
            t.path = root.join(&t.path);
        }
        spec.out = Some(out.path().to_path_buf());
        let sum = prepare_tabular(&schema, &spec, false).unwrap();
        assert_eq!((sum.meta.train_rows, sum.meta.test_rows), (196_228, 1_886));
        assert_eq!(
            (sum.meta.users_without_row, sum.meta.items_without_row),
            (0, 0)
        );
        assert_eq!(sum.meta.vocab["item"], 1683);
        assert_eq!(sum.meta.vocab["weekday"], 8);
    }
}
