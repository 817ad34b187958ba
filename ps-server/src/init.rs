//! Deterministic initial values of unseen rows, derived from `(seed, id)` only.
//!
//! Value `k` of row `id` comes from a counter-based generator:
//! `u_k = splitmix64(splitmix64(seed ^ splitmix64(id)) + k * φ)`, so the
//! initial row does not depend on which worker touched it first, on the shard
//! count, or on the order of requests, and is reproduced after a restore.
//! This function is part of the checkpoint format: changing it changes the
//! value of every row never pushed.

use ember_proto::route::splitmix64;
use ember_proto::v1::initializer::Kind;

const PHI: u64 = 0x9E37_79B9_7F4A_7C15;

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
        let mut ctr: u64 = 0;
        let mut next = || {
            ctr += 1;
            splitmix64(base.wrapping_add(ctr.wrapping_mul(PHI)))
        };
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
        let i = Init {
            kind: Kind::Uniform,
            scale: 1.0,
            seed: 1,
        };
        let mut a = [0.0f32; 2];
        i.fill(0, &mut a);
        let again = {
            let mut b = [0.0f32; 2];
            i.fill(0, &mut b);
            b
        };
        assert_eq!(a, again);
        let z = Init {
            kind: Kind::Zero,
            scale: 1.0,
            seed: 1,
        };
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
