//! Raw MovieLens-100k (RecBole's atomic files) -> Ember sample files.
//!
//! # Inputs
//! `RAW_DIR/ml-100k.inter` (`user_id, item_id, rating, timestamp`, tab
//! separated, one header line) and `RAW_DIR/ml-100k.item` (`item_id,
//! movie_title, release_year, class`, `class` = space separated genres).
//! Columns are found by name in the header (the `:type` suffix is ignored).
//!
//! # DIN protocol ([`Protocol::Din`], the default; `shared/DATA.md`)
//! 1. Users and items are remapped over their sorted original keys starting
//!    at 1 (0 is padding). Keys are sorted numerically when all of them are
//!    unsigned integers (ML-100k), else as strings. The item set is the items
//!    that occur in `.inter`; each must have a row in `.item`. Category =
//!    first genre of the item, remapped the same way over the sorted genre
//!    names (19 on ML-100k).
//! 2. Each user's events are sorted by `(timestamp, row index in the file)`.
//! 3. Every rating is a positive. Per user, a SplitMix64 generator seeded with
//!    `derive_seed(seed, user_id)` draws, in order: one target negative per
//!    position `0..n`, then one DIEN history negative per position `0..n`;
//!    each draw is uniform over item ids `1..=n_items`, redrawn while the item
//!    is among the user's items.
//! 4. For positions `i = 1..n-1`, history = positives `[..i]` truncated to
//!    the last `max_len`: if `i < n-1` two training rows `(pos[i], 1)` and
//!    `(neg[i], 0)`; if `i == n-1` the same pair goes to the test set.
//! 5. DIEN columns: history negatives `dien_neg[..i]` (same truncation) and
//!    their categories.
//!
//! Training rows are shuffled (Fisher-Yates with `derive_seed(seed,
//! SHUFFLE_KEY)`); test rows stay in user order, positive first. With the
//! default seed ML-100k gives 196,228 training and 1,886 test rows.
//!
//! # Rating protocol ([`Protocol::Rating4`], DIN's MovieLens setting)
//! Label = `rating >= 4`; for each position `i = 1..n-1` one row with target
//! `item[i]` and history = all earlier rated items `[..i]` (truncated). Users
//! are split 80/20 (`test_fraction`): users shuffled with `derive_seed(seed,
//! SPLIT_KEY)`, the first `round(test_fraction * users)` go to the test set.
//! DIEN negatives as in the DIN protocol.
//!
//! # Outputs (in `out_dir`, see [`DatasetFiles`])
//! `train.txt`, `test.txt` (sample format, [`super::format`]),
//! `train.seq`, `test.seq` (GRU4Rec user sequences: `user \t i1^Bi2^B...` in
//! time order; DIN protocol: train = all but the last item, test = the full
//! sequence; rating protocol: train users' and test users' full sequences),
//! `user_map.tsv` (`original_id \t id`), `item_map.tsv` (`original_id \t id \t
//! cat_id`), `cat_map.tsv` (`genre \t id`), each with a header line, and
//! `meta.json` ([`Meta`]). Files are written under a hidden `.NAME.tmp` name
//! and renamed when complete.

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::format::{push_list, push_u64, LineCtx};
use super::progress::rows_bar;
use super::DataError;
use ember_proto::rng::{derive_seed, SplitMix64};

/// Default seed of the data set (DATA.md's expected counts use it).
pub const DEFAULT_SEED: u64 = 1234;
/// Default history truncation.
pub const DEFAULT_MAX_LEN: usize = 100;
/// Stream key for the training-row shuffle.
pub const SHUFFLE_KEY: u64 = u64::MAX;
/// Stream key for the user split of the rating protocol.
pub const SPLIT_KEY: u64 = u64::MAX - 1;
/// Name of the sample format written (`meta.json` field `format`).
pub const FORMAT_NAME: &str = "dien-text-v1";

/// Which labelling protocol to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// DIN's Amazon protocol ported to ML-100k: all ratings positive, one
    /// sampled negative per position, last position to test.
    #[default]
    Din,
    /// DIN's MovieLens setting: label = rating >= 4, 80/20 split by user.
    Rating4,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Din => "din",
            Protocol::Rating4 => "rating4",
        })
    }
}

impl FromStr for Protocol {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self, DataError> {
        match s {
            "din" => Ok(Protocol::Din),
            "rating4" => Ok(Protocol::Rating4),
            _ => Err(DataError::InvalidOption {
                field: "protocol",
                reason: format!("{s:?} is not one of din, rating4"),
            }),
        }
    }
}

/// Options of [`prepare`].
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// Directory holding `ml-100k.inter` and `ml-100k.item`.
    pub raw_dir: PathBuf,
    /// Output directory (created if missing).
    pub out_dir: PathBuf,
    /// Seed of negatives, shuffle and split.
    pub seed: u64,
    /// Labelling protocol.
    pub protocol: Protocol,
    /// History truncation (last `max_len` steps), at least 1.
    pub max_len: usize,
    /// Write the two DIEN negative-history columns.
    pub with_neg: bool,
    /// Rating protocol: fraction of users in the test set, in (0, 1).
    pub test_fraction: f64,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        PrepareOptions {
            raw_dir: PathBuf::from("data/ml-100k"),
            out_dir: PathBuf::from("data/ml100k-din"),
            seed: DEFAULT_SEED,
            protocol: Protocol::Din,
            max_len: DEFAULT_MAX_LEN,
            with_neg: true,
            test_fraction: 0.2,
            progress: false,
        }
    }
}

impl PrepareOptions {
    /// Checks option values, naming the bad field.
    pub fn validate(&self) -> Result<(), DataError> {
        if self.max_len == 0 {
            return Err(DataError::InvalidOption {
                field: "max_len",
                reason: "must be at least 1".into(),
            });
        }
        if !(self.test_fraction > 0.0 && self.test_fraction < 1.0) {
            return Err(DataError::InvalidOption {
                field: "test_fraction",
                reason: format!("{} is not in (0, 1)", self.test_fraction),
            });
        }
        Ok(())
    }
}

/// Paths of the files of a prepared data set directory.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetFiles {
    /// Training samples.
    pub train: PathBuf,
    /// Test samples.
    pub test: PathBuf,
    /// GRU4Rec training sequences.
    pub train_seq: PathBuf,
    /// GRU4Rec test sequences.
    pub test_seq: PathBuf,
    /// `original_id \t id`.
    pub user_map: PathBuf,
    /// `original_id \t id \t cat_id`.
    pub item_map: PathBuf,
    /// `genre \t id`.
    pub cat_map: PathBuf,
    /// [`Meta`] as JSON.
    pub meta: PathBuf,
}

impl DatasetFiles {
    /// The file layout inside `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        DatasetFiles {
            train: dir.join("train.txt"),
            test: dir.join("test.txt"),
            train_seq: dir.join("train.seq"),
            test_seq: dir.join("test.seq"),
            user_map: dir.join("user_map.tsv"),
            item_map: dir.join("item_map.tsv"),
            cat_map: dir.join("cat_map.tsv"),
            meta: dir.join("meta.json"),
        }
    }
}

/// Table sizes including the padding row 0 (`max id + 1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vocab {
    /// User table size.
    pub user: u64,
    /// Item table size.
    pub item: u64,
    /// Category table size.
    pub cat: u64,
}

/// Min / median / max of the number of events per user (before truncation).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LenStats {
    /// Minimum.
    pub min: u64,
    /// Median (mean of the two middle values for an even count).
    pub median: f64,
    /// Maximum.
    pub max: u64,
}

/// Contents of `meta.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// Sample format name ([`FORMAT_NAME`]).
    pub format: String,
    /// Protocol used.
    pub protocol: Protocol,
    /// Seed used.
    pub seed: u64,
    /// History truncation used.
    pub max_len: usize,
    /// Whether the DIEN columns are present.
    pub with_neg: bool,
    /// Number of training rows.
    pub train_rows: u64,
    /// Number of test rows.
    pub test_rows: u64,
    /// Distinct users.
    pub n_users: u64,
    /// Distinct items.
    pub n_items: u64,
    /// Distinct categories.
    pub n_cats: u64,
    /// Table sizes (with padding).
    pub vocab: Vocab,
    /// Events per user.
    pub events_per_user: LenStats,
    /// Rating protocol: number of test users (0 for DIN).
    pub test_users: u64,
    /// sha256 of the raw `.inter` file.
    pub inter_sha256: String,
    /// sha256 of the raw `.item` file.
    pub item_sha256: String,
}

impl Meta {
    /// Reads `meta.json` from a prepared directory.
    pub fn load(dir: &Path) -> Result<Meta, DataError> {
        let path = DatasetFiles::in_dir(dir).meta;
        let f = File::open(&path).map_err(|e| DataError::io(&path, e))?;
        serde_json::from_reader(BufReader::new(f))
            .map_err(|source| DataError::Json { path, source })
    }
}

/// What [`prepare`] did.
#[derive(Debug, Clone)]
pub struct PrepareSummary {
    /// The metadata written to `meta.json`.
    pub meta: Meta,
    /// The files written.
    pub files: DatasetFiles,
    /// Wall time.
    pub elapsed: Duration,
}

impl fmt::Display for PrepareSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "prepare ({}): {} train, {} test rows ({} users, {} items, {} cats) in {:.2} s -> {}",
            self.meta.protocol,
            self.meta.train_rows,
            self.meta.test_rows,
            self.meta.n_users,
            self.meta.n_items,
            self.meta.n_cats,
            self.elapsed.as_secs_f64(),
            self.files.meta.parent().unwrap_or(Path::new(".")).display()
        )
    }
}

/// One rating after id remapping.
#[derive(Debug, Clone, Copy)]
struct Event {
    ts: f64,
    row: u32,
    item: u32,
    rating: f32,
}

/// Raw data after remapping: per-user events sorted in time.
struct Raw {
    user_keys: Vec<String>,
    item_keys: Vec<String>,
    cat_keys: Vec<String>,
    /// `item_cat[item_id]` (index 0 = padding).
    item_cat: Vec<u32>,
    /// `events[user_id - 1]`, sorted by (timestamp, row).
    events: Vec<Vec<Event>>,
    inter_sha256: String,
    item_sha256: String,
}

fn read_all(path: &Path) -> Result<(Vec<u8>, String), DataError> {
    let mut f = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)
        .map_err(|e| DataError::io(path, e))?;
    let sha = hex(&Sha256::digest(&buf));
    Ok((buf, sha))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Column indices by name from a RecBole header (`name:type`).
fn header_columns(path: &Path, header: &[u8], names: &[&str]) -> Result<Vec<usize>, DataError> {
    let header = header.strip_suffix(b"\r").unwrap_or(header);
    let cols: Vec<&[u8]> = header.split(|&c| c == b'\t').collect();
    names
        .iter()
        .map(|name| {
            cols.iter()
                .position(|c| c.split(|&x| x == b':').next() == Some(name.as_bytes()))
                .ok_or_else(|| DataError::Malformed {
                    path: path.to_path_buf(),
                    line: 1,
                    column: "header".into(),
                    value: super::format::show(header),
                    reason: format!("no column named {name}"),
                })
        })
        .collect()
}

/// Sorts keys numerically when all are unsigned integers, else as strings,
/// and returns them with the map key -> 1-based id.
fn remap(keys: Vec<String>) -> (Vec<String>, FxHashMap<String, u32>) {
    let mut keys = keys;
    keys.sort();
    keys.dedup();
    if keys
        .iter()
        .all(|k| super::format::parse_u64(k.as_bytes()).is_some())
    {
        keys.sort_by_key(|k| super::format::parse_u64(k.as_bytes()).unwrap_or(0));
    }
    let map = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.clone(), i as u32 + 1))
        .collect();
    (keys, map)
}

fn utf8<'a>(ctx: LineCtx<'_>, column: &str, b: &'a [u8]) -> Result<&'a str, DataError> {
    let s = std::str::from_utf8(b).map_err(|_| ctx.err(column, b, "not UTF-8"))?;
    if s.is_empty() {
        return Err(ctx.err(column, b, "empty"));
    }
    Ok(s)
}

fn load_raw(raw_dir: &Path) -> Result<Raw, DataError> {
    let inter_path = raw_dir.join("ml-100k.inter");
    let item_path = raw_dir.join("ml-100k.item");
    let (inter, inter_sha256) = read_all(&inter_path)?;
    let (items_raw, item_sha256) = read_all(&item_path)?;

    // .item: item key -> first genre.
    let mut lines = items_raw.split(|&c| c == b'\n');
    let header = lines.next().unwrap_or(b"");
    let ic = header_columns(&item_path, header, &["item_id", "class"])?;
    let mut genre_of: FxHashMap<String, String> = FxHashMap::default();
    for (k, line) in lines.enumerate() {
        let ctx = LineCtx {
            path: &item_path,
            line: k as u64 + 2,
        };
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        let cols: Vec<&[u8]> = line.split(|&c| c == b'\t').collect();
        let get = |i: usize, name: &str| {
            cols.get(i)
                .copied()
                .ok_or_else(|| ctx.err(name, line, "missing column"))
        };
        let key = utf8(ctx, "item_id", get(ic[0], "item_id")?)?;
        let class = get(ic[1], "class")?;
        let genre = class
            .split(|&c| c == b' ')
            .find(|g| !g.is_empty())
            .ok_or_else(|| ctx.err("class", class, "no genre"))?;
        let genre = utf8(ctx, "class", genre)?;
        genre_of.insert(key.to_string(), genre.to_string());
    }

    // .inter: (user key, item key, rating, timestamp).
    let mut lines = inter.split(|&c| c == b'\n');
    let header = lines.next().unwrap_or(b"");
    let c = header_columns(
        &inter_path,
        header,
        &["user_id", "item_id", "rating", "timestamp"],
    )?;
    let mut rows: Vec<(String, String, f32, f64)> = Vec::with_capacity(100_000);
    for (k, line) in lines.enumerate() {
        let ctx = LineCtx {
            path: &inter_path,
            line: k as u64 + 2,
        };
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        let cols: Vec<&[u8]> = line.split(|&c| c == b'\t').collect();
        let get = |i: usize, name: &str| {
            cols.get(i)
                .copied()
                .ok_or_else(|| ctx.err(name, line, "missing column"))
        };
        let user = utf8(ctx, "user_id", get(c[0], "user_id")?)?;
        let item = utf8(ctx, "item_id", get(c[1], "item_id")?)?;
        let rating_b = get(c[2], "rating")?;
        let rating: f32 = std::str::from_utf8(rating_b)
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|r: &f32| r.is_finite())
            .ok_or_else(|| ctx.err("rating", rating_b, "not a number"))?;
        let ts_b = get(c[3], "timestamp")?;
        let ts: f64 = std::str::from_utf8(ts_b)
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|t: &f64| t.is_finite())
            .ok_or_else(|| ctx.err("timestamp", ts_b, "not a number"))?;
        rows.push((user.to_string(), item.to_string(), rating, ts));
    }
    if rows.is_empty() {
        return Err(DataError::Inconsistent {
            path: inter_path,
            reason: "no ratings".into(),
        });
    }

    let (user_keys, user_map) = remap(rows.iter().map(|r| r.0.clone()).collect());
    let (item_keys, item_map) = remap(rows.iter().map(|r| r.1.clone()).collect());
    let mut genres = Vec::with_capacity(item_keys.len());
    for k in &item_keys {
        match genre_of.get(k) {
            Some(g) => genres.push(g.clone()),
            None => {
                return Err(DataError::Inconsistent {
                    path: item_path,
                    reason: format!("item {k:?} of {} has no row", inter_path.display()),
                })
            }
        }
    }
    let (cat_keys, cat_map) = remap(genres.clone());
    let mut item_cat = vec![0u32; item_keys.len() + 1];
    for (i, g) in genres.iter().enumerate() {
        item_cat[i + 1] = cat_map[g];
    }

    let mut events: Vec<Vec<Event>> = vec![Vec::new(); user_keys.len()];
    for (row, (u, i, rating, ts)) in rows.iter().enumerate() {
        events[(user_map[u] - 1) as usize].push(Event {
            ts: *ts,
            row: row as u32,
            item: item_map[i],
            rating: *rating,
        });
    }
    for ev in &mut events {
        ev.sort_by(|a, b| a.ts.total_cmp(&b.ts).then(a.row.cmp(&b.row)));
    }
    Ok(Raw {
        user_keys,
        item_keys,
        cat_keys,
        item_cat,
        events,
        inter_sha256,
        item_sha256,
    })
}

/// Per-user item sequence and its negatives, flattened (CSR).
struct Seqs {
    /// `offsets[u-1]..offsets[u]` is user `u`'s range.
    offsets: Vec<usize>,
    items: Vec<u32>,
    ratings: Vec<f32>,
    neg: Vec<u32>,
    dien_neg: Vec<u32>,
}

impl Seqs {
    fn range(&self, user: u32) -> std::ops::Range<usize> {
        self.offsets[user as usize - 1]..self.offsets[user as usize]
    }
}

/// Draws the negatives of every user (see the module docs for the order).
fn build_seqs(raw: &Raw, seed: u64) -> Result<Seqs, DataError> {
    let n_items = raw.item_keys.len() as u64;
    let total: usize = raw.events.iter().map(Vec::len).sum();
    let mut s = Seqs {
        offsets: Vec::with_capacity(raw.events.len() + 1),
        items: Vec::with_capacity(total),
        ratings: Vec::with_capacity(total),
        neg: Vec::with_capacity(total),
        dien_neg: Vec::with_capacity(total),
    };
    s.offsets.push(0);
    let mut mine = vec![false; n_items as usize + 1];
    for (u, ev) in raw.events.iter().enumerate() {
        let user = u as u64 + 1;
        let mut distinct = 0u64;
        for e in ev {
            if !mine[e.item as usize] {
                mine[e.item as usize] = true;
                distinct += 1;
            }
        }
        if distinct >= n_items {
            return Err(DataError::Inconsistent {
                path: PathBuf::from("ml-100k.inter"),
                reason: format!(
                    "user {:?} rated every item: no negative can be drawn",
                    raw.user_keys[u]
                ),
            });
        }
        let mut rng = SplitMix64::new(derive_seed(seed, user));
        let draw = |rng: &mut SplitMix64| loop {
            let x = 1 + rng.below(n_items);
            if !mine[x as usize] {
                return x as u32;
            }
        };
        for e in ev {
            s.items.push(e.item);
            s.ratings.push(e.rating);
        }
        for _ in ev {
            let x = draw(&mut rng);
            s.neg.push(x);
        }
        for _ in ev {
            let x = draw(&mut rng);
            s.dien_neg.push(x);
        }
        for e in ev {
            mine[e.item as usize] = false;
        }
        s.offsets.push(s.items.len());
    }
    Ok(s)
}

/// One output row: user, position in the user's sequence, and whether the
/// target is the positive (or DIN's sampled negative) / the label.
#[derive(Debug, Clone, Copy)]
struct RowRef {
    user: u32,
    pos: u32,
    /// DIN: true = positive target, false = sampled negative target.
    /// Rating protocol: always true (the target is the rated item).
    positive_target: bool,
    label: bool,
}

struct RowWriter<'a> {
    seqs: &'a Seqs,
    item_cat: &'a [u32],
    max_len: usize,
    with_neg: bool,
    line: Vec<u8>,
    ids: Vec<u64>,
}

impl RowWriter<'_> {
    fn encode(&mut self, r: RowRef) {
        let seqs = self.seqs;
        let range = seqs.range(r.user);
        let base = range.start;
        let i = r.pos as usize;
        let start = i.saturating_sub(self.max_len);
        let target = if r.positive_target {
            seqs.items[base + i]
        } else {
            seqs.neg[base + i]
        };
        let cat = |x: u32| u64::from(self.item_cat[x as usize]);
        let l = &mut self.line;
        l.push(if r.label { b'1' } else { b'0' });
        l.push(b'\t');
        push_u64(l, u64::from(r.user));
        l.push(b'\t');
        push_u64(l, u64::from(target));
        l.push(b'\t');
        push_u64(l, cat(target));
        let mut lists: Vec<&[u32]> = vec![&seqs.items[base + start..base + i]];
        if self.with_neg {
            lists.push(&seqs.dien_neg[base + start..base + i]);
        }
        for list in lists {
            self.ids.clear();
            self.ids.extend(list.iter().map(|&x| u64::from(x)));
            l.push(b'\t');
            push_list(l, &self.ids);
            self.ids.clear();
            self.ids.extend(list.iter().map(|&x| cat(x)));
            l.push(b'\t');
            push_list(l, &self.ids);
        }
        l.push(b'\n');
    }

    fn write_rows(
        &mut self,
        path: &Path,
        rows: &[RowRef],
        bar: &indicatif::ProgressBar,
    ) -> Result<(), DataError> {
        let mut w = AtomicFile::create(path)?;
        for chunk in rows.chunks(4096) {
            self.line.clear();
            for &r in chunk {
                self.encode(r);
            }
            w.write_all(&self.line)?;
            bar.inc(chunk.len() as u64);
        }
        w.commit()
    }
}

/// A data file written atomically ([`ember_proto::atomic::AtomicFile`]:
/// the hidden temp file `.NAME.tmp`, fsynced and renamed to `NAME` on
/// commit), buffered, with errors naming the file.
pub(crate) struct AtomicFile {
    w: BufWriter<ember_proto::atomic::AtomicFile>,
}

impl AtomicFile {
    pub(crate) fn create(path: &Path) -> Result<Self, DataError> {
        let f = ember_proto::atomic::AtomicFile::create(path)
            .map_err(|e| DataError::io(e.path, e.source))?;
        Ok(AtomicFile {
            w: BufWriter::with_capacity(1 << 20, f),
        })
    }

    pub(crate) fn write_all(&mut self, b: &[u8]) -> Result<(), DataError> {
        self.w
            .write_all(b)
            .map_err(|e| DataError::io(self.w.get_ref().temp_path(), e))
    }

    pub(crate) fn commit(self) -> Result<(), DataError> {
        let f = self.w.into_inner().map_err(|e| {
            let (err, w) = e.into_parts();
            DataError::io(w.get_ref().temp_path(), err)
        })?;
        f.commit().map_err(|e| DataError::io(e.path, e.source))?;
        Ok(())
    }
}

fn write_text(path: &Path, text: &str) -> Result<(), DataError> {
    let mut w = AtomicFile::create(path)?;
    w.write_all(text.as_bytes())?;
    w.commit()
}

fn write_seqs(path: &Path, seqs: &Seqs, users: &[(u32, usize)]) -> Result<(), DataError> {
    let mut w = AtomicFile::create(path)?;
    let mut line = Vec::new();
    let mut ids = Vec::new();
    for &(user, len) in users {
        let r = seqs.range(user);
        line.clear();
        push_u64(&mut line, u64::from(user));
        line.push(b'\t');
        ids.clear();
        ids.extend(
            seqs.items[r.start..r.start + len]
                .iter()
                .map(|&x| u64::from(x)),
        );
        push_list(&mut line, &ids);
        line.push(b'\n');
        w.write_all(&line)?;
    }
    w.commit()
}

fn len_stats(raw: &Raw) -> LenStats {
    let mut lens: Vec<u64> = raw.events.iter().map(|e| e.len() as u64).collect();
    lens.sort_unstable();
    let k = lens.len();
    LenStats {
        min: lens[0],
        median: (lens[(k - 1) / 2] + lens[k / 2]) as f64 / 2.0,
        max: lens[k - 1],
    }
}

/// Builds train/test sample files, sequence files, id maps and `meta.json`
/// from raw ML-100k (see the module docs for the exact protocol).
///
/// ```no_run
/// use ember_data::prepare::{prepare, PrepareOptions};
/// let summary = prepare(&PrepareOptions::default())?;
/// println!("{summary}");
/// # Ok::<(), ember_data::DataError>(())
/// ```
pub fn prepare(opts: &PrepareOptions) -> Result<PrepareSummary, DataError> {
    opts.validate()?;
    let t0 = Instant::now();
    let raw = load_raw(&opts.raw_dir)?;
    let seqs = build_seqs(&raw, opts.seed)?;
    let n_users = raw.user_keys.len() as u32;

    let mut train: Vec<RowRef> = Vec::new();
    let mut test: Vec<RowRef> = Vec::new();
    let mut train_seq: Vec<(u32, usize)> = Vec::new();
    let mut test_seq: Vec<(u32, usize)> = Vec::new();
    let mut test_users = 0u64;
    match opts.protocol {
        Protocol::Din => {
            for user in 1..=n_users {
                let n = seqs.range(user).len();
                for i in 1..n {
                    let out = if i + 1 < n { &mut train } else { &mut test };
                    for positive in [true, false] {
                        out.push(RowRef {
                            user,
                            pos: i as u32,
                            positive_target: positive,
                            label: positive,
                        });
                    }
                }
                if n >= 2 {
                    train_seq.push((user, n - 1));
                    test_seq.push((user, n));
                }
            }
        }
        Protocol::Rating4 => {
            let mut users: Vec<u32> = (1..=n_users).collect();
            SplitMix64::new(derive_seed(opts.seed, SPLIT_KEY)).shuffle(&mut users);
            let n_test = (opts.test_fraction * f64::from(n_users)).round() as usize;
            let mut is_test = vec![false; n_users as usize + 1];
            for &u in &users[..n_test] {
                is_test[u as usize] = true;
            }
            test_users = n_test as u64;
            for user in 1..=n_users {
                let r = seqs.range(user);
                let n = r.len();
                let test_user = is_test[user as usize];
                let out = if test_user { &mut test } else { &mut train };
                for i in 1..n {
                    out.push(RowRef {
                        user,
                        pos: i as u32,
                        positive_target: true,
                        label: seqs.ratings[r.start + i] >= 4.0,
                    });
                }
                if test_user {
                    &mut test_seq
                } else {
                    &mut train_seq
                }
                .push((user, n));
            }
        }
    }
    SplitMix64::new(derive_seed(opts.seed, SHUFFLE_KEY)).shuffle(&mut train);

    std::fs::create_dir_all(&opts.out_dir).map_err(|e| DataError::io(&opts.out_dir, e))?;
    let files = DatasetFiles::in_dir(&opts.out_dir);
    let bar = rows_bar(
        "prepare",
        Some((train.len() + test.len()) as u64),
        opts.progress,
    );
    let mut rw = RowWriter {
        seqs: &seqs,
        item_cat: &raw.item_cat,
        max_len: opts.max_len,
        with_neg: opts.with_neg,
        line: Vec::with_capacity(1 << 20),
        ids: Vec::new(),
    };
    rw.write_rows(&files.train, &train, &bar)?;
    rw.write_rows(&files.test, &test, &bar)?;
    bar.finish_and_clear();
    write_seqs(&files.train_seq, &seqs, &train_seq)?;
    write_seqs(&files.test_seq, &seqs, &test_seq)?;

    let mut text = String::from("original_id\tid\n");
    for (i, k) in raw.user_keys.iter().enumerate() {
        text.push_str(&format!("{k}\t{}\n", i + 1));
    }
    write_text(&files.user_map, &text)?;
    let mut text = String::from("original_id\tid\tcat_id\n");
    for (i, k) in raw.item_keys.iter().enumerate() {
        text.push_str(&format!("{k}\t{}\t{}\n", i + 1, raw.item_cat[i + 1]));
    }
    write_text(&files.item_map, &text)?;
    let mut text = String::from("genre\tid\n");
    for (i, k) in raw.cat_keys.iter().enumerate() {
        text.push_str(&format!("{k}\t{}\n", i + 1));
    }
    write_text(&files.cat_map, &text)?;

    let meta = Meta {
        format: FORMAT_NAME.to_string(),
        protocol: opts.protocol,
        seed: opts.seed,
        max_len: opts.max_len,
        with_neg: opts.with_neg,
        train_rows: train.len() as u64,
        test_rows: test.len() as u64,
        n_users: u64::from(n_users),
        n_items: raw.item_keys.len() as u64,
        n_cats: raw.cat_keys.len() as u64,
        vocab: Vocab {
            user: u64::from(n_users) + 1,
            item: raw.item_keys.len() as u64 + 1,
            cat: raw.cat_keys.len() as u64 + 1,
        },
        events_per_user: len_stats(&raw),
        test_users,
        inter_sha256: raw.inter_sha256.clone(),
        item_sha256: raw.item_sha256.clone(),
    };
    let json = serde_json::to_string_pretty(&meta).map_err(|source| DataError::Json {
        path: files.meta.clone(),
        source,
    })?;
    write_text(&files.meta, &(json + "\n"))?;
    Ok(PrepareSummary {
        meta,
        files,
        elapsed: t0.elapsed(),
    })
}

/// Reads the id map `original_id \t id [...]` written by [`prepare`]
/// (`user_map.tsv`, `item_map.tsv` or `cat_map.tsv`) as (original, id) pairs.
pub fn load_id_map(path: &Path) -> Result<Vec<(String, u64)>, DataError> {
    let f = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut out = Vec::new();
    for (k, line) in BufReader::new(f).lines().enumerate().skip(1) {
        let line = line.map_err(|e| DataError::io(path, e))?;
        let ctx = LineCtx {
            path,
            line: k as u64 + 1,
        };
        let mut cols = line.split('\t');
        let key = cols.next().unwrap_or("");
        let id = cols.next().unwrap_or("");
        let id = super::format::parse_u64(id.as_bytes())
            .ok_or_else(|| ctx.err("id", id.as_bytes(), "not an unsigned integer"))?;
        out.push((key.to_string(), id));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Sample;
    use crate::format::parse_sample;

    const INTER: &str = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n\
        10\t200\t5\t300\n\
        10\t100\t3\t100\n\
        10\t300\t4\t100\n\
        7\t300\t2\t50\n\
        7\t90\t4\t60\n\
        7\t100\t1\t70\n";
    const ITEM: &str =
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n\
        90\tA\t1990\tDrama Comedy\n\
        100\tB\t1991\tAction\n\
        200\tC\t1992\tComedy Drama\n\
        300\tD\t1993\tDrama\n";

    fn raw_dir(inter: &str, item: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("ml-100k.inter"), inter).unwrap();
        std::fs::write(d.path().join("ml-100k.item"), item).unwrap();
        d
    }

    fn read_samples(path: &Path) -> Vec<Sample> {
        std::fs::read(path)
            .unwrap()
            .split(|&c| c == b'\n')
            .filter(|l| !l.is_empty())
            .enumerate()
            .map(|(k, l)| parse_sample(path, k as u64 + 1, l).unwrap())
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn s(
        label: f32,
        user: u64,
        item: u64,
        cat: u64,
        h: &[u64],
        hc: &[u64],
        n: &[u64],
        nc: &[u64],
    ) -> Sample {
        Sample {
            label,
            user,
            item,
            cat,
            hist_items: h.to_vec(),
            hist_cats: hc.to_vec(),
            neg_items: n.to_vec(),
            neg_cats: nc.to_vec(),
            ..Default::default()
        }
    }

    fn key(s: &Sample) -> String {
        format!("{s:?}")
    }

    // Hand-worked: users 7 -> 1, 10 -> 2 (numeric sort); items 90 -> 1,
    // 100 -> 2, 200 -> 3, 300 -> 4; genres Action 1, Comedy 2, Drama 3, so
    // cats: item1 3, item2 1, item3 2, item4 3. User 1 sequence [4, 1, 2]
    // (only item 3 is not theirs: every negative is 3, cat 2). User 2: rows
    // 2 and 3 tie at t=100, row order keeps [2, 4] then 3 at t=300; only item
    // 1 is not theirs (cat 3).
    #[test]
    fn din_protocol_by_hand() {
        let raw = raw_dir(INTER, ITEM);
        let out = tempfile::tempdir().unwrap();
        let opts = PrepareOptions {
            raw_dir: raw.path().to_path_buf(),
            out_dir: out.path().to_path_buf(),
            ..PrepareOptions::default()
        };
        let sum = prepare(&opts).unwrap();
        assert_eq!((sum.meta.train_rows, sum.meta.test_rows), (4, 4));
        assert_eq!(
            sum.meta.vocab,
            Vocab {
                user: 3,
                item: 5,
                cat: 4
            }
        );
        let mut train = read_samples(&sum.files.train);
        let mut want = vec![
            s(1.0, 1, 1, 3, &[4], &[3], &[3], &[2]),
            s(0.0, 1, 3, 2, &[4], &[3], &[3], &[2]),
            s(1.0, 2, 4, 3, &[2], &[1], &[1], &[3]),
            s(0.0, 2, 1, 3, &[2], &[1], &[1], &[3]),
        ];
        train.sort_by_key(key);
        want.sort_by_key(key);
        assert_eq!(train, want);
        let test = read_samples(&sum.files.test);
        assert_eq!(
            test,
            vec![
                s(1.0, 1, 2, 1, &[4, 1], &[3, 3], &[3, 3], &[2, 2]),
                s(0.0, 1, 3, 2, &[4, 1], &[3, 3], &[3, 3], &[2, 2]),
                s(1.0, 2, 3, 2, &[2, 4], &[1, 3], &[1, 1], &[3, 3]),
                s(0.0, 2, 1, 3, &[2, 4], &[1, 3], &[1, 1], &[3, 3]),
            ]
        );
        assert_eq!(
            std::fs::read(&sum.files.train_seq).unwrap(),
            b"1\t4\x021\n2\t2\x024\n"
        );
        assert_eq!(
            std::fs::read(&sum.files.test_seq).unwrap(),
            b"1\t4\x021\x022\n2\t2\x024\x023\n"
        );
        assert_eq!(
            std::fs::read_to_string(&sum.files.item_map).unwrap(),
            "original_id\tid\tcat_id\n90\t1\t3\n100\t2\t1\n200\t3\t2\n300\t4\t3\n"
        );
        assert_eq!(
            load_id_map(&sum.files.user_map).unwrap(),
            vec![("7".to_string(), 1), ("10".to_string(), 2)]
        );
        assert_eq!(Meta::load(out.path()).unwrap(), sum.meta);
    }

    #[test]
    fn truncation_and_no_dien_columns() {
        let raw = raw_dir(INTER, ITEM);
        let out = tempfile::tempdir().unwrap();
        let opts = PrepareOptions {
            raw_dir: raw.path().to_path_buf(),
            out_dir: out.path().to_path_buf(),
            max_len: 1,
            with_neg: false,
            ..PrepareOptions::default()
        };
        let sum = prepare(&opts).unwrap();
        let test = std::fs::read(&sum.files.test).unwrap();
        assert_eq!(
            test,
            b"1\t1\t2\t1\t1\t3\n0\t1\t3\t2\t1\t3\n1\t2\t3\t2\t4\t3\n0\t2\t1\t3\t4\t3\n"
        );
    }

    #[test]
    fn rating4_protocol_by_hand() {
        let raw = raw_dir(INTER, ITEM);
        let out = tempfile::tempdir().unwrap();
        let opts = PrepareOptions {
            raw_dir: raw.path().to_path_buf(),
            out_dir: out.path().to_path_buf(),
            protocol: Protocol::Rating4,
            test_fraction: 0.5,
            with_neg: false,
            ..PrepareOptions::default()
        };
        let sum = prepare(&opts).unwrap();
        assert_eq!(
            (sum.meta.train_rows, sum.meta.test_rows, sum.meta.test_users),
            (2, 2, 1)
        );
        let mut all = read_samples(&sum.files.train);
        all.extend(read_samples(&sum.files.test));
        all.sort_by_key(key);
        // User 1 ratings in time order [2, 4, 1]; user 2 [3, 4, 5].
        let mut want = vec![
            s(1.0, 1, 1, 3, &[4], &[3], &[], &[]),
            s(0.0, 1, 2, 1, &[4, 1], &[3, 3], &[], &[]),
            s(1.0, 2, 4, 3, &[2], &[1], &[], &[]),
            s(1.0, 2, 3, 2, &[2, 4], &[1, 3], &[], &[]),
        ];
        want.sort_by_key(key);
        assert_eq!(all, want);
        let test = read_samples(&sum.files.test);
        assert!(test.iter().all(|x| x.user == test[0].user));
    }

    #[test]
    fn deterministic_and_seed_sensitive() {
        // A larger random-ish raw set so negatives are really drawn.
        let mut inter = String::from("user_id\titem_id\trating\ttimestamp\n");
        let mut item = String::from("item_id\tmovie_title\trelease_year\tclass\n");
        let mut r = SplitMix64::new(5);
        for i in 1..=50 {
            item.push_str(&format!("{i}\tt\t2000\tG{}\n", i % 4));
        }
        for u in 1..=20 {
            for _ in 0..10 {
                inter.push_str(&format!(
                    "{u}\t{}\t{}\t{}\n",
                    1 + r.below(50),
                    1 + r.below(5),
                    r.below(30)
                ));
            }
        }
        let raw = raw_dir(&inter, &item);
        let run = |seed: u64| {
            let out = tempfile::tempdir().unwrap();
            let opts = PrepareOptions {
                raw_dir: raw.path().to_path_buf(),
                out_dir: out.path().to_path_buf(),
                seed,
                ..PrepareOptions::default()
            };
            let sum = prepare(&opts).unwrap();
            (
                std::fs::read(&sum.files.train).unwrap(),
                std::fs::read(&sum.files.test).unwrap(),
            )
        };
        let a = run(1);
        assert_eq!(a, run(1));
        assert_ne!(a, run(2));
        // Negatives are never among the user's items.
        let path = Path::new("train");
        let mut users: FxHashMap<u64, Vec<u64>> = FxHashMap::default();
        for l in a.1.split(|&c| c == b'\n').filter(|l| !l.is_empty()) {
            let s = parse_sample(path, 0, l).unwrap();
            if s.label == 1.0 {
                let mut v = s.hist_items.clone();
                v.push(s.item);
                users.insert(s.user, v);
            }
        }
        for l in a.0.split(|&c| c == b'\n').filter(|l| !l.is_empty()) {
            let s = parse_sample(path, 0, l).unwrap();
            let mine = &users[&s.user];
            if s.label == 0.0 {
                assert!(!mine.contains(&s.item));
            }
            assert!(s.neg_items.iter().all(|x| !mine.contains(x)));
        }
    }

    #[test]
    fn malformed_raw_lines_name_line_and_column() {
        let bad = INTER.replace("7\t90\t4\t60", "7\t90\tfour\t60");
        let raw = raw_dir(&bad, ITEM);
        let out = tempfile::tempdir().unwrap();
        let opts = PrepareOptions {
            raw_dir: raw.path().to_path_buf(),
            out_dir: out.path().to_path_buf(),
            ..PrepareOptions::default()
        };
        match prepare(&opts) {
            Err(DataError::Malformed { line, column, .. }) => {
                assert_eq!((line, column.as_str()), (6, "rating"));
            }
            other => panic!("{other:?}"),
        }
        let missing = ITEM.replace("300\tD\t1993\tDrama\n", "");
        let raw = raw_dir(INTER, &missing);
        let opts = PrepareOptions {
            raw_dir: raw.path().to_path_buf(),
            ..opts
        };
        assert!(matches!(
            prepare(&opts),
            Err(DataError::Inconsistent { .. })
        ));
    }

    /// The real data set: gated on `data/ml-100k` (run
    /// `scripts/fetch-ml100k.sh` first); skipped with a message otherwise.
    #[test]
    fn real_ml100k_counts() {
        let raw = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/ml-100k");
        if !raw.join("ml-100k.inter").exists() || !raw.join("ml-100k.item").exists() {
            crate::tabular::tests::skip_without_data("real_ml100k_counts");
            return;
        }
        let out = tempfile::tempdir().unwrap();
        let opts = PrepareOptions {
            raw_dir: raw,
            out_dir: out.path().to_path_buf(),
            ..PrepareOptions::default()
        };
        let sum = prepare(&opts).unwrap();
        assert_eq!(sum.meta.train_rows, 196_228);
        assert_eq!(sum.meta.test_rows, 1_886);
        assert_eq!(
            (sum.meta.n_users, sum.meta.n_items, sum.meta.n_cats),
            (943, 1682, 19)
        );
        assert_eq!(
            sum.meta.events_per_user,
            LenStats {
                min: 20,
                median: 65.0,
                max: 737
            }
        );
        let test = read_samples(&sum.files.test);
        assert_eq!(test.len(), 1886);
        assert!(test
            .iter()
            .all(|s| s.hist_items.len() <= 100 && s.neg_items.len() == s.hist_items.len()));
    }
}
