//! DIEN (Deep Interest Evolution Network).
//!
//! Interest extractor: masked GRU (hidden 36) over the history behaviours,
//! states `h_t`. Auxiliary loss (training, `aux_loss` on): [`AuxNet`] on
//! `(h_t, e_{t+1})` against the sampled negative `e'_{t+1}`, weight
//! `aux_alpha` (1). Interest evolving: attention `a_t` = masked softmax over
//! valid `t` of the activation unit on `[q, h_t, q - h_t, q * h_t]`
//! (`q = e_target`; `dien_attention = "bilinear"`: of `h_t W q`, paper Eq. 8),
//! then AUGRU (default) / AGRU / AIGRU / GRU over `h_t`;
//! final interest `h'_T` (state after the last valid step); or, with
//! `evolve = "attpool"` (ablation), `h' = sum_t a_t h_t`.
//! `logit = MLP([e_target, h'_T, s, e_target * s (, e_user)])`, `s = sum_t m_t e_t`.
//! Parameters: `gru.*`, `att.*` (or `bilinear.w`), `evolve.*`, `aux.*` (with
//! aux), `mlp.*`.

use candle_core::{Result, Tensor};

use super::config::{DienAttention, ModelConfig};
use super::net::{attention_unit, head_mlp, Inputs, NetOutput, Network};
use crate::layer::attention::{ActivationUnit, AttentionMode};
use crate::layer::attention_gru::{AttentionGru, EvolveKind};
use crate::layer::aux::AuxNet;
use crate::layer::bilinear::BilinearAttention;
use crate::layer::gru::Gru;
use crate::layer::mlp::Mlp;
use crate::layer::mode::Mode;
use crate::layer::params::ParamBuilder;

/// How the target scores the interest states.
#[derive(Debug, Clone)]
pub enum Scorer {
    /// DIN activation unit (reference code).
    Mlp(ActivationUnit),
    /// `h_t W q` (paper Eq. 8).
    Bilinear(BilinearAttention),
}

/// The DIEN body.
#[derive(Debug, Clone)]
pub struct Dien {
    /// Interest extractor GRU.
    pub gru: Gru,
    /// Auxiliary net (when the aux loss is on).
    pub aux: Option<AuxNet>,
    /// Attention of the target over the interest states.
    pub att: Scorer,
    /// Interest evolving GRU (`None` for attention pooling).
    pub evolve: Option<AttentionGru>,
    /// Final MLP.
    pub mlp: Mlp,
    /// Pool `s` with the fused embedding bag (CPU).
    pub fused: bool,
}

impl Network for Dien {
    fn build(cfg: &ModelConfig, pb: &ParamBuilder) -> Result<Self> {
        let e = cfg.behaviour_dim();
        let h = cfg.dien_hidden;
        let gru = Gru::with_init(e, h, cfg.gru_init, &pb.pp("gru"))?;
        let att = match cfg.dien_attention {
            DienAttention::Mlp => Scorer::Mlp(attention_unit(cfg, h, pb)?),
            DienAttention::Bilinear => {
                Scorer::Bilinear(BilinearAttention::new(h, e, &pb.pp("bilinear"))?)
            }
        };
        let evolve = match cfg.evolve {
            EvolveKind::Attpool => None,
            kind => Some(AttentionGru::with_init(
                kind,
                h,
                h,
                cfg.gru_init,
                &pb.pp("evolve"),
            )?),
        };
        let aux = if cfg.aux_loss {
            let mut a = AuxNet::new(h, e, &pb.pp("aux"))?;
            a.fused = cfg.fused;
            Some(a)
        } else {
            None
        };
        let inp = 2 * e + h + e + cfg.other_dim();
        Ok(Dien {
            gru,
            aux,
            att,
            evolve,
            mlp: head_mlp(cfg, inp, pb)?,
            fused: cfg.fused,
        })
    }

    fn needs_negatives(cfg: &ModelConfig) -> bool {
        cfg.aux_loss
    }

    fn forward(&self, inp: &Inputs, mode: Mode) -> Result<NetOutput> {
        let q = inp.target()?;
        let hist = inp.history()?;
        let states = self.gru.forward(&hist, &inp.mask)?;
        let aux_loss = match (&self.aux, mode.train) {
            (Some(aux), true) => match inp.negatives()? {
                Some(neg) => Some(aux.loss(&states, &hist, &neg, &inp.mask)?),
                None => None,
            },
            _ => None,
        };
        let scores = match &self.att {
            Scorer::Mlp(att) => att.scores(&q, &states, &inp.batch.lens, mode)?,
            Scorer::Bilinear(att) => att.scores(&q, &states)?,
        };
        let a = ActivationUnit::weights(&scores, &inp.mask, AttentionMode::Code)?;
        let final_h = match &self.evolve {
            Some(evolve) => evolve.forward(&states, &a, &inp.mask)?,
            // a is 0 at padded steps (masked softmax).
            None => states.broadcast_mul(&a.unsqueeze(2)?)?.sum(1)?,
        };
        let s = inp.history_pool(false, self.fused)?;
        let qs = (&q * &s)?;
        let mut parts = vec![q, final_h, s, qs];
        if let Some(e) = inp.others()? {
            parts.push(e);
        }
        let x = Tensor::cat(&parts, 1)?;
        Ok(NetOutput {
            logits: self.mlp.forward(&x, mode)?.squeeze(1)?,
            aux_loss,
        })
    }
}
