//! Embedding lookup from rows pulled from the parameter server.
//!
//! The pulled unique rows of one table form a trainable `Var` `R` of shape
//! `[U, D]`. One constant zero row is appended, `P = [R; 0]` (`[U+1, D]`), and
//! positions gather `E[p] = P[idx[p]]` with `index_select`. Index `U` is padding
//! and reads zeros. The backward of `index_select` scatter-adds, so
//! `dL/dR[u] = sum_{p: idx[p] = u} dL/dE[p]` — exactly the per-id gradient the
//! parameter server expects — and padded positions contribute to no row.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};

use super::params::to_f32_vec;

/// The pulled rows of one sparse table for one batch.
#[derive(Debug, Clone)]
pub struct EmbeddingBlock {
    /// Trainable unique rows `[U, D]`.
    pub rows: Var,
    /// Rows plus the zero padding row, `[U+1, D]`.
    pub padded: Tensor,
    /// Number of unique ids U.
    pub unique: usize,
    /// Row width D.
    pub dim: usize,
}

impl EmbeddingBlock {
    /// Builds the block from row-major `rows` (`unique * dim` values).
    /// The caller checks the length (see `model::ModelError::RowShape`).
    pub fn from_rows(
        rows: &[f32],
        unique: usize,
        dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let t = Tensor::from_slice(rows, (unique, dim), device)?.to_dtype(dtype)?;
        Self::from_tensor(&t)
    }

    /// Builds the block from a `[U, D]` tensor (copied into a fresh `Var`).
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        Self::from_var(Var::from_tensor(t)?)
    }

    /// Builds the block around an existing `[U, D]` `Var` (shared, not copied).
    pub fn from_var(rows: Var) -> Result<Self> {
        let t = rows.as_tensor();
        let (unique, dim) = t.dims2()?;
        let pad = Tensor::zeros((1, dim), t.dtype(), t.device())?;
        let padded = Tensor::cat(&[rows.as_tensor(), &pad], 0)?;
        Ok(EmbeddingBlock {
            rows,
            padded,
            unique,
            dim,
        })
    }

    /// Gathers rows for `idx` (each in `0..=U`, `U` = padding): `[idx.len(), D]`.
    pub fn lookup(&self, idx: &[u32]) -> Result<Tensor> {
        let ids = Tensor::from_slice(idx, idx.len(), self.padded.device())?;
        self.padded.index_select(&ids, 0)
    }

    /// The `[U * D]` gradient of the rows (zeros when no gradient reached them).
    pub fn grad(&self, grads: &GradStore) -> Result<Vec<f32>> {
        match grads.get(self.rows.as_tensor()) {
            Some(g) => to_f32_vec(g),
            None => Ok(vec![0.0; self.unique * self.dim]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_scatter_adds_and_pads_get_nothing() -> Result<()> {
        let dev = Device::Cpu;
        let block = EmbeddingBlock::from_rows(&[1., 2., 3., 4., 5., 6.], 3, 2, DType::F64, &dev)?;
        // idx 3 is padding.
        let e = block.lookup(&[0, 2, 0, 3])?;
        assert_eq!(
            e.to_vec2::<f64>()?,
            vec![vec![1., 2.], vec![5., 6.], vec![1., 2.], vec![0., 0.]]
        );
        let w = Tensor::new(&[[1f64, 10.], [100., 1000.], [2., 20.], [7., 7.]], &dev)?;
        let loss = (e * w)?.sum_all()?;
        let g = loss.backward()?;
        // Row 0 used twice: grad [1+2, 10+20]; row 1 unused: 0; row 2: [100, 1000].
        assert_eq!(block.grad(&g)?, vec![3., 30., 0., 0., 100., 1000.]);
        Ok(())
    }
}
