//! Parametric ReLU with one slope per channel.
//!
//! `f(s) = max(0, s) + alpha * min(0, s)`, `alpha` of shape `[C]`, init 0.1.

use candle_core::{Result, Tensor, Var};

use super::params::{Init, ParamBuilder};

/// PReLU over the last axis of `[N, C]` inputs; parameter `alpha` `[C]`.
#[derive(Debug, Clone)]
pub struct PRelu {
    /// Negative-side slope per channel.
    pub alpha: Var,
}

impl PRelu {
    /// Creates `alpha` (init 0.1) under `pb`.
    pub fn new(channels: usize, pb: &ParamBuilder) -> Result<Self> {
        Ok(PRelu {
            alpha: pb.var("alpha", channels, Init::Const(0.1))?,
        })
    }

    /// Applies PReLU to `x` `[N, C]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let neg = x.minimum(0.0)?;
        x.relu()? + neg.broadcast_mul(self.alpha.as_tensor())?
    }
}
