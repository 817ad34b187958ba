//! GRU4Rec trained through the parameter-server shards (`ember train` with
//! `[model] kind = "gru4rec"`).
//!
//! The item tables are sparse tables on the shards, keyed by item id:
//! [`EMB_TABLE`] (input embeddings `E[i]`, width `emb_dim`), [`OUT_TABLE`]
//! (output weights `W_y[j]`, width `hidden`, Glorot-uniform init) and
//! [`BIAS_TABLE`] (`b_y[j]`, width 1, zero init), all with the job's sparse
//! optimizer. The GRU (`gru.w_ih`, `gru.w_hh`, `gru.bias`) is dense, on the
//! shards too, applied asynchronously (every push at once): session-parallel
//! workers run different numbers of steps per epoch, so there is no common
//! step to average at.
//!
//! One step of one worker ([`SeqWorker::train_epoch`]): the session-parallel
//! batch of its slots ([`SessionBatcher`]); pull the rows of the distinct
//! input items and of the distinct candidates (the step's targets plus
//! `n_sample` items drawn from popularity, shared by the batch) and the
//! latest dense GRU; one GRU step from the slots' carried states; the
//! ranking loss of [`rank_loss`] (logQ-corrected); backward; push the rows'
//! gradients (summed over their occurrences, with the occurrence counts) and
//! the GRU's. Workers split the sequences of each epoch's shuffled order
//! (worker `w` of `M` takes positions `w, w + M, ...`).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use ember_proto::v1 as pb;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::backend::Backend;
use super::config::SparseConfig;
use super::TrainError;
use crate::model::gru4rec::{
    dropout, log_q_tensor, output_init_scale, rank_loss, BatcherState, Gru4Rec, Gru4RecConfig,
    ItemStats, SessionBatcher,
};
use crate::model::layer::gru::Gru;
use crate::model::layer::params::to_f32_vec;
use crate::model::layer::params::ParamBuilder;
use crate::model::ModelError;

/// Input item embeddings `E` (width `emb_dim`).
pub const EMB_TABLE: &str = "gru4rec_emb";
/// Output item weights `W_y` (width `hidden`).
pub const OUT_TABLE: &str = "gru4rec_out";
/// Output item biases `b_y` (width 1).
pub const BIAS_TABLE: &str = "gru4rec_bias";

fn model_err(e: candle_core::Error) -> TrainError {
    TrainError::Model(ModelError::from(e))
}

/// Checks that `cfg` can train through the shards (names the bad field).
pub fn validate(cfg: &Gru4RecConfig) -> Result<(), String> {
    if cfg.constrained_embedding {
        return Err(
            "model.constrained_embedding = true is not supported through the shards \
             (the input and output tables would be one table pushed twice per step); \
             use `ember gru4rec` for it"
                .into(),
        );
    }
    if cfg.hidden == 0 || cfg.emb_dim == 0 || cfg.batch_size == 0 {
        return Err("model.hidden, model.emb_dim and model.batch_size must be >= 1".into());
    }
    if !(0.0..1.0).contains(&cfg.dropout_hidden) {
        return Err(format!(
            "model.dropout_hidden = {}: must be in [0, 1)",
            cfg.dropout_hidden
        ));
    }
    Ok(())
}

/// The three table configs for a catalogue of `n_items` items.
pub fn tables(
    cfg: &Gru4RecConfig,
    sparse: &SparseConfig,
    n_items: usize,
    seed: u64,
) -> Vec<pb::TableConfig> {
    let emb = sparse.table(EMB_TABLE, cfg.emb_dim, seed);
    let mut out = sparse.table(OUT_TABLE, cfg.hidden, seed);
    out.init = Some(pb::Initializer {
        kind: pb::initializer::Kind::Uniform as i32,
        scale: output_init_scale(n_items.max(1), cfg.hidden) as f32,
    });
    let mut bias = sparse.table(BIAS_TABLE, 1, seed);
    bias.init = Some(pb::Initializer {
        kind: pb::initializer::Kind::Zero as i32,
        scale: 0.0,
    });
    vec![emb, out, bias]
}

/// The GRU of the model (names `gru.*`, the layout of the in-process
/// [`Gru4Rec`]), initialised from `seed`.
fn build_gru(cfg: &Gru4RecConfig, seed: u64) -> Result<(Gru, Vec<(String, Var)>), TrainError> {
    let pb = ParamBuilder::new(DType::F32, &Device::Cpu, seed);
    let gru = Gru::new(cfg.emb_dim, cfg.hidden, &pb.pp("gru")).map_err(model_err)?;
    Ok((gru, pb.finish().params))
}

/// The dense GRU parameters at initialisation (what the launcher registers).
pub fn initial_dense(
    cfg: &Gru4RecConfig,
    seed: u64,
) -> Result<Vec<(String, Vec<f32>)>, TrainError> {
    let (_, params) = build_gru(cfg, seed)?;
    params
        .iter()
        .map(|(n, v)| Ok((n.clone(), to_f32_vec(v.as_tensor()).map_err(model_err)?)))
        .collect()
}

/// Sets `vars` from pulled dense values (by name; unknown names are an error).
fn load_vars(vars: &[(String, Var)], values: &[(String, Vec<f32>)]) -> Result<(), TrainError> {
    let by_name: HashMap<&str, &Var> = vars.iter().map(|(n, v)| (n.as_str(), v)).collect();
    for (name, v) in values {
        let var = by_name.get(name.as_str()).ok_or_else(|| {
            TrainError::Protocol(format!("dense parameter {name} is not part of GRU4Rec"))
        })?;
        let t = Tensor::from_vec(v.clone(), var.shape(), &Device::Cpu).map_err(model_err)?;
        var.set(&t).map_err(model_err)?;
    }
    Ok(())
}

/// Distinct values of `xs` in first-seen order, each position's index into
/// them, and each distinct value's number of occurrences.
fn dedup(xs: &[usize]) -> (Vec<usize>, Vec<u32>, Vec<u32>) {
    let mut at: HashMap<usize, u32> = HashMap::with_capacity(xs.len());
    let (mut uniq, mut pos, mut counts) = (Vec::new(), Vec::with_capacity(xs.len()), Vec::new());
    for &x in xs {
        let k = *at.entry(x).or_insert_with(|| {
            uniq.push(x);
            counts.push(0);
            (uniq.len() - 1) as u32
        });
        counts[k as usize] += 1;
        pos.push(k);
    }
    (uniq, pos, counts)
}

fn epoch_rng(seed: u64, index: usize, epoch: usize) -> StdRng {
    let key = ((index as u64) << 32) ^ epoch as u64;
    StdRng::seed_from_u64(ember_proto::rng::derive_seed(seed ^ 0x5e9_5a3b, key))
}

/// The generator of a segment that starts after `done` steps of the epoch
/// ([`epoch_rng`] at the epoch's start): a function of where the segment
/// starts only, so a run resumed from a mid-epoch checkpoint draws what the
/// uninterrupted run drew.
fn segment_rng(seed: u64, index: usize, epoch: usize, done: u64) -> StdRng {
    if done == 0 {
        return epoch_rng(seed, index, epoch);
    }
    let key = ((index as u64) << 32) ^ epoch as u64;
    StdRng::seed_from_u64(ember_proto::rng::derive_seed(
        seed ^ 0x5e9_5a3c ^ done.rotate_left(17),
        key,
    ))
}

/// Where one worker stands inside an epoch: what a mid-epoch checkpoint
/// keeps of it (its parameters are all on the shards).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SeqCursor {
    /// The epoch (from 1).
    pub epoch: usize,
    /// Steps trained in this epoch.
    pub steps: u64,
    /// Sum of those steps' mean losses.
    pub loss_sum: f64,
    /// The session-parallel batcher's position.
    pub batcher: BatcherState,
    /// Each slot's carried hidden state (`[H]` per slot).
    pub hidden: Vec<Vec<f32>>,
}

impl SeqCursor {
    /// Whether the worker's share of the epoch is trained (every slot idle).
    pub fn done(&self) -> bool {
        self.batcher.slots.iter().all(Option::is_none)
    }

    /// What the epoch did so far.
    pub fn stats(&self) -> SeqEpochStats {
        SeqEpochStats {
            steps: self.steps,
            loss_sum: self.loss_sum,
        }
    }
}

/// What one worker's epoch did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SeqEpochStats {
    /// Steps trained.
    pub steps: u64,
    /// Sum of the per-step mean losses.
    pub loss_sum: f64,
}

impl SeqEpochStats {
    /// Mean loss per step.
    pub fn mean_loss(&self) -> f64 {
        self.loss_sum / self.steps.max(1) as f64
    }
}

/// One GRU4Rec worker: its slots' hidden states live here, every parameter
/// on the shards.
#[derive(Debug)]
pub struct SeqWorker {
    cfg: Gru4RecConfig,
    items: Arc<ItemStats>,
    ps: Backend,
    gru: Gru,
    gru_params: Vec<(String, Var)>,
    index: usize,
    workers: usize,
    seed: u64,
    rng: StdRng,
    /// Steps this worker has pushed (the `step` of its pushes).
    pub step: u64,
}

impl SeqWorker {
    /// Worker `index` of `workers` (seeded by `seed`).
    pub fn new(
        cfg: &Gru4RecConfig,
        items: Arc<ItemStats>,
        ps: Backend,
        index: usize,
        workers: usize,
        seed: u64,
    ) -> Result<Self, TrainError> {
        let (gru, gru_params) = build_gru(cfg, seed)?;
        Ok(SeqWorker {
            cfg: cfg.clone(),
            items,
            ps,
            gru,
            gru_params,
            index,
            workers: workers.max(1),
            seed,
            rng: epoch_rng(seed, index, 0),
            step: 0,
        })
    }

    /// The sequences this worker trains in `epoch`: its share of the epoch's
    /// shuffled order (the same order on every worker).
    pub fn share(&self, n: usize, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        if self.cfg.shuffle {
            order.shuffle(&mut StdRng::seed_from_u64(self.seed ^ epoch as u64));
        }
        order
            .into_iter()
            .skip(self.index)
            .step_by(self.workers)
            .collect()
    }

    /// Trains this worker's share of `train` (index sequences of
    /// [`ItemStats`]) for `epoch` (from 1).
    pub async fn train_epoch(
        &mut self,
        train: &[Vec<usize>],
        epoch: usize,
    ) -> Result<SeqEpochStats, TrainError> {
        Ok(self.train_segment(train, epoch, None, 0).await?.stats())
    }

    /// Trains at most `max_steps` steps (0: no limit) of this worker's share
    /// of `epoch`, from `from` (a cursor of this worker in this epoch) or
    /// from the epoch's start; returns where it stopped. Sampling and
    /// dropout depend on (seed, worker, epoch, the steps done before the
    /// segment) only: a rerun after a rollback, or a resume from a saved
    /// cursor, draws the same negatives.
    pub async fn train_segment(
        &mut self,
        train: &[Vec<usize>],
        epoch: usize,
        from: Option<&SeqCursor>,
        max_steps: u64,
    ) -> Result<SeqCursor, TrainError> {
        let (bs, hd) = (self.cfg.batch_size, self.cfg.hidden);
        let order = self.share(train.len(), epoch);
        let (mut batcher, mut cur) = match from {
            None => {
                let cur = SeqCursor {
                    epoch,
                    hidden: vec![vec![0f32; hd]; bs],
                    ..SeqCursor::default()
                };
                (SessionBatcher::with_order(train, order, bs), cur)
            }
            Some(c) => {
                let bad = |why: String| {
                    TrainError::Config(format!(
                        "gru4rec worker {}: saved position does not fit the job: {why}",
                        self.index
                    ))
                };
                if c.epoch != epoch {
                    return Err(bad(format!("it is of epoch {}, not {epoch}", c.epoch)));
                }
                if c.batcher.slots.len() != bs
                    || c.hidden.len() != bs
                    || c.hidden.iter().any(|h| h.len() != hd)
                {
                    return Err(bad(format!(
                        "{} slots with {} states, the model has batch_size {bs} and hidden {hd}",
                        c.batcher.slots.len(),
                        c.hidden.len()
                    )));
                }
                if c.done() {
                    return Ok(c.clone());
                }
                let b = SessionBatcher::resume(train, order, &c.batcher).map_err(bad)?;
                (b, c.clone())
            }
        };
        self.rng = segment_rng(self.seed, self.index, epoch, cur.steps);
        let mut taken = 0u64;
        while max_steps == 0 || taken < max_steps {
            let Some(st) = batcher.next() else {
                break;
            };
            let h0 = st.gather_states(&mut cur.hidden);
            let (loss, h) = self.step_once(&st.inputs, &st.targets, h0).await?;
            st.scatter_states(&mut cur.hidden, &h);
            if !loss.is_finite() {
                return Err(TrainError::NonFiniteLoss {
                    loss: loss as f32,
                    step: self.step,
                });
            }
            cur.steps += 1;
            cur.loss_sum += loss;
            taken += 1;
        }
        cur.batcher = batcher.state();
        Ok(cur)
    }

    /// One step: returns the loss and the new states (row-major `[n, H]`).
    async fn step_once(
        &mut self,
        inputs: &[usize],
        targets: &[usize],
        h0: Vec<f32>,
    ) -> Result<(f64, Vec<f32>), TrainError> {
        let n = targets.len();
        let mut cands = targets.to_vec();
        cands.extend(self.items.sample(&mut self.rng, self.cfg.n_sample));
        let (in_u, in_pos, in_cnt) = dedup(inputs);
        let (c_u, c_pos, c_cnt) = dedup(&cands);
        let ids = |u: &[usize]| -> Vec<u64> { u.iter().map(|&i| self.items.ids[i]).collect() };
        let (in_ids, c_ids) = (ids(&in_u), ids(&c_u));
        let (emb, out, bias, dense) = tokio::try_join!(
            self.ps.pull(EMB_TABLE, &in_ids),
            self.ps.pull(OUT_TABLE, &c_ids),
            self.ps.pull(BIAS_TABLE, &c_ids),
            self.ps.pull_dense(0),
        )?;
        load_vars(&self.gru_params, &dense.0)?;
        let dev = Device::Cpu;
        let var = |rows: Vec<f32>, u: usize, d: usize| -> Result<Var, TrainError> {
            Var::from_tensor(&Tensor::from_vec(rows, (u, d), &dev).map_err(model_err)?)
                .map_err(model_err)
        };
        let x_rows = var(emb.0, in_u.len(), self.cfg.emb_dim)?;
        let w_rows = var(out.0, c_u.len(), self.cfg.hidden)?;
        let b_rows = var(bias.0, c_u.len(), 1)?;
        let (loss, h, grads) = (|| {
            let ip = Tensor::from_vec(in_pos, n, &dev)?;
            let cp = Tensor::from_vec(c_pos, cands.len(), &dev)?;
            let x = x_rows.as_tensor().index_select(&ip, 0)?;
            let h0 = Tensor::from_vec(h0, (n, self.cfg.hidden), &dev)?;
            let lq = log_q_tensor(&self.cfg, &self.items, &cands, n, &h0)?;
            let h = self.gru.step(&x, &h0)?;
            let h = dropout(&h, self.cfg.dropout_hidden, &mut self.rng)?;
            let w = w_rows.as_tensor().index_select(&cp, 0)?;
            let b = b_rows.as_tensor().index_select(&cp, 0)?.squeeze(1)?;
            let loss = rank_loss(&self.cfg, &h, &w, &b, lq.as_ref())?;
            let grads = loss.backward()?;
            let lv = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            Ok::<_, candle_core::Error>((lv, h.flatten_all()?.to_vec1::<f32>()?, grads))
        })()
        .map_err(model_err)?;
        let grad_of = |v: &Var| -> Result<Vec<f32>, TrainError> {
            match grads.get(v.as_tensor()) {
                Some(g) => to_f32_vec(g).map_err(model_err),
                None => Ok(vec![0.0; v.elem_count()]),
            }
        };
        let (gx, gw, gb) = (grad_of(&x_rows)?, grad_of(&w_rows)?, grad_of(&b_rows)?);
        let dense_grads: Vec<(String, Vec<f32>)> = self
            .gru_params
            .iter()
            .map(|(name, v)| Ok((name.clone(), grad_of(v)?)))
            .collect::<Result<_, TrainError>>()?;
        let step = self.step;
        tokio::try_join!(
            self.ps.push(EMB_TABLE, &in_ids, &gx, &in_cnt, step),
            self.ps.push(OUT_TABLE, &c_ids, &gw, &c_cnt, step),
            self.ps.push(BIAS_TABLE, &c_ids, &gb, &c_cnt, step),
            // Asynchronous dense updates: applied at once (module docs).
            self.ps.push_dense(&dense_grads, step, 1, 0),
        )?;
        self.step += 1;
        Ok((loss, h))
    }
}

/// The whole model pulled from the shards into an in-process [`Gru4Rec`]
/// over the vocabulary of `train` (for full-ranking evaluation: every
/// item's rows and the GRU).
pub async fn pull_model(
    ps: &Backend,
    cfg: &Gru4RecConfig,
    train: &[Vec<u64>],
) -> Result<Gru4Rec, TrainError> {
    let model = Gru4Rec::new(cfg, train, &Device::Cpu).map_err(model_err)?;
    let ids = model.items.ids.clone();
    let (emb, out, bias, dense) = tokio::try_join!(
        ps.pull(EMB_TABLE, &ids),
        ps.pull(OUT_TABLE, &ids),
        ps.pull(BIAS_TABLE, &ids),
        ps.pull_dense(0),
    )?;
    let set = |v: &Var, rows: Vec<f32>| -> Result<(), TrainError> {
        let t = Tensor::from_vec(rows, v.shape(), &Device::Cpu).map_err(model_err)?;
        v.set(&t).map_err(model_err)
    };
    if let Some(e) = &model.emb {
        set(e, emb.0)?;
    }
    set(&model.w_y, out.0)?;
    set(&model.b_y, bias.0)?;
    load_vars(model.params(), &dense.0)?;
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::config::{InitKind, OptimizerKind, OptimizerSpec};
    use crate::train::local::LocalPs;

    #[test]
    fn dedup_positions_and_counts() {
        let (u, p, c) = dedup(&[5, 3, 5, 5, 9]);
        assert_eq!(u, [5, 3, 9]);
        assert_eq!(p, [0, 1, 0, 0, 2]);
        assert_eq!(c, [3, 1, 1]);
    }

    /// Each item's successor is fixed (`i -> (7 i + 3) mod n`), as in the
    /// in-process test of the same rule.
    fn rule_corpus(n: u64, users: usize, len: usize, seed: u64) -> Vec<Vec<u64>> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..users)
            .map(|_| {
                let mut s = vec![rand::Rng::random_range(&mut rng, 0..n)];
                while s.len() < len {
                    let last = s[s.len() - 1];
                    s.push((7 * last + 3) % n);
                }
                s.into_iter().map(|i| i + 1).collect()
            })
            .collect()
    }

    async fn setup(
        cfg: &Gru4RecConfig,
        train: &[Vec<u64>],
        shards: usize,
    ) -> Result<(Backend, Arc<ItemStats>), TrainError> {
        let ps = Backend::Local(Arc::new(LocalPs::new(shards, None)?));
        let items = Arc::new(ItemStats::new(train, cfg.sample_alpha));
        let sparse = SparseConfig {
            optimizer: OptimizerSpec {
                kind: OptimizerKind::Adagrad,
                lr: cfg.lr,
                initial_accumulator: 0.0,
                eps: 1e-6,
                ..OptimizerSpec::default()
            },
            init: InitKind::Uniform,
            init_scale: 0.1,
            ..SparseConfig::default()
        };
        for t in tables(cfg, &sparse, items.len(), 7) {
            ps.create_table(&t).await?;
        }
        let dense = OptimizerSpec {
            kind: OptimizerKind::Adagrad,
            lr: cfg.lr,
            initial_accumulator: 0.0,
            eps: 1e-6,
            ..OptimizerSpec::default()
        };
        ps.init_dense(&initial_dense(cfg, 7)?, &dense.to_proto())
            .await?;
        Ok((ps, items))
    }

    /// Through two in-process shards and two workers, GRU4Rec learns a
    /// deterministic next-item rule to Recall@1 near 1, and the model
    /// pulled back from the shards ranks with what was trained there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_workers_learn_a_rule_through_the_shards() -> Result<(), TrainError> {
        // The in-process test's corpus and default hyper-parameters, plus
        // sampled negatives with logQ (the shipped config's choice).
        let n = 50;
        let train = rule_corpus(n, 400, 10, 5);
        let cfg = Gru4RecConfig {
            n_sample: 16,
            sample_alpha: 0.5,
            logq: 1.0,
            ..Gru4RecConfig::default()
        };
        let (ps, items) = setup(&cfg, &train, 2).await?;
        let idx = Arc::new(items.index_sequences(&train));
        let mut first_loss = None;
        let mut last_loss = 0.0;
        for epoch in 1..=3 {
            let mut tasks = Vec::new();
            for w in 0..2 {
                let mut wk = SeqWorker::new(&cfg, items.clone(), ps.clone(), w, 2, 7)?;
                wk.step = (epoch * 10_000 + w) as u64;
                let idx = idx.clone();
                tasks.push(tokio::spawn(
                    async move { wk.train_epoch(&idx, epoch).await },
                ));
            }
            let mut loss = 0.0;
            for t in tasks {
                let st = t.await.map_err(|e| TrainError::Task {
                    what: "gru4rec worker",
                    source: e,
                })??;
                assert!(st.steps > 0);
                loss += st.mean_loss() / 2.0;
            }
            first_loss.get_or_insert(loss);
            last_loss = loss;
        }
        let first = first_loss.unwrap_or(0.0);
        assert!(last_loss < first, "loss {first} -> {last_loss}");
        let model = pull_model(&ps, &cfg, &train).await?;
        // Next item of every item under the rule: rank 0 for nearly all.
        let hist: Vec<Vec<usize>> = (1..=n).map(|i| vec![items.vocab[&i]]).collect();
        let hists: Vec<&[usize]> = hist.iter().map(|h| &h[..]).collect();
        let h = model.history_states(&hists).map_err(model_err)?;
        let scores = model.scores_all(&h).map_err(model_err)?;
        let mut hits = 0;
        for (k, row) in scores.iter().enumerate() {
            let i = k as u64 + 1;
            let next = (7 * (i - 1) + 3) % n + 1;
            let t = items.vocab[&next];
            let best = row
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(j, _)| j);
            hits += usize::from(best == Some(t));
        }
        assert!(
            hits >= 45,
            "Recall@1 {hits}/{n} (loss {first} -> {last_loss})"
        );
        Ok(())
    }

    /// Every row and dense value of the model on the shards, in one vector.
    async fn shard_state(ps: &Backend, items: &ItemStats) -> Result<Vec<f32>, TrainError> {
        let mut all = Vec::new();
        for t in [EMB_TABLE, OUT_TABLE, BIAS_TABLE] {
            all.extend(ps.pull(t, &items.ids).await?.0);
        }
        for (_, v) in ps.pull_dense(0).await?.0 {
            all.extend(v);
        }
        Ok(all)
    }

    /// Whether two value lists are equal bit for bit.
    fn bits_equal(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    /// Epoch 1 of one worker in segments of 5 steps: each segment by a fresh
    /// worker from the previous segment's cursor passed through JSON when
    /// `fresh` (a mid-epoch checkpoint and a resume), else by the same worker.
    async fn segmented(
        cfg: &Gru4RecConfig,
        train: &[Vec<u64>],
        fresh: bool,
    ) -> Result<(SeqCursor, usize, Vec<f32>), TrainError> {
        let (ps, items) = setup(cfg, train, 2).await?;
        let idx = items.index_sequences(train);
        let mut wk = SeqWorker::new(cfg, items.clone(), ps.clone(), 0, 1, 7)?;
        let mut cur: Option<SeqCursor> = None;
        let mut segments = 0;
        loop {
            if fresh {
                let step = wk.step;
                wk = SeqWorker::new(cfg, items.clone(), ps.clone(), 0, 1, 7)?;
                wk.step = step;
                cur = cur.map(|c| {
                    let text = serde_json::to_string(&c).unwrap_or_default();
                    serde_json::from_str(&text).unwrap_or_default()
                });
            }
            let c = wk.train_segment(&idx, 1, cur.as_ref(), 5).await?;
            segments += 1;
            if c.done() {
                let state = shard_state(&ps, &items).await?;
                return Ok((c, segments, state));
            }
            cur = Some(c);
        }
    }

    /// A worker resumed from a saved cursor (fresh worker, cursor through
    /// JSON) trains exactly what the same worker trains segment after
    /// segment: the same steps, loss and every shard value bit for bit; the
    /// segments cover the epoch (as many steps as the unsegmented epoch),
    /// and without sampling or dropout they are the unsegmented epoch bit
    /// for bit. A cursor of another epoch or batch size is refused by name.
    #[tokio::test]
    async fn segments_from_saved_cursors_train_like_one_worker() -> Result<(), TrainError> {
        let train = rule_corpus(30, 60, 8, 3);
        let cfg = Gru4RecConfig {
            hidden: 16,
            emb_dim: 8,
            batch_size: 8,
            n_sample: 8,
            dropout_hidden: 0.2,
            ..Gru4RecConfig::default()
        };
        let (same, segs, state_same) = segmented(&cfg, &train, false).await?;
        let (resumed, segs2, state_resumed) = segmented(&cfg, &train, true).await?;
        assert!(segs > 3, "{segs} segments");
        assert_eq!((same.steps, segs), (resumed.steps, segs2));
        assert_eq!(same.loss_sum.to_bits(), resumed.loss_sum.to_bits());
        assert!(
            bits_equal(&state_same, &state_resumed),
            "shard state differs after a resume from a saved cursor"
        );
        let (ps, items) = setup(&cfg, &train, 2).await?;
        let idx = items.index_sequences(&train);
        let mut wk = SeqWorker::new(&cfg, items.clone(), ps.clone(), 0, 1, 7)?;
        let whole = wk.train_epoch(&idx, 1).await?;
        assert_eq!(whole.steps, same.steps);
        // Without sampling or dropout nothing is drawn, so the segments from
        // saved cursors (batcher position, carried states) are the whole
        // epoch, bit for bit.
        let det = Gru4RecConfig {
            n_sample: 0,
            dropout_hidden: 0.0,
            ..cfg.clone()
        };
        let (seg, _, state_seg) = segmented(&det, &train, true).await?;
        let (ps0, items0) = setup(&det, &train, 2).await?;
        let mut wk0 = SeqWorker::new(&det, items0.clone(), ps0.clone(), 0, 1, 7)?;
        let whole0 = wk0.train_epoch(&idx, 1).await?;
        assert_eq!(seg.loss_sum.to_bits(), whole0.loss_sum.to_bits());
        let state_whole = shard_state(&ps0, &items0).await?;
        assert!(
            bits_equal(&state_seg, &state_whole),
            "segments from saved cursors differ from the whole epoch"
        );
        let mut bad = same.clone();
        let e = wk.train_segment(&idx, 2, Some(&bad), 5).await.unwrap_err();
        assert!(e.to_string().contains("epoch 1, not 2"), "{e}");
        bad.hidden.pop();
        let e = wk.train_segment(&idx, 1, Some(&bad), 5).await.unwrap_err();
        assert!(e.to_string().contains("batch_size 8"), "{e}");
        Ok(())
    }

    #[test]
    fn constrained_embedding_is_rejected_by_name() {
        let cfg = Gru4RecConfig {
            constrained_embedding: true,
            ..Gru4RecConfig::default()
        };
        let e = validate(&cfg).unwrap_err();
        assert!(e.contains("model.constrained_embedding"), "{e}");
    }
}
