//! Named dense parameters and state with deterministic (seeded) initialisation.
//!
//! A [`ParamBuilder`] plays the role of candle-nn's `VarBuilder`: every
//! parameter gets a stable dotted name (`mlp.fc0.weight`), which is also its
//! name on the parameter server and in checkpoints. Unlike `VarBuilder` it
//! draws initial values from a seeded RNG, so a model built twice with the same
//! seed is identical, and it keeps trained parameters apart from non-trained
//! *state* (Dice running statistics).

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::{Arc, Mutex};

/// How to initialise a parameter.
#[derive(Debug, Clone, Copy)]
pub enum Init {
    /// Every entry equals the constant.
    Const(f64),
    /// Uniform in `[-bound, bound]`.
    Uniform(f64),
    /// Glorot/Xavier uniform for a `[fan_in, fan_out]` weight:
    /// bound `sqrt(6 / (fan_in + fan_out))`.
    Glorot,
    /// Uniform with bound `left` in the columns `< split` of the last
    /// dimension and `right` in the others (TF1 GRU kernels: gates and
    /// candidate drawn with their own Glorot bounds).
    SplitColumns {
        /// First column of the `right` block.
        split: usize,
        /// Bound of the columns before `split`.
        left: f64,
        /// Bound of the columns from `split` on.
        right: f64,
    },
}

#[derive(Debug)]
struct Inner {
    dtype: DType,
    device: Device,
    rng: StdRng,
    params: Vec<(String, Var)>,
    state: Vec<(String, Var)>,
}

/// Creates named parameters under a dotted prefix; cheap to clone.
#[derive(Debug, Clone)]
pub struct ParamBuilder {
    inner: Arc<Mutex<Inner>>,
    prefix: String,
}

/// The named parameters and state a builder created, in creation order.
#[derive(Debug, Clone, Default)]
pub struct ParamSet {
    /// Trained parameters.
    pub params: Vec<(String, Var)>,
    /// Non-trained state (exported with the parameters, e.g. Dice running stats).
    pub state: Vec<(String, Var)>,
}

impl ParamBuilder {
    /// A root builder for `dtype` on `device`, seeded with `seed`.
    pub fn new(dtype: DType, device: &Device, seed: u64) -> Self {
        ParamBuilder {
            inner: Arc::new(Mutex::new(Inner {
                dtype,
                device: device.clone(),
                rng: StdRng::seed_from_u64(seed),
                params: Vec::new(),
                state: Vec::new(),
            })),
            prefix: String::new(),
        }
    }

    /// A builder whose names are prefixed with `name.`.
    pub fn pp(&self, name: &str) -> Self {
        ParamBuilder {
            inner: self.inner.clone(),
            prefix: self.path(name),
        }
    }

    /// The full dotted name of `name` under this builder.
    pub fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    /// The dtype of created tensors.
    pub fn dtype(&self) -> DType {
        self.inner.lock().expect("param builder lock").dtype
    }

    /// The device of created tensors.
    pub fn device(&self) -> Device {
        self.inner
            .lock()
            .expect("param builder lock")
            .device
            .clone()
    }

    fn values(&self, n: usize, shape: &Shape, init: Init) -> Vec<f64> {
        let mut g = self.inner.lock().expect("param builder lock");
        match init {
            Init::Const(c) => vec![c; n],
            Init::Uniform(b) => (0..n).map(|_| g.rng.random_range(-b..=b)).collect(),
            Init::Glorot => {
                let dims = shape.dims();
                let (fi, fo) = match dims {
                    [a, b] => (*a, *b),
                    [a] => (*a, 1),
                    _ => (n, 1),
                };
                let b = (6.0 / (fi + fo) as f64).sqrt();
                (0..n).map(|_| g.rng.random_range(-b..=b)).collect()
            }
            Init::SplitColumns { split, left, right } => {
                let cols = shape.dims().last().copied().unwrap_or(1).max(1);
                (0..n)
                    .map(|i| {
                        let b = if i % cols < split { left } else { right };
                        g.rng.random_range(-b..=b)
                    })
                    .collect()
            }
        }
    }

    fn make(&self, name: &str, shape: impl Into<Shape>, init: Init, state: bool) -> Result<Var> {
        let shape: Shape = shape.into();
        let vals = self.values(shape.elem_count(), &shape, init);
        let (dtype, device) = (self.dtype(), self.device());
        let t = Tensor::from_vec(vals, shape, &device)?.to_dtype(dtype)?;
        let v = Var::from_tensor(&t)?;
        let mut g = self.inner.lock().expect("param builder lock");
        let list = if state { &mut g.state } else { &mut g.params };
        list.push((self.path(name), v.clone()));
        Ok(v)
    }

    /// Creates a trained parameter `prefix.name`.
    pub fn var(&self, name: &str, shape: impl Into<Shape>, init: Init) -> Result<Var> {
        self.make(name, shape, init, false)
    }

    /// Creates a non-trained state tensor `prefix.name`.
    pub fn state(&self, name: &str, shape: impl Into<Shape>, init: Init) -> Result<Var> {
        self.make(name, shape, init, true)
    }

    /// Everything created so far by this builder and its children.
    pub fn finish(&self) -> ParamSet {
        let g = self.inner.lock().expect("param builder lock");
        ParamSet {
            params: g.params.clone(),
            state: g.state.clone(),
        }
    }
}

/// Copies a tensor of any float dtype to a flat `Vec<f32>`.
pub fn to_f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()
}

/// Total number of scalar entries of a parameter list.
pub fn param_count(params: &[(String, Var)]) -> usize {
    params.iter().map(|(_, v)| v.as_tensor().elem_count()).sum()
}
