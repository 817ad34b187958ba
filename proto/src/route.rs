//! The routing function shared by workers, shards and tools.
//!
//! ```text
//! h      = splitmix64(id ^ fnv1a64(table))
//! bucket = h % NUM_BUCKETS
//! shard  = bucket * num_shards / NUM_BUCKETS
//! ```
//! It is seed-free and stable across versions and platforms: changing it
//! invalidates every checkpoint, so it is pinned by tests with fixed values.
//! Buckets map to contiguous shard ranges so that a future re-sharding moves
//! whole bucket ranges. Ids are arbitrary u64 (hashed feature ids).
//! `splitmix64` is [`crate::rng::splitmix64`].

use crate::rng::splitmix64;

/// Number of virtual buckets between ids and shards.
pub const NUM_BUCKETS: u64 = 4096;

/// 64-bit FNV-1a of a byte string (used to salt ids by table name).
#[inline]
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

/// Virtual bucket of `id` in `table`.
#[inline]
pub fn bucket_of(table: &str, id: u64) -> u64 {
    splitmix64(id ^ fnv1a64(table.as_bytes())) % NUM_BUCKETS
}

/// Maps `(table, id)` and dense parameter names to shards of a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Router {
    num_shards: u32,
}

impl Router {
    /// A router over `num_shards` shards (at least 1, at most NUM_BUCKETS).
    pub fn new(num_shards: u32) -> Self {
        assert!(
            num_shards >= 1 && u64::from(num_shards) <= NUM_BUCKETS,
            "num_shards out of range"
        );
        Router { num_shards }
    }

    /// Number of shards.
    pub fn num_shards(&self) -> u32 {
        self.num_shards
    }

    /// Shard owning row `id` of `table`.
    #[inline]
    pub fn shard_of(&self, table: &str, id: u64) -> u32 {
        self.shard_of_bucket(bucket_of(table, id))
    }

    /// Shard owning a virtual bucket.
    #[inline]
    pub fn shard_of_bucket(&self, bucket: u64) -> u32 {
        (bucket * u64::from(self.num_shards) / NUM_BUCKETS) as u32
    }

    /// Shard owning the dense parameter `name`.
    pub fn shard_of_dense(&self, name: &str) -> u32 {
        self.shard_of("", fnv1a64(name.as_bytes()))
    }

    /// Splits `ids` by shard: for each shard, the ids it owns and their
    /// positions in `ids` (to scatter pulled rows back in order).
    pub fn split(&self, table: &str, ids: &[u64]) -> Vec<(Vec<u64>, Vec<usize>)> {
        let salt = fnv1a64(table.as_bytes());
        let mut out = vec![(Vec::new(), Vec::new()); self.num_shards as usize];
        for (pos, &id) in ids.iter().enumerate() {
            let s = self.shard_of_bucket(splitmix64(id ^ salt) % NUM_BUCKETS) as usize;
            out[s].0.push(id);
            out[s].1.push(pos);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_values() {
        // Changing these breaks every existing checkpoint and deployment.
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        // The router's constants below were computed independently of this
        // code by scripts/pinned_values.py (splitmix64, FNV-1a and the
        // bucket/shard formula of the module doc re-implemented in Python).
        let b: Vec<u64> = (0..4).map(|id| bucket_of("item", id)).collect();
        assert_eq!(b, [2340, 2320, 819, 2574]);
        let r = Router::new(4);
        let got: Vec<u32> = (0..8).map(|id| r.shard_of("item", id)).collect();
        assert_eq!(got, [2, 2, 0, 2, 3, 3, 0, 3]);
        let r3 = Router::new(3);
        let got: Vec<u32> = (1000..1008).map(|id| r3.shard_of("user", id)).collect();
        assert_eq!(got, [1, 2, 2, 0, 1, 1, 1, 2]);
        let dense: Vec<u32> = ["mlp.0.weight", "mlp.0.bias", "att.w"]
            .iter()
            .map(|n| r.shard_of_dense(n))
            .collect();
        assert_eq!(dense, [3, 1, 0]);
    }

    #[test]
    fn one_shard_owns_everything() {
        let r = Router::new(1);
        assert!((0..1000).all(|id| r.shard_of("item", id) == 0));
    }

    #[test]
    fn spreads_evenly_and_split_is_a_partition() {
        let r = Router::new(4);
        let ids: Vec<u64> = (1..=40_000).collect();
        let parts = r.split("item", &ids);
        let mut seen = vec![false; ids.len()];
        for (s, (sids, pos)) in parts.iter().enumerate() {
            assert!(
                sids.len() > 9_000 && sids.len() < 11_000,
                "shard {s}: {}",
                sids.len()
            );
            for (id, p) in sids.iter().zip(pos) {
                assert_eq!(ids[*p], *id);
                assert_eq!(r.shard_of("item", *id), s as u32);
                assert!(!seen[*p]);
                seen[*p] = true;
            }
        }
        assert!(seen.iter().all(|x| *x));
    }
}
