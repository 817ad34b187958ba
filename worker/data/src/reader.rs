//! Streaming reader: sample files -> shuffled [`Batch`]es for one worker.
//!
//! - Streams with a `BufReader` (never the whole file in memory).
//! - Worker split: the lines of the input files are numbered globally
//!   (0-based, across the files in the order given); worker `i` of `M` reads
//!   the lines `k` with `k % M == i`. Deterministic, disjoint, complete.
//!   Unassigned lines are skipped without parsing.
//! - Shuffle: a bounded buffer of `shuffle_buffer` samples ([`ShuffleBuffer`]);
//!   the seed of epoch `e` for worker `i` is
//!   `derive_seed(derive_seed(seed, e), i)`, so every epoch differs and a run
//!   is reproducible. `shuffle_buffer <= 1` keeps file order.
//! - Epochs: each epoch re-opens the files. A batch never spans two epochs
//!   (the last batch of an epoch may be short unless `drop_last`).
//! - Resume: [`DataPosition`] (epoch, samples of this worker already
//!   delivered in that epoch) is exact: [`BatchReader::resume`] replays the
//!   epoch's shuffle and skips that many samples, so the following batches are
//!   the ones an uninterrupted run would have produced.
//! - Malformed lines: [`DataError::Malformed`] with file, line and column.
//!   By default the error is returned (and the reader stops); with
//!   `skip_malformed` the line is skipped and counted
//!   ([`BatchReader::skipped_malformed`]). A line longer than
//!   [`MAX_LINE_BYTES`] is malformed (a file without newlines is never read
//!   into memory whole).

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::format::{parse_sample_into, parse_u64, LineCtx, LIST_SEP};
use super::DataError;
use crate::batch::{Batch, Sample};
use crate::schema::FeatureSchema;
use crate::schema_format::{is_header, Layout};
use ember_proto::rng::{derive_seed, SplitMix64};
use std::sync::Arc;

/// Longest accepted sample line in bytes (without its `\n`); longer lines
/// are malformed.
pub const MAX_LINE_BYTES: usize = 16 << 20;

/// Options of [`BatchReader`].
#[derive(Debug, Clone, PartialEq)]
pub struct ReaderOptions {
    /// Samples per batch (at least 1).
    pub batch_size: usize,
    /// History truncation passed to [`Batch::from_samples`].
    pub max_len: usize,
    /// Shuffle buffer capacity in samples (0 or 1: file order).
    pub shuffle_buffer: usize,
    /// Base seed of the shuffle.
    pub seed: u64,
    /// This worker's index `i` in `0..num_workers`.
    pub worker_index: usize,
    /// Number of workers `M` splitting the input.
    pub num_workers: usize,
    /// Number of epochs (`u64::MAX`: endless).
    pub epochs: u64,
    /// Skip and count malformed lines instead of failing.
    pub skip_malformed: bool,
    /// Drop the last, short batch of each epoch.
    pub drop_last: bool,
    /// The job's feature schema: files must then have a schema header
    /// ([`crate::schema_format`]) and batches are schema batches
    /// ([`Batch::from_schema_samples`]); `None` reads the legacy format.
    pub schema: Option<Arc<FeatureSchema>>,
    /// Read the DIEN negative columns (only the auxiliary loss uses them).
    /// Off, samples and batches carry none: no negative id is pulled, pushed
    /// (a zero gradient still moves an Adam row) or counted, and parsing is
    /// cheaper (about half for files with wide behaviour features).
    pub negatives: bool,
}

impl Default for ReaderOptions {
    fn default() -> Self {
        ReaderOptions {
            batch_size: 128,
            max_len: 100,
            shuffle_buffer: 10_000,
            seed: 1234,
            worker_index: 0,
            num_workers: 1,
            epochs: 1,
            skip_malformed: false,
            drop_last: false,
            schema: None,
            negatives: true,
        }
    }
}

impl ReaderOptions {
    /// Checks option values, naming the bad field.
    pub fn validate(&self) -> Result<(), DataError> {
        let bad = |field, reason: &str| {
            Err(DataError::InvalidOption {
                field,
                reason: reason.to_string(),
            })
        };
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1");
        }
        if self.max_len == 0 {
            return bad("max_len", "must be at least 1");
        }
        if self.num_workers == 0 {
            return bad("num_workers", "must be at least 1");
        }
        if self.worker_index >= self.num_workers {
            return bad("worker_index", "must be below num_workers");
        }
        Ok(())
    }
}

/// Where a worker is in its input: `samples` of epoch `epoch` (0-based)
/// already delivered. Saved in checkpoints; see [`BatchReader::resume`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct DataPosition {
    /// Epoch, 0-based.
    pub epoch: u64,
    /// Samples of this worker delivered in this epoch (after the shuffle).
    pub samples: u64,
}

/// Reads the samples of one worker's share of a list of files, in file order
/// (no shuffle), reusing buffers. Yields `Result<Sample, DataError>`; with
/// `skip_malformed` bad lines are counted in [`SampleReader::skipped`]
/// instead.
pub struct SampleReader {
    files: Vec<PathBuf>,
    next_file: usize,
    current: Option<(Box<dyn BufRead + Send + Sync>, PathBuf)>,
    /// 1-based line number in the current file.
    line_in_file: u64,
    /// 0-based line number over all files.
    global_line: u64,
    worker_index: u64,
    num_workers: u64,
    skip_malformed: bool,
    skipped: u64,
    buf: Vec<u8>,
    /// Recycled samples (vectors keep their capacity).
    spare: Vec<Sample>,
    /// The schema files must follow (see [`SampleReader::with_schema`]).
    schema: Option<Arc<FeatureSchema>>,
    /// The current file's header mapped onto `schema`.
    layout: Option<Layout>,
    /// The current file's first line has not been checked yet.
    fresh: bool,
    /// Read the DIEN negative columns.
    negatives: bool,
}

impl SampleReader {
    /// Reader of worker `worker_index` of `num_workers` over `files`.
    pub fn open(
        files: &[PathBuf],
        worker_index: usize,
        num_workers: usize,
        skip_malformed: bool,
    ) -> Result<Self, DataError> {
        if num_workers == 0 || worker_index >= num_workers {
            return Err(DataError::InvalidOption {
                field: "worker_index",
                reason: format!("worker {worker_index} of {num_workers}"),
            });
        }
        Ok(SampleReader {
            files: files.to_vec(),
            next_file: 0,
            current: None,
            line_in_file: 0,
            global_line: 0,
            worker_index: worker_index as u64,
            num_workers: num_workers as u64,
            skip_malformed,
            skipped: 0,
            buf: Vec::with_capacity(4096),
            spare: Vec::new(),
            schema: None,
            layout: None,
            fresh: false,
            negatives: true,
        })
    }

    /// Reads schema files ([`crate::schema_format`]) of `schema` (every file
    /// must start with a header naming its features), or with `None` the
    /// legacy format (a file with a schema header is then an error).
    pub fn with_schema(mut self, schema: Option<Arc<FeatureSchema>>) -> Self {
        self.schema = schema;
        self
    }

    /// Whether to read the DIEN negative columns (default true; see
    /// [`ReaderOptions::negatives`]).
    pub fn with_negatives(mut self, negatives: bool) -> Self {
        self.negatives = negatives;
        self
    }

    /// Checks the first line of a newly opened file: a schema header is
    /// consumed and mapped onto the schema; its absence (or presence) where
    /// the schema says otherwise is an error naming the file.
    fn start_file(&mut self) -> Result<(), DataError> {
        self.fresh = false;
        self.layout = None;
        let Some((reader, path)) = self.current.as_mut() else {
            return Ok(());
        };
        let head = reader.fill_buf().map_err(|e| DataError::io(&*path, e))?;
        let has_header = is_header(head);
        match (&self.schema, has_header) {
            (None, false) => Ok(()),
            (None, true) => Err(DataError::Inconsistent {
                path: path.clone(),
                reason: "this file has a feature-schema header (`#ember-samples`): the job must declare its [[features]]".into(),
            }),
            (Some(_), false) => Err(DataError::Inconsistent {
                path: path.clone(),
                reason: "the job declares [[features]] but this file has no `#ember-samples` header (write it with `ember-data prepare --config JOB.toml`)".into(),
            }),
            (Some(schema), true) => {
                let mut line = Vec::new();
                reader
                    .by_ref()
                    .take(MAX_LINE_BYTES as u64)
                    .read_until(b'\n', &mut line)
                    .map_err(|e| DataError::io(&*path, e))?;
                self.layout = Some(Layout::from_header(path, &line, schema, self.negatives)?);
                self.line_in_file += 1;
                Ok(())
            }
        }
    }

    /// Reader of worker `worker_index` of `num_workers` over one already
    /// open stream (in-memory data, a pipe) with the same line handling and
    /// parser as [`SampleReader::open`]; `label` names the stream in errors.
    pub fn from_reader(
        label: impl Into<PathBuf>,
        stream: impl BufRead + Send + Sync + 'static,
        worker_index: usize,
        num_workers: usize,
        skip_malformed: bool,
    ) -> Result<Self, DataError> {
        let mut r = SampleReader::open(&[], worker_index, num_workers, skip_malformed)?;
        r.current = Some((Box::new(stream), label.into()));
        r.fresh = true;
        Ok(r)
    }

    /// Malformed lines skipped so far.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Gives a used sample back for reuse of its allocations.
    pub fn recycle(&mut self, s: Sample) {
        if self.spare.len() < 4096 {
            self.spare.push(s);
        }
    }

    /// Reads the next assigned sample, `None` at the end of the last file.
    pub fn read(&mut self) -> Result<Option<Sample>, DataError> {
        loop {
            if self.current.is_none() {
                let Some(path) = self.files.get(self.next_file) else {
                    return Ok(None);
                };
                let f = File::open(path).map_err(|e| DataError::io(path, e))?;
                self.current = Some((Box::new(BufReader::with_capacity(1 << 20, f)), path.clone()));
                self.next_file += 1;
                self.line_in_file = 0;
                self.fresh = true;
            }
            if self.fresh {
                self.start_file()?;
            }
            let Some((reader, path)) = self.current.as_mut() else {
                continue;
            };
            let mine = self.global_line % self.num_workers == self.worker_index;
            let n = if mine {
                self.buf.clear();
                reader
                    .by_ref()
                    .take(MAX_LINE_BYTES as u64 + 1)
                    .read_until(b'\n', &mut self.buf)
            } else {
                reader.skip_until(b'\n')
            }
            .map_err(|e| DataError::io(&*path, e))?;
            if n == 0 {
                self.current = None;
                continue;
            }
            self.line_in_file += 1;
            self.global_line += 1;
            if !mine {
                continue;
            }
            if self.buf.len() > MAX_LINE_BYTES && self.buf.last() != Some(&b'\n') {
                // Too long: drop the rest of the line without buffering it.
                reader
                    .skip_until(b'\n')
                    .map_err(|e| DataError::io(&*path, e))?;
                let e = DataError::Malformed {
                    path: path.clone(),
                    line: self.line_in_file,
                    column: "line".into(),
                    value: super::format::show(&self.buf),
                    reason: format!("longer than {MAX_LINE_BYTES} bytes"),
                };
                if self.skip_malformed {
                    self.skipped += 1;
                    if self.skipped <= 10 {
                        tracing::warn!("skipping malformed line: {e}");
                    }
                    continue;
                }
                return Err(e);
            }
            let line = self.buf.strip_suffix(b"\n").unwrap_or(&self.buf);
            let mut s = self.spare.pop().unwrap_or_default();
            let ctx = LineCtx {
                path: path.as_path(),
                line: self.line_in_file,
            };
            let parsed = match (&self.layout, &self.schema) {
                (Some(layout), Some(schema)) => {
                    layout.parse_into(schema, path, self.line_in_file, line, &mut s)
                }
                _ => parse_sample_into(ctx, line, &mut s, self.negatives),
            };
            match parsed {
                Ok(()) => return Ok(Some(s)),
                Err(e) if self.skip_malformed => {
                    self.skipped += 1;
                    if self.skipped <= 10 {
                        tracing::warn!("skipping malformed line: {e}");
                    }
                    self.spare.push(s);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Iterator for SampleReader {
    type Item = Result<Sample, DataError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.read().transpose()
    }
}

/// A bounded shuffle buffer: once `cap` items are held, each offered item
/// replaces (and releases) a uniformly chosen held one; [`ShuffleBuffer::take`]
/// drains the rest in random order. Output is a permutation of the input.
pub struct ShuffleBuffer<T> {
    buf: Vec<T>,
    cap: usize,
    rng: SplitMix64,
}

impl<T> ShuffleBuffer<T> {
    /// A buffer holding at most `cap` items (`cap <= 1`: pass-through).
    pub fn new(cap: usize, seed: u64) -> Self {
        ShuffleBuffer {
            buf: Vec::with_capacity(cap.min(1 << 20)),
            cap,
            rng: SplitMix64::new(seed),
        }
    }

    /// Offers an item; returns one to emit once the buffer is full.
    pub fn offer(&mut self, x: T) -> Option<T> {
        if self.cap <= 1 {
            return Some(x);
        }
        if self.buf.len() < self.cap {
            self.buf.push(x);
            return None;
        }
        let j = self.rng.below(self.buf.len() as u64) as usize;
        Some(std::mem::replace(&mut self.buf[j], x))
    }

    /// Removes a random held item (used when the input is exhausted).
    pub fn take(&mut self) -> Option<T> {
        if self.buf.is_empty() {
            return None;
        }
        let j = self.rng.below(self.buf.len() as u64) as usize;
        Some(self.buf.swap_remove(j))
    }

    /// Items held.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether no item is held.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// Iterator adapter over a fallible stream through a [`ShuffleBuffer`];
/// errors pass through immediately.
pub struct Shuffled<I, T> {
    inner: I,
    buf: ShuffleBuffer<T>,
    exhausted: bool,
}

/// Shuffles `inner` with a buffer of `cap` items and `seed`.
pub fn shuffled<I, T, E>(inner: I, cap: usize, seed: u64) -> Shuffled<I, T>
where
    I: Iterator<Item = Result<T, E>>,
{
    Shuffled {
        inner,
        buf: ShuffleBuffer::new(cap, seed),
        exhausted: false,
    }
}

impl<I, T, E> Iterator for Shuffled<I, T>
where
    I: Iterator<Item = Result<T, E>>,
{
    type Item = Result<T, E>;
    fn next(&mut self) -> Option<Self::Item> {
        while !self.exhausted {
            match self.inner.next() {
                Some(Ok(x)) => {
                    if let Some(out) = self.buf.offer(x) {
                        return Some(Ok(out));
                    }
                }
                Some(Err(e)) => return Some(Err(e)),
                None => self.exhausted = true,
            }
        }
        self.buf.take().map(Ok)
    }
}

/// The data stream of one worker: shuffled [`Batch`]es over epochs, with an
/// exact resume position. An `Iterator<Item = Result<Batch, DataError>>`;
/// after an error the iterator ends.
///
/// ```no_run
/// use ember_data::reader::{BatchReader, ReaderOptions};
/// let files = vec!["data/ml100k-din/train.txt".into()];
/// let mut reader = BatchReader::new(&files, ReaderOptions { epochs: 2, ..Default::default() })?;
/// while let Some(batch) = reader.next_batch()? {
///     let _pos = reader.position(); // save with the checkpoint
///     # let _ = batch;
/// }
/// # Ok::<(), ember_data::DataError>(())
/// ```
pub struct BatchReader {
    files: Vec<PathBuf>,
    opts: ReaderOptions,
    pos: DataPosition,
    epoch_reader: Option<(SampleReader, ShuffleBuffer<Sample>, bool)>,
    skipped_before: u64,
    failed: bool,
    samples: Vec<Sample>,
}

impl BatchReader {
    /// A reader at the start of epoch 0.
    pub fn new(files: &[PathBuf], opts: ReaderOptions) -> Result<Self, DataError> {
        opts.validate()?;
        if files.is_empty() {
            return Err(DataError::InvalidOption {
                field: "files",
                reason: "no input file".into(),
            });
        }
        Ok(BatchReader {
            files: files.to_vec(),
            samples: Vec::with_capacity(opts.batch_size),
            opts,
            pos: DataPosition::default(),
            epoch_reader: None,
            skipped_before: 0,
            failed: false,
        })
    }

    /// A reader continuing exactly at `pos` (as returned by
    /// [`BatchReader::position`] of an earlier run with the same files and
    /// options).
    pub fn resume(
        files: &[PathBuf],
        opts: ReaderOptions,
        pos: DataPosition,
    ) -> Result<Self, DataError> {
        let mut r = BatchReader::new(files, opts)?;
        r.pos.epoch = pos.epoch;
        r.skip_samples(pos.samples)?;
        Ok(r)
    }

    /// Position of the next sample to deliver.
    pub fn position(&self) -> DataPosition {
        self.pos
    }

    /// Options in use.
    pub fn options(&self) -> &ReaderOptions {
        &self.opts
    }

    /// Malformed lines skipped so far (with `skip_malformed`).
    pub fn skipped_malformed(&self) -> u64 {
        self.skipped_before + self.epoch_reader.as_ref().map_or(0, |r| r.0.skipped())
    }

    fn open_epoch(&mut self) -> Result<(), DataError> {
        let seed = derive_seed(
            derive_seed(self.opts.seed, self.pos.epoch),
            self.opts.worker_index as u64,
        );
        let reader = SampleReader::open(
            &self.files,
            self.opts.worker_index,
            self.opts.num_workers,
            self.opts.skip_malformed,
        )?
        .with_schema(self.opts.schema.clone())
        .with_negatives(self.opts.negatives);
        self.epoch_reader = Some((
            reader,
            ShuffleBuffer::new(self.opts.shuffle_buffer, seed),
            false,
        ));
        Ok(())
    }

    /// Next sample of the current epoch; `None` at the epoch's end.
    fn next_in_epoch(&mut self) -> Result<Option<Sample>, DataError> {
        if self.epoch_reader.is_none() {
            self.open_epoch()?;
        }
        let Some((reader, buf, exhausted)) = self.epoch_reader.as_mut() else {
            return Ok(None);
        };
        while !*exhausted {
            match reader.read()? {
                Some(s) => {
                    if let Some(out) = buf.offer(s) {
                        self.pos.samples += 1;
                        return Ok(Some(out));
                    }
                }
                None => *exhausted = true,
            }
        }
        let out = buf.take();
        if out.is_some() {
            self.pos.samples += 1;
        }
        Ok(out)
    }

    /// Closes the current epoch and moves to the next one.
    fn end_epoch(&mut self) {
        if let Some((r, _, _)) = self.epoch_reader.take() {
            self.skipped_before += r.skipped();
        }
        self.pos = DataPosition {
            epoch: self.pos.epoch + 1,
            samples: 0,
        };
    }

    fn finished(&self) -> bool {
        self.pos.epoch >= self.opts.epochs
    }

    /// Skips `n` samples (within and across epochs) without building
    /// batches; returns how many were skipped (less at the end of the data).
    pub fn skip_samples(&mut self, n: u64) -> Result<u64, DataError> {
        let mut done = 0;
        while done < n && !self.finished() {
            match self.next_in_epoch()? {
                Some(s) => {
                    done += 1;
                    self.recycle(s);
                }
                None => {
                    // An empty epoch would loop forever: stop instead.
                    if self.pos.samples == 0 {
                        break;
                    }
                    self.end_epoch();
                }
            }
        }
        Ok(done)
    }

    fn recycle(&mut self, s: Sample) {
        if let Some((r, _, _)) = self.epoch_reader.as_mut() {
            r.recycle(s);
        }
    }

    /// Fills `out` with the samples of the next batch (cleared first);
    /// returns false when all epochs are done.
    pub fn next_samples(&mut self, out: &mut Vec<Sample>) -> Result<bool, DataError> {
        out.clear();
        if self.failed {
            return Ok(false);
        }
        while !self.finished() {
            while out.len() < self.opts.batch_size {
                match self.next_in_epoch() {
                    Ok(Some(s)) => out.push(s),
                    Ok(None) => break,
                    Err(e) => {
                        self.failed = true;
                        return Err(e);
                    }
                }
            }
            let full = out.len() == self.opts.batch_size;
            if full || (!out.is_empty() && !self.opts.drop_last) {
                return Ok(true);
            }
            // End of epoch with a short (dropped) or empty batch.
            let empty_epoch = self.pos.samples == 0;
            out.clear();
            self.end_epoch();
            if empty_epoch {
                return Ok(false);
            }
        }
        Ok(false)
    }

    /// The next batch, or `None` when all epochs are done.
    pub fn next_batch(&mut self) -> Result<Option<Batch>, DataError> {
        let mut samples = std::mem::take(&mut self.samples);
        let more = self.next_samples(&mut samples);
        let result = match more {
            Ok(true) => Ok(Some(match &self.opts.schema {
                Some(schema) => Batch::from_schema_samples(&samples, self.opts.max_len, schema),
                None => Batch::from_samples(&samples, self.opts.max_len),
            })),
            Ok(false) => Ok(None),
            Err(e) => Err(e),
        };
        for s in samples.drain(..) {
            self.recycle(s);
        }
        self.samples = samples;
        result
    }
}

impl Iterator for BatchReader {
    type Item = Result<Batch, DataError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_batch().transpose()
    }
}

/// One line of a user-sequence file: a user and their items in time order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UserSeq {
    /// User id.
    pub user: u64,
    /// Item ids, oldest first.
    pub items: Vec<u64>,
}

/// Streams a user-sequence file (`user \t i1^Bi2^B...`, see
/// [`super::format`]). Yields `Result<UserSeq, DataError>`.
pub struct SeqReader {
    path: PathBuf,
    reader: BufReader<File>,
    line: u64,
    buf: Vec<u8>,
}

impl SeqReader {
    /// Opens a sequence file.
    pub fn open(path: &Path) -> Result<Self, DataError> {
        let f = File::open(path).map_err(|e| DataError::io(path, e))?;
        Ok(SeqReader {
            path: path.to_path_buf(),
            reader: BufReader::with_capacity(1 << 20, f),
            line: 0,
            buf: Vec::new(),
        })
    }

    fn read(&mut self) -> Result<Option<UserSeq>, DataError> {
        self.buf.clear();
        let n = self
            .reader
            .read_until(b'\n', &mut self.buf)
            .map_err(|e| DataError::io(&self.path, e))?;
        if n == 0 {
            return Ok(None);
        }
        self.line += 1;
        let ctx = LineCtx {
            path: &self.path,
            line: self.line,
        };
        let line = self.buf.strip_suffix(b"\n").unwrap_or(&self.buf);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let mut cols = line.split(|&c| c == b'\t');
        let (Some(u), Some(items), None) = (cols.next(), cols.next(), cols.next()) else {
            return Err(ctx.err("line", line, "expected 2 tab-separated columns"));
        };
        let user = parse_u64(u)
            .ok_or_else(|| ctx.err("user_id", u, "not an unsigned 64-bit integer id"))?;
        let mut seq = UserSeq {
            user,
            items: Vec::new(),
        };
        if !items.is_empty() {
            for (k, e) in items.split(|&c| c == LIST_SEP).enumerate() {
                seq.items.push(parse_u64(e).ok_or_else(|| {
                    ctx.err(
                        "item_ids",
                        e,
                        format!("element {k} is not an unsigned 64-bit integer id"),
                    )
                })?);
            }
        }
        Ok(Some(seq))
    }
}

impl Iterator for SeqReader {
    type Item = Result<UserSeq, DataError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.read().transpose()
    }
}

/// Reads a whole user-sequence file (one line per user: small).
pub fn read_seqs(path: &Path) -> Result<Vec<UserSeq>, DataError> {
    SeqReader::open(path)?.collect()
}

/// Result of [`bench_reader`].
#[derive(Debug, Clone)]
pub struct BenchSummary {
    /// Samples delivered.
    pub samples: u64,
    /// Batches built.
    pub batches: u64,
    /// Wall time.
    pub elapsed: Duration,
}

impl BenchSummary {
    /// Throughput in samples per second.
    pub fn samples_per_sec(&self) -> f64 {
        self.samples as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for BenchSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "bench-reader: {} samples in {} batches in {:.2} s = {:.0} samples/s",
            self.samples,
            self.batches,
            self.elapsed.as_secs_f64(),
            self.samples_per_sec()
        )
    }
}

/// Reads `files` once with `opts` on this thread, building every batch, and
/// measures samples per second into ready batches.
pub fn bench_reader(files: &[PathBuf], opts: ReaderOptions) -> Result<BenchSummary, DataError> {
    let t0 = Instant::now();
    let mut reader = BatchReader::new(files, opts)?;
    let (mut samples, mut batches) = (0u64, 0u64);
    while let Some(b) = reader.next_batch()? {
        samples += b.batch_size as u64;
        batches += 1;
        std::hint::black_box(&b);
    }
    Ok(BenchSummary {
        samples,
        batches,
        elapsed: t0.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::encode_sample;
    use std::collections::BTreeMap;

    fn sample(k: u64) -> Sample {
        let h: Vec<u64> = (0..1 + k % 7).map(|j| 100 + k + j).collect();
        Sample {
            label: (k % 2) as f32,
            user: k,
            item: 1000 + k,
            cat: k % 5 + 1,
            hist_cats: h.iter().map(|x| x % 5 + 1).collect(),
            neg_items: h.iter().map(|x| x + 7).collect(),
            neg_cats: h.iter().map(|x| x % 3 + 1).collect(),
            hist_items: h,
            ..Default::default()
        }
    }

    fn write_file(dir: &Path, name: &str, range: std::ops::Range<u64>) -> PathBuf {
        let mut buf = Vec::new();
        for k in range {
            encode_sample(&mut buf, &sample(k), false);
        }
        let p = dir.join(name);
        std::fs::write(&p, buf).unwrap();
        p
    }

    fn users(reader: BatchReader) -> Vec<u64> {
        reader.flat_map(|b| b.unwrap().user_ids).collect()
    }

    #[test]
    fn schema_files_read_like_legacy_files_and_mismatches_are_named() {
        use crate::schema_format::{encode, from_legacy, header};
        let d = tempfile::tempdir().unwrap();
        let legacy = write_file(d.path(), "legacy.txt", 0..50);
        let schema = Arc::new(FeatureSchema::ids_only(4, 4, Some(2)).unwrap());
        let mut buf = header(&schema, true).into_bytes();
        for k in 0..50 {
            encode(&mut buf, &from_legacy(&sample(k), true), &schema, true);
        }
        let wide = d.path().join("wide.txt");
        std::fs::write(&wide, buf).unwrap();
        for workers in [1usize, 3] {
            for i in 0..workers {
                let opts = ReaderOptions {
                    batch_size: 8,
                    max_len: 4,
                    shuffle_buffer: 16,
                    worker_index: i,
                    num_workers: workers,
                    ..ReaderOptions::default()
                };
                let l: Vec<Batch> = BatchReader::new(std::slice::from_ref(&legacy), opts.clone())
                    .unwrap()
                    .map(Result::unwrap)
                    .collect();
                let wide_opts = ReaderOptions {
                    schema: Some(schema.clone()),
                    ..opts
                };
                let w: Vec<Batch> = BatchReader::new(std::slice::from_ref(&wide), wide_opts)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect();
                assert_eq!(l.len(), w.len());
                for (l, w) in l.iter().zip(&w) {
                    assert_eq!(
                        (&l.user_ids, &l.labels, &l.mask),
                        (&w.user_ids, &w.labels, &w.mask)
                    );
                    assert_eq!(
                        (&l.items, &l.hist_item_idx),
                        (&w.schema_tables[1], &w.features[3].idx)
                    );
                    assert_eq!(l.neg_cat_idx, w.features[4].neg);
                }
            }
        }
        let e = SampleReader::open(std::slice::from_ref(&legacy), 0, 1, false)
            .unwrap()
            .with_schema(Some(schema.clone()))
            .read()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("legacy.txt") && e.contains("no `#ember-samples` header"),
            "{e}"
        );
        let e = SampleReader::open(std::slice::from_ref(&wide), 0, 1, false)
            .unwrap()
            .read()
            .unwrap_err()
            .to_string();
        assert!(e.contains("wide.txt") && e.contains("[[features]]"), "{e}");
        let full = FeatureSchema::ids_only(4, 4, Some(2)).unwrap();
        let mut feats: Vec<crate::schema::Feature> = full.features().to_vec();
        feats[0].name = "uid".into();
        let other = Arc::new(FeatureSchema::new(feats).unwrap());
        let e = SampleReader::open(std::slice::from_ref(&wide), 0, 1, false)
            .unwrap()
            .with_schema(Some(other))
            .read()
            .unwrap_err()
            .to_string();
        assert!(e.contains("wide.txt") && e.contains("feature `uid`"), "{e}");
    }

    /// Without negatives requested, a legacy file's DIEN columns are not
    /// read: no negative id reaches a batch (nothing to pull or push).
    #[test]
    fn negatives_off_leaves_the_dien_columns_unread() {
        let d = tempfile::tempdir().unwrap();
        let f = write_file(d.path(), "a", 0..40);
        let opts = ReaderOptions {
            batch_size: 8,
            shuffle_buffer: 0,
            negatives: false,
            ..ReaderOptions::default()
        };
        for b in BatchReader::new(std::slice::from_ref(&f), opts.clone()).unwrap() {
            let b = b.unwrap();
            assert!(b.neg_item_idx.is_none() && b.neg_cat_idx.is_none());
            // Negative items are 100 + k + j + 7: only those also in a history stay.
            let hist: std::collections::BTreeSet<u64> = b
                .hist_item_idx
                .iter()
                .filter(|&&i| i < b.items.pad_index())
                .map(|&i| b.items.unique[i as usize])
                .collect();
            let targets: std::collections::BTreeSet<u64> = b
                .item_idx
                .iter()
                .map(|&i| b.items.unique[i as usize])
                .collect();
            assert!(b
                .items
                .unique
                .iter()
                .all(|id| hist.contains(id) || targets.contains(id)));
        }
        let with = BatchReader::new(
            std::slice::from_ref(&f),
            ReaderOptions {
                negatives: true,
                ..opts
            },
        )
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
        assert!(with.neg_item_idx.is_some());
    }

    #[test]
    fn reads_in_order_without_shuffle() {
        let d = tempfile::tempdir().unwrap();
        let f = write_file(d.path(), "a", 0..10);
        let samples: Vec<Sample> = SampleReader::open(&[f], 0, 1, false)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(samples, (0..10).map(sample).collect::<Vec<_>>());
    }

    #[test]
    fn worker_split_covers_every_sample_once() {
        let d = tempfile::tempdir().unwrap();
        let files = vec![
            write_file(d.path(), "a", 0..101),
            write_file(d.path(), "b", 101..150),
        ];
        for m in [1usize, 2, 3, 7] {
            let mut seen = BTreeMap::new();
            for i in 0..m {
                let opts = ReaderOptions {
                    batch_size: 8,
                    worker_index: i,
                    num_workers: m,
                    shuffle_buffer: 16,
                    ..ReaderOptions::default()
                };
                for u in users(BatchReader::new(&files, opts).unwrap()) {
                    *seen.entry(u).or_insert(0) += 1;
                    // Global line k goes to worker k % m.
                    assert_eq!(u as usize % m, i);
                }
            }
            assert_eq!(seen.len(), 150, "m={m}");
            assert!(seen.values().all(|&c| c == 1));
        }
    }

    #[test]
    fn shuffle_buffer_is_permutation() {
        let input: Vec<Result<u32, ()>> = (0..1000).map(Ok).collect();
        for cap in [0, 1, 2, 10, 999, 1000, 5000] {
            let out: Vec<u32> = shuffled(input.clone().into_iter(), cap, 9)
                .map(Result::unwrap)
                .collect();
            let mut sorted = out.clone();
            sorted.sort();
            assert_eq!(sorted, (0..1000).collect::<Vec<_>>(), "cap={cap}");
            if cap > 1 {
                assert_ne!(out, sorted, "cap={cap} did not shuffle");
            }
        }
    }

    #[test]
    fn epochs_reshuffle_and_batches_match_samples() {
        let d = tempfile::tempdir().unwrap();
        let f = write_file(d.path(), "a", 0..50);
        let opts = ReaderOptions {
            batch_size: 16,
            shuffle_buffer: 20,
            epochs: 2,
            ..ReaderOptions::default()
        };
        let batches: Vec<Batch> = BatchReader::new(std::slice::from_ref(&f), opts.clone())
            .unwrap()
            .map(Result::unwrap)
            .collect();
        // 50 = 16+16+16+2 per epoch; batches do not span epochs.
        let sizes: Vec<usize> = batches.iter().map(|b| b.batch_size).collect();
        assert_eq!(sizes, vec![16, 16, 16, 2, 16, 16, 16, 2]);
        let e0: Vec<u64> = batches[..4]
            .iter()
            .flat_map(|b| b.user_ids.clone())
            .collect();
        let e1: Vec<u64> = batches[4..]
            .iter()
            .flat_map(|b| b.user_ids.clone())
            .collect();
        assert_ne!(e0, e1);
        let mut s0 = e0.clone();
        s0.sort();
        assert_eq!(s0, (0..50).collect::<Vec<_>>());
        // Batch contents equal Batch::from_samples of the same samples.
        let b0 = &batches[0];
        let ss: Vec<Sample> = b0.user_ids.iter().map(|&u| sample(u)).collect();
        assert_eq!(*b0, Batch::from_samples(&ss, opts.max_len));
        assert!(b0.neg_item_idx.is_some());

        let dropped = ReaderOptions {
            drop_last: true,
            ..opts
        };
        let n = BatchReader::new(&[f], dropped).unwrap().count();
        assert_eq!(n, 6);
    }

    #[test]
    fn resume_continues_exactly() {
        let d = tempfile::tempdir().unwrap();
        let f = vec![write_file(d.path(), "a", 0..70)];
        let opts = ReaderOptions {
            batch_size: 8,
            shuffle_buffer: 25,
            epochs: 3,
            seed: 77,
            ..ReaderOptions::default()
        };
        let full: Vec<Batch> = BatchReader::new(&f, opts.clone())
            .unwrap()
            .map(Result::unwrap)
            .collect();
        for stop in [0usize, 1, 5, 8, 9, 17, full.len() - 1] {
            let mut r = BatchReader::new(&f, opts.clone()).unwrap();
            for _ in 0..stop {
                r.next_batch().unwrap().unwrap();
            }
            let pos = r.position();
            let rest: Vec<Batch> = BatchReader::resume(&f, opts.clone(), pos)
                .unwrap()
                .map(Result::unwrap)
                .collect();
            assert_eq!(rest, full[stop..].to_vec(), "stop={stop} pos={pos:?}");
        }
    }

    #[test]
    fn malformed_lines_report_file_line_column() {
        let d = tempfile::tempdir().unwrap();
        let good = "1\t1\t2\t3\t4\x025\t1\x021";
        let cases: Vec<(String, &str)> = vec![
            ("x\t1\t2\t3\t4\x025\t1\x021".into(), "label"),
            ("2\t1\t2\t3\t4\x025\t1\x021".into(), "label"),
            ("1\tu\t2\t3\t4\x025\t1\x021".into(), "user_id"),
            ("1\t1\t-2\t3\t4\x025\t1\x021".into(), "item_id"),
            ("1\t1\t2\t\t4\x025\t1\x021".into(), "cat_id"),
            ("1\t1\t2\t3\t4\x02x\t1\x021".into(), "hist_item_ids"),
            ("1\t1\t2\t3\t4\x025\t1".into(), "hist_cat_ids"),
            (
                "1\t1\t2\t3\t4\x025\t1\x021\t9\x02z\t1\x021".into(),
                "neg_hist_item_ids",
            ),
            (
                "1\t1\t2\t3\t4\x025\t1\x021\t9\x029\t1".into(),
                "neg_hist_cat_ids",
            ),
            ("1\t1\t2\t3\t4\x025".into(), "line"),
            ("".into(), "line"),
        ];
        for (k, (bad, col)) in cases.iter().enumerate() {
            let text = format!("{good}\n{good}\n{bad}\n{good}\n");
            let p = d.path().join(format!("f{k}.txt"));
            std::fs::write(&p, text).unwrap();
            let opts = ReaderOptions {
                batch_size: 2,
                shuffle_buffer: 0,
                ..ReaderOptions::default()
            };
            let mut r = BatchReader::new(std::slice::from_ref(&p), opts.clone()).unwrap();
            assert!(r.next_batch().unwrap().is_some());
            match r.next_batch() {
                Err(DataError::Malformed {
                    path, line, column, ..
                }) => {
                    assert_eq!(
                        (path, line, column.as_str()),
                        (p.clone(), 3, *col),
                        "case {k}"
                    );
                }
                other => panic!("case {k}: {other:?}"),
            }
            assert!(r.next_batch().unwrap().is_none(), "stops after an error");
            let err = DataError::Malformed {
                path: p.clone(),
                line: 3,
                column: col.to_string(),
                value: String::new(),
                reason: String::new(),
            };
            assert!(err.to_string().contains(":3: column"));

            let skip = ReaderOptions {
                skip_malformed: true,
                ..opts
            };
            let mut r = BatchReader::new(&[p], skip).unwrap();
            let n: usize = (&mut r).map(|b| b.unwrap().batch_size).sum();
            assert_eq!((n, r.skipped_malformed()), (3, 1), "case {k}");
        }
    }

    #[test]
    fn malformed_line_message_names_file_line_column_and_problem() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("train.txt");
        std::fs::write(&p, "1\t1\t2\t3\t4\t5\n1\t1\t2\t3\t4\x025\t1\n").unwrap();
        let e = SampleReader::open(std::slice::from_ref(&p), 0, 1, false)
            .unwrap()
            .find_map(Result::err)
            .unwrap();
        assert_eq!(
            e.to_string(),
            format!(
                "{}:2: column hist_cat_ids: has 1 elements but hist_item_ids has 2 (value \"1\")",
                p.display()
            )
        );
    }

    #[test]
    fn in_memory_reader_matches_file_reader() {
        let d = tempfile::tempdir().unwrap();
        let f = write_file(d.path(), "a", 0..40);
        let text = std::fs::read(&f).unwrap();
        for (i, m) in [(0, 1), (1, 3)] {
            let from_file: Vec<Sample> = SampleReader::open(std::slice::from_ref(&f), i, m, false)
                .unwrap()
                .map(Result::unwrap)
                .collect();
            let from_mem: Vec<Sample> =
                SampleReader::from_reader("mem", std::io::Cursor::new(text.clone()), i, m, false)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect();
            assert_eq!(from_mem, from_file);
        }
        let e = SampleReader::from_reader("mem.txt", &b"1\tx"[..], 0, 1, false)
            .unwrap()
            .next()
            .unwrap()
            .unwrap_err();
        assert!(e.to_string().starts_with("mem.txt:1: column line"), "{e}");
    }

    #[test]
    fn overlong_line_is_malformed_and_skippable() {
        let good = "1\t1\t2\t3\t4\x025\t1\x021\n";
        let mut text = good.as_bytes().to_vec();
        text.resize(text.len() + MAX_LINE_BYTES + 1, b'7');
        text.push(b'\n');
        text.extend_from_slice(good.as_bytes());
        let mut r =
            SampleReader::from_reader("big.txt", std::io::Cursor::new(text.clone()), 0, 1, false)
                .unwrap();
        assert!(r.next().unwrap().is_ok());
        match r.next().unwrap() {
            Err(DataError::Malformed {
                line,
                column,
                reason,
                ..
            }) => {
                assert_eq!((line, column.as_str()), (2, "line"));
                assert!(reason.contains("longer than"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let mut r =
            SampleReader::from_reader("big.txt", std::io::Cursor::new(text), 0, 1, true).unwrap();
        let n = (&mut r).map(Result::unwrap).count();
        assert_eq!((n, r.skipped()), (2, 1));
        // A line of exactly the limit is read.
        let mut exact = vec![b'1'; MAX_LINE_BYTES];
        exact.push(b'\n');
        let mut r =
            SampleReader::from_reader("x", std::io::Cursor::new(exact), 0, 1, false).unwrap();
        match r.next().unwrap() {
            Err(DataError::Malformed { reason, .. }) => {
                assert!(reason.contains("found 1"), "parsed, not too long: {reason}")
            }
            other => panic!("{other:?}"),
        }
        assert!(r.next().is_none());
    }

    #[test]
    fn sequence_reader() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.seq");
        std::fs::write(&p, b"1\t4\x021\n2\t\n3\t7\x02x\n").unwrap();
        let mut r = SeqReader::open(&p).unwrap();
        assert_eq!(
            r.next().unwrap().unwrap(),
            UserSeq {
                user: 1,
                items: vec![4, 1]
            }
        );
        assert_eq!(
            r.next().unwrap().unwrap(),
            UserSeq {
                user: 2,
                items: vec![]
            }
        );
        match r.next().unwrap() {
            Err(DataError::Malformed {
                line: 3, column, ..
            }) => assert_eq!(column, "item_ids"),
            other => panic!("{other:?}"),
        }
    }
}
