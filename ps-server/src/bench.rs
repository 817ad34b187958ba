//! `ps-server bench`: measurements of the store and the service, each
//! compared with a baseline measured in the same run.

use crate::error::{PsError, Result};
use crate::shard::{Shard, ShardConfig};
use ember_proto::codec::{encode_f32, encode_u32, encode_u64};
use ember_proto::route::splitmix64;
use ember_proto::v1::parameter_server_client::ParameterServerClient;
use ember_proto::v1::*;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Options of the bench subcommand.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Rows in the table.
    #[arg(long, default_value_t = 10_000_000)]
    pub rows: u64,
    /// Embedding width.
    #[arg(long, default_value_t = 32)]
    pub dim: u32,
    /// Ids per pull/push batch.
    #[arg(long, default_value_t = 4096)]
    pub batch: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Scale mode: Zipf ids, checkpoint write + load timing, no Vec/gRPC baselines.
    #[arg(long)]
    pub scale: bool,
    /// Directory for the scale-mode checkpoint (default: a temp dir).
    #[arg(long)]
    pub checkpoint_dir: Option<std::path::PathBuf>,
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        splitmix64(self.0)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Zipf-like (s ~ 1) id in [0, n), scrambled over the id space.
    fn zipf(&mut self, n: u64) -> u64 {
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        let r = ((n as f64).powf(u) as u64).saturating_sub(1).min(n - 1);
        splitmix64(r) % n
    }
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * 4096)
}

fn table_cfg(dim: u32) -> TableConfig {
    TableConfig {
        name: "bench".into(),
        dim,
        init: Some(Initializer {
            kind: initializer::Kind::Uniform as i32,
            scale: 0.01,
        }),
        seed: 7,
        optimizer: Some(OptimizerConfig {
            kind: Some(optimizer_config::Kind::Adagrad(Adagrad {
                lr: 0.05,
                initial_accumulator: 0.1,
                eps: 1e-8,
            })),
        }),
        mba_lambda: 0.01,
        count_mode: CountMode::CountOnline as i32,
        ..Default::default()
    }
}

fn unique_batch(rng: &mut Rng, n: u64, batch: usize, zipf: bool) -> Vec<u64> {
    let mut ids: Vec<u64> = (0..batch)
        .map(|_| if zipf { rng.zipf(n) } else { rng.below(n) })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

fn timed(seconds: f64, mut f: impl FnMut() -> u64) -> f64 {
    let t0 = Instant::now();
    let mut rows = 0u64;
    while t0.elapsed().as_secs_f64() < seconds {
        rows += f();
    }
    rows as f64 / t0.elapsed().as_secs_f64()
}

/// Fills a shard table with `rows` rows (ids 0..rows) by pushes.
fn fill(shard: &Shard, rows: u64, dim: usize) -> Result<Duration> {
    let t0 = Instant::now();
    let chunk = 65_536u64;
    let grads = vec![0.001f32; chunk as usize * dim];
    let mut start = 0;
    while start < rows {
        let end = (start + chunk).min(rows);
        let ids: Vec<u64> = (start..end).collect();
        shard.push("bench", &ids, &grads[..ids.len() * dim], &[], 1)?;
        start = end;
    }
    Ok(t0.elapsed())
}

/// Runs the benchmarks and returns a Markdown report.
pub async fn run(a: BenchArgs) -> Result<String> {
    let dim = a.dim as usize;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "rows={} dim={} batch={} seconds/measure={}\n",
        a.rows, a.dim, a.batch, a.seconds
    );
    let _ = writeln!(
        out,
        "| measurement | value | baseline | ratio | aim |\n|---|---|---|---|---|"
    );
    let rss0 = rss_bytes();
    let dir = match &a.checkpoint_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("ember-ps-bench-{}", std::process::id())),
    };
    let shard = Arc::new(Shard::new(ShardConfig {
        checkpoint_dir: Some(dir.clone()),
        ..Default::default()
    })?);
    shard.create_table(table_cfg(a.dim))?;
    let fill_t = fill(&shard, a.rows, dim)?;
    let rss1 = rss_bytes();
    let t = shard.table("bench")?;
    let st = t.stats();
    let payload = t.payload_bytes_per_row() as f64;
    let per_row = st.resident_bytes as f64 / st.rows as f64;
    let rss_row = rss1.saturating_sub(rss0) as f64 / st.rows as f64;
    let _ = writeln!(
        out,
        "| fill by push ({} rows) | {:.2} s | | | |",
        st.rows,
        fill_t.as_secs_f64()
    );
    let _ = writeln!(out, "| (3) resident bytes/row (arena accounting) | {per_row:.1} | payload {payload:.0} | {:.3}x | <= 1.25x |", per_row / payload);
    let _ = writeln!(out, "| (3) RSS delta bytes/row (/proc/self/statm) | {rss_row:.1} | payload {payload:.0} | {:.3}x | <= 1.25x |", rss_row / payload);

    let mut rng = Rng(42);
    let mut buf = Vec::new();
    let zipf = a.scale;
    let pull_rate = timed(a.seconds, || {
        let ids: Vec<u64> = (0..a.batch)
            .map(|_| {
                if zipf {
                    rng.zipf(a.rows)
                } else {
                    rng.below(a.rows)
                }
            })
            .collect();
        let _ = shard.pull("bench", &ids, &mut buf);
        ids.len() as u64
    });
    if !a.scale {
        // Baseline: a plain Vec<f32> gather of the same kind of ids.
        let plain: Vec<f32> = vec![0.5; a.rows as usize * dim];
        let mut o = vec![0.0f32; a.batch * dim];
        let mut rng2 = Rng(42);
        let gather_rate = timed(a.seconds, || {
            let ids: Vec<u64> = (0..a.batch).map(|_| rng2.below(a.rows)).collect();
            for (k, &id) in ids.iter().enumerate() {
                let s = id as usize * dim;
                o[k * dim..(k + 1) * dim].copy_from_slice(&plain[s..s + dim]);
            }
            std::hint::black_box(&o);
            ids.len() as u64
        });
        drop(plain);
        let _ = writeln!(out, "| (1) in-process pull, random ids | {:.2} M rows/s | Vec gather {:.2} M rows/s | {:.2}x | >= 0.5x |", pull_rate / 1e6, gather_rate / 1e6, pull_rate / gather_rate);
    } else {
        let _ = writeln!(
            out,
            "| (5) in-process pull, Zipf ids | {:.2} M rows/s | | | |",
            pull_rate / 1e6
        );
    }
    let mut rng3 = Rng(7);
    let grads = vec![0.001f32; a.batch * dim];
    let mut step = 2;
    let push_rate = timed(a.seconds, || {
        let ids = unique_batch(&mut rng3, a.rows, a.batch, zipf);
        step += 1;
        let _ = shard.push("bench", &ids, &grads[..ids.len() * dim], &[], step);
        ids.len() as u64
    });
    let _ = writeln!(out, "| (2) push Adagrad+MBA(online) | {:.2} M rows/s | pull {:.2} M rows/s | {:.2}x | >= 0.8x |", push_rate / 1e6, pull_rate / 1e6, push_rate / pull_rate);

    if a.scale {
        let t0 = Instant::now();
        let info = shard.checkpoint(1, 1)?;
        let w = t0.elapsed();
        let fresh = Shard::new(ShardConfig {
            checkpoint_dir: Some(dir.clone()),
            ..Default::default()
        })?;
        let t0 = Instant::now();
        let (_, rows) = fresh.restore(0)?;
        let r = t0.elapsed();
        let _ = writeln!(
            out,
            "| (5) checkpoint write | {:.2} s ({:.0} MB) | | | |",
            w.as_secs_f64(),
            info.bytes as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "| (5) checkpoint load | {:.2} s ({rows} rows, {:.2} M rows/s) | | | |",
            r.as_secs_f64(),
            rows as f64 / r.as_secs_f64() / 1e6
        );
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(out);
    }
    drop(t);

    // (4) gRPC pull+push over loopback vs raw TCP of the same bytes.
    let grpc_rate = grpc_bench(shard.clone(), &a).await?;
    let tcp_rate = tcp_bench(&a).await?;
    let _ = writeln!(out, "| (4) gRPC pull+push over loopback | {:.2} M rows/s | raw TCP same bytes {:.2} M rows/s | {:.2}x | >= 0.6x |", grpc_rate / 1e6, tcp_rate / 1e6, grpc_rate / tcp_rate);
    Ok(out)
}

async fn grpc_bench(shard: Arc<Shard>, a: &BenchArgs) -> Result<f64> {
    let cfg = crate::ServerConfig::local(0, 1);
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| PsError::io("bind", e))?;
    let addr = listener.local_addr().map_err(|e| PsError::io("addr", e))?;
    let (tx, mut rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(async move {
        crate::server::serve_shard(shard, &cfg, listener, async move {
            let _ = rx.wait_for(|v| *v).await;
        })
        .await
    });
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| PsError::Internal(e.to_string()))?
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| PsError::Internal(format!("connect: {e}")))?;
    let mut c = ParameterServerClient::new(ch)
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20);
    let dim = a.dim as usize;
    let mut rng = Rng(99);
    let t0 = Instant::now();
    let mut rows = 0u64;
    let mut step = 1_000_000;
    while t0.elapsed().as_secs_f64() < a.seconds {
        let ids = unique_batch(&mut rng, a.rows, a.batch, false);
        let idb = encode_u64(&ids);
        c.pull(PullRequest {
            table: "bench".into(),
            ids: idb.clone(),
        })
        .await
        .map_err(|e| PsError::Internal(e.to_string()))?;
        step += 1;
        c.push(PushRequest {
            table: "bench".into(),
            ids: idb,
            grads: encode_f32(&vec![0.001f32; ids.len() * dim]),
            counts: encode_u32(&[]),
            step,
        })
        .await
        .map_err(|e| PsError::Internal(e.to_string()))?;
        rows += ids.len() as u64;
    }
    let rate = rows as f64 / t0.elapsed().as_secs_f64();
    tx.send_replace(true);
    let _ = server.await;
    Ok(rate)
}

/// Raw TCP: per batch the client sends ids (pull), gets rows back, sends
/// ids + grads (push), gets a small ack: the same bytes as gRPC pull+push.
async fn tcp_bench(a: &BenchArgs) -> Result<f64> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| PsError::io("bind", e))?;
    let addr = l.local_addr().map_err(|e| PsError::io("addr", e))?;
    let dim = a.dim as usize;
    let batch = a.batch;
    let server = tokio::spawn(async move {
        let Ok((mut s, _)) = l.accept().await else {
            return;
        };
        let _ = s.set_nodelay(true);
        let rows = vec![7u8; batch * dim * 4];
        let mut ids = vec![0u8; batch * 8];
        let mut grads = vec![0u8; batch * (8 + dim * 4)];
        loop {
            if s.read_exact(&mut ids).await.is_err() {
                return;
            }
            if s.write_all(&rows).await.is_err() {
                return;
            }
            if s.read_exact(&mut grads).await.is_err() {
                return;
            }
            if s.write_all(&[1u8; 16]).await.is_err() {
                return;
            }
        }
    });
    let mut c = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| PsError::io("connect", e))?;
    let _ = c.set_nodelay(true);
    let ids = vec![3u8; batch * 8];
    let grads = vec![5u8; batch * (8 + dim * 4)];
    let mut rows = vec![0u8; batch * dim * 4];
    let mut ack = [0u8; 16];
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed().as_secs_f64() < a.seconds {
        let io = async {
            c.write_all(&ids).await?;
            c.read_exact(&mut rows).await?;
            c.write_all(&grads).await?;
            c.read_exact(&mut ack).await?;
            Ok::<_, std::io::Error>(())
        };
        io.await.map_err(|e| PsError::io("raw tcp", e))?;
        n += batch as u64;
    }
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    drop(c);
    let _ = server.await;
    Ok(rate)
}
