//! Masked pooling over the history axis.
//!
//! For `x` of shape `[B, T, D]` and mask `m` `[B, T]` (1 on valid steps):
//! - sum:  `s_b = sum_t m_bt * x_bt`
//! - mean: `u_b = s_b / max(1, sum_t m_bt)` (an empty history pools to 0).
//!
//! Padded steps are multiplied by 0, so they receive exactly zero gradient.

use candle_core::{Result, Tensor};

/// Masked sum over axis 1: `[B, T, D]`, `[B, T]` -> `[B, D]`.
pub fn masked_sum(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(&mask.unsqueeze(2)?)?.sum(1)
}

/// Masked mean over axis 1 (divides by the number of valid steps, at least 1).
pub fn masked_mean(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let n = mask.sum_keepdim(1)?.maximum(1.0)?;
    masked_sum(x, mask)?.broadcast_div(&n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn pools_and_pads_get_zero_grad() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::new(
            &[
                [[1f64, 2.], [3., 4.], [50., 60.]],
                [[5., 6.], [70., 80.], [90., 100.]],
            ],
            &dev,
        )?;
        let m = Tensor::new(&[[1f64, 1., 0.], [1., 0., 0.]], &dev)?;
        let s = masked_sum(x.as_tensor(), &m)?;
        assert_eq!(s.to_vec2::<f64>()?, vec![vec![4., 6.], vec![5., 6.]]);
        let u = masked_mean(x.as_tensor(), &m)?;
        assert_eq!(u.to_vec2::<f64>()?, vec![vec![2., 3.], vec![5., 6.]]);
        let g = u.sum_all()?.backward()?;
        let gx = g.get(x.as_tensor()).unwrap().to_vec3::<f64>()?;
        assert_eq!(gx[0], vec![vec![0.5, 0.5], vec![0.5, 0.5], vec![0., 0.]]);
        assert_eq!(gx[1], vec![vec![1., 1.], vec![0., 0.], vec![0., 0.]]);
        // Empty history pools to zero.
        let e = masked_mean(
            x.as_tensor(),
            &Tensor::zeros((2, 3), candle_core::DType::F64, &dev)?,
        )?;
        assert_eq!(e.to_vec2::<f64>()?, vec![vec![0., 0.], vec![0., 0.]]);
        Ok(())
    }
}
