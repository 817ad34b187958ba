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
//! A **compact moment** (`moment_precision` f16 or bf16, row-wise Adam only)
//! stores the first `dim` state values (Adam's per-coordinate first moment
//! `m`) as 16-bit halves after the remaining f32 state values (`v`, β1^t,
//! β2^t), stochastically rounded like the weights (with their own random
//! bits): dim 18, f16 weights and f16 `m` is 4 + 3 + 9 + 9 = 25 words =
//! 100 bytes instead of 136. Checkpoints and tools still exchange the state
//! as f32 in the optimizer's order (`m`, then the scalars).
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
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
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

    /// Rounds every value to the nearest representable one, in place
    /// (through `half`'s slice conversions, 8 values at a time).
    pub fn round_nearest(self, v: &mut [f32]) {
        let mut tmp = [0u16; 8];
        for c in v.chunks_mut(8) {
            let t = &mut tmp[..c.len()];
            match self {
                Self::F32 => return,
                Self::F16 => {
                    let h: &mut [f16] = t.reinterpret_cast_mut();
                    h.convert_from_f32_slice(c);
                    h.convert_to_f32_slice(c);
                }
                Self::Bf16 => {
                    let h: &mut [bf16] = t.reinterpret_cast_mut();
                    h.convert_from_f32_slice(c);
                    h.convert_to_f32_slice(c);
                }
            }
        }
    }
}

/// Where the parts of a row lie, in words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowLayout {
    /// Embedding width.
    pub dim: usize,
    /// Optimizer-state values (as exchanged: f32, in the optimizer's order).
    pub state: usize,
    /// Weight precision.
    pub precision: WeightPrecision,
    /// Storage precision of the first `dim` state values (F32: stored with
    /// the rest of the state).
    pub moment: WeightPrecision,
    /// Words of stored optimizer state.
    pub state_words: usize,
    /// Words per row.
    pub words: usize,
}

/// Seed mix that gives a compact moment other random bits than the weights.
const MOMENT_NOISE: u64 = 0x6D6F_6D65_6E74; // "moment"

impl RowLayout {
    /// The layout of a row of `dim` weights and `state` f32 state values.
    pub fn new(dim: usize, state: usize, precision: WeightPrecision) -> Self {
        let weight_words = (dim * precision.bytes()).div_ceil(4);
        RowLayout {
            dim,
            state,
            precision,
            moment: WeightPrecision::F32,
            state_words: state,
            words: HEADER_WORDS + state + weight_words,
        }
    }

    /// This layout with its first `dim` state values (a per-coordinate
    /// moment) stored at `moment` precision. The state must hold at least
    /// `dim` values (row-wise Adam's `m` then its scalars).
    pub fn with_moment(self, moment: WeightPrecision) -> Self {
        if moment == WeightPrecision::F32 || self.state < self.dim {
            return RowLayout {
                moment: WeightPrecision::F32,
                ..RowLayout::new(self.dim, self.state, self.precision)
            };
        }
        let state_words = self.state - self.dim + (self.dim * moment.bytes()).div_ceil(4);
        let weight_words = (self.dim * self.precision.bytes()).div_ceil(4);
        RowLayout {
            moment,
            state_words,
            words: HEADER_WORDS + state_words + weight_words,
            ..self
        }
    }

    /// Whether the stored state is plain f32 ([`Self::state`] applies).
    #[inline]
    pub fn state_is_f32(&self) -> bool {
        self.moment == WeightPrecision::F32
    }

    /// Bytes per row in the arena.
    pub fn bytes(&self) -> usize {
        self.words * 4
    }

    /// First word of the weights.
    #[inline]
    pub fn weights_at(&self) -> usize {
        HEADER_WORDS + self.state_words
    }

    /// Decodes the stored optimizer state of `row` into `out` (`state`
    /// values, the optimizer's order).
    #[inline]
    pub fn read_state(&self, row: &[u32], out: &mut [f32]) {
        let out = &mut out[..self.state];
        if self.state_is_f32() {
            out.copy_from_slice(self.state(row));
            return;
        }
        let scalars = self.state - self.dim;
        let (m, rest) = out.split_at_mut(self.dim);
        rest.copy_from_slice(bytemuck::cast_slice(
            &row[HEADER_WORDS..HEADER_WORDS + scalars],
        ));
        decode_halves(self.moment, &row[HEADER_WORDS + scalars..], m);
    }

    /// Encodes `vals` (`state` values) into the stored state of `row`; a
    /// compact moment is rounded to nearest (`noise = None`) or
    /// stochastically with the seed of the row's update.
    #[inline]
    pub fn write_state(&self, row: &mut [u32], vals: &[f32], noise: Option<u64>) {
        let vals = &vals[..self.state];
        if self.state_is_f32() {
            self.state_mut(row).copy_from_slice(vals);
            return;
        }
        let scalars = self.state - self.dim;
        let (m, rest) = vals.split_at(self.dim);
        bytemuck::cast_slice_mut(&mut row[HEADER_WORDS..HEADER_WORDS + scalars])
            .copy_from_slice(rest);
        encode_halves(
            self.moment,
            &mut row[HEADER_WORDS + scalars..],
            m,
            noise.map(|s| s ^ MOMENT_NOISE),
        );
    }

    /// Decodes the weights of `row` into `out` (`dim` values).
    ///
    /// f16 decodes a whole row with `half`'s slice conversion (F16C, 8
    /// values per instruction, when the CPU has it), not value by value.
    #[inline]
    pub fn read_weights(&self, row: &[u32], out: &mut [f32]) {
        decode_halves(
            self.precision,
            &row[self.weights_at()..],
            &mut out[..self.dim],
        );
    }

    /// Encodes `vals` (`dim` values) into the weights of `row`, rounding to
    /// nearest (`noise = None`) or stochastically with the given seed.
    ///
    /// The random bits are [`encode_halves`]'s, so the rounding of a row is
    /// a function of the seed.
    #[inline]
    pub fn write_weights(&self, row: &mut [u32], vals: &[f32], noise: Option<u64>) {
        let at = self.weights_at();
        encode_halves(self.precision, &mut row[at..], &vals[..self.dim], noise);
    }

    /// The f32 optimizer state of `row` (a plain-f32 state only, see
    /// [`Self::state_is_f32`]; [`Self::read_state`] decodes any).
    #[inline]
    pub fn state<'a>(&self, row: &'a [u32]) -> &'a [f32] {
        debug_assert!(self.state_is_f32());
        bytemuck::cast_slice(&row[HEADER_WORDS..HEADER_WORDS + self.state])
    }

    /// The f32 optimizer state of `row`, mutable (a plain-f32 state only).
    #[inline]
    pub fn state_mut<'a>(&self, row: &'a mut [u32]) -> &'a mut [f32] {
        debug_assert!(self.state_is_f32());
        bytemuck::cast_slice_mut(&mut row[HEADER_WORDS..HEADER_WORDS + self.state])
    }

    /// State and weights of `row` as mutable f32 slices (f32 weights and a
    /// plain-f32 state only).
    #[inline]
    pub fn split_f32_mut<'a>(&self, row: &'a mut [u32]) -> (&'a mut [f32], &'a mut [f32]) {
        debug_assert!(self.state_is_f32() && self.precision == WeightPrecision::F32);
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
        self.read_state(row, s);
    }

    /// Encodes `vals` (weights then state) into `row`, weights (and a compact
    /// moment) rounded to nearest.
    pub fn write_values(&self, row: &mut [u32], vals: &[f32]) {
        let (w, s) = vals.split_at(self.dim);
        self.write_weights(row, w, None);
        self.write_state(row, s, None);
    }
}

/// Decodes `out.len()` values of precision `p` from the words `w` (f32: one
/// value per word; f16/bf16: two per word, through `half`'s slice
/// conversion, 8 values per instruction with F16C).
#[inline]
fn decode_halves(p: WeightPrecision, w: &[u32], out: &mut [f32]) {
    let n = out.len();
    match p {
        WeightPrecision::F32 => {
            for (o, &b) in out.iter_mut().zip(w) {
                *o = f32::from_bits(b);
            }
        }
        WeightPrecision::F16 => {
            let h: &[f16] = halves(w, n).reinterpret_cast();
            h.convert_to_f32_slice(out);
        }
        WeightPrecision::Bf16 => {
            let h: &[bf16] = halves(w, n).reinterpret_cast();
            h.convert_to_f32_slice(out);
        }
    }
}

/// Encodes `vals` at precision `p` into the words `w`, rounding to nearest
/// (`noise = None`) or stochastically with the given seed.
///
/// Stochastic rounding draws one 64-bit word per block of 4 values
/// (block `j` takes `splitmix64(seed + (j + 1) * φ)`, value `i` its bits
/// `16 (i % 4)..`), so the rounding is a function of the seed.
#[inline]
fn encode_halves(p: WeightPrecision, w: &mut [u32], vals: &[f32], noise: Option<u64>) {
    let dim = vals.len();
    match (p, noise) {
        (WeightPrecision::F32, _) => {
            for (b, &v) in w.iter_mut().zip(vals) {
                *b = v.to_bits();
            }
        }
        (WeightPrecision::F16, None) => {
            let h: &mut [f16] = halves_mut(w, dim).reinterpret_cast_mut();
            h.convert_from_f32_slice(vals);
        }
        (WeightPrecision::Bf16, None) => {
            let h: &mut [bf16] = halves_mut(w, dim).reinterpret_cast_mut();
            h.convert_from_f32_slice(vals);
        }
        (WeightPrecision::F16, Some(seed)) => {
            f16_stochastic_slice(halves_mut(w, dim), vals, seed);
        }
        (WeightPrecision::Bf16, Some(seed)) => {
            let mut rng = SplitMix64::new(seed.wrapping_add(GOLDEN_GAMMA));
            let hs = halves_mut(w, dim);
            for (hb, vb) in hs.chunks_mut(4).zip(vals.chunks(4)) {
                let bits = rng.next_u64();
                for (i, (h, &v)) in hb.iter_mut().zip(vb).enumerate() {
                    *h = bf16_stochastic(v, (bits >> (i * 16)) as u16);
                }
            }
        }
    }
}

/// The stochastic-rounding seed of a row update.
#[inline]
pub fn noise_seed(table_seed: u64, id: u64, step: u64) -> u64 {
    splitmix64(table_seed ^ splitmix64(id ^ step.rotate_left(29)))
}

/// The first `dim` 16-bit halves of the words `w`: half `i` is the low
/// (even `i`) or high (odd `i`) half of word `i / 2`, which is the in-memory
/// order of a little-endian machine.
#[cfg(target_endian = "little")]
#[inline]
fn halves(w: &[u32], dim: usize) -> &[u16] {
    &bytemuck::cast_slice::<u32, u16>(w)[..dim]
}

/// [`halves`], mutable.
#[cfg(target_endian = "little")]
#[inline]
fn halves_mut(w: &mut [u32], dim: usize) -> &mut [u16] {
    &mut bytemuck::cast_slice_mut::<u32, u16>(w)[..dim]
}

#[cfg(not(target_endian = "little"))]
compile_error!("ember-ps stores 16-bit weights as little-endian halves of u32 words");

/// Values per pass of [`f16_stochastic_slice`].
const SR_CHUNK: usize = 64;

/// Stochastically rounds `v` into f16 bits `h` with the random stream of
/// `seed`: block `j` of 4 values takes `splitmix64(seed + (j + 1) * φ)` and
/// value `4 j + k` its bits `16 k..16 k + 16`, exactly as
/// [`f16_stochastic`] value by value. The normal-range path runs over a
/// whole chunk as lane arithmetic with no branch per value (the compiler
/// vectorises it); a chunk holding a value outside the f16 normal range
/// goes value by value.
///
/// On x86-64 CPUs with AVX2 the same code is compiled a second time for
/// AVX2 (8 lanes instead of SSE2's 4) and chosen at run time.
#[inline]
fn f16_stochastic_slice(h: &mut [u16], v: &[f32], seed: u64) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU was just found to support AVX2, the only
        // requirement of calling a function compiled for it.
        unsafe { f16_stochastic_slice_avx2(h, v, seed) };
        return;
    }
    f16_stochastic_slice_body(h, v, seed);
}

/// [`f16_stochastic_slice`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn f16_stochastic_slice_avx2(h: &mut [u16], v: &[f32], seed: u64) {
    f16_stochastic_slice_body(h, v, seed);
}

/// The body of [`f16_stochastic_slice`], inlined into each compiled copy.
#[inline(always)]
fn f16_stochastic_slice_body(h: &mut [u16], v: &[f32], seed: u64) {
    let mut rng = SplitMix64::new(seed.wrapping_add(GOLDEN_GAMMA));
    let mut r = [0u32; SR_CHUNK];
    let mut out = [0u32; SR_CHUNK];
    for (hc, vc) in h.chunks_mut(SR_CHUNK).zip(v.chunks(SR_CHUNK)) {
        let n = vc.len();
        for rb in r[..n.div_ceil(4) * 4].chunks_exact_mut(4) {
            let bits = rng.next_u64();
            rb[0] = bits as u32;
            rb[1] = (bits >> 16) as u32;
            rb[2] = (bits >> 32) as u32;
            rb[3] = (bits >> 48) as u32;
        }
        // Sign bits (as i32) mark a value below 2^-14, one not below 2^16,
        // or a rounding up into infinity.
        let mut bad = 0u32;
        for ((o, &x), &ri) in out[..n].iter_mut().zip(vc).zip(&r[..n]) {
            let b = x.to_bits();
            let abs = b & 0x7FFF_FFFF;
            let hv = ((abs + (ri & 0x1FFF)) >> 13).wrapping_sub(112 << 10);
            bad |= abs.wrapping_sub(F16_NORMAL_MIN)
                | !abs.wrapping_sub(F16_NORMAL_MIN + F16_NORMAL_SPAN)
                | !hv.wrapping_sub(0x7C00);
            *o = ((b >> 16) & 0x8000) | (hv & 0x7FFF);
        }
        if bad >> 31 == 0 {
            for (d, &o) in hc.iter_mut().zip(&out[..n]) {
                *d = o as u16;
            }
        } else {
            for ((d, &x), &ri) in hc.iter_mut().zip(vc).zip(&r[..n]) {
                *d = f16_stochastic(x, ri as u16);
            }
        }
    }
}

/// f32 bits of 2^-14, the smallest f16 normal.
const F16_NORMAL_MIN: u32 = 0x3880_0000;
/// f32 bits from 2^-14 up to 2^16 (exclusive), past the largest f16.
const F16_NORMAL_SPAN: u32 = 0x4780_0000 - F16_NORMAL_MIN;

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
    if abs.wrapping_sub(F16_NORMAL_MIN) < F16_NORMAL_SPAN {
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

    /// A compact moment: dim 18 row-wise Adam (21 state values) with f16
    /// weights and f16 `m` is 4 + 3 + 9 + 9 words; the state decodes in the
    /// optimizer's order (m, then the f32 scalars, exactly), and a
    /// stochastically rounded `m` is unbiased where nearest loses a small
    /// change. `with_moment` leaves a state shorter than `dim` as f32.
    #[test]
    fn a_compact_moment_is_stored_in_halves_and_decodes_in_order() {
        let l = RowLayout::new(18, 21, WeightPrecision::F16).with_moment(WeightPrecision::F16);
        assert_eq!((l.state_words, l.words, l.bytes()), (12, 25, 100));
        assert!(!l.state_is_f32());
        assert_eq!(
            RowLayout::new(18, 1, WeightPrecision::F16)
                .with_moment(WeightPrecision::F16)
                .bytes(),
            56
        );
        let mut row = vec![0u32; l.words];
        let mut vals: Vec<f32> = (0..18 + 21).map(|i| (i as f32 - 9.0) * 0.013).collect();
        WeightPrecision::F16.round_nearest(&mut vals[..36]);
        vals[36] = 1e-7; // v, below any f16 resolution: must stay exact
        vals[37] = 0.9f32.powi(3);
        vals[38] = 0.999f32.powi(3);
        l.write_values(&mut row, &vals);
        let mut back = Vec::new();
        l.read_values(&row, &mut back);
        assert_eq!(back, vals);
        // m = 0.01 + 1e-6 (~0.2 f16 ulp) rounded stochastically 4000 times.
        let mut state = vec![0.0f32; 21];
        let mut sum = 0f64;
        for seed in 0..4000u64 {
            state[..18].fill(0.01 + 1e-6);
            l.write_state(&mut row, &state, Some(splitmix64(seed)));
            let mut out = vec![0.0f32; 21];
            l.read_state(&row, &mut out);
            sum += f64::from(out[0]);
        }
        let mean = sum / 4000.0;
        assert!((mean - (0.01 + 1e-6)).abs() < 2e-7, "{mean}");
        l.write_state(&mut row, &state, None);
        let mut out = vec![0.0f32; 21];
        l.read_state(&row, &mut out);
        assert_eq!(
            out[0],
            f16::from_f32(0.01).to_f32(),
            "nearest loses the 1e-6"
        );
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

    /// The slice path equals the value-by-value path bit for bit, for
    /// values inside and outside the f16 normal range, and a row written
    /// with noise decodes to its values within one f16 ulp.
    #[test]
    fn block_stochastic_rounding_equals_the_scalar_path() {
        let mut rng = SplitMix64::new(9);
        let specials = [
            0.0f32,
            -0.0,
            1e-6,
            -3e-5,
            6.1e-5,
            65504.0,
            7e4,
            -1e9,
            f32::NAN,
        ];
        for round in 0..20_000 {
            let bits = rng.next_u64();
            let mut v = [0f32; 4];
            for (i, x) in v.iter_mut().enumerate() {
                let u = rng.next_u64();
                *x = if round % 7 == 0 && i == 1 {
                    specials[(u % specials.len() as u64) as usize]
                } else {
                    // Log-uniform magnitudes from 2^-20 to 2^4, random sign.
                    let e = (u % 24) as i32 - 20;
                    let m = 1.0 + ((u >> 8) % 1024) as f32 / 1024.0;
                    let s = if u >> 63 == 1 { -1.0 } else { 1.0 };
                    s * m * 2f32.powi(e)
                };
            }
            for n in 1..=4 {
                let mut got = [0u16; 4];
                let mut rng2 = SplitMix64::new(bits.wrapping_add(GOLDEN_GAMMA));
                let stream = rng2.next_u64();
                f16_stochastic_slice(&mut got[..n], &v[..n], bits);
                for i in 0..n {
                    let want = f16_stochastic(v[i], (stream >> (i * 16)) as u16);
                    assert_eq!(got[i], want, "value {} (block of {n})", v[i]);
                }
            }
        }
        // Longer than one chunk, across the chunk boundary.
        let v: Vec<f32> = (0..150).map(|i| (i as f32 - 75.0) * 1e-3 + 1e-7).collect();
        let mut got = vec![0u16; 150];
        f16_stochastic_slice(&mut got, &v, 5);
        let mut rng2 = SplitMix64::new(5u64.wrapping_add(GOLDEN_GAMMA));
        let mut bits = 0;
        for (i, (&g, &x)) in got.iter().zip(&v).enumerate() {
            if i % 4 == 0 {
                bits = rng2.next_u64();
            }
            assert_eq!(
                g,
                f16_stochastic(x, (bits >> ((i % 4) * 16)) as u16),
                "value {i}"
            );
        }
        let l = RowLayout::new(7, 1, WeightPrecision::F16);
        let mut row = vec![0u32; l.words];
        let vals = [0.01f32, -0.02, 0.3, 1e-6, -4.0, 0.125, 0.0777];
        l.write_weights(&mut row, &vals, Some(17));
        let mut back = [0f32; 7];
        l.read_weights(&row, &mut back);
        for (b, v) in back.iter().zip(&vals) {
            // An f16 ulp: 2^-10 of the magnitude, 2^-24 among subnormals.
            let ulp = (v.abs() * 2f32.powi(-10)).max(2f32.powi(-24));
            assert!((b - v).abs() <= ulp, "{b} vs {v}");
        }
        // The odd dim's padding half is left as it was.
        assert_eq!(row[l.words - 1] >> 16, 0);
    }

    #[test]
    fn unknown_precision_is_named() {
        let e = WeightPrecision::from_proto(7).unwrap_err();
        assert!(e.to_string().contains("unknown precision 7"), "{e}");
    }
}
