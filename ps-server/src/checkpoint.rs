//! Checkpoint files of one shard.
//!
//! Layout of `<dir>/shard-<i>-of-<n>/step-<step>.ckpt` (all integers LE):
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
//! A file is written to a hidden temp name, fsynced, renamed into place and
//! the directory fsynced, so a crash never leaves a half-written
//! `step-*.ckpt`. Listing checks header crc, trailer and file size (cheap);
//! restoring checks the body crc before anything in the shard changes.

use crate::dense::DenseEntry;
use crate::error::{PsError, Result};
use crate::optim::Optimizer;
use crate::store::{Table, TableSpec, NUM_STRIPES};
use ember_proto::v1::{OptimizerConfig, TableConfig};
use prost::Message;
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Cursor, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Magic at the start of a checkpoint.
pub const MAGIC: &[u8; 8] = b"EMBERPSK";
/// Magic at the end of a checkpoint.
pub const END_MAGIC: &[u8; 8] = b"EMBEREND";
/// Format version written and accepted.
pub const VERSION: u32 = 1;
const HEADER_LEN: u64 = 32;
const TRAILER_LEN: u64 = 20;

/// Directory of one shard's checkpoints under the checkpoint root.
pub fn shard_dir(root: &Path, shard_index: u32, num_shards: u32) -> PathBuf {
    root.join(format!("shard-{shard_index}-of-{num_shards}"))
}

/// Path of the checkpoint of `step` in a shard directory.
pub fn step_path(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("step-{step}.ckpt"))
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

struct CrcWriter<W: Write> {
    inner: W,
    crc: crc32fast::Hasher,
    len: u64,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

struct CrcReader<R: Read> {
    inner: R,
    crc: crc32fast::Hasher,
    left: u64,
}

impl<R: Read> Read for CrcReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = buf.len().min(self.left as usize);
        let n = self.inner.read(&mut buf[..want])?;
        self.crc.update(&buf[..n]);
        self.left -= n as u64;
        Ok(n)
    }
}

fn put_f32s(w: &mut impl Write, v: &[f32], scratch: &mut Vec<u8>) -> std::io::Result<()> {
    scratch.clear();
    for x in v {
        scratch.extend_from_slice(&x.to_le_bytes());
    }
    w.write_all(scratch)
}

fn header_bytes(shard_index: u32, num_shards: u32, step: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN as usize);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&shard_index.to_le_bytes());
    h.extend_from_slice(&num_shards.to_le_bytes());
    h.extend_from_slice(&step.to_le_bytes());
    let crc = crc32fast::hash(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h
}

/// Prefix and suffix of the hidden temp file a checkpoint is written to.
const TMP_PREFIX: &str = ".step-";
const TMP_SUFFIX: &str = ".ckpt.tmp";

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
            .is_some_and(|n| n.starts_with(TMP_PREFIX) && n.ends_with(TMP_SUFFIX));
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

/// Writes a checkpoint atomically and returns what it holds.
///
/// The file is written to `.step-<step>.ckpt.tmp`, fsynced and renamed to
/// `step-<step>.ckpt`. On any error (disk full, permission denied, ...) the
/// temp file is removed, the error is logged, and the returned error names
/// the file and the OS error; no `step-*.ckpt` is created or changed. Temp
/// files left by an interrupted earlier write are removed first (the caller
/// serializes writes to `dir`).
#[allow(clippy::too_many_arguments)]
pub fn write(
    dir: &Path,
    shard_index: u32,
    num_shards: u32,
    step: u64,
    tables: &[Arc<Table>],
    dense: &BTreeMap<String, DenseEntry>,
    dense_step: u64,
) -> Result<CheckpointInfo> {
    let path = step_path(dir, step);
    let tmp = dir.join(format!("{TMP_PREFIX}{step}{TMP_SUFFIX}"));
    let r = (|| {
        fs::create_dir_all(dir)
            .map_err(|e| PsError::io(format!("creating {}", dir.display()), e))?;
        remove_stale_temps(dir);
        let written = write_tmp(
            &tmp,
            shard_index,
            num_shards,
            step,
            tables,
            dense,
            dense_step,
        )
        .and_then(|(body_len, rows)| {
            fs::rename(&tmp, &path).map_err(|e| {
                PsError::io(
                    format!("renaming {} to {}", tmp.display(), path.display()),
                    e,
                )
            })?;
            Ok((body_len, rows))
        });
        let (body_len, rows) = match written {
            Ok(w) => w,
            Err(e) => {
                if let Err(rm) = fs::remove_file(&tmp) {
                    if rm.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(path = %tmp.display(), error = %rm, "cannot remove a failed checkpoint temp file");
                    }
                }
                return Err(e);
            }
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| PsError::io(format!("fsync of directory {}", dir.display()), e))?;
        Ok(CheckpointInfo {
            path: path.clone(),
            bytes: HEADER_LEN + body_len + TRAILER_LEN,
            rows,
        })
    })();
    if let Err(e) = &r {
        tracing::error!(step, path = %path.display(), error = %e, "checkpoint failed");
    }
    r
}

/// Writes and fsyncs the whole checkpoint to `tmp`; returns `(body_len, rows)`.
/// The file handle is closed on return, success or not.
#[allow(clippy::too_many_arguments)]
fn write_tmp(
    tmp: &Path,
    shard_index: u32,
    num_shards: u32,
    step: u64,
    tables: &[Arc<Table>],
    dense: &BTreeMap<String, DenseEntry>,
    dense_step: u64,
) -> Result<(u64, u64)> {
    let ctx = |what: &str| format!("{what} {}", tmp.display());
    let file = File::create(tmp).map_err(|e| PsError::io(ctx("creating"), e))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    out.write_all(&header_bytes(shard_index, num_shards, step))
        .map_err(|e| PsError::io(ctx("writing"), e))?;
    let mut w = CrcWriter {
        inner: out,
        crc: crc32fast::Hasher::new(),
        len: 0,
    };
    let mut rows = 0u64;
    let body = (|| -> std::io::Result<()> {
        let mut scratch = Vec::new();
        w.write_all(&(tables.len() as u32).to_le_bytes())?;
        for t in tables {
            let cfg = t.spec().config.encode_to_vec();
            w.write_all(&(cfg.len() as u32).to_le_bytes())?;
            w.write_all(&cfg)?;
            for s in 0..NUM_STRIPES {
                let view = t.stripe_rows(s);
                w.write_all(&(view.len() as u64).to_le_bytes())?;
                let mut res = Ok(());
                view.for_each(|id, count, last, vals| {
                    if res.is_err() {
                        return;
                    }
                    res = (|| {
                        w.write_all(&id.to_le_bytes())?;
                        w.write_all(&count.to_le_bytes())?;
                        w.write_all(&last.to_le_bytes())?;
                        put_f32s(&mut w, vals, &mut scratch)
                    })();
                    rows += 1;
                });
                res?;
            }
            let mut pending = Vec::new();
            t.for_each_pending(|id, c| pending.push((id, c)));
            w.write_all(&(pending.len() as u64).to_le_bytes())?;
            for (id, c) in pending {
                w.write_all(&id.to_le_bytes())?;
                w.write_all(&c.to_le_bytes())?;
            }
        }
        w.write_all(&(dense.len() as u32).to_le_bytes())?;
        for (name, e) in dense {
            w.write_all(&(name.len() as u32).to_le_bytes())?;
            w.write_all(name.as_bytes())?;
            match &e.opt_config {
                Some(c) => {
                    let b = c.encode_to_vec();
                    w.write_all(&[1])?;
                    w.write_all(&(b.len() as u32).to_le_bytes())?;
                    w.write_all(&b)?;
                }
                None => w.write_all(&[0])?,
            }
            w.write_all(&(e.values.len() as u64).to_le_bytes())?;
            put_f32s(&mut w, &e.values, &mut scratch)?;
            w.write_all(&(e.state.len() as u64).to_le_bytes())?;
            put_f32s(&mut w, &e.state, &mut scratch)?;
        }
        w.write_all(&dense_step.to_le_bytes())?;
        Ok(())
    })();
    body.map_err(|e| PsError::io(ctx("writing"), e))?;
    let crc = w.crc.finalize();
    let body_len = w.len;
    let mut out = w.inner;
    let trailer = (|| -> std::io::Result<()> {
        out.write_all(&body_len.to_le_bytes())?;
        out.write_all(&crc.to_le_bytes())?;
        out.write_all(END_MAGIC)?;
        let f = out.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()
    })();
    trailer.map_err(|e| PsError::io(ctx("writing"), e))?;
    Ok((body_len, rows))
}

fn corrupt(path: &Path, reason: impl Into<String>) -> PsError {
    PsError::CorruptCheckpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Where a checkpoint's body is: its step, length and expected crc.
struct Frame {
    step: u64,
    body_len: u64,
    body_crc: u32,
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
    if &h[0..8] != MAGIC {
        return Err(corrupt(path, "bad magic (not an Ember shard checkpoint)"));
    }
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
        step,
        body_len,
        body_crc: u32_at(&t, 8),
    })
}

/// Opens `path` and checks its frame (see [`check_frame`]).
fn open_checked(path: &Path, shard_index: u32, num_shards: u32) -> Result<(File, Frame)> {
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

/// Steps of the good checkpoints (header and trailer verified) in `dir`,
/// ascending, and the files that failed the check.
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
            Ok((_, Frame { step: s, .. })) if s == step => good.push(step),
            Ok((_, Frame { step: s, .. })) => bad.push((
                path.clone(),
                corrupt(
                    &path,
                    format!("file name says step {step}, header says {s}"),
                ),
            )),
            Err(e) => bad.push((path, e)),
        }
    }
    good.sort_unstable();
    Ok((good, bad))
}

struct Body<R: Read> {
    r: R,
    path: PathBuf,
}

impl<R: Read> Body<CrcReader<R>> {
    /// Fails unless `n` more bytes are left in the body (checked before
    /// allocating, so a huge length field never allocates).
    fn need(&self, n: u64) -> Result<()> {
        if n > self.r.left {
            return Err(corrupt(
                &self.path,
                format!("body ends early: {n} bytes needed, {} left", self.r.left),
            ));
        }
        Ok(())
    }
    fn bytes(&mut self, n: usize) -> Result<Vec<u8>> {
        self.need(n as u64)?;
        let mut b = vec![0u8; n];
        self.r
            .read_exact(&mut b)
            .map_err(|e| corrupt(&self.path, format!("body ends early: {e}")))?;
        Ok(b)
    }
    fn u8(&mut self) -> Result<u8> {
        let mut a = [0u8; 1];
        self.r
            .read_exact(&mut a)
            .map_err(|e| corrupt(&self.path, format!("body ends early: {e}")))?;
        Ok(a[0])
    }
    fn u32(&mut self) -> Result<u32> {
        let mut a = [0u8; 4];
        self.r
            .read_exact(&mut a)
            .map_err(|e| corrupt(&self.path, format!("body ends early: {e}")))?;
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64> {
        let mut a = [0u8; 8];
        self.r
            .read_exact(&mut a)
            .map_err(|e| corrupt(&self.path, format!("body ends early: {e}")))?;
        Ok(u64::from_le_bytes(a))
    }
    fn f32s_into(&mut self, out: &mut Vec<f32>, n: usize, buf: &mut Vec<u8>) -> Result<()> {
        self.need((n as u64).saturating_mul(4))?;
        buf.resize(n * 4, 0);
        self.r
            .read_exact(buf)
            .map_err(|e| corrupt(&self.path, format!("body ends early: {e}")))?;
        out.clear();
        out.extend(
            buf.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
        Ok(())
    }
    /// A u64 count of records of at least `min_record` bytes each, checked
    /// against the bytes left in the body.
    fn len_checked(&mut self, min_record: u64, what: &str) -> Result<usize> {
        let n = self.u64()?;
        if n > self.r.left / min_record.max(1) {
            return Err(corrupt(
                &self.path,
                format!(
                    "{what} count {n} exceeds the {} bytes left in the body",
                    self.r.left
                ),
            ));
        }
        usize::try_from(n).map_err(|_| corrupt(&self.path, format!("{what} count {n} too large")))
    }
}

/// Reads and fully verifies a checkpoint. Nothing is changed anywhere; the
/// caller swaps the result into a shard.
pub fn read(path: &Path, shard_index: u32, num_shards: u32) -> Result<Loaded> {
    let (f, frame) = open_checked(path, shard_index, num_shards)?;
    decode_body(BufReader::with_capacity(1 << 20, f), &frame, path)
}

/// Decodes and fully verifies a whole checkpoint file held in memory (the
/// same checks and decoder as [`read`], without touching the file system).
/// `label` names the input in errors. Any malformed input, including one
/// with huge length fields, is an error ([`PsError::CorruptCheckpoint`], or
/// [`PsError::FailedPrecondition`] for another shard's checkpoint); memory
/// use is bounded by a small multiple of `bytes.len()`.
pub fn decode(bytes: &[u8], label: &Path, shard_index: u32, num_shards: u32) -> Result<Loaded> {
    let mut c = Cursor::new(bytes);
    let frame = check_frame(&mut c, bytes.len() as u64, label, shard_index, num_shards)?;
    decode_body(c, &frame, label)
}

/// Decodes the body that follows the header in `r`, verifying its length
/// and crc against `frame`.
fn decode_body<R: Read>(r: R, frame: &Frame, path: &Path) -> Result<Loaded> {
    let (step, body_len, want_crc) = (frame.step, frame.body_len, frame.body_crc);
    let mut b = Body {
        r: CrcReader {
            inner: r,
            crc: crc32fast::Hasher::new(),
            left: body_len,
        },
        path: path.to_path_buf(),
    };
    let mut buf = Vec::new();
    let mut vals = Vec::new();
    let n_tables = b.u32()?;
    let mut tables = Vec::new();
    let mut rows = 0u64;
    for _ in 0..n_tables {
        let len = b.u32()? as usize;
        let cfg_bytes = b.bytes(len)?;
        let cfg = TableConfig::decode(cfg_bytes.as_slice())
            .map_err(|e| corrupt(path, format!("bad table config: {e}")))?;
        let spec = TableSpec::from_config(cfg)
            .map_err(|e| corrupt(path, format!("bad table config: {e}")))?;
        if tables
            .iter()
            .any(|t: &Table| t.spec().name() == spec.name())
        {
            return Err(corrupt(
                path,
                format!("table `{}` appears twice", spec.name()),
            ));
        }
        let width = spec.values_per_row();
        let row_bytes = 20 + 4 * width as u64;
        let table = Table::new(spec);
        for _ in 0..NUM_STRIPES {
            let n = b.len_checked(row_bytes, "row")?;
            for _ in 0..n {
                let id = b.u64()?;
                let count = b.u32()?;
                let last = b.u64()?;
                b.f32s_into(&mut vals, width, &mut buf)?;
                table.put_row(id, count, last, &vals)?;
                rows += 1;
            }
        }
        let n = b.len_checked(12, "pending count")?;
        for _ in 0..n {
            let id = b.u64()?;
            let c = b.u32()?;
            table.put_pending(id, c);
        }
        tables.push(table);
    }
    let n_dense = b.u32()?;
    let mut dense = BTreeMap::new();
    for _ in 0..n_dense {
        let len = b.u32()? as usize;
        let name = String::from_utf8(b.bytes(len)?)
            .map_err(|_| corrupt(path, "dense name is not UTF-8"))?;
        if dense.contains_key(&name) {
            return Err(corrupt(path, format!("dense `{name}` appears twice")));
        }
        let opt_config = match b.u8()? {
            0 => None,
            1 => {
                let len = b.u32()? as usize;
                let bytes = b.bytes(len)?;
                Some(
                    OptimizerConfig::decode(bytes.as_slice())
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
        let mut values = Vec::new();
        b.f32s_into(&mut values, n, &mut buf)?;
        let n = b.len_checked(4, "dense state")?;
        let mut state = Vec::new();
        b.f32s_into(&mut state, n, &mut buf)?;
        if state.len() != opt.state_len(values.len()) {
            return Err(corrupt(
                path,
                format!("dense `{name}` has a state of the wrong size"),
            ));
        }
        dense.insert(
            name,
            DenseEntry {
                values,
                state,
                opt,
                opt_config,
            },
        );
    }
    let dense_step = b.u64()?;
    if b.r.left != 0 {
        return Err(corrupt(
            path,
            format!("{} unread bytes at the end of the body", b.r.left),
        ));
    }
    if b.r.crc.clone().finalize() != want_crc {
        return Err(corrupt(path, "body checksum mismatch"));
    }
    Ok(Loaded {
        step,
        tables,
        dense,
        dense_step,
        rows,
    })
}

/// Deletes the oldest good checkpoints so that at most `keep` remain
/// (`keep == 0` keeps all). Returns the deleted steps.
pub fn retain(dir: &Path, shard_index: u32, num_shards: u32, keep: u32) -> Result<Vec<u64>> {
    if keep == 0 {
        return Ok(Vec::new());
    }
    let (good, _) = list(dir, shard_index, num_shards)?;
    let n_drop = good.len().saturating_sub(keep as usize);
    let mut dropped = Vec::new();
    for &step in &good[..n_drop] {
        let p = step_path(dir, step);
        fs::remove_file(&p).map_err(|e| PsError::io(format!("removing {}", p.display()), e))?;
        dropped.push(step);
    }
    Ok(dropped)
}
