//! A client of a whole sharded parameter server: routes ids to shards with
//! [`ember_proto::route::Router`], talks to all shards in parallel, scatters
//! rows back into request order, and retries transient failures (a shard
//! restarting) with exponential backoff until a deadline.

use std::time::Duration;

use ember_proto::codec::{decode_f32, encode_f32, encode_u32, encode_u64};
use ember_proto::retry::retry;
use ember_proto::route::Router;
use ember_proto::security::{BearerAuth, ClientSecurity};
use ember_proto::transport::{tune_endpoint, MAX_MESSAGE_BYTES};
use ember_proto::v1::parameter_server_client::ParameterServerClient;
use ember_proto::v1::{self as pb};
use futures_util::future::try_join_all;
use tonic::transport::Channel;
use tonic::{Request, Status};

use super::TrainError;

pub use ember_proto::retry::{is_transient, RetryPolicy};

/// Ids per LoadCounts request chunk.
const COUNTS_CHUNK: usize = 1 << 20;

/// A fresh nonzero push request id: a random per-process base plus a
/// counter, so ids do not repeat within a process or (but for a 2^-64
/// chance) across the workers of a job.
pub fn push_request_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static BASE: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let base = *BASE.get_or_init(rand::random::<u64>);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    match ember_proto::rng::splitmix64(base.wrapping_add(n)) {
        0 => 1,
        id => id,
    }
}

/// Client of all shards of one parameter server.
#[derive(Clone)]
pub struct PsClient {
    shards: Vec<ParameterServerClient<Channel>>,
    addrs: Vec<String>,
    /// `shard <i> (<addr>)`, naming each shard in retry logs.
    peers: Vec<String>,
    router: Router,
    retry: RetryPolicy,
    auth: BearerAuth,
}

impl std::fmt::Debug for PsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PsClient")
            .field("addrs", &self.addrs)
            .finish()
    }
}

impl PsClient {
    /// A client of the shards at `addrs` (`host:port`, shard i at index i).
    /// Connections are lazy and re-established after a shard restarts.
    pub fn new(
        addrs: &[String],
        retry: RetryPolicy,
        security: &ClientSecurity,
    ) -> Result<Self, TrainError> {
        if addrs.is_empty() {
            return Err(TrainError::Config("no shard addresses given".into()));
        }
        let mut shards = Vec::with_capacity(addrs.len());
        for a in addrs {
            let ep = security
                .endpoint(a)
                .map_err(|e| TrainError::Config(format!("shard address: {e}")))?
                .connect_timeout(Duration::from_secs(5));
            // Large windows and frames: a pull reply of thousands of rows
            // must not stall on HTTP/2 flow control (64 KiB by default).
            let ep = tune_endpoint(ep);
            let client = ParameterServerClient::new(ep.connect_lazy())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
            shards.push(client);
        }
        Ok(PsClient {
            shards,
            addrs: addrs.to_vec(),
            peers: (0..addrs.len())
                .map(|s| format!("shard {s} ({})", addrs[s]))
                .collect(),
            router: Router::new(addrs.len() as u32),
            retry,
            auth: security.interceptor(),
        })
    }

    /// Number of shards.
    pub fn num_shards(&self) -> usize {
        self.shards.len()
    }

    /// Addresses of the shards.
    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    /// The routing function in use.
    pub fn router(&self) -> Router {
        self.router
    }

    fn request<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        self.auth.authorize(&mut req);
        req
    }

    /// Runs `call` against shard `s`, retrying transient failures with
    /// exponential backoff until the policy's deadline
    /// ([`ember_proto::retry::retry`]).
    async fn with_retry<T, F, Fut>(
        &self,
        s: usize,
        what: &'static str,
        mut call: F,
    ) -> Result<T, TrainError>
    where
        F: FnMut(ParameterServerClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        retry(&self.retry, &self.peers[s], what, || {
            call(self.shards[s].clone())
        })
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| TrainError::Ps {
            shard: s,
            addr: self.addrs[s].clone(),
            what,
            status,
        })
    }

    /// Sends `msg` to every shard in parallel through `call`, each with retries.
    async fn each_shard<M, T, F, Fut>(
        &self,
        what: &'static str,
        msg: M,
        call: F,
    ) -> Result<Vec<T>, TrainError>
    where
        M: Clone,
        F: Fn(ParameterServerClient<Channel>, Request<M>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let (call, msg) = (&call, &msg);
        let futs = (0..self.num_shards())
            .map(|s| self.with_retry(s, what, move |c| call(c, self.request(msg.clone()))));
        try_join_all(futs).await
    }

    /// Pulls rows of `ids` (any order, duplicates allowed) from `table`:
    /// returns `ids.len() * dim` values in request order, and `dim`.
    pub async fn pull(&self, table: &str, ids: &[u64]) -> Result<(Vec<f32>, usize), TrainError> {
        let parts = self.router.split(table, ids);
        let futs = parts
            .iter()
            .enumerate()
            .filter(|(_, (sids, _))| !sids.is_empty())
            .map(|(s, (sids, _))| {
                let body = encode_u64(sids);
                async move {
                    let resp = self
                        .with_retry(s, "pull", |mut c| {
                            let req = self.request(pb::PullRequest {
                                table: table.to_string(),
                                ids: body.clone(),
                            });
                            async move { c.pull(req).await }
                        })
                        .await?;
                    Ok::<_, TrainError>((s, resp))
                }
            });
        let resps = try_join_all(futs).await?;
        let mut dim = 0usize;
        let mut out = Vec::new();
        for (s, resp) in resps {
            let d = resp.dim as usize;
            if out.is_empty() {
                dim = d;
                out = vec![0.0f32; ids.len() * d];
            } else if d != dim {
                return Err(TrainError::Protocol(format!(
                    "shards disagree on the dim of {table}: {dim} vs {d}"
                )));
            }
            let rows =
                decode_f32("rows", &resp.rows).map_err(|e| TrainError::Protocol(e.to_string()))?;
            let pos = &parts[s].1;
            if rows.len() != pos.len() * d {
                return Err(TrainError::Protocol(format!(
                    "shard {s} returned {} values for {} ids of dim {d}",
                    rows.len(),
                    pos.len()
                )));
            }
            super::scatter_rows(&mut out, pos, &rows, d);
        }
        Ok((out, dim))
    }

    /// Pushes gradients of unique `ids` (`grads` is `ids.len() * dim`, row-major)
    /// with their in-batch occurrence counts.
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
        let dim = grads.len() / ids.len();
        if dim * ids.len() != grads.len() || counts.len() != ids.len() {
            return Err(TrainError::Protocol(format!(
                "push to {table}: {} ids, {} grads, {} counts",
                ids.len(),
                grads.len(),
                counts.len()
            )));
        }
        let parts = self.router.split(table, ids);
        let futs = parts
            .iter()
            .enumerate()
            .filter(|(_, (sids, _))| !sids.is_empty())
            .map(|(s, (sids, pos))| {
                let (g, c) = super::gather_rows(grads, counts, pos, dim);
                let (ids_b, grads_b, counts_b) = (encode_u64(sids), encode_f32(&g), encode_u32(&c));
                // One id per shard request, the same for all its retries:
                // the shard applies it once (ps.proto PushRequest.request_id).
                let request_id = push_request_id();
                async move {
                    self.with_retry(s, "push", |mut cl| {
                        let req = self.request(pb::PushRequest {
                            table: table.to_string(),
                            ids: ids_b.clone(),
                            grads: grads_b.clone(),
                            counts: counts_b.clone(),
                            step,
                            request_id,
                        });
                        async move { cl.push(req).await }
                    })
                    .await
                }
            });
        try_join_all(futs).await?;
        Ok(())
    }

    /// Creates a table on every shard (idempotent for an identical config).
    pub async fn create_table(&self, config: &pb::TableConfig) -> Result<(), TrainError> {
        self.each_shard(
            "create_table",
            pb::CreateTableRequest {
                config: Some(config.clone()),
            },
            |mut c, r| async move { c.create_table(r).await },
        )
        .await?;
        Ok(())
    }

    /// Loads exact feature counts n_j for `table`, each id to its shard, in chunks.
    pub async fn load_counts(&self, table: &str, counts: &[(u64, u32)]) -> Result<(), TrainError> {
        let ids: Vec<u64> = counts.iter().map(|(i, _)| *i).collect();
        let parts = self.router.split(table, &ids);
        let futs = parts.iter().enumerate().map(|(s, (sids, pos))| async move {
            let mut first = true;
            let n = sids.len();
            let mut start = 0;
            while first || start < n {
                let end = (start + COUNTS_CHUNK).min(n);
                let c: Vec<u32> = pos[start..end].iter().map(|&p| counts[p].1).collect();
                let (ids_b, c_b) = (encode_u64(&sids[start..end]), encode_u32(&c));
                let replace = first;
                self.with_retry(s, "load_counts", |mut cl| {
                    let req = self.request(pb::LoadCountsRequest {
                        table: table.to_string(),
                        ids: ids_b.clone(),
                        counts: c_b.clone(),
                        replace,
                    });
                    async move { cl.load_counts(req).await }
                })
                .await?;
                first = false;
                start = end;
            }
            Ok::<_, TrainError>(())
        });
        try_join_all(futs).await?;
        Ok(())
    }

    /// Registers dense parameters on their owning shards (existing ones keep their value).
    pub async fn init_dense(
        &self,
        params: &[(String, Vec<f32>)],
        optimizer: &pb::OptimizerConfig,
    ) -> Result<(), TrainError> {
        let msg = |p| pb::InitDenseRequest {
            params: p,
            optimizer: Some(*optimizer),
        };
        self.each_owner("init_dense", params, msg, |mut c, r| async move {
            c.init_dense(r).await
        })
        .await
    }

    /// Sends each shard that owns some of `params` (by dense routing) the
    /// message `msg` builds from its share, through `call`, with retries.
    async fn each_owner<M, T, B, F, Fut>(
        &self,
        what: &'static str,
        params: &[(String, Vec<f32>)],
        msg: B,
        call: F,
    ) -> Result<(), TrainError>
    where
        M: Clone,
        B: Fn(Vec<pb::DenseParam>) -> M,
        F: Fn(ParameterServerClient<Channel>, Request<M>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let call = &call;
        let futs = self
            .group_dense(params)
            .into_iter()
            .enumerate()
            .filter(|(_, p)| !p.is_empty())
            .map(|(s, p)| {
                let m = msg(p);
                async move {
                    self.with_retry(s, what, move |c| call(c, self.request(m.clone())))
                        .await
                }
            });
        try_join_all(futs).await?;
        Ok(())
    }

    fn group_dense(&self, params: &[(String, Vec<f32>)]) -> Vec<Vec<pb::DenseParam>> {
        let mut by_shard = vec![Vec::new(); self.num_shards()];
        for (name, v) in params {
            by_shard[self.router.shard_of_dense(name) as usize].push(pb::DenseParam {
                name: name.clone(),
                values: encode_f32(v),
            });
        }
        by_shard
    }

    /// Reads all dense parameters, waiting on every shard that owns some until
    /// its dense step is at least `min_step`. Returns the parameters and the
    /// smallest dense step seen.
    pub async fn pull_dense(
        &self,
        min_step: u64,
    ) -> Result<(Vec<(String, Vec<f32>)>, u64), TrainError> {
        let resps = self
            .each_shard(
                "pull_dense",
                pb::PullDenseRequest {
                    names: vec![],
                    min_step,
                    timeout_ms: 0,
                },
                |mut c, r| async move { c.pull_dense(r).await },
            )
            .await?;
        let mut out = Vec::new();
        let mut step = u64::MAX;
        for r in resps {
            if !r.params.is_empty() {
                step = step.min(r.step);
            }
            for p in r.params {
                let v = decode_f32("values", &p.values)
                    .map_err(|e| TrainError::Protocol(e.to_string()))?;
                out.push((p.name, v));
            }
        }
        Ok((out, if step == u64::MAX { 0 } else { step }))
    }

    /// Pushes dense gradients for `step` (`num_workers` > 1: synchronous averaging).
    pub async fn push_dense(
        &self,
        grads: &[(String, Vec<f32>)],
        step: u64,
        num_workers: u32,
        worker_index: u32,
    ) -> Result<(), TrainError> {
        let msg = |p| pb::PushDenseRequest {
            grads: p,
            step,
            num_workers,
            worker_index,
        };
        self.each_owner("push_dense", grads, msg, |mut c, r| async move {
            c.push_dense(r).await
        })
        .await
    }

    /// Overwrites dense state buffers (e.g. Dice running statistics).
    pub async fn assign_dense(&self, params: &[(String, Vec<f32>)]) -> Result<(), TrainError> {
        let msg = |p| pb::AssignDenseRequest { params: p };
        self.each_owner("assign_dense", params, msg, |mut c, r| async move {
            c.assign_dense(r).await
        })
        .await
    }

    /// Checkpoints every shard at `step` (a cluster checkpoint is all shards at one step).
    pub async fn checkpoint(
        &self,
        step: u64,
        keep: u32,
    ) -> Result<Vec<pb::CheckpointResponse>, TrainError> {
        self.each_shard(
            "checkpoint",
            pb::CheckpointRequest {
                step,
                keep,
                ..Default::default()
            },
            |mut c, r| async move { c.checkpoint(r).await },
        )
        .await
    }

    /// Restores every shard to `step` (0 = each shard's latest good checkpoint).
    pub async fn restore(&self, step: u64) -> Result<Vec<pb::RestoreResponse>, TrainError> {
        self.each_shard(
            "restore",
            pb::RestoreRequest { step },
            |mut c, r| async move { c.restore(r).await },
        )
        .await
    }

    /// Steps for which every shard holds a good checkpoint, ascending.
    pub async fn common_checkpoints(&self) -> Result<Vec<u64>, TrainError> {
        let lists = self
            .each_shard(
                "list_checkpoints",
                pb::ListCheckpointsRequest {},
                |mut c, r| async move { c.list_checkpoints(r).await },
            )
            .await?;
        let mut common: Vec<u64> = lists.first().map(|l| l.steps.clone()).unwrap_or_default();
        for l in &lists[1..] {
            common.retain(|s| l.steps.contains(s));
        }
        common.sort_unstable();
        Ok(common)
    }

    /// Health of every shard.
    pub async fn health(&self) -> Result<Vec<pb::HealthResponse>, TrainError> {
        self.each_shard("health", pb::HealthRequest {}, |mut c, r| async move {
            c.health(r).await
        })
        .await
    }

    /// Health of shard `s`, one attempt bounded by `timeout` (no retry): for
    /// detecting a shard that restarted (its uptime went down) or is gone.
    pub async fn health_once(
        &self,
        s: usize,
        timeout: Duration,
    ) -> Result<pb::HealthResponse, TrainError> {
        let mut c = self.shards[s].clone();
        let req = self.request(pb::HealthRequest {});
        match tokio::time::timeout(timeout, c.health(req)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(status)) => Err(TrainError::Ps {
                shard: s,
                addr: self.addrs[s].clone(),
                what: "health",
                status,
            }),
            Err(_) => Err(TrainError::Ps {
                shard: s,
                addr: self.addrs[s].clone(),
                what: "health",
                status: Status::deadline_exceeded("no answer"),
            }),
        }
    }

    /// Statistics of every shard.
    pub async fn stats(&self) -> Result<Vec<pb::StatsResponse>, TrainError> {
        self.each_shard("stats", pb::StatsRequest {}, |mut c, r| async move {
            c.stats(r).await
        })
        .await
    }

    /// Asks every shard to stop (optionally checkpointing at `checkpoint_step` first).
    pub async fn shutdown(&self, checkpoint_step: u64) -> Result<(), TrainError> {
        self.each_shard(
            "shutdown",
            pb::ShutdownRequest { checkpoint_step },
            |mut c, r| async move { c.shutdown(r).await },
        )
        .await?;
        Ok(())
    }
}
