//! Evaluation against the parameter server: stream a sample file in order,
//! pull rows (never push), forward in inference mode (Dice uses its running
//! statistics), and compute AUC, GAUC and logloss.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::backend::Backend;
use super::config::JobConfig;
use super::worker::{build_job_model, load_dense, pull_rows};
use super::TrainError;
use crate::data::reader::{BatchReader, ReaderOptions};
use crate::metrics;

/// Test-set figures.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalResult {
    /// AUC over all rows (0.5 when one class is missing).
    pub auc: f64,
    /// Impression-weighted per-user AUC.
    pub gauc: f64,
    /// Mean binary cross-entropy.
    pub logloss: f64,
    /// Rows scored.
    pub rows: usize,
}

/// Scores every sample of `path` (at most `max_samples`) with the parameters
/// on `ps`; returns the metrics and the probabilities in file order.
pub async fn evaluate(
    cfg: &JobConfig,
    ps: &Backend,
    path: &Path,
    max_samples: Option<usize>,
) -> Result<(EvalResult, Vec<f32>), TrainError> {
    let mut model = build_job_model(cfg)?;
    let (dense, _) = ps.pull_dense(0).await?;
    load_dense(model.as_mut(), &dense)?;
    let opts = ReaderOptions {
        batch_size: cfg.data.eval_batch_size,
        max_len: cfg.data.max_len,
        shuffle_buffer: 0,
        seed: 0,
        worker_index: 0,
        num_workers: 1,
        epochs: 1,
        skip_malformed: cfg.data.skip_malformed,
        drop_last: false,
        schema: cfg.schema(),
        negatives: false,
    };
    let mut reader = BatchReader::new(&[path.to_path_buf()], opts).map_err(TrainError::Data)?;
    let tables = model.sparse_tables();
    let (mut probs, mut labels, mut users) = (Vec::new(), Vec::new(), Vec::new());
    while let Some(batch) = reader.next_batch().map_err(TrainError::Data)? {
        let rows = pull_rows(ps, &batch, &tables).await?;
        let out = tokio::task::block_in_place(|| model.step(&batch, &rows, false))
            .map_err(TrainError::Model)?;
        probs.extend_from_slice(&out.probs);
        labels.extend_from_slice(&batch.labels);
        users.extend_from_slice(&batch.user_ids);
        if max_samples.is_some_and(|m| probs.len() >= m) {
            probs.truncate(max_samples.unwrap_or(usize::MAX));
            labels.truncate(probs.len());
            users.truncate(probs.len());
            break;
        }
    }
    let result = EvalResult {
        auc: metrics::auc(&probs, &labels).unwrap_or(0.5),
        gauc: metrics::gauc(&probs, &labels, &users).unwrap_or(0.5),
        logloss: metrics::logloss(&probs, &labels),
        rows: probs.len(),
    };
    Ok((result, probs))
}
