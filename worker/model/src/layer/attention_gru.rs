//! Attention-gated GRUs of DIEN's interest-evolving layer (paper form).
//!
//! Inputs: interest states `i_t` `[B, T, H]` (from the extractor GRU) and
//! attention `a_t` `[B, T]`. With the GRU gates `u_t`, `n_t` of [`Gru`] on input
//! `i_t` and state `h'_{t-1}`:
//! - AIGRU: plain GRU on the scaled input `a_t * i_t`;
//! - AGRU:  `h'_t = (1 - a_t) * h'_{t-1} + a_t * n_t` (attention replaces `u`);
//! - AUGRU: `u'_t = a_t * u_t`, `h'_t = (1 - u'_t) * h'_{t-1} + u'_t * n_t`
//!   (a = 0 freezes the state, a = 1 is the plain GRU);
//! - GRU:   plain GRU on `i_t`, attention ignored (ablation).
//!
//! `attpool` (GRU + attention pooling, the DIEN paper's ablation without an
//! evolving layer) is not a GRU: DIEN computes `sum_t a_t i_t` itself and
//! builds no [`AttentionGru`] for it.
//!
//! Masked like [`Gru`]: the state is carried past the valid length, and the
//! output is the final interest `h'_T` (state after the last valid step).
//! Parameter names `w_ih`, `w_hh`, `bias` (same layout as [`Gru`]).

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use super::fused_gru::{att_gru_states, gru_states, GateKind};
use super::gru::{Gru, GruInit};
use super::params::ParamBuilder;

/// Which attentional GRU evolves the interest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EvolveKind {
    /// GRU with attentional update gate (DIEN default).
    #[default]
    Augru,
    /// Attention replaces the update gate.
    Agru,
    /// Attention scales the GRU input.
    Aigru,
    /// Plain GRU, no attention.
    Gru,
    /// No evolving GRU: the final interest is the attention-weighted sum
    /// `sum_t a_t i_t` of the extractor states (ablation).
    Attpool,
}

/// An attention-gated GRU.
#[derive(Debug, Clone)]
pub struct AttentionGru {
    /// Cell parameters.
    pub cell: Gru,
    /// Variant.
    pub kind: EvolveKind,
}

impl AttentionGru {
    /// Creates the cell (input width `inp`, hidden `hidden`) under `pb`.
    /// Errors for [`EvolveKind::Attpool`], which has no cell.
    pub fn new(kind: EvolveKind, inp: usize, hidden: usize, pb: &ParamBuilder) -> Result<Self> {
        Self::with_init(kind, inp, hidden, GruInit::Uniform, pb)
    }

    /// As [`AttentionGru::new`], with the cell initialised as `init` says.
    pub fn with_init(
        kind: EvolveKind,
        inp: usize,
        hidden: usize,
        init: GruInit,
        pb: &ParamBuilder,
    ) -> Result<Self> {
        if kind == EvolveKind::Attpool {
            candle_core::bail!("evolve = \"attpool\" has no attentional GRU");
        }
        Ok(AttentionGru {
            cell: Gru::with_init(inp, hidden, init, pb)?,
            kind,
        })
    }

    /// Final state `[B, H]` over `x` `[B, T, In]` with attention `att` `[B, T]`.
    pub fn forward(&self, x: &Tensor, att: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let x = match self.kind {
            EvolveKind::Aigru => x.broadcast_mul(&att.unsqueeze(2)?)?,
            _ => x.clone(),
        };
        let gx = self.cell.input_proj(&x)?;
        if self.cell.fused && super::kernels::cpu_real(&gx) {
            let lens = super::gru::lens_of_mask(mask)?;
            let w = self.cell.w_hh.as_tensor();
            let states = match self.kind {
                EvolveKind::Augru => att_gru_states(GateKind::Augru, &gx, att, w, &lens)?,
                EvolveKind::Agru => att_gru_states(GateKind::Agru, &gx, att, w, &lens)?,
                EvolveKind::Aigru | EvolveKind::Gru | EvolveKind::Attpool => {
                    gru_states(&gx, w, &lens)?
                }
            };
            return states.narrow(1, t - 1, 1)?.squeeze(1);
        }
        let mut h = Tensor::zeros((b, self.cell.hidden), x.dtype(), x.device())?;
        for s in 0..t {
            let g = self.cell.gates(&gx.narrow(1, s, 1)?.squeeze(1)?, &h)?;
            let a = att.narrow(1, s, 1)?;
            let u = match self.kind {
                EvolveKind::Augru => g.u.broadcast_mul(&a)?,
                EvolveKind::Agru => a.broadcast_as(g.u.shape())?.contiguous()?,
                EvolveKind::Aigru | EvolveKind::Gru | EvolveKind::Attpool => g.u,
            };
            let hn = (&h + (u * (g.n - &h)?)?)?;
            let m = mask.narrow(1, s, 1)?;
            h = (&h + (hn - &h)?.broadcast_mul(&m)?)?;
        }
        Ok(h)
    }
}
