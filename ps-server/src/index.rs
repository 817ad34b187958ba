//! The per-stripe hash index: id hash -> arena slot, 4 bytes per bucket.
//!
//! Open addressing with linear probing over one `u32` array. A bucket holds
//! a 6-bit tag in its top bits (0 empty, 1 tombstone, 2..=63 from the top
//! bits of the id hash) and the arena slot in its low 26 bits, so a probe
//! reads one cache line, not a tag array and a slot array. The key itself
//! is only stored in the arena row, so a lookup compares tags first (a false
//! match costs one arena read with probability ~1/62 per probed bucket) and
//! the key in the row last. A stripe holds at most [`MAX_SLOTS`] rows
//! (2^26; 64 stripes make 4.3 x 10^9 rows per table and shard).
//!
//! The home bucket is `(h_lo32 * n) >> 32` (multiply-shift range reduction),
//! so the capacity need not be a power of two. An index grows by 1.25x when
//! live entries pass 7/8, along a ladder of capacities
//! `16 * 1.25^(level + phase / 64)`: a table gives each of its 64 stripes its
//! own phase, so the stripes grow at 64 different sizes and their loads stay
//! spread over the whole 0.70..0.875 cycle. The index then costs ~5.1 bytes
//! per row at any table size, instead of 4.6 to 6.9 bytes in a saw-tooth
//! when every stripe grows at once. Removals leave tombstones; a rebuild at
//! the same size clears them.

/// Bucket value of an empty bucket.
const EMPTY: u32 = 0;
/// Tag of a removed entry.
const TOMB: u32 = 1;
/// Bits of the slot in a bucket.
const SLOT_BITS: u32 = 26;
/// Mask of the slot bits.
const SLOT_MASK: u32 = (1 << SLOT_BITS) - 1;
/// Slots a stripe's index can address (`0..MAX_SLOTS`).
pub const MAX_SLOTS: u32 = 1 << SLOT_BITS;
/// Smallest non-empty capacity.
pub const MIN_CAPACITY: usize = 16;

/// Bytes per bucket (tag and slot in one `u32`).
pub const BUCKET_BYTES: usize = 4;

/// The tag of hash `h`, `2..=63`.
#[inline]
fn tag_of(h: u64) -> u32 {
    let t = (h >> 58) as u32;
    if t < 2 {
        t + 2
    } else {
        t
    }
}

#[inline]
fn tag(b: u32) -> u32 {
    b >> SLOT_BITS
}

#[inline]
fn slot(b: u32) -> u32 {
    b & SLOT_MASK
}

#[inline]
fn bucket(tag: u32, slot: u32) -> u32 {
    debug_assert!(slot < MAX_SLOTS);
    (tag << SLOT_BITS) | slot
}

#[inline]
fn home(h: u64, n: usize) -> usize {
    (((h & 0xFFFF_FFFF) * n as u64) >> 32) as usize
}

/// Whether `len` entries over `cap` buckets are past the 7/8 limit.
#[inline]
fn over(len: usize, cap: usize) -> bool {
    len * 8 > cap * 7
}

/// Capacity ratio between two levels.
const GROWTH: f64 = 1.25;
/// Phases of the capacity ladder (one per stripe of a table).
pub const PHASES: u32 = 64;

/// Capacity of `level` on the ladder of `phase`: 0 for level 0, else
/// `MIN_CAPACITY * 1.25^(level - 1 + phase / PHASES)`, rounded (strictly
/// increasing in `level`).
pub fn capacity_at(level: u32, phase: u32) -> usize {
    if level == 0 {
        return 0;
    }
    let e = f64::from(level - 1) + f64::from(phase % PHASES) / f64::from(PHASES);
    (MIN_CAPACITY as f64 * GROWTH.powf(e)).round() as usize
}

/// The smallest level of `phase` whose capacity holds `n` entries.
fn level_for(n: usize, phase: u32) -> u32 {
    let mut level = u32::from(n > 0);
    while over(n, capacity_at(level, phase)) {
        level += 1;
    }
    level
}

/// The capacity an index of `phase` reaches after `n` inserts into an empty
/// one (for sizing: the same growth rule as [`Index::insert`]).
pub fn capacity_for(n: usize, phase: u32) -> usize {
    capacity_at(level_for(n, phase), phase)
}

/// A tagged linear-probing index of arena slots.
#[derive(Default)]
pub struct Index {
    buckets: Vec<u32>,
    len: usize,
    tombs: usize,
    /// Level of the current capacity on this index's ladder.
    level: u32,
    /// Which ladder of capacities this index climbs (`0..PHASES`).
    phase: u32,
}

impl Index {
    /// An empty index that grows along the ladder of `phase`
    /// (`phase % PHASES`).
    pub fn with_phase(phase: u32) -> Self {
        Index {
            phase: phase % PHASES,
            ..Index::default()
        }
    }

    /// Live entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the index holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Buckets.
    pub fn capacity(&self) -> usize {
        self.buckets.len()
    }

    /// Bytes allocated.
    pub fn allocation_size(&self) -> usize {
        self.buckets.capacity() * BUCKET_BYTES
    }

    /// Hints the CPU to fetch the home bucket of `h`.
    #[inline]
    pub fn prefetch(&self, h: u64) {
        let n = self.buckets.len();
        if n > 0 {
            crate::store::prefetch(self.buckets.as_ptr().wrapping_add(home(h, n)));
        }
    }

    /// The slot of hash `h` for which `eq(slot)` holds.
    #[inline]
    pub fn find(&self, h: u64, mut eq: impl FnMut(u32) -> bool) -> Option<u32> {
        let n = self.buckets.len();
        if n == 0 {
            return None;
        }
        let want = tag_of(h);
        let mut i = home(h, n);
        loop {
            let b = self.buckets[i];
            if b == EMPTY {
                return None;
            }
            if tag(b) == want && eq(slot(b)) {
                return Some(slot(b));
            }
            i += 1;
            if i == n {
                i = 0;
            }
        }
    }

    /// First slot whose tag matches `h` (a likely hit, for prefetching).
    #[inline]
    pub fn candidate(&self, h: u64) -> Option<u32> {
        self.find(h, |_| true)
    }

    /// Extra bytes the next insert would allocate (0 when it fits).
    pub fn growth_bytes(&self) -> usize {
        if !over(self.len + self.tombs + 1, self.buckets.len()) {
            0
        } else {
            let cap = self.buckets.len();
            let next = if over(self.len + 1, cap) || cap == 0 {
                capacity_at(self.level + 1, self.phase)
            } else {
                cap
            };
            (next - cap) * BUCKET_BYTES
        }
    }

    /// Rebuilds into the capacity of `level`; `hash_of(slot)` recomputes an
    /// entry's hash.
    fn rebuild(&mut self, level: u32, hash_of: &impl Fn(u32) -> u64) {
        let cap = capacity_at(level, self.phase);
        self.level = level;
        let mut buckets = vec![EMPTY; cap];
        for &b in &self.buckets {
            if tag(b) > TOMB {
                let mut j = home(hash_of(slot(b)), cap);
                while buckets[j] != EMPTY {
                    j += 1;
                    if j == cap {
                        j = 0;
                    }
                }
                buckets[j] = b;
            }
        }
        self.buckets = buckets;
        self.tombs = 0;
    }

    /// Inserts `slot` (`< MAX_SLOTS`) under hash `h` (the key must not be
    /// present). The index grows only when the live entries would pass 7/8;
    /// when tombstones fill it, it is rebuilt at its size (so replacing a
    /// removed entry, as budget eviction does, never grows it).
    pub fn insert(&mut self, h: u64, slot: u32, hash_of: &impl Fn(u32) -> u64) {
        let cap = self.buckets.len();
        if cap == 0 || over(self.len + self.tombs + 1, cap) {
            let next = if cap == 0 || over(self.len + 1, cap) {
                self.level + 1
            } else {
                self.level
            };
            self.rebuild(next, hash_of);
        }
        let n = self.buckets.len();
        let mut i = home(h, n);
        loop {
            let t = tag(self.buckets[i]);
            if t <= TOMB {
                if t == TOMB {
                    self.tombs -= 1;
                }
                self.buckets[i] = bucket(tag_of(h), slot);
                self.len += 1;
                return;
            }
            i += 1;
            if i == n {
                i = 0;
            }
        }
    }

    /// Grows to hold `n` entries without a rebuild (never shrinks).
    pub fn reserve(&mut self, n: usize, hash_of: &impl Fn(u32) -> u64) {
        let level = level_for(n, self.phase);
        if level > self.level {
            self.rebuild(level, hash_of);
        }
    }

    /// Removes the entry of `slot` under hash `h`; false when absent.
    pub fn remove(&mut self, h: u64, slot: u32) -> bool {
        let n = self.buckets.len();
        if n == 0 {
            return false;
        }
        let want = bucket(tag_of(h), slot);
        let mut i = home(h, n);
        loop {
            let b = self.buckets[i];
            if b == EMPTY {
                return false;
            }
            if b == want {
                self.buckets[i] = bucket(TOMB, 0);
                self.tombs += 1;
                self.len -= 1;
                return true;
            }
            i += 1;
            if i == n {
                i = 0;
            }
        }
    }

    /// Every live slot, in bucket order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.buckets
            .iter()
            .filter(|&&b| tag(b) > TOMB)
            .map(|&b| slot(b))
    }

    /// Keeps the slots for which `keep` holds (the others become tombstones).
    pub fn retain(&mut self, mut keep: impl FnMut(u32) -> bool) {
        for b in self.buckets.iter_mut() {
            if tag(*b) > TOMB && !keep(slot(*b)) {
                *b = bucket(TOMB, 0);
                self.tombs += 1;
                self.len -= 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_proto::rng::splitmix64;
    use std::collections::HashMap;

    /// Random inserts and removes against a HashMap model, through growth,
    /// tombstone rebuilds and colliding tags.
    #[test]
    fn matches_a_map_model() {
        let hash_of_key = |k: u64| splitmix64(k ^ 77);
        let mut keys: Vec<u64> = Vec::new(); // slot -> key
        let mut idx = Index::default();
        let mut model: HashMap<u64, u32> = HashMap::new();
        let mut x = 1u64;
        for step in 0..60_000u64 {
            x = splitmix64(x);
            let k = x % 5_000;
            let h = hash_of_key(k);
            let found = idx.find(h, |s| keys[s as usize] == k);
            assert_eq!(found, model.get(&k).copied(), "step {step} key {k}");
            match found {
                Some(s) if x.is_multiple_of(3) => {
                    assert!(idx.remove(h, s));
                    model.remove(&k);
                }
                Some(_) => {}
                None => {
                    let s = keys.len() as u32;
                    keys.push(k);
                    let table = keys.clone();
                    idx.insert(h, s, &|s| hash_of_key(table[s as usize]));
                    model.insert(k, s);
                }
            }
            assert_eq!(idx.len(), model.len());
            assert!(idx.len() * 8 <= idx.capacity() * 7 || idx.capacity() == MIN_CAPACITY);
        }
        let mut live: Vec<u32> = idx.iter().collect();
        live.sort_unstable();
        let mut want: Vec<u32> = model.values().copied().collect();
        want.sort_unstable();
        assert_eq!(live, want);
    }

    /// Keys arriving sorted by their home bucket (what visiting another
    /// index in bucket order gives) into a reserved index place in one pass.
    #[test]
    fn hash_sorted_inserts_into_a_reserved_index_stay_linear() {
        let n = 200_000usize;
        let mut hashes: Vec<u64> = (0..n as u64).map(splitmix64).collect();
        hashes.sort_unstable_by_key(|h| h & 0xFFFF_FFFF);
        let table = hashes.clone();
        let mut idx = Index::default();
        idx.reserve(n, &|s| table[s as usize]);
        let cap = idx.capacity();
        // (Without the reserve, a growing index clusters these into runs
        // that cost O(n) per insert: minutes instead of milliseconds.)
        for (s, &h) in hashes.iter().enumerate() {
            idx.insert(h, s as u32, &|s| table[s as usize]);
        }
        assert_eq!(idx.capacity(), cap, "no rebuild");
        for (s, &h) in hashes.iter().enumerate().step_by(97) {
            assert_eq!(idx.find(h, |x| x == s as u32), Some(s as u32));
        }
    }

    /// Slots use all 26 bits and tags never read as empty or tombstone:
    /// the largest slot under every tag round-trips, and a slot that
    /// differs only in its top bits is a different entry.
    #[test]
    fn buckets_keep_the_whole_slot_and_a_live_tag() {
        for t in 0..64u64 {
            let h = (t << 58) | 0x1234_5678;
            assert!(tag_of(h) >= 2 && tag_of(h) < 64);
            let mut idx = Index::default();
            let top = MAX_SLOTS - 1;
            idx.insert(h, top, &|_| h);
            assert_eq!(idx.find(h, |s| s == top), Some(top));
            assert_eq!(idx.find(h, |s| s == top & 0xFFFF), None);
            assert!(!idx.remove(h, top & 0xFFFF));
            assert!(idx.remove(h, top));
            assert_eq!(idx.find(h, |_| true), None);
        }
        assert_eq!(BUCKET_BYTES, std::mem::size_of::<u32>());
    }

    #[test]
    fn capacity_follows_the_growth_rule() {
        for phase in [0, 1, 37, 63] {
            let mut idx = Index::with_phase(phase);
            for n in 1..=10_000usize {
                idx.insert(n as u64 * 0x9E37_79B9, n as u32, &|s| {
                    u64::from(s) * 0x9E37_79B9
                });
                assert_eq!(idx.capacity(), capacity_for(n, phase), "n = {n}");
            }
            assert_eq!(capacity_for(0, phase), 0);
        }
        // The ladder rises at every level, by 1.25x.
        for phase in 0..PHASES {
            for level in 1..40 {
                let (a, b) = (capacity_at(level, phase), capacity_at(level + 1, phase));
                assert!(
                    b > a && (b as f64 / a as f64 - 1.25).abs() < 0.1,
                    "{phase} {level}: {a} {b}"
                );
            }
        }
    }

    /// With one phase per stripe, the index bytes per row of 64 stripes stay
    /// near 4 / mean load (~5.1) at every size, where a single phase swings
    /// between 4 / 0.875 and 4 / 0.7 as all stripes grow at once.
    #[test]
    fn phased_stripes_keep_index_bytes_per_row_flat() {
        let mut worst_phased = 0f64;
        let mut worst_single = 0f64;
        let mut best_single = f64::MAX;
        for step in 0..200 {
            let per_stripe = (100_000.0 * 1.25f64.powf(f64::from(step) / 50.0)) as usize;
            let phased: usize = (0..PHASES).map(|p| capacity_for(per_stripe, p)).sum();
            let single = capacity_for(per_stripe, 0) * PHASES as usize;
            let rows = (per_stripe * PHASES as usize) as f64;
            worst_phased = worst_phased.max(phased as f64 * 4.0 / rows);
            worst_single = worst_single.max(single as f64 * 4.0 / rows);
            best_single = best_single.min(single as f64 * 4.0 / rows);
        }
        assert!(worst_phased < 5.3, "phased worst {worst_phased}");
        assert!(
            worst_single > 5.6 && best_single < 4.7,
            "single {best_single}..{worst_single}"
        );
    }
}
