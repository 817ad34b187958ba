//! The in-memory layout of one stored row and the storage precisions of its
//! weights.
//!
//! A row is a fixed number of `u32` words in a stripe's arena:
//!
//! ```text
//! word 0..2  key (u64, low word first)
//! word 2     count n_j (u32)
//! word 3     last-update step (u32; steps saturate at MAX_ROW_STEP,
//!            FREE_STEP marks a free slot)
//! word 4..   optimizer state, f32 (Optimizer::state_len values)
//! then       weights: dim values of the table's Precision
//!            (f32: 4 bytes, f16/bf16: 2 bytes, padded to a whole word)
//! ```
//!
//! So dim 18 with f16 weights and row-wise Adagrad is 4 + 1 + 9 = 14 words =
//! 56 bytes, against 5 + 18 + 18 = 41 words (164 bytes) for f32 Adagrad.
//!
//! Reduced-precision weights are always computed in f32: a push decodes the
//! row's weights, applies regularization and the optimizer in f32 and encodes
//! the result with **stochastic rounding** (round up with probability equal
//! to the distance to the lower neighbour over the gap), so an update smaller
//! than half an ulp still moves the weight in expectation instead of being
//! lost (see `../shared/STACK.md`: with weights near 0.01 an f16 ulp is ~1e-5).
//! The random bits come from `splitmix64(seed, id, step)`, so a rerun with
//! the same pushes stores the same bits. Initial values, restored rows and
//! pulls of unseen ids use round-to-nearest, so a pull of an unseen id equals
//! the row created from it.

use crate::error::{PsError, Result};
use ember_proto::rng::{splitmix64, SplitMix64, GOLDEN_GAMMA};
use ember_proto::v1::Precision;
use half::{bf16, f16};

/// Words of the row header (key 2, count 1, step 1).
pub const HEADER_WORDS: usize = 4;
/// Largest step a row records; later steps are stored as this value.
pub const MAX_ROW_STEP: u64 = u32::MAX as u64 - 1;
/// Step word of a free slot.
pub const FREE_STEP: u32 = u32::MAX;

/// Storage precision of a table's weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightPrecision {
    /// 4 bytes, exact.
    F32,
    /// IEEE binary16, stochastically rounded updates.
    F16,
    /// bfloat16, stochastically rounded updates.
    Bf16,
}

impl WeightPrecision {
    /// Validates the wire value; the error names the field.
    pub fn from_proto(v: i32) -> Result<Self> {
        match Precision::try_from(v) {
            Ok(Precision::F32) => Ok(Self::F32),
            Ok(Precision::F16) => Ok(Self::F16),
            Ok(Precision::Bf16) => Ok(Self::Bf16),
            Err(_) => Err(PsError::invalid(format!(
                "malformed table config: unknown precision {v} (expected f32, f16 or bf16)"
            ))),
        }
    }

    /// Bytes of one weight.
    pub fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
        }
    }

    /// Lower-case name (`f32`, `f16`, `bf16`).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        }
    }

    /// Rounds every value to the nearest representable one, in place.
    pub fn round_nearest(self, v: &mut [f32]) {
        match self {
            Self::F32 => {}
            Self::F16 => v.iter_mut().for_each(|x| *x = f16::from_f32(*x).to_f32()),
            Self::Bf16 => v.iter_mut().for_each(|x| *x = bf16::from_f32(*x).to_f32()),
        }
    }
}

/// Where the parts of a row lie, in words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowLayout {
    /// Embedding width.
    pub dim: usize,
    /// f32 optimizer-state values.
    pub state: usize,
    /// Weight precision.
    pub precision: WeightPrecision,
    /// Words per row.
    pub words: usize,
}

impl RowLayout {
    /// The layout of a row of `dim` weights and `state` f32 state values.
    pub fn new(dim: usize, state: usize, precision: WeightPrecision) -> Self {
        let weight_words = (dim * precision.bytes()).div_ceil(4);
        RowLayout {
            dim,
            state,
            precision,
            words: HEADER_WORDS + state + weight_words,
        }
    }

    /// Bytes per row in the arena.
    pub fn bytes(&self) -> usize {
        self.words * 4
    }

    /// First word of the weights.
    #[inline]
    pub fn weights_at(&self) -> usize {
        HEADER_WORDS + self.state
    }

    /// Decodes the weights of `row` into `out` (`dim` values).
    #[inline]
    pub fn read_weights(&self, row: &[u32], out: &mut [f32]) {
        let w = &row[self.weights_at()..];
        match self.precision {
            WeightPrecision::F32 => {
                for (o, &b) in out.iter_mut().zip(w) {
                    *o = f32::from_bits(b);
                }
            }
            WeightPrecision::F16 => {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = f16::from_bits(half_word(w, i)).to_f32();
                }
            }
            WeightPrecision::Bf16 => {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = bf16::from_bits(half_word(w, i)).to_f32();
                }
            }
        }
    }

    /// Encodes `vals` (`dim` values) into the weights of `row`, rounding to
    /// nearest (`noise = None`) or stochastically with the given seed.
    #[inline]
    pub fn write_weights(&self, row: &mut [u32], vals: &[f32], noise: Option<u64>) {
        let at = self.weights_at();
        let w = &mut row[at..];
        match (self.precision, noise) {
            (WeightPrecision::F32, _) => {
                for (b, &v) in w.iter_mut().zip(vals) {
                    *b = v.to_bits();
                }
            }
            (WeightPrecision::F16, None) => {
                for (i, &v) in vals.iter().enumerate() {
                    set_half_word(w, i, f16::from_f32(v).to_bits());
                }
            }
            (WeightPrecision::Bf16, None) => {
                for (i, &v) in vals.iter().enumerate() {
                    set_half_word(w, i, bf16::from_f32(v).to_bits());
                }
            }
            (p, Some(seed)) => {
                // Block j of 4 values takes splitmix64(seed + (j + 1) * φ).
                let mut rng = SplitMix64::new(seed.wrapping_add(GOLDEN_GAMMA));
                let mut bits = 0u64;
                for (i, &v) in vals.iter().enumerate() {
                    if i % 4 == 0 {
                        bits = rng.next_u64();
                    }
                    let r = (bits >> ((i % 4) * 16)) as u16;
                    let h = if p == WeightPrecision::F16 {
                        f16_stochastic(v, r)
                    } else {
                        bf16_stochastic(v, r)
                    };
                    set_half_word(w, i, h);
                }
            }
        }
    }

    /// The f32 optimizer state of `row`.
    #[inline]
    pub fn state<'a>(&self, row: &'a [u32]) -> &'a [f32] {
        bytemuck::cast_slice(&row[HEADER_WORDS..HEADER_WORDS + self.state])
    }

    /// The f32 optimizer state of `row`, mutable.
    #[inline]
    pub fn state_mut<'a>(&self, row: &'a mut [u32]) -> &'a mut [f32] {
        bytemuck::cast_slice_mut(&mut row[HEADER_WORDS..HEADER_WORDS + self.state])
    }

    /// State and (f32 tables only) weights of `row` as mutable f32 slices.
    #[inline]
    pub fn split_f32_mut<'a>(&self, row: &'a mut [u32]) -> (&'a mut [f32], &'a mut [f32]) {
        let (head, w) = row.split_at_mut(self.weights_at());
        (
            bytemuck::cast_slice_mut(&mut head[HEADER_WORDS..]),
            bytemuck::cast_slice_mut(&mut w[..self.dim]),
        )
    }

    /// Decodes weights then state into `out` (`dim + state` values), the
    /// order checkpoints and tools exchange.
    pub fn read_values(&self, row: &[u32], out: &mut Vec<f32>) {
        out.clear();
        out.resize(self.dim + self.state, 0.0);
        let (w, s) = out.split_at_mut(self.dim);
        self.read_weights(row, w);
        s.copy_from_slice(self.state(row));
    }

    /// Encodes `vals` (weights then state) into `row`, weights rounded to nearest.
    pub fn write_values(&self, row: &mut [u32], vals: &[f32]) {
        let (w, s) = vals.split_at(self.dim);
        self.write_weights(row, w, None);
        self.state_mut(row).copy_from_slice(s);
    }
}

/// The stochastic-rounding seed of a row update.
#[inline]
pub fn noise_seed(table_seed: u64, id: u64, step: u64) -> u64 {
    splitmix64(table_seed ^ splitmix64(id ^ step.rotate_left(29)))
}

#[inline]
fn half_word(w: &[u32], i: usize) -> u16 {
    (w[i / 2] >> ((i % 2) * 16)) as u16
}

#[inline]
fn set_half_word(w: &mut [u32], i: usize, h: u16) {
    let sh = (i % 2) * 16;
    let word = &mut w[i / 2];
    *word = (*word & !(0xFFFF << sh)) | (u32::from(h) << sh);
}

/// bfloat16 with stochastic rounding: adds 16 random bits below the kept
/// mantissa and truncates, which rounds the magnitude up with probability
/// equal to the dropped fraction. Non-finite values round to nearest.
#[inline]
pub fn bf16_stochastic(v: f32, r: u16) -> u16 {
    if !v.is_finite() {
        return bf16::from_f32(v).to_bits();
    }
    let bits = v.to_bits();
    let up = bits.wrapping_add(u32::from(r));
    // A carry into the exponent is fine (the next binade); into infinity not.
    if f32::from_bits(up & 0xFFFF_0000).is_infinite() {
        return (bits >> 16) as u16;
    }
    (up >> 16) as u16
}

/// The next f16 towards +infinity (bit-level).
#[inline]
fn f16_next_up(h: u16) -> u16 {
    if h == 0x8000 {
        0x0001
    } else if h & 0x8000 == 0 {
        h + 1
    } else {
        h - 1
    }
}

/// The next f16 towards -infinity (bit-level).
#[inline]
fn f16_next_down(h: u16) -> u16 {
    if h == 0x0000 {
        0x8001
    } else if h & 0x8000 == 0 {
        h - 1
    } else {
        h + 1
    }
}

/// IEEE half with stochastic rounding: between the two neighbours `lo <= v
/// <= hi`, `hi` is chosen with probability `(v - lo) / (hi - lo)` (`r` is a
/// 16-bit uniform). Non-finite values and values beyond the f16 range round
/// to nearest.
///
/// In the f16 normal range (`2^-14 <= |v| < 2^16`) this is bit arithmetic,
/// like [`bf16_stochastic`]: an f32 keeps exactly 13 mantissa bits below an
/// f16's, so adding 13 random bits there and truncating rounds the
/// magnitude up with probability exactly `dropped / 2^13`, the fraction
/// above. Elsewhere (f16 subnormals, overflow) it compares neighbours.
#[inline]
pub fn f16_stochastic(v: f32, r: u16) -> u16 {
    let bits = v.to_bits();
    let abs = bits & 0x7FFF_FFFF;
    if (0x3880_0000..0x4780_0000).contains(&abs) {
        // Rebias the exponent from 127 to 15: (127 - 15) << 10 in f16 bits.
        let h = ((abs + u32::from(r & 0x1FFF)) >> 13) - (112 << 10);
        if h < 0x7C00 {
            return ((bits >> 16) & 0x8000) as u16 | h as u16;
        }
    }
    f16_stochastic_exact(v, r)
}

/// [`f16_stochastic`] by comparing the two neighbours (any finite `v`).
#[inline]
fn f16_stochastic_exact(v: f32, r: u16) -> u16 {
    let n = f16::from_f32(v);
    let nf = n.to_f32();
    if nf == v || !v.is_finite() || !nf.is_finite() {
        return n.to_bits();
    }
    let (lo, hi) = if nf < v {
        (n.to_bits(), f16_next_up(n.to_bits()))
    } else {
        (f16_next_down(n.to_bits()), n.to_bits())
    };
    let (lof, hif) = (f16::from_bits(lo).to_f32(), f16::from_bits(hi).to_f32());
    if !hif.is_finite() || !lof.is_finite() {
        return n.to_bits();
    }
    let p = (v - lof) / (hif - lof);
    let u = (f32::from(r) + 0.5) * (1.0 / 65536.0);
    if u < p {
        hi
    } else {
        lo
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_of_the_compact_row() {
        // dim 18, f16, row-wise Adagrad (1 state value): 4 + 1 + 9 words.
        let l = RowLayout::new(18, 1, WeightPrecision::F16);
        assert_eq!(l.bytes(), 56);
        // Odd dims pad the last half word.
        assert_eq!(RowLayout::new(3, 0, WeightPrecision::Bf16).words, 4 + 2);
        assert_eq!(
            RowLayout::new(18, 18, WeightPrecision::F32).bytes(),
            4 * (4 + 36)
        );
    }

    #[test]
    fn values_round_trip_exactly_at_each_precision() {
        for p in [
            WeightPrecision::F32,
            WeightPrecision::F16,
            WeightPrecision::Bf16,
        ] {
            let l = RowLayout::new(5, 2, p);
            let mut row = vec![0u32; l.words];
            let mut vals = vec![0.125f32, -3.5, 1e-3, 7.0, -0.0, 11.0, -2.0];
            p.round_nearest(&mut vals[..5]);
            l.write_values(&mut row, &vals);
            let mut back = Vec::new();
            l.read_values(&row, &mut back);
            assert_eq!(back, vals, "{p:?}");
        }
    }

    /// The mean of many stochastic roundings of v is v (and nearest rounding
    /// would lose the update entirely).
    #[test]
    fn stochastic_rounding_is_unbiased_where_nearest_loses_the_update() {
        let w = 0.01f32;
        let step = 1e-6f32; // far below half an f16 ulp at 0.01 (~4.9e-6)
        let v = w - step;
        assert_eq!(f16::from_f32(v), f16::from_f32(w), "nearest loses the step");
        let n = 200_000u32;
        let mut sum_f16 = 0f64;
        let mut sum_bf16 = 0f64;
        for i in 0..n {
            let r = (splitmix64(u64::from(i)) >> 7) as u16;
            sum_f16 += f64::from(f16::from_bits(f16_stochastic(v, r)).to_f32());
            sum_bf16 += f64::from(bf16::from_bits(bf16_stochastic(v, r)).to_f32());
        }
        let (m16, mb16) = (sum_f16 / f64::from(n), sum_bf16 / f64::from(n));
        assert!((m16 - f64::from(v)).abs() < 2e-8, "f16 mean {m16} vs {v}");
        assert!(
            (mb16 - f64::from(v)).abs() < 2e-7,
            "bf16 mean {mb16} vs {v}"
        );
        // Every result is one of the two neighbours (the f16 ulp at 0.01 is 2^-17).
        let ulp = 2f32.powi(-17);
        for r in [0u16, 1, 0x7FFF, 0xFFFF] {
            let h = f16::from_bits(f16_stochastic(v, r)).to_f32();
            assert!((h - v).abs() < ulp, "{h} vs {v}");
        }
    }

    #[test]
    fn stochastic_rounding_handles_signs_zero_and_range_edges() {
        for r in [0u16, 0x8000, 0xFFFF] {
            for v in [
                0.0f32,
                -0.0,
                1.0,
                -1.0,
                65504.0,
                1e-8,
                -1e-8,
                70000.0,
                f32::INFINITY,
            ] {
                let h = f16::from_bits(f16_stochastic(v, r)).to_f32();
                if v.abs() <= 65504.0 {
                    assert!((h - v).abs() <= 1e-3 * v.abs().max(1e-4), "{v} -> {h}");
                } else {
                    assert_eq!(h, f16::from_f32(v).to_f32());
                }
                let b = bf16::from_bits(bf16_stochastic(v, r)).to_f32();
                assert!(b.is_infinite() == v.is_infinite(), "{v} -> {b}");
            }
        }
        assert!(f32::from(f16::from_bits(f16_stochastic(f32::NAN, 3))).is_nan());
    }

    /// The bit-arithmetic path rounds up with probability exactly the
    /// dropped fraction: over all 2^13 values of the random bits, `hi` comes
    /// out exactly `dropped` times, and the results are the neighbours the
    /// exact path picks between.
    #[test]
    fn fast_f16_stochastic_rounding_matches_the_exact_probabilities() {
        let mut seed = 7u64;
        for k in 0..300 {
            seed = splitmix64(seed);
            // |v| across the normal range, both signs, plus hand-picked edges.
            let e = (seed % 30) as i32 - 14;
            let m = 1.0 + (seed >> 40) as f32 / (1u64 << 24) as f32;
            let mut v = m * 2f32.powi(e);
            if k % 2 == 1 {
                v = -v;
            }
            if k == 0 {
                v = 2f32.powi(-14);
            }
            if k == 1 {
                v = 65503.0;
            }
            let dropped = v.to_bits() & 0x1FFF;
            let nearest = f16::from_f32(v);
            let mut ups = 0u32;
            let mut seen = std::collections::BTreeSet::new();
            for r in 0..0x2000u16 {
                let h = f16_stochastic(v, r);
                seen.insert(h);
                let slow: std::collections::BTreeSet<u16> = [0u16, 0x1FFF, 0xFFFF]
                    .iter()
                    .map(|&x| f16_stochastic_exact(v, x))
                    .collect();
                assert!(
                    slow.contains(&h) || h == nearest.to_bits(),
                    "{v}: {h:#x} not in {slow:?}"
                );
                if f16::from_bits(h).to_f32().abs() > v.abs() {
                    ups += 1;
                }
            }
            assert!(seen.len() <= 2, "{v}: {seen:?}");
            assert_eq!(
                ups, dropped,
                "{v}: rounded up {ups} times of 8192, dropped bits {dropped}"
            );
        }
    }

    #[test]
    fn unknown_precision_is_named() {
        let e = WeightPrecision::from_proto(7).unwrap_err();
        assert!(e.to_string().contains("unknown precision 7"), "{e}");
    }
}
