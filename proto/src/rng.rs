//! SplitMix64 (Steele, Lea, Flood 2014): the one 64-bit mixer and the one
//! small seeded generator of the workspace.
//!
//! The routing function ([`crate::route`]), the shards' initialisers and
//! stochastic rounding, the data generators and the benchmarks all draw from
//! here. Everything they produce must be byte-identical across machines, Rust
//! versions and `rand` versions for a given seed, so none of them uses
//! `rand::rngs::StdRng` (whose algorithm may change between releases).
//! SplitMix64 has a 64-bit state, one add and one mix per output, passes
//! BigCrush, and any 64-bit seed is valid.
//!
//! Changing anything here changes routing (invalidating every checkpoint),
//! initial weights and generated data: the values are pinned by tests, some
//! of them computed independently by `scripts/pinned_values.py`.

/// The golden-ratio increment of SplitMix64, `floor(2^64 / φ)` (odd).
pub const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// The SplitMix64 output function: a fixed bijective mix of a 64-bit state.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// SplitMix64 as a hash: the first output of a generator seeded with `x`,
/// i.e. `mix64(x + GOLDEN_GAMMA)`. Bijective on u64.
#[inline]
pub fn splitmix64(x: u64) -> u64 {
    mix64(x.wrapping_add(GOLDEN_GAMMA))
}

/// Derives an independent seed from a base seed and a stream key (for example
/// a user id, an epoch or a row index).
#[inline]
pub fn derive_seed(seed: u64, key: u64) -> u64 {
    mix64(seed ^ mix64(key.wrapping_add(0x632B_E59B_D9B4_E019)))
}

/// The SplitMix64 generator: the state advances by a fixed odd `gamma`
/// ([`GOLDEN_GAMMA`] unless built [`SplitMix64::with_gamma`]) and each output
/// is [`mix64`] of the new state.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
    gamma: u64,
}

impl SplitMix64 {
    /// The standard generator seeded with `seed`: its outputs are
    /// `splitmix64(seed)`, `splitmix64(seed + γ)`, ... for γ = [`GOLDEN_GAMMA`].
    #[inline]
    pub fn new(seed: u64) -> Self {
        SplitMix64 {
            state: seed,
            gamma: GOLDEN_GAMMA,
        }
    }

    /// A generator whose state starts at `state` and advances by `gamma`
    /// (as in Steele et al.'s splittable generator). Only for streams that
    /// must reproduce an existing sequence: a gamma with few bit transitions
    /// (1, say) gives correlated outputs between nearby seeds.
    #[inline]
    pub fn with_gamma(state: u64, gamma: u64) -> Self {
        SplitMix64 { state, gamma }
    }

    /// Next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(self.gamma);
        mix64(self.state)
    }

    /// Uniform integer in `0..n` (unbiased, Lemire's multiply-and-reject).
    /// Panics if `n == 0`.
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "SplitMix64::below(0)");
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = u128::from(self.next_u64()) * u128::from(n);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }

    /// Uniform float in `[0, 1)` with 53 random bits.
    #[inline]
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Shuffles `xs` in place (Fisher-Yates, from the back).
    pub fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            xs.swap(i, j);
        }
    }
}

/// With the `rand` feature, the generator drives `rand`/`rand_distr` samplers.
#[cfg(feature = "rand")]
impl rand::RngCore for SplitMix64 {
    fn next_u32(&mut self) -> u32 {
        (SplitMix64::next_u64(self) >> 32) as u32
    }

    fn next_u64(&mut self) -> u64 {
        SplitMix64::next_u64(self)
    }

    fn fill_bytes(&mut self, dst: &mut [u8]) {
        for chunk in dst.chunks_mut(8) {
            let v = SplitMix64::next_u64(self).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_first_output() {
        // Reference value of SplitMix64 seeded with 0 (from the C reference);
        // also pinned by scripts/pinned_values.py.
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        // The generator is the hash of its successive states.
        let mut r = SplitMix64::new(12345);
        for k in 0..4u64 {
            let want = splitmix64(12345u64.wrapping_add(k.wrapping_mul(GOLDEN_GAMMA)));
            assert_eq!(r.next_u64(), want);
        }
    }

    #[test]
    fn with_gamma_reproduces_a_counter_hash() {
        // state s + γ, step 1: outputs splitmix64(s + 1), splitmix64(s + 2), ...
        let mut r = SplitMix64::with_gamma(42u64.wrapping_add(GOLDEN_GAMMA), 1);
        for k in 1..=5u64 {
            assert_eq!(r.next_u64(), splitmix64(42 + k));
        }
    }

    #[test]
    fn mix64_is_splitmix64_without_the_increment() {
        for x in [0u64, 1, 77, u64::MAX] {
            assert_eq!(mix64(x.wrapping_add(GOLDEN_GAMMA)), splitmix64(x));
        }
        assert_eq!(
            derive_seed(1, 2),
            mix64(1 ^ mix64(2 + 0x632B_E59B_D9B4_E019))
        );
    }

    #[test]
    fn below_stays_in_range_and_covers() {
        let mut r = SplitMix64::new(7);
        let mut seen = [0u32; 5];
        for _ in 0..5000 {
            seen[r.below(5) as usize] += 1;
        }
        assert!(seen.iter().all(|&c| c > 800), "{seen:?}");
    }

    #[test]
    fn next_f64_is_in_unit_interval() {
        let mut r = SplitMix64::new(9);
        let xs: Vec<f64> = (0..1000).map(|_| r.next_f64()).collect();
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        assert!((mean - 0.5).abs() < 0.05, "{mean}");
    }

    #[test]
    fn shuffle_is_permutation() {
        let mut r = SplitMix64::new(3);
        let mut xs: Vec<u32> = (0..100).collect();
        r.shuffle(&mut xs);
        assert_ne!(xs, (0..100).collect::<Vec<_>>());
        xs.sort();
        assert_eq!(xs, (0..100).collect::<Vec<_>>());
    }
}
