//! Fully connected layer.
//!
//! `y = x W + b` with `W` stored `[in, out]` (so the forward is a plain matmul)
//! and `b` `[out]`. Init: Glorot-uniform weight, zero bias.

use candle_core::{Result, Tensor, Var};

use super::params::{Init, ParamBuilder};

/// A dense layer `[N, in] -> [N, out]`; parameters `weight` `[in, out]`, `bias` `[out]`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Weight `[in, out]`.
    pub weight: Var,
    /// Bias `[out]`.
    pub bias: Var,
}

impl Linear {
    /// Creates `weight` and `bias` under `pb`.
    pub fn new(inp: usize, out: usize, pb: &ParamBuilder) -> Result<Self> {
        Ok(Linear {
            weight: pb.var("weight", (inp, out), Init::Glorot)?,
            bias: pb.var("bias", out, Init::Const(0.0))?,
        })
    }

    /// Input width.
    pub fn in_dim(&self) -> usize {
        self.weight.as_tensor().dims()[0]
    }

    /// Output width.
    pub fn out_dim(&self) -> usize {
        self.weight.as_tensor().dims()[1]
    }

    /// `x W + b` for `x` `[N, in]` (on CPU through the fused
    /// [`super::fused_linear::matmul_rows`] and
    /// [`super::fused_bias::add_bias_rows`]).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let xw = super::fused_linear::matmul_rows(x, self.weight.as_tensor())?;
        super::fused_bias::add_bias_rows(&xw, self.bias.as_tensor())
    }
}
