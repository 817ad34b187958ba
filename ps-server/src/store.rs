//! The compact sparse embedding store.
//!
//! A [`Table`] is split into [`NUM_STRIPES`] stripes, each a
//! `parking_lot::RwLock` over an index and an arena:
//!
//! * the **arena** is a list of contiguous `Vec<u32>` chunks of
//!   up to [`CHUNK_ROWS`] rows (a chunk starts at 16 rows and doubles); every row is one fixed-stride record laid out by
//!   [`RowLayout`]: key, count n_j, last-update step (u32), f32 optimizer
//!   state, then the weights in the table's [`WeightPrecision`] (f32, f16 or
//!   bf16). Dim 18 with f16 weights and row-wise Adagrad is 56 bytes;
//! * the **index** ([`crate::index`]) maps the id hash to the arena slot with
//!   4 bytes per bucket (a 6-bit tag and a 26-bit slot in one `u32`),
//!   growing by 1.25x at 7/8 load, each stripe at its own sizes; the key is
//!   compared in the arena row.
//!
//! Bytes per stored row, all-in: `RowLayout::bytes()` + the index (4 bytes /
//! load, ~5.1 B) + chunk slack; [`Table::stats`] reports the exact
//! allocated bytes and `ember plan` predicts them.
//!
//! Batched operations group their ids by stripe, take each stripe lock once
//! per batch and work through each stripe's ids as a software pipeline over
//! blocks of [`PREFETCH_BLOCK`] ids: while block `k` is looked up and copied
//! or updated, the rows of block `k + 1` (found through their candidate
//! slots) and the home buckets of block `k + 2` are prefetched, so the cache
//! misses overlap instead of following each other. A push holds the stripe's
//! write lock while it updates a row, so concurrent pushes to the same row
//! are atomic per row.
//!
//! **Memory budget.** Every table of a shard charges its allocated bytes to
//! one [`Budget`]. Below it the store behaves as without one. When a new row
//! would make the stripe allocate (a new arena chunk, a larger index) past
//! the budget, the stripe instead evicts one of its rows and reuses the slot:
//! sampled LFU with decay — of [`EVICT_SAMPLES`] random rows of the stripe,
//! the one with the lowest `log2(1 + n_j) - age / half_life` goes (n_j the
//! row's count, age the steps since its last update; a table without counts
//! is pure LRU). So the shard never grows past the budget and keeps serving;
//! an evicted row's next pull gets its initial value again and its count is
//! forgotten. TTL eviction (`ttl_steps`) stays and keeps the count.
//!
//! Ids with a count but no row (loaded counts, ids held back by admission or
//! TTL-evicted) live in a small per-stripe map of pending counts.
//!
//! **Change tracking** (delta checkpoints, [`Table::set_track_tombstones`]).
//! Each stripe keeps the slots of the rows pushed since the last
//! [`Table::take_changed`] / [`Table::reset_changes`] in a list, and the ids
//! of removed rows as tombstones, so a delta checkpoint costs the rows a
//! window touched, not the table's size. A push appends its slot when the
//! row's step before the update is at most the stripe's *mark* (the newest
//! step pushed when the list was last taken; a new row has step 0): every
//! row pushed after the take is listed at least once, a stale push can list
//! it twice, and the take sorts and dedups. A list that passes its cap
//! (half the stripe's rows, or its share of a limited budget) is dropped and
//! the next checkpoint must be a full one.

use crate::error::{PsError, Result};
use crate::index::Index;
use crate::init::Init;
use crate::optim::Optimizer;
use crate::row::{noise_seed, FREE_STEP, HEADER_WORDS, MAX_ROW_STEP};
pub use crate::row::{RowLayout, WeightPrecision};
use ember_proto::rng::{splitmix64, GOLDEN_GAMMA};
use ember_proto::v1::{initializer, CountMode, TableConfig};
use parking_lot::RwLock;
use rustc_hash::FxHashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Number of lock stripes per table.
pub const NUM_STRIPES: usize = 64;
/// Rows per arena chunk (the first chunk of a stripe grows up to this size).
pub const CHUNK_ROWS: usize = 4096;
/// A TTL sweep of one stripe runs every this many pushes to a table.
pub const SWEEP_EVERY_PUSHES: u64 = 256;
/// Longest table name in bytes.
pub const MAX_NAME_BYTES: usize = 128;
/// Widest row.
pub const MAX_DIM: u32 = 4096;
/// Rows sampled per budget eviction.
pub const EVICT_SAMPLES: usize = 8;
/// Share of a limited budget the tombstone lists of a table may take before
/// they are dropped (and the next checkpoint must be a full one).
pub const TOMBSTONE_BUDGET_SHARE: f64 = 0.02;
/// Default half-life (in steps) of a row's count in the eviction score.
pub const DEFAULT_EVICT_HALF_LIFE: u64 = 10_000;

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
fn row_key(row: &[u32]) -> u64 {
    u64::from(row[0]) | (u64::from(row[1]) << 32)
}
#[inline]
fn row_count(row: &[u32]) -> u32 {
    row[2]
}
#[inline]
fn row_step(row: &[u32]) -> u64 {
    u64::from(row[3])
}
#[inline]
fn set_key(row: &mut [u32], id: u64) {
    row[0] = id as u32;
    row[1] = (id >> 32) as u32;
}
#[inline]
fn set_count(row: &mut [u32], c: u32) {
    row[2] = c;
}
#[inline]
fn set_step(row: &mut [u32], s: u64) {
    row[3] = s.min(MAX_ROW_STEP) as u32;
}

/// A shard's memory budget for its sparse tables, shared by them.
#[derive(Debug)]
pub struct Budget {
    max: u64,
    used: AtomicU64,
}

impl Budget {
    /// A budget of `max_bytes` (0 = unlimited).
    pub fn new(max_bytes: u64) -> Arc<Self> {
        Arc::new(Budget {
            max: if max_bytes == 0 { u64::MAX } else { max_bytes },
            used: AtomicU64::new(0),
        })
    }

    /// The limit in bytes (`u64::MAX` when unlimited).
    pub fn max_bytes(&self) -> u64 {
        self.max
    }

    /// Whether a limit is set.
    pub fn is_limited(&self) -> bool {
        self.max != u64::MAX
    }

    /// Bytes charged by the tables.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn fits(&self, more: usize) -> bool {
        self.used().saturating_add(more as u64) <= self.max
    }

    fn adjust(&self, from: usize, to: usize) {
        if to > from {
            self.used.fetch_add((to - from) as u64, Ordering::Relaxed);
        } else if from > to {
            self.used.fetch_sub((from - to) as u64, Ordering::Relaxed);
        }
    }
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
    /// Storage precision of the weights.
    pub precision: WeightPrecision,
    /// Storage precision of row-wise Adam's first moment.
    pub moment: WeightPrecision,
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
        if let Err(e) = ember_proto::table::check_mba(config.mba_lambda, count_mode) {
            return bad(e.to_string());
        }
        if !config.plain_l2.is_finite() || config.plain_l2 < 0.0 {
            return bad("plain_l2 must be finite and >= 0".into());
        }
        let precision = WeightPrecision::from_proto(config.precision)?;
        let opt = Optimizer::from_config(config.optimizer.as_ref())?;
        let moment = WeightPrecision::from_proto(config.moment_precision).map_err(|_| {
            PsError::invalid(format!(
                "malformed table config: unknown moment_precision {} (expected f32, f16 or bf16)",
                config.moment_precision
            ))
        })?;
        if moment != WeightPrecision::F32 && !matches!(opt, Optimizer::RowwiseAdam { .. }) {
            return bad(format!(
                "moment_precision {} needs optimizer rowwise_adam (it stores row-wise Adam's \
                 per-coordinate first moment; other optimizers keep f32 state)",
                moment.name()
            ));
        }
        Ok(TableSpec {
            dim: config.dim as usize,
            init: Init {
                kind,
                scale: init_cfg.scale,
                seed: config.seed,
            },
            opt,
            count_mode,
            precision,
            moment,
            config,
        })
    }

    /// Table name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The row layout of this table.
    pub fn layout(&self) -> RowLayout {
        RowLayout::new(self.dim, self.opt.state_len(self.dim), self.precision)
            .with_moment(self.moment)
    }

    /// f32 values a row exchanges with checkpoints and tools: the weights
    /// followed by the optimizer state.
    pub fn values_per_row(&self) -> usize {
        self.dim + self.opt.state_len(self.dim)
    }

    /// Whether pushes accumulate per-id counts (every mode but EXACT).
    fn counts_online(&self) -> bool {
        self.count_mode != CountMode::CountExact
    }

    /// The initial weights of `id`, rounded to the storage precision.
    fn initial(&self, id: u64, out: &mut [f32]) {
        self.init.fill(id, out);
        self.precision.round_nearest(out);
    }
}

/// Hints the CPU to fetch the cache line at `p` (no-op off x86-64).
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T) {
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
fn prefetch_span(p: *const u32, len: usize) {
    let b = p as *const u8;
    let mut off = 0;
    while off < len {
        prefetch(b.wrapping_add(off));
        off += 64;
    }
    prefetch(b.wrapping_add(len.saturating_sub(1)));
}

#[derive(Default)]
struct Stripe {
    index: Index,
    chunks: Vec<Vec<u32>>,
    /// Bytes allocated by `chunks`.
    arena_bytes: usize,
    /// Slots handed out so far (live + free).
    slots: u32,
    free: Vec<u32>,
    /// Counts of ids without a row.
    pending: FxHashMap<u64, u32>,
    /// Rows whose count is > 0.
    counted_rows: u64,
    /// Ids whose rows were removed since the last `take_tombstones`
    /// (only while tombstones are tracked).
    tombstones: Vec<u64>,
    /// The tombstone list passed its limit and was dropped.
    tombs_overflowed: bool,
    /// Slots of rows pushed since the last take (may repeat; see the module
    /// docs), while changes are tracked.
    changed: Vec<u32>,
    /// The change list passed its limit and was dropped.
    changed_overflowed: bool,
    /// Rows whose step is at most this were not pushed since the last take.
    change_mark: u64,
    /// Bytes last charged to the budget.
    charged: usize,
    /// Eviction sampler state.
    rng: u64,
}

/// Bytes of one pending-count entry (hash map slot + control byte).
const PENDING_ENTRY_BYTES: usize = std::mem::size_of::<(u64, u32)>() + 1;

impl Stripe {
    /// An empty stripe number `s` of a table: its eviction sampler and its
    /// index's ladder of capacities are seeded by `s`.
    fn new(s: usize) -> Self {
        Stripe {
            rng: s as u64,
            index: Index::with_phase(s as u32),
            ..Stripe::default()
        }
    }

    #[inline]
    fn row(&self, slot: u32, words: usize) -> &[u32] {
        let s = slot as usize;
        let off = (s % CHUNK_ROWS) * words;
        &self.chunks[s / CHUNK_ROWS][off..off + words]
    }

    #[inline]
    fn row_mut(&mut self, slot: u32, words: usize) -> &mut [u32] {
        let s = slot as usize;
        let off = (s % CHUNK_ROWS) * words;
        &mut self.chunks[s / CHUNK_ROWS][off..off + words]
    }

    #[inline]
    fn find(&self, h: u64, id: u64, words: usize) -> Option<u32> {
        let chunks = &self.chunks;
        self.index.find(h, |slot| {
            let s = slot as usize;
            let off = (s % CHUNK_ROWS) * words;
            chunks
                .get(s / CHUNK_ROWS)
                .and_then(|c| c.get(off..off + 2))
                .is_some_and(|k| row_key(k) == id)
        })
    }

    /// Address of row `slot` (for prefetching; never dereferenced).
    #[inline]
    fn row_ptr(&self, slot: u32, words: usize) -> *const u32 {
        let s = slot as usize;
        self.chunks
            .get(s / CHUNK_ROWS)
            .map_or(std::ptr::null(), |c| {
                c.as_ptr().wrapping_add((s % CHUNK_ROWS) * words)
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
    fn prefetch_rows(&self, hashes: &[u64], block: &[u32], words: usize, bytes: usize) {
        for &pos in block {
            if let Some(slot) = self.index.candidate(hashes[pos as usize]) {
                prefetch_span(self.row_ptr(slot, words), bytes);
            }
        }
    }

    /// The software pipeline step before working on block `k` of `list`:
    /// rows of block `k + 1` and buckets of block `k + 2` (blocks 0 and 1
    /// are started when `k == 0`).
    #[inline]
    fn prefetch_ahead(&self, hashes: &[u64], list: &[u32], k: usize, words: usize, bytes: usize) {
        if k == 0 {
            self.prefetch_index(hashes, block(list, 0));
            self.prefetch_index(hashes, block(list, 1));
            self.prefetch_rows(hashes, block(list, 0), words, bytes);
        }
        self.prefetch_rows(hashes, block(list, k + 1), words, bytes);
        self.prefetch_index(hashes, block(list, k + 2));
    }

    /// Bytes the next [`Stripe::alloc`] would allocate (0 when it fits).
    fn alloc_growth(&self, words: usize) -> usize {
        let index = self.index.growth_bytes();
        if !self.free.is_empty() {
            return index;
        }
        let s = self.slots as usize;
        let ci = s / CHUNK_ROWS;
        let arena = match self.chunks.get(ci) {
            None => 16 * words * 4,
            Some(c) if c.len() + words > c.capacity() => {
                ((c.capacity() * 2).min(CHUNK_ROWS * words) - c.capacity()) * 4
            }
            Some(_) => 0,
        };
        index + arena
    }

    /// Inserts or overwrites the row of `id` (hash `h`) with explicit
    /// contents, keeping the counted-row tally and dropping a pending count
    /// of the id (restore path).
    #[inline]
    fn put(
        &mut self,
        layout: &RowLayout,
        h: u64,
        id: u64,
        count: u32,
        step: u64,
        vals: &[f32],
    ) -> Result<()> {
        let words = layout.words;
        let slot = match self.find(h, id, words) {
            Some(sl) => sl,
            None => self.alloc(h, id, words)?,
        };
        let row = self.row_mut(slot, words);
        let old = row_count(row);
        set_count(row, count);
        set_step(row, step);
        layout.write_values(row, vals);
        match (old > 0, count > 0) {
            (false, true) => self.counted_rows += 1,
            (true, false) => self.counted_rows -= 1,
            _ => {}
        }
        if !self.pending.is_empty() {
            self.pending.remove(&id);
        }
        Ok(())
    }

    /// Gives the arena room for `rows` more rows past its slots: the last
    /// chunk's capacity is raised and whole chunks are allocated at their
    /// final size, instead of doubling from 16 rows as single inserts do.
    fn reserve_arena(&mut self, rows: usize, words: usize) {
        let mut need = rows;
        let mut s = self.slots as usize;
        while need > 0 {
            let ci = s / CHUNK_ROWS;
            let in_chunk = (CHUNK_ROWS - s % CHUNK_ROWS).min(need);
            if ci == self.chunks.len() {
                self.chunks.push(Vec::new());
            }
            let chunk = &mut self.chunks[ci];
            let want = (s % CHUNK_ROWS + in_chunk) * words;
            if chunk.capacity() < want {
                let before = chunk.capacity();
                chunk.reserve_exact(want - chunk.len());
                self.arena_bytes += (chunk.capacity() - before) * 4;
            }
            s += in_chunk;
            need -= in_chunk;
        }
    }

    /// Allocates a slot for a new row of key `id` (zeroed apart from the key).
    fn alloc(&mut self, h: u64, id: u64, words: usize) -> Result<u32> {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                let s = self.slots;
                if s >= crate::index::MAX_SLOTS {
                    return Err(PsError::Internal(format!(
                        "stripe slot space exhausted ({} rows per stripe)",
                        crate::index::MAX_SLOTS
                    )));
                }
                let ci = s as usize / CHUNK_ROWS;
                if ci == self.chunks.len() {
                    // Every chunk starts at 16 rows and doubles up to
                    // CHUNK_ROWS, so a stripe wastes at most half a chunk.
                    let cap = 16 * words;
                    self.chunks.push(Vec::with_capacity(cap));
                    self.arena_bytes += cap * 4;
                }
                let chunk = &mut self.chunks[ci];
                if chunk.len() + words > chunk.capacity() {
                    let before = chunk.capacity();
                    let want = (before * 2).min(CHUNK_ROWS * words);
                    chunk.reserve_exact(want - chunk.len());
                    self.arena_bytes += (chunk.capacity() - before) * 4;
                }
                chunk.resize(chunk.len() + words, 0);
                self.slots = s
                    .checked_add(1)
                    .ok_or_else(|| PsError::Internal("stripe slot space exhausted".into()))?;
                s
            }
        };
        self.place(h, id, slot, words);
        Ok(slot)
    }

    /// Keys `slot` (free or just evicted) as the zeroed row of `id` and
    /// indexes it.
    fn place(&mut self, h: u64, id: u64, slot: u32, words: usize) {
        let chunks = &self.chunks;
        let hash_of = |s: u32| {
            let s = s as usize;
            let off = (s % CHUNK_ROWS) * words;
            id_hash(row_key(&chunks[s / CHUNK_ROWS][off..off + 2]))
        };
        self.index.insert(h, slot, &hash_of);
        let row = self.row_mut(slot, words);
        row.fill(0);
        set_key(row, id);
    }

    /// Records the removal of `id` for delta checkpoints, or marks the list
    /// overflowed (and frees it) past `limit` entries.
    fn tombstone(&mut self, id: u64, limit: usize) {
        if self.tombs_overflowed {
            return;
        }
        if self.tombstones.len() >= limit {
            self.tombstones = Vec::new();
            self.tombs_overflowed = true;
        } else {
            self.tombstones.push(id);
        }
    }

    /// Picks a victim among [`EVICT_SAMPLES`] random live rows by the lowest
    /// `log2(1 + n_j) - age / half_life`, unindexes it and returns its slot.
    fn evict_one(
        &mut self,
        words: usize,
        now: u64,
        half_life: u64,
        track: Option<usize>,
    ) -> Option<u32> {
        if self.index.is_empty() {
            return None;
        }
        let mut best: Option<(f64, u32)> = None;
        let mut found = 0;
        for _ in 0..EVICT_SAMPLES * 8 {
            self.rng = splitmix64(self.rng.wrapping_add(GOLDEN_GAMMA));
            let slot = (self.rng % u64::from(self.slots)) as u32;
            let row = self.row(slot, words);
            if row[3] == FREE_STEP {
                continue;
            }
            let age = now.saturating_sub(row_step(row)) as f64;
            let score = (1.0 + f64::from(row_count(row))).log2() - age / half_life.max(1) as f64;
            if best.is_none_or(|(b, _)| score < b) {
                best = Some((score, slot));
            }
            found += 1;
            if found == EVICT_SAMPLES {
                break;
            }
        }
        let (_, slot) = best?;
        let row = self.row(slot, words);
        let (id, c) = (row_key(row), row_count(row));
        if !self.index.remove(id_hash(id), slot) {
            return None;
        }
        if c > 0 {
            self.counted_rows -= 1;
        }
        if let Some(limit) = track {
            self.tombstone(id, limit);
        }
        self.row_mut(slot, words)[3] = FREE_STEP;
        Some(slot)
    }

    fn resident_bytes(&self) -> usize {
        self.arena_bytes
            + self.index.allocation_size()
            + self.pending.capacity() * PENDING_ENTRY_BYTES
            + self.free.capacity() * 4
            + self.tombstones.capacity() * 8
            + self.changed.capacity() * 4
    }

    /// Lists `slot` as changed unless the list overflowed. The list holds at
    /// most half as many entries as the stripe has rows (at least 1024: past
    /// that a full checkpoint costs less than a delta, and bulk loads such as
    /// a prefill cost no list) and, under a limited budget, twice the
    /// tombstone limit `tomb_limit` (an entry is half a tombstone); past
    /// that it is dropped and marked overflowed.
    #[inline]
    fn note_changed(&mut self, slot: u32, tomb_limit: usize) {
        if self.changed_overflowed {
            return;
        }
        let cap = tomb_limit
            .saturating_mul(2)
            .min((self.index.len() / 2).max(1024));
        if self.changed.len() >= cap {
            self.changed = Vec::new();
            self.changed_overflowed = true;
        } else {
            self.changed.push(slot);
        }
    }

    /// Takes the change list (sorted, deduplicated; `None` if it
    /// overflowed) and starts a new window at `mark`.
    ///
    /// The list keeps its allocation for the next window, so taking it
    /// (even for a checkpoint that then fails) does not change the stripe's
    /// bytes.
    fn take_changed(&mut self, mark: u64) -> Option<Vec<u32>> {
        let overflowed = std::mem::take(&mut self.changed_overflowed);
        self.change_mark = mark;
        if overflowed {
            return None;
        }
        let mut list = self.changed.clone();
        self.changed.clear();
        list.sort_unstable();
        list.dedup();
        Some(list)
    }

    /// Charges the change of this stripe's bytes since the last call.
    fn charge(&mut self, budget: &Budget) {
        let now = self.resident_bytes();
        budget.adjust(self.charged, now);
        self.charged = now;
    }
}

/// Outcome of a push to a table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PushOutcome {
    /// Rows updated (created or existing).
    pub updated: u64,
    /// Ids held back by admission (or, under a full budget, ids whose stripe
    /// had no row to evict).
    pub not_admitted: u64,
    /// Rows evicted to stay within the memory budget.
    pub evicted_budget: u64,
}

/// This shard's statistics for one table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableStats {
    /// Rows stored.
    pub rows: u64,
    /// Bytes allocated: arena, index, pending counts, free list, tombstones.
    pub resident_bytes: u64,
    /// Ids with a count (rows with count > 0 plus pending counts).
    pub counted_ids: u64,
    /// Rows evicted by TTL since start.
    pub evicted: u64,
    /// Pushed ids held back by admission since start.
    pub not_admitted: u64,
    /// Rows evicted to stay within the memory budget since start.
    pub evicted_budget: u64,
    /// Bytes of one row in the arena.
    pub row_bytes: u64,
}

/// One sparse table's slice on this shard.
pub struct Table {
    spec: TableSpec,
    layout: RowLayout,
    stripes: Box<[RwLock<Stripe>]>,
    budget: RwLock<Arc<Budget>>,
    half_life: AtomicU64,
    track_tombstones: AtomicBool,
    evicted: AtomicU64,
    evicted_budget: AtomicU64,
    not_admitted: AtomicU64,
    max_step: AtomicU64,
    pushes: AtomicU64,
}

impl Drop for Table {
    fn drop(&mut self) {
        let charged: usize = self.stripes.iter().map(|s| s.read().charged).sum();
        self.budget.read().adjust(charged, 0);
    }
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
    /// An empty table with a budget of its own (unlimited).
    pub fn new(spec: TableSpec) -> Self {
        Self::with_budget(spec, Budget::new(0))
    }

    /// An empty table charging its bytes to `budget`.
    pub fn with_budget(spec: TableSpec, budget: Arc<Budget>) -> Self {
        let layout = spec.layout();
        Table {
            spec,
            layout,
            stripes: (0..NUM_STRIPES)
                .map(|s| RwLock::new(Stripe::new(s)))
                .collect(),
            budget: RwLock::new(budget),
            half_life: AtomicU64::new(DEFAULT_EVICT_HALF_LIFE),
            track_tombstones: AtomicBool::new(false),
            evicted: AtomicU64::new(0),
            evicted_budget: AtomicU64::new(0),
            not_admitted: AtomicU64::new(0),
            max_step: AtomicU64::new(0),
            pushes: AtomicU64::new(0),
        }
    }

    /// Moves this table's charge to `budget` (a restored table joins its
    /// shard's budget).
    pub fn set_budget(&self, budget: Arc<Budget>) {
        let mut g = self.budget.write();
        let charged: usize = self.stripes.iter().map(|s| s.read().charged).sum();
        g.adjust(charged, 0);
        budget.adjust(0, charged);
        *g = budget;
    }

    /// Sets the half-life (steps) of a row's count in the eviction score.
    pub fn set_evict_half_life(&self, steps: u64) {
        self.half_life.store(steps.max(1), Ordering::Relaxed);
    }

    /// Starts or stops tracking changes for delta checkpoints: the ids of
    /// removed rows ([`Table::take_tombstones`]) and the rows pushed
    /// ([`Table::take_changed`]). Starting opens a new window; stopping drops
    /// both lists.
    pub fn set_track_tombstones(&self, on: bool) {
        self.track_tombstones.store(on, Ordering::Relaxed);
        let budget = self.budget.read().clone();
        let mark = self.max_step.load(Ordering::Relaxed);
        for st in self.stripes.iter() {
            let mut g = st.write();
            if !on {
                g.tombstones = Vec::new();
            }
            let _ = g.take_changed(mark);
            g.charge(&budget);
        }
    }

    /// Rows listed as pushed since the last [`Table::take_changed`] or
    /// [`Table::reset_changes`] (an upper bound: a stale push can list a row
    /// twice); `None` when changes are not tracked or a list overflowed, so
    /// the next checkpoint must be a full one.
    pub fn changed_rows(&self) -> Option<u64> {
        if !self.track_tombstones.load(Ordering::Relaxed) {
            return None;
        }
        let mut n = 0u64;
        for st in self.stripes.iter() {
            let g = st.read();
            if g.changed_overflowed {
                return None;
            }
            n += g.changed.len() as u64;
        }
        Some(n)
    }

    /// Forgets the rows pushed so far and starts a new change window (after
    /// a full checkpoint or a restore).
    pub fn reset_changes(&self) {
        let budget = self.budget.read().clone();
        let mark = self.max_step.load(Ordering::Relaxed);
        for st in self.stripes.iter() {
            let mut g = st.write();
            let _ = g.take_changed(mark);
            g.charge(&budget);
        }
    }

    /// Visits every row pushed since the last take or reset, once, like
    /// [`Table::for_each_row`] (one stripe lock at a time, slots in arena
    /// order), and starts a new window. Returns the rows visited, or `None`
    /// when changes are not tracked or a stripe's list overflowed: then the
    /// rows visited so far are incomplete and the caller must write a full
    /// checkpoint (the lists of all stripes are reset either way). Cost:
    /// the rows listed, not the table's size.
    pub fn take_changed(&self, mut f: impl FnMut(u64, u32, u64, &[f32])) -> Option<u64> {
        let tracked = self.track_tombstones.load(Ordering::Relaxed);
        let budget = self.budget.read().clone();
        let words = self.layout.words;
        let mut vals = Vec::with_capacity(self.layout.dim + self.layout.state);
        let mut rows = Some(0u64);
        for st in self.stripes.iter() {
            let mut g = st.write();
            let mark = self.max_step.load(Ordering::Relaxed);
            let list = g.take_changed(mark);
            g.charge(&budget);
            let (Some(list), Some(n)) = (list, rows.as_mut()) else {
                rows = None;
                continue;
            };
            for slot in list {
                let row = g.row(slot, words);
                if row[3] == FREE_STEP {
                    continue;
                }
                self.layout.read_values(row, &mut vals);
                f(row_key(row), row_count(row), row_step(row), &vals);
                *n += 1;
            }
        }
        rows.filter(|_| tracked)
    }

    /// Ids whose rows were removed (TTL or budget eviction) since the
    /// previous call, while tombstones are tracked; `None` when the list
    /// passed its memory limit ([`TOMBSTONE_BUDGET_SHARE`] of a limited
    /// budget) and was dropped, so the caller must write a full checkpoint.
    pub fn take_tombstones(&self) -> Option<Vec<u64>> {
        let budget = self.budget.read().clone();
        let mut out = Vec::new();
        let mut overflowed = false;
        for st in self.stripes.iter() {
            let mut g = st.write();
            out.append(&mut g.tombstones);
            g.tombstones = Vec::new();
            overflowed |= std::mem::take(&mut g.tombs_overflowed);
            g.charge(&budget);
        }
        (!overflowed).then_some(out)
    }

    /// Tombstones a stripe may hold while tracked (`None`: not tracked).
    fn tombstone_limit(&self, budget: &Budget) -> Option<usize> {
        if !self.track_tombstones.load(Ordering::Relaxed) {
            return None;
        }
        Some(if budget.is_limited() {
            let bytes = budget.max_bytes() as f64 * TOMBSTONE_BUDGET_SHARE;
            ((bytes / 8.0) as usize / NUM_STRIPES).max(64)
        } else {
            usize::MAX
        })
    }

    /// Sizes every stripe's index and arena for `rows` rows in the table
    /// (1/[`NUM_STRIPES`] each, plus slack for the spread of the hash), so a bulk load such as a restore never rehashes an index or
    /// copies a growing arena chunk. Memory is allocated (and charged) at
    /// once but only touched as rows arrive.
    pub fn reserve(&self, rows: u64) {
        let per = (rows / NUM_STRIPES as u64 + rows / NUM_STRIPES as u64 / 16 + 16) as usize;
        let words = self.layout.words;
        let budget = self.budget.read().clone();
        for st in self.stripes.iter() {
            let mut g = st.write();
            let stripe = &mut *g;
            let chunks = &stripe.chunks;
            stripe.index.reserve(per, &|s: u32| {
                let s = s as usize;
                let off = (s % CHUNK_ROWS) * words;
                id_hash(row_key(&chunks[s / CHUNK_ROWS][off..off + 2]))
            });
            // The arena gets 1% (+64 rows) of slack, not 6%: a stripe's share
            // of 10^6+ rows varies by far less, and past it rows still fit.
            let per_arena =
                (rows / NUM_STRIPES as u64 + rows / NUM_STRIPES as u64 / 100 + 64) as usize;
            let more = per_arena.saturating_sub(stripe.index.len() + stripe.free.len());
            stripe.reserve_arena(more, words);
            stripe.charge(&budget);
        }
    }

    /// Drops every row and pending count and frees their memory.
    pub fn clear(&self) {
        let budget = self.budget.read().clone();
        for (s, st) in self.stripes.iter().enumerate() {
            let mut g = st.write();
            let charged = g.charged;
            *g = Stripe {
                charged,
                ..Stripe::new(s)
            };
            g.charge(&budget);
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

    /// The row layout.
    pub fn layout(&self) -> RowLayout {
        self.layout
    }

    /// Writes the rows of `ids` (duplicates allowed) into `out`
    /// (`ids.len() * dim` values, row-major). Unseen ids get their initial
    /// value and are not stored.
    pub fn pull(&self, ids: &[u64], out: &mut Vec<f32>) {
        let dim = self.spec.dim;
        let lay = self.layout;
        let words = lay.words;
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
                stripe.prefetch_ahead(&g.hashes, list, k, words, words * 4);
                for &pos in block(list, k) {
                    let pos = pos as usize;
                    let id = ids[pos];
                    let dst = &mut out[pos * dim..(pos + 1) * dim];
                    match stripe.find(g.hashes[pos], id, words) {
                        Some(slot) => lay.read_weights(stripe.row(slot, words), dst),
                        None => self.spec.initial(id, dst),
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
        let lay = self.layout;
        let words = lay.words;
        let online = spec.counts_online();
        let lambda = spec.config.mba_lambda;
        let l2 = spec.config.plain_l2;
        let admit = spec.config.admit_min_count;
        let budget = self.budget.read().clone();
        let limited = budget.is_limited();
        let half_life = self.half_life.load(Ordering::Relaxed);
        let track = self.tombstone_limit(&budget);
        let mut out = PushOutcome::default();
        let mut gbuf = vec![0.0f32; dim];
        let mut wbuf = vec![0.0f32; dim];
        let mut sbuf = vec![0.0f32; lay.state];
        let f32_rows = lay.precision == WeightPrecision::F32 && lay.state_is_f32();
        let now = self.max_step.fetch_max(step, Ordering::Relaxed).max(step);
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
                stripe.prefetch_ahead(&g.hashes, list, k, words, words * 4);
                for &pos in block(list, k) {
                    let pos = pos as usize;
                    let id = ids[pos];
                    let h = g.hashes[pos];
                    let c = counts.get(pos).copied().unwrap_or(1);
                    let slot = match stripe.find(h, id, words) {
                        Some(slot) => {
                            if online {
                                let row = stripe.row_mut(slot, words);
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
                            let growth = if limited {
                                stripe.alloc_growth(words)
                            } else {
                                0
                            };
                            let slot = if growth > 0 && !budget.fits(growth) {
                                // Full: replace a cold row of this stripe.
                                match stripe.evict_one(words, now, half_life, track) {
                                    Some(victim) => {
                                        stripe.place(h, id, victim, words);
                                        out.evicted_budget += 1;
                                        victim
                                    }
                                    None => {
                                        out.not_admitted += 1;
                                        continue;
                                    }
                                }
                            } else {
                                let Ok(slot) = stripe.alloc(h, id, words) else {
                                    // Slot space of a stripe (2^26 rows) exhausted:
                                    // treat as not admitted rather than corrupting.
                                    out.not_admitted += 1;
                                    continue;
                                };
                                if growth > 0 {
                                    stripe.charge(&budget);
                                }
                                slot
                            };
                            if prior > 0 {
                                stripe.pending.remove(&id);
                            }
                            let row = stripe.row_mut(slot, words);
                            set_count(row, n);
                            spec.initial(id, &mut wbuf);
                            lay.write_weights(row, &wbuf, None);
                            spec.opt.init_state(&mut sbuf);
                            lay.write_state(row, &sbuf, None);
                            if n > 0 {
                                stripe.counted_rows += 1;
                            }
                            slot
                        }
                    };
                    let row = stripe.row_mut(slot, words);
                    let grad = &grads[pos * dim..(pos + 1) * dim];
                    let coef = regularize_coef(lambda, row_count(row).max(1), l2);
                    if f32_rows {
                        // In place: regularization fused into the step.
                        let (state, w) = lay.split_f32_mut(row);
                        spec.opt.step_regularized(w, state, grad, coef, &mut gbuf);
                    } else {
                        // Decode, step in f32, round back (a compact moment too).
                        lay.read_weights(row, &mut wbuf);
                        crate::optim::regularized_into(&mut gbuf, grad, &wbuf, coef);
                        let seed = noise_seed(spec.init.seed, id, step);
                        if lay.state_is_f32() {
                            spec.opt.step(&mut wbuf, lay.state_mut(row), &gbuf);
                        } else {
                            lay.read_state(row, &mut sbuf);
                            spec.opt.step(&mut wbuf, &mut sbuf, &gbuf);
                            lay.write_state(row, &sbuf, Some(seed));
                        }
                        lay.write_weights(row, &wbuf, Some(seed));
                    }
                    let before = row_step(row);
                    set_step(row, step);
                    if let Some(limit) = track {
                        if before <= stripe.change_mark {
                            stripe.note_changed(slot, limit);
                        }
                    }
                    out.updated += 1;
                }
            }
            stripe.charge(&budget);
        }
        self.not_admitted
            .fetch_add(out.not_admitted, Ordering::Relaxed);
        self.evicted_budget
            .fetch_add(out.evicted_budget, Ordering::Relaxed);
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
        let words = self.layout.words;
        let budget = self.budget.read().clone();
        if replace {
            for st in self.stripes.iter() {
                let mut guard = st.write();
                let stripe = &mut *guard;
                stripe.pending = FxHashMap::default();
                stripe.counted_rows = 0;
                let chunks = &mut stripe.chunks;
                for slot in stripe.index.iter() {
                    let s = slot as usize;
                    let off = (s % CHUNK_ROWS) * words;
                    set_count(&mut chunks[s / CHUNK_ROWS][off..off + words], 0);
                }
                stripe.charge(&budget);
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
                match stripe.find(g.hashes[pos], id, words) {
                    Some(slot) => {
                        let row = stripe.row_mut(slot, words);
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
            stripe.charge(&budget);
        }
        self.stats().counted_ids
    }

    fn sweep_stripe(&self, s: usize) -> u64 {
        let ttl = self.spec.config.ttl_steps;
        if ttl == 0 {
            return 0;
        }
        let now = self.max_step.load(Ordering::Relaxed).min(MAX_ROW_STEP);
        let words = self.layout.words;
        let budget = self.budget.read().clone();
        let track = self.tombstone_limit(&budget);
        let mut guard = self.stripes[s].write();
        let stripe = &mut *guard;
        let chunks = &mut stripe.chunks;
        let free = &mut stripe.free;
        let pending = &mut stripe.pending;
        let mut removed = Vec::new();
        let mut evicted = 0u64;
        let mut uncounted = 0u64;
        stripe.index.retain(|slot| {
            let sl = slot as usize;
            let off = (sl % CHUNK_ROWS) * words;
            let row = &mut chunks[sl / CHUNK_ROWS][off..off + HEADER_WORDS];
            if now.saturating_sub(row_step(row)) <= ttl {
                return true;
            }
            let c = row_count(row);
            let id = row_key(row);
            if c > 0 {
                // Remember n_j of evicted rows (MBA, admission).
                pending.insert(id, c);
                uncounted += 1;
            }
            if track.is_some() {
                removed.push(id);
            }
            row[3] = FREE_STEP;
            free.push(slot);
            evicted += 1;
            false
        });
        stripe.counted_rows -= uncounted;
        if let Some(limit) = track {
            for id in removed {
                stripe.tombstone(id, limit);
            }
        }
        stripe.charge(&budget);
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
            evicted_budget: self.evicted_budget.load(Ordering::Relaxed),
            not_admitted: self.not_admitted.load(Ordering::Relaxed),
            row_bytes: self.layout.bytes() as u64,
            ..Default::default()
        };
        for stripe in self.stripes.iter() {
            let g = stripe.read();
            st.rows += g.index.len() as u64;
            st.resident_bytes += g.resident_bytes() as u64;
            st.counted_ids += g.counted_rows + g.pending.len() as u64;
        }
        st
    }

    /// Visits every stored row: `(id, count, last_step, values)` with the
    /// values decoded to f32 (weights then optimizer state), one stripe
    /// lock at a time.
    pub fn for_each_row(&self, mut f: impl FnMut(u64, u32, u64, &[f32])) {
        for s in 0..NUM_STRIPES {
            self.stripe_rows(s).for_each(&mut f);
        }
    }

    /// A read-locked view of stripe `s` (`s < NUM_STRIPES`) for streaming its
    /// rows out (checkpoints) without copying the table.
    pub fn stripe_rows(&self, s: usize) -> StripeRows<'_> {
        StripeRows {
            guard: self.stripes[s % NUM_STRIPES].read(),
            layout: self.layout,
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

    /// Inserts or overwrites a row with explicit contents (restore path;
    /// not limited by the budget, but charged to it). `vals` holds the
    /// weights (rounded to nearest at the table's precision) followed by the
    /// optimizer state.
    pub fn put_row(&self, id: u64, count: u32, step: u64, vals: &[f32]) -> Result<()> {
        self.check_values(1, vals)?;
        let h = id_hash(id);
        let budget = self.budget.read().clone();
        let mut g = self.stripes[stripe_of(h)].write();
        let r = g.put(&self.layout, h, id, count, step, vals);
        g.charge(&budget);
        drop(g);
        self.max_step.fetch_max(step, Ordering::Relaxed);
        r
    }

    /// Checks that `vals` holds `rows` rows of weights + optimizer state.
    fn check_values(&self, rows: usize, vals: &[f32]) -> Result<()> {
        let want = self.spec.values_per_row();
        if vals.len() != rows * want {
            return Err(PsError::Internal(format!(
                "{} values for {rows} rows of {want} (table `{}`)",
                vals.len(),
                self.spec.name()
            )));
        }
        Ok(())
    }

    /// Inserts or overwrites many rows at once (the restore path's bulk
    /// form of [`Table::put_row`]): `rows[i] = (id, count, step)` with its
    /// values at `vals[i * w..(i + 1) * w]`, `w` = weights + optimizer state.
    /// Each stripe is locked and charged once per call, and its index is
    /// grown once for the call's rows. A call whose value count does not
    /// match its rows changes nothing.
    pub fn put_rows(&self, rows: &[(u64, u32, u64)], vals: &[f32]) -> Result<()> {
        self.check_values(rows.len(), vals)?;
        let want = self.spec.values_per_row();
        let words = self.layout.words;
        let ids: Vec<u64> = rows.iter().map(|r| r.0).collect();
        let g = group(&ids);
        let budget = self.budget.read().clone();
        let mut max_step = 0;
        for s in 0..NUM_STRIPES {
            let (a, b) = (g.start[s] as usize, g.start[s + 1] as usize);
            if a == b {
                continue;
            }
            let mut guard = self.stripes[s].write();
            let stripe = &mut *guard;
            let need = stripe.index.len() + (b - a);
            let chunks = &stripe.chunks;
            stripe.index.reserve(need, &|sl: u32| {
                let sl = sl as usize;
                let off = (sl % CHUNK_ROWS) * words;
                id_hash(row_key(&chunks[sl / CHUNK_ROWS][off..off + 2]))
            });
            let mut result = Ok(());
            for &pos in &g.order[a..b] {
                let pos = pos as usize;
                let (id, count, step) = rows[pos];
                let v = &vals[pos * want..(pos + 1) * want];
                result = stripe.put(&self.layout, g.hashes[pos], id, count, step, v);
                if result.is_err() {
                    break;
                }
                max_step = max_step.max(step);
            }
            stripe.charge(&budget);
            result?;
        }
        self.max_step.fetch_max(max_step, Ordering::Relaxed);
        Ok(())
    }

    /// Sets a pending count (restore path).
    pub fn put_pending(&self, id: u64, count: u32) {
        let h = id_hash(id);
        let budget = self.budget.read().clone();
        let mut g = self.stripes[stripe_of(h)].write();
        g.pending.insert(id, count);
        g.charge(&budget);
    }

    /// Reads one stored row (`None` when the id has no row): its count,
    /// last step and weights + optimizer state as f32. For tests and tools.
    pub fn get_row(&self, id: u64) -> Option<(u32, u64, Vec<f32>)> {
        let h = id_hash(id);
        let g = self.stripes[stripe_of(h)].read();
        let words = self.layout.words;
        let slot = g.find(h, id, words)?;
        let row = g.row(slot, words);
        let mut vals = Vec::new();
        self.layout.read_values(row, &mut vals);
        Some((row_count(row), row_step(row), vals))
    }

    /// Bytes of payload per row as counted by the benchmarks: weights and
    /// optimizer state at their stored widths, 8 (key) and 4 (count).
    pub fn payload_bytes_per_row(&self) -> usize {
        self.spec.dim * self.spec.precision.bytes() + self.layout.state_words * 4 + 12
    }
}

/// A read-locked stripe of a table (see [`Table::stripe_rows`]).
pub struct StripeRows<'a> {
    guard: parking_lot::RwLockReadGuard<'a, Stripe>,
    layout: RowLayout,
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

    /// Calls `f(id, count, last_step, values)` for every row, the values
    /// decoded to f32 (weights then optimizer state), in arena order: a
    /// sequential scan of memory, and an order unrelated to the id hash.
    /// (Visiting in index order would hand a loader the keys sorted by their
    /// home bucket, which makes a growing linear-probing table build
    /// clusters that cost O(n) per insert.)
    pub fn for_each(&self, mut f: impl FnMut(u64, u32, u64, &[f32])) {
        let words = self.layout.words;
        let mut vals = Vec::with_capacity(self.layout.dim + self.layout.state);
        for chunk in &self.guard.chunks {
            for row in chunk.chunks_exact(words) {
                if row[3] == FREE_STEP {
                    continue;
                }
                self.layout.read_values(row, &mut vals);
                f(row_key(row), row_count(row), row_step(row), &vals);
            }
        }
    }
}

/// The coefficient of `w` that [`regularize`] adds to a gradient:
/// `λ/n_j + l2` (`l2` alone when `λ <= 0`).
#[inline]
pub fn regularize_coef(lambda: f32, nj: u32, l2: f32) -> f32 {
    let mba = if lambda > 0.0 {
        lambda / nj.max(1) as f32
    } else {
        0.0
    };
    mba + l2
}

/// Adds MBA (`λ/n_j · w`) and plain L2 (`l2 · w`) to a gradient, in place.
#[inline]
pub fn regularize(g: &mut [f32], w: &[f32], lambda: f32, nj: u32, l2: f32) {
    let coef = regularize_coef(lambda, nj, l2);
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
        assert_eq!(st.row_bytes, 4 * (4 + 3));
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

    /// Pushes to f32 rows (the fused regularized step) store exactly what
    /// regularizing the gradient with the row's new count and stepping it
    /// gives, bit for bit: weights, state and counts, for Adagrad and SGD
    /// with MBA and plain L2, over repeated pushes with counts.
    #[test]
    fn f32_push_equals_regularize_then_step_bit_for_bit() {
        for (kind, l2) in [
            (
                Kind::Adagrad(Adagrad {
                    lr: 0.05,
                    initial_accumulator: 0.1,
                    eps: 1e-8,
                }),
                0.0,
            ),
            (
                Kind::Adagrad(Adagrad {
                    lr: 0.2,
                    initial_accumulator: 0.0,
                    eps: 1e-6,
                }),
                0.03,
            ),
            (Kind::Sgd(Sgd { lr: 0.5 }), 0.01),
        ] {
            for dim in [5u32, 32, 37] {
                let mut c = cfg("t", dim);
                c.mba_lambda = 0.01;
                c.plain_l2 = l2;
                c.count_mode = CountMode::CountOnline as i32;
                c.optimizer = Some(OptimizerConfig { kind: Some(kind) });
                let t = table(c);
                let opt = t.spec().opt;
                let d = dim as usize;
                let mut x = 5u64;
                for step in 1..=20u64 {
                    let ids: Vec<u64> = (0..300u64).filter(|i| (i + step) % 3 != 0).collect();
                    let counts: Vec<u32> = ids.iter().map(|&i| 1 + (i % 4) as u32).collect();
                    let grads: Vec<f32> = (0..ids.len() * d)
                        .map(|_| {
                            x = splitmix64(x);
                            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
                        })
                        .collect();
                    let before: Vec<_> = ids.iter().map(|&id| t.get_row(id)).collect();
                    t.push(&ids, &grads, &counts, step);
                    for (k, &id) in ids.iter().enumerate() {
                        let (n0, vals) = match &before[k] {
                            Some((n, _, v)) => (*n, v.clone()),
                            None => {
                                let mut v = vec![0.0; d + opt.state_len(d)];
                                t.spec().initial(id, &mut v[..d]);
                                opt.init_state(&mut v[d..]);
                                (0, v)
                            }
                        };
                        let n = n0 + counts[k];
                        let (mut w, mut st) = (vals[..d].to_vec(), vals[d..].to_vec());
                        let mut g = grads[k * d..(k + 1) * d].to_vec();
                        regularize(&mut g, &w, 0.01, n, l2);
                        opt.step(&mut w, &mut st, &g);
                        let (got_n, got_step, got) = t.get_row(id).unwrap();
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!((got_n, got_step), (n, step));
                        assert_eq!(bits(&got[..d]), bits(&w), "{opt:?} dim {dim} id {id}");
                        assert_eq!(bits(&got[d..]), bits(&st), "{opt:?} dim {dim} id {id}");
                    }
                }
            }
        }
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
                not_admitted: 1,
                evicted_budget: 0,
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

    fn f16_adagrad(name: &str, dim: u32) -> TableConfig {
        let mut c = cfg(name, dim);
        c.precision = ember_proto::v1::Precision::F16 as i32;
        c.optimizer = Some(OptimizerConfig {
            kind: Some(Kind::RowwiseAdagrad(Adagrad {
                lr: 0.05,
                initial_accumulator: 0.0,
                eps: 1e-8,
            })),
        });
        c
    }

    #[test]
    fn f16_rows_are_compact_and_pull_equals_the_stored_initial_value() {
        let t = table(f16_adagrad("t", 18));
        assert_eq!(t.stats().row_bytes, 56);
        assert_eq!(t.payload_bytes_per_row(), 36 + 4 + 12);
        let ids: Vec<u64> = (1..=1000).collect();
        let mut before = Vec::new();
        t.pull(&ids, &mut before);
        // Every pulled value is an f16 value.
        assert!(before.iter().all(|&v| half::f16::from_f32(v).to_f32() == v));
        // A zero-gradient push stores the rows without moving them.
        t.push(&ids, &vec![0.0; ids.len() * 18], &[], 1);
        let mut after = Vec::new();
        t.pull(&ids, &mut after);
        assert_eq!(before, after);
        assert_eq!(t.stats().rows, 1000);
    }

    /// Many updates far below half an f16 ulp: stochastic rounding moves the
    /// f16 row like the f32 row on average; nearest rounding would not move it.
    #[test]
    fn f16_small_updates_track_f32_in_expectation() {
        let mk = |p: ember_proto::v1::Precision| {
            let mut c = cfg("t", 16);
            c.precision = p as i32;
            c.init = None;
            c.optimizer = Some(OptimizerConfig {
                kind: Some(Kind::Sgd(Sgd { lr: 1.0 })),
            });
            table(c)
        };
        let (t32, t16) = (
            mk(ember_proto::v1::Precision::F32),
            mk(ember_proto::v1::Precision::F16),
        );
        let ids: Vec<u64> = (0..64).collect();
        let start = vec![0.01f32; 16];
        for &id in &ids {
            t32.put_row(id, 0, 0, &start).unwrap();
            t16.put_row(id, 0, 0, &start).unwrap();
        }
        // 200 steps of -1e-6 each: 2e-4 in total, every step ~0.2 ulp of f16.
        let g = vec![1e-6f32; ids.len() * 16];
        for step in 1..=200 {
            t32.push(&ids, &g, &[], step);
            t16.push(&ids, &g, &[], step);
        }
        let (mut a, mut b) = (Vec::new(), Vec::new());
        t32.pull(&ids, &mut a);
        t16.pull(&ids, &mut b);
        let mean = |v: &[f32]| v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        let (ma, mb) = (mean(&a), mean(&b));
        assert!((ma - (0.01 - 2e-4)).abs() < 1e-7, "{ma}");
        assert!((ma - mb).abs() < 2e-6, "f32 {ma} f16 {mb}");
    }

    #[test]
    fn rows_round_trip_through_put_row_at_every_precision() {
        use ember_proto::v1::Precision as P;
        for (p, moment) in [
            (P::F32, None),
            (P::F16, None),
            (P::Bf16, None),
            (P::F16, Some(P::F16)),
            (P::F32, Some(P::Bf16)),
        ] {
            let mut c = match moment {
                None => f16_adagrad("t", 5),
                Some(m) => f16_rowwise_adam("t", 5, m),
            };
            c.precision = p as i32;
            let t = table(c.clone());
            let ids: Vec<u64> = (0..300).collect();
            t.push(&ids, &vec![0.3; ids.len() * 5], &[], 7);
            let copy = table(c);
            t.for_each_row(|id, n, s, v| copy.put_row(id, n, s, v).unwrap());
            for &id in &ids {
                assert_eq!(t.get_row(id), copy.get_row(id), "{p:?} {moment:?} {id}");
            }
        }
    }

    /// The change list visits exactly the rows pushed in the window, once
    /// each, whatever their steps (stale pushes included), skips rows
    /// removed since, and starts a new window on each take.
    #[test]
    fn change_list_visits_each_pushed_row_once_per_window() {
        let t = table(f16_adagrad("t", 4));
        let taken = |t: &Table| {
            let mut v = Vec::new();
            let n = t.take_changed(|id, _, step, _| v.push((id, step)));
            v.sort_unstable();
            (n, v)
        };
        // Not tracked: nothing to take, and a full checkpoint is needed.
        t.push(&[1, 2], &[0.1; 8], &[], 1);
        assert_eq!(t.changed_rows(), None);
        assert_eq!(taken(&t).0, None);
        t.set_track_tombstones(true);
        assert_eq!(t.changed_rows(), Some(0));
        let ids: Vec<u64> = (0..500).collect();
        t.push(&ids, &vec![0.1; 2000], &[], 5);
        t.push(&ids[..100], &vec![0.1; 400], &[], 6);
        assert_eq!(t.changed_rows(), Some(500));
        let (n, v) = taken(&t);
        assert_eq!(n, Some(500));
        let want: Vec<(u64, u64)> = (0..100)
            .map(|i| (i, 6))
            .chain((100..500).map(|i| (i, 5)))
            .collect();
        assert_eq!(v, want);
        assert_eq!(taken(&t), (Some(0), vec![]));
        // Next window: two rows, one of them by a stale push (step below
        // the mark), then pushed again: still visited once.
        t.push(&[7], &[0.1; 4], &[], 3);
        t.push(&[7, 9000], &[0.1; 8], &[], 7);
        let got = t.get_row(7).map(|r| r.1);
        assert_eq!(got, Some(7));
        assert_eq!(taken(&t), (Some(2), vec![(7, 7), (9000, 7)]));
        // The values visited are the stored ones.
        t.push(&[11], &[0.3; 4], &[], 8);
        let mut seen = Vec::new();
        t.take_changed(|id, c, step, vals| seen.push((id, c, step, vals.to_vec())));
        let (c, step, vals) = t.get_row(11).unwrap();
        assert_eq!(seen, vec![(11, c, step, vals)]);
        // A reset (after a full checkpoint or a restore) empties the window.
        t.push(&[12], &[0.3; 4], &[], 9);
        t.reset_changes();
        assert_eq!(taken(&t), (Some(0), vec![]));
    }

    /// A window that touches more than half of the rows (and more than
    /// 1024 per stripe) drops its list: the table says a full checkpoint is
    /// needed, and the next window is exact again.
    #[test]
    fn change_list_overflow_asks_for_a_full_checkpoint() {
        let t = table(f16_adagrad("t", 2));
        t.set_track_tombstones(true);
        // 200k new rows (~3100 per stripe): a bulk load overflows at once.
        let ids: Vec<u64> = (0..200_000).collect();
        t.push(&ids, &vec![0.1; ids.len() * 2], &[], 1);
        assert_eq!(t.changed_rows(), None);
        assert_eq!(t.take_changed(|_, _, _, _| {}), None);
        // A small window is listed exactly.
        t.push(&ids[..10], &[0.1; 20], &[], 2);
        assert_eq!(t.changed_rows(), Some(10));
        assert_eq!(t.take_changed(|_, _, _, _| {}), Some(10));
        // 40% of the rows: within the cap.
        t.push(&ids[..80_000], &vec![0.1; 160_000], &[], 3);
        assert_eq!(t.changed_rows(), Some(80_000));
        assert_eq!(t.take_changed(|_, _, _, _| {}), Some(80_000));
        // Stale pushes (steps at or below the mark) list a row again each
        // time: two stale passes over 40% of the rows pass the cap.
        for _ in 0..2 {
            t.push(&ids[..80_000], &vec![0.1; 160_000], &[], 1);
        }
        assert_eq!(t.changed_rows(), None);
        assert_eq!(t.take_changed(|_, _, _, _| {}), None);
        t.push(&ids[..10], &[0.1; 20], &[], 4);
        assert_eq!(t.changed_rows(), Some(10));
    }

    /// A Zipf stream far larger than the budget: the table stops growing at
    /// the budget, counts its evictions, keeps the hot rows and keeps serving.
    #[test]
    fn budget_caps_memory_and_keeps_hot_rows() {
        let mut c = f16_adagrad("t", 18);
        c.count_mode = CountMode::CountOnline as i32;
        let budget = Budget::new(2 << 20);
        let t = Table::with_budget(TableSpec::from_config(c).unwrap(), budget.clone());
        t.set_track_tombstones(true);
        let mut x = 7u64;
        let mut hot_seen = 0u64;
        for step in 1..=400u64 {
            // 1024 unique ids per step: 64 hot ids (every step), the rest a
            // long tail drawn from 10^9 ids.
            let mut ids: Vec<u64> = (1..=64).collect();
            while ids.len() < 1024 {
                x = splitmix64(x);
                ids.push(1_000 + x % 1_000_000_000);
            }
            ids.sort_unstable();
            ids.dedup();
            let o = t.push(&ids, &vec![0.01; ids.len() * 18], &[], step);
            assert_eq!(o.updated + o.not_admitted, ids.len() as u64);
            hot_seen += 64;
            assert!(
                budget.used() as f64 <= budget.max_bytes() as f64 * (1.0 + TOMBSTONE_BUDGET_SHARE),
                "step {step}: {} > {}",
                budget.used(),
                budget.max_bytes()
            );
        }
        let st = t.stats();
        assert_eq!(budget.used(), st.resident_bytes);
        assert!(st.evicted_budget > 100_000, "{st:?}");
        assert!(st.rows > 20_000, "{st:?}");
        // Hot rows survive with their whole count.
        for id in 1..=64 {
            let (n, step, _) = t.get_row(id).expect("hot row evicted");
            assert_eq!((u64::from(n), step), (hot_seen / 64, 400));
        }
        // Far more evictions than the tombstone share holds: the list
        // overflowed (the next checkpoint must be full), then starts again.
        assert_eq!(t.take_tombstones(), None);
        assert_eq!(t.take_tombstones(), Some(vec![]));
        t.push(
            &(1..=64).collect::<Vec<u64>>(),
            &vec![0.0; 64 * 18],
            &[],
            401,
        );
        let before = st.evicted_budget;
        let fresh: Vec<u64> = (5_000_000_000..5_000_000_100).collect();
        let o = t.push(&fresh, &vec![0.0; 100 * 18], &[], 402);
        let tombs = t.take_tombstones().expect("100 tombstones fit");
        assert_eq!(tombs.len() as u64, o.evicted_budget);
        assert!(o.evicted_budget > 0 && t.stats().evicted_budget == before + o.evicted_budget);
        assert!(tombs.iter().all(|&id| id > 64 && t.get_row(id).is_none()));
        // Pulls still answer (unseen ids get their initial value).
        let mut out = Vec::new();
        t.pull(&[5, 123_456_789], &mut out);
        assert_eq!(out.len(), 36);
    }

    #[test]
    fn dropping_or_clearing_a_table_returns_its_bytes() {
        let budget = Budget::new(0);
        let t = Table::with_budget(
            TableSpec::from_config(f16_adagrad("t", 8)).unwrap(),
            budget.clone(),
        );
        let ids: Vec<u64> = (0..5000).collect();
        t.push(&ids, &vec![0.1; ids.len() * 8], &[], 1);
        assert_eq!(budget.used(), t.stats().resident_bytes);
        t.clear();
        assert_eq!(t.stats().rows, 0);
        assert_eq!(budget.used(), t.stats().resident_bytes);
        t.push(&ids, &vec![0.1; ids.len() * 8], &[], 2);
        let other = Budget::new(0);
        t.set_budget(other.clone());
        assert_eq!((budget.used(), other.used()), (0, t.stats().resident_bytes));
        drop(t);
        assert_eq!(other.used(), 0);
    }

    #[test]
    fn rejects_unknown_precision_and_rowwise_state_is_one_value() {
        let mut c = f16_adagrad("t", 4);
        c.precision = 9;
        let e = TableSpec::from_config(c).unwrap_err();
        assert!(e.to_string().contains("precision"), "{e}");
        let spec = TableSpec::from_config(f16_adagrad("t", 4)).unwrap();
        assert_eq!(spec.values_per_row(), 5);
        // A compact moment: unknown values and optimizers without a
        // per-coordinate moment are refused, naming the field.
        let mut c = f16_adagrad("t", 4);
        c.moment_precision = 7;
        let e = TableSpec::from_config(c).unwrap_err().to_string();
        assert!(e.contains("moment_precision 7"), "{e}");
        let mut c = f16_adagrad("t", 4);
        c.moment_precision = ember_proto::v1::Precision::F16 as i32;
        let e = TableSpec::from_config(c).unwrap_err().to_string();
        assert!(
            e.contains("moment_precision f16 needs optimizer rowwise_adam"),
            "{e}"
        );
    }

    fn f16_rowwise_adam(name: &str, dim: u32, moment: ember_proto::v1::Precision) -> TableConfig {
        let mut c = cfg(name, dim);
        c.precision = ember_proto::v1::Precision::F16 as i32;
        c.moment_precision = moment as i32;
        c.optimizer = Some(OptimizerConfig {
            kind: Some(Kind::RowwiseAdam(ember_proto::v1::Adam {
                lr: 0.01,
                ..Default::default()
            })),
        });
        c
    }

    /// Row-wise Adam with an f16 first moment: 100-byte rows at dim 18, and
    /// after 300 pushes of noisy gradients the weights and the decoded
    /// moment track the f32-moment table within f16 rounding noise, while
    /// the weights moved far more than that.
    #[test]
    fn an_f16_moment_tracks_the_f32_moment() {
        use ember_proto::rng::SplitMix64;
        use ember_proto::v1::Precision as P;
        let (t32, t16) = (
            table(f16_rowwise_adam("t", 18, P::F32)),
            table(f16_rowwise_adam("t", 18, P::F16)),
        );
        assert_eq!((t32.layout().bytes(), t16.layout().bytes()), (136, 100));
        let ids: Vec<u64> = (0..256).collect();
        let mut rng = SplitMix64::new(5);
        for step in 1..=300 {
            let g: Vec<f32> = (0..ids.len() * 18)
                .map(|i| {
                    let bias = if i % 2 == 0 { 0.02 } else { -0.01 };
                    bias + ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.05
                })
                .collect();
            t32.push(&ids, &g, &[], step);
            t16.push(&ids, &g, &[], step);
        }
        let (mut a, mut b) = (Vec::new(), Vec::new());
        t32.pull(&ids, &mut a);
        t16.pull(&ids, &mut b);
        let (mut moved, mut diff) = (0f64, 0f64);
        let mut init = Vec::new();
        table(f16_rowwise_adam("t", 18, P::F32)).pull(&ids, &mut init);
        for ((x, y), w0) in a.iter().zip(&b).zip(&init) {
            moved += f64::from((x - w0).abs());
            diff += f64::from((x - y).abs());
        }
        assert!(moved / a.len() as f64 > 0.5, "weights moved {moved}");
        assert!(diff / moved < 0.01, "f16 moment drifts: {diff} of {moved}");
        // The decoded moment is close too (m ~ 0.02 / -0.01, f16 ulp ~1e-5).
        let (_, _, v32) = t32.get_row(3).unwrap();
        let (_, _, v16) = t16.get_row(3).unwrap();
        assert_eq!((v32.len(), v16.len()), (18 + 21, 18 + 21));
        for (x, y) in v32[18..36].iter().zip(&v16[18..36]) {
            assert!((x - y).abs() < 2e-3, "m {x} vs {y}");
        }
        // Scalars (v, beta powers) are kept in f32.
        assert!((v32[37] - v16[37]).abs() < 1e-7 && (v32[38] - v16[38]).abs() < 1e-7);
    }
}
