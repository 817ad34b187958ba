//! GRU4Rec: session-based next-item recommendation (Hidasi et al., ICLR'16).
//!
//! One GRU layer (hidden 100) over item embeddings `x_t = E[i_t]`;
//! score of item `j` after step `t`: `r_j = h_t . W_y[j] + b_y[j]`.
//!
//! Training uses session-parallel mini-batches ([`SessionBatcher`]): slot `s`
//! of the batch runs one sequence; when it ends, the next sequence takes the
//! slot and the slot's hidden state is reset to 0. Each step is one GRU step
//! whose state is carried (detached) to the next step. Candidates of a step
//! are the targets of all active slots (in-batch negatives) plus `n_sample`
//! extra items drawn with probability `∝ count^sample_alpha`. With `r_i` the
//! target's score and `j` ranging over the row's negatives:
//! - cross-entropy (default): `-log softmax(r)_target` over all candidates;
//! - BPR-max: `-log sum_j s_j sigmoid(r_i - r_j) + bpreg * sum_j s_j r_j^2`,
//!   `s = softmax` over the negatives;
//! - TOP1: `mean_j [sigmoid(r_j - r_i) + sigmoid(r_j^2)]`.
//!
//! Dense parameters (all in-process, Adagrad): `emb` `[N, E]`, `gru.*`,
//! `w_y` `[N, H]`, `b_y` `[N]`. Item ids (u64) are mapped to `0..N` in order of
//! first appearance in the training sequences.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor, Var, D};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::optim::DenseOptimizer;
use crate::layer::gru::Gru;
use crate::layer::params::{Init, ParamBuilder, ParamSet};
use crate::metrics::{rank_of, RankingMetrics};

/// GRU4Rec ranking loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RankLoss {
    /// Softmax cross-entropy over the candidates.
    #[default]
    CrossEntropy,
    /// BPR-max.
    BprMax,
    /// TOP1.
    Top1,
}

/// GRU4Rec hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Gru4RecConfig {
    /// GRU hidden size (100).
    pub hidden: usize,
    /// Item embedding width (64).
    pub emb_dim: usize,
    /// Session-parallel batch size (32).
    pub batch_size: usize,
    /// Loss (`"cross-entropy"`, `"bpr-max"`, `"top1"`).
    pub loss: RankLoss,
    /// Extra popularity-sampled negatives per step (0).
    pub n_sample: usize,
    /// Popularity exponent of the extra samples (0.75).
    pub sample_alpha: f64,
    /// BPR-max score regularisation (1.0).
    pub bpreg: f64,
    /// Adagrad learning rate (0.05).
    pub lr: f32,
    /// Init and sampling seed (42).
    pub seed: u64,
}

impl Default for Gru4RecConfig {
    fn default() -> Self {
        Gru4RecConfig {
            hidden: 100,
            emb_dim: 64,
            batch_size: 32,
            loss: RankLoss::CrossEntropy,
            n_sample: 0,
            sample_alpha: 0.75,
            bpreg: 1.0,
            lr: 0.05,
            seed: 42,
        }
    }
}

/// One session-parallel step: for each active slot, the input item, the
/// target (next) item and whether the slot's state must be reset first.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SessionStep {
    /// Active slot ids.
    pub slots: Vec<usize>,
    /// Input item index per active slot.
    pub inputs: Vec<usize>,
    /// Target item index per active slot.
    pub targets: Vec<usize>,
    /// Reset the slot's hidden state before this step.
    pub reset: Vec<bool>,
}

/// Session-parallel mini-batches over sequences of item indices (sequences
/// shorter than 2 are skipped). Slots whose sequence ends take the next
/// sequence (with a reset); when none is left the slot goes idle and the
/// batch shrinks.
#[derive(Debug, Clone)]
pub struct SessionBatcher<'a> {
    seqs: &'a [Vec<usize>],
    next: usize,
    /// Per slot: (sequence, position of the next input, fresh).
    slots: Vec<Option<(usize, usize, bool)>>,
}

impl<'a> SessionBatcher<'a> {
    /// A batcher with `batch_size` slots over `seqs`.
    pub fn new(seqs: &'a [Vec<usize>], batch_size: usize) -> Self {
        let mut b = SessionBatcher {
            seqs,
            next: 0,
            slots: vec![None; batch_size],
        };
        for s in 0..batch_size {
            b.slots[s] = b.take_next();
        }
        b
    }

    fn take_next(&mut self) -> Option<(usize, usize, bool)> {
        while self.next < self.seqs.len() {
            let i = self.next;
            self.next += 1;
            if self.seqs[i].len() >= 2 {
                return Some((i, 0, true));
            }
        }
        None
    }
}

impl Iterator for SessionBatcher<'_> {
    type Item = SessionStep;

    fn next(&mut self) -> Option<SessionStep> {
        let mut st = SessionStep::default();
        for s in 0..self.slots.len() {
            if let Some((q, p, fresh)) = self.slots[s] {
                st.slots.push(s);
                st.inputs.push(self.seqs[q][p]);
                st.targets.push(self.seqs[q][p + 1]);
                st.reset.push(fresh);
                self.slots[s] = if p + 2 < self.seqs[q].len() {
                    Some((q, p + 1, false))
                } else {
                    self.take_next()
                };
            }
        }
        (!st.slots.is_empty()).then_some(st)
    }
}

/// The GRU4Rec model with its item vocabulary, slot states and optimizer.
#[derive(Debug)]
pub struct Gru4Rec {
    /// Hyper-parameters.
    pub cfg: Gru4RecConfig,
    /// Item id -> index.
    pub vocab: HashMap<u64, usize>,
    /// Item index -> id.
    pub ids: Vec<u64>,
    /// Item embeddings `[N, E]`.
    pub emb: Var,
    /// The GRU.
    pub gru: Gru,
    /// Output weights `[N, H]`.
    pub w_y: Var,
    /// Output biases `[N]`.
    pub b_y: Var,
    params: ParamSet,
    cum_pop: Vec<f64>,
    opt: DenseOptimizer,
    rng: StdRng,
    dtype: DType,
    device: Device,
}

impl Gru4Rec {
    /// Builds the model over the items of `train` (user sequences of ids), `f32`.
    pub fn new(cfg: &Gru4RecConfig, train: &[Vec<u64>], device: &Device) -> Result<Self> {
        Self::with_dtype(cfg, train, device, DType::F32)
    }

    /// As [`Self::new`] in `dtype`.
    pub fn with_dtype(
        cfg: &Gru4RecConfig,
        train: &[Vec<u64>],
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let mut vocab = HashMap::new();
        let mut ids = Vec::new();
        let mut counts: Vec<f64> = Vec::new();
        for s in train {
            for &i in s {
                let k = *vocab.entry(i).or_insert_with(|| {
                    ids.push(i);
                    counts.push(0.0);
                    ids.len() - 1
                });
                counts[k] += 1.0;
            }
        }
        let n = ids.len().max(1);
        let pb = ParamBuilder::new(dtype, device, cfg.seed);
        let emb = pb.var("emb", (n, cfg.emb_dim), Init::Uniform(0.1))?;
        let gru = Gru::new(cfg.emb_dim, cfg.hidden, &pb.pp("gru"))?;
        let w_y = pb.var(
            "w_y",
            (n, cfg.hidden),
            Init::Uniform((6.0 / (n + cfg.hidden) as f64).sqrt()),
        )?;
        let b_y = pb.var("b_y", n, Init::Const(0.0))?;
        let mut cum_pop = Vec::with_capacity(counts.len());
        let mut acc = 0.0;
        for c in &counts {
            acc += c.powf(cfg.sample_alpha);
            cum_pop.push(acc);
        }
        Ok(Gru4Rec {
            cfg: cfg.clone(),
            vocab,
            ids,
            emb,
            gru,
            w_y,
            b_y,
            params: pb.finish(),
            cum_pop,
            opt: DenseOptimizer::adagrad(cfg.lr),
            rng: StdRng::seed_from_u64(cfg.seed ^ 0xabcdef),
            dtype,
            device: device.clone(),
        })
    }

    /// Number of items N.
    pub fn n_items(&self) -> usize {
        self.ids.len()
    }

    /// Named dense parameters.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params.params
    }

    /// Maps id sequences to index sequences, dropping unknown ids.
    pub fn index_sequences(&self, seqs: &[Vec<u64>]) -> Vec<Vec<usize>> {
        seqs.iter()
            .map(|s| {
                s.iter()
                    .filter_map(|i| self.vocab.get(i).copied())
                    .collect()
            })
            .collect()
    }

    fn sample_pop(&mut self, k: usize) -> Vec<usize> {
        let total = *self.cum_pop.last().unwrap_or(&0.0);
        (0..k)
            .map(|_| {
                let x = self.rng.random_range(0.0..total.max(f64::MIN_POSITIVE));
                self.cum_pop
                    .partition_point(|&c| c <= x)
                    .min(self.cum_pop.len() - 1)
            })
            .collect()
    }

    fn ids_tensor(&self, v: &[usize]) -> Result<Tensor> {
        let v: Vec<u32> = v.iter().map(|&i| i as u32).collect();
        let n = v.len();
        Tensor::from_vec(v, n, &self.device)
    }

    /// One GRU step for a session step: new states `[n, H]` from `h_prev`.
    pub fn forward_states(&self, inputs: &[usize], h_prev: &Tensor) -> Result<Tensor> {
        let x = self
            .emb
            .as_tensor()
            .index_select(&self.ids_tensor(inputs)?, 0)?;
        self.gru.step(&x, h_prev)
    }

    /// Loss of states `h` `[n, H]` against `targets` with `extra` sampled
    /// negatives (scalar).
    pub fn loss(&self, h: &Tensor, targets: &[usize], extra: &[usize]) -> Result<Tensor> {
        let n = targets.len();
        let mut cands = targets.to_vec();
        cands.extend_from_slice(extra);
        let c = cands.len();
        let ct = self.ids_tensor(&cands)?;
        let w = self.w_y.as_tensor().index_select(&ct, 0)?; // [C, H]
        let b = self.b_y.as_tensor().index_select(&ct, 0)?; // [C]
        let r = h.matmul(&w.t()?)?.broadcast_add(&b)?; // [n, C]
        let mut eye = vec![0f64; n * c];
        for i in 0..n {
            eye[i * c + i] = 1.0;
        }
        let eye = Tensor::from_vec(eye, (n, c), &self.device)?.to_dtype(self.dtype)?;
        let neg = eye.affine(-1.0, 1.0)?;
        let pos = (&r * &eye)?.sum_keepdim(1)?; // [n, 1]
        let n_neg = (c - 1).max(1) as f64;
        match self.cfg.loss {
            RankLoss::CrossEntropy => {
                let lsm = candle_nn::ops::log_softmax(&r, D::Minus1)?;
                (lsm * &eye)?.sum_all()?.affine(-1.0 / n as f64, 0.0)
            }
            RankLoss::Top1 => {
                let diff = r.broadcast_sub(&pos)?;
                let t = (candle_nn::ops::sigmoid(&diff)? + candle_nn::ops::sigmoid(&r.sqr()?)?)?;
                (t * &neg)?.sum_all()?.affine(1.0 / (n as f64 * n_neg), 0.0)
            }
            RankLoss::BprMax => {
                // Softmax over the negatives only.
                let masked = ((&r * &neg)? + (&eye * -1e9)?)?;
                let s = candle_nn::ops::softmax(&masked, D::Minus1)?;
                let sig = candle_nn::ops::sigmoid(&pos.broadcast_sub(&r)?)?;
                let inner = (&s * sig)?.sum(1)?; // [n]
                let nll = inner.affine(1.0, 1e-24)?.log()?.neg()?;
                let reg = (&s * r.sqr()?)?.sum(1)?.affine(self.cfg.bpreg, 0.0)?;
                (nll + reg)?.mean_all()
            }
        }
    }

    /// One training pass over `train` (index sequences) with session-parallel
    /// batches; Adagrad on all parameters. Returns the mean loss per step.
    pub fn train_epoch(&mut self, train: &[Vec<usize>]) -> Result<f32> {
        let (bs, hd) = (self.cfg.batch_size, self.cfg.hidden);
        let mut hidden = vec![vec![0f32; hd]; bs];
        let (mut total, mut steps) = (0f64, 0usize);
        for st in SessionBatcher::new(train, bs) {
            let mut h0 = Vec::with_capacity(st.slots.len() * hd);
            for (k, &s) in st.slots.iter().enumerate() {
                if st.reset[k] {
                    hidden[s].iter_mut().for_each(|v| *v = 0.0);
                }
                h0.extend_from_slice(&hidden[s]);
            }
            let h0 =
                Tensor::from_vec(h0, (st.slots.len(), hd), &self.device)?.to_dtype(self.dtype)?;
            let extra = self.sample_pop(self.cfg.n_sample);
            let h = self.forward_states(&st.inputs, &h0)?;
            let loss = self.loss(&h, &st.targets, &extra)?;
            let grads = loss.backward()?;
            let params = self.params.params.clone();
            self.opt.apply_to_vars(&params, &grads)?;
            let hv = h.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            for (k, &s) in st.slots.iter().enumerate() {
                hidden[s].copy_from_slice(&hv[k]);
            }
            total += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            steps += 1;
        }
        Ok((total / steps.max(1) as f64) as f32)
    }

    /// Recall@K and MRR@K of next-item prediction over `test` (index
    /// sequences), ranking every item (session-parallel, no training).
    pub fn evaluate(&self, test: &[Vec<usize>], k: usize) -> Result<RankingMetrics> {
        let (bs, hd) = (self.cfg.batch_size, self.cfg.hidden);
        let mut hidden = vec![vec![0f32; hd]; bs];
        let mut m = RankingMetrics::new(k);
        for st in SessionBatcher::new(test, bs) {
            let mut h0 = Vec::with_capacity(st.slots.len() * hd);
            for (j, &s) in st.slots.iter().enumerate() {
                if st.reset[j] {
                    hidden[s].iter_mut().for_each(|v| *v = 0.0);
                }
                h0.extend_from_slice(&hidden[s]);
            }
            let h0 =
                Tensor::from_vec(h0, (st.slots.len(), hd), &self.device)?.to_dtype(self.dtype)?;
            let h = self.forward_states(&st.inputs, &h0)?;
            let scores = h
                .matmul(&self.w_y.as_tensor().t()?)?
                .broadcast_add(self.b_y.as_tensor())?
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?;
            for (j, row) in scores.iter().enumerate() {
                m.add_rank(rank_of(row, st.targets[j]));
            }
            let hv = h.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            for (j, &s) in st.slots.iter().enumerate() {
                hidden[s].copy_from_slice(&hv[j]);
            }
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::gradcheck::{assert_ok, check};

    #[test]
    fn batcher_resets_on_session_change() {
        let seqs = vec![vec![1, 2, 3], vec![4], vec![5, 6], vec![7, 8, 9]];
        let steps: Vec<SessionStep> = SessionBatcher::new(&seqs, 2).collect();
        // Slot 0: seq 0 (1->2, 2->3), then idle; slot 1: seq 2 (5->6), then
        // seq 3 (7->8 with a reset, 8->9). Seq 1 is too short.
        assert_eq!(steps[0].inputs, vec![1, 5]);
        assert_eq!(steps[0].targets, vec![2, 6]);
        assert_eq!(steps[0].reset, vec![true, true]);
        assert_eq!(steps[1].slots, vec![0, 1]);
        assert_eq!(steps[1].inputs, vec![2, 7]);
        assert_eq!(steps[1].reset, vec![false, true]);
        assert_eq!(steps[2].slots, vec![1]);
        assert_eq!(
            (steps[2].inputs.clone(), steps[2].targets.clone()),
            (vec![8], vec![9])
        );
        assert_eq!(steps[2].reset, vec![false]);
        assert_eq!(steps.len(), 3);
    }

    fn toy(n: u64, users: usize, len: usize, seed: u64) -> Vec<Vec<u64>> {
        // Next item is (i + 1) mod n with probability 0.8.
        let mut rng = StdRng::seed_from_u64(seed);
        (0..users)
            .map(|_| {
                let mut i = rng.random_range(0..n);
                (0..len)
                    .map(|_| {
                        let cur = i;
                        i = if rng.random_bool(0.8) {
                            (i + 1) % n
                        } else {
                            rng.random_range(0..n)
                        };
                        cur + 1
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn losses_gradcheck() {
        let seqs = toy(9, 4, 4, 1);
        for loss in [RankLoss::CrossEntropy, RankLoss::BprMax, RankLoss::Top1] {
            let cfg = Gru4RecConfig {
                hidden: 4,
                emb_dim: 3,
                loss,
                ..Default::default()
            };
            let m = Gru4Rec::with_dtype(&cfg, &seqs, &Device::Cpu, DType::F64).unwrap();
            let h0 = Tensor::from_vec(
                vec![
                    0.1f64, -0.2, 0.3, 0.0, 0.2, 0.1, -0.1, 0.4, 0.0, 0.0, 0.5, -0.3,
                ],
                (3, 4),
                &Device::Cpu,
            )
            .unwrap();
            let f = || m.loss(&m.forward_states(&[0, 1, 2], &h0)?, &[1, 2, 3], &[4, 5]);
            let rep = check(m.params(), f, 30, 1e-5, 1e-3).unwrap();
            assert_ok(&format!("gru4rec {loss:?}"), &rep);
        }
    }

    #[test]
    fn learns_a_sequential_pattern() {
        let n = 40;
        let train = toy(n, 300, 12, 2);
        let test = toy(n, 60, 12, 3);
        for loss in [RankLoss::CrossEntropy, RankLoss::BprMax, RankLoss::Top1] {
            let cfg = Gru4RecConfig {
                hidden: 32,
                emb_dim: 16,
                loss,
                n_sample: 8,
                lr: 0.1,
                ..Default::default()
            };
            let mut m = Gru4Rec::new(&cfg, &train, &Device::Cpu).unwrap();
            let (tr, te) = (m.index_sequences(&train), m.index_sequences(&test));
            let before = m.evaluate(&te, 5).unwrap().recall();
            for _ in 0..3 {
                m.train_epoch(&tr).unwrap();
            }
            let after = m.evaluate(&te, 5).unwrap();
            eprintln!(
                "gru4rec {loss:?}: recall@5 {before:.3} -> {:.3}, mrr@5 {:.3}",
                after.recall(),
                after.mrr()
            );
            // The pattern alone gives ~0.8; random ranking gives 5/40. TOP1
            // learns slowest (as in the GRU4Rec papers).
            let want = match loss {
                RankLoss::CrossEntropy => 0.6,
                RankLoss::BprMax => 0.5,
                RankLoss::Top1 => 0.3,
            };
            assert!(
                after.recall() > want,
                "{loss:?}: recall@5 {}",
                after.recall()
            );
        }
    }
}
