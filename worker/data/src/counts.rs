//! The offline counting pass: `n_j`, the number of occurrences of every id
//! `j` of every sparse table over all training samples, for frequency-aware
//! regularization and for initializing the shards' feature counts
//! (the trainer sends them with `LoadCounts`).
//!
//! # What counts
//! Per sample, exactly the positions a batch built by
//! [`Batch::from_samples`](crate::batch::Batch::from_samples) with the same
//! `max_len` indexes, padding id 0 excluded:
//! - `user`: the sample's user (once per sample);
//! - `item`: the target item, plus each of the last `max_len` history items;
//! - `cat`: the target category, plus each of the last `max_len` history
//!   categories;
//! - with `include_neg`: also each of the last `max_len` DIEN negative items
//!   (in `item`) and their categories (in `cat`).
//!
//! So, without negatives, `n_j` equals the sum of
//! [`SparseIds::counts`](crate::batch::SparseIds::counts) over one epoch of DIN batches (and with
//! `include_neg`, over one epoch of DIEN batches; note that
//! `Batch::from_samples` drops the negatives of a whole batch when one of its
//! samples has an empty history). Counts saturate at `u32::MAX`.
//!
//! # File format (little endian)
//! ```text
//! magic    8 bytes  "EMBRCNT\0"
//! version  u32      1
//! n_tables u32
//! samples  u64      training samples counted
//! per table:
//!   name_len u16, name (UTF-8)
//!   count    u64    number of distinct ids
//!   count x (id u64, n u32), sorted by id, ids distinct and non-zero
//! sha256   32 bytes of everything before it
//! ```

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use sha2::{Digest, Sha256};

use super::prepare::AtomicFile;
use super::progress::rows_bar;
use super::reader::SampleReader;
use super::DataError;
use crate::batch::{Sample, CAT_TABLE, ITEM_TABLE, USER_TABLE};
use crate::schema::FeatureSchema;
use std::sync::Arc;

/// File magic.
pub const MAGIC: &[u8; 8] = b"EMBRCNT\0";
/// File format version.
pub const VERSION: u32 = 1;

/// Options of [`count`].
#[derive(Debug, Clone, PartialEq)]
pub struct CountOptions {
    /// Training sample files.
    pub train: Vec<PathBuf>,
    /// Output counts file.
    pub out: PathBuf,
    /// History truncation (as the reader's `max_len`).
    pub max_len: usize,
    /// Also count DIEN negative-history items and categories.
    pub include_neg: bool,
    /// Skip and count malformed lines instead of failing.
    pub skip_malformed: bool,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// The feature schema of the files (`None`: legacy files).
    pub schema: Option<Arc<FeatureSchema>>,
}

impl Default for CountOptions {
    fn default() -> Self {
        CountOptions {
            train: vec![PathBuf::from("data/ml100k-din/train.txt")],
            out: PathBuf::from("data/ml100k-din/counts.bin"),
            max_len: 100,
            include_neg: false,
            skip_malformed: false,
            progress: false,
            schema: None,
        }
    }
}

/// Per-table id counts.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TableCounts {
    /// Samples counted.
    pub samples: u64,
    /// `(table name, (id, n) pairs sorted by id)`: legacy files item,
    /// cat, user; schema files the schema's tables in schema order.
    pub tables: Vec<(String, Vec<(u64, u32)>)>,
}

impl TableCounts {
    /// The sorted `(id, n)` pairs of `table`, if present.
    pub fn get(&self, table: &str) -> Option<&[(u64, u32)]> {
        self.tables
            .iter()
            .find(|(name, _)| name == table)
            .map(|(_, v)| v.as_slice())
    }

    /// Count of `id` in `table` (0 when absent).
    pub fn count_of(&self, table: &str, id: u64) -> u32 {
        self.get(table)
            .and_then(|v| v.binary_search_by_key(&id, |p| p.0).ok().map(|i| v[i].1))
            .unwrap_or(0)
    }
}

/// Accumulates counts sample by sample (the same rules as [`count`]).
#[derive(Debug, Default)]
pub struct Counter {
    max_len: usize,
    include_neg: bool,
    samples: u64,
    /// `(table, id -> n)`: item, cat, user for legacy samples; the schema's
    /// tables in schema order otherwise.
    tables: Vec<(String, FxHashMap<u64, u32>)>,
    /// Schema samples: per `Sample::fields` slot, where its ids count.
    plan: Option<Vec<SlotPlan>>,
}

/// Where the ids of one `Sample::fields` slot of a schema sample count.
#[derive(Debug, Clone, Copy)]
struct SlotPlan {
    /// Index into `Counter::tables`.
    table: usize,
    /// Ids per position.
    width: usize,
    /// A behaviour feature (only the last `max_len` steps count).
    behaviour: bool,
    /// Its slot in `Sample::neg_fields`.
    neg: Option<usize>,
}

#[inline]
fn bump(m: &mut FxHashMap<u64, u32>, id: u64) {
    if id != 0 {
        let c = m.entry(id).or_insert(0);
        *c = c.saturating_add(1);
    }
}

impl Counter {
    /// An empty counter of legacy samples.
    pub fn new(max_len: usize, include_neg: bool) -> Self {
        Counter {
            max_len,
            include_neg,
            tables: [ITEM_TABLE, CAT_TABLE, USER_TABLE]
                .iter()
                .map(|t| (t.to_string(), FxHashMap::default()))
                .collect(),
            ..Counter::default()
        }
    }

    /// An empty counter of samples of `schema`: every id of every sparse and
    /// multi-hot feature counts for its table (behaviour features: the last
    /// `max_len` steps; their DIEN negatives with `include_neg`).
    pub fn with_schema(max_len: usize, include_neg: bool, schema: Arc<FeatureSchema>) -> Self {
        let tables = schema.tables();
        let pairs = schema.pairs();
        let plan = schema
            .sparse()
            .into_iter()
            .map(|i| {
                let f = &schema.features()[i];
                SlotPlan {
                    table: tables
                        .iter()
                        .position(|(n, _)| n == f.table_name())
                        .unwrap_or(0),
                    width: f.width().max(1),
                    behaviour: f.is_behaviour(),
                    neg: pairs.iter().position(|p| p.behaviour == i),
                }
            })
            .collect();
        Counter {
            max_len,
            include_neg,
            tables: tables
                .into_iter()
                .map(|(t, _)| (t, FxHashMap::default()))
                .collect(),
            plan: Some(plan),
            ..Counter::default()
        }
    }

    /// Counts one sample.
    pub fn add(&mut self, s: &Sample) {
        self.samples += 1;
        if let Some(plan) = self.plan.take() {
            self.add_schema(s, &plan);
            self.plan = Some(plan);
            return;
        }
        let [item, cat, user] = &mut self.tables[..] else {
            return;
        };
        let (item, cat, user) = (&mut item.1, &mut cat.1, &mut user.1);
        bump(user, s.user);
        bump(item, s.item);
        bump(cat, s.cat);
        let n = s.hist_items.len();
        let start = n.saturating_sub(self.max_len);
        for k in start..n {
            bump(item, s.hist_items[k]);
            bump(cat, s.hist_cats.get(k).copied().unwrap_or(0));
        }
        if self.include_neg && s.neg_items.len() == n {
            for k in start..n {
                bump(item, s.neg_items[k]);
                bump(cat, s.neg_cats.get(k).copied().unwrap_or(0));
            }
        }
    }

    fn add_schema(&mut self, s: &Sample, plan: &[SlotPlan]) {
        for (slot, p) in plan.iter().enumerate() {
            let m = &mut self.tables[p.table].1;
            let ids = s.fields.get(slot).map_or(&[][..], |v| v.as_slice());
            if !p.behaviour {
                ids.iter().for_each(|&id| bump(m, id));
                continue;
            }
            let start = (ids.len() / p.width).saturating_sub(self.max_len) * p.width;
            ids[start..].iter().for_each(|&id| bump(m, id));
            if let Some(neg) = p
                .neg
                .filter(|_| self.include_neg)
                .and_then(|k| s.neg_fields.get(k))
            {
                neg.get(start..)
                    .unwrap_or(&[])
                    .iter()
                    .for_each(|&id| bump(m, id));
            }
        }
    }

    /// The sorted counts.
    pub fn finish(self) -> TableCounts {
        let sorted = |m: FxHashMap<u64, u32>| {
            let mut v: Vec<(u64, u32)> = m.into_iter().collect();
            v.sort_unstable_by_key(|p| p.0);
            v
        };
        TableCounts {
            samples: self.samples,
            tables: self
                .tables
                .into_iter()
                .map(|(t, m)| (t, sorted(m)))
                .collect(),
        }
    }
}

/// Serializes counts in the file format (see the module docs).
pub fn encode_counts(c: &TableCounts) -> Vec<u8> {
    let n: usize = c.tables.iter().map(|t| t.1.len()).sum();
    let mut b = Vec::with_capacity(64 + n * 12);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&(c.tables.len() as u32).to_le_bytes());
    b.extend_from_slice(&c.samples.to_le_bytes());
    for (name, pairs) in &c.tables {
        b.extend_from_slice(&(name.len() as u16).to_le_bytes());
        b.extend_from_slice(name.as_bytes());
        b.extend_from_slice(&(pairs.len() as u64).to_le_bytes());
        for &(id, n) in pairs {
            b.extend_from_slice(&id.to_le_bytes());
            b.extend_from_slice(&n.to_le_bytes());
        }
    }
    let digest = Sha256::digest(&b);
    b.extend_from_slice(&digest);
    b
}

/// Parses the file format; `path` labels errors. Any malformed input is a
/// [`DataError::Counts`], never a panic; lengths in the file are checked
/// against the bytes actually present before anything is allocated.
pub fn decode_counts(path: &Path, b: &[u8]) -> Result<TableCounts, DataError> {
    let bad = |reason: String| DataError::Counts {
        path: path.to_path_buf(),
        reason,
    };
    if b.len() < 24 + 32 {
        return Err(bad(format!("too short ({} bytes)", b.len())));
    }
    if &b[..8] != MAGIC {
        return Err(bad("bad magic (not an Ember counts file)".into()));
    }
    let (body, sum) = b.split_at(b.len() - 32);
    if Sha256::digest(body).as_slice() != sum {
        return Err(bad("sha256 checksum mismatch (corrupt or truncated)".into()));
    }
    let mut r = BodyCursor { body, at: 8, path };
    let version = u32::from_le_bytes(r.array()?);
    if version != VERSION {
        return Err(bad(format!("version {version}, expected {VERSION}")));
    }
    let n_tables = u32::from_le_bytes(r.array()?);
    let samples = u64::from_le_bytes(r.array()?);
    // Each table takes at least 10 bytes: never reserve more than fits.
    let mut tables = Vec::with_capacity((n_tables as usize).min(r.left() / 10));
    for _ in 0..n_tables {
        let len = u16::from_le_bytes(r.array()?) as usize;
        let name = std::str::from_utf8(r.take(len)?)
            .map_err(|_| bad("table name is not UTF-8".into()))?
            .to_string();
        let count = u64::from_le_bytes(r.array()?);
        let bytes = usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(12))
            .filter(|&n| n <= r.left())
            .ok_or_else(|| {
                bad(format!(
                    "table {name}: {count} ids do not fit in the {} bytes left",
                    r.left()
                ))
            })?;
        let raw = r.take(bytes)?;
        let mut pairs = Vec::with_capacity(bytes / 12);
        let mut prev = 0u64;
        for rec in raw.chunks_exact(12) {
            let (id, n) = rec.split_at(8);
            let id = u64::from_le_bytes(id.try_into().unwrap_or_default());
            let n = u32::from_le_bytes(n.try_into().unwrap_or_default());
            if id <= prev {
                return Err(bad(format!(
                    "table {name}: ids not sorted, distinct and non-zero at id {id}"
                )));
            }
            prev = id;
            pairs.push((id, n));
        }
        tables.push((name, pairs));
    }
    if r.left() != 0 {
        return Err(bad(format!("{} trailing bytes", r.left())));
    }
    Ok(TableCounts { samples, tables })
}

/// A cursor over the checksummed body of a counts file.
struct BodyCursor<'a> {
    body: &'a [u8],
    at: usize,
    path: &'a Path,
}

impl<'a> BodyCursor<'a> {
    fn left(&self) -> usize {
        self.body.len() - self.at
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DataError> {
        let s = self
            .at
            .checked_add(n)
            .and_then(|end| self.body.get(self.at..end))
            .ok_or_else(|| DataError::Counts {
                path: self.path.to_path_buf(),
                reason: format!("truncated at byte {}: {n} more bytes needed", self.at),
            })?;
        self.at += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DataError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
}

/// Writes a counts file (atomically).
pub fn save_counts(path: &Path, c: &TableCounts) -> Result<(), DataError> {
    let mut w = AtomicFile::create(path)?;
    w.write_all(&encode_counts(c))?;
    w.commit()
}

/// Loads a counts file, verifying magic, version and checksum.
pub fn load_counts(path: &Path) -> Result<TableCounts, DataError> {
    let mut f = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut b = Vec::new();
    f.read_to_end(&mut b).map_err(|e| DataError::io(path, e))?;
    decode_counts(path, &b)
}

/// Summary of [`count`].
#[derive(Debug, Clone)]
pub struct CountSummary {
    /// Samples counted.
    pub samples: u64,
    /// `(table, distinct ids, total occurrences)`.
    pub tables: Vec<(String, u64, u64)>,
    /// Malformed lines skipped.
    pub skipped: u64,
    /// Wall time.
    pub elapsed: Duration,
}

impl fmt::Display for CountSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "count: {} samples", self.samples)?;
        for (t, distinct, total) in &self.tables {
            write!(f, ", {t}: {distinct} ids / {total} occurrences")?;
        }
        if self.skipped > 0 {
            write!(f, ", {} malformed lines skipped", self.skipped)?;
        }
        write!(f, " in {:.2} s", self.elapsed.as_secs_f64())
    }
}

/// Counts every table over the training files (streamed, see the module
/// docs for what counts) and writes the counts file.
pub fn count(opts: &CountOptions) -> Result<CountSummary, DataError> {
    let t0 = Instant::now();
    let mut reader = SampleReader::open(&opts.train, 0, 1, opts.skip_malformed)?
        .with_schema(opts.schema.clone());
    let mut counter = match &opts.schema {
        Some(schema) => Counter::with_schema(opts.max_len, opts.include_neg, schema.clone()),
        None => Counter::new(opts.max_len, opts.include_neg),
    };
    let bar = rows_bar("count", None, opts.progress);
    while let Some(s) = reader.read()? {
        counter.add(&s);
        reader.recycle(s);
        if counter.samples.is_multiple_of(4096) {
            bar.set_position(counter.samples);
        }
    }
    bar.finish_and_clear();
    let c = counter.finish();
    save_counts(&opts.out, &c)?;
    Ok(CountSummary {
        samples: c.samples,
        tables: c
            .tables
            .iter()
            .map(|(t, v)| {
                (
                    t.clone(),
                    v.len() as u64,
                    v.iter().map(|p| u64::from(p.1)).sum(),
                )
            })
            .collect(),
        skipped: reader.skipped(),
        elapsed: t0.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Batch;
    use crate::format::encode_sample;
    use ember_proto::rng::SplitMix64;
    use std::collections::BTreeMap;

    fn random_samples(n: usize, with_neg: bool) -> Vec<Sample> {
        let mut r = SplitMix64::new(11);
        (0..n)
            .map(|_| {
                // Batch::from_samples drops all negatives of a batch when one
                // sample has an empty history: keep histories non-empty here.
                let len = r.below(12) as usize + usize::from(with_neg);
                let hist: Vec<u64> = (0..len).map(|_| r.below(40)).collect();
                let neg: Vec<u64> = if with_neg {
                    (0..len).map(|_| 1 + r.below(40)).collect()
                } else {
                    vec![]
                };
                Sample {
                    label: r.below(2) as f32,
                    user: 1 + r.below(9),
                    item: 1 + r.below(40),
                    cat: 1 + r.below(5),
                    hist_cats: hist.iter().map(|x| x % 5).collect(),
                    neg_cats: neg.iter().map(|x| x % 5 + 1).collect(),
                    hist_items: hist,
                    neg_items: neg,
                    ..Default::default()
                }
            })
            .collect()
    }

    fn direct(samples: &[Sample], max_len: usize, neg: bool) -> [BTreeMap<u64, u32>; 3] {
        let mut m: [BTreeMap<u64, u32>; 3] = Default::default();
        let mut add = |t: usize, id: u64| {
            if id != 0 {
                *m[t].entry(id).or_insert(0) += 1;
            }
        };
        for s in samples {
            add(0, s.item);
            add(1, s.cat);
            add(2, s.user);
            let skip = s.hist_items.len().saturating_sub(max_len);
            for (i, c) in s.hist_items.iter().zip(&s.hist_cats).skip(skip) {
                add(0, *i);
                add(1, *c);
            }
            if neg {
                for (i, c) in s.neg_items.iter().zip(&s.neg_cats).skip(skip) {
                    add(0, *i);
                    add(1, *c);
                }
            }
        }
        m
    }

    #[test]
    fn count_pass_matches_direct_count_and_batches() {
        let d = tempfile::tempdir().unwrap();
        for (with_neg, max_len) in [(false, 100), (true, 5), (false, 3)] {
            let samples = random_samples(500, with_neg);
            let mut buf = Vec::new();
            for s in &samples {
                encode_sample(&mut buf, s, false);
            }
            let train = d.path().join("train.txt");
            std::fs::write(&train, buf).unwrap();
            let opts = CountOptions {
                train: vec![train],
                out: d.path().join("counts.bin"),
                max_len,
                include_neg: with_neg,
                ..CountOptions::default()
            };
            let sum = count(&opts).unwrap();
            assert_eq!(sum.samples, 500);
            let c = load_counts(&opts.out).unwrap();
            let want = direct(&samples, max_len, with_neg);
            for (t, name) in [ITEM_TABLE, CAT_TABLE, USER_TABLE].iter().enumerate() {
                let got: Vec<(u64, u32)> = c.get(name).unwrap().to_vec();
                let exp: Vec<(u64, u32)> = want[t].iter().map(|(&a, &b)| (a, b)).collect();
                assert_eq!(got, exp, "table {name}");
            }
            // Same as summing the batch counts over an epoch.
            let mut from_batches: [BTreeMap<u64, u32>; 3] = Default::default();
            for chunk in samples.chunks(64) {
                let b = Batch::from_samples(chunk, max_len);
                for (t, ids) in b.tables().iter().enumerate() {
                    for (&id, &n) in ids.unique.iter().zip(&ids.counts) {
                        *from_batches[t].entry(id).or_insert(0) += n;
                    }
                }
            }
            assert_eq!(from_batches, want);
        }
    }

    #[test]
    fn schema_counts_match_legacy_counts() {
        use crate::schema_format::from_legacy;
        let samples = random_samples(300, true);
        let schema = Arc::new(crate::schema::FeatureSchema::ids_only(4, 4, Some(2)).unwrap());
        for neg in [false, true] {
            let mut legacy = Counter::new(5, neg);
            let mut wide = Counter::with_schema(5, neg, schema.clone());
            for s in &samples {
                legacy.add(s);
                wide.add(&from_legacy(s, true));
            }
            let (l, w) = (legacy.finish(), wide.finish());
            assert_eq!(l.samples, w.samples);
            for t in ["item", "cat", "user"] {
                assert_eq!(l.get(t), w.get(t), "table {t}, negatives {neg}");
            }
        }
    }

    #[test]
    fn file_round_trip_and_corruption() {
        let c = TableCounts {
            samples: 3,
            tables: vec![
                ("item".into(), vec![(1, 2), (5, 1), (u64::MAX, 7)]),
                ("cat".into(), vec![]),
                ("user".into(), vec![(9, 3)]),
            ],
        };
        let p = Path::new("c.bin");
        let b = encode_counts(&c);
        assert_eq!(decode_counts(p, &b).unwrap(), c);
        assert_eq!(c.count_of("item", 5), 1);
        assert_eq!(c.count_of("item", 6), 0);
        let mut flipped = b.clone();
        flipped[30] ^= 1;
        assert!(matches!(
            decode_counts(p, &flipped),
            Err(DataError::Counts { .. })
        ));
        assert!(decode_counts(p, &b[..b.len() - 1]).is_err());
        let mut magic = b.clone();
        magic[0] = b'X';
        assert!(decode_counts(p, &magic)
            .unwrap_err()
            .to_string()
            .contains("magic"));
    }
}
