//! The compact sparse embedding store.
//!
//! A [`Table`] is split into [`NUM_STRIPES`] stripes, each a
//! `parking_lot::RwLock` over an index and an arena:
//!
//! * the **arena** is a list of contiguous `Vec<f32>` chunks of
//!   [`CHUNK_ROWS`] rows; every row is one fixed-stride record
//!   `[key_lo, key_hi, count, step_lo, step_hi, emb[dim], opt_state[s]]`
//!   (the key, the feature count n_j and the last-update step are stored as
//!   raw bits in f32 slots), so a row costs exactly its payload plus 8 bytes
//!   of step, and a lookup touches one place in memory after the index;
//! * the **index** is a linear-probing table of 8-byte buckets
//!   `slot << 32 | tag` (`tag` = low 32 bits of the id hash, which also give
//!   the home bucket); the key itself is compared in the arena row.
//!
//! Batched operations group their ids by stripe, take each stripe lock once
//! per batch and work through each stripe's ids as a software pipeline over
//! blocks of [`PREFETCH_BLOCK`] ids: while block `k` is looked up and copied
//! or updated, the rows of block `k + 1` (found through their candidate
//! slots) and the home buckets of block `k + 2` are prefetched, so the cache
//! misses overlap instead of following each other. A push holds the stripe's write lock while it updates a
//! row, so concurrent pushes to the same row are atomic per row.
//! Ids with a count but no row (loaded counts, or ids held back by
//! admission) live in a small per-stripe map of pending counts.

use crate::error::{PsError, Result};
use crate::init::Init;
use crate::optim::Optimizer;
use ember_proto::route::splitmix64;
use ember_proto::v1::{initializer, CountMode, TableConfig};
use parking_lot::RwLock;
use rustc_hash::FxHashMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// Number of lock stripes per table.
pub const NUM_STRIPES: usize = 64;
/// Rows per arena chunk (the first chunk of a stripe grows up to this size).
pub const CHUNK_ROWS: usize = 4096;
/// f32 slots of the row header: key (2), count (1), last step (2).
pub const HEADER: usize = 5;
/// A TTL sweep of one stripe runs every this many pushes to a table.
pub const SWEEP_EVERY_PUSHES: u64 = 256;
/// Longest table name in bytes.
pub const MAX_NAME_BYTES: usize = 128;
/// Widest row.
pub const MAX_DIM: u32 = 4096;

/// Ids per prefetch block in batched pulls and pushes.
pub const PREFETCH_BLOCK: usize = 16;

/// Block `k` of `list` (empty past the end).
#[inline]
fn block(list: &[u32], k: usize) -> &[u32] {
    let a = (k * PREFETCH_BLOCK).min(list.len());
    let b = ((k + 1) * PREFETCH_BLOCK).min(list.len());
    &list[a..b]
}

const STORE_SALT: u64 = 0x5851_F42D_4C95_7F2D;

/// Hash of an id inside the store (independent of the routing hash, whose
/// low bits are constrained on a shard).
#[inline]
fn id_hash(id: u64) -> u64 {
    splitmix64(id ^ STORE_SALT)
}

#[inline]
fn stripe_of(h: u64) -> usize {
    ((h >> 32) as usize) & (NUM_STRIPES - 1)
}

#[inline]
fn row_key(row: &[f32]) -> u64 {
    u64::from(row[0].to_bits()) | (u64::from(row[1].to_bits()) << 32)
}
#[inline]
fn row_count(row: &[f32]) -> u32 {
    row[2].to_bits()
}
#[inline]
fn row_step(row: &[f32]) -> u64 {
    u64::from(row[3].to_bits()) | (u64::from(row[4].to_bits()) << 32)
}
#[inline]
fn set_key(row: &mut [f32], id: u64) {
    row[0] = f32::from_bits(id as u32);
    row[1] = f32::from_bits((id >> 32) as u32);
}
#[inline]
fn set_count(row: &mut [f32], c: u32) {
    row[2] = f32::from_bits(c);
}
#[inline]
fn set_step(row: &mut [f32], s: u64) {
    row[3] = f32::from_bits(s as u32);
    row[4] = f32::from_bits((s >> 32) as u32);
}

/// A validated table configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct TableSpec {
    /// The config as received (compared verbatim on re-creation).
    pub config: TableConfig,
    /// Row width.
    pub dim: usize,
    /// Initializer of unseen rows.
    pub init: Init,
    /// Optimizer applied on push.
    pub opt: Optimizer,
    /// Source of n_j.
    pub count_mode: CountMode,
}

impl TableSpec {
    /// Validates a proto table config; the error names the bad field.
    pub fn from_config(config: TableConfig) -> Result<Self> {
        let bad = |m: String| Err(PsError::invalid(format!("malformed table config: {m}")));
        if config.name.is_empty() || config.name.len() > MAX_NAME_BYTES {
            return bad(format!("name must be 1..={MAX_NAME_BYTES} bytes"));
        }
        if config.dim == 0 || config.dim > MAX_DIM {
            return bad(format!("dim {} not in 1..={MAX_DIM}", config.dim));
        }
        let init_cfg = config.init.unwrap_or_default();
        let kind = initializer::Kind::try_from(init_cfg.kind).map_err(|_| {
            PsError::invalid(format!(
                "malformed table config: unknown init.kind {}",
                init_cfg.kind
            ))
        })?;
        if !init_cfg.scale.is_finite() || init_cfg.scale < 0.0 {
            return bad("init.scale must be finite and >= 0".into());
        }
        let count_mode = CountMode::try_from(config.count_mode).map_err(|_| {
            PsError::invalid(format!(
                "malformed table config: unknown count_mode {}",
                config.count_mode
            ))
        })?;
        if !config.mba_lambda.is_finite() || config.mba_lambda < 0.0 {
            return bad("mba_lambda must be finite and >= 0".into());
        }
        if config.mba_lambda > 0.0 && count_mode == CountMode::CountNone {
            return bad("mba_lambda > 0 requires count_mode COUNT_EXACT or COUNT_ONLINE".into());
        }
        if !config.plain_l2.is_finite() || config.plain_l2 < 0.0 {
            return bad("plain_l2 must be finite and >= 0".into());
        }
        let opt = Optimizer::from_config(config.optimizer.as_ref())?;
        Ok(TableSpec {
            dim: config.dim as usize,
            init: Init {
                kind,
                scale: init_cfg.scale,
                seed: config.seed,
            },
            opt,
            count_mode,
            config,
        })
    }

    /// Table name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// f32 values per stored row (header + embedding + optimizer state).
    pub fn stride(&self) -> usize {
        HEADER + self.dim + self.opt.state_len(self.dim)
    }

    /// Whether pushes accumulate per-id counts (every mode but EXACT).
    fn counts_online(&self) -> bool {
        self.count_mode != CountMode::CountExact
    }
}

/// Empty bucket (slot `u32::MAX` is never handed out).
const EMPTY: u64 = u64::MAX;
/// Smallest non-empty bucket array.
const MIN_BUCKETS: usize = 16;

/// Hints the CPU to fetch the cache line at `p` (no-op off x86-64).
#[inline(always)]
fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint; it never faults, whatever the address.
    #[allow(unused_unsafe)]
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Prefetches `len` bytes from `p` (every cache line they touch).
#[inline(always)]
fn prefetch_span(p: *const f32, len: usize) {
    let b = p as *const u8;
    let mut off = 0;
    while off < len {
        prefetch(b.wrapping_add(off));
        off += 64;
    }
    prefetch(b.wrapping_add(len.saturating_sub(1)));
}

/// The stripe index: linear probing over 8-byte buckets `slot << 32 | tag`,
/// `tag` being the low 32 bits of the id hash (its low bits give the home
/// bucket, so growing needs no access to the rows). Grows at 3/4 load.
#[derive(Default)]
struct Index {
    buckets: Vec<u64>,
    len: usize,
}

impl Index {
    #[inline]
    fn tag(h: u64) -> u32 {
        h as u32
    }

    #[inline]
    fn mask(&self) -> usize {
        self.buckets.len().wrapping_sub(1)
    }

    fn len(&self) -> usize {
        self.len
    }

    fn allocation_size(&self) -> usize {
        self.buckets.capacity() * 8
    }

    /// Prefetches the home bucket of hash `h`.
    #[inline]
    fn prefetch(&self, h: u64) {
        if !self.buckets.is_empty() {
            let i = Self::tag(h) as usize & self.mask();
            prefetch(self.buckets.as_ptr().wrapping_add(i));
        }
    }

    /// Slots whose bucket tag matches `h`, in probe order, until an empty bucket.
    #[inline]
    fn probe(&self, h: u64) -> impl Iterator<Item = u32> + '_ {
        let tag = Self::tag(h);
        let mask = self.mask();
        let mut i = tag as usize & mask;
        let mut left = self.buckets.len();
        std::iter::from_fn(move || {
            while left > 0 {
                let b = self.buckets[i];
                if b == EMPTY {
                    return None;
                }
                i = (i + 1) & mask;
                left -= 1;
                if b as u32 == tag {
                    return Some((b >> 32) as u32);
                }
            }
            None
        })
    }

    /// First slot whose tag matches `h` (a likely hit, for prefetching).
    #[inline]
    fn candidate(&self, h: u64) -> Option<u32> {
        self.probe(h).next()
    }

    /// The slot of hash `h` for which `eq(slot)` holds.
    #[inline]
    fn find(&self, h: u64, mut eq: impl FnMut(u32) -> bool) -> Option<u32> {
        self.probe(h).find(|&s| eq(s))
    }

    fn place(buckets: &mut [u64], entry: u64) {
        let mask = buckets.len() - 1;
        let mut i = entry as u32 as usize & mask;
        while buckets[i] != EMPTY {
            i = (i + 1) & mask;
        }
        buckets[i] = entry;
    }

    /// Inserts `slot` under hash `h` (the key must not be present).
    fn insert_unique(&mut self, h: u64, slot: u32) {
        if (self.len + 1) * 4 > self.buckets.len() * 3 {
            let n = (self.buckets.len() * 2).max(MIN_BUCKETS);
            let mut fresh = vec![EMPTY; n];
            for &b in self.buckets.iter().filter(|&&b| b != EMPTY) {
                Self::place(&mut fresh, b);
            }
            self.buckets = fresh;
        }
        Self::place(
            &mut self.buckets,
            (u64::from(slot) << 32) | u64::from(Self::tag(h)),
        );
        self.len += 1;
    }

    /// Every slot, in bucket order.
    fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.buckets
            .iter()
            .filter(|&&b| b != EMPTY)
            .map(|&b| (b >> 32) as u32)
    }

    /// Keeps the slots for which `keep` holds (rebuilds the buckets when
    /// any is dropped, so probe chains stay intact).
    fn retain(&mut self, mut keep: impl FnMut(u32) -> bool) {
        let kept: Vec<u64> = self
            .buckets
            .iter()
            .filter(|&&b| b != EMPTY && keep((b >> 32) as u32))
            .copied()
            .collect();
        if kept.len() == self.len {
            return;
        }
        self.buckets.fill(EMPTY);
        for &b in &kept {
            Self::place(&mut self.buckets, b);
        }
        self.len = kept.len();
    }
}

#[derive(Default)]
struct Stripe {
    index: Index,
    chunks: Vec<Vec<f32>>,
    /// Slots handed out so far (live + free).
    slots: u32,
    free: Vec<u32>,
    /// Counts of ids without a row.
    pending: FxHashMap<u64, u32>,
    /// Rows whose count is > 0.
    counted_rows: u64,
}

impl Stripe {
    #[inline]
    fn row(&self, slot: u32, stride: usize) -> &[f32] {
        let s = slot as usize;
        let off = (s % CHUNK_ROWS) * stride;
        &self.chunks[s / CHUNK_ROWS][off..off + stride]
    }

    #[inline]
    fn find(&self, h: u64, id: u64, stride: usize) -> Option<u32> {
        let chunks = &self.chunks;
        self.index.find(h, |slot| {
            let s = slot as usize;
            let off = (s % CHUNK_ROWS) * stride;
            chunks
                .get(s / CHUNK_ROWS)
                .and_then(|c| c.get(off..off + 2))
                .is_some_and(|k| row_key(k) == id)
        })
    }

    /// Address of row `slot` (for prefetching; never dereferenced).
    #[inline]
    fn row_ptr(&self, slot: u32, stride: usize) -> *const f32 {
        let s = slot as usize;
        self.chunks
            .get(s / CHUNK_ROWS)
            .map_or(std::ptr::null(), |c| {
                c.as_ptr().wrapping_add((s % CHUNK_ROWS) * stride)
            })
    }

    /// Prefetches the home buckets of a block of ids.
    #[inline]
    fn prefetch_index(&self, hashes: &[u64], block: &[u32]) {
        for &pos in block {
            self.index.prefetch(hashes[pos as usize]);
        }
    }

    /// Prefetches the first `bytes` bytes of each candidate row of a block
    /// (its buckets should have been prefetched a block earlier).
    #[inline]
    fn prefetch_rows(&self, hashes: &[u64], block: &[u32], stride: usize, bytes: usize) {
        for &pos in block {
            if let Some(slot) = self.index.candidate(hashes[pos as usize]) {
                prefetch_span(self.row_ptr(slot, stride), bytes);
            }
        }
    }

    /// The software pipeline step before working on block `k` of `list`:
    /// rows of block `k + 1` and buckets of block `k + 2` (blocks 0 and 1
    /// are started when `k == 0`).
    #[inline]
    fn prefetch_ahead(&self, hashes: &[u64], list: &[u32], k: usize, stride: usize, bytes: usize) {
        if k == 0 {
            self.prefetch_index(hashes, block(list, 0));
            self.prefetch_index(hashes, block(list, 1));
            self.prefetch_rows(hashes, block(list, 0), stride, bytes);
        }
        self.prefetch_rows(hashes, block(list, k + 1), stride, bytes);
        self.prefetch_index(hashes, block(list, k + 2));
    }

    /// Allocates a slot for a new row of key `id` (zeroed apart from the key).
    fn alloc(&mut self, h: u64, id: u64, stride: usize) -> Result<u32> {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                let s = self.slots;
                if s == u32::MAX {
                    return Err(PsError::Internal("stripe slot space exhausted".into()));
                }
                let ci = s as usize / CHUNK_ROWS;
                if ci == self.chunks.len() {
                    let cap = if self.chunks.is_empty() {
                        16 * stride
                    } else {
                        CHUNK_ROWS * stride
                    };
                    self.chunks.push(Vec::with_capacity(cap));
                }
                let chunk = &mut self.chunks[ci];
                if chunk.len() + stride > chunk.capacity() {
                    let want = (chunk.capacity() * 2).min(CHUNK_ROWS * stride);
                    chunk.reserve_exact(want - chunk.len());
                }
                chunk.resize(chunk.len() + stride, 0.0);
                self.slots = s
                    .checked_add(1)
                    .ok_or_else(|| PsError::Internal("stripe slot space exhausted".into()))?;
                s
            }
        };
        self.index.insert_unique(h, slot);
        let row = self.row_mut(slot, stride);
        row.fill(0.0);
        set_key(row, id);
        Ok(slot)
    }

    #[inline]
    fn row_mut(&mut self, slot: u32, stride: usize) -> &mut [f32] {
        let s = slot as usize;
        let off = (s % CHUNK_ROWS) * stride;
        &mut self.chunks[s / CHUNK_ROWS][off..off + stride]
    }

    fn resident_bytes(&self) -> u64 {
        let arena: usize = self.chunks.iter().map(|c| c.capacity() * 4).sum();
        let pending = self.pending.capacity() * (std::mem::size_of::<(u64, u32)>() + 1);
        (arena + self.index.allocation_size() + pending + self.free.capacity() * 4) as u64
    }
}

/// Outcome of a push to a table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PushOutcome {
    /// Rows updated (created or existing).
    pub updated: u64,
    /// Ids held back by admission.
    pub not_admitted: u64,
}

/// This shard's statistics for one table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableStats {
    /// Rows stored.
    pub rows: u64,
    /// Bytes of arena + index + pending counts (allocated capacity).
    pub resident_bytes: u64,
    /// Ids with a count (rows with count > 0 plus pending counts).
    pub counted_ids: u64,
    /// Rows evicted by TTL since start.
    pub evicted: u64,
    /// Pushed ids held back by admission since start.
    pub not_admitted: u64,
}

/// One sparse table's slice on this shard.
pub struct Table {
    spec: TableSpec,
    stride: usize,
    stripes: Box<[RwLock<Stripe>]>,
    evicted: AtomicU64,
    not_admitted: AtomicU64,
    max_step: AtomicU64,
    pushes: AtomicU64,
}

/// Ids of a batch grouped by stripe: `order[start[s]..start[s+1]]` are the
/// positions of the ids of stripe `s`.
struct Groups {
    hashes: Vec<u64>,
    order: Vec<u32>,
    start: [u32; NUM_STRIPES + 1],
}

fn group(ids: &[u64]) -> Groups {
    let hashes: Vec<u64> = ids.iter().map(|&id| id_hash(id)).collect();
    let mut start = [0u32; NUM_STRIPES + 1];
    for &h in &hashes {
        start[stripe_of(h) + 1] += 1;
    }
    for s in 0..NUM_STRIPES {
        start[s + 1] += start[s];
    }
    let mut fill = start;
    let mut order = vec![0u32; ids.len()];
    for (pos, &h) in hashes.iter().enumerate() {
        let s = stripe_of(h);
        order[fill[s] as usize] = pos as u32;
        fill[s] += 1;
    }
    Groups {
        hashes,
        order,
        start,
    }
}

impl Table {
    /// An empty table.
    pub fn new(spec: TableSpec) -> Self {
        let stride = spec.stride();
        Table {
            spec,
            stride,
            stripes: (0..NUM_STRIPES)
                .map(|_| RwLock::new(Stripe::default()))
                .collect(),
            evicted: AtomicU64::new(0),
            not_admitted: AtomicU64::new(0),
            max_step: AtomicU64::new(0),
            pushes: AtomicU64::new(0),
        }
    }

    /// The table's validated config.
    pub fn spec(&self) -> &TableSpec {
        &self.spec
    }

    /// Row width.
    pub fn dim(&self) -> usize {
        self.spec.dim
    }

    /// Writes the rows of `ids` (duplicates allowed) into `out`
    /// (`ids.len() * dim` values, row-major). Unseen ids get their initial
    /// value and are not stored.
    pub fn pull(&self, ids: &[u64], out: &mut Vec<f32>) {
        let dim = self.spec.dim;
        let stride = self.stride;
        out.clear();
        out.resize(ids.len() * dim, 0.0);
        let g = group(ids);
        for s in 0..NUM_STRIPES {
            let (a, b) = (g.start[s] as usize, g.start[s + 1] as usize);
            if a == b {
                continue;
            }
            let stripe = self.stripes[s].read();
            let list = &g.order[a..b];
            for k in 0..list.len().div_ceil(PREFETCH_BLOCK) {
                stripe.prefetch_ahead(&g.hashes, list, k, stride, (HEADER + dim) * 4);
                for &pos in block(list, k) {
                    let pos = pos as usize;
                    let id = ids[pos];
                    let dst = &mut out[pos * dim..(pos + 1) * dim];
                    match stripe.find(g.hashes[pos], id, stride) {
                        Some(slot) => {
                            dst.copy_from_slice(&stripe.row(slot, stride)[HEADER..HEADER + dim])
                        }
                        None => self.spec.init.fill(id, dst),
                    }
                }
            }
        }
    }

    /// Applies gradients: for each id, MBA (`g += λ/n_j · w`) and plain L2
    /// (`g += l2 · w`) once, then the optimizer step, under the stripe lock.
    ///
    /// The caller has validated the request: `ids` unique,
    /// `grads.len() == ids.len() * dim`, finite grads, `counts` empty or one
    /// per id and >= 1. Under COUNT_EXACT an id with no loaded count uses
    /// n_j = 1 (the most conservative reading of "unknown").
    pub fn push(&self, ids: &[u64], grads: &[f32], counts: &[u32], step: u64) -> PushOutcome {
        let spec = &self.spec;
        let dim = spec.dim;
        let stride = self.stride;
        let online = spec.counts_online();
        let lambda = spec.config.mba_lambda;
        let l2 = spec.config.plain_l2;
        let admit = spec.config.admit_min_count;
        let mut out = PushOutcome::default();
        let mut gbuf = vec![0.0f32; dim];
        self.max_step.fetch_max(step, Ordering::Relaxed);
        let g = group(ids);
        for s in 0..NUM_STRIPES {
            let (a, b) = (g.start[s] as usize, g.start[s + 1] as usize);
            if a == b {
                continue;
            }
            let mut guard = self.stripes[s].write();
            let stripe = &mut *guard;
            let list = &g.order[a..b];
            for k in 0..list.len().div_ceil(PREFETCH_BLOCK) {
                stripe.prefetch_ahead(&g.hashes, list, k, stride, stride * 4);
                for &pos in block(list, k) {
                    let pos = pos as usize;
                    let id = ids[pos];
                    let h = g.hashes[pos];
                    let c = counts.get(pos).copied().unwrap_or(1);
                    let slot = match stripe.find(h, id, stride) {
                        Some(slot) => {
                            if online {
                                let row = stripe.row_mut(slot, stride);
                                let old = row_count(row);
                                set_count(row, old.saturating_add(c));
                                if old == 0 {
                                    stripe.counted_rows += 1;
                                }
                            }
                            slot
                        }
                        None => {
                            let prior = stripe.pending.get(&id).copied().unwrap_or(0);
                            let n = if online {
                                prior.saturating_add(c)
                            } else {
                                prior
                            };
                            if admit > 1 && n < admit {
                                if online {
                                    stripe.pending.insert(id, n);
                                }
                                out.not_admitted += 1;
                                continue;
                            }
                            if prior > 0 {
                                stripe.pending.remove(&id);
                            }
                            let Ok(slot) = stripe.alloc(h, id, stride) else {
                                // Slot space of a stripe (2^32 rows) exhausted:
                                // treat as not admitted rather than corrupting.
                                out.not_admitted += 1;
                                continue;
                            };
                            let row = stripe.row_mut(slot, stride);
                            set_count(row, n);
                            spec.init.fill(id, &mut row[HEADER..HEADER + dim]);
                            spec.opt.init_state(&mut row[HEADER + dim..]);
                            if n > 0 {
                                stripe.counted_rows += 1;
                            }
                            slot
                        }
                    };
                    let row = stripe.row_mut(slot, stride);
                    gbuf.copy_from_slice(&grads[pos * dim..(pos + 1) * dim]);
                    let (head, rest) = row.split_at_mut(HEADER);
                    let (w, state) = rest.split_at_mut(dim);
                    let nj = row_count(head).max(1);
                    regularize(&mut gbuf, w, lambda, nj, l2);
                    spec.opt.step(w, state, &gbuf);
                    set_step(head, step);
                    out.updated += 1;
                }
            }
        }
        self.not_admitted
            .fetch_add(out.not_admitted, Ordering::Relaxed);
        if spec.config.ttl_steps > 0 {
            let p = self.pushes.fetch_add(1, Ordering::Relaxed) + 1;
            if p.is_multiple_of(SWEEP_EVERY_PUSHES) {
                let s = ((p / SWEEP_EVERY_PUSHES) as usize) % NUM_STRIPES;
                self.sweep_stripe(s);
            }
        }
        out
    }

    /// Loads exact counts (`replace` forgets all previous counts first).
    /// Returns the number of counted ids after the load.
    pub fn load_counts(&self, ids: &[u64], counts: &[u32], replace: bool) -> u64 {
        let stride = self.stride;
        if replace {
            for st in self.stripes.iter() {
                let mut guard = st.write();
                let stripe = &mut *guard;
                stripe.pending.clear();
                stripe.counted_rows = 0;
                let chunks = &mut stripe.chunks;
                for slot in stripe.index.iter() {
                    let s = slot as usize;
                    let off = (s % CHUNK_ROWS) * stride;
                    set_count(&mut chunks[s / CHUNK_ROWS][off..off + stride], 0);
                }
            }
        }
        let g = group(ids);
        for s in 0..NUM_STRIPES {
            let (a, b) = (g.start[s] as usize, g.start[s + 1] as usize);
            if a == b {
                continue;
            }
            let mut guard = self.stripes[s].write();
            let stripe = &mut *guard;
            for &pos in &g.order[a..b] {
                let pos = pos as usize;
                let (id, c) = (ids[pos], counts[pos]);
                match stripe.find(g.hashes[pos], id, stride) {
                    Some(slot) => {
                        let row = stripe.row_mut(slot, stride);
                        let old = row_count(row);
                        set_count(row, c);
                        match (old > 0, c > 0) {
                            (false, true) => stripe.counted_rows += 1,
                            (true, false) => stripe.counted_rows -= 1,
                            _ => {}
                        }
                    }
                    None => {
                        if c > 0 {
                            stripe.pending.insert(id, c);
                        } else {
                            stripe.pending.remove(&id);
                        }
                    }
                }
            }
        }
        self.stats().counted_ids
    }

    fn sweep_stripe(&self, s: usize) -> u64 {
        let ttl = self.spec.config.ttl_steps;
        if ttl == 0 {
            return 0;
        }
        let now = self.max_step.load(Ordering::Relaxed);
        let stride = self.stride;
        let mut guard = self.stripes[s].write();
        let stripe = &mut *guard;
        let chunks = &stripe.chunks;
        let free = &mut stripe.free;
        let pending = &mut stripe.pending;
        let mut evicted = 0u64;
        let mut uncounted = 0u64;
        stripe.index.retain(|slot| {
            let sl = slot as usize;
            let off = (sl % CHUNK_ROWS) * stride;
            let row = &chunks[sl / CHUNK_ROWS][off..off + HEADER];
            if now.saturating_sub(row_step(row)) <= ttl {
                return true;
            }
            let c = row_count(row);
            if c > 0 {
                // Remember n_j of evicted rows (MBA, admission).
                pending.insert(row_key(row), c);
                uncounted += 1;
            }
            free.push(slot);
            evicted += 1;
            false
        });
        stripe.counted_rows -= uncounted;
        self.evicted.fetch_add(evicted, Ordering::Relaxed);
        evicted
    }

    /// Evicts every row not updated for more than `ttl_steps` steps before the
    /// newest pushed step. Returns the rows evicted.
    pub fn sweep(&self) -> u64 {
        (0..NUM_STRIPES).map(|s| self.sweep_stripe(s)).sum()
    }

    /// Statistics of this table on this shard.
    pub fn stats(&self) -> TableStats {
        let mut st = TableStats {
            evicted: self.evicted.load(Ordering::Relaxed),
            not_admitted: self.not_admitted.load(Ordering::Relaxed),
            ..Default::default()
        };
        for stripe in self.stripes.iter() {
            let g = stripe.read();
            st.rows += g.index.len() as u64;
            st.resident_bytes += g.resident_bytes();
            st.counted_ids += g.counted_rows + g.pending.len() as u64;
        }
        st
    }

    /// Visits every stored row: `(id, count, last_step, emb_and_state)`,
    /// one stripe lock at a time.
    pub fn for_each_row(&self, mut f: impl FnMut(u64, u32, u64, &[f32])) {
        for stripe in self.stripes.iter() {
            let g = stripe.read();
            for slot in g.index.iter() {
                let row = g.row(slot, self.stride);
                f(row_key(row), row_count(row), row_step(row), &row[HEADER..]);
            }
        }
    }

    /// A read-locked view of stripe `s` (`s < NUM_STRIPES`) for streaming its
    /// rows out (checkpoints) without copying the table.
    pub fn stripe_rows(&self, s: usize) -> StripeRows<'_> {
        StripeRows {
            guard: self.stripes[s % NUM_STRIPES].read(),
            stride: self.stride,
        }
    }

    /// Visits every pending count (ids with a count but no row).
    pub fn for_each_pending(&self, mut f: impl FnMut(u64, u32)) {
        for stripe in self.stripes.iter() {
            let g = stripe.read();
            for (&id, &c) in g.pending.iter() {
                f(id, c);
            }
        }
    }

    /// Inserts or overwrites a row with explicit contents (restore path).
    /// `vals` holds the embedding followed by the optimizer state.
    pub fn put_row(&self, id: u64, count: u32, step: u64, vals: &[f32]) -> Result<()> {
        if vals.len() != self.stride - HEADER {
            return Err(PsError::Internal(format!(
                "row of {} values for stride {}",
                vals.len(),
                self.stride - HEADER
            )));
        }
        let h = id_hash(id);
        let mut guard = self.stripes[stripe_of(h)].write();
        let stripe = &mut *guard;
        let slot = match stripe.find(h, id, self.stride) {
            Some(s) => s,
            None => stripe.alloc(h, id, self.stride)?,
        };
        let row = stripe.row_mut(slot, self.stride);
        let old = row_count(row);
        set_count(row, count);
        set_step(row, step);
        row[HEADER..].copy_from_slice(vals);
        match (old > 0, count > 0) {
            (false, true) => stripe.counted_rows += 1,
            (true, false) => stripe.counted_rows -= 1,
            _ => {}
        }
        stripe.pending.remove(&id);
        drop(guard);
        self.max_step.fetch_max(step, Ordering::Relaxed);
        Ok(())
    }

    /// Sets a pending count (restore path).
    pub fn put_pending(&self, id: u64, count: u32) {
        let h = id_hash(id);
        self.stripes[stripe_of(h)].write().pending.insert(id, count);
    }

    /// Reads one stored row (`None` when the id has no row): its count,
    /// last step and embedding + optimizer state. For tests and tools.
    pub fn get_row(&self, id: u64) -> Option<(u32, u64, Vec<f32>)> {
        let h = id_hash(id);
        let g = self.stripes[stripe_of(h)].read();
        let slot = g.find(h, id, self.stride)?;
        let row = g.row(slot, self.stride);
        Some((row_count(row), row_step(row), row[HEADER..].to_vec()))
    }

    /// Bytes of payload per row as counted by the benchmarks:
    /// `dim*4 + opt_state*4 + 8 (key) + 4 (count)`.
    pub fn payload_bytes_per_row(&self) -> usize {
        (self.spec.dim + self.spec.opt.state_len(self.spec.dim)) * 4 + 12
    }
}

/// A read-locked stripe of a table (see [`Table::stripe_rows`]).
pub struct StripeRows<'a> {
    guard: parking_lot::RwLockReadGuard<'a, Stripe>,
    stride: usize,
}

impl StripeRows<'_> {
    /// Rows in the stripe.
    pub fn len(&self) -> usize {
        self.guard.index.len()
    }

    /// Whether the stripe holds no row.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `(id, count, last_step, emb_and_state)` of every row.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u32, u64, &[f32])> + '_ {
        self.guard.index.iter().map(move |slot| {
            let row = self.guard.row(slot, self.stride);
            (row_key(row), row_count(row), row_step(row), &row[HEADER..])
        })
    }
}

/// Adds MBA (`λ/n_j · w`) and plain L2 (`l2 · w`) to a gradient, in place.
#[inline]
pub fn regularize(g: &mut [f32], w: &[f32], lambda: f32, nj: u32, l2: f32) {
    let coef = if lambda > 0.0 {
        lambda / nj.max(1) as f32
    } else {
        0.0
    } + l2;
    if coef != 0.0 {
        for (g, w) in g.iter_mut().zip(w) {
            *g += coef * w;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_proto::v1::{optimizer_config::Kind, Adagrad, Initializer, OptimizerConfig, Sgd};

    fn cfg(name: &str, dim: u32) -> TableConfig {
        TableConfig {
            name: name.into(),
            dim,
            init: Some(Initializer {
                kind: initializer::Kind::Uniform as i32,
                scale: 0.1,
            }),
            seed: 9,
            optimizer: Some(OptimizerConfig {
                kind: Some(Kind::Sgd(Sgd { lr: 0.5 })),
            }),
            ..Default::default()
        }
    }

    fn table(c: TableConfig) -> Table {
        Table::new(TableSpec::from_config(c).unwrap())
    }

    #[test]
    fn lazy_init_is_deterministic_and_not_stored() {
        let t = table(cfg("t", 4));
        let mut a = Vec::new();
        let mut b = Vec::new();
        t.pull(&[1, 2, 1], &mut a);
        assert_eq!(&a[0..4], &a[8..12]);
        let t2 = table(cfg("t", 4));
        t2.pull(&[1, 2, 1], &mut b);
        assert_eq!(a, b);
        assert_eq!(t.stats().rows, 0);
        // A push creates the row from the same initial value.
        t.push(&[2], &[0.0; 4], &[], 1);
        t.pull(&[1, 2, 1], &mut b);
        assert_eq!(a, b);
        assert_eq!(t.stats().rows, 1);
    }

    #[test]
    fn sgd_push_updates_and_many_rows_survive_growth() {
        let mut c = cfg("t", 3);
        c.init = None;
        let t = table(c);
        let ids: Vec<u64> = (0..20_000).collect();
        let grads = vec![1.0f32; ids.len() * 3];
        t.push(&ids, &grads, &[], 5);
        let mut out = Vec::new();
        t.pull(&ids, &mut out);
        assert!(out.iter().all(|&v| v == -0.5));
        let st = t.stats();
        assert_eq!(st.rows, 20_000);
        let payload = 20_000 * t.payload_bytes_per_row() as u64;
        assert!(st.resident_bytes < payload * 3, "{st:?} payload {payload}");
        let (count, step, vals) = t.get_row(7).unwrap();
        assert_eq!((count, step), (1, 5));
        assert_eq!(vals, vec![-0.5; 3]);
    }

    #[test]
    fn mba_exact_hand_computed() {
        // SGD lr 0.5, lambda 0.2, n_j = 4 loaded: g' = g + 0.2/4 * w.
        let mut c = cfg("t", 2);
        c.init = None;
        c.mba_lambda = 0.2;
        c.count_mode = CountMode::CountExact as i32;
        let t = table(c);
        t.load_counts(&[1], &[4], true);
        t.put_row(1, 4, 0, &[1.0, -2.0]).unwrap();
        t.push(&[1, 2], &[0.1, 0.1, 0.3, 0.3], &[2, 2], 1);
        let (n, _, v) = t.get_row(1).unwrap();
        assert_eq!(n, 4, "exact counts are not changed by pushes");
        let e0 = 1.0 - 0.5 * (0.1 + 0.05 * 1.0);
        let e1 = -2.0 - 0.5 * (0.1 + 0.05 * -2.0);
        assert!(
            (v[0] - e0).abs() < 1e-6 && (v[1] - e1).abs() < 1e-6,
            "{v:?}"
        );
        // id 2 had no count: n_j treated as 1, w = 0 so MBA adds nothing.
        let (n2, _, v2) = t.get_row(2).unwrap();
        assert_eq!(n2, 0);
        assert!((v2[0] + 0.15).abs() < 1e-6);
    }

    #[test]
    fn mba_online_adds_counts_before_use() {
        let mut c = cfg("t", 1);
        c.init = None;
        c.mba_lambda = 1.0;
        c.plain_l2 = 0.5;
        c.count_mode = CountMode::CountOnline as i32;
        let t = table(c);
        t.put_row(3, 1, 0, &[2.0]).unwrap();
        // n_j = 1 + 3 = 4; g = 0 + 1/4*2 + 0.5*2 = 1.5; w = 2 - 0.5*1.5
        t.push(&[3], &[0.0], &[3], 1);
        let (n, _, v) = t.get_row(3).unwrap();
        assert_eq!(n, 4);
        assert!((v[0] - 1.25).abs() < 1e-6, "{v:?}");
    }

    #[test]
    fn mba_with_adagrad_regularizes_before_the_step() {
        let mut c = cfg("t", 1);
        c.init = None;
        c.mba_lambda = 0.4;
        c.count_mode = CountMode::CountExact as i32;
        c.optimizer = Some(OptimizerConfig {
            kind: Some(Kind::Adagrad(Adagrad {
                lr: 0.1,
                initial_accumulator: 0.0,
                eps: 1e-8,
            })),
        });
        let t = table(c);
        t.put_row(1, 2, 0, &[1.0, 0.0]).unwrap();
        t.push(&[1], &[0.3], &[], 1);
        // g = 0.3 + 0.4/2*1 = 0.5; acc = 0.25; w = 1 - 0.1*0.5/0.5 = 0.9
        let (_, _, v) = t.get_row(1).unwrap();
        assert!(
            (v[0] - 0.9).abs() < 1e-6 && (v[1] - 0.25).abs() < 1e-6,
            "{v:?}"
        );
    }

    #[test]
    fn admission_holds_back_rare_ids() {
        let mut c = cfg("t", 2);
        c.admit_min_count = 3;
        c.count_mode = CountMode::CountOnline as i32;
        let t = table(c);
        let mut init = Vec::new();
        t.pull(&[5], &mut init);
        let o = t.push(&[5], &[1.0, 1.0], &[2], 1);
        assert_eq!(
            o,
            PushOutcome {
                updated: 0,
                not_admitted: 1
            }
        );
        let mut out = Vec::new();
        t.pull(&[5], &mut out);
        assert_eq!(out, init);
        assert_eq!(t.stats().rows, 0);
        assert_eq!(t.stats().counted_ids, 1);
        let o = t.push(&[5], &[1.0, 1.0], &[1], 2);
        assert_eq!(o.updated, 1);
        assert_eq!(t.get_row(5).unwrap().0, 3);
        assert_eq!(t.stats().not_admitted, 1);
        assert_eq!(t.stats().counted_ids, 1);
    }

    #[test]
    fn ttl_sweep_evicts_stale_rows_and_keeps_counts() {
        let mut c = cfg("t", 1);
        c.ttl_steps = 10;
        let t = table(c);
        t.push(&[1, 2], &[0.0, 0.0], &[], 1);
        t.push(&[2], &[0.0], &[], 20);
        assert_eq!(t.sweep(), 1);
        assert!(t.get_row(1).is_none());
        assert!(t.get_row(2).is_some());
        let st = t.stats();
        assert_eq!((st.rows, st.evicted, st.counted_ids), (1, 1, 2));
        // The freed slot is reused.
        t.push(&[3], &[0.0], &[], 21);
        assert_eq!(t.stats().rows, 2);
        assert_eq!(t.get_row(3).unwrap().1, 21);
    }

    #[test]
    fn concurrent_pushes_equal_serial_for_sgd() {
        let mut c = cfg("t", 4);
        c.init = None;
        let t = std::sync::Arc::new(table(c.clone()));
        let ids: Vec<u64> = (0..500).collect();
        let grads: Vec<f32> = (0..ids.len() * 4).map(|i| (i % 7) as f32 * 0.125).collect();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (t, ids, grads) = (t.clone(), ids.clone(), grads.clone());
                std::thread::spawn(move || {
                    for s in 0..50 {
                        t.push(&ids, &grads, &[], s);
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        let serial = table(c);
        for s in 0..400 {
            serial.push(&ids, &grads, &[], s);
        }
        let (mut a, mut b) = (Vec::new(), Vec::new());
        t.pull(&ids, &mut a);
        serial.pull(&ids, &mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn rejects_bad_configs() {
        let mut c = cfg("t", 0);
        assert!(TableSpec::from_config(c.clone()).is_err());
        c.dim = 4;
        c.mba_lambda = 0.1;
        let e = TableSpec::from_config(c).unwrap_err();
        assert!(e.to_string().contains("count_mode"), "{e}");
    }
}
