//! The tonic `ParameterServer` service: decodes packed bytes, checks sizes
//! and auth, calls [`Shard`], encodes replies. Every error reaches the client
//! through the single `From<PsError> for tonic::Status`.

use crate::dedup::{RecentPushes, Seen};
use crate::dense::DenseTensor;
use crate::error::PsError;
use crate::metrics as m;
use crate::shard::Shard;
use bytes::Bytes;
use ember_proto::codec::{decode_f32, decode_u32, decode_u64, encode_f32};
use ember_proto::v1::parameter_server_server::ParameterServer;
use ember_proto::v1::*;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use ember_proto::security::Authenticated;

/// The gRPC service over one shard.
#[derive(Clone)]
pub struct PsService {
    shard: Arc<Shard>,
    recent_pushes: Arc<RecentPushes>,
    auth: bool,
    max_message_bytes: usize,
    shutdown: watch::Sender<bool>,
}

impl PsService {
    /// A service over `shard`; `auth` says whether admin RPCs need the
    /// [`Authenticated`] mark (set by the token interceptor); `shutdown` is set to true by the Shutdown RPC.
    pub fn new(
        shard: Arc<Shard>,
        auth: bool,
        max_message_bytes: usize,
        shutdown: watch::Sender<bool>,
    ) -> Self {
        PsService {
            shard,
            recent_pushes: Arc::default(),
            auth,
            max_message_bytes,
            shutdown,
        }
    }

    fn reject(&self, e: PsError) -> Status {
        self.shard.note_rejected(&e);
        e.into()
    }

    fn admin<T>(&self, req: &Request<T>, method: &str) -> Result<(), Status> {
        if self.auth && req.extensions().get::<Authenticated>().is_none() {
            return Err(self.reject(PsError::Unauthenticated(format!(
                "{method} is an admin RPC: missing or wrong bearer token"
            ))));
        }
        Ok(())
    }

    fn record(&self, method: &'static str, table: &str, start: Instant) {
        let shard = self.shard.shard_label().to_string();
        metrics::counter!(m::REQUESTS, "method" => method, "table" => table.to_string(), "shard" => shard.clone())
            .increment(1);
        metrics::histogram!(m::REQUEST_SECONDS, "method" => method, "shard" => shard)
            .record(start.elapsed().as_secs_f64());
    }

    /// RESOURCE_EXHAUSTED when a decoded request is over the configured
    /// limit. (tonic's own decode limit, set to twice this, answers
    /// OUT_OF_RANGE; this check gives the contract's code below that.)
    fn size_ok<M: prost::Message>(&self, method: &str, msg: &M) -> Result<(), Status> {
        let n = msg.encoded_len();
        if n > self.max_message_bytes {
            return Err(self.reject(PsError::TooLarge(format!(
                "{method} request of {n} bytes exceeds the message limit of {} bytes",
                self.max_message_bytes
            ))));
        }
        Ok(())
    }

    fn decode_dense(&self, params: Vec<DenseParam>) -> Result<Vec<DenseTensor>, Status> {
        params
            .into_iter()
            .map(|p| {
                decode_f32("values", &p.values)
                    .map(|v| DenseTensor::new(p.name, v))
                    .map_err(|e| self.reject(e.into()))
            })
            .collect()
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Shard) -> crate::Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        let shard = self.shard.clone();
        match tokio::task::spawn_blocking(move || f(&shard)).await {
            Ok(r) => r.map_err(Status::from),
            Err(e) => Err(self.reject(PsError::Internal(format!("worker thread failed: {e}")))),
        }
    }
}

fn dense_out(ts: Vec<DenseTensor>) -> Vec<DenseParam> {
    ts.into_iter()
        .map(|t| DenseParam {
            values: encode_f32(&t.values),
            name: t.name,
        })
        .collect()
}

#[tonic::async_trait]
impl ParameterServer for PsService {
    async fn create_table(
        &self,
        req: Request<CreateTableRequest>,
    ) -> Result<Response<CreateTableResponse>, Status> {
        let t0 = Instant::now();
        self.admin(&req, "CreateTable")?;
        let cfg = req.into_inner().config.unwrap_or_default();
        let name = cfg.name.clone();
        let created = self.shard.create_table(cfg)?;
        self.record("CreateTable", &name, t0);
        Ok(Response::new(CreateTableResponse { created }))
    }

    async fn describe_table(
        &self,
        req: Request<DescribeTableRequest>,
    ) -> Result<Response<TableInfo>, Status> {
        let t0 = Instant::now();
        let name = req.into_inner().table;
        let info = self.shard.describe_table(&name)?;
        self.record("DescribeTable", &name, t0);
        Ok(Response::new(info))
    }

    async fn list_tables(
        &self,
        _req: Request<ListTablesRequest>,
    ) -> Result<Response<ListTablesResponse>, Status> {
        let t0 = Instant::now();
        let tables = self.shard.list_tables();
        self.record("ListTables", "", t0);
        Ok(Response::new(ListTablesResponse { tables }))
    }

    async fn pull(&self, req: Request<PullRequest>) -> Result<Response<PullResponse>, Status> {
        let t0 = Instant::now();
        let r = req.into_inner();
        self.size_ok("Pull", &r)?;
        let ids = decode_u64("ids", &r.ids).map_err(|e| self.reject(e.into()))?;
        let dim = self
            .shard
            .table(&r.table)
            .map_err(|e| self.reject(e))?
            .dim();
        let bytes = ids.len() * dim * 4;
        if bytes + 64 > self.max_message_bytes {
            return Err(self.reject(PsError::TooLarge(format!(
                "pull of {} ids x dim {dim} = {bytes} bytes exceeds the message limit of {} bytes",
                ids.len(),
                self.max_message_bytes
            ))));
        }
        let mut out = Vec::new();
        let dim = self.shard.pull(&r.table, &ids, &mut out)?;
        let rows = rows_to_bytes(out);
        self.record("Pull", &r.table, t0);
        Ok(Response::new(PullResponse {
            rows,
            dim: dim as u32,
        }))
    }

    async fn push(&self, req: Request<PushRequest>) -> Result<Response<PushResponse>, Status> {
        let t0 = Instant::now();
        let r = req.into_inner();
        self.size_ok("Push", &r)?;
        let ids = decode_u64("ids", &r.ids).map_err(|e| self.reject(e.into()))?;
        let grads = decode_f32("grads", &r.grads).map_err(|e| self.reject(e.into()))?;
        let counts = decode_u32("counts", &r.counts).map_err(|e| self.reject(e.into()))?;
        if r.request_id != 0 {
            match self.recent_pushes.begin(r.request_id) {
                Seen::New => {}
                Seen::Done(resp) => return Ok(Response::new(resp)),
                Seen::InFlight => {
                    return Err(Status::aborted(format!(
                        "push request {} is being applied; retry",
                        r.request_id
                    )))
                }
            }
        }
        let o = self.shard.push(&r.table, &ids, &grads, &counts, r.step);
        let resp = o.as_ref().ok().map(|o| PushResponse {
            updated: o.updated,
            not_admitted: o.not_admitted,
        });
        if r.request_id != 0 {
            self.recent_pushes.finish(r.request_id, resp);
        }
        o?;
        self.record("Push", &r.table, t0);
        Ok(Response::new(resp.unwrap_or_default()))
    }

    async fn init_dense(
        &self,
        req: Request<InitDenseRequest>,
    ) -> Result<Response<InitDenseResponse>, Status> {
        let t0 = Instant::now();
        self.admin(&req, "InitDense")?;
        let r = req.into_inner();
        self.size_ok("InitDense", &r)?;
        let params = self.decode_dense(r.params)?;
        let created = self.shard.init_dense(&params, r.optimizer.as_ref())?;
        self.record("InitDense", "", t0);
        Ok(Response::new(InitDenseResponse { created }))
    }

    async fn pull_dense(
        &self,
        req: Request<PullDenseRequest>,
    ) -> Result<Response<PullDenseResponse>, Status> {
        let t0 = Instant::now();
        let r = req.into_inner();
        if r.min_step > 0 {
            let ms = if r.timeout_ms == 0 {
                30_000
            } else {
                r.timeout_ms
            };
            self.shard
                .wait_dense_step(r.min_step, Duration::from_millis(u64::from(ms)))
                .await?;
        }
        let (ts, step) = self.shard.pull_dense(&r.names)?;
        self.record("PullDense", "", t0);
        Ok(Response::new(PullDenseResponse {
            params: dense_out(ts),
            step,
        }))
    }

    async fn push_dense(
        &self,
        req: Request<PushDenseRequest>,
    ) -> Result<Response<PushDenseResponse>, Status> {
        let t0 = Instant::now();
        let r = req.into_inner();
        self.size_ok("PushDense", &r)?;
        let grads = self.decode_dense(r.grads)?;
        let step = self
            .shard
            .push_dense(&grads, r.step, r.num_workers, r.worker_index)?;
        self.record("PushDense", "", t0);
        Ok(Response::new(PushDenseResponse { step }))
    }

    async fn assign_dense(
        &self,
        req: Request<AssignDenseRequest>,
    ) -> Result<Response<AssignDenseResponse>, Status> {
        let t0 = Instant::now();
        let r = req.into_inner();
        self.size_ok("AssignDense", &r)?;
        let params = self.decode_dense(r.params)?;
        self.shard.assign_dense(&params)?;
        self.record("AssignDense", "", t0);
        Ok(Response::new(AssignDenseResponse {}))
    }

    async fn load_counts(
        &self,
        req: Request<LoadCountsRequest>,
    ) -> Result<Response<LoadCountsResponse>, Status> {
        let t0 = Instant::now();
        self.admin(&req, "LoadCounts")?;
        let r = req.into_inner();
        self.size_ok("LoadCounts", &r)?;
        let ids = decode_u64("ids", &r.ids).map_err(|e| self.reject(e.into()))?;
        let counts = decode_u32("counts", &r.counts).map_err(|e| self.reject(e.into()))?;
        let counted_ids = self.shard.load_counts(&r.table, &ids, &counts, r.replace)?;
        self.record("LoadCounts", &r.table, t0);
        Ok(Response::new(LoadCountsResponse { counted_ids }))
    }

    async fn checkpoint(
        &self,
        req: Request<CheckpointRequest>,
    ) -> Result<Response<CheckpointResponse>, Status> {
        let t0 = Instant::now();
        self.admin(&req, "Checkpoint")?;
        let r = req.into_inner();
        let o = self
            .blocking(move |s| s.checkpoint_as(r.step, r.keep, r.force_base))
            .await?;
        self.record("Checkpoint", "", t0);
        Ok(Response::new(CheckpointResponse {
            path: o.info.path.display().to_string(),
            bytes: o.info.bytes,
            rows: o.info.rows,
            kind: o.info.kind.as_str().to_string(),
            chain_files: o.chain_files as u32,
            chain_bytes: o.chain_bytes,
        }))
    }

    async fn restore(
        &self,
        req: Request<RestoreRequest>,
    ) -> Result<Response<RestoreResponse>, Status> {
        let t0 = Instant::now();
        self.admin(&req, "Restore")?;
        let step = req.into_inner().step;
        let (step, rows) = self.blocking(move |s| s.restore(step)).await?;
        self.record("Restore", "", t0);
        Ok(Response::new(RestoreResponse { step, rows }))
    }

    async fn list_checkpoints(
        &self,
        _req: Request<ListCheckpointsRequest>,
    ) -> Result<Response<ListCheckpointsResponse>, Status> {
        let t0 = Instant::now();
        let steps = self.blocking(|s| s.list_checkpoints()).await?;
        self.record("ListCheckpoints", "", t0);
        Ok(Response::new(ListCheckpointsResponse { steps }))
    }

    async fn health(
        &self,
        _req: Request<HealthRequest>,
    ) -> Result<Response<HealthResponse>, Status> {
        let c = self.shard.config();
        Ok(Response::new(HealthResponse {
            shard_index: c.shard_index,
            num_shards: c.num_shards,
            status: "SERVING".into(),
            uptime_s: self.shard.uptime().as_secs(),
            checkpoint_step: self.shard.checkpoint_step(),
        }))
    }

    async fn stats(&self, _req: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        let t0 = Instant::now();
        let s = self.shard.stats();
        self.record("Stats", "", t0);
        Ok(Response::new(s))
    }

    async fn shutdown(
        &self,
        req: Request<ShutdownRequest>,
    ) -> Result<Response<ShutdownResponse>, Status> {
        self.admin(&req, "Shutdown")?;
        let step = req.into_inner().checkpoint_step;
        if step > 0 {
            self.blocking(move |s| s.checkpoint(step, 0)).await?;
        }
        tracing::info!("shutdown requested over RPC");
        self.shutdown.send_replace(true);
        Ok(Response::new(ShutdownResponse {}))
    }
}

/// Encodes f32 rows as packed LE bytes (re-exported for clients and benches).
pub fn encode_rows(rows: &[f32]) -> Bytes {
    encode_f32(rows)
}

/// Owner of a `Vec<f32>` viewed as its little-endian bytes.
struct F32Bytes(Vec<f32>);

impl AsRef<[u8]> for F32Bytes {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: f32 has no padding and every byte pattern is a valid u8;
        // the slice covers exactly the vector's initialized elements and
        // lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast::<u8>(), self.0.len() * 4) }
    }
}

/// Packed LE bytes of `rows` without a copy on little-endian targets (the
/// vector becomes the buffer of the `Bytes`), equal to `encode_f32(&rows)`.
pub fn rows_to_bytes(rows: Vec<f32>) -> Bytes {
    if cfg!(target_endian = "little") {
        Bytes::from_owner(F32Bytes(rows))
    } else {
        encode_f32(&rows)
    }
}
