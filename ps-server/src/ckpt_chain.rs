//! Checkpoint chains of one shard: a base (`step-<b>.ckpt`) followed by
//! deltas (`delta-<s>.ckpt`), each delta holding the rows changed since the
//! previous checkpoint of the chain, the rows removed since (tombstones),
//! all pending counts and all dense parameters.
//!
//! A delta step is complete once its manifest `manifest-<s>.json` exists:
//! written last, atomically (temp file, fsync, rename, directory fsync), it
//! names every file of the chain in order with its step, size and body crc.
//! A base step needs no manifest (a lone `step-<b>.ckpt` is a chain of one
//! file, which keeps every checkpoint written before deltas existed
//! restorable). A crash at any point therefore leaves either the new step
//! complete or the previous ones intact: a delta without its manifest, or a
//! manifest temp file, is never listed.
//!
//! Restoring a chain streams it twice: a verification pass over every file
//! (checksums, structure, finite values; the deltas' rows are collected,
//! they are small) before anything in the shard changes, then the caller
//! drops its live state and the base is loaded, skipping the rows the
//! deltas replace or remove, followed by the deltas' rows. Peak memory is
//! the restored state plus the deltas, not two copies of the table.

use crate::checkpoint::{
    self, base_name, delta_name, header_bytes, open_checked, write_atomic, write_framed,
    CheckpointInfo, FileKind, Visitor,
};
use crate::dense::DenseEntry;
use crate::error::{PsError, Result};
use crate::store::{Table, TableSpec};
use ember_proto::v1::TableConfig;
use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `format` of the manifests written and accepted.
pub const MANIFEST_FORMAT: &str = "ember-chain-1";

/// When a shard writes a base instead of a delta.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeltaPolicy {
    /// Deltas after a base before the next base (0 = every checkpoint is a base).
    pub max_deltas: u32,
    /// A base is written instead of a delta when the chain's delta rows,
    /// this one included, would exceed this percentage of the base's rows.
    pub max_chain_percent: u32,
}

impl Default for DeltaPolicy {
    fn default() -> Self {
        DeltaPolicy {
            max_deltas: 8,
            max_chain_percent: 50,
        }
    }
}

/// File name of the manifest of `step`.
pub fn manifest_name(step: u64) -> String {
    format!("manifest-{step}.json")
}

/// One file of a chain, as named by a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainFile {
    /// "base" or "delta".
    pub kind: String,
    /// File name in the shard directory (`step-<s>.ckpt` / `delta-<s>.ckpt`).
    pub file: String,
    /// Step of the file.
    pub step: u64,
    /// File size in bytes.
    pub bytes: u64,
    /// crc32 of the body (as in the file's trailer).
    pub crc32: u32,
    /// Sparse rows in the file.
    pub rows: u64,
}

/// The chain that restores one step of one shard: a base, then deltas in
/// step order. Stored as `manifest-<step>.json` for delta steps;
/// synthesized for a lone base.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    /// Shard index.
    pub shard_index: u32,
    /// Number of shards.
    pub num_shards: u32,
    /// The step this chain restores (the last file's step).
    pub step: u64,
    /// Base first, then deltas in order.
    pub files: Vec<ChainFile>,
}

impl Manifest {
    /// Deltas in the chain.
    pub fn deltas(&self) -> usize {
        self.files.len().saturating_sub(1)
    }
    /// Bytes of every file of the chain.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }
    fn entry(info: &CheckpointInfo, step: u64) -> ChainFile {
        ChainFile {
            kind: info.kind.as_str().to_string(),
            file: info
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            step,
            bytes: info.bytes,
            crc32: info.body_crc,
            rows: info.rows,
        }
    }
    /// The chain of a freshly written base.
    pub fn of_base(shard_index: u32, num_shards: u32, step: u64, info: &CheckpointInfo) -> Self {
        Manifest {
            format: MANIFEST_FORMAT.to_string(),
            shard_index,
            num_shards,
            step,
            files: vec![Self::entry(info, step)],
        }
    }
    /// This chain extended by a freshly written delta.
    pub fn with_delta(&self, step: u64, info: &CheckpointInfo) -> Self {
        let mut m = self.clone();
        m.step = step;
        m.files.push(Self::entry(info, step));
        m
    }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> PsError {
    PsError::CorruptCheckpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn parse_step(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    name.strip_prefix(prefix)?
        .strip_suffix(suffix)?
        .parse::<u64>()
        .ok()
}

/// Reads a manifest file and checks it is well formed (format, shard,
/// step in the name, file names, base then deltas in increasing step
/// order). The files it names are not opened.
pub fn read_manifest(path: &Path, shard_index: u32, num_shards: u32) -> Result<Manifest> {
    let text = fs::read(path).map_err(|e| PsError::io(format!("reading {}", path.display()), e))?;
    let m: Manifest = serde_json::from_slice(&text)
        .map_err(|e| corrupt(path, format!("not a chain manifest: {e}")))?;
    if m.format != MANIFEST_FORMAT {
        return Err(corrupt(
            path,
            format!("format `{}` (expected `{MANIFEST_FORMAT}`)", m.format),
        ));
    }
    if (m.shard_index, m.num_shards) != (shard_index, num_shards) {
        return Err(PsError::FailedPrecondition(format!(
            "manifest {} belongs to shard {} of {}, this is shard {shard_index} of {num_shards}",
            path.display(),
            m.shard_index,
            m.num_shards
        )));
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if parse_step(name, "manifest-", ".json") != Some(m.step) {
        return Err(corrupt(
            path,
            format!("file name does not match its step {}", m.step),
        ));
    }
    let Some(base) = m.files.first() else {
        return Err(corrupt(path, "names no file"));
    };
    if base.kind != "base" {
        return Err(corrupt(
            path,
            format!(
                "chain starts with {} `{}`, not a base (a delta without its base)",
                base.kind, base.file
            ),
        ));
    }
    let mut prev: Option<u64> = None;
    for (i, f) in m.files.iter().enumerate() {
        let want_kind = if i == 0 { "base" } else { "delta" };
        if f.kind != want_kind {
            return Err(corrupt(
                path,
                format!(
                    "file {i} `{}` is a {}, expected a {want_kind}",
                    f.file, f.kind
                ),
            ));
        }
        let want_name = if i == 0 {
            base_name(f.step)
        } else {
            delta_name(f.step)
        };
        if f.file != want_name {
            return Err(corrupt(
                path,
                format!(
                    "file {i} is named `{}`, expected `{want_name}` for step {}",
                    f.file, f.step
                ),
            ));
        }
        if let Some(p) = prev {
            if f.step <= p {
                return Err(corrupt(
                    path,
                    format!(
                        "chain out of order: `{}` (step {}) after step {p}",
                        f.file, f.step
                    ),
                ));
            }
        }
        prev = Some(f.step);
    }
    if prev != Some(m.step) {
        return Err(corrupt(
            path,
            format!(
                "chain ends at step {prev:?}, manifest is for step {}",
                m.step
            ),
        ));
    }
    Ok(m)
}

/// Checks that every file of a chain exists with the size, kind, step and
/// body crc the manifest names (frames only: cheap). `label` is the
/// manifest (or base file) the chain comes from.
pub fn check_files(dir: &Path, m: &Manifest, label: &Path) -> Result<()> {
    for f in &m.files {
        let p = dir.join(&f.file);
        if !p.exists() {
            return Err(corrupt(
                label,
                format!("names {} (step {}), which is missing", p.display(), f.step),
            ));
        }
        let (_, fr) = open_checked(&p, m.shard_index, m.num_shards)?;
        let mismatch = if fr.kind.as_str() != f.kind {
            Some(format!(
                "is a {}, the manifest says {}",
                fr.kind.as_str(),
                f.kind
            ))
        } else if fr.step != f.step {
            Some(format!(
                "has step {}, the manifest says {}",
                fr.step, f.step
            ))
        } else if fr.bytes != f.bytes {
            Some(format!(
                "has {} bytes, the manifest says {}",
                fr.bytes, f.bytes
            ))
        } else if fr.body_crc != f.crc32 {
            Some(format!(
                "has body crc {:08x}, the manifest says {:08x} (rewritten since)",
                fr.body_crc, f.crc32
            ))
        } else {
            None
        };
        if let Some(why) = mismatch {
            return Err(corrupt(&p, format!("{why} ({})", label.display())));
        }
    }
    Ok(())
}

/// The chain of a lone base file (checked frame).
fn base_chain(dir: &Path, shard_index: u32, num_shards: u32, step: u64) -> Result<Manifest> {
    let p = dir.join(base_name(step));
    let (_, fr) = open_checked(&p, shard_index, num_shards)?;
    if fr.kind != FileKind::Base || fr.step != step {
        return Err(corrupt(
            &p,
            format!(
                "file name says base step {step}, header says {} step {}",
                fr.kind.as_str(),
                fr.step
            ),
        ));
    }
    Ok(Manifest {
        format: MANIFEST_FORMAT.to_string(),
        shard_index,
        num_shards,
        step,
        files: vec![ChainFile {
            kind: "base".into(),
            file: base_name(step),
            step,
            bytes: fr.bytes,
            crc32: fr.body_crc,
            // Unknown without reading the body; only used by the delta policy.
            rows: u64::MAX,
        }],
    })
}

/// The chain restoring `step` (manifest checked, files' frames checked):
/// the manifest `manifest-<step>.json` when there is one, else the base
/// `step-<step>.ckpt`. Errors name the missing or bad file.
pub fn chain_of(dir: &Path, shard_index: u32, num_shards: u32, step: u64) -> Result<Manifest> {
    let mp = dir.join(manifest_name(step));
    if mp.exists() {
        let m = read_manifest(&mp, shard_index, num_shards)?;
        check_files(dir, &m, &mp)?;
        return Ok(m);
    }
    let bp = dir.join(base_name(step));
    if bp.exists() {
        return base_chain(dir, shard_index, num_shards, step);
    }
    let dp = dir.join(delta_name(step));
    if dp.exists() {
        return Err(PsError::NoCheckpoint(format!(
            "for step {step} ({} has no manifest {}: an interrupted checkpoint)",
            dp.display(),
            mp.display()
        )));
    }
    Err(PsError::NoCheckpoint(format!(
        "for step {step} ({} missing)",
        bp.display()
    )))
}

/// Restorable chains (ascending by step) and the files that failed their
/// checks (a bad manifest, or a base whose frame is bad).
pub type ChainListing = (Vec<Manifest>, Vec<(PathBuf, PsError)>);

/// Every restorable step of a shard directory: the manifests whose chain
/// checks out, and the lone bases (no manifest of their step).
pub fn list(dir: &Path, shard_index: u32, num_shards: u32) -> Result<ChainListing> {
    let (bases, mut bad) = checkpoint::list(dir, shard_index, num_shards)?;
    let mut chains: BTreeMap<u64, Manifest> = BTreeMap::new();
    let mut with_manifest = FxHashSet::default();
    if let Ok(rd) = fs::read_dir(dir) {
        for entry in rd.flatten() {
            let name = entry.file_name();
            let Some(step) = name
                .to_str()
                .and_then(|n| parse_step(n, "manifest-", ".json"))
            else {
                continue;
            };
            with_manifest.insert(step);
            let p = entry.path();
            match read_manifest(&p, shard_index, num_shards)
                .and_then(|m| check_files(dir, &m, &p).map(|()| m))
            {
                Ok(m) => {
                    chains.insert(step, m);
                }
                Err(e) => bad.push((p, e)),
            }
        }
    }
    for step in bases {
        if !with_manifest.contains(&step) {
            if let Ok(m) = base_chain(dir, shard_index, num_shards, step) {
                chains.insert(step, m);
            }
        }
    }
    Ok((chains.into_values().collect(), bad))
}

/// Writes a manifest atomically (`.manifest-<s>.json.tmp`, fsync, rename,
/// directory fsync).
pub fn write_manifest(dir: &Path, m: &Manifest) -> Result<PathBuf> {
    let text = serde_json::to_vec_pretty(m)
        .map_err(|e| PsError::Internal(format!("encoding a manifest: {e}")))?;
    let (path, ()) = write_atomic(dir, &manifest_name(m.step), |f| {
        use std::io::Write;
        f.write_all(&text)
    })?;
    Ok(path)
}

/// Rows per block of a delta.
const DELTA_BLOCK_ROWS: usize = 4096;

/// Writes `delta-<step>.ckpt` atomically: per table (in `tables` order) its
/// `tombstones`, the rows pushed since the table's previous change window
/// ([`Table::take_changed`], which starts a new one) and all its pending
/// counts, then all dense parameters. No manifest is written. A table whose
/// change list overflowed fails the write (the caller then writes a base).
#[allow(clippy::too_many_arguments)]
pub fn write_delta(
    dir: &Path,
    shard_index: u32,
    num_shards: u32,
    step: u64,
    chain: &Manifest,
    tables: &[Arc<Table>],
    tombstones: &[Vec<u64>],
    dense: &BTreeMap<String, DenseEntry>,
    dense_step: u64,
) -> Result<CheckpointInfo> {
    let base_step = chain.files.first().map_or(0, |f| f.step);
    let header = header_bytes(FileKind::Delta, shard_index, num_shards, step);
    let (path, (bytes, body_crc, rows)) = write_atomic(dir, &delta_name(step), |f| {
        write_framed(f, &header, |w| {
            w.u64(base_step)?;
            w.u64(chain.step)?;
            w.u32(tables.len() as u32)?;
            let mut rows = 0u64;
            for (i, t) in tables.iter().enumerate() {
                w.table_config(&t.spec().config)?;
                let tomb = tombstones.get(i).map(Vec::as_slice).unwrap_or(&[]);
                w.u64(tomb.len() as u64)?;
                for id in tomb {
                    w.u64(*id)?;
                }
                let width = t.dim() + t.spec().opt.state_len(t.dim());
                let mut block: Vec<u8> = Vec::with_capacity(DELTA_BLOCK_ROWS * (20 + 4 * width));
                let mut n = 0u32;
                let mut res = Ok(());
                let taken = t.take_changed(|id, count, last, vals| {
                    if res.is_err() {
                        return;
                    }
                    block.extend_from_slice(&id.to_le_bytes());
                    block.extend_from_slice(&count.to_le_bytes());
                    block.extend_from_slice(&last.to_le_bytes());
                    for x in vals {
                        block.extend_from_slice(&x.to_le_bytes());
                    }
                    n += 1;
                    if n as usize == DELTA_BLOCK_ROWS {
                        res = w.u32(n).and_then(|()| w.put(&block));
                        rows += u64::from(n);
                        block.clear();
                        n = 0;
                    }
                });
                res?;
                if taken.is_none() {
                    return Err(std::io::Error::other(format!(
                        "table `{}`: the list of changed rows overflowed; a full checkpoint is needed",
                        t.spec().name()
                    )));
                }
                if n > 0 {
                    w.u32(n)?;
                    w.put(&block)?;
                    rows += u64::from(n);
                }
                w.u32(0)?;
                w.pending(t)?;
            }
            w.dense(dense, dense_step)?;
            Ok(rows)
        })
    })?;
    Ok(CheckpointInfo {
        path,
        bytes,
        rows,
        kind: FileKind::Delta,
        body_crc,
    })
}

/// An upper bound of the rows of `tables` a delta would hold now, or `None`
/// when a table cannot write one (changes untracked or a list overflowed).
pub fn count_changed(tables: &[Arc<Table>]) -> Option<u64> {
    tables.iter().map(|t| t.changed_rows()).sum()
}

/// The rows, tombstones, last pending counts and configs of one table
/// collected from the deltas of a chain.
struct TableOverlay {
    spec: TableSpec,
    /// id -> index into `meta` (Some) or removed (None), the latest delta wins.
    slots: FxHashMap<u64, Option<u32>>,
    meta: Vec<(u64, u32, u64)>,
    vals: Vec<f32>,
    width: usize,
    pending: Vec<(u64, u32)>,
}

/// What the deltas of a chain change, collected while they are verified.
struct Overlay {
    /// Table configs of the base (checked against every delta).
    base_specs: BTreeMap<String, TableConfig>,
    /// Rows of each table in the base.
    base_rows: BTreeMap<String, u64>,
    tables: Vec<TableOverlay>,
    cur: usize,
    seen_in_file: FxHashSet<String>,
    /// Each delta's tables (path, names), in chain order.
    file_tables: Vec<(PathBuf, FxHashSet<String>)>,
    dense: BTreeMap<String, DenseEntry>,
    dense_step: u64,
    path: PathBuf,
}

impl Overlay {
    fn start_file(&mut self, path: &Path) {
        self.path = path.to_path_buf();
        self.seen_in_file.clear();
        self.dense.clear();
    }
    /// Every table known so far must appear in each delta (all pending
    /// counts are written every time).
    fn end_file(&self) -> Result<()> {
        for name in self
            .base_specs
            .keys()
            .chain(self.tables.iter().map(|t| &t.spec.config.name))
        {
            if !self.seen_in_file.contains(name) {
                return Err(corrupt(&self.path, format!("table `{name}` is missing")));
            }
        }
        Ok(())
    }
}

impl Visitor for Overlay {
    fn table(&mut self, spec: &TableSpec) -> Result<()> {
        let name = spec.name();
        if let Some(cfg) = self.base_specs.get(name) {
            if *cfg != spec.config {
                return Err(corrupt(
                    &self.path,
                    format!("table `{name}` has another config than in the chain's base"),
                ));
            }
        }
        self.seen_in_file.insert(name.to_string());
        match self.tables.iter().position(|t| t.spec.name() == name) {
            Some(i) => {
                if self.tables[i].spec.config != spec.config {
                    return Err(corrupt(
                        &self.path,
                        format!("table `{name}` changed its config within the chain"),
                    ));
                }
                self.tables[i].pending.clear();
                self.cur = i;
            }
            None => {
                self.tables.push(TableOverlay {
                    spec: spec.clone(),
                    slots: FxHashMap::default(),
                    meta: Vec::new(),
                    vals: Vec::new(),
                    width: spec.dim + spec.opt.state_len(spec.dim),
                    pending: Vec::new(),
                });
                self.cur = self.tables.len() - 1;
            }
        }
        Ok(())
    }
    fn row(&mut self, id: u64, count: u32, step: u64, vals: &[f32]) -> Result<()> {
        let t = &mut self.tables[self.cur];
        let i = u32::try_from(t.meta.len())
            .map_err(|_| corrupt(&self.path, "more than 2^32 delta rows in one table"))?;
        t.meta.push((id, count, step));
        t.vals.extend_from_slice(vals);
        t.slots.insert(id, Some(i));
        Ok(())
    }
    fn tombstone(&mut self, id: u64) -> Result<()> {
        self.tables[self.cur].slots.insert(id, None);
        Ok(())
    }
    fn pending(&mut self, id: u64, count: u32) -> Result<()> {
        self.tables[self.cur].pending.push((id, count));
        Ok(())
    }
    fn dense(&mut self, name: String, entry: DenseEntry) -> Result<()> {
        self.dense.insert(name, entry);
        Ok(())
    }
    fn dense_step(&mut self, step: u64) -> Result<()> {
        self.dense_step = step;
        Ok(())
    }
}

/// Records the base's table configs and row counts (verification pass:
/// reads the file sequentially without decoding values).
#[derive(Default)]
struct BaseSpecs {
    specs: BTreeMap<String, TableConfig>,
    rows: BTreeMap<String, u64>,
    /// The current table and its rows so far.
    cur: Option<(String, u64)>,
}

impl BaseSpecs {
    fn end_table(&mut self) {
        if let Some((name, n)) = self.cur.take() {
            *self.rows.entry(name).or_default() += n;
        }
    }
}

impl Visitor for BaseSpecs {
    fn table(&mut self, spec: &TableSpec) -> Result<()> {
        self.end_table();
        self.specs
            .insert(spec.name().to_string(), spec.config.clone());
        self.cur = Some((spec.name().to_string(), 0));
        Ok(())
    }
    fn row(&mut self, _: u64, _: u32, _: u64, _: &[f32]) -> Result<()> {
        if let Some((_, n)) = &mut self.cur {
            *n += 1;
        }
        Ok(())
    }
    fn wants_values(&self) -> bool {
        false
    }
    fn file_order(&self) -> bool {
        true
    }
    fn pending(&mut self, _: u64, _: u32) -> Result<()> {
        Ok(())
    }
    fn dense(&mut self, _: String, _: DenseEntry) -> Result<()> {
        Ok(())
    }
    fn dense_step(&mut self, _: u64) -> Result<()> {
        self.end_table();
        Ok(())
    }
}

/// Streams the base to the sink, leaving out rows the deltas replace or
/// remove, and (when there are deltas) the base's pending counts and dense
/// parameters, which the last delta supersedes.
struct BaseFilter<'a> {
    sink: &'a mut dyn Visitor,
    overlay: &'a Overlay,
    has_deltas: bool,
    cur: Option<usize>,
    rows: u64,
    /// The base file (for errors).
    path: &'a Path,
    /// Tables of the base, in file order.
    tables: Vec<String>,
}

impl Visitor for BaseFilter<'_> {
    fn table(&mut self, spec: &TableSpec) -> Result<()> {
        self.cur = self
            .overlay
            .tables
            .iter()
            .position(|t| t.spec.name() == spec.name());
        if let Some(i) = self.cur {
            if self.overlay.tables[i].spec.config != spec.config {
                return Err(corrupt(
                    self.path,
                    format!(
                        "table `{}` has another config than in the chain's deltas",
                        spec.name()
                    ),
                ));
            }
        }
        self.tables.push(spec.name().to_string());
        self.sink.table(spec)
    }
    fn rows_hint(&mut self, rows: u64) -> Result<()> {
        self.sink.rows_hint(rows)
    }
    fn row(&mut self, id: u64, count: u32, step: u64, vals: &[f32]) -> Result<()> {
        if let Some(i) = self.cur {
            if self.overlay.tables[i].slots.contains_key(&id) {
                return Ok(());
            }
        }
        self.rows += 1;
        self.sink.row(id, count, step, vals)
    }
    fn wants_values(&self) -> bool {
        self.sink.wants_values()
    }
    fn file_order(&self) -> bool {
        self.sink.file_order()
    }
    fn pending(&mut self, id: u64, count: u32) -> Result<()> {
        if self.has_deltas {
            return Ok(());
        }
        self.sink.pending(id, count)
    }
    fn dense(&mut self, name: String, entry: DenseEntry) -> Result<()> {
        if self.has_deltas {
            return Ok(());
        }
        self.sink.dense(name, entry)
    }
    fn dense_step(&mut self, step: u64) -> Result<()> {
        if self.has_deltas {
            return Ok(());
        }
        self.sink.dense_step(step)
    }
}

/// Verifies a whole chain by reading every file (checksums, structure,
/// finite values, the deltas' links to their base and predecessor, table
/// configs), changing nothing. Returns the deltas' overlay.
fn verify_collect(dir: &Path, m: &Manifest, label: &Path) -> Result<Overlay> {
    check_files(dir, m, label)?;
    let (si, ns) = (m.shard_index, m.num_shards);
    let bp = dir.join(&m.files[0].file);
    let mut specs = BaseSpecs::default();
    checkpoint::scan(&bp, si, ns, &mut specs)?;
    collect_deltas(dir, m, label, specs.specs, specs.rows)
}

/// Verifies and collects the deltas of chain `m` (their links to the base
/// and to each other, table configs against `base_specs` and each other).
fn collect_deltas(
    dir: &Path,
    m: &Manifest,
    label: &Path,
    base_specs: BTreeMap<String, TableConfig>,
    base_rows: BTreeMap<String, u64>,
) -> Result<Overlay> {
    let (si, ns) = (m.shard_index, m.num_shards);
    let base = &m.files[0];
    let mut ov = Overlay {
        base_rows,
        base_specs,
        tables: Vec::new(),
        cur: 0,
        seen_in_file: FxHashSet::default(),
        file_tables: Vec::new(),
        dense: BTreeMap::new(),
        dense_step: 0,
        path: dir.join(&base.file),
    };
    let mut prev = base.step;
    for f in &m.files[1..] {
        let p = dir.join(&f.file);
        ov.start_file(&p);
        let s = checkpoint::scan(&p, si, ns, &mut ov)?;
        if s.base_step != base.step || s.prev_step != prev {
            return Err(corrupt(
                &p,
                format!(
                    "delta follows base {} and step {}, the chain has base {} and step {prev} (a gap or a mixed chain; {})",
                    s.base_step,
                    s.prev_step,
                    base.step,
                    label.display()
                ),
            ));
        }
        ov.end_file()?;
        ov.file_tables.push((p.clone(), ov.seen_in_file.clone()));
        prev = f.step;
    }
    Ok(ov)
}

/// Fully verifies every file of a chain (see [`restore_chain`]'s first
/// pass) without loading anything.
pub fn verify_chain(dir: &Path, m: &Manifest) -> Result<()> {
    let label = dir.join(manifest_name(m.step));
    verify_collect(dir, m, &label).map(|_| ())
}

/// Streams the state of chain `m` into `sink`: first verifies every file
/// (nothing changes on error), then calls `before_load` (where a shard
/// drops its live state), then feeds the base's surviving rows, the deltas'
/// rows, the last file's pending counts and dense parameters to `sink`.
/// Returns the rows fed. An error after `before_load` is returned as
/// [`PsError::RestoreAborted`].
pub fn restore_chain(
    dir: &Path,
    m: &Manifest,
    sink: &mut dyn Visitor,
    before_load: impl FnOnce(),
) -> Result<u64> {
    let label = if m.files.len() > 1 {
        dir.join(manifest_name(m.step))
    } else {
        dir.join(&m.files[0].file)
    };
    let ov = verify_collect(dir, m, &label)?;
    before_load();
    // Size each table for its rows (at most the base's plus the deltas'), so
    // the load never grows an index and can read the base sequentially.
    let mut expect: BTreeMap<&str, u64> =
        ov.base_rows.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    for t in &ov.tables {
        *expect.entry(t.spec.name()).or_default() += t.slots.values().flatten().count() as u64;
    }
    let mut load = || -> Result<u64> {
        for (name, rows) in &expect {
            sink.expect_rows(name, *rows)?;
        }
        feed(dir, m, &ov, sink)
    };
    load().map_err(|e| PsError::RestoreAborted {
        step: m.step,
        source: Box::new(e),
    })
}

/// Feeds chain `m` to `sink`: the base's rows the deltas (collected in `ov`)
/// do not replace or remove, then the deltas' rows, the last file's pending
/// counts and dense state. The base is checked while it streams (structure,
/// values, crc at its end; table configs against the deltas'). Returns the
/// rows fed.
fn feed(dir: &Path, m: &Manifest, ov: &Overlay, sink: &mut dyn Visitor) -> Result<u64> {
    let has_deltas = m.files.len() > 1;
    let bp = dir.join(&m.files[0].file);
    let mut bf = BaseFilter {
        sink,
        overlay: ov,
        has_deltas,
        cur: None,
        rows: 0,
        path: &bp,
        tables: Vec::new(),
    };
    checkpoint::scan(&bp, m.shard_index, m.num_shards, &mut bf)?;
    let mut rows = bf.rows;
    let base_tables = std::mem::take(&mut bf.tables);
    if has_deltas {
        // Every delta holds every table of the base (as Overlay::end_file
        // checks when the base's tables were known before the deltas).
        for (path, names) in &ov.file_tables {
            if let Some(t) = base_tables.iter().find(|t| !names.contains(t.as_str())) {
                return Err(corrupt(path, format!("table `{t}` is missing")));
            }
        }
        for t in &ov.tables {
            sink.table(&t.spec)?;
            for &slot in t.slots.values().flatten() {
                let i = slot as usize;
                let (id, count, step) = t.meta[i];
                sink.row(id, count, step, &t.vals[i * t.width..(i + 1) * t.width])?;
                rows += 1;
            }
            for &(id, c) in &t.pending {
                sink.pending(id, c)?;
            }
        }
        for (name, e) in &ov.dense {
            sink.dense(name.clone(), e.clone())?;
        }
        sink.dense_step(ov.dense_step)?;
    }
    Ok(rows)
}

/// Streams chain `m` into `sink` with ONE pass over the base, for a sink
/// whose owner holds no state (a shard starting up, so an error changes
/// nothing that existed): the deltas (small) are verified and collected
/// first, then the base is checked while it loads; its crc is known only at
/// its end, so on any error the caller must drop what the sink received.
/// Tables are sized from the base's first stripe block
/// ([`Visitor::rows_hint`]). Returns the rows fed.
pub fn restore_chain_fresh(dir: &Path, m: &Manifest, sink: &mut dyn Visitor) -> Result<u64> {
    let label = if m.files.len() > 1 {
        dir.join(manifest_name(m.step))
    } else {
        dir.join(&m.files[0].file)
    };
    check_files(dir, m, &label)?;
    let ov = collect_deltas(dir, m, &label, BTreeMap::new(), BTreeMap::new())?;
    feed(dir, m, &ov, sink)
}

/// Deletes the oldest restorable steps so that at most `keep` remain
/// (`keep == 0` keeps all): their manifests first, then every file no kept
/// chain needs. A base that a kept delta needs stays (and so stays
/// restorable); a delta is never kept without its base. Returns the steps
/// that are no longer restorable.
pub fn retain(dir: &Path, shard_index: u32, num_shards: u32, keep: u32) -> Result<Vec<u64>> {
    if keep == 0 {
        return Ok(Vec::new());
    }
    let (good, _) = list(dir, shard_index, num_shards)?;
    let n_drop = good.len().saturating_sub(keep as usize);
    if n_drop == 0 {
        return Ok(Vec::new());
    }
    let (dropped, kept) = good.split_at(n_drop);
    let needed: FxHashSet<&str> = kept
        .iter()
        .flat_map(|m| m.files.iter().map(|f| f.file.as_str()))
        .collect();
    let remove = |p: &Path| -> Result<()> {
        match fs::remove_file(p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(PsError::io(format!("removing {}", p.display()), e)),
        }
    };
    let mut gone = Vec::new();
    for m in dropped {
        if m.files.len() > 1 {
            remove(&dir.join(manifest_name(m.step)))?;
        }
        for f in &m.files {
            if !needed.contains(f.file.as_str()) {
                remove(&dir.join(&f.file))?;
            }
        }
        if m.files.len() > 1 || !needed.contains(m.files[0].file.as_str()) {
            gone.push(m.step);
        }
    }
    Ok(gone)
}
