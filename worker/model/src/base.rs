//! BaseModel (Embedding + MLP).
//!
//! `u = masked_mean_t(e_t)` (sum over valid steps / length; the fused
//! embedding bag with `fused`),
//! `logit = MLP([e_target, u (, e_user)])`, MLP `-> 200 -> 80 -> 1` with PReLU
//! or Dice. Parameters: `mlp.*`.

use candle_core::{Result, Tensor};

use super::config::ModelConfig;
use super::net::{head_mlp, Inputs, NetOutput, Network};
use crate::layer::mlp::Mlp;
use crate::layer::mode::Mode;
use crate::layer::params::ParamBuilder;

/// The BaseModel body.
#[derive(Debug, Clone)]
pub struct BaseModel {
    /// Final MLP.
    pub mlp: Mlp,
    /// Pool the history with the fused embedding bag (CPU).
    pub fused: bool,
}

impl Network for BaseModel {
    fn build(cfg: &ModelConfig, pb: &ParamBuilder) -> Result<Self> {
        let e = cfg.behaviour_dim();
        let inp = 2 * e + cfg.other_dim();
        Ok(BaseModel {
            mlp: head_mlp(cfg, inp, pb)?,
            fused: cfg.fused,
        })
    }

    fn forward(&self, inp: &Inputs, mode: Mode) -> Result<NetOutput> {
        let target = inp.target()?;
        let u = inp.history_pool(true, self.fused)?;
        let mut parts = vec![target, u];
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
