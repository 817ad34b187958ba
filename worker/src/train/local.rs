//! Parameter-server shards living in this process, called directly (no gRPC,
//! no serialisation). The same [`ember_ps::shard::Shard`] the `ps-server`
//! binary serves, routed with the same [`Router`]: a single-process run, the
//! tests, and the in-process baseline of the end-to-end benchmark use it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_proto::route::Router;
use ember_proto::v1 as pb;
use ember_ps::dense::DenseTensor;
use ember_ps::shard::{Shard, ShardConfig};

use super::TrainError;

/// N in-process shards.
#[derive(Debug)]
pub struct LocalPs {
    shards: Vec<Arc<Shard>>,
    router: Router,
}

fn local(e: impl std::fmt::Display) -> TrainError {
    TrainError::Local(e.to_string())
}

impl LocalPs {
    /// `n` empty shards, checkpointing under `checkpoint_dir` when given.
    pub fn new(n: usize, checkpoint_dir: Option<std::path::PathBuf>) -> Result<Self, TrainError> {
        let mut shards = Vec::with_capacity(n);
        for i in 0..n {
            let cfg = ShardConfig {
                shard_index: i as u32,
                num_shards: n as u32,
                checkpoint_dir: checkpoint_dir.clone(),
                ..ShardConfig::default()
            };
            shards.push(Arc::new(Shard::new(cfg).map_err(local)?));
        }
        Ok(LocalPs {
            shards,
            router: Router::new(n as u32),
        })
    }

    /// The shards.
    pub fn shards(&self) -> &[Arc<Shard>] {
        &self.shards
    }

    /// Rows of `ids` in request order, and the row width.
    pub async fn pull(&self, table: &str, ids: &[u64]) -> Result<(Vec<f32>, usize), TrainError> {
        if self.shards.len() == 1 {
            let mut out = Vec::new();
            let dim = self.shards[0].pull(table, ids, &mut out).map_err(local)?;
            return Ok((out, dim));
        }
        let parts = self.router.split(table, ids);
        let mut out = Vec::new();
        let mut buf = Vec::new();
        let mut dim = 0;
        for (s, (sids, pos)) in parts.iter().enumerate() {
            if sids.is_empty() {
                continue;
            }
            dim = self.shards[s].pull(table, sids, &mut buf).map_err(local)?;
            if out.is_empty() {
                out = vec![0.0; ids.len() * dim];
            }
            super::scatter_rows(&mut out, pos, &buf, dim);
        }
        Ok((out, dim))
    }

    /// Pushes gradients of unique ids with their in-batch counts.
    pub async fn push(
        &self,
        table: &str,
        ids: &[u64],
        grads: &[f32],
        counts: &[u32],
        step: u64,
    ) -> Result<(), TrainError> {
        if ids.is_empty() {
            return Ok(());
        }
        if self.shards.len() == 1 {
            self.shards[0]
                .push(table, ids, grads, counts, step)
                .map_err(local)?;
            return Ok(());
        }
        let dim = grads.len() / ids.len();
        for (s, (sids, pos)) in self.router.split(table, ids).iter().enumerate() {
            if sids.is_empty() {
                continue;
            }
            let (g, c) = super::gather_rows(grads, counts, pos, dim);
            self.shards[s]
                .push(table, sids, &g, &c, step)
                .map_err(local)?;
        }
        Ok(())
    }

    /// Creates a table on every shard.
    pub async fn create_table(&self, config: &pb::TableConfig) -> Result<(), TrainError> {
        for s in &self.shards {
            s.create_table(config.clone()).map_err(local)?;
        }
        Ok(())
    }

    /// Loads exact counts, each id to its shard.
    pub async fn load_counts(&self, table: &str, counts: &[(u64, u32)]) -> Result<(), TrainError> {
        let ids: Vec<u64> = counts.iter().map(|c| c.0).collect();
        for (s, (sids, pos)) in self.router.split(table, &ids).iter().enumerate() {
            let c: Vec<u32> = pos.iter().map(|&p| counts[p].1).collect();
            self.shards[s]
                .load_counts(table, sids, &c, true)
                .map_err(local)?;
        }
        Ok(())
    }

    fn by_shard(&self, params: &[(String, Vec<f32>)]) -> Vec<Vec<DenseTensor>> {
        let mut out = vec![Vec::new(); self.shards.len()];
        for (n, v) in params {
            out[self.router.shard_of_dense(n) as usize]
                .push(DenseTensor::new(n.clone(), v.clone()));
        }
        out
    }

    /// Registers dense parameters.
    pub async fn init_dense(
        &self,
        params: &[(String, Vec<f32>)],
        optimizer: &pb::OptimizerConfig,
    ) -> Result<(), TrainError> {
        for (s, p) in self.by_shard(params).into_iter().enumerate() {
            if !p.is_empty() {
                self.shards[s]
                    .init_dense(&p, Some(optimizer))
                    .map_err(local)?;
            }
        }
        Ok(())
    }

    /// All dense parameters, once every owning shard reached `min_step` (waits up to 30 s).
    pub async fn pull_dense(
        &self,
        min_step: u64,
    ) -> Result<(Vec<(String, Vec<f32>)>, u64), TrainError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut out = Vec::new();
        let mut step = u64::MAX;
        for s in &self.shards {
            let (t, st) = loop {
                let (t, st) = s.pull_dense(&[]).map_err(local)?;
                if t.is_empty() || st >= min_step {
                    break (t, st);
                }
                if Instant::now() > deadline {
                    return Err(TrainError::Local(format!(
                        "dense step {st} never reached {min_step}"
                    )));
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            };
            if !t.is_empty() {
                step = step.min(st);
            }
            out.extend(t.into_iter().map(|d| (d.name, d.values)));
        }
        Ok((out, if step == u64::MAX { 0 } else { step }))
    }

    /// Pushes dense gradients of `step`.
    pub async fn push_dense(
        &self,
        grads: &[(String, Vec<f32>)],
        step: u64,
        num_workers: u32,
        worker_index: u32,
    ) -> Result<(), TrainError> {
        for (s, g) in self.by_shard(grads).into_iter().enumerate() {
            if !g.is_empty() {
                self.shards[s]
                    .push_dense(&g, step, num_workers, worker_index)
                    .map_err(local)?;
            }
        }
        Ok(())
    }

    /// Overwrites dense state buffers.
    pub async fn assign_dense(&self, params: &[(String, Vec<f32>)]) -> Result<(), TrainError> {
        for (s, p) in self.by_shard(params).into_iter().enumerate() {
            if !p.is_empty() {
                self.shards[s].assign_dense(&p).map_err(local)?;
            }
        }
        Ok(())
    }

    /// Checkpoints every shard at `step`.
    pub async fn checkpoint(&self, step: u64, keep: u32) -> Result<Vec<u64>, TrainError> {
        let mut out = Vec::new();
        for s in &self.shards {
            out.push(s.checkpoint(step, keep).map_err(local)?.rows);
        }
        Ok(out)
    }

    /// Restores every shard to `step`.
    pub async fn restore(&self, step: u64) -> Result<Vec<pb::RestoreResponse>, TrainError> {
        let mut out = Vec::new();
        for s in &self.shards {
            let (st, rows) = s.restore(step).map_err(local)?;
            out.push(pb::RestoreResponse { step: st, rows });
        }
        Ok(out)
    }

    /// Steps every shard has a good checkpoint for.
    pub async fn common_checkpoints(&self) -> Result<Vec<u64>, TrainError> {
        let mut common: Option<Vec<u64>> = None;
        for s in &self.shards {
            let l = s.list_checkpoints().map_err(local)?;
            common = Some(match common {
                None => l,
                Some(c) => c.into_iter().filter(|x| l.contains(x)).collect(),
            });
        }
        Ok(common.unwrap_or_default())
    }

    /// Per-shard statistics.
    pub async fn stats(&self) -> Result<Vec<pb::StatsResponse>, TrainError> {
        Ok(self.shards.iter().map(|s| s.stats()).collect())
    }
}
