//! The per-stripe hash index: id hash -> arena slot, 5 bytes per bucket.
//!
//! Open addressing with linear probing over two parallel arrays: a one-byte
//! tag per bucket (0 empty, 1 tombstone, 2..=255 the top byte of the id hash)
//! and the `u32` arena slot. The key itself is only stored in the arena row,
//! so a lookup compares tags first (a false match costs one arena read with
//! probability ~1/254 per probed bucket) and the key in the row last.
//!
//! The home bucket is `(h_lo32 * n) >> 32` (multiply-shift range reduction),
//! so the capacity need not be a power of two: the table grows by 1.5x when
//! live entries pass 7/8 (averaging ~7 bytes per row, where doubling at
//! 3/4 load averaged ~14 with the old 8-byte buckets). Removals leave
//! tombstones; a rebuild at the same size clears them.

/// Tag of an empty bucket.
const EMPTY: u8 = 0;
/// Tag of a removed entry.
const TOMB: u8 = 1;
/// Smallest non-empty capacity.
pub const MIN_CAPACITY: usize = 16;

/// Bytes per bucket (tag + slot).
pub const BUCKET_BYTES: usize = 5;

#[inline]
fn tag_of(h: u64) -> u8 {
    let t = (h >> 56) as u8;
    if t < 2 {
        t + 2
    } else {
        t
    }
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

/// Capacity after growing from `cap`.
pub fn grown(cap: usize) -> usize {
    if cap == 0 {
        MIN_CAPACITY
    } else {
        cap + cap / 2
    }
}

/// The capacity an index reaches after `n` inserts into an empty one (for
/// sizing: the same growth rule as [`Index::insert`]).
pub fn capacity_for(n: usize) -> usize {
    let mut cap = 0;
    while over(n, cap) || (cap == 0 && n > 0) {
        cap = grown(cap);
    }
    cap
}

/// A tagged linear-probing index of arena slots.
#[derive(Default)]
pub struct Index {
    tags: Vec<u8>,
    slots: Vec<u32>,
    len: usize,
    tombs: usize,
}

impl Index {
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
        self.tags.len()
    }

    /// Bytes allocated.
    pub fn allocation_size(&self) -> usize {
        self.tags.capacity() + self.slots.capacity() * 4
    }

    /// Hints the CPU to fetch the home bucket of `h`.
    #[inline]
    pub fn prefetch(&self, h: u64) {
        let n = self.tags.len();
        if n > 0 {
            let i = home(h, n);
            crate::store::prefetch(self.tags.as_ptr().wrapping_add(i));
            crate::store::prefetch(self.slots.as_ptr().wrapping_add(i));
        }
    }

    /// The slot of hash `h` for which `eq(slot)` holds.
    #[inline]
    pub fn find(&self, h: u64, mut eq: impl FnMut(u32) -> bool) -> Option<u32> {
        let n = self.tags.len();
        if n == 0 {
            return None;
        }
        let tag = tag_of(h);
        let mut i = home(h, n);
        loop {
            let t = self.tags[i];
            if t == EMPTY {
                return None;
            }
            if t == tag && eq(self.slots[i]) {
                return Some(self.slots[i]);
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
        if !over(self.len + self.tombs + 1, self.tags.len()) {
            0
        } else {
            let cap = self.tags.len();
            let next = if over(self.len + 1, cap) || cap == 0 {
                grown(cap)
            } else {
                cap
            };
            (next - cap) * BUCKET_BYTES
        }
    }

    /// Rebuilds into `cap` buckets; `hash_of(slot)` recomputes an entry's hash.
    fn rebuild(&mut self, cap: usize, hash_of: &impl Fn(u32) -> u64) {
        let mut tags = vec![EMPTY; cap];
        let mut slots = vec![0u32; cap];
        for (i, &t) in self.tags.iter().enumerate() {
            if t > TOMB {
                let s = self.slots[i];
                let mut j = home(hash_of(s), cap);
                while tags[j] != EMPTY {
                    j += 1;
                    if j == cap {
                        j = 0;
                    }
                }
                tags[j] = t;
                slots[j] = s;
            }
        }
        self.tags = tags;
        self.slots = slots;
        self.tombs = 0;
    }

    /// Inserts `slot` under hash `h` (the key must not be present). The index
    /// grows only when the live entries would pass 7/8; when tombstones fill
    /// it, it is rebuilt at its size (so replacing a removed entry, as budget
    /// eviction does, never grows it).
    pub fn insert(&mut self, h: u64, slot: u32, hash_of: &impl Fn(u32) -> u64) {
        let cap = self.tags.len();
        if cap == 0 || over(self.len + self.tombs + 1, cap) {
            let next = if cap == 0 || over(self.len + 1, cap) {
                grown(cap)
            } else {
                cap
            };
            self.rebuild(next.max(MIN_CAPACITY), hash_of);
        }
        let n = self.tags.len();
        let mut i = home(h, n);
        loop {
            let t = self.tags[i];
            if t == EMPTY || t == TOMB {
                if t == TOMB {
                    self.tombs -= 1;
                }
                self.tags[i] = tag_of(h);
                self.slots[i] = slot;
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
        let cap = capacity_for(n);
        if cap > self.tags.len() {
            self.rebuild(cap, hash_of);
        }
    }

    /// Removes the entry of `slot` under hash `h`; false when absent.
    pub fn remove(&mut self, h: u64, slot: u32) -> bool {
        let n = self.tags.len();
        if n == 0 {
            return false;
        }
        let tag = tag_of(h);
        let mut i = home(h, n);
        loop {
            let t = self.tags[i];
            if t == EMPTY {
                return false;
            }
            if t == tag && self.slots[i] == slot {
                self.tags[i] = TOMB;
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
        self.tags
            .iter()
            .zip(&self.slots)
            .filter(|(&t, _)| t > TOMB)
            .map(|(_, &s)| s)
    }

    /// Keeps the slots for which `keep` holds (the others become tombstones).
    pub fn retain(&mut self, mut keep: impl FnMut(u32) -> bool) {
        for (t, &s) in self.tags.iter_mut().zip(&self.slots) {
            if *t > TOMB && !keep(s) {
                *t = TOMB;
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

    #[test]
    fn capacity_follows_the_growth_rule() {
        let mut idx = Index::default();
        for n in 1..=10_000usize {
            idx.insert(n as u64 * 0x9E37_79B9, n as u32, &|s| {
                u64::from(s) * 0x9E37_79B9
            });
            assert_eq!(idx.capacity(), capacity_for(n), "n = {n}");
        }
        assert_eq!(capacity_for(0), 0);
    }
}
