//! Small CPU helpers shared by the fused kernels: a float trait over `f32` /
//! `f64`, storage access, and matrix products (f32 on one thread through
//! [`super::skinny_gemm`], the rest through candle's gemm).

use candle_core::{CpuStorage, DType, Device, Layout, Result, Tensor, WithDType};
use std::any::Any;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub};
use std::sync::{Mutex, MutexGuard};

/// What a fused op's forward pass keeps for its backward pass (its
/// intermediate results, in the float type the op ran in): the one cache
/// scaffolding of the fused kernels.
#[derive(Default)]
pub(crate) struct SavedForward(Mutex<Option<Box<dyn Any + Send + Sync>>>);

/// The locked content of a [`SavedForward`].
pub(crate) type Saved<'a> = MutexGuard<'a, Option<Box<dyn Any + Send + Sync>>>;

impl SavedForward {
    /// Keeps `v` for the next backward pass (replacing an older one).
    pub(crate) fn save<T: Any + Send + Sync>(&self, v: T) {
        *self.lock() = Some(Box::new(v));
    }

    /// The saved value; lock it, then [`SavedForward::get`] it.
    pub(crate) fn lock(&self) -> Saved<'_> {
        // Every write is one assignment: a panic elsewhere leaves it usable.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The value of type `T` in `saved`; an error naming `op` when the
    /// forward pass did not run (or ran in another float type).
    pub(crate) fn get<'a, T: Any>(saved: &'a Saved<'_>, op: &str) -> Result<&'a T> {
        saved
            .as_ref()
            .and_then(|c| c.downcast_ref::<T>())
            .ok_or_else(|| candle_core::Error::Msg(format!("{op}: backward without forward cache")))
    }
}

/// The float types the fused kernels run in.
pub trait Real:
    WithDType
    + Copy
    + Default
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + MulAssign
{
    /// `e^x`.
    fn exp_(self) -> Self;
    /// `tanh(x)`.
    fn tanh_(self) -> Self;
    /// 0.
    fn zero_() -> Self {
        Self::from_f64(0.0)
    }
    /// 1.
    fn one_() -> Self {
        Self::from_f64(1.0)
    }
    /// Logistic sigmoid.
    fn sigmoid(self) -> Self {
        Self::one_() / (Self::one_() + (-self).exp_())
    }
    /// `v = sigmoid(v)` element-wise (f32: vectorized, see [`sigmoid_f32s`]).
    fn sigmoid_in_place(v: &mut [Self]) {
        for x in v.iter_mut() {
            *x = x.sigmoid();
        }
    }
    /// `v = tanh(v)` element-wise (f32: vectorized, see [`tanh_f32s`]).
    fn tanh_in_place(v: &mut [Self]) {
        for x in v.iter_mut() {
            *x = x.tanh_();
        }
    }
    /// `op(A) op(B)` by a kernel of this type's own, or None to use `gemm`
    /// (f32 with AVX2 + FMA: [`super::skinny_gemm`]). Arguments as [`mm`].
    fn mm_skinny(
        a: &[Self],
        ta: bool,
        b: &[Self],
        tb: bool,
        m: usize,
        k: usize,
        n: usize,
    ) -> Option<Vec<Self>> {
        let _ = (a, ta, b, tb, m, k, n);
        None
    }
}

impl Real for f32 {
    #[inline(always)]
    fn exp_(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn tanh_(self) -> Self {
        tanh_f32(self)
    }
    fn mm_skinny(
        a: &[Self],
        ta: bool,
        b: &[Self],
        tb: bool,
        m: usize,
        k: usize,
        n: usize,
    ) -> Option<Vec<Self>> {
        super::skinny_gemm::mm_f32(a, ta, b, tb, m, k, n)
    }
    fn sigmoid_in_place(v: &mut [Self]) {
        sigmoid_f32s(v)
    }
    fn tanh_in_place(v: &mut [Self]) {
        tanh_f32s(v)
    }
}

/// Whether this CPU has AVX2 and FMA (the `_avx2` builds below may run).
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// `v = sigmoid(v)` over an f32 slice with [`exp_f32`]: one plain loop the
/// compiler vectorizes, built for AVX2 + FMA when the CPU has them (checked
/// at run time; the baseline x86-64 build only has SSE2).
pub fn sigmoid_f32s(v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU supports the features the function is built for.
        return unsafe { sigmoid_f32s_avx2(v) };
    }
    sigmoid_f32s_plain(v)
}

/// `v = tanh(v)` over an f32 slice with [`tanh_f32`] (vectorized like
/// [`sigmoid_f32s`]).
pub fn tanh_f32s(v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU supports the features the function is built for.
        return unsafe { tanh_f32s_avx2(v) };
    }
    tanh_f32s_plain(v)
}

#[inline(always)]
fn sigmoid_f32s_plain(v: &mut [f32]) {
    for x in v.iter_mut() {
        *x = 1.0 / (1.0 + exp_f32(-*x));
    }
}

#[inline(always)]
fn tanh_f32s_plain(v: &mut [f32]) {
    for x in v.iter_mut() {
        *x = tanh_f32(*x);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sigmoid_f32s_avx2(v: &mut [f32]) {
    sigmoid_f32s_plain(v)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tanh_f32s_avx2(v: &mut [f32]) {
    tanh_f32s_plain(v)
}

/// `e^x` in f32 without a libm call, so that the fused kernels' loops over
/// slices vectorize: `x = n ln2 + r` with `n = round(x / ln2)` and
/// `|r| <= ln2 / 2`, `e^r` by its Taylor polynomial to degree 7 (truncation
/// error below 1e-8 relative), times `2^n` built in the exponent bits.
/// `x` is clamped to `[-87, 88]` first, so the result stays a normal float
/// (`e^-87 = 1.6e-38`, `e^88 = 1.7e38`); NaN stays NaN. Within 2 ulp of
/// libm's `expf` on that range (test `fast_f32_exp_and_tanh_match_libm`).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in a part exact in few bits and the rest (Cody-Waite).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    // Compare-and-select (not `clamp`, whose NaN checks do not vectorize).
    #[allow(clippy::manual_clamp)]
    let x = if x < -87.0 {
        -87.0
    } else if x > 88.0 {
        88.0
    } else {
        x
    };
    // `t`'s low mantissa bits hold the integer `n` (no float-to-int cast).
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // n is an integer in [-126, 127]: 2^n has the biased exponent n + 127.
    let bits = t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127);
    let scale = f32::from_bits(bits << 23);
    p * scale
}

/// `tanh(x)` in f32 without a libm call (vectorizes like [`exp_f32`]):
/// `(1 - e) / (1 + e)` with `e = e^{-2|x|}` and the sign of `x`; below
/// `|x| < 1/8`, where that quotient loses bits to cancellation, the Taylor
/// series `x - x^3/3 + 2x^5/15 - 17x^7/315` (error below 2e-9 relative).
#[inline(always)]
pub fn tanh_f32(x: f32) -> f32 {
    let ax = x.abs();
    let e = exp_f32(-2.0 * ax);
    let big = ((1.0 - e) / (1.0 + e)).copysign(x);
    let x2 = x * x;
    let small = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))));
    if ax < 0.125 {
        small
    } else {
        big
    }
}

impl Real for f64 {
    fn exp_(self) -> Self {
        self.exp()
    }
    fn tanh_(self) -> Self {
        self.tanh()
    }
}

/// Whether the fused kernels can run on `t` (CPU, f32 or f64).
pub fn cpu_real(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu) && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// The contiguous data of a storage as a slice of `T`.
pub fn slice<'a, T: Real>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("fused kernel: non-contiguous input"),
    }
}

/// Flat values of a tensor.
pub fn values<T: Real>(t: &Tensor) -> Result<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

/// A CPU tensor of shape `shape` from `v`.
pub fn tensor<T: Real>(v: Vec<T>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// `op(A) op(B)` straight on the slices, where `A` is `[m, k]` (or `[k, m]`
/// with `ta`) and `B` is `[k, n]` (or `[n, k]` with `tb`). Returns `[m, n]`
/// row-major. f32 with AVX2 + FMA on one thread, at least 8 columns and not
/// `A^T B^T`: [`super::skinny_gemm`]; otherwise [`mm_gemm`].
#[allow(clippy::too_many_arguments)]
pub fn mm<T: Real>(
    a: &[T],
    ta: bool,
    b: &[T],
    tb: bool,
    m: usize,
    k: usize,
    n: usize,
) -> Result<Vec<T>> {
    check_operands(a.len(), b.len(), m, k, n)?;
    let threads = candle_core::utils::get_num_threads();
    // One thread and at least a vector of columns: the skinny kernel
    // (f32 with AVX2 + FMA; ~2x gemm on the fused kernels' shapes).
    if threads <= 1 && n >= 8 {
        if let Some(c) = T::mm_skinny(a, ta, b, tb, m, k, n) {
            return Ok(c);
        }
    }
    gemm_product(a, ta, b, tb, m, k, n, threads)
}

/// [`mm`] through the `gemm` crate only (candle's own kernel), with rayon
/// when candle uses more than one thread: the reference the skinny kernel
/// is tested and measured against.
#[allow(clippy::too_many_arguments)]
pub fn mm_gemm<T: Real>(
    a: &[T],
    ta: bool,
    b: &[T],
    tb: bool,
    m: usize,
    k: usize,
    n: usize,
) -> Result<Vec<T>> {
    check_operands(a.len(), b.len(), m, k, n)?;
    gemm_product(a, ta, b, tb, m, k, n, candle_core::utils::get_num_threads())
}

/// An error unless the operands hold `[m, k]` and `[k, n]` values.
fn check_operands(a: usize, b: usize, m: usize, k: usize, n: usize) -> Result<()> {
    if a != m * k || b != k * n {
        candle_core::bail!("mm: operands of {a} and {b} values for [{m}, {k}] x [{k}, {n}]");
    }
    Ok(())
}

/// The gemm call of [`mm_gemm`], operands checked.
#[allow(clippy::too_many_arguments)]
fn gemm_product<T: Real>(
    a: &[T],
    ta: bool,
    b: &[T],
    tb: bool,
    m: usize,
    k: usize,
    n: usize,
    threads: usize,
) -> Result<Vec<T>> {
    let len = m * n;
    if m == 0 || n == 0 || k == 0 {
        return Ok(vec![T::zero_(); len]);
    }
    // Not zero-filled first: gemm writes every element (`read_dst = false`),
    // and the fill was 2-3% of a DIN step.
    let mut c: Vec<T> = Vec::with_capacity(len);
    // Strides (column, row) of op(A) [m, k] and op(B) [k, n] in their slices.
    let (a_cs, a_rs) = if ta { (m, 1) } else { (1, k) };
    let (b_cs, b_rs) = if tb { (k, 1) } else { (1, n) };
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: `T` is f32 or f64 (the only `Real` types), which `gemm`
    // supports; `a` holds m*k and `b` k*n values (checked above) and every
    // index the strides address is inside them; `c` has capacity for m*n
    // values, which gemm writes row-major (column stride 1, row stride n)
    // without reading them (`read_dst = false`: alpha is zero, and every
    // path of gemm 0.19 then stores `beta * A B` or zero before any
    // accumulation, k > 0 here), so all m*n are initialised before
    // `set_len`; no slice aliases another.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            T::zero_(),
            T::one_(),
            false,
            false,
            false,
            par,
        );
        c.set_len(len);
    }
    Ok(c)
}

/// Column sums of a row-major `[rows, cols]` matrix.
pub fn col_sums<T: Real>(x: &[T], cols: usize) -> Vec<T> {
    let mut s = vec![T::zero_(); cols];
    for row in x.chunks_exact(cols) {
        for (a, &v) in s.iter_mut().zip(row) {
            *a += v;
        }
    }
    s
}

/// Dispatches a generic kernel on the dtype of `t` (F32 or F64).
#[macro_export]
#[doc(hidden)]
macro_rules! dispatch_real {
    ($dtype:expr, $f:ident ( $($arg:expr),* )) => {
        match $dtype {
            candle_core::DType::F32 => $f::<f32>($($arg),*),
            candle_core::DType::F64 => $f::<f64>($($arg),*),
            d => candle_core::bail!("fused kernel: unsupported dtype {d:?}"),
        }
    };
}

#[cfg(test)]
mod tests {
    use super::{exp_f32, mm, tanh_f32};

    /// `mm` (gemm into an output that is not zero-filled first) against a
    /// plain triple loop, for every transpose and the shapes of gemm's
    /// separate paths: m = 1 or n = 1 (gemv), m*n <= 256 (small kernel),
    /// large; k = 0 gives zeros. Before each call a buffer of the output's
    /// size is filled with NaN and freed, so that a value gemm failed to
    /// write would likely show as NaN.
    #[test]
    fn mm_writes_every_element_of_op_a_times_op_b() {
        let shapes = [
            (1, 7, 5),
            (6, 9, 1),
            (1, 1, 1),
            (5, 3, 4),
            (16, 16, 16),
            (37, 36, 108),
            (129, 72, 100),
            (4, 0, 3),
        ];
        for &(m, k, n) in &shapes {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let a: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0)
                    .collect();
                let b: Vec<f32> = (0..k * n)
                    .map(|i| ((i * 5 % 11) as f32 - 5.0) / 4.0)
                    .collect();
                let at = |i: usize, p: usize| if ta { a[p * m + i] } else { a[i * k + p] };
                let bt = |p: usize, j: usize| if tb { b[j * k + p] } else { b[p * n + j] };
                drop(std::hint::black_box(vec![f32::NAN; m * n]));
                let c = mm(&a, ta, &b, tb, m, k, n).unwrap();
                assert_eq!(c.len(), m * n);
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k).map(|p| at(i, p) as f64 * bt(p, j) as f64).sum();
                        let got = c[i * n + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                            "[{m},{k}]x[{k},{n}] ta {ta} tb {tb} at ({i},{j}): {got} vs {want}"
                        );
                    }
                }
            }
        }
        assert!(mm(&[1.0f32; 3], false, &[1.0f32; 4], false, 3, 1, 3).is_err());
    }

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    /// The vectorizable f32 `exp` and `tanh` of the fused kernels against
    /// libm over a dense sweep: `exp` within 2 ulp on [-87, 88], `tanh`
    /// within 4 ulp (2.5e-7 absolute); saturation and NaN as libm.
    #[test]
    fn fast_f32_exp_and_tanh_match_libm() {
        let (mut worst_exp, mut worst_tanh, mut worst_abs) = (0u32, 0u32, 0f32);
        let n = 400_000;
        for i in 0..=n {
            let x = -87.0 + 175.0 * i as f32 / n as f32;
            worst_exp = worst_exp.max(ulps(exp_f32(x), x.exp()));
            let y = -12.0 + 24.0 * i as f32 / n as f32;
            worst_tanh = worst_tanh.max(ulps(tanh_f32(y), y.tanh()));
            worst_abs = worst_abs.max((tanh_f32(y) - y.tanh()).abs());
        }
        // Near 0 (the Taylor branch and the switch at 1/8).
        for i in 0..=100_000 {
            let y = -0.25 + 0.5 * i as f32 / 100_000.0;
            worst_tanh = worst_tanh.max(ulps(tanh_f32(y), y.tanh()));
        }
        assert!(worst_exp <= 2, "exp: {worst_exp} ulp");
        assert!(worst_tanh <= 4, "tanh: {worst_tanh} ulp");
        assert!(worst_abs <= 2.5e-7, "tanh: {worst_abs} absolute");
        eprintln!("exp {worst_exp} ulp, tanh {worst_tanh} ulp / {worst_abs:e} absolute");
        assert_eq!(tanh_f32(0.0), 0.0);
        assert_eq!(tanh_f32(30.0), 1.0);
        assert_eq!(tanh_f32(-30.0), -1.0);
        assert_eq!(tanh_f32(f32::INFINITY), 1.0);
        assert!(exp_f32(f32::NAN).is_nan() && tanh_f32(f32::NAN).is_nan());
        assert!(exp_f32(-1000.0) > 0.0 && exp_f32(-1000.0) < 2e-38);
        assert!(exp_f32(1000.0).is_finite() && exp_f32(1000.0) > 1e38);
        assert_eq!(exp_f32(0.0), 1.0);
    }
}
