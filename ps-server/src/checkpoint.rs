//! Checkpoint files of one shard: the full (base) format, the delta format,
//! their streaming decoder and the atomic file writer.
//!
//! A base is `<dir>/shard-<i>-of-<n>/step-<step>.ckpt` (all integers LE):
//!
//! ```text
//! header  (32 B): magic "EMBERPSK", version u32, shard_index u32,
//!                 num_shards u32, step u64, crc32(previous 28 bytes) u32
//! body          : u32 tables, per table:
//!                   u32 len + TableConfig (protobuf),
//!                   64 stripe blocks of (u64 rows, rows of
//!                     [id u64, count u32, last_step u64, f32 * (dim + state)]),
//!                   (values as f32 whatever the table's precision: the
//!                   config names it, and restore rounds back exactly),
//!                   u64 pending, pending of [id u64, count u32]
//!                 u32 dense params, per param:
//!                   u32 len + name, u8 has_opt, [u32 len + OptimizerConfig],
//!                   u64 n + f32 values, u64 n + f32 optimizer state
//!                 u64 dense_step
//! trailer (20 B): body_len u64, crc32(body) u32, magic "EMBEREND"
//! ```
//!
//! A delta is `delta-<step>.ckpt` with the same header (magic "EMBERPSD")
//! and trailer; its body holds only what changed since the previous
//! checkpoint of its chain (see `ckpt_chain` for chains and manifests):
//!
//! ```text
//! body          : u64 base_step, u64 prev_step, u32 tables, per table:
//!                   u32 len + TableConfig,
//!                   u64 tombstones, tombstones of [id u64],
//!                   row blocks of (u32 rows > 0, rows as above), u32 0,
//!                   u64 pending, pending of [id u64, count u32]  (all of them)
//!                 dense params and dense_step as in a base (all of them)
//! ```
//!
//! A file is written to a hidden temp name, fsynced, renamed into place and
//! the directory fsynced, so a crash never leaves a half-written
//! `*.ckpt`. Listing checks header crc, trailer and file size (cheap);
//! decoding checks the body crc (computed over the 8 MiB blocks as they are
//! read, no second pass), the structure and that every weight and optimizer
//! value is finite.

use crate::dense::DenseEntry;
use crate::error::{PsError, Result};
use crate::optim::Optimizer;
use crate::store::{Table, TableSpec, NUM_STRIPES};
use ember_proto::v1::{OptimizerConfig, TableConfig};
use prost::Message;
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Cursor, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Magic at the start of a base (full) checkpoint.
pub const MAGIC: &[u8; 8] = b"EMBERPSK";
/// Magic at the start of a delta checkpoint.
pub const DELTA_MAGIC: &[u8; 8] = b"EMBERPSD";
/// Magic at the end of a checkpoint.
pub const END_MAGIC: &[u8; 8] = b"EMBEREND";
/// Format version written and accepted.
pub const VERSION: u32 = 1;
const HEADER_LEN: u64 = 32;
const TRAILER_LEN: u64 = 20;
/// Size of the blocks checkpoints are read and written in.
pub const BLOCK_BYTES: usize = 8 << 20;

/// Directory of one shard's checkpoints under the checkpoint root.
pub fn shard_dir(root: &Path, shard_index: u32, num_shards: u32) -> PathBuf {
    root.join(format!("shard-{shard_index}-of-{num_shards}"))
}

/// File name of the base checkpoint of `step`.
pub fn base_name(step: u64) -> String {
    format!("step-{step}.ckpt")
}

/// File name of the delta checkpoint of `step`.
pub fn delta_name(step: u64) -> String {
    format!("delta-{step}.ckpt")
}

/// Path of the base checkpoint of `step` in a shard directory.
pub fn step_path(dir: &Path, step: u64) -> PathBuf {
    dir.join(base_name(step))
}

/// Whether a checkpoint file is a full state or the changes since the
/// previous checkpoint of its chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// A full checkpoint (`step-*.ckpt`).
    Base,
    /// A delta (`delta-*.ckpt`).
    Delta,
}

impl FileKind {
    /// "base" or "delta".
    pub fn as_str(self) -> &'static str {
        match self {
            FileKind::Base => "base",
            FileKind::Delta => "delta",
        }
    }
}

/// What a written checkpoint holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointInfo {
    /// The written file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// Sparse rows written.
    pub rows: u64,
    /// Base or delta.
    pub kind: FileKind,
    /// crc32 of the body (as in the trailer).
    pub body_crc: u32,
}

/// A checkpoint read back, ready to replace a shard's state.
pub struct Loaded {
    /// Step of the checkpoint.
    pub step: u64,
    /// Sparse tables with their rows and pending counts.
    pub tables: Vec<Table>,
    /// Dense parameters.
    pub dense: BTreeMap<String, DenseEntry>,
    /// Dense step.
    pub dense_step: u64,
    /// Sparse rows loaded.
    pub rows: u64,
}

// ------------------------------------------------------------------ writing

/// Buffers a checkpoint body in large blocks, computing its crc once per
/// block.
pub(crate) struct BlockWriter<'a> {
    f: &'a mut File,
    buf: Vec<u8>,
    crc: crc32fast::Hasher,
    len: u64,
}

impl<'a> BlockWriter<'a> {
    pub(crate) fn new(f: &'a mut File) -> Self {
        BlockWriter {
            f,
            buf: Vec::with_capacity(BLOCK_BYTES),
            crc: crc32fast::Hasher::new(),
            len: 0,
        }
    }
    fn flush_block(&mut self) -> std::io::Result<()> {
        self.crc.update(&self.buf);
        self.f.write_all(&self.buf)?;
        self.len += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }
    pub(crate) fn put(&mut self, b: &[u8]) -> std::io::Result<()> {
        if self.buf.len() + b.len() > BLOCK_BYTES {
            self.flush_block()?;
        }
        if b.len() > BLOCK_BYTES {
            self.crc.update(b);
            self.f.write_all(b)?;
            self.len += b.len() as u64;
        } else {
            self.buf.extend_from_slice(b);
        }
        Ok(())
    }
    pub(crate) fn u8(&mut self, v: u8) -> std::io::Result<()> {
        self.put(&[v])
    }
    pub(crate) fn u32(&mut self, v: u32) -> std::io::Result<()> {
        self.put(&v.to_le_bytes())
    }
    pub(crate) fn u64(&mut self, v: u64) -> std::io::Result<()> {
        self.put(&v.to_le_bytes())
    }
    pub(crate) fn f32s(&mut self, v: &[f32]) -> std::io::Result<()> {
        for chunk in v.chunks(BLOCK_BYTES / 8) {
            if self.buf.len() + chunk.len() * 4 > BLOCK_BYTES {
                self.flush_block()?;
            }
            for x in chunk {
                self.buf.extend_from_slice(&x.to_le_bytes());
            }
        }
        Ok(())
    }
    /// One sparse row: `[id u64, count u32, last_step u64, f32 * width]`.
    pub(crate) fn row(
        &mut self,
        id: u64,
        count: u32,
        step: u64,
        vals: &[f32],
    ) -> std::io::Result<()> {
        let need = 20 + vals.len() * 4;
        if self.buf.len() + need > BLOCK_BYTES {
            self.flush_block()?;
        }
        if need > BLOCK_BYTES {
            self.u64(id)?;
            self.u32(count)?;
            self.u64(step)?;
            return self.f32s(vals);
        }
        self.buf.extend_from_slice(&id.to_le_bytes());
        self.buf.extend_from_slice(&count.to_le_bytes());
        self.buf.extend_from_slice(&step.to_le_bytes());
        for x in vals {
            self.buf.extend_from_slice(&x.to_le_bytes());
        }
        Ok(())
    }
    pub(crate) fn table_config(&mut self, cfg: &TableConfig) -> std::io::Result<()> {
        let b = cfg.encode_to_vec();
        self.u32(b.len() as u32)?;
        self.put(&b)
    }
    pub(crate) fn pending(&mut self, t: &Table) -> std::io::Result<()> {
        let mut pending = Vec::new();
        t.for_each_pending(|id, c| pending.push((id, c)));
        self.u64(pending.len() as u64)?;
        for (id, c) in pending {
            self.u64(id)?;
            self.u32(c)?;
        }
        Ok(())
    }
    pub(crate) fn dense(
        &mut self,
        dense: &BTreeMap<String, DenseEntry>,
        dense_step: u64,
    ) -> std::io::Result<()> {
        self.u32(dense.len() as u32)?;
        for (name, e) in dense {
            self.u32(name.len() as u32)?;
            self.put(name.as_bytes())?;
            match &e.opt_config {
                Some(c) => {
                    let b = c.encode_to_vec();
                    self.u8(1)?;
                    self.u32(b.len() as u32)?;
                    self.put(&b)?;
                }
                None => self.u8(0)?,
            }
            self.u64(e.values.len() as u64)?;
            self.f32s(&e.values)?;
            self.u64(e.state.len() as u64)?;
            self.f32s(&e.state)?;
        }
        self.u64(dense_step)
    }
    /// Flushes the body; returns `(body_len, crc)`.
    pub(crate) fn finish(mut self) -> std::io::Result<(u64, u32)> {
        self.flush_block()?;
        Ok((self.len, self.crc.finalize()))
    }
}

pub(crate) fn header_bytes(
    kind: FileKind,
    shard_index: u32,
    num_shards: u32,
    step: u64,
) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN as usize);
    h.extend_from_slice(match kind {
        FileKind::Base => MAGIC,
        FileKind::Delta => DELTA_MAGIC,
    });
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&shard_index.to_le_bytes());
    h.extend_from_slice(&num_shards.to_le_bytes());
    h.extend_from_slice(&step.to_le_bytes());
    let crc = crc32fast::hash(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h
}

/// Writes a framed checkpoint file body: header, `body`, trailer (the
/// atomic write around it fsyncs). Returns `(file bytes, body crc, what body
/// returned)`.
pub(crate) fn write_framed<T>(
    f: &mut File,
    header: &[u8],
    body: impl FnOnce(&mut BlockWriter<'_>) -> std::io::Result<T>,
) -> std::io::Result<(u64, u32, T)> {
    f.write_all(header)?;
    let mut w = BlockWriter::new(f);
    let out = body(&mut w)?;
    let (body_len, crc) = w.finish()?;
    f.write_all(&body_len.to_le_bytes())?;
    f.write_all(&crc.to_le_bytes())?;
    f.write_all(END_MAGIC)?;
    Ok((HEADER_LEN + body_len + TRAILER_LEN, crc, out))
}

/// Names of the hidden temp files of interrupted writes: `.<name>.tmp`
/// where name starts with one of these.
const TMP_KINDS: [&str; 3] = [".step-", ".delta-", ".manifest-"];

/// Removes temp files left in `dir` by an interrupted write (a killed
/// process). Only called while the caller holds the shard's checkpoint lock,
/// so no write of this process is in progress. Best effort.
fn remove_stale_temps(dir: &Path) {
    let Ok(rd) = fs::read_dir(dir) else {
        return;
    };
    for entry in rd.flatten() {
        let name = entry.file_name();
        let stale = name
            .to_str()
            .is_some_and(|n| TMP_KINDS.iter().any(|k| n.starts_with(k)) && n.ends_with(".tmp"));
        if stale {
            match fs::remove_file(entry.path()) {
                Ok(()) => {
                    tracing::info!(path = %entry.path().display(), "removed the temp file of an interrupted checkpoint")
                }
                Err(e) => {
                    tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove a stale checkpoint temp file")
                }
            }
        }
    }
}

/// Writes `<dir>/<name>` atomically through [`ember_proto::atomic::write_atomic`]:
/// `body` writes the hidden temp file `.<name>.tmp`, which is then fsynced,
/// renamed into place and the directory fsynced. On any error the temp file
/// is removed and the error names the file and the OS error; `<dir>/<name>`
/// is not created or changed. `dir` is created if needed, and temp files of
/// interrupted earlier writes are removed first (the caller serializes
/// writes to `dir`).
pub(crate) fn write_atomic<T>(
    dir: &Path,
    name: &str,
    body: impl FnOnce(&mut File) -> std::io::Result<T>,
) -> Result<(PathBuf, T)> {
    let path = dir.join(name);
    fs::create_dir_all(dir).map_err(|e| PsError::io(format!("creating {}", dir.display()), e))?;
    remove_stale_temps(dir);
    let out = ember_proto::atomic::write_atomic(&path, body)
        .map_err(|e| PsError::io(e.context, e.source))?;
    Ok((path, out))
}

/// Writes a base (full) checkpoint atomically and returns what it holds.
///
/// The file is written to `.step-<step>.ckpt.tmp`, fsynced and renamed to
/// `step-<step>.ckpt`. On any error (disk full, permission denied, ...) the
/// temp file is removed and the returned error names the file and the OS
/// error; no `step-*.ckpt` is created or changed. Temp files left by an
/// interrupted earlier write are removed first (the caller serializes
/// writes to `dir`).
pub fn write(
    dir: &Path,
    shard_index: u32,
    num_shards: u32,
    step: u64,
    tables: &[Arc<Table>],
    dense: &BTreeMap<String, DenseEntry>,
    dense_step: u64,
) -> Result<CheckpointInfo> {
    let header = header_bytes(FileKind::Base, shard_index, num_shards, step);
    let (path, (bytes, body_crc, rows)) = write_atomic(dir, &base_name(step), |f| {
        write_framed(f, &header, |w| {
            let mut rows = 0u64;
            w.u32(tables.len() as u32)?;
            for t in tables {
                w.table_config(&t.spec().config)?;
                for s in 0..NUM_STRIPES {
                    // Count and rows under the same read lock.
                    let view = t.stripe_rows(s);
                    let n = view.len() as u64;
                    w.u64(n)?;
                    let mut res = Ok(());
                    view.for_each(|id, count, last, vals| {
                        if res.is_ok() {
                            res = w.row(id, count, last, vals);
                        }
                    });
                    res?;
                    rows += n;
                }
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
        kind: FileKind::Base,
        body_crc,
    })
}

// ------------------------------------------------------------------ reading

fn corrupt(path: &Path, reason: impl Into<String>) -> PsError {
    PsError::CorruptCheckpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Header and trailer of a checkpoint file (checked, body not read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// Base or delta.
    pub kind: FileKind,
    /// Step in the header.
    pub step: u64,
    /// Body length from the trailer.
    pub body_len: u64,
    /// Body crc from the trailer.
    pub body_crc: u32,
    /// File size.
    pub bytes: u64,
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[i..i + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[i..i + 8]);
    u64::from_le_bytes(a)
}

/// Checks magic, version, header crc, shard identity, trailer and size of a
/// checkpoint of `size` bytes read from `f` (`path` labels errors) and leaves
/// `f` at the start of the body.
fn check_frame<R: Read + Seek>(
    f: &mut R,
    size: u64,
    path: &Path,
    shard_index: u32,
    num_shards: u32,
) -> Result<Frame> {
    if size < HEADER_LEN + TRAILER_LEN {
        return Err(corrupt(path, format!("truncated: {size} bytes")));
    }
    let mut h = [0u8; HEADER_LEN as usize];
    f.seek(SeekFrom::Start(0))
        .and_then(|_| f.read_exact(&mut h))
        .map_err(|e| PsError::io(format!("reading {}", path.display()), e))?;
    let kind = if &h[0..8] == MAGIC {
        FileKind::Base
    } else if &h[0..8] == DELTA_MAGIC {
        FileKind::Delta
    } else {
        return Err(corrupt(path, "bad magic (not an Ember shard checkpoint)"));
    };
    if crc32fast::hash(&h[..28]) != u32_at(&h, 28) {
        return Err(corrupt(path, "header checksum mismatch"));
    }
    let version = u32_at(&h, 8);
    if version != VERSION {
        return Err(corrupt(
            path,
            format!("unsupported version {version} (expected {VERSION})"),
        ));
    }
    let (si, ns, step) = (u32_at(&h, 12), u32_at(&h, 16), u64_at(&h, 20));
    if (si, ns) != (shard_index, num_shards) {
        return Err(PsError::FailedPrecondition(format!(
            "checkpoint {} belongs to shard {si} of {ns}, this is shard {shard_index} of {num_shards}",
            path.display()
        )));
    }
    let mut t = [0u8; TRAILER_LEN as usize];
    f.seek(SeekFrom::Start(size - TRAILER_LEN))
        .and_then(|_| f.read_exact(&mut t))
        .map_err(|e| PsError::io(format!("reading {}", path.display()), e))?;
    if &t[12..20] != END_MAGIC {
        return Err(corrupt(path, "truncated: end marker missing"));
    }
    let body_len = u64_at(&t, 0);
    let framed = body_len.checked_add(HEADER_LEN + TRAILER_LEN);
    if framed != Some(size) {
        return Err(corrupt(
            path,
            match framed {
                Some(n) => format!("truncated: {size} bytes, header says {n}"),
                None => format!("body length {body_len} in the trailer is impossible"),
            },
        ));
    }
    f.seek(SeekFrom::Start(HEADER_LEN))
        .map_err(|e| PsError::io(format!("reading {}", path.display()), e))?;
    Ok(Frame {
        kind,
        step,
        body_len,
        body_crc: u32_at(&t, 8),
        bytes: size,
    })
}

/// Opens `path` and checks its frame (magic, header crc, shard identity,
/// trailer, size), without reading the body.
pub fn open_checked(path: &Path, shard_index: u32, num_shards: u32) -> Result<(File, Frame)> {
    let mut f =
        File::open(path).map_err(|e| PsError::io(format!("opening {}", path.display()), e))?;
    let size = f
        .metadata()
        .map_err(|e| PsError::io(format!("stat of {}", path.display()), e))?
        .len();
    let frame = check_frame(&mut f, size, path, shard_index, num_shards)?;
    Ok((f, frame))
}

/// Good steps (ascending) and the files that failed their checks.
pub type Listing = (Vec<u64>, Vec<(PathBuf, PsError)>);

/// Steps of the good base checkpoints (header and trailer verified) in
/// `dir`, ascending, and the files that failed the check. Deltas are listed
/// by `ckpt_chain::list`.
pub fn list(dir: &Path, shard_index: u32, num_shards: u32) -> Result<Listing> {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((good, bad)),
        Err(e) => return Err(PsError::io(format!("listing {}", dir.display()), e)),
    };
    for entry in rd.flatten() {
        let name = entry.file_name();
        let Some(step) = name
            .to_str()
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|n| n.strip_suffix(".ckpt"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let path = entry.path();
        match open_checked(&path, shard_index, num_shards) {
            Ok((_, fr)) if fr.step == step && fr.kind == FileKind::Base => good.push(step),
            Ok((_, fr)) => bad.push((
                path.clone(),
                corrupt(
                    &path,
                    format!(
                        "file name says base step {step}, header says {} step {}",
                        fr.kind.as_str(),
                        fr.step
                    ),
                ),
            )),
            Err(e) => bad.push((path, e)),
        }
    }
    good.sort_unstable();
    Ok((good, bad))
}

/// Receives the contents of a checkpoint file as it is decoded, in file
/// order: for each table, `table` then its tombstones, rows and pending
/// counts; then the dense parameters and the dense step.
pub trait Visitor {
    /// A table starts; the following rows, tombstones and pending counts are its.
    fn table(&mut self, spec: &TableSpec) -> Result<()>;
    /// A stored row: id, count, last-update step, embedding then optimizer state.
    fn row(&mut self, id: u64, count: u32, step: u64, vals: &[f32]) -> Result<()>;
    /// A row removed since the previous checkpoint (deltas only).
    fn tombstone(&mut self, _id: u64) -> Result<()> {
        Ok(())
    }
    /// A pending count (an id with a count but no row).
    fn pending(&mut self, id: u64, count: u32) -> Result<()>;
    /// A dense parameter.
    fn dense(&mut self, name: String, entry: DenseEntry) -> Result<()>;
    /// The dense step (last item of the body).
    fn dense_step(&mut self, step: u64) -> Result<()>;
    /// Whether `row` needs the values: a visitor that only counts or checks
    /// structure says `false` and gets an empty slice (the values are still
    /// checked to be finite, on their raw bits).
    fn wants_values(&self) -> bool {
        true
    }
    /// Whether a base's rows may come in file order. A visitor that inserts
    /// them into a growing hash index says `false` and gets each stripe
    /// block in a spread order (rows stored in index order would build long
    /// probe runs); one that sized its tables first ([`Visitor::expect_rows`])
    /// says `true` and reads the file sequentially.
    fn file_order(&self) -> bool {
        false
    }
    /// About `rows` rows of table `name` will follow (a restore sizes the
    /// table before loading it).
    fn expect_rows(&mut self, _name: &str, _rows: u64) -> Result<()> {
        Ok(())
    }
    /// An estimate of the current base table's rows, from its first stripe
    /// block (the block's rows times the stripe count, plus 2%), for a
    /// visitor that reads in file order without an exact count.
    fn rows_hint(&mut self, _rows: u64) -> Result<()> {
        Ok(())
    }
}

/// What a fully decoded file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scanned {
    /// Header and trailer.
    pub frame: Frame,
    /// Base step of a delta's chain (the file's own step for a base).
    pub base_step: u64,
    /// Step of the checkpoint a delta follows (the file's own step for a base).
    pub prev_step: u64,
    /// Rows in the file.
    pub rows: u64,
    /// Tombstones in the file.
    pub tombstones: u64,
}

/// Reads a body in large blocks, computing its crc as the blocks arrive.
struct BlockReader<'p, R: Read> {
    r: R,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    /// Body bytes not yet read from `r`.
    left: u64,
    crc: crc32fast::Hasher,
    path: &'p Path,
}

impl<'p, R: Read> BlockReader<'p, R> {
    fn new(r: R, body_len: u64, path: &'p Path) -> Self {
        let cap = (body_len.min(BLOCK_BYTES as u64) as usize).max(64);
        BlockReader {
            r,
            buf: vec![0u8; cap],
            pos: 0,
            end: 0,
            left: body_len,
            crc: crc32fast::Hasher::new(),
            path,
        }
    }
    /// Body bytes not yet consumed.
    fn remaining(&self) -> u64 {
        (self.end - self.pos) as u64 + self.left
    }
    fn early(&self, n: u64) -> PsError {
        corrupt(
            self.path,
            format!(
                "body ends early: {n} bytes needed, {} left",
                self.remaining()
            ),
        )
    }
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        if self.end - self.pos < n {
            if n as u64 > self.remaining() {
                return Err(self.early(n as u64));
            }
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
            if self.buf.len() < n {
                self.buf.resize(n, 0);
            }
            while self.end < n {
                let want = ((self.buf.len() - self.end) as u64).min(self.left) as usize;
                let got = match self.r.read(&mut self.buf[self.end..self.end + want]) {
                    Ok(0) => return Err(self.early(n as u64)),
                    Ok(g) => g,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        return Err(PsError::io(format!("reading {}", self.path.display()), e))
                    }
                };
                self.crc.update(&self.buf[self.end..self.end + got]);
                self.end += got;
                self.left -= got as u64;
            }
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32_at(self.take(4)?, 0))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64_at(self.take(8)?, 0))
    }
    fn f32s(&mut self, n: usize) -> Result<Vec<f32>> {
        let bytes = n
            .checked_mul(4)
            .filter(|b| *b as u64 <= self.remaining())
            .ok_or_else(|| self.early((n as u64).saturating_mul(4)))?;
        let b = self.take(bytes)?;
        Ok(b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
    /// A u64 count of records of at least `min_record` bytes each, checked
    /// against the bytes left in the body.
    fn len_checked(&mut self, min_record: u64, what: &str) -> Result<usize> {
        let n = self.u64()?;
        if n > self.remaining() / min_record.max(1) {
            return Err(corrupt(
                self.path,
                format!(
                    "{what} count {n} exceeds the {} bytes left in the body",
                    self.remaining()
                ),
            ));
        }
        usize::try_from(n).map_err(|_| corrupt(self.path, format!("{what} count {n} too large")))
    }
}

/// Checks that every value of a row is finite; names the row and whether
/// the bad value is a weight or optimizer state.
fn check_row_finite(path: &Path, table: &str, dim: usize, id: u64, vals: &[f32]) -> Result<()> {
    if let Some(i) = vals.iter().position(|v| !v.is_finite()) {
        let what = if i < dim {
            "weights"
        } else {
            "optimizer state"
        };
        return Err(corrupt(
            path,
            format!(
                "non-finite value {} in the {what} of row {id} of table `{table}` (refusing to load it)",
                vals[i]
            ),
        ));
    }
    Ok(())
}

/// A step coprime with `n` near `n / phi`: `k * step % n` visits `0..n`
/// once each, consecutive visits far apart.
fn spread_stride(n: usize) -> usize {
    fn gcd(mut a: usize, mut b: usize) -> usize {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    }
    if n <= 2 {
        return 1;
    }
    let mut p = ((n as f64 * 0.618_034) as usize).max(1);
    while gcd(p, n) != 1 {
        p += 1;
    }
    p
}

/// Decodes one row of `width` values from `b` into `vals` (left empty
/// when `values` is false).
fn parse_row(b: &[u8], vals: &mut Vec<f32>, values: bool) -> (u64, u32, u64) {
    let id = u64_at(b, 0);
    let count = u32_at(b, 8);
    let last = u64_at(b, 12);
    let raw = &b[20..];
    vals.clear();
    if values {
        vals.resize(raw.len() / 4, 0.0);
        for (v, c) in vals.iter_mut().zip(raw.chunks_exact(4)) {
            *v = f32::from_bits(u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
        }
    }
    (id, count, last)
}

/// Whether every little-endian f32 in `raw` is finite (exponent bits not
/// all ones), without decoding.
fn raw_finite(raw: &[u8]) -> bool {
    raw.chunks_exact(4)
        .all(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7f80_0000 != 0x7f80_0000)
}

/// Decodes one row record and checks its values: finite on the raw bits,
/// with the detailed error (weight or state, which value) from a full decode
/// when not.
fn checked_row(
    rec: &[u8],
    vals: &mut Vec<f32>,
    values: bool,
    path: &Path,
    table: &str,
    dim: usize,
) -> Result<(u64, u32, u64)> {
    if !raw_finite(&rec[20..]) {
        let (id, _, _) = parse_row(rec, vals, true);
        check_row_finite(path, table, dim, id, vals)?;
    }
    Ok(parse_row(rec, vals, values))
}

/// Decodes the body that follows the header in `r` (a base or delta as
/// `frame` says), verifying its length, crc, structure and that every value
/// is finite, and feeds it to `v`. The crc is only known at the end: a
/// visitor that must not act on unverified data collects, or runs on a
/// file already verified by a previous scan.
fn scan_body<R: Read>(r: R, frame: &Frame, path: &Path, v: &mut dyn Visitor) -> Result<Scanned> {
    let mut b = BlockReader::new(r, frame.body_len, path);
    let delta = frame.kind == FileKind::Delta;
    let (base_step, prev_step) = if delta {
        let base = b.u64()?;
        let prev = b.u64()?;
        if !(base <= prev && prev < frame.step) {
            return Err(corrupt(
                path,
                format!(
                    "delta of step {} names base step {base} and previous step {prev} (expected base <= previous < step)",
                    frame.step
                ),
            ));
        }
        (base, prev)
    } else {
        (frame.step, frame.step)
    };
    let mut vals = Vec::new();
    let n_tables = b.u32()?;
    let mut names: Vec<String> = Vec::new();
    let (mut rows, mut tombstones) = (0u64, 0u64);
    for _ in 0..n_tables {
        let len = b.u32()? as usize;
        let cfg = TableConfig::decode(b.take(len)?)
            .map_err(|e| corrupt(path, format!("bad table config: {e}")))?;
        let spec = TableSpec::from_config(cfg)
            .map_err(|e| corrupt(path, format!("bad table config: {e}")))?;
        if names.iter().any(|n| n == spec.name()) {
            return Err(corrupt(
                path,
                format!("table `{}` appears twice", spec.name()),
            ));
        }
        names.push(spec.name().to_string());
        v.table(&spec)?;
        let dim = spec.dim;
        let width = dim + spec.opt.state_len(dim);
        let row_bytes = 20 + 4 * width;
        let name = spec.name().to_string();
        let values = v.wants_values();
        let mut one_row = |b: &mut BlockReader<'_, R>, v: &mut dyn Visitor| -> Result<()> {
            let (id, count, last) =
                checked_row(b.take(row_bytes)?, &mut vals, values, path, &name, dim)?;
            v.row(id, count, last, &vals)
        };
        if delta {
            let n = b.len_checked(8, "tombstone")?;
            for _ in 0..n {
                let id = b.u64()?;
                v.tombstone(id)?;
            }
            tombstones += n as u64;
            loop {
                let n = u64::from(b.u32()?);
                if n == 0 {
                    break;
                }
                if n > b.remaining() / row_bytes as u64 {
                    return Err(corrupt(
                        path,
                        format!(
                            "row block of {n} rows exceeds the {} bytes left in the body",
                            b.remaining()
                        ),
                    ));
                }
                for _ in 0..n {
                    one_row(&mut b, v)?;
                }
                rows += n;
            }
        } else {
            for stripe in 0..NUM_STRIPES {
                let n = b.len_checked(row_bytes as u64, "row")?;
                if stripe == 0 && v.file_order() {
                    let est = n as u64 * NUM_STRIPES as u64;
                    v.rows_hint(est + est / 50 + 64)?;
                }
                // A stripe's rows are stored in the order of its hash index
                // (linear probing on the low hash bits). Inserting them in
                // that order into a growing index piles them into long probe
                // runs (10x slower loads); a golden-ratio stride order
                // spreads them. The block is at most 1/64 of the table.
                let block = b.take(n * row_bytes)?;
                let p = if v.file_order() { 1 } else { spread_stride(n) };
                let mut i = 0usize;
                for _ in 0..n {
                    let (id, count, last) = checked_row(
                        &block[i * row_bytes..(i + 1) * row_bytes],
                        &mut vals,
                        values,
                        path,
                        &name,
                        dim,
                    )?;
                    v.row(id, count, last, &vals)?;
                    // i = k * p mod n, without a division per row.
                    i += p;
                    if i >= n {
                        i -= n;
                    }
                }
                rows += n as u64;
            }
        }
        let n = b.len_checked(12, "pending count")?;
        for _ in 0..n {
            let id = b.u64()?;
            let c = b.u32()?;
            v.pending(id, c)?;
        }
    }
    let n_dense = b.u32()?;
    let mut dense_names: Vec<String> = Vec::new();
    for _ in 0..n_dense {
        let len = b.u32()? as usize;
        let name = String::from_utf8(b.take(len)?.to_vec())
            .map_err(|_| corrupt(path, "dense name is not UTF-8"))?;
        if dense_names.contains(&name) {
            return Err(corrupt(path, format!("dense `{name}` appears twice")));
        }
        dense_names.push(name.clone());
        let opt_config = match b.u8()? {
            0 => None,
            1 => {
                let len = b.u32()? as usize;
                Some(
                    OptimizerConfig::decode(b.take(len)?)
                        .map_err(|e| corrupt(path, format!("bad optimizer config: {e}")))?,
                )
            }
            x => {
                return Err(corrupt(
                    path,
                    format!("dense `{name}`: optimizer flag {x} (expected 0 or 1)"),
                ))
            }
        };
        let opt = Optimizer::from_config(opt_config.as_ref())
            .map_err(|e| corrupt(path, format!("bad optimizer config: {e}")))?;
        let n = b.len_checked(4, "dense value")?;
        let values = b.f32s(n)?;
        let n = b.len_checked(4, "dense state")?;
        let state = b.f32s(n)?;
        if state.len() != opt.state_len(values.len()) {
            return Err(corrupt(
                path,
                format!("dense `{name}` has a state of the wrong size"),
            ));
        }
        for (what, xs) in [("values", &values), ("optimizer state", &state)] {
            if let Some(x) = xs.iter().find(|x| !x.is_finite()) {
                return Err(corrupt(
                    path,
                    format!("non-finite value {x} in the {what} of dense `{name}` (refusing to load it)"),
                ));
            }
        }
        v.dense(
            name,
            DenseEntry {
                values,
                state,
                opt,
                opt_config,
            },
        )?;
    }
    let dense_step = b.u64()?;
    if b.remaining() != 0 {
        return Err(corrupt(
            path,
            format!("{} unread bytes at the end of the body", b.remaining()),
        ));
    }
    if b.crc.clone().finalize() != frame.body_crc {
        return Err(corrupt(path, "body checksum mismatch"));
    }
    v.dense_step(dense_step)?;
    Ok(Scanned {
        frame: *frame,
        base_step,
        prev_step,
        rows,
        tombstones,
    })
}

/// Opens, frame-checks and fully decodes a checkpoint file (base or delta),
/// feeding it to `v` (see [`Visitor`]). Nothing else is touched.
pub fn scan(
    path: &Path,
    shard_index: u32,
    num_shards: u32,
    v: &mut dyn Visitor,
) -> Result<Scanned> {
    let (f, frame) = open_checked(path, shard_index, num_shards)?;
    scan_body(f, &frame, path, v)
}

/// A visitor that keeps nothing (a verification pass).
pub struct Discard;

impl Visitor for Discard {
    fn table(&mut self, _spec: &TableSpec) -> Result<()> {
        Ok(())
    }
    fn row(&mut self, _id: u64, _count: u32, _step: u64, _vals: &[f32]) -> Result<()> {
        Ok(())
    }
    fn pending(&mut self, _id: u64, _count: u32) -> Result<()> {
        Ok(())
    }
    fn dense(&mut self, _name: String, _entry: DenseEntry) -> Result<()> {
        Ok(())
    }
    fn dense_step(&mut self, _step: u64) -> Result<()> {
        Ok(())
    }
}

/// Builds new tables and dense parameters from one base file.
struct LoadNew {
    tables: Vec<Table>,
    dense: BTreeMap<String, DenseEntry>,
    dense_step: u64,
}

impl Visitor for LoadNew {
    fn table(&mut self, spec: &TableSpec) -> Result<()> {
        self.tables.push(Table::new(spec.clone()));
        Ok(())
    }
    fn row(&mut self, id: u64, count: u32, step: u64, vals: &[f32]) -> Result<()> {
        match self.tables.last() {
            Some(t) => t.put_row(id, count, step, vals),
            None => Err(PsError::Internal("row before any table".into())),
        }
    }
    fn pending(&mut self, id: u64, count: u32) -> Result<()> {
        if let Some(t) = self.tables.last() {
            t.put_pending(id, count);
        }
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

fn load_new<R: Read>(r: R, frame: &Frame, path: &Path) -> Result<Loaded> {
    if frame.kind != FileKind::Base {
        return Err(corrupt(
            path,
            "a delta checkpoint cannot be read on its own (restore its chain)",
        ));
    }
    let mut v = LoadNew {
        tables: Vec::new(),
        dense: BTreeMap::new(),
        dense_step: 0,
    };
    let s = scan_body(r, frame, path, &mut v)?;
    Ok(Loaded {
        step: frame.step,
        tables: v.tables,
        dense: v.dense,
        dense_step: v.dense_step,
        rows: s.rows,
    })
}

/// Reads and fully verifies a base checkpoint into new tables. Nothing is
/// changed anywhere.
pub fn read(path: &Path, shard_index: u32, num_shards: u32) -> Result<Loaded> {
    let (f, frame) = open_checked(path, shard_index, num_shards)?;
    load_new(f, &frame, path)
}

/// Decodes and fully verifies a whole base checkpoint file held in memory
/// (the same checks and decoder as [`read`], without touching the file
/// system). `label` names the input in errors. Any malformed input,
/// including one with huge length fields, is an error
/// ([`PsError::CorruptCheckpoint`], or [`PsError::FailedPrecondition`] for
/// another shard's checkpoint); memory use is bounded by a small multiple
/// of `bytes.len()`.
pub fn decode(bytes: &[u8], label: &Path, shard_index: u32, num_shards: u32) -> Result<Loaded> {
    let mut c = Cursor::new(bytes);
    let frame = check_frame(&mut c, bytes.len() as u64, label, shard_index, num_shards)?;
    load_new(c, &frame, label)
}

/// Decodes and fully verifies any checkpoint file (base or delta) held in
/// memory, feeding it to `v`.
pub fn decode_with(
    bytes: &[u8],
    label: &Path,
    shard_index: u32,
    num_shards: u32,
    v: &mut dyn Visitor,
) -> Result<Scanned> {
    let mut c = Cursor::new(bytes);
    let frame = check_frame(&mut c, bytes.len() as u64, label, shard_index, num_shards)?;
    scan_body(c, &frame, label, v)
}
