//! DIN (Deep Interest Network).
//!
//! Activation unit `s_j = FFN([q, e_j, q - e_j, q * e_j])` (`4*36 -> 80 -> 40 -> 1`),
//! `q = e_target`; weights `w_j = s_j * m_j` (paper mode) or the masked
//! softmax (code mode); `v_U = sum_j w_j e_j`; `s = sum_j m_j e_j`;
//! `logit = MLP([e_target, v_U, s, e_target * s (, e_user)])`, MLP
//! `-> 200 -> 80 -> 1` (PReLU or Dice). Parameters: `att.*`, `mlp.*`.

use candle_core::{Result, Tensor};

use super::config::ModelConfig;
use super::net::{attention_unit, head_mlp, Inputs, NetOutput, Network};
use crate::layer::attention::{ActivationUnit, AttentionMode};
use crate::layer::mlp::Mlp;
use crate::layer::mode::Mode;
use crate::layer::params::ParamBuilder;

/// The DIN body.
#[derive(Debug, Clone)]
pub struct Din {
    /// Activation unit.
    pub att: ActivationUnit,
    /// Attention mode (paper / code).
    pub att_mode: AttentionMode,
    /// Final MLP.
    pub mlp: Mlp,
    /// Pool `s` with the fused embedding bag (CPU).
    pub fused: bool,
}

impl Network for Din {
    fn build(cfg: &ModelConfig, pb: &ParamBuilder) -> Result<Self> {
        let e = cfg.behaviour_dim();
        let inp = 4 * e + cfg.other_dim();
        Ok(Din {
            att: attention_unit(cfg, e, pb)?,
            att_mode: cfg.attention_mode,
            mlp: head_mlp(cfg, inp, pb)?,
            fused: cfg.fused,
        })
    }

    fn forward(&self, inp: &Inputs, mode: Mode) -> Result<NetOutput> {
        let q = inp.target()?;
        let hist = inp.history()?;
        let (v, _) =
            self.att
                .forward(&q, &hist, &inp.mask, &inp.batch.lens, self.att_mode, mode)?;
        let s = inp.history_pool(false, self.fused)?;
        let qs = (&q * &s)?;
        let mut parts = vec![q, v, s, qs];
        if let Some(e) = inp.others()? {
            parts.push(e);
        }
        let x = Tensor::cat(&parts, 1)?;
        Ok(NetOutput {
            logits: self.mlp.forward(&x, mode)?.squeeze(1)?,
            aux_loss: None,
        })
    }
}
