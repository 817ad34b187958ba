//! TEST AND EXAMPLE SUPPORT ONLY: an in-memory embedding store, a synthetic
//! CTR problem with signal, and in-process train/eval loops.
//!
//! Nothing here is the production path: the real parameter-server store is
//! `ember-ps`'s `Shard` (behind gRPC for the trainer). [`InMemoryStore`]
//! exists so models can be trained end to end in unit tests and benchmarks
//! without any server: it keeps `id -> row` maps per table and applies the
//! pushed gradients with SGD or Adagrad.

use std::collections::{BTreeMap, HashMap};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::optim::DenseOptimizer;
use super::{CtrModel, Result, SparseRows};
use crate::metrics;
use ember_data::batch::{Batch, Sample};

/// Row update rule of the [`InMemoryStore`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RowRule {
    /// `w -= lr * g`.
    Sgd,
    /// `G += g^2; w -= lr * g / (sqrt(G) + 1e-8)` (accumulator init 0.1).
    Adagrad,
}

/// In-memory embedding tables for tests (see the module docs).
#[derive(Debug, Clone)]
pub struct InMemoryStore {
    dims: BTreeMap<String, usize>,
    rows: HashMap<String, HashMap<u64, Vec<f32>>>,
    acc: HashMap<String, HashMap<u64, Vec<f32>>>,
    /// Learning rate of pushed gradients.
    pub lr: f32,
    /// Update rule.
    pub rule: RowRule,
    /// New rows are uniform in `[-init_scale, init_scale]`.
    pub init_scale: f32,
    seed: u64,
}

impl InMemoryStore {
    /// Store for `tables` (name, width), Adagrad with `lr`, seeded row init.
    pub fn new(tables: &[(String, usize)], lr: f32, seed: u64) -> Self {
        InMemoryStore {
            dims: tables.iter().map(|(n, d)| (n.to_string(), *d)).collect(),
            rows: HashMap::new(),
            acc: HashMap::new(),
            lr,
            rule: RowRule::Adagrad,
            init_scale: 0.05,
            seed,
        }
    }

    fn row_init(&self, table: &str, id: u64, dim: usize) -> Vec<f32> {
        let th = table
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
        let mut rng =
            StdRng::seed_from_u64(self.seed ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ th);
        (0..dim)
            .map(|_| rng.random_range(-self.init_scale..=self.init_scale))
            .collect()
    }

    /// The rows of `batch.<table>.unique` for every table of the store,
    /// creating missing rows.
    pub fn pull(&mut self, batch: &Batch) -> SparseRows {
        let mut out = SparseRows::new();
        for ids in batch.tables() {
            let Some(&dim) = self.dims.get(&ids.table) else {
                continue;
            };
            let mut block = Vec::with_capacity(ids.unique.len() * dim);
            for &id in &ids.unique {
                if !self
                    .rows
                    .get(&ids.table)
                    .is_some_and(|t| t.contains_key(&id))
                {
                    let r = self.row_init(&ids.table, id, dim);
                    self.rows
                        .entry(ids.table.clone())
                        .or_default()
                        .insert(id, r);
                }
                block.extend_from_slice(&self.rows[&ids.table][&id]);
            }
            out.insert(&ids.table, block);
        }
        out
    }

    /// Applies per-table `[U * D]` gradients of `batch`'s unique ids.
    pub fn push(&mut self, batch: &Batch, grads: &BTreeMap<String, Vec<f32>>) {
        for ids in batch.tables() {
            let (Some(g), Some(&dim)) = (grads.get(&ids.table), self.dims.get(&ids.table)) else {
                continue;
            };
            let table = self.rows.entry(ids.table.clone()).or_default();
            let acc = self.acc.entry(ids.table.clone()).or_default();
            for (u, &id) in ids.unique.iter().enumerate() {
                let Some(row) = table.get_mut(&id) else {
                    continue;
                };
                let gr = &g[u * dim..(u + 1) * dim];
                match self.rule {
                    RowRule::Sgd => ember_proto::optim::sgd(row, gr, self.lr),
                    RowRule::Adagrad => {
                        let a = acc.entry(id).or_insert_with(|| vec![0.1; dim]);
                        ember_proto::optim::adagrad(row, a, gr, self.lr, 1e-8);
                    }
                }
            }
        }
    }

    /// The row of `id` in `table`, if created.
    pub fn row(&self, table: &str, id: u64) -> Option<&[f32]> {
        self.rows.get(table)?.get(&id).map(|r| r.as_slice())
    }
}

/// Options of the synthetic CTR problem.
#[derive(Debug, Clone)]
pub struct SyntheticSpec {
    /// Number of items (ids `1..=items`).
    pub items: u64,
    /// Number of categories (`cat(item) = item % cats + 1`).
    pub cats: u64,
    /// Number of users.
    pub users: u64,
    /// History length range (inclusive).
    pub hist_len: (usize, usize),
    /// Attach one random negative per history step (DIEN).
    pub negatives: bool,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        SyntheticSpec {
            items: 300,
            cats: 10,
            users: 200,
            hist_len: (3, 20),
            negatives: true,
        }
    }
}

/// A CTR problem with signal: each user likes 2 of the categories; their
/// history is 80% from liked categories; a target from a liked category is
/// clicked with probability 0.9, otherwise 0.1.
pub fn synthetic_samples(spec: &SyntheticSpec, n: usize, seed: u64) -> Vec<Sample> {
    let mut rng = StdRng::seed_from_u64(seed);
    let cat_of = |i: u64| i % spec.cats + 1;
    let likes: Vec<[u64; 2]> = (0..spec.users)
        .map(|u| {
            let mut r = StdRng::seed_from_u64(u ^ 0x5eed);
            let a = r.random_range(1..=spec.cats);
            let mut b = r.random_range(1..=spec.cats);
            if b == a {
                b = a % spec.cats + 1;
            }
            [a, b]
        })
        .collect();
    let item_in = |rng: &mut StdRng, cats: &[u64], want: bool| loop {
        let i = rng.random_range(1..=spec.items);
        if cats.contains(&cat_of(i)) == want {
            return i;
        }
    };
    (0..n)
        .map(|_| {
            let u = rng.random_range(0..spec.users);
            let liked = likes[u as usize];
            let len = rng.random_range(spec.hist_len.0..=spec.hist_len.1);
            let hist: Vec<u64> = (0..len)
                .map(|_| {
                    let from_liked = rng.random_bool(0.8);
                    item_in(&mut rng, &liked, from_liked)
                })
                .collect();
            let pos = rng.random_bool(0.5);
            let item = item_in(&mut rng, &liked, pos);
            let label = if rng.random_bool(if pos { 0.9 } else { 0.1 }) {
                1.0
            } else {
                0.0
            };
            let neg: Vec<u64> = if spec.negatives {
                (0..len).map(|_| rng.random_range(1..=spec.items)).collect()
            } else {
                Vec::new()
            };
            Sample {
                label,
                user: u + 1,
                item,
                cat: cat_of(item),
                hist_cats: hist.iter().map(|&i| cat_of(i)).collect(),
                hist_items: hist,
                neg_cats: neg.iter().map(|&i| cat_of(i)).collect(),
                neg_items: neg,
                ..Default::default()
            }
        })
        .collect()
}

/// Splits samples into batches of `batch_size` (last one may be smaller).
pub fn batches(samples: &[Sample], batch_size: usize, max_len: usize) -> Vec<Batch> {
    samples
        .chunks(batch_size)
        .map(|c| Batch::from_samples(c, max_len))
        .collect()
}

/// One in-process training pass: pull, step, push sparse grads, apply dense
/// grads with `opt`. Returns the mean target loss.
pub fn train_epoch(
    model: &mut dyn CtrModel,
    store: &mut InMemoryStore,
    opt: &mut DenseOptimizer,
    batches: &[Batch],
) -> Result<f32> {
    let mut total = 0.0;
    for b in batches {
        let rows = store.pull(b);
        let out = model.step(b, &rows, true)?;
        store.push(b, &out.sparse_grads);
        opt.apply(model, &out.dense_grads)?;
        total += out.loss;
    }
    Ok(total / batches.len().max(1) as f32)
}

/// Evaluation summary.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalResult {
    /// AUC over all rows (0.5 when undefined).
    pub auc: f64,
    /// GAUC (0.5 when undefined).
    pub gauc: f64,
    /// Logloss.
    pub logloss: f64,
}

/// Evaluates `model` on `batches` (inference mode).
pub fn evaluate(
    model: &mut dyn CtrModel,
    store: &mut InMemoryStore,
    batches: &[Batch],
) -> Result<EvalResult> {
    let (mut p, mut y, mut u) = (Vec::new(), Vec::new(), Vec::new());
    for b in batches {
        let rows = store.pull(b);
        let out = model.step(b, &rows, false)?;
        p.extend(out.probs);
        y.extend_from_slice(&b.labels);
        u.extend_from_slice(&b.user_ids);
    }
    Ok(EvalResult {
        auc: metrics::auc(&p, &y).unwrap_or(0.5),
        gauc: metrics::gauc(&p, &y, &u).unwrap_or(0.5),
        logloss: metrics::logloss(&p, &y),
    })
}
