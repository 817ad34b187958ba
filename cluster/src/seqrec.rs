//! `ember gru4rec`: next-item recommendation with GRU4Rec on the per-user
//! sequences written by `ember-data prepare` (`train.seq`: all but the last
//! item of each user; `test.seq`: the full sequence).
//!
//! GRU4Rec trains in-process (session-parallel mini-batches, Adagrad on its
//! own item embeddings and output layer; see `ember_worker::model::gru4rec`):
//! its parameters do not live on the parameter server. Evaluation ranks every
//! item for the last event of each test user, given the user's history
//! (Recall@K and MRR@K).

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use ember_worker::data::reader::read_seqs;
use ember_worker::metrics::recall_mrr_at_k;
use ember_worker::model::gru4rec::{Gru4Rec, Gru4RecConfig};
use serde::{Deserialize, Serialize};

use crate::ClusterError;

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
    /// Cut-off K of Recall@K and MRR@K.
    #[serde(default = "d_k")]
    pub k: usize,
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
    /// Recall@K of the last event.
    pub recall: f64,
    /// MRR@K of the last event.
    pub mrr: f64,
    /// Test users ranked.
    pub users: usize,
}

fn model_err(e: impl Into<ember_worker::model::ModelError>) -> ClusterError {
    ClusterError::Train(ember_worker::train::TrainError::Model(e.into()))
}

/// 0-based rank of the last item of each test sequence among all items,
/// given the preceding items (sequences with fewer than 2 known items skipped).
pub fn last_item_ranks(model: &Gru4Rec, test: &[Vec<usize>]) -> Result<Vec<usize>, ClusterError> {
    let hidden = model.cfg.hidden;
    let w = model
        .w_y
        .as_tensor()
        .to_dtype(DType::F32)
        .map_err(model_err)?;
    let b = model
        .b_y
        .as_tensor()
        .to_dtype(DType::F32)
        .map_err(model_err)?;
    let mut ranks = Vec::with_capacity(test.len());
    for seq in test.iter().filter(|s| s.len() >= 2) {
        let mut h = Tensor::zeros((1, hidden), w.dtype(), &Device::Cpu).map_err(model_err)?;
        for &item in &seq[..seq.len() - 1] {
            h = model.forward_states(&[item], &h).map_err(model_err)?;
        }
        let scores = h
            .to_dtype(DType::F32)
            .and_then(|h| h.matmul(&w.t()?))
            .and_then(|s| s.broadcast_add(&b.unsqueeze(0)?))
            .and_then(|s| s.squeeze(0)?.to_vec1::<f32>())
            .map_err(model_err)?;
        ranks.push(ember_worker::metrics::rank_of(&scores, seq[seq.len() - 1]));
    }
    Ok(ranks)
}

/// Trains GRU4Rec and evaluates after every epoch.
pub fn run(job: &SeqJob) -> Result<Vec<SeqEpoch>, ClusterError> {
    let data = |p: &PathBuf| {
        read_seqs(p).map_err(|e| ClusterError::Train(ember_worker::train::TrainError::Data(e)))
    };
    let train: Vec<Vec<u64>> = data(&job.train)?.into_iter().map(|u| u.items).collect();
    let test: Vec<Vec<u64>> = data(&job.test)?.into_iter().map(|u| u.items).collect();
    let mut model = Gru4Rec::new(&job.model, &train, &Device::Cpu).map_err(model_err)?;
    let train_idx = model.index_sequences(&train);
    let test_idx = model.index_sequences(&test);
    let mut out = Vec::new();
    for epoch in 1..=job.epochs {
        let loss = model.train_epoch(&train_idx).map_err(model_err)?;
        let ranks = last_item_ranks(&model, &test_idx)?;
        let (recall, mrr) = recall_mrr_at_k(&ranks, job.k);
        tracing::info!(epoch, loss, recall, mrr, "gru4rec epoch");
        out.push(SeqEpoch {
            epoch,
            loss: f64::from(loss),
            recall,
            mrr,
            users: ranks.len(),
        });
    }
    Ok(out)
}
