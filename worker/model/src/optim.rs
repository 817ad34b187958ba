//! A tiny local dense optimizer for in-process training (tests, examples,
//! single-process runs). The distributed trainer may instead push dense
//! gradients to the parameter server.
//!
//! Per parameter slice `w` with gradient `g`:
//! - SGD:     `w -= lr * g`
//! - Adagrad: `G += g^2; w -= lr * g / (sqrt(G) + eps)`
//! - Adam:    `m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;`
//!   `w -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`

use ember_proto::optim as rules;
use std::collections::HashMap;

use super::{CtrModel, ModelError, Result};

/// Update rule and hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptimizerKind {
    /// Plain SGD.
    Sgd {
        /// Learning rate.
        lr: f32,
    },
    /// Adagrad.
    Adagrad {
        /// Learning rate.
        lr: f32,
        /// Denominator epsilon.
        eps: f32,
        /// Initial accumulator value.
        init_acc: f32,
    },
    /// Adam.
    Adam {
        /// Learning rate.
        lr: f32,
        /// First-moment decay.
        beta1: f32,
        /// Second-moment decay.
        beta2: f32,
        /// Denominator epsilon.
        eps: f32,
    },
}

#[derive(Debug, Clone, Default)]
struct Slot {
    m: Vec<f32>,
    v: Vec<f32>,
    t: u64,
}

/// Dense optimizer with per-parameter state, keyed by parameter name.
#[derive(Debug, Clone)]
pub struct DenseOptimizer {
    /// Rule and hyper-parameters.
    pub kind: OptimizerKind,
    slots: HashMap<String, Slot>,
}

impl DenseOptimizer {
    /// Optimizer with rule `kind`.
    pub fn new(kind: OptimizerKind) -> Self {
        DenseOptimizer {
            kind,
            slots: HashMap::new(),
        }
    }

    /// SGD with learning rate `lr`.
    pub fn sgd(lr: f32) -> Self {
        Self::new(OptimizerKind::Sgd { lr })
    }

    /// Adagrad with learning rate `lr` (eps 1e-8, initial accumulator 0.1).
    pub fn adagrad(lr: f32) -> Self {
        Self::new(OptimizerKind::Adagrad {
            lr,
            eps: 1e-8,
            init_acc: 0.1,
        })
    }

    /// Adam with learning rate `lr` (0.9, 0.999, 1e-8).
    pub fn adam(lr: f32) -> Self {
        Self::new(OptimizerKind::Adam {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        })
    }

    /// Updates `param` in place with `grad` (state kept under `name`).
    pub fn update(&mut self, name: &str, param: &mut [f32], grad: &[f32]) {
        assert_eq!(
            param.len(),
            grad.len(),
            "optimizer: `{name}` param/grad length"
        );
        let n = param.len();
        let slot = self.slots.entry(name.to_string()).or_default();
        match self.kind {
            OptimizerKind::Sgd { lr } => rules::sgd(param, grad, lr),
            OptimizerKind::Adagrad { lr, eps, init_acc } => {
                if slot.v.len() != n {
                    slot.v = vec![init_acc; n];
                }
                rules::adagrad(param, &mut slot.v, grad, lr, eps);
            }
            OptimizerKind::Adam {
                lr,
                beta1,
                beta2,
                eps,
            } => {
                if slot.m.len() != n {
                    slot.m = vec![0.0; n];
                    slot.v = vec![0.0; n];
                }
                slot.t += 1;
                let c1 = 1.0 - beta1.powi(slot.t as i32);
                let c2 = 1.0 - beta2.powi(slot.t as i32);
                rules::adam(
                    param,
                    &mut slot.m,
                    &mut slot.v,
                    grad,
                    lr,
                    beta1,
                    beta2,
                    eps,
                    c1,
                    c2,
                );
            }
        }
    }

    /// Applies `grads` (as in `StepOutput::dense_grads`) to `model`'s dense
    /// parameters: reads each, updates it, writes it back.
    pub fn apply(&mut self, model: &mut dyn CtrModel, grads: &[(String, Vec<f32>)]) -> Result<()> {
        let mut params: HashMap<String, Vec<f32>> = model.dense_params().into_iter().collect();
        for (name, g) in grads {
            let p = params
                .get_mut(name)
                .ok_or_else(|| ModelError::UnknownParam(name.clone()))?;
            if p.len() != g.len() {
                return Err(ModelError::ParamShape {
                    name: name.clone(),
                    expected: p.len(),
                    actual: g.len(),
                });
            }
            self.update(name, p, g);
            model.set_dense(name, p)?;
        }
        Ok(())
    }
}

impl DenseOptimizer {
    /// Applies the gradients in `grads` to the named `Var`s `params` (in-process
    /// training of models that own all their parameters, e.g. GRU4Rec).
    /// Parameters without a gradient are left unchanged.
    pub fn apply_to_vars(
        &mut self,
        params: &[(String, candle_core::Var)],
        grads: &candle_core::backprop::GradStore,
    ) -> candle_core::Result<()> {
        for (name, var) in params {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let t = var.as_tensor();
            let mut p = crate::layer::params::to_f32_vec(t)?;
            let g = crate::layer::params::to_f32_vec(g)?;
            self.update(name, &mut p, &g);
            let new =
                candle_core::Tensor::from_vec(p, t.shape(), t.device())?.to_dtype(t.dtype())?;
            var.set(&new)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_move_against_the_gradient() {
        for mut o in [
            DenseOptimizer::sgd(0.1),
            DenseOptimizer::adagrad(1.0),
            DenseOptimizer::adam(0.1),
        ] {
            // Minimise (w - 3)^2.
            let mut w = vec![0.0f32];
            for _ in 0..500 {
                let g = vec![2.0 * (w[0] - 3.0)];
                o.update("w", &mut w, &g);
            }
            assert!((w[0] - 3.0).abs() < 0.05, "{:?}: {}", o.kind, w[0]);
        }
        let mut o = DenseOptimizer::sgd(0.5);
        let mut w = vec![1.0, 2.0];
        o.update("w", &mut w, &[1.0, -2.0]);
        assert_eq!(w, vec![0.5, 3.0]);
    }
}
