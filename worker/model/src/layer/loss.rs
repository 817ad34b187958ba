//! Numerically stable binary cross entropy on logits.
//!
//! `bce(x, y) = relu(x) - x*y + log(1 + exp(-|x|))`, equal to
//! `-y log sigmoid(x) - (1-y) log(1 - sigmoid(x))` without overflow.
//! `softplus(x) = relu(x) + log(1 + exp(-|x|)) = -log sigmoid(-x)`.

use candle_core::{Result, Tensor};

/// Stable `softplus(x) = log(1 + exp(x))`, elementwise.
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

/// Elementwise stable BCE of logits `x` against labels `y` (same shape).
pub fn bce_with_logits(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    (x.relu()? - (x * y)?)? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

/// Mean stable BCE of logits `x` against labels `y`.
pub fn mean_bce_with_logits(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    bce_with_logits(x, y)?.mean_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn stable_for_large_logits() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[1000f32, -1000., 0., 2.], &dev)?;
        let y = Tensor::new(&[1f32, 0., 1., 0.], &dev)?;
        let l = bce_with_logits(&x, &y)?.to_vec1::<f32>()?;
        assert_eq!(l[0], 0.0);
        assert_eq!(l[1], 0.0);
        assert!((l[2] - std::f32::consts::LN_2).abs() < 1e-6);
        assert!((l[3] - (1.0 + 2f32.exp()).ln()).abs() < 1e-5);
        Ok(())
    }
}
