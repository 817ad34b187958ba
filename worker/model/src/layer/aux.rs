//! DIEN auxiliary network and loss.
//!
//! `f(h_t, e) = MLP([h_t, e])`, `H+E -> 100 -> 50 -> 1`, sigmoid hidden.
//! For valid pairs `(i, t)` with `t + 1 < len_i`, next clicked behaviour
//! `e_{t+1}` and sampled negative `e'_{t+1}`:
//! `L_aux = mean_{valid (i,t)} [ softplus(-f(h_t, e_{t+1})) + softplus(f(h_t, e'_{t+1})) ]`
//! `      = -mean [ log sigmoid(f(h_t, e_{t+1})) + log(1 - sigmoid(f(h_t, e'_{t+1}))) ]`.
//! Pairs beyond the valid length are multiplied by 0 (zero gradient); the loss
//! is 0 when no pair is valid. Parameter names `fc0.*`, `fc1.*`, `fc2.*`.

use candle_core::{Result, Tensor};

use super::loss::softplus;
use super::mlp::{Activation, Mlp};
use super::mode::Mode;
use super::params::ParamBuilder;

/// The auxiliary click predictor `f`.
#[derive(Debug, Clone)]
pub struct AuxNet {
    /// MLP on `[h_t, e]`.
    pub mlp: Mlp,
    /// Use the fused CPU kernel ([`super::fused_aux`]) when possible.
    pub fused: bool,
}

impl AuxNet {
    /// Creates the net for state width `hidden` and behaviour width `emb`.
    pub fn new(hidden: usize, emb: usize, pb: &ParamBuilder) -> Result<Self> {
        Ok(AuxNet {
            mlp: Mlp::new(hidden + emb, &[100, 50], 1, Activation::Sigmoid, pb)?,
            fused: true,
        })
    }

    /// Logits `f(h, e)` for `h` `[N, H]`, `e` `[N, E]`: `[N]`.
    pub fn logits(&self, h: &Tensor, e: &Tensor) -> Result<Tensor> {
        self.mlp
            .forward(&Tensor::cat(&[h, e], 1)?, Mode::EVAL)?
            .squeeze(1)
    }

    /// `L_aux` for states `h` `[B, T, H]`, behaviours `pos` and negatives `neg`
    /// `[B, T, E]`, and `mask` `[B, T]`.
    pub fn loss(&self, h: &Tensor, pos: &Tensor, neg: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, t, hd) = h.dims3()?;
        let e = pos.dim(2)?;
        // Valid pairs (b, t) with step t+1 inside the history: gather only those.
        let m = mask.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
        let mut hi = Vec::new();
        let mut ei = Vec::new();
        for (bi, row) in m.iter().enumerate() {
            for s in 0..t.saturating_sub(1) {
                if row[s + 1] > 0.5 {
                    hi.push((bi * t + s) as u32);
                    ei.push((bi * t + s + 1) as u32);
                }
            }
        }
        if hi.is_empty() {
            return Tensor::zeros((), h.dtype(), h.device());
        }
        let n = hi.len();
        let hi = Tensor::from_vec(hi, n, h.device())?;
        let ei = Tensor::from_vec(ei, n, h.device())?;
        let hs = h.reshape((b * t, hd))?.index_select(&hi, 0)?;
        let p = pos.reshape((b * t, e))?.index_select(&ei, 0)?;
        let q = neg.reshape((b * t, e))?.index_select(&ei, 0)?;
        let (lp, ln) = if self.fused && self.mlp.layers.len() == 3 && super::kernels::cpu_real(&hs)
        {
            let f = super::fused_aux::aux_logits(self, &hs, &Tensor::cat(&[&p, &q], 0)?)?;
            (
                softplus(&f.narrow(0, 0, n)?.neg()?)?,
                softplus(&f.narrow(0, n, n)?)?,
            )
        } else {
            (
                softplus(&self.logits(&hs, &p)?.neg()?)?,
                softplus(&self.logits(&hs, &q)?)?,
            )
        };
        (lp.sum_all()? + ln.sum_all()?)? / n as f64
    }
}
