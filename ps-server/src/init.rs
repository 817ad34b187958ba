//! Deterministic initial values of unseen rows, derived from `(seed, id)` only.
//!
//! Value `k` of row `id` comes from a counter-based generator:
//! `u_k = splitmix64(splitmix64(seed ^ splitmix64(id)) + k * φ)`, so the
//! initial row does not depend on which worker touched it first, on the shard
//! count, or on the order of requests, and is reproduced after a restore.
//! This function is part of the checkpoint format: changing it changes the
//! value of every row never pushed.

use ember_proto::rng::{splitmix64, SplitMix64, GOLDEN_GAMMA};
use ember_proto::v1::initializer::Kind;

/// A validated initializer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Init {
    /// Distribution.
    pub kind: Kind,
    /// Spread (see the proto).
    pub scale: f32,
    /// Table seed.
    pub seed: u64,
}

/// Uniform in [0, 1) with 24 bits of precision.
#[inline]
fn unit(x: u64) -> f32 {
    (x >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
}

impl Init {
    /// Writes the initial value of row `id` into `out` (its length is the dim).
    pub fn fill(&self, id: u64, out: &mut [f32]) {
        if self.kind == Kind::Zero || self.scale == 0.0 {
            out.fill(0.0);
            return;
        }
        let base = splitmix64(self.seed ^ splitmix64(id));
        // u_k = splitmix64(base + k * φ) for k = 1, 2, ...: the SplitMix64
        // stream whose state starts one step past `base`.
        let mut rng = SplitMix64::new(base.wrapping_add(GOLDEN_GAMMA));
        let mut next = || rng.next_u64();
        match self.kind {
            Kind::Zero => out.fill(0.0),
            Kind::Uniform => {
                for v in out.iter_mut() {
                    *v = self.scale * (2.0 * unit(next()) - 1.0);
                }
            }
            Kind::Normal | Kind::TruncatedNormal => {
                let trunc = self.kind == Kind::TruncatedNormal;
                for v in out.iter_mut() {
                    // Box-Muller on one fresh pair per value; resample beyond 2σ
                    // when truncated (at most a few tries; bounded at 64).
                    let mut z = 0.0f32;
                    for _ in 0..64 {
                        let u1 = 1.0 - unit(next()); // (0, 1]
                        let u2 = unit(next());
                        z = (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos();
                        if !trunc || z.abs() <= 2.0 {
                            break;
                        }
                    }
                    if trunc {
                        z = z.clamp(-2.0, 2.0);
                    }
                    *v = self.scale * z;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_id_dependent() {
        for kind in [Kind::Uniform, Kind::Normal, Kind::TruncatedNormal] {
            let i = Init {
                kind,
                scale: 0.1,
                seed: 7,
            };
            let mut a = vec![0.0; 16];
            let mut b = vec![0.0; 16];
            i.fill(42, &mut a);
            i.fill(42, &mut b);
            assert_eq!(a, b);
            i.fill(43, &mut b);
            assert_ne!(a, b);
            let other = Init { seed: 8, ..i };
            other.fill(42, &mut b);
            assert_ne!(a, b);
            let bound = if kind == Kind::Uniform {
                0.1
            } else {
                0.2 + 1e-6
            };
            if kind != Kind::Normal {
                assert!(a.iter().all(|v| v.abs() <= bound));
            }
        }
    }

    #[test]
    fn pinned_first_value() {
        // Part of the checkpoint format: unseen rows must keep their values.
        // The constants were computed independently of this code by
        // scripts/pinned_values.py (splitmix64 and the f32 arithmetic of
        // `fill` re-implemented in Python, each step rounded to f32); they
        // are the IEEE-754 bit patterns of the expected f32 values.
        let bits = |init: Init, id: u64, n: usize| {
            let mut v = vec![0.0f32; n];
            init.fill(id, &mut v);
            v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>()
        };
        let u1 = Init {
            kind: Kind::Uniform,
            scale: 1.0,
            seed: 1,
        };
        // 0.30640054, 0.15636289
        assert_eq!(bits(u1, 0, 2), [0x3e9c_e088, 0x3e20_1d98]);
        let u7 = Init {
            kind: Kind::Uniform,
            scale: 0.1,
            seed: 7,
        };
        assert_eq!(
            bits(u7, 42, 4),
            [0xbcba_df47, 0x3c39_cdf3, 0x3da9_255a, 0x3bb1_de80]
        );
        // Box-Muller uses ln/sqrt/cos, whose last bit may differ between
        // math libraries: compare with the f64 reference within 1e-5.
        let n3 = Init {
            kind: Kind::Normal,
            scale: 1.0,
            seed: 3,
        };
        let mut v = [0.0f32; 3];
        n3.fill(5, &mut v);
        let want = [
            -1.895_840_300_372_080_5,
            1.845_937_302_575_024_8,
            0.544_757_525_385_852_1,
        ];
        for (got, want) in v.iter().zip(want) {
            assert!((f64::from(*got) - want).abs() < 1e-5, "{v:?} vs {want}");
        }
        let z = Init {
            kind: Kind::Zero,
            scale: 1.0,
            seed: 1,
        };
        let mut a = [1.0f32; 2];
        z.fill(5, &mut a);
        assert_eq!(a, [0.0, 0.0]);
    }

    #[test]
    fn normal_moments_are_plausible() {
        let i = Init {
            kind: Kind::Normal,
            scale: 1.0,
            seed: 3,
        };
        let mut buf = [0.0f32; 8];
        let (mut s, mut s2, mut n) = (0.0f64, 0.0f64, 0.0f64);
        for id in 0..5000 {
            i.fill(id, &mut buf);
            for v in buf {
                s += v as f64;
                s2 += (v * v) as f64;
                n += 1.0;
            }
        }
        let mean = s / n;
        let var = s2 / n - mean * mean;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "{mean} {var}"
        );
    }
}
