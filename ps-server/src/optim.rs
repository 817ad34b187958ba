//! Optimizers over plain `&mut [f32]` slices; they know nothing of gRPC or storage.
//!
//! A row (sparse embedding or dense parameter) is a weight slice `w` plus an
//! optimizer-state slice `state` of [`Optimizer::state_len`] values that lives
//! next to it. The same code updates sparse rows and dense parameters.
//!
//! | optimizer | state per row (f32) | update |
//! |---|---|---|
//! | SGD | 0 | `w -= lr * g` |
//! | Adagrad | `dim` (acc) | `acc += g²; w -= lr * g / (sqrt(acc) + eps)` |
//! | Adam | `2*dim + 2` (m, v, β1^t, β2^t) | lazy Adam, bias correction by the row's own update count t |
//! | FTRL | `2*dim` (z, n) | FTRL-Proximal per coordinate (McMahan et al. 2013) |
//! | row-wise Adagrad | `1` (acc) | `acc += mean(g²); w -= lr * g / (sqrt(acc) + eps)` (FBGEMM/TorchRec) |
//! | row-wise Adam | `dim + 3` (m, v, β1^t, β2^t) | `m` per coordinate, `v += (1-β2)(mean(g²) - v)` per row |
//!
//! The row-wise variants keep one second moment per row instead of one per
//! coordinate: 4 bytes of state for a row of any width, which is what makes
//! 10^8+ rows fit (see `store`). They are for sparse tables only.

use crate::error::{PsError, Result};
use ember_proto::v1::{optimizer_config::Kind, OptimizerConfig};

/// Default Adam β1 when the config leaves it 0.
pub const ADAM_BETA1: f32 = 0.9;
/// Default Adam β2 when the config leaves it 0.
pub const ADAM_BETA2: f32 = 0.999;
/// Default Adam ε when the config leaves it 0.
pub const ADAM_EPS: f32 = 1e-8;
/// Default Adagrad ε when the config leaves it 0.
pub const ADAGRAD_EPS: f32 = 1e-10;

/// A validated optimizer with its defaults resolved.
///
/// Proto3 cannot tell "unset" from 0, so for Adam a 0 β1/β2/ε means the
/// defaults above, and for Adagrad a 0 ε means [`ADAGRAD_EPS`].
/// An unset optimizer is SGD with lr 0.01.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Optimizer {
    /// `w -= lr * g`.
    Sgd {
        /// Learning rate.
        lr: f32,
    },
    /// Adagrad with a per-coordinate accumulator.
    Adagrad {
        /// Learning rate.
        lr: f32,
        /// Initial accumulator value.
        init_acc: f32,
        /// Denominator epsilon.
        eps: f32,
    },
    /// Lazy Adam with per-row bias correction.
    Adam {
        /// Learning rate.
        lr: f32,
        /// First-moment decay.
        beta1: f32,
        /// Second-moment decay.
        beta2: f32,
        /// Denominator epsilon.
        eps: f32,
    },
    /// Row-wise Adagrad: one accumulator per row.
    RowwiseAdagrad {
        /// Learning rate.
        lr: f32,
        /// Initial accumulator value.
        init_acc: f32,
        /// Denominator epsilon.
        eps: f32,
    },
    /// Partial row-wise Adam: first moment per coordinate, second moment per row.
    RowwiseAdam {
        /// Learning rate.
        lr: f32,
        /// First-moment decay.
        beta1: f32,
        /// Second-moment decay.
        beta2: f32,
        /// Denominator epsilon.
        eps: f32,
    },
    /// FTRL-Proximal.
    Ftrl {
        /// Learning-rate alpha.
        alpha: f32,
        /// Learning-rate beta.
        beta: f32,
        /// L1 strength.
        l1: f32,
        /// L2 strength.
        l2: f32,
    },
}

fn check(ok: bool, what: &str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(PsError::invalid(format!(
            "malformed optimizer config: {what}"
        )))
    }
}

impl Optimizer {
    /// Validates a proto optimizer config (`None` = SGD lr 0.01).
    pub fn from_config(cfg: Option<&OptimizerConfig>) -> Result<Self> {
        let kind = match cfg.and_then(|c| c.kind.as_ref()) {
            None => return Ok(Optimizer::Sgd { lr: 0.01 }),
            Some(k) => k,
        };
        let fin = |x: f32| x.is_finite();
        Ok(match kind {
            Kind::Sgd(s) => {
                check(fin(s.lr) && s.lr >= 0.0, "sgd.lr must be finite and >= 0")?;
                Optimizer::Sgd { lr: s.lr }
            }
            Kind::RowwiseAdagrad(a) => match Self::adagrad(a, "rowwise_adagrad")? {
                Optimizer::Adagrad { lr, init_acc, eps } => {
                    Optimizer::RowwiseAdagrad { lr, init_acc, eps }
                }
                other => other,
            },
            Kind::RowwiseAdam(a) => match Self::adam(a, "rowwise_adam")? {
                Optimizer::Adam {
                    lr,
                    beta1,
                    beta2,
                    eps,
                } => Optimizer::RowwiseAdam {
                    lr,
                    beta1,
                    beta2,
                    eps,
                },
                other => other,
            },
            Kind::Adagrad(a) => Self::adagrad(a, "adagrad")?,
            Kind::Adam(a) => Self::adam(a, "adam")?,
            Kind::Ftrl(f) => {
                check(
                    fin(f.alpha) && f.alpha > 0.0,
                    "ftrl.alpha must be finite and > 0",
                )?;
                check(
                    fin(f.beta)
                        && f.beta >= 0.0
                        && fin(f.l1)
                        && f.l1 >= 0.0
                        && fin(f.l2)
                        && f.l2 >= 0.0,
                    "ftrl.beta/l1/l2 must be finite and >= 0",
                )?;
                Optimizer::Ftrl {
                    alpha: f.alpha,
                    beta: f.beta,
                    l1: f.l1,
                    l2: f.l2,
                }
            }
        })
    }

    /// Validates Adagrad hyper-parameters; `name` prefixes the field in errors.
    fn adagrad(a: &ember_proto::v1::Adagrad, name: &str) -> Result<Self> {
        let fin = |x: f32| x.is_finite();
        check(
            fin(a.lr) && a.lr >= 0.0,
            &format!("{name}.lr must be finite and >= 0"),
        )?;
        check(
            fin(a.initial_accumulator) && a.initial_accumulator >= 0.0,
            &format!("{name}.initial_accumulator must be finite and >= 0"),
        )?;
        check(
            fin(a.eps) && a.eps >= 0.0,
            &format!("{name}.eps must be finite and >= 0"),
        )?;
        Ok(Optimizer::Adagrad {
            lr: a.lr,
            init_acc: a.initial_accumulator,
            eps: if a.eps == 0.0 { ADAGRAD_EPS } else { a.eps },
        })
    }

    /// Validates Adam hyper-parameters; `name` prefixes the field in errors.
    fn adam(a: &ember_proto::v1::Adam, name: &str) -> Result<Self> {
        let fin = |x: f32| x.is_finite();
        check(
            fin(a.lr) && a.lr >= 0.0,
            &format!("{name}.lr must be finite and >= 0"),
        )?;
        check(
            (0.0..1.0).contains(&a.beta1) && (0.0..1.0).contains(&a.beta2),
            &format!("{name}.beta1/beta2 must be in [0, 1)"),
        )?;
        check(
            fin(a.eps) && a.eps >= 0.0,
            &format!("{name}.eps must be finite and >= 0"),
        )?;
        Ok(Optimizer::Adam {
            lr: a.lr,
            beta1: if a.beta1 == 0.0 { ADAM_BETA1 } else { a.beta1 },
            beta2: if a.beta2 == 0.0 { ADAM_BETA2 } else { a.beta2 },
            eps: if a.eps == 0.0 { ADAM_EPS } else { a.eps },
        })
    }

    /// Whether this optimizer keeps per-row (not per-coordinate) statistics,
    /// which only makes sense for sparse embedding rows.
    pub fn is_rowwise(&self) -> bool {
        matches!(
            self,
            Optimizer::RowwiseAdagrad { .. } | Optimizer::RowwiseAdam { .. }
        )
    }

    /// Number of f32 state values per row of width `dim`.
    pub fn state_len(&self, dim: usize) -> usize {
        match self {
            Optimizer::Sgd { .. } => 0,
            Optimizer::Adagrad { .. } => dim,
            Optimizer::Adam { .. } => 2 * dim + 2,
            Optimizer::Ftrl { .. } => 2 * dim,
            Optimizer::RowwiseAdagrad { .. } => 1,
            Optimizer::RowwiseAdam { .. } => dim + 3,
        }
    }

    /// Writes the initial state of a fresh row into `state`.
    pub fn init_state(&self, state: &mut [f32]) {
        match self {
            Optimizer::Sgd { .. } => {}
            Optimizer::Adagrad { init_acc, .. } | Optimizer::RowwiseAdagrad { init_acc, .. } => {
                state.fill(*init_acc)
            }
            Optimizer::Adam { .. } | Optimizer::RowwiseAdam { .. } => {
                state.fill(0.0);
                let n = state.len();
                if n >= 2 {
                    // beta1^t, beta2^t with t = 0.
                    state[n - 2] = 1.0;
                    state[n - 1] = 1.0;
                }
            }
            Optimizer::Ftrl { .. } => state.fill(0.0),
        }
    }

    /// Applies one update with gradient `g` to weights `w` and their `state`.
    ///
    /// `w.len() == g.len()` and `state.len() == self.state_len(w.len())`.
    #[inline]
    pub fn step(&self, w: &mut [f32], state: &mut [f32], g: &[f32]) {
        let d = w.len();
        debug_assert_eq!(g.len(), d);
        debug_assert_eq!(state.len(), self.state_len(d));
        match *self {
            Optimizer::Sgd { lr } => sgd(w, g, lr),
            Optimizer::Adagrad { lr, eps, .. } => adagrad(w, state, g, lr, eps),
            Optimizer::Adam {
                lr,
                beta1,
                beta2,
                eps,
            } => {
                let (mv, pows) = state.split_at_mut(2 * d);
                let (m, v) = mv.split_at_mut(d);
                pows[0] *= beta1;
                pows[1] *= beta2;
                let c1 = 1.0 - pows[0];
                let c2 = 1.0 - pows[1];
                adam(w, m, v, g, lr, beta1, beta2, eps, c1, c2);
            }
            Optimizer::RowwiseAdagrad { lr, eps, .. } => {
                rowwise_adagrad(w, &mut state[0], g, lr, eps)
            }
            Optimizer::RowwiseAdam {
                lr,
                beta1,
                beta2,
                eps,
            } => {
                let (m, rest) = state.split_at_mut(d);
                rest[1] *= beta1;
                rest[2] *= beta2;
                let c1 = 1.0 - rest[1];
                let c2 = 1.0 - rest[2];
                rowwise_adam(w, m, &mut rest[0], g, lr, beta1, beta2, eps, c1, c2);
            }
            Optimizer::Ftrl {
                alpha,
                beta,
                l1,
                l2,
            } => {
                let (z, n) = state.split_at_mut(d);
                ftrl(w, z, n, g, alpha, beta, l1, l2);
            }
        }
    }
}

// The update rules themselves live in `ember_proto::optim`, shared with the
// workers' in-process dense optimizer: one implementation of the math.
pub use ember_proto::optim::{adagrad, adam, ftrl, rowwise_adagrad, rowwise_adam, sgd};

/// Lanes of the fused row kernels (one AVX register of f32).
const LANES: usize = 8;

impl Optimizer {
    /// [`Optimizer::step`] with the gradient `g + coef * w` (the MBA and L2
    /// terms of [`crate::store::regularize`], added only when `coef != 0`),
    /// bit for bit the same as regularizing a copy of `g` and stepping it.
    ///
    /// SGD and Adagrad run as one pass over the row that never writes the
    /// regularized gradient out (Adagrad 8 lanes per iteration with AVX,
    /// chosen at run time when the CPU has it): the same IEEE operations in
    /// the same order per coordinate (no fused multiply-add), so the
    /// results are exact copies of the two-pass ones. The other optimizers
    /// regularize into `scratch` (at least `g.len()` values) and step.
    #[inline]
    pub fn step_regularized(
        &self,
        w: &mut [f32],
        state: &mut [f32],
        g: &[f32],
        coef: f32,
        scratch: &mut [f32],
    ) {
        match *self {
            Optimizer::Adagrad { lr, eps, .. } => fused_adagrad(w, state, g, coef, lr, eps),
            Optimizer::Sgd { lr } => fused_sgd(w, g, coef, lr),
            _ => {
                let s = &mut scratch[..g.len()];
                regularized_into(s, g, w, coef);
                self.step(w, state, s);
            }
        }
    }
}

/// Writes `g + coef * w` into `out` when `coef != 0`, else `g` (the result
/// of copying `g` and regularizing the copy in place, in one pass).
#[inline]
pub fn regularized_into(out: &mut [f32], g: &[f32], w: &[f32], coef: f32) {
    if coef != 0.0 {
        for ((o, &g), &w) in out.iter_mut().zip(g).zip(w) {
            *o = g + coef * w;
        }
    } else {
        let n = out.len().min(g.len());
        out[..n].copy_from_slice(&g[..n]);
    }
}

/// One Adagrad coordinate on `g + coef * w` (`coef != 0`) or `g`.
#[inline(always)]
fn adagrad_one(w: &mut f32, a: &mut f32, g: f32, coef: f32, lr: f32, eps: f32) {
    let g = if coef != 0.0 { g + coef * *w } else { g };
    *a += g * g;
    *w -= lr * g / (a.sqrt() + eps);
}

/// Adagrad coordinate by coordinate (CPUs without AVX, and row tails).
#[inline]
fn adagrad_scalar(w: &mut [f32], acc: &mut [f32], g: &[f32], coef: f32, lr: f32, eps: f32) {
    for ((w, a), &g) in w.iter_mut().zip(acc.iter_mut()).zip(g) {
        adagrad_one(w, a, g, coef, lr, eps);
    }
}

/// [`fused_adagrad`] with AVX: 8 coordinates per iteration, each lane the
/// operations of [`adagrad_one`] in its order (IEEE add, mul, div and
/// sqrt are exact-rounded, so the lanes equal the scalar results bit for
/// bit), then the tail coordinate by coordinate.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
fn fused_adagrad_avx(w: &mut [f32], acc: &mut [f32], g: &[f32], coef: f32, lr: f32, eps: f32) {
    use std::arch::x86_64::{
        __m256, _mm256_add_ps, _mm256_div_ps, _mm256_mul_ps, _mm256_set1_ps, _mm256_sqrt_ps,
        _mm256_sub_ps,
    };
    // Blocks move between arrays and registers by value (`transmute`; no
    // pointer loads, whose debug-build checks cost more than the math).
    // SAFETY (both): `[f32; 8]` and `__m256` are 32 plain bytes, any bit
    // pattern valid for either.
    let load = |b: &[f32; LANES]| unsafe { std::mem::transmute::<[f32; LANES], __m256>(*b) };
    let store = |b: &mut [f32; LANES], v: __m256| {
        *b = unsafe { std::mem::transmute::<__m256, [f32; LANES]>(v) };
    };
    let n = w.len().min(acc.len()).min(g.len());
    let (wc, wt) = w[..n].as_chunks_mut::<LANES>();
    let (ac, at) = acc[..n].as_chunks_mut::<LANES>();
    let (gc, gt) = g[..n].as_chunks::<LANES>();
    let (vcoef, vlr, veps) = (
        _mm256_set1_ps(coef),
        _mm256_set1_ps(lr),
        _mm256_set1_ps(eps),
    );
    let reg = coef != 0.0;
    for ((wb, ab), gb) in wc.iter_mut().zip(ac.iter_mut()).zip(gc) {
        let (wv, av, gv) = (load(wb), load(ab), load(gb));
        let gv = if reg {
            _mm256_add_ps(gv, _mm256_mul_ps(vcoef, wv))
        } else {
            gv
        };
        let av = _mm256_add_ps(av, _mm256_mul_ps(gv, gv));
        let step = _mm256_div_ps(
            _mm256_mul_ps(vlr, gv),
            _mm256_add_ps(_mm256_sqrt_ps(av), veps),
        );
        store(ab, av);
        store(wb, _mm256_sub_ps(wv, step));
    }
    adagrad_scalar(wt, at, gt, coef, lr, eps);
}

/// Adagrad on `g + coef * w` (`coef != 0`) or `g`, one pass, equal bit for
/// bit to [`crate::store::regularize`] then [`adagrad`].
#[inline]
fn fused_adagrad(w: &mut [f32], acc: &mut [f32], g: &[f32], coef: f32, lr: f32, eps: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU was just found to support AVX, the only
        // requirement of calling a function compiled for it.
        unsafe { fused_adagrad_avx(w, acc, g, coef, lr, eps) };
        return;
    }
    adagrad_scalar(w, acc, g, coef, lr, eps);
}

/// SGD on `g + coef * w` (`coef != 0`) or `g`, one pass.
#[inline]
fn fused_sgd(w: &mut [f32], g: &[f32], coef: f32, lr: f32) {
    if coef != 0.0 {
        for (w, &g) in w.iter_mut().zip(g) {
            let g = g + coef * *w;
            *w -= lr * g;
        }
    } else {
        sgd(w, g, lr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_proto::v1::{Adagrad, Adam, Ftrl, Sgd};

    fn close(a: f32, b: f32) {
        assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
    }

    fn opt(kind: Kind) -> Optimizer {
        Optimizer::from_config(Some(&OptimizerConfig { kind: Some(kind) })).unwrap()
    }

    #[test]
    fn sgd_hand_computed() {
        let o = opt(Kind::Sgd(Sgd { lr: 0.5 }));
        let mut w = [1.0, -2.0];
        o.step(&mut w, &mut [], &[0.2, -0.4]);
        close(w[0], 0.9);
        close(w[1], -1.8);
        assert_eq!(
            Optimizer::from_config(None).unwrap(),
            Optimizer::Sgd { lr: 0.01 }
        );
    }

    #[test]
    fn adagrad_hand_computed() {
        let o = opt(Kind::Adagrad(Adagrad {
            lr: 0.1,
            initial_accumulator: 1.0,
            eps: 1e-3,
        }));
        let mut w = [1.0f32];
        let mut s = [0.0f32];
        o.init_state(&mut s);
        assert_eq!(s, [1.0]);
        o.step(&mut w, &mut s, &[2.0]);
        // acc = 1 + 4 = 5; w = 1 - 0.1*2/(sqrt5 + 1e-3)
        close(s[0], 5.0);
        close(w[0], 1.0 - 0.2 / (5f32.sqrt() + 1e-3));
        o.step(&mut w, &mut s, &[-1.0]);
        close(s[0], 6.0);
        close(
            w[0],
            1.0 - 0.2 / (5f32.sqrt() + 1e-3) + 0.1 / (6f32.sqrt() + 1e-3),
        );
    }

    #[test]
    fn adam_hand_computed_with_bias_correction() {
        let o = opt(Kind::Adam(Adam {
            lr: 0.1,
            beta1: 0.5,
            beta2: 0.75,
            eps: 1e-8,
        }));
        assert_eq!(o.state_len(1), 4);
        let mut w = [1.0f32];
        let mut s = [9.0f32; 4];
        o.init_state(&mut s);
        assert_eq!(s, [0.0, 0.0, 1.0, 1.0]);
        // t=1: m = 0.5*2 = 1; v = 0.25*4 = 1; mhat = 1/0.5 = 2; vhat = 1/0.25 = 4
        // w = 1 - 0.1 * 2 / 2 = 0.9 (first Adam step moves by ~lr*sign(g)).
        o.step(&mut w, &mut s, &[2.0]);
        close(s[0], 1.0);
        close(s[1], 1.0);
        close(w[0], 0.9);
        // t=2, g=0: m = 0.5; v = 0.75; c1 = 0.75; c2 = 1-0.5625 = 0.4375
        o.step(&mut w, &mut s, &[0.0]);
        let mhat = 0.5 / 0.75;
        let vhat = 0.75f32 / 0.4375;
        close(w[0], 0.9 - 0.1 * mhat / (vhat.sqrt() + 1e-8));
    }

    #[test]
    fn adam_defaults_fill_zero_fields() {
        let o = opt(Kind::Adam(Adam {
            lr: 0.01,
            ..Default::default()
        }));
        assert_eq!(
            o,
            Optimizer::Adam {
                lr: 0.01,
                beta1: ADAM_BETA1,
                beta2: ADAM_BETA2,
                eps: ADAM_EPS
            }
        );
    }

    #[test]
    fn ftrl_hand_computed() {
        let o = opt(Kind::Ftrl(Ftrl {
            alpha: 0.5,
            beta: 1.0,
            l1: 0.1,
            l2: 0.2,
        }));
        let mut w = [0.0f32];
        let mut s = [0.0f32; 2];
        o.init_state(&mut s);
        o.step(&mut w, &mut s, &[1.0]);
        // n = 1; sigma = (1 - 0)/0.5 = 2; z = 1 - 2*0 = 1
        // w = -(1 - 0.1) / ((1 + 1)/0.5 + 0.2) = -0.9/4.2
        close(s[0], 1.0);
        close(s[1], 1.0);
        close(w[0], -0.9 / 4.2);
        // small gradient inside the l1 ball
        let mut w2 = [0.0f32];
        let mut s2 = [0.0f32; 2];
        o.step(&mut w2, &mut s2, &[0.05]);
        assert_eq!(w2[0], 0.0);
    }

    #[test]
    fn rowwise_adagrad_hand_computed() {
        let o = opt(Kind::RowwiseAdagrad(Adagrad {
            lr: 0.1,
            initial_accumulator: 0.5,
            eps: 1e-3,
        }));
        assert_eq!(o.state_len(4), 1);
        assert!(o.is_rowwise());
        let mut w = [1.0f32, -1.0];
        let mut s = [0.0f32];
        o.init_state(&mut s);
        assert_eq!(s, [0.5]);
        // mean(g²) = (4 + 16)/2 = 10; acc = 10.5; w -= 0.1 * g / (sqrt(10.5) + 1e-3)
        o.step(&mut w, &mut s, &[2.0, 4.0]);
        let den = 10.5f32.sqrt() + 1e-3;
        close(s[0], 10.5);
        close(w[0], 1.0 - 0.2 / den);
        close(w[1], -1.0 - 0.4 / den);
    }

    #[test]
    fn rowwise_adam_hand_computed_with_bias_correction() {
        let o = opt(Kind::RowwiseAdam(Adam {
            lr: 0.1,
            beta1: 0.5,
            beta2: 0.75,
            eps: 1e-8,
        }));
        assert_eq!(o.state_len(2), 5);
        let mut w = [1.0f32, 1.0];
        let mut s = [9.0f32; 5];
        o.init_state(&mut s);
        assert_eq!(s, [0.0, 0.0, 0.0, 1.0, 1.0]);
        // t=1: m = (1, -1)·0.5·2... g = (2, -2): m = (1, -1); v = 0.25 * mean(4, 4) = 1
        // mhat = m / 0.5 = (2, -2); vhat = 1 / 0.25 = 4; w = 1 -+ 0.1 * 2 / 2
        o.step(&mut w, &mut s, &[2.0, -2.0]);
        close(s[0], 1.0);
        close(s[1], -1.0);
        close(s[2], 1.0);
        close(w[0], 0.9);
        close(w[1], 1.1);
    }

    /// The fused step equals regularizing a copy of the gradient and
    /// stepping it, bit for bit (weights and state), for every optimizer,
    /// row widths around the 8-lane blocks, with and without the
    /// regularization term, over many updates of the same row.
    #[test]
    fn step_regularized_equals_regularize_then_step_bit_for_bit() {
        use ember_proto::rng::SplitMix64;
        let kinds = [
            Kind::Sgd(Sgd { lr: 0.3 }),
            Kind::Adagrad(Adagrad {
                lr: 0.05,
                initial_accumulator: 0.1,
                eps: 1e-8,
            }),
            Kind::Adagrad(Adagrad {
                lr: 0.7,
                initial_accumulator: 0.0,
                eps: 0.0,
            }),
            Kind::RowwiseAdagrad(Adagrad {
                lr: 0.05,
                initial_accumulator: 0.1,
                eps: 1e-8,
            }),
            Kind::Adam(Adam {
                lr: 0.01,
                ..Default::default()
            }),
            Kind::RowwiseAdam(Adam {
                lr: 0.01,
                ..Default::default()
            }),
            Kind::Ftrl(Ftrl {
                alpha: 0.5,
                beta: 1.0,
                l1: 0.01,
                l2: 0.1,
            }),
        ];
        let mut rng = SplitMix64::new(3);
        let mut uniform =
            move |scale: f32| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale;
        for kind in kinds {
            let o = opt(kind);
            for dim in [1usize, 3, 7, 8, 9, 16, 18, 31, 32, 33, 64] {
                for (lambda, l2) in [(0.0, 0.0), (0.01, 0.0), (0.4, 0.25), (0.0, 0.5)] {
                    let mut w: Vec<f32> = (0..dim).map(|_| uniform(0.2)).collect();
                    if dim > 2 {
                        w[1] = -0.0;
                    }
                    let mut st = vec![0.0f32; o.state_len(dim)];
                    o.init_state(&mut st);
                    let (mut w2, mut st2) = (w.clone(), st.clone());
                    let mut scratch = vec![0.0f32; dim];
                    for nj in 1..=40u32 {
                        let g: Vec<f32> = (0..dim)
                            .map(|i| if i % 5 == 4 { 0.0 } else { uniform(2.0) })
                            .collect();
                        let mut g_ref = g.clone();
                        crate::store::regularize(&mut g_ref, &w, lambda, nj, l2);
                        o.step(&mut w, &mut st, &g_ref);
                        let coef = crate::store::regularize_coef(lambda, nj, l2);
                        o.step_regularized(&mut w2, &mut st2, &g, coef, &mut scratch);
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&w), bits(&w2), "{o:?} dim {dim} nj {nj}");
                        assert_eq!(bits(&st), bits(&st2), "{o:?} dim {dim} nj {nj}");
                    }
                }
            }
        }
    }

    #[test]
    fn rejects_malformed() {
        let bad = [
            Kind::Sgd(Sgd { lr: f32::NAN }),
            Kind::Adam(Adam {
                lr: 0.1,
                beta1: 1.5,
                beta2: 0.9,
                eps: 0.0,
            }),
            Kind::Ftrl(Ftrl {
                alpha: 0.0,
                ..Default::default()
            }),
            Kind::RowwiseAdagrad(Adagrad {
                lr: -1.0,
                ..Default::default()
            }),
        ];
        for k in bad {
            let e = Optimizer::from_config(Some(&OptimizerConfig { kind: Some(k) })).unwrap_err();
            assert!(e.to_string().contains("malformed optimizer"), "{e}");
        }
    }
}
