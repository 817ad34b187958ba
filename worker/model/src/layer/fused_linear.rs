//! Matrix product of rows by a weight on the fused kernels' `mm`:
//! `y = x W`, `x` `[N, in]`, `W` `[in, out]`, with the backward
//! `dx = dy W^T`, `dW = x^T dy` (the same three products candle's matmul and
//! its backward compute, through [`super::kernels::mm`], whose skinny f32
//! kernel is about twice `gemm` on these shapes: [`super::skinny_gemm`]).
//! Used by [`super::linear::Linear`] and the GRU's input projection.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::kernels::{cpu_real, mm, slice, tensor, values, Real};
use crate::dispatch_real;

/// `x W` for `x` `[N, in]` and `W` `[in, out]`: the op above on CPU (f32 /
/// f64), candle's matmul elsewhere (CUDA, other ranks).
pub fn matmul_rows(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if cpu_real(x) && x.dtype() == w.dtype() && x.rank() == 2 && w.rank() == 2 {
        x.contiguous()?.apply_op2(&w.contiguous()?, MatmulRows)
    } else {
        x.matmul(w)
    }
}

struct MatmulRows;

fn fwd<T: Real>(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (n, i) = l1.shape().dims2()?;
    let (wi, o) = l2.shape().dims2()?;
    if wi != i {
        candle_core::bail!("matmul_rows: x [{n}, {i}] times W [{wi}, {o}]");
    }
    let y = mm(
        slice::<T>(s1, l1)?,
        false,
        slice::<T>(s2, l2)?,
        false,
        n,
        i,
        o,
    )?;
    Ok((T::to_cpu_storage_owned(y), Shape::from((n, o))))
}

fn grads<T: Real>(x: &Tensor, w: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let (n, i) = x.dims2()?;
    let o = w.dim(1)?;
    let (xv, wv, g) = (values::<T>(x)?, values::<T>(w)?, values::<T>(dy)?);
    let dx = mm(&g, false, &wv, true, n, o, i)?;
    let dw = mm(&xv, true, &g, false, i, n, o)?;
    Ok((tensor(dx, &[n, i])?, tensor(dw, &[i, o])?))
}

impl CustomOp2 for MatmulRows {
    fn name(&self) -> &'static str {
        "matmul-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch_real!(s1.dtype(), fwd(s1, l1, s2, l2))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = dispatch_real!(grad.dtype(), grads(x, w, grad))?;
        Ok((Some(dx), Some(dw)))
    }
}

#[cfg(test)]
mod tests {
    use super::matmul_rows;
    use crate::layer::gradcheck;
    use candle_core::{DType, Device, Tensor, Var};

    fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// Values and both gradients equal candle's matmul (f32 and f64, shapes
    /// that take the skinny kernel and ones that fall back to gemm), under
    /// a loss that weights every output differently.
    #[test]
    fn matmul_rows_matches_candles_matmul() {
        let dev = Device::Cpu;
        for dt in [DType::F32, DType::F64] {
            for &(n, i, o) in &[(37, 5, 3), (300, 36, 100), (129, 100, 50), (1, 7, 9)] {
                let var = |s: (usize, usize)| {
                    Var::from_tensor(
                        &Tensor::randn(0f32, 1.0, s, &dev)
                            .unwrap()
                            .to_dtype(dt)
                            .unwrap(),
                    )
                    .unwrap()
                };
                let (x, w) = (var((n, i)), var((i, o)));
                let u = Tensor::randn(0f32, 1.0, (n, o), &dev)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap();
                let fused = matmul_rows(x.as_tensor(), w.as_tensor()).unwrap();
                let plain = x.as_tensor().matmul(w.as_tensor()).unwrap();
                let tol = if dt == DType::F32 { 1e-4 } else { 1e-12 };
                assert!(
                    max_abs(&fused, &plain) < tol,
                    "{dt:?} [{n}, {i}] x [{i}, {o}]: values differ"
                );
                let gf = (fused * &u).unwrap().sum_all().unwrap().backward().unwrap();
                let gp = (plain * &u).unwrap().sum_all().unwrap().backward().unwrap();
                for v in [&x, &w] {
                    let (a, c) = (
                        gf.get(v.as_tensor()).unwrap(),
                        gp.get(v.as_tensor()).unwrap(),
                    );
                    let d = max_abs(a, c);
                    assert!(
                        d < tol * 10.0,
                        "{dt:?} [{n}, {i}] x [{i}, {o}]: gradient differs by {d}"
                    );
                }
            }
        }
    }

    /// Both gradients against central finite differences (f64).
    #[test]
    fn matmul_rows_gradients_match_finite_differences() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (11, 9), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f64, 1.0, (9, 10), &dev).unwrap()).unwrap();
        let u = Tensor::randn(0f64, 1.0, (11, 10), &dev).unwrap();
        let vars = [("x".to_string(), x.clone()), ("w".to_string(), w.clone())];
        let loss = || {
            (matmul_rows(x.as_tensor(), w.as_tensor())? * &u)?
                .tanh()?
                .sum_all()
        };
        let rep = gradcheck::check(&vars, loss, 200, 1e-5, 1e-6).unwrap();
        gradcheck::assert_ok("matmul_rows", &rep);
    }
}
