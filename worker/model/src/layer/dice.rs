//! Dice, the data-adaptive activation of DIN.
//!
//! `f(s) = p(s) * s + (1 - p(s)) * alpha * s`,
//! `p(s) = sigmoid((s - E[s]) / sqrt(Var[s] + eps))`, `eps = 1e-8`,
//! `alpha` per channel (init 0).
//!
//! Training: `E`, `Var` are the mini-batch mean and (biased) variance per
//! channel, and gradients flow through them (as through BatchNorm). The running
//! averages are updated BatchNorm-style,
//! `r <- (1 - momentum) * r + momentum * batch_stat` (momentum 0.1, unbiased
//! variance for the running value), and used at inference. They are model
//! *state* (`running_mean`, `running_var`), exported with the dense parameters
//! but not trained. With `E = 0`, `Var = 0` Dice is PReLU (`p` is a step).

use candle_core::{Result, Tensor, Var};

use super::mode::Mode;
use super::params::{Init, ParamBuilder};

/// Dice over the last axis of `[N, C]` inputs.
#[derive(Debug, Clone)]
pub struct Dice {
    /// Slope of the "off" side per channel.
    pub alpha: Var,
    /// Running mean per channel (state).
    pub running_mean: Var,
    /// Running variance per channel (state).
    pub running_var: Var,
    /// Variance epsilon (1e-8).
    pub eps: f64,
    /// Running-average momentum (0.1).
    pub momentum: f64,
}

impl Dice {
    /// Creates `alpha` (init 0) and the running stats (mean 0, var 1) under `pb`.
    pub fn new(channels: usize, pb: &ParamBuilder) -> Result<Self> {
        Ok(Dice {
            alpha: pb.var("alpha", channels, Init::Const(0.0))?,
            running_mean: pb.state("running_mean", channels, Init::Const(0.0))?,
            running_var: pb.state("running_var", channels, Init::Const(1.0))?,
            eps: 1e-8,
            momentum: 0.1,
        })
    }

    /// `f(s)` given the statistics `mean`, `var` (each `[C]`, broadcast).
    pub fn apply_with_stats(&self, x: &Tensor, mean: &Tensor, var: &Tensor) -> Result<Tensor> {
        let z = x
            .broadcast_sub(mean)?
            .broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let p = candle_nn::ops::sigmoid(&z)?;
        // p*s + (1-p)*alpha*s = s * (alpha + p * (1 - alpha))
        let one_minus_alpha = self.alpha.as_tensor().affine(-1.0, 1.0)?;
        let gate = p
            .broadcast_mul(&one_minus_alpha)?
            .broadcast_add(self.alpha.as_tensor())?;
        x * gate
    }

    /// Applies Dice to `x` `[N, C]` in `mode`.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        if !mode.train {
            return self.apply_with_stats(
                x,
                self.running_mean.as_tensor(),
                self.running_var.as_tensor(),
            );
        }
        let n = x.dim(0)?;
        let mean = x.mean_keepdim(0)?;
        let var = x.broadcast_sub(&mean)?.sqr()?.mean_keepdim(0)?;
        if mode.update_state {
            let m = self.momentum;
            let bm = mean.detach().squeeze(0)?;
            let unbias = if n > 1 {
                n as f64 / (n as f64 - 1.0)
            } else {
                1.0
            };
            let bv = (var.detach().squeeze(0)? * unbias)?;
            let rm = ((self.running_mean.as_tensor() * (1.0 - m))? + (bm * m)?)?;
            let rv = ((self.running_var.as_tensor() * (1.0 - m))? + (bv * m)?)?;
            self.running_mean.set(&rm)?;
            self.running_var.set(&rv)?;
        }
        self.apply_with_stats(x, &mean.squeeze(0)?, &var.squeeze(0)?)
    }
}
