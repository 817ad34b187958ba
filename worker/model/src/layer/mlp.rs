//! Multi-layer perceptron with a configurable hidden activation.
//!
//! `h_0 = x`, `h_{l+1} = act_l(h_l W_l + b_l)` for hidden layers, and a final
//! linear layer without activation: `y = h_L W_L + b_L`. Parameter names:
//! `fc{l}.weight`, `fc{l}.bias`, `act{l}.alpha` (PReLU/Dice), and the Dice state
//! `act{l}.running_mean`, `act{l}.running_var`.

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use super::dice::Dice;
use super::linear::Linear;
use super::mode::Mode;
use super::params::ParamBuilder;
use super::prelu::PRelu;

/// Hidden activation of an [`Mlp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// PReLU, alpha init 0.1 per channel.
    #[default]
    Prelu,
    /// Dice (batch statistics in training, running averages at inference).
    Dice,
    /// Logistic sigmoid (DIN/DIEN attention and auxiliary nets).
    Sigmoid,
}

/// One instantiated hidden activation.
#[derive(Debug, Clone)]
pub enum Act {
    /// PReLU layer.
    Prelu(PRelu),
    /// Dice layer.
    Dice(Dice),
    /// Sigmoid (no parameters).
    Sigmoid,
}

impl Act {
    /// Creates the activation for `channels` under `pb`.
    pub fn new(kind: Activation, channels: usize, pb: &ParamBuilder) -> Result<Self> {
        Ok(match kind {
            Activation::Prelu => Act::Prelu(PRelu::new(channels, pb)?),
            Activation::Dice => Act::Dice(Dice::new(channels, pb)?),
            Activation::Sigmoid => Act::Sigmoid,
        })
    }

    /// Applies the activation to `[N, C]`.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        match self {
            Act::Prelu(p) => p.forward(x),
            Act::Dice(d) => d.forward(x, mode),
            Act::Sigmoid => candle_nn::ops::sigmoid(x),
        }
    }
}

/// An MLP `in -> hidden[0] -> ... -> out`.
#[derive(Debug, Clone)]
pub struct Mlp {
    /// Linear layers (hidden ones followed by `acts`).
    pub layers: Vec<Linear>,
    /// Activations after each hidden layer.
    pub acts: Vec<Act>,
}

impl Mlp {
    /// Sets the running-statistics `momentum` and `eps` of every Dice
    /// activation (the defaults are 0.1 and 1e-8).
    pub fn set_dice(&mut self, momentum: f64, eps: f64) {
        for a in &mut self.acts {
            if let Act::Dice(d) = a {
                d.momentum = momentum;
                d.eps = eps;
            }
        }
    }

    /// Creates the MLP `inp -> hidden... -> out` under `pb`.
    pub fn new(
        inp: usize,
        hidden: &[usize],
        out: usize,
        act: Activation,
        pb: &ParamBuilder,
    ) -> Result<Self> {
        let mut layers = Vec::new();
        let mut acts = Vec::new();
        let mut prev = inp;
        for (l, &h) in hidden.iter().enumerate() {
            layers.push(Linear::new(prev, h, &pb.pp(&format!("fc{l}")))?);
            acts.push(Act::new(act, h, &pb.pp(&format!("act{l}")))?);
            prev = h;
        }
        layers.push(Linear::new(
            prev,
            out,
            &pb.pp(&format!("fc{}", hidden.len())),
        )?);
        Ok(Mlp { layers, acts })
    }

    /// Applies the MLP to `x` `[N, in]`, giving `[N, out]`.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let mut h = x.clone();
        for (l, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h)?;
            if let Some(a) = self.acts.get(l) {
                h = a.forward(&h, mode)?;
            }
        }
        Ok(h)
    }
}
