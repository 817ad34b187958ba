//! What a run reports: one record per epoch, written as JSON after every
//! epoch (`<run>/metrics.json`), drawn as a PNG (`<run>/curves.png`) and
//! printed as a summary table at the end.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::ClusterError;

/// Test-set figures after one epoch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TestMetrics {
    /// AUC over all test rows.
    pub auc: f64,
    /// Impression-weighted per-user AUC.
    pub gauc: f64,
    /// Mean binary cross-entropy.
    pub logloss: f64,
    /// Test rows scored.
    pub rows: usize,
}

/// Where a worker's time went during one epoch (seconds, summed over workers).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TimeSplit {
    /// Waiting for pulls of rows and dense parameters (RPC time, overlapping compute when pipelined).
    pub pull_s: f64,
    /// Forward + backward.
    pub compute_s: f64,
    /// Pushing gradients (RPC time, overlapping compute when pipelined).
    pub push_s: f64,
    /// Time the compute loop sat idle waiting for data or for pushes to drain.
    pub wait_s: f64,
}

/// One epoch of a run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EpochRecord {
    /// Epoch number, from 1.
    pub epoch: usize,
    /// Global step at the end of the epoch (the checkpoint's step id).
    pub step: u64,
    /// Mean training loss over the epoch.
    pub train_loss: f64,
    /// Training samples processed (all workers).
    pub samples: u64,
    /// Wall-clock seconds of the epoch's training.
    pub seconds: f64,
    /// Training samples per second (all workers).
    pub samples_per_s: f64,
    /// Mean in-batch dedup ratio (id occurrences / unique ids).
    pub dedup_ratio: f64,
    /// Time split.
    pub time: TimeSplit,
    /// Test metrics after the epoch.
    pub test: Option<TestMetrics>,
    /// Cluster restarts (shard or worker failures recovered) during the epoch.
    pub restarts: u32,
}

/// The whole run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RunReport {
    /// Job name.
    pub name: String,
    /// Model kind.
    pub model: String,
    /// Shards and workers.
    pub shards: usize,
    /// Workers.
    pub workers: usize,
    /// One record per finished epoch.
    pub epochs: Vec<EpochRecord>,
}

impl RunReport {
    /// Writes the report as pretty JSON, atomically
    /// ([`ember_proto::atomic::write_atomic`]: hidden temp file, fsync, rename).
    pub fn write_json(&self, path: &Path) -> Result<(), ClusterError> {
        use std::io::Write;
        let text =
            serde_json::to_string_pretty(self).map_err(|e| ClusterError::Report(e.to_string()))?;
        ember_proto::atomic::write_atomic(path, |f| f.write_all(text.as_bytes())).map_err(|e| {
            ClusterError::Io {
                path: e.path.display().to_string(),
                source: e.source,
            }
        })
    }

    /// Reads a report written by [`RunReport::write_json`].
    pub fn read_json(path: &Path) -> Result<RunReport, ClusterError> {
        let text = std::fs::read_to_string(path).map_err(|e| ClusterError::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        serde_json::from_str(&text)
            .map_err(|e| ClusterError::Report(format!("{}: {e}", path.display())))
    }

    /// The final summary table.
    pub fn summary_table(&self) -> String {
        let mut s = format!(
            "{} ({}; {} shards, {} workers)\n{:>5} {:>8} {:>10} {:>11} {:>8} {:>8} {:>9} {:>8}\n",
            self.name,
            self.model,
            self.shards,
            self.workers,
            "epoch",
            "step",
            "train loss",
            "samples/s",
            "AUC",
            "GAUC",
            "test loss",
            "restarts"
        );
        for r in &self.epochs {
            let (auc, gauc, ll) = match &r.test {
                Some(t) => (
                    format!("{:.4}", t.auc),
                    format!("{:.4}", t.gauc),
                    format!("{:.4}", t.logloss),
                ),
                None => ("-".into(), "-".into(), "-".into()),
            };
            s.push_str(&format!(
                "{:>5} {:>8} {:>10.4} {:>11.0} {:>8} {:>8} {:>9} {:>8}\n",
                r.epoch, r.step, r.train_loss, r.samples_per_s, auc, gauc, ll, r.restarts
            ));
        }
        s
    }
}

impl EpochRecord {
    /// The record of epoch `epoch` (ending at global step `step`) from its
    /// workers' reports: mean train loss over all steps, samples and their
    /// rate over the `seconds` of training, the time split, the test metrics.
    pub fn from_reports(
        epoch: usize,
        step: u64,
        reports: &[ember_worker::train::worker::WorkerReport],
        seconds: f64,
        restarts: u32,
        test: &ember_worker::train::eval::EvalResult,
    ) -> EpochRecord {
        let steps: u64 = reports.iter().map(|r| r.steps).sum();
        let samples: u64 = reports.iter().map(|r| r.samples).sum();
        let per_step = |x: f64, empty: f64| if steps > 0 { x / steps as f64 } else { empty };
        EpochRecord {
            epoch,
            step,
            train_loss: per_step(reports.iter().map(|r| r.loss_sum).sum(), f64::NAN),
            samples,
            seconds,
            samples_per_s: if seconds > 0.0 {
                samples as f64 / seconds
            } else {
                0.0
            },
            dedup_ratio: per_step(reports.iter().map(|r| r.dedup_sum).sum(), 1.0),
            time: TimeSplit {
                pull_s: reports.iter().map(|r| r.pull_s).sum(),
                compute_s: reports.iter().map(|r| r.compute_s).sum(),
                push_s: reports.iter().map(|r| r.push_s).sum(),
                wait_s: reports.iter().map(|r| r.wait_s).sum(),
            },
            test: Some(TestMetrics {
                auc: test.auc,
                gauc: test.gauc,
                logloss: test.logloss,
                rows: test.rows,
            }),
            restarts,
        }
    }
}

/// The per-epoch mean of several runs of one configuration (seeds): epoch
/// `e`'s record averages train loss, rate and test metrics over every run,
/// for the epochs all runs completed. An error names a run whose epochs are
/// numbered differently or lack test metrics, or an empty list.
pub fn mean_over_runs(runs: &[Vec<EpochRecord>]) -> Result<Vec<EpochRecord>, ClusterError> {
    let first = runs
        .first()
        .ok_or_else(|| ClusterError::Report("mean of no runs".into()))?;
    let n = runs.iter().map(Vec::len).min().unwrap_or(0);
    let k = runs.len() as f64;
    let mut out = Vec::with_capacity(n);
    for e in 0..n {
        let mut m = first[e].clone();
        let (mut loss, mut rate, mut auc, mut gauc, mut ll) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for (i, run) in runs.iter().enumerate() {
            let r = &run[e];
            if r.epoch != m.epoch {
                return Err(ClusterError::Report(format!(
                    "run {} has epoch {} where run 1 has epoch {}",
                    i + 1,
                    r.epoch,
                    m.epoch
                )));
            }
            let t = r.test.as_ref().ok_or_else(|| {
                ClusterError::Report(format!(
                    "run {} has no test metrics at epoch {}",
                    i + 1,
                    r.epoch
                ))
            })?;
            loss += r.train_loss;
            rate += r.samples_per_s;
            auc += t.auc;
            gauc += t.gauc;
            ll += t.logloss;
        }
        m.train_loss = loss / k;
        m.samples_per_s = rate / k;
        if let Some(t) = m.test.as_mut() {
            t.auc = auc / k;
            t.gauc = gauc / k;
            t.logloss = ll / k;
        }
        out.push(m);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(epoch: usize, auc: f64) -> EpochRecord {
        EpochRecord {
            epoch,
            step: epoch as u64 * 10,
            train_loss: 0.6 / epoch as f64,
            samples: 1000,
            seconds: 1.0,
            samples_per_s: 1000.0,
            dedup_ratio: 2.0,
            time: TimeSplit::default(),
            test: Some(TestMetrics {
                auc,
                gauc: auc - 0.01,
                logloss: 0.5,
                rows: 100,
            }),
            restarts: 0,
        }
    }

    #[test]
    fn json_round_trip_and_plot() {
        let dir = tempfile::tempdir().unwrap();
        let r = RunReport {
            name: "t".into(),
            model: "din".into(),
            shards: 2,
            workers: 1,
            epochs: vec![rec(1, 0.7), rec(2, 0.8)],
        };
        let p = dir.path().join("metrics.json");
        r.write_json(&p).unwrap();
        assert_eq!(RunReport::read_json(&p).unwrap(), r);
        assert!(r.summary_table().contains("0.8000"));
        let png = dir.path().join("curves.png");
        crate::plot::plot_curves(&png, "t", &r.epochs).unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert!(bytes.len() > 2000, "png too small: {}", bytes.len());
        // Several runs in one picture: a third line changes the image.
        let runs = vec![
            ("a".to_string(), r.epochs.clone()),
            ("b".to_string(), vec![rec(1, 0.6), rec(2, 0.65)]),
        ];
        let two = dir.path().join("two.png");
        crate::plot::plot_compare(&two, "t", &runs).unwrap();
        let mut more = runs.clone();
        more.push(("c".to_string(), vec![rec(1, 0.9), rec(2, 0.95)]));
        let three = dir.path().join("three.png");
        crate::plot::plot_compare(&three, "t", &more).unwrap();
        let (a, b) = (std::fs::read(&two).unwrap(), std::fs::read(&three).unwrap());
        assert_eq!(&a[1..4], b"PNG");
        assert_ne!(a, b);
    }

    #[test]
    fn mean_over_runs_averages_common_epochs_and_names_mismatches() {
        let a = vec![rec(1, 0.7), rec(2, 0.8), rec(3, 0.9)];
        let b = vec![rec(1, 0.6), rec(2, 0.7)];
        let m = mean_over_runs(&[a.clone(), b]).unwrap();
        assert_eq!(m.len(), 2);
        let t = m[1].test.as_ref().unwrap();
        assert!((t.auc - 0.75).abs() < 1e-12 && (t.gauc - 0.74).abs() < 1e-12);
        assert_eq!(m[1].epoch, 2);
        let shifted = vec![rec(2, 0.6)];
        let e = mean_over_runs(&[a.clone(), shifted])
            .unwrap_err()
            .to_string();
        assert!(e.contains("run 2 has epoch 2"), "{e}");
        let mut untested = rec(1, 0.5);
        untested.test = None;
        let e = mean_over_runs(&[a, vec![untested]])
            .unwrap_err()
            .to_string();
        assert!(e.contains("no test metrics"), "{e}");
        assert!(mean_over_runs(&[]).is_err());
    }
}
