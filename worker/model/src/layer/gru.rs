//! GRU with masking (DIEN interest extractor; GRU4Rec).
//!
//! With gate order `[u | r | n]` in `W` (`[In, 3H]`), `U` (`[H, 3H]`), `b` (`[3H]`):
//! `u_t = sigmoid(x_t W_u + h_{t-1} U_u + b_u)`
//! `r_t = sigmoid(x_t W_r + h_{t-1} U_r + b_r)`
//! `n_t = tanh(x_t W_n + r_t * (h_{t-1} U_n) + b_n)`
//! `h_t = (1 - u_t) * h_{t-1} + u_t * n_t`
//! Masking: on a padded step (`m_t = 0`) the state is carried unchanged,
//! `h_t = h_{t-1} + m_t * (GRU(x_t, h_{t-1}) - h_{t-1})`, so padded inputs get
//! exactly zero gradient and the state at `T-1` is the state at the last valid
//! step. `h_0 = 0`. Parameter names `w_ih`, `w_hh`, `bias`.

use candle_core::{Result, Tensor, Var};

use serde::{Deserialize, Serialize};

use super::params::{Init, ParamBuilder};

/// How a GRU's parameters are initialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum GruInit {
    /// PyTorch's `nn.GRU`: every weight uniform in `[-1/sqrt(H), 1/sqrt(H)]`,
    /// bias 0 (default).
    #[default]
    Uniform,
    /// TensorFlow 1's `GRUCell` (DIEN's reference code): the gate kernel
    /// `[In + H, 2H]` Glorot-uniform with bound `sqrt(6 / (In + 3H))`, the
    /// candidate kernel `[In + H, H]` with `sqrt(6 / (In + 2H))`, gate bias
    /// 1.0 and candidate bias 0. TF's update gate keeps the old state
    /// (`h_t = u h_{t-1} + (1 - u) c`) where Ember's takes the new one, so
    /// TF's bias 1.0 on it is Ember's `b_u = -1.0`; `b_r = +1.0`, `b_n = 0`.
    /// (TF also applies `r` before the recurrent product of the candidate,
    /// `(r * h) U_n`, where Ember and PyTorch use `r * (h U_n)`: that is the
    /// cell's form, not its initialisation, and is not changed by this.)
    Tf1,
}

/// GRU cell parameters plus a masked sequence forward.
#[derive(Debug, Clone)]
pub struct Gru {
    /// Input weights `[In, 3H]`, gates `[u | r | n]`.
    pub w_ih: Var,
    /// Recurrent weights `[H, 3H]`.
    pub w_hh: Var,
    /// Bias `[3H]`.
    pub bias: Var,
    /// Hidden size H.
    pub hidden: usize,
    /// Use the fused CPU recurrence ([`super::fused_gru`]) when possible.
    pub fused: bool,
}

/// Valid lengths of a left-aligned `[B, T]` mask.
pub fn lens_of_mask(mask: &Tensor) -> Result<Vec<usize>> {
    let m = mask.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
    Ok(m.iter()
        .map(|r| r.iter().filter(|&&v| v > 0.5).count())
        .collect())
}

/// Gate pre-activations of one step, used by the attentional variants.
#[derive(Debug, Clone)]
pub struct GruGates {
    /// Update gate `u_t` `[B, H]`.
    pub u: Tensor,
    /// Candidate state `n_t` `[B, H]`.
    pub n: Tensor,
}

impl Gru {
    /// Creates the parameters for input width `inp`, hidden `hidden` under `pb`.
    /// Init: uniform in `[-1/sqrt(H), 1/sqrt(H)]` (PyTorch's), bias 0.
    pub fn new(inp: usize, hidden: usize, pb: &ParamBuilder) -> Result<Self> {
        Self::with_init(inp, hidden, GruInit::Uniform, pb)
    }

    /// Creates the parameters initialised as `init` says (see [`GruInit`]).
    pub fn with_init(inp: usize, hidden: usize, init: GruInit, pb: &ParamBuilder) -> Result<Self> {
        let (w_init, bias_vals) = match init {
            GruInit::Uniform => {
                let b = 1.0 / (hidden as f64).sqrt();
                (Init::Uniform(b), None)
            }
            GruInit::Tf1 => {
                let (i, h) = (inp as f64, hidden as f64);
                let w = Init::SplitColumns {
                    split: 2 * hidden,
                    left: (6.0 / (i + 3.0 * h)).sqrt(),
                    right: (6.0 / (i + 2.0 * h)).sqrt(),
                };
                let mut b = vec![-1.0; hidden];
                b.extend(std::iter::repeat_n(1.0, hidden));
                b.extend(std::iter::repeat_n(0.0, hidden));
                (w, Some(b))
            }
        };
        let w_ih = pb.var("w_ih", (inp, 3 * hidden), w_init)?;
        let w_hh = pb.var("w_hh", (hidden, 3 * hidden), w_init)?;
        let bias = pb.var("bias", 3 * hidden, Init::Const(0.0))?;
        if let Some(v) = bias_vals {
            let t = Tensor::from_vec(v, 3 * hidden, &pb.device())?.to_dtype(pb.dtype())?;
            bias.set(&t)?;
        }
        Ok(Gru {
            w_ih,
            w_hh,
            bias,
            hidden,
            fused: true,
        })
    }

    /// Input projections `x W + b` for all steps: `[B, T, In]` -> `[B, T, 3H]`
    /// (the product through [`super::fused_linear::matmul_rows`], the bias
    /// through [`super::fused_bias::add_bias_rows`], whose gradient is one
    /// pass over the `B T` rows).
    pub fn input_proj(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, i) = x.dims3()?;
        let xw = super::fused_linear::matmul_rows(&x.reshape((b * t, i))?, self.w_ih.as_tensor())?;
        super::fused_bias::add_bias_rows(&xw, self.bias.as_tensor())?.reshape((
            b,
            t,
            3 * self.hidden,
        ))
    }

    /// Gates of one step from its input projection `gx` `[B, 3H]` and `h` `[B, H]`.
    pub fn gates(&self, gx: &Tensor, h: &Tensor) -> Result<GruGates> {
        let hd = self.hidden;
        let gh = h.matmul(self.w_hh.as_tensor())?;
        let u = candle_nn::ops::sigmoid(&(gx.narrow(1, 0, hd)? + gh.narrow(1, 0, hd)?)?)?;
        let r = candle_nn::ops::sigmoid(&(gx.narrow(1, hd, hd)? + gh.narrow(1, hd, hd)?)?)?;
        let n = (gx.narrow(1, 2 * hd, hd)? + (r * gh.narrow(1, 2 * hd, hd)?)?)?.tanh()?;
        Ok(GruGates { u, n })
    }

    /// Runs the masked GRU over `x` `[B, T, In]` with `mask` `[B, T]`;
    /// returns all states `[B, T, H]` (carried past each row's length).
    pub fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let gx = self.input_proj(x)?;
        if self.fused && super::kernels::cpu_real(&gx) {
            return super::fused_gru::gru_states(&gx, self.w_hh.as_tensor(), &lens_of_mask(mask)?);
        }
        let mut h = Tensor::zeros((b, self.hidden), x.dtype(), x.device())?;
        let mut out = Vec::with_capacity(t);
        for s in 0..t {
            let g = self.gates(&gx.narrow(1, s, 1)?.squeeze(1)?, &h)?;
            let hn = (&h + (g.u * (g.n - &h)?)?)?;
            let m = mask.narrow(1, s, 1)?;
            h = (&h + (hn - &h)?.broadcast_mul(&m)?)?;
            out.push(h.clone());
        }
        Tensor::stack(&out, 1)
    }

    /// One unmasked step from input `x` `[B, In]` and state `h` `[B, H]`.
    pub fn step(&self, x: &Tensor, h: &Tensor) -> Result<Tensor> {
        let gx = x
            .matmul(self.w_ih.as_tensor())?
            .broadcast_add(self.bias.as_tensor())?;
        let g = self.gates(&gx, h)?;
        h + (g.u * (g.n - h)?)?
    }
}
