//! Bilinear attention of DIEN (paper Eq. 8).
//!
//! For interest state `h_t` (`[H]`) and target ad `e_a` (`[E]`):
//! `s_t = h_t W e_a` with `W` `[H, E]` (no bias), then
//! `a_t = exp(s_t) / sum_j exp(s_j)` over the valid steps (the masked
//! softmax of [`super::attention::ActivationUnit::weights`] in code mode).
//! The reference code uses the DIN activation unit instead (MODELS.md); this
//! is the paper's form, selected with `dien_attention = "bilinear"`.
//!
//! Parameter: `w` `[H, E]`, Glorot-uniform.

use candle_core::{Result, Tensor, Var};

use super::params::{Init, ParamBuilder};

/// `s_t = h_t W q`.
#[derive(Debug, Clone)]
pub struct BilinearAttention {
    /// `W` `[H, E]`.
    pub w: Var,
}

impl BilinearAttention {
    /// Creates `w` (`[states, query]`) under `pb`.
    pub fn new(states: usize, query: usize, pb: &ParamBuilder) -> Result<Self> {
        Ok(BilinearAttention {
            w: pb.var("w", (states, query), Init::Glorot)?,
        })
    }

    /// Raw scores `[B, T]` for `q` `[B, E]` and `states` `[B, T, H]`:
    /// `W q` once per row (`[B, H]`), then one batched product with the states.
    pub fn scores(&self, q: &Tensor, states: &Tensor) -> Result<Tensor> {
        let wq = q.matmul(&self.w.as_tensor().t()?)?; // [B, H]
        states.matmul(&wq.unsqueeze(2)?)?.squeeze(2)
    }
}
