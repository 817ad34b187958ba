//! Small CPU helpers shared by the fused kernels: a float trait over `f32` /
//! `f64`, storage access, and matrix products through candle's gemm.

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
}

impl Real for f32 {
    fn exp_(self) -> Self {
        self.exp()
    }
    fn tanh_(self) -> Self {
        self.tanh()
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

/// `op(A) op(B)` through the `gemm` crate (candle's own kernel) straight on
/// the slices, where `A` is `[m, k]` (or `[k, m]` with `ta`) and `B` is
/// `[k, n]` (or `[n, k]` with `tb`). Returns `[m, n]` row-major. Threads as
/// candle's matmul: rayon when candle uses more than one thread.
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
    if a.len() != m * k || b.len() != k * n {
        candle_core::bail!(
            "mm: operands of {} and {} values for [{m}, {k}] x [{k}, {n}]",
            a.len(),
            b.len()
        );
    }
    let mut c = vec![T::zero_(); m * n];
    if m == 0 || n == 0 || k == 0 {
        return Ok(c);
    }
    // Strides (column, row) of op(A) [m, k] and op(B) [k, n] in their slices.
    let (a_cs, a_rs) = if ta { (m, 1) } else { (1, k) };
    let (b_cs, b_rs) = if tb { (k, 1) } else { (1, n) };
    let threads = candle_core::utils::get_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: `T` is f32 or f64 (the only `Real` types), which `gemm`
    // supports; `a` holds m*k and `b` k*n values (checked above) and every
    // index the strides address is inside them; `c` holds m*n values,
    // written row-major (column stride 1, row stride n) and not read
    // (`read_dst = false`); no slice aliases another.
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
