//! DIN activation unit (local attention of a target over the history).
//!
//! For history step `j` with query `q = e_target` and key `k = e_j`:
//! `s_j = FFN([q, k, q - k, q * k])`, FFN = `4E -> 80 -> 40 -> 1` with sigmoid
//! hidden activations (reference code; PReLU/Dice selectable).
//! Weights `w_j`:
//! - paper mode (default): `w_j = s_j * m_j` — no softmax, padded steps give 0;
//! - code mode: `w = m * softmax_T(s_j if m_j else -2^32 + 1)` (the extra
//!   mask only matters for an empty history: weights 0 rather than 1/T).
//!
//! Pooling `v_U = sum_j w_j e_j`. Padded steps receive exactly zero gradient in
//! both modes (`m_j = 0` multiplies them away; in code mode `exp(-2^32)` is 0).
//!
//! Parameter names: `fc0.*`, `fc1.*`, `fc2.*` (and `act{l}.*` for PReLU/Dice).
//! On CPU with `f32`/`f64` and sigmoid hidden activations the scores use the
//! fused kernel in [`super::fused_attention`] (same formula, hand-written
//! backward, padded steps skipped); [`ActivationUnit::scores_reference`] is the
//! composed-candle version, used on other devices and as the test oracle.

use candle_core::{Result, Tensor, D};
use serde::{Deserialize, Serialize};

use super::mlp::{Activation, Mlp};
use super::mode::Mode;
use super::params::ParamBuilder;

/// How attention scores become pooling weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AttentionMode {
    /// DIN paper: raw scores times the mask (no normalisation).
    #[default]
    Paper,
    /// Reference code: masked softmax over T (padding filled with -2^32+1).
    Code,
}

/// Fill value of padded scores before the softmax in code mode.
pub const PAD_SCORE: f64 = -4294967295.0; // -2^32 + 1

/// The DIN activation unit.
#[derive(Debug, Clone)]
pub struct ActivationUnit {
    /// FFN over `[q, k, q-k, q*k]`: `4E -> hidden... -> 1`.
    pub ffn: Mlp,
    /// Hidden activation of the FFN.
    pub activation: Activation,
    /// Use the fused CPU kernel when possible.
    pub fused: bool,
}

impl ActivationUnit {
    /// Creates the unit for query/key width `width` with hidden sizes `hidden`
    /// (default `[80, 40]`).
    pub fn new(
        width: usize,
        hidden: &[usize],
        activation: Activation,
        pb: &ParamBuilder,
    ) -> Result<Self> {
        Ok(ActivationUnit {
            ffn: Mlp::new(4 * width, hidden, 1, activation, pb)?,
            activation,
            fused: true,
        })
    }

    /// Raw scores `s` `[B, T]` for `q` `[B, E]`, `k` `[B, T, E]`, `mask` `[B, T]`
    /// (composed candle ops; every step, padded or not, is evaluated).
    pub fn scores_reference(&self, q: &Tensor, k: &Tensor, mode: Mode) -> Result<Tensor> {
        let (b, t, e) = k.dims3()?;
        let qe = q.unsqueeze(1)?.broadcast_as((b, t, e))?;
        let x = Tensor::cat(&[&qe, k, &(&qe - k)?, &(&qe * k)?], 2)?.reshape((b * t, 4 * e))?;
        self.ffn.forward(&x, mode)?.reshape((b, t))
    }

    /// Raw scores `[B, T]`; padded steps may hold any finite value.
    pub fn scores(&self, q: &Tensor, k: &Tensor, lens: &[usize], mode: Mode) -> Result<Tensor> {
        if self.fused
            && self.activation == Activation::Sigmoid
            && super::fused_attention::supported(k)
        {
            super::fused_attention::scores(self, q, k, lens)
        } else {
            self.scores_reference(q, k, mode)
        }
    }

    /// Pooling weights `[B, T]` from scores and mask.
    pub fn weights(scores: &Tensor, mask: &Tensor, att: AttentionMode) -> Result<Tensor> {
        match att {
            AttentionMode::Paper => scores * mask,
            AttentionMode::Code => {
                let fill = (mask.affine(-1.0, 1.0)? * PAD_SCORE)?;
                let s = ((scores * mask)? + fill)?;
                // Times the mask: identical where a row has a valid step (pads
                // are exactly 0 after the softmax) and 0, not uniform, for an
                // empty history (whose padded keys are zero rows anyway).
                candle_nn::ops::softmax(&s, D::Minus1)? * mask
            }
        }
    }

    /// Weighted pooling `v = sum_j w_j k_j`: `[B, T]`, `[B, T, E]` -> `[B, E]`.
    pub fn pool(weights: &Tensor, k: &Tensor) -> Result<Tensor> {
        weights.unsqueeze(1)?.matmul(k)?.squeeze(1)
    }

    /// Scores, weights and pooled interest `(v [B, E], w [B, T])`.
    pub fn forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        mask: &Tensor,
        lens: &[usize],
        att: AttentionMode,
        mode: Mode,
    ) -> Result<(Tensor, Tensor)> {
        let s = self.scores(q, k, lens, mode)?;
        let w = Self::weights(&s, mask, att)?;
        Ok((Self::pool(&w, k)?, w))
    }
}
