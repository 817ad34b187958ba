//! `ember gru4rec`: next-item recommendation with GRU4Rec on the per-user
//! sequences written by `ember-data prepare` (`train.seq`: all but the last
//! item of each user; `test.seq`: the full sequence).
//!
//! GRU4Rec trains in-process (session-parallel mini-batches, Adagrad on its
//! own item embeddings and output layer; see `ember_worker::model::gru4rec`):
//! its parameters do not live on the parameter server.
//!
//! Evaluation protocol (leave-last-out, full ranking): for each test user the
//! target is the last item, the input is the whole preceding sequence; every
//! training item is ranked (no sampled candidates), ties count against the
//! target ([`rank_conservative`]). Two variants are reported: over all items,
//! and with the user's already-seen items excluded. Recall@K and MRR@K for
//! K = 10, 20. Users whose target never occurs in training are skipped (and
//! counted). Baselines on the same rows:
//! - popularity: `score_j = c_j` (training count);
//! - last-item co-occurrence: `score_j = C[last][j] + c_j / (1 + max c)`, with
//!   `C[a][b]` the number of times `b` directly follows `a` in the training
//!   sequences (popularity breaks ties).
//!
//! With `holdout = "valid"` the last training item of each user is the target
//! and training uses the rest (a validation split for tuning; the test rows
//! are not touched).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use ember_worker::data::reader::read_seqs;
use ember_worker::metrics::{rank_conservative, FullRankEval, RankingMetrics};
use ember_worker::model::gru4rec::{Gru4Rec, Gru4RecConfig};
use serde::{Deserialize, Serialize};

use crate::ClusterError;

/// Cut-offs of the reported Recall@K / MRR@K.
pub const KS: [usize; 2] = [10, 20];

/// Which rows are the targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Holdout {
    /// The last item of each `test` sequence.
    #[default]
    Test,
    /// The last item of each `train` sequence (trained on the rest).
    Valid,
}

/// A GRU4Rec job (TOML).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeqJob {
    /// Training sequences.
    pub train: PathBuf,
    /// Test sequences (full; the last item is the target).
    pub test: PathBuf,
    /// Epochs.
    #[serde(default = "d_epochs")]
    pub epochs: usize,
    /// Cut-off K of the per-epoch Recall@K and MRR@K.
    #[serde(default = "d_k")]
    pub k: usize,
    /// Seeds (one run each; empty = the model's seed).
    #[serde(default)]
    pub seeds: Vec<u64>,
    /// Target rows: `"test"` (default) or `"valid"`.
    #[serde(default)]
    pub holdout: Holdout,
    /// Model hyper-parameters.
    #[serde(default)]
    pub model: Gru4RecConfig,
}

fn d_epochs() -> usize {
    3
}
fn d_k() -> usize {
    20
}

/// One epoch's figures.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SeqEpoch {
    /// Epoch, from 1.
    pub epoch: usize,
    /// Mean training loss.
    pub loss: f64,
    /// Recall@K of the last event (all items).
    pub recall: f64,
    /// MRR@K of the last event (all items).
    pub mrr: f64,
    /// Test users ranked.
    pub users: usize,
    /// Next-item events trained per second (all workers).
    #[serde(default)]
    pub events_per_s: f64,
    /// Times the epoch was rolled back and rerun (`ember train`).
    #[serde(default)]
    pub restarts: u32,
}

/// Recall@K and MRR@K for K in [`KS`], all items and seen items excluded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RankRow {
    /// Method name.
    pub name: String,
    /// `[R@10, MRR@10, R@20, MRR@20]` over all items.
    pub all: [f64; 4],
    /// The same with seen items excluded.
    pub unseen: [f64; 4],
    /// Users ranked.
    pub users: usize,
}

impl RankRow {
    /// The row of `e` named `name`.
    pub fn from_eval(name: &str, e: &FullRankEval) -> Self {
        let four = |m: &[RankingMetrics]| [m[0].recall(), m[0].mrr(), m[1].recall(), m[1].mrr()];
        RankRow {
            name: name.to_string(),
            all: four(&e.all),
            unseen: four(&e.unseen),
            users: e.all[0].count() as usize,
        }
    }
}

/// The result of one seed: per-epoch figures and the final GRU4Rec row.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SeedRun {
    /// Seed.
    pub seed: u64,
    /// Per-epoch figures.
    pub epochs: Vec<SeqEpoch>,
    /// Final figures of the model.
    pub row: RankRow,
}

/// A whole job: the baselines and one run per seed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SeqReport {
    /// Popularity and co-occurrence rows.
    pub baselines: Vec<RankRow>,
    /// One run per seed.
    pub runs: Vec<SeedRun>,
    /// Users skipped because their target never occurs in training.
    pub skipped: usize,
}

/// Evaluation rows: history (item indices, oldest first), its distinct
/// items, and the target.
#[derive(Debug, Clone, Default)]
pub struct EvalRows {
    /// Histories.
    pub hist: Vec<Vec<usize>>,
    /// Distinct items of each history.
    pub seen: Vec<Vec<usize>>,
    /// Targets.
    pub target: Vec<usize>,
}

impl EvalRows {
    /// Rows from full id sequences (last item = target) under `vocab`;
    /// unknown history items are dropped; returns the rows and the number of
    /// sequences skipped (target unknown or fewer than 2 items).
    pub fn build(seqs: &[Vec<u64>], vocab: &HashMap<u64, usize>) -> (Self, usize) {
        let mut rows = EvalRows::default();
        let mut skipped = 0;
        for s in seqs {
            let Some((last, hist)) = s.split_last() else {
                skipped += 1;
                continue;
            };
            let (Some(&t), false) = (vocab.get(last), hist.is_empty()) else {
                skipped += 1;
                continue;
            };
            let h: Vec<usize> = hist.iter().filter_map(|i| vocab.get(i).copied()).collect();
            let mut seen = h.clone();
            seen.sort_unstable();
            seen.dedup();
            rows.hist.push(h);
            rows.seen.push(seen);
            rows.target.push(t);
        }
        (rows, skipped)
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.target.len()
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.target.is_empty()
    }
}

/// Popularity and last-item co-occurrence rows (see the module docs).
pub fn baselines(train: &[Vec<usize>], n_items: usize, rows: &EvalRows) -> Vec<RankRow> {
    let mut counts = vec![0f32; n_items];
    let mut next: Vec<HashMap<usize, f32>> = vec![HashMap::new(); n_items];
    for s in train {
        for &i in s {
            if let Some(c) = counts.get_mut(i) {
                *c += 1.0;
            }
        }
        for w in s.windows(2) {
            if let Some(m) = next.get_mut(w[0]) {
                *m.entry(w[1]).or_insert(0.0) += 1.0;
            }
        }
    }
    let max_c = counts.iter().copied().fold(0f32, f32::max);
    let mut pop = FullRankEval::new(&KS);
    let mut cooc = FullRankEval::new(&KS);
    for r in 0..rows.len() {
        let (t, seen) = (rows.target[r], &rows.seen[r]);
        pop.add(&counts, t, seen);
        let mut s: Vec<f32> = counts.iter().map(|c| c / (1.0 + max_c)).collect();
        if let Some(m) = rows.hist[r].last().and_then(|&l| next.get(l)) {
            for (&j, &c) in m {
                s[j] += c;
            }
        }
        cooc.add(&s, t, seen);
    }
    vec![
        RankRow::from_eval("popularity", &pop),
        RankRow::from_eval("co-occurrence", &cooc),
    ]
}

pub(crate) fn model_err(e: impl Into<ember_worker::model::ModelError>) -> ClusterError {
    ClusterError::Train(ember_worker::train::TrainError::Model(e.into()))
}

/// Full-ranking figures of `model` on `rows` (batched histories).
pub fn evaluate_model(model: &Gru4Rec, rows: &EvalRows) -> Result<FullRankEval, ClusterError> {
    let mut e = FullRankEval::new(&KS);
    let chunk = 64;
    for start in (0..rows.len()).step_by(chunk) {
        let end = (start + chunk).min(rows.len());
        let hists: Vec<&[usize]> = rows.hist[start..end].iter().map(|h| &h[..]).collect();
        let h = model.history_states(&hists).map_err(model_err)?;
        let scores = model.scores_all(&h).map_err(model_err)?;
        for (k, row) in scores.iter().enumerate() {
            e.add(row, rows.target[start + k], &rows.seen[start + k]);
        }
    }
    Ok(e)
}

/// 0-based conservative rank of each row's target among all items.
pub fn last_item_ranks(model: &Gru4Rec, rows: &EvalRows) -> Result<Vec<usize>, ClusterError> {
    let mut ranks = Vec::with_capacity(rows.len());
    for start in (0..rows.len()).step_by(64) {
        let end = (start + 64).min(rows.len());
        let hists: Vec<&[usize]> = rows.hist[start..end].iter().map(|h| &h[..]).collect();
        let h = model.history_states(&hists).map_err(model_err)?;
        for (k, row) in model.scores_all(&h).map_err(model_err)?.iter().enumerate() {
            ranks.push(rank_conservative(row, rows.target[start + k], &[]));
        }
    }
    Ok(ranks)
}

/// Item-id sequences, one per user.
pub type Seqs = Vec<Vec<u64>>;

/// The training sequences and the evaluation sequences (last item = target)
/// of `holdout`: the test file's, or (`valid`) the full training sequences,
/// whose last item is then removed from training.
pub fn load_sequences(
    train: &Path,
    test: &Path,
    holdout: Holdout,
) -> Result<(Seqs, Seqs), ClusterError> {
    let data = |p: &Path| {
        read_seqs(p).map_err(|e| ClusterError::Train(ember_worker::train::TrainError::Data(e)))
    };
    let mut train: Vec<Vec<u64>> = data(train)?.into_iter().map(|u| u.items).collect();
    let targets: Vec<Vec<u64>> = match holdout {
        Holdout::Test => data(test)?.into_iter().map(|u| u.items).collect(),
        Holdout::Valid => {
            let full = train.clone();
            for s in &mut train {
                s.pop();
            }
            full
        }
    };
    Ok((train, targets))
}

/// Trains GRU4Rec once per seed (evaluating after every epoch) and returns
/// the baselines and the final rows.
pub fn run(job: &SeqJob) -> Result<SeqReport, ClusterError> {
    let (train, targets) = load_sequences(&job.train, &job.test, job.holdout)?;
    let seeds = if job.seeds.is_empty() {
        vec![job.model.seed]
    } else {
        job.seeds.clone()
    };
    let mut report = SeqReport {
        baselines: Vec::new(),
        runs: Vec::new(),
        skipped: 0,
    };
    for seed in seeds {
        let cfg = Gru4RecConfig {
            seed,
            ..job.model.clone()
        };
        let mut model = Gru4Rec::new(&cfg, &train, &Device::Cpu).map_err(model_err)?;
        let train_idx = model.index_sequences(&train);
        let (rows, skipped) = EvalRows::build(&targets, &model.items.vocab);
        if report.baselines.is_empty() {
            report.baselines = baselines(&train_idx, model.n_items(), &rows);
            report.skipped = skipped;
        }
        let mut epochs = Vec::new();
        for epoch in 1..=job.epochs {
            let t = std::time::Instant::now();
            let loss = model.train_epoch(&train_idx).map_err(model_err)?;
            let secs = t.elapsed().as_secs_f64();
            let ranks = last_item_ranks(&model, &rows)?;
            let (recall, mrr) = ember_worker::metrics::recall_mrr_at_k(&ranks, job.k);
            tracing::info!(seed, epoch, loss, recall, mrr, "gru4rec epoch");
            epochs.push(SeqEpoch {
                epoch,
                loss: f64::from(loss),
                recall,
                mrr,
                users: ranks.len(),
                events_per_s: events(&train_idx) as f64 / secs.max(1e-9),
                restarts: 0,
            });
        }
        let row = RankRow::from_eval("gru4rec", &evaluate_model(&model, &rows)?);
        report.runs.push(SeedRun { seed, epochs, row });
    }
    Ok(report)
}

/// Next-item events of index sequences (one per item after the first).
pub fn events(seqs: &[Vec<usize>]) -> usize {
    seqs.iter().map(|s| s.len().saturating_sub(1)).sum()
}

/// Mean and sample standard deviation of `xs` (sd 0 for fewer than 2).
pub fn mean_sd(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return (0.0, 0.0);
    }
    let m = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (m, 0.0);
    }
    let v = xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0);
    (m, v.sqrt())
}

/// The report as a text table: one line per baseline and the GRU4Rec
/// mean +- sd over the seeds.
pub fn format_table(r: &SeqReport) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<14} | {:^47} | {:^47}\n",
        "method", "all items", "seen items excluded"
    ));
    out.push_str(&format!(
        "{:<14} | {:>11} {:>11} {:>11} {:>11} | {:>11} {:>11} {:>11} {:>11}\n",
        "", "R@10", "MRR@10", "R@20", "MRR@20", "R@10", "MRR@10", "R@20", "MRR@20"
    ));
    let cell = |(m, s): (f64, f64), n: usize| {
        if n > 1 {
            format!("{m:.4}±{s:.4}")
        } else {
            format!("{m:.4}")
        }
    };
    let mut line = |name: &str, vals: Vec<Vec<f64>>| {
        let n = vals.len();
        let col = |i: usize| -> String {
            let xs: Vec<f64> = vals.iter().map(|v| v[i]).collect();
            cell(mean_sd(&xs), n)
        };
        out.push_str(&format!(
            "{:<14} | {:>11} {:>11} {:>11} {:>11} | {:>11} {:>11} {:>11} {:>11}\n",
            name,
            col(0),
            col(1),
            col(2),
            col(3),
            col(4),
            col(5),
            col(6),
            col(7)
        ));
    };
    let flat = |row: &RankRow| row.all.iter().chain(&row.unseen).copied().collect();
    for b in &r.baselines {
        line(&b.name, vec![flat(b)]);
    }
    let runs: Vec<Vec<f64>> = r.runs.iter().map(|s| flat(&s.row)).collect();
    if !runs.is_empty() {
        line(&format!("gru4rec (n={})", runs.len()), runs);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baselines_rank_by_count_and_transition() {
        // Items 0..4; 0 -> 1 twice, 0 -> 2 once; item 3 is the most popular.
        let train = vec![vec![0, 1, 3, 3], vec![0, 1, 3], vec![0, 2, 3, 3]];
        let rows = EvalRows {
            hist: vec![vec![2, 0]],
            seen: vec![vec![0, 2]],
            target: vec![1],
        };
        let b = baselines(&train, 4, &rows);
        // Popularity: 3 (5) > 0 (3) > 1 (2) > 2 (1): target 1 has rank 2.
        assert_eq!(b[0].all, [1.0, 1.0 / 3.0, 1.0, 1.0 / 3.0]);
        // Excluding seen 0 and 2: rank 1.
        assert_eq!(b[0].unseen, [1.0, 0.5, 1.0, 0.5]);
        // Co-occurrence after 0: item 1 (2 transitions) first.
        assert_eq!(b[1].all, [1.0, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn eval_rows_skip_unknown_targets() {
        let vocab: HashMap<u64, usize> = [(10, 0), (11, 1)].into_iter().collect();
        let seqs = vec![vec![10, 99, 11], vec![10, 99], vec![11], vec![11, 10, 10]];
        let (rows, skipped) = EvalRows::build(&seqs, &vocab);
        assert_eq!(skipped, 2);
        assert_eq!(rows.hist, vec![vec![0], vec![1, 0]]);
        assert_eq!(rows.seen, vec![vec![0], vec![0, 1]]);
        assert_eq!(rows.target, vec![1, 0]);
    }

    #[test]
    fn mean_sd_sample() {
        let (m, s) = mean_sd(&[1.0, 2.0, 3.0]);
        assert!((m - 2.0).abs() < 1e-12 && (s - 1.0).abs() < 1e-12);
        assert_eq!(mean_sd(&[4.0]), (4.0, 0.0));
    }
}
