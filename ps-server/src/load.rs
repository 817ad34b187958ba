//! Load test: concurrent gRPC clients pulling and pushing (SGD) against one
//! shard over loopback for a bounded time, then a check that the final rows
//! equal a serial replay of the same pushes.
//!
//! Every push's ids and gradients come from `(seed, client, round)` only,
//! never from pulled values, so SGD updates commute. The table starts at
//! zero, `lr` is a power of two and every gradient is a small multiple of
//! 2^-10, so every partial sum is exact in f32 and the concurrent result
//! must equal the replay bit for bit, whatever the interleaving.

use crate::error::{PsError, Result};
use crate::server::{client_endpoint, spawn, ServerConfig};
use crate::store::{Table, TableSpec};
use bytes::Bytes;
use ember_proto::codec::{decode_f32, encode_f32, encode_u64};
use ember_proto::rng::{splitmix64, SplitMix64, GOLDEN_GAMMA};
use ember_proto::v1::parameter_server_client::ParameterServerClient;
use ember_proto::v1::*;
use std::time::{Duration, Instant};

/// Name of the load-test table.
pub const TABLE: &str = "load";

/// Parameters of a load run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Concurrent clients (one gRPC connection each).
    pub clients: usize,
    /// How long the clients keep going.
    pub duration: Duration,
    /// Id space `0..rows` (small, so clients contend for the same rows).
    pub rows: u64,
    /// Row width.
    pub dim: u32,
    /// Ids drawn per round (deduplicated, so slightly fewer are sent).
    pub batch: usize,
    /// Seed of every client's ids and gradients.
    pub seed: u64,
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            clients: 8,
            duration: Duration::from_secs(30),
            rows: 100_000,
            dim: 16,
            batch: 512,
            seed: 1,
        }
    }
}

/// What a load run measured and checked.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// Wall time of the client phase.
    pub elapsed: Duration,
    /// Pull + push rounds completed, per client.
    pub rounds: Vec<u64>,
    /// Rows pulled (= rows pushed) over all clients.
    pub rows: u64,
    /// Pull latency percentiles p50, p99 (microseconds).
    pub pull_us: (u64, u64),
    /// Push latency percentiles p50, p99 (microseconds).
    pub push_us: (u64, u64),
    /// Rows stored on the shard at the end.
    pub stored_rows: u64,
    /// Resident bytes of the table at the end (arena accounting).
    pub resident_bytes: u64,
    /// Ids whose final row differs from the serial replay (0 = pass).
    pub mismatched_rows: u64,
}

impl LoadReport {
    /// Rows per second pulled and pushed (each counted once per round).
    pub fn rows_per_s(&self) -> f64 {
        self.rows as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// A Markdown table of the report.
    pub fn markdown(&self, cfg: &LoadConfig) -> String {
        let rounds: u64 = self.rounds.iter().sum();
        format!(
            "clients={} seconds={:.1} rows={} dim={} batch={}\n\n\
             | measurement | value |\n|---|---|\n\
             | rounds (pull + push) | {rounds} ({:.0}/s) |\n\
             | throughput | {:.3} M rows/s pulled + pushed |\n\
             | pull latency p50 / p99 | {:.2} / {:.2} ms |\n\
             | push latency p50 / p99 | {:.2} / {:.2} ms |\n\
             | stored rows / resident bytes | {} / {:.1} MB |\n\
             | rows differing from serial replay | {} |\n",
            cfg.clients,
            self.elapsed.as_secs_f64(),
            cfg.rows,
            cfg.dim,
            cfg.batch,
            rounds as f64 / self.elapsed.as_secs_f64().max(1e-9),
            self.rows_per_s() / 1e6,
            self.pull_us.0 as f64 / 1e3,
            self.pull_us.1 as f64 / 1e3,
            self.push_us.0 as f64 / 1e3,
            self.push_us.1 as f64 / 1e3,
            self.stored_rows,
            self.resident_bytes as f64 / 1e6,
            self.mismatched_rows,
        )
    }
}

/// The load-test table: zero init, SGD with lr 0.5, no counts.
pub fn table_config(dim: u32) -> TableConfig {
    TableConfig {
        name: TABLE.into(),
        dim,
        init: Some(Initializer {
            kind: initializer::Kind::Zero as i32,
            scale: 0.0,
        }),
        optimizer: Some(OptimizerConfig {
            kind: Some(optimizer_config::Kind::Sgd(Sgd { lr: 0.5 })),
        }),
        ..Default::default()
    }
}

/// Ids and gradients of push `round` of `client`: unique ids below `rows`,
/// gradients in {-8..=8} / 1024.
pub fn round_batch(cfg: &LoadConfig, client: usize, round: u64) -> (Vec<u64>, Vec<f32>) {
    let x = splitmix64(cfg.seed ^ splitmix64(((client as u64) << 40) ^ round));
    // Outputs splitmix64(x + kφ), k = 1, 2, ...
    let mut rng = SplitMix64::new(x.wrapping_add(GOLDEN_GAMMA));
    let mut next = || rng.next_u64();
    let mut ids: Vec<u64> = (0..cfg.batch).map(|_| next() % cfg.rows.max(1)).collect();
    ids.sort_unstable();
    ids.dedup();
    let grads = (0..ids.len() * cfg.dim as usize)
        .map(|_| ((next() % 17) as f32 - 8.0) / 1024.0)
        .collect();
    (ids, grads)
}

fn percentiles(mut v: Vec<u64>) -> (u64, u64) {
    if v.is_empty() {
        return (0, 0);
    }
    v.sort_unstable();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.50), at(0.99))
}

type Client = ParameterServerClient<tonic::transport::Channel>;

async fn connect(addr: std::net::SocketAddr) -> Result<Client> {
    let ch = client_endpoint(addr)?
        .connect()
        .await
        .map_err(|e| PsError::Internal(format!("connect to {addr}: {e}")))?;
    Ok(ParameterServerClient::new(ch)
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20))
}

fn rpc(e: tonic::Status) -> PsError {
    PsError::Internal(format!("rpc failed: {e}"))
}

/// One client: pull then push its own deterministic batches until the
/// deadline. Returns rounds done and the latencies (µs) of pulls and pushes.
async fn client_loop(
    cfg: LoadConfig,
    addr: std::net::SocketAddr,
    client: usize,
    deadline: Instant,
) -> Result<(u64, u64, Vec<u64>, Vec<u64>)> {
    let mut c = connect(addr).await?;
    let (mut rounds, mut rows) = (0u64, 0u64);
    let (mut pulls, mut pushes) = (Vec::new(), Vec::new());
    while Instant::now() < deadline {
        let (ids, grads) = round_batch(&cfg, client, rounds);
        let idb = encode_u64(&ids);
        let t = Instant::now();
        let r = c
            .pull(PullRequest {
                table: TABLE.into(),
                ids: idb.clone(),
            })
            .await
            .map_err(rpc)?
            .into_inner();
        pulls.push(t.elapsed().as_micros() as u64);
        if r.rows.len() != ids.len() * cfg.dim as usize * 4 {
            return Err(PsError::Internal(format!(
                "pull answered {} bytes for {} ids",
                r.rows.len(),
                ids.len()
            )));
        }
        let t = Instant::now();
        let o = c
            .push(PushRequest {
                table: TABLE.into(),
                ids: idb,
                grads: encode_f32(&grads),
                counts: Bytes::new(),
                step: rounds + 1,
                request_id: 0,
            })
            .await
            .map_err(rpc)?
            .into_inner();
        pushes.push(t.elapsed().as_micros() as u64);
        if o.updated != ids.len() as u64 {
            return Err(PsError::Internal(format!(
                "push updated {} of {} rows",
                o.updated,
                ids.len()
            )));
        }
        rounds += 1;
        rows += ids.len() as u64;
    }
    Ok((rounds, rows, pulls, pushes))
}

/// Starts a shard on loopback, runs `cfg.clients` clients for
/// `cfg.duration`, then compares every row with a serial replay.
/// Errors when a client fails or the run overruns its deadline by a minute
/// (a stuck shard).
pub async fn run(cfg: LoadConfig) -> Result<LoadReport> {
    if cfg.clients == 0 || cfg.rows == 0 || cfg.batch == 0 {
        return Err(PsError::invalid("clients, rows and batch must be >= 1"));
    }
    let rs = spawn(ServerConfig::local(0, 1)).await?;
    rs.shard.create_table(table_config(cfg.dim))?;
    let t0 = Instant::now();
    let deadline = t0 + cfg.duration;
    let tasks: Vec<_> = (0..cfg.clients)
        .map(|i| tokio::spawn(client_loop(cfg.clone(), rs.addr, i, deadline)))
        .collect();
    let mut rounds = Vec::new();
    let (mut rows, mut pulls, mut pushes) = (0u64, Vec::new(), Vec::new());
    let limit = cfg.duration + Duration::from_secs(60);
    for t in tasks {
        let left = limit.saturating_sub(t0.elapsed());
        let r = tokio::time::timeout(left, t)
            .await
            .map_err(|_| PsError::Internal("load clients stuck past the deadline".into()))?
            .map_err(|e| PsError::Internal(format!("client task failed: {e}")))??;
        rounds.push(r.0);
        rows += r.1;
        pulls.extend(r.2);
        pushes.extend(r.3);
    }
    let elapsed = t0.elapsed();

    // Serial replay of the same pushes into a fresh table.
    let replay = Table::new(TableSpec::from_config(table_config(cfg.dim))?);
    for (client, &n) in rounds.iter().enumerate() {
        for round in 0..n {
            let (ids, grads) = round_batch(&cfg, client, round);
            replay.push(&ids, &grads, &[], round + 1);
        }
    }
    let mut c = connect(rs.addr).await?;
    let dim = cfg.dim as usize;
    let mut mismatched = 0u64;
    let mut want = Vec::new();
    let chunk = 8192u64;
    let mut start = 0u64;
    while start < cfg.rows {
        let ids: Vec<u64> = (start..(start + chunk).min(cfg.rows)).collect();
        let got = c
            .pull(PullRequest {
                table: TABLE.into(),
                ids: encode_u64(&ids),
            })
            .await
            .map_err(rpc)?
            .into_inner();
        let got = decode_f32("rows", &got.rows)?;
        replay.pull(&ids, &mut want);
        mismatched += got
            .chunks(dim)
            .zip(want.chunks(dim))
            .filter(|(a, b)| a != b)
            .count() as u64;
        start += chunk;
    }
    let st = rs.shard.table(TABLE)?.stats();
    if st.rows != replay.stats().rows {
        mismatched += st.rows.abs_diff(replay.stats().rows);
    }
    rs.shutdown().await?;
    Ok(LoadReport {
        elapsed,
        rounds,
        rows,
        pull_us: percentiles(pulls),
        push_us: percentiles(pushes),
        stored_rows: st.rows,
        resident_bytes: st.resident_bytes,
        mismatched_rows: mismatched,
    })
}
