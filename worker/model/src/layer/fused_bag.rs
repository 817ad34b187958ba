//! Fused embedding bag: masked sum or mean pooling of gathered rows without
//! the padded `[B, T, D]` intermediate (candle `CustomOp1` with a
//! hand-written backward; the composed reference is
//! `pooling::masked_sum` / `masked_mean` over `EmbeddingBlock::lookup`).
//!
//! For rows `R` `[U, D]`, per-position indices `idx` `[B*T]` (`U` = the zero
//! padding row) and valid lengths `len_b` (the first `len_b` steps of bag `b`
//! are valid, as the batch's left-aligned mask says):
//! - forward: `out_b = c_b * sum_{t < len_b, idx_bt < U} R[idx_bt]`, with
//!   `c_b = 1` (sum) or `1 / max(1, len_b)` (mean);
//! - backward: `dR[u] = sum_{(b, t): t < len_b, idx_bt = u} c_b * dout_b`.
//!
//! It reads only the valid steps' rows (about 65 of 100 on ML-100k) once,
//! where the composed path gathers, concatenates, masks and reduces the
//! whole padded tensor and scatters its gradient back.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::kernels::{slice, tensor, Real};
use crate::dispatch_real;

/// The pooling op of one batch's positions.
#[derive(Debug, Clone)]
pub struct EmbeddingBag {
    /// `[B*T]` row index per position (`U` = padding).
    pub idx: Vec<u32>,
    /// Valid steps per bag `[B]`.
    pub lens: Vec<usize>,
    /// Padded steps per bag T.
    pub t: usize,
    /// Mean (true) or sum pooling.
    pub mean: bool,
}

impl EmbeddingBag {
    /// Pools `rows` `[U, D]` into `[B, D]`.
    pub fn apply(self, rows: &Tensor) -> Result<Tensor> {
        if self.idx.len() != self.lens.len() * self.t {
            candle_core::bail!(
                "embedding bag: {} indices for {} bags of {} steps",
                self.idx.len(),
                self.lens.len(),
                self.t
            );
        }
        rows.apply_op1(self)
    }

    fn scale(&self, b: usize) -> f64 {
        if self.mean {
            1.0 / self.lens[b].max(1) as f64
        } else {
            1.0
        }
    }

    /// The valid steps of bag `b` that hit a real row (index < `u`).
    fn steps(&self, b: usize, u: usize) -> impl Iterator<Item = usize> + '_ {
        let len = self.lens[b].min(self.t);
        self.idx[b * self.t..b * self.t + len]
            .iter()
            .map(|&i| i as usize)
            .filter(move |&i| i < u)
    }

    fn fwd<T: Real>(&self, r: &[T], u: usize, d: usize) -> Vec<T> {
        let nb = self.lens.len();
        let mut out = vec![T::zero_(); nb * d];
        for b in 0..nb {
            let o = &mut out[b * d..(b + 1) * d];
            for i in self.steps(b, u) {
                for (x, &y) in o.iter_mut().zip(&r[i * d..(i + 1) * d]) {
                    *x += y;
                }
            }
            let c = T::from_f64(self.scale(b));
            o.iter_mut().for_each(|x| *x *= c);
        }
        out
    }

    fn bwd_t<T: Real>(&self, g: &[T], u: usize, d: usize) -> Vec<T> {
        let mut dr = vec![T::zero_(); u * d];
        for b in 0..self.lens.len() {
            let c = T::from_f64(self.scale(b));
            let gb = &g[b * d..(b + 1) * d];
            for i in self.steps(b, u) {
                for (x, &y) in dr[i * d..(i + 1) * d].iter_mut().zip(gb) {
                    *x += c * y;
                }
            }
        }
        dr
    }
}

fn run<T: Real>(op: &EmbeddingBag, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    let (u, d) = l.shape().dims2()?;
    let out = op.fwd(slice::<T>(s, l)?, u, d);
    Ok((
        T::to_cpu_storage_owned(out),
        Shape::from((op.lens.len(), d)),
    ))
}

fn grad<T: Real>(op: &EmbeddingBag, rows: &Tensor, g: &Tensor) -> Result<Tensor> {
    let (u, d) = rows.dims2()?;
    let gv = g.contiguous()?.flatten_all()?.to_vec1::<T>()?;
    tensor(op.bwd_t(&gv, u, d), &[u, d])
}

impl CustomOp1 for EmbeddingBag {
    fn name(&self) -> &'static str {
        "embedding-bag"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch_real!(s.dtype(), run(self, s, l))
    }

    fn bwd(&self, rows: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let dr = match rows.dtype() {
            candle_core::DType::F32 => grad::<f32>(self, rows, g)?,
            candle_core::DType::F64 => grad::<f64>(self, rows, g)?,
            d => candle_core::bail!("embedding bag: unsupported dtype {d:?}"),
        };
        Ok(Some(dr))
    }
}
