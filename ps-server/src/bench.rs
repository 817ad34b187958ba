//! `ps-server bench`: measurements of the store and the service, each
//! compared with a baseline measured in the same run.

use crate::error::{PsError, Result};
use crate::shard::{Shard, ShardConfig};
use bytes::Bytes;
use ember_proto::codec::{decode_f32, decode_u64, encode_f32, encode_u64};
use ember_proto::rng::{splitmix64, SplitMix64, GOLDEN_GAMMA};
use ember_proto::v1::parameter_server_client::ParameterServerClient;
use ember_proto::v1::*;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Id batches drawn ahead of a timed loop and cycled (256 x 4096 ids touch
/// ~1M rows, far more than the caches hold).
const BATCH_POOL: usize = 256;

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
    /// Scale mode: after the full checkpoint, push to `--delta-rows` distinct
    /// rows and time a delta checkpoint, its chain restore, and an in-place
    /// restore's peak RSS.
    #[arg(long)]
    pub delta: bool,
    /// Rows touched before the delta checkpoint of `--delta`.
    #[arg(long, default_value_t = 100_000)]
    pub delta_rows: u64,
    /// Scale mode: leave the checkpoint files in `--checkpoint-dir` (to
    /// compare with `dd` on the same bytes).
    #[arg(long)]
    pub keep_files: bool,
    /// Load mode: `--clients` concurrent gRPC clients pull and push (SGD)
    /// for `--seconds`, then the rows are checked against a serial replay.
    #[arg(long)]
    pub load: bool,
    /// Clients of the load mode.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Id space of the load mode (`--rows` is for the other modes).
    #[arg(long, default_value_t = 100_000)]
    pub load_rows: u64,
    /// Weight precision of the benchmark table: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub precision: String,
    /// Optimizer of the benchmark table: adagrad, rowwise_adagrad, adam,
    /// rowwise_adam or sgd.
    #[arg(long, default_value = "adagrad")]
    pub optimizer: String,
    /// Storage precision of row-wise Adam's first moment: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub moment_precision: String,
}

/// The benchmark table with the precision and optimizer of the flags.
fn table_cfg_for(a: &BenchArgs) -> Result<TableConfig> {
    let mut c = table_cfg(a.dim);
    let precision = |flag: &str, p: &str| {
        Ok(match p {
            "f32" => Precision::F32,
            "f16" => Precision::F16,
            "bf16" => Precision::Bf16,
            p => {
                return Err(PsError::invalid(format!(
                    "--{flag} {p}: expected f32, f16 or bf16"
                )))
            }
        } as i32)
    };
    c.precision = precision("precision", &a.precision)?;
    c.moment_precision = precision("moment-precision", &a.moment_precision)?;
    let adagrad = Adagrad {
        lr: 0.05,
        initial_accumulator: 0.1,
        eps: 1e-8,
    };
    let adam = Adam {
        lr: 0.001,
        ..Default::default()
    };
    c.optimizer = Some(OptimizerConfig {
        kind: Some(match a.optimizer.as_str() {
            "adagrad" => optimizer_config::Kind::Adagrad(adagrad),
            "rowwise_adagrad" => optimizer_config::Kind::RowwiseAdagrad(adagrad),
            "adam" => optimizer_config::Kind::Adam(adam),
            "rowwise_adam" => optimizer_config::Kind::RowwiseAdam(adam),
            "sgd" => optimizer_config::Kind::Sgd(Sgd { lr: 0.05 }),
            o => {
                return Err(PsError::invalid(format!(
                    "--optimizer {o}: expected adagrad, rowwise_adagrad, adam, rowwise_adam or sgd"
                )))
            }
        }),
    });
    Ok(c)
}

/// The benchmarks' id stream: `splitmix64(seed + 1)`, `splitmix64(seed + 2)`,
/// ... (SplitMix64 with gamma 1, kept so that the workloads of earlier
/// measurements are reproduced exactly).
struct Rng(SplitMix64);
impl Rng {
    fn new(seed: u64) -> Self {
        Rng(SplitMix64::with_gamma(seed.wrapping_add(GOLDEN_GAMMA), 1))
    }
    fn next(&mut self) -> u64 {
        self.0.next_u64()
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

/// A field of /proc/self/status in bytes (`VmHWM`, `VmRSS`).
fn proc_status_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Resets the peak RSS (`VmHWM`) of this process (Linux >= 4.0).
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
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
    if a.load {
        return run_load(&a).await;
    }
    let dim = a.dim as usize;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "rows={} dim={} batch={} seconds/measure={} precision={} optimizer={}\n",
        a.rows, a.dim, a.batch, a.seconds, a.precision, a.optimizer
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
    shard.create_table(table_cfg_for(&a)?)?;
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

    // Id batches are drawn before the timed loops (a pool of BATCH_POOL
    // batches, cycled), so pull, push and the Vec gather time the operation
    // and not the id generation / dedup.
    let mut rng = Rng::new(42);
    let zipf = a.scale;
    let pull_pool: Vec<Vec<u64>> = (0..BATCH_POOL)
        .map(|_| {
            (0..a.batch)
                .map(|_| {
                    if zipf {
                        rng.zipf(a.rows)
                    } else {
                        rng.below(a.rows)
                    }
                })
                .collect()
        })
        .collect();
    let mut rng3 = Rng::new(7);
    let push_pool: Vec<Vec<u64>> = (0..BATCH_POOL)
        .map(|_| unique_batch(&mut rng3, a.rows, a.batch, zipf))
        .collect();
    let mut buf = Vec::new();
    let mut k = 0usize;
    let pull_rate = timed(a.seconds, || {
        k += 1;
        let ids = &pull_pool[k % BATCH_POOL];
        let _ = shard.pull("bench", ids, &mut buf);
        ids.len() as u64
    });
    if !a.scale {
        // Baseline: a plain Vec<f32> gather of the same kind of ids.
        let plain: Vec<f32> = vec![0.5; a.rows as usize * dim];
        let mut o = vec![0.0f32; a.batch * dim];
        let mut j = 0usize;
        let gather_rate = timed(a.seconds, || {
            j += 1;
            let ids = &pull_pool[j % BATCH_POOL];
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
    let grads = vec![0.001f32; a.batch * dim];
    let mut step = 2;
    let push_rate = timed(a.seconds, || {
        step += 1;
        let ids = &push_pool[step as usize % BATCH_POOL];
        let _ = shard.push("bench", ids, &grads[..ids.len() * dim], &[], step);
        ids.len() as u64
    });
    let _ = writeln!(out, "| (2) push Adagrad+MBA(online) | {:.2} M rows/s | pull {:.2} M rows/s | {:.2}x | >= 0.8x |", push_rate / 1e6, pull_rate / 1e6, push_rate / pull_rate);

    if a.scale {
        // The shard must hold the only reference to its table, or an
        // in-place restore cannot free it.
        drop(t);
        scale_checkpoints(&a, &shard, &dir, step + 1, &mut out)?;
        if !a.keep_files {
            let _ = std::fs::remove_dir_all(&dir);
        }
        return Ok(out);
    }
    drop(t);

    // (4) gRPC pull+push over loopback vs raw TCP, like with like.
    let batch = a.batch;
    let grads = encode_f32(&vec![0.001f32; batch * dim]);
    // (4a) Transport: a table of `batch` rows (store cost tiny, rows in
    // cache), the same ids every round; the raw TCP server moves the same
    // bytes and makes the same (tiny) store calls.
    let tiny = Arc::new(Shard::new(ShardConfig::default())?);
    tiny.create_table(table_cfg(a.dim))?;
    fill(&tiny, batch as u64, dim)?;
    let fixed: Vec<u64> = (0..batch as u64).collect();
    let mut same = || fixed.clone();
    let g_tiny = grpc_bench(tiny.clone(), a.seconds, dim, &grads, &mut same).await?;
    let t_tiny = tcp_bench(Some(tiny.clone()), a.seconds, dim, &grads, &mut same).await?;
    let t_bytes = tcp_bench(None, a.seconds, dim, &grads, &mut same).await?;
    let _ = writeln!(out, "| (4a) gRPC pull+push, {batch}-row table (transport) | {:.2} M rows/s | raw TCP same bytes + same store calls {:.2} M rows/s | {:.2}x | >= 0.6x |", g_tiny / 1e6, t_tiny / 1e6, g_tiny / t_tiny);
    let _ = writeln!(out, "| (4a') gRPC pull+push, {batch}-row table | {:.2} M rows/s | raw TCP bytes only (no store) {:.2} M rows/s | {:.2}x | |", g_tiny / 1e6, t_bytes / 1e6, g_tiny / t_bytes);
    // (4b) Full: random unique batches on the big table; the raw TCP server
    // does the same store calls (decode, Shard::pull, Shard::push).
    let mut rng = Rng::new(99);
    let rows = a.rows;
    let mut gen = || unique_batch(&mut rng, rows, batch, false);
    let g_full = grpc_bench(shard.clone(), a.seconds, dim, &grads, &mut gen).await?;
    let t_full = tcp_bench(Some(shard.clone()), a.seconds, dim, &grads, &mut gen).await?;
    let _ = writeln!(out, "| (4b) gRPC pull+push, {rows}-row table (full) | {:.2} M rows/s | raw TCP same bytes + same store calls {:.2} M rows/s | {:.2}x | >= 0.6x |", g_full / 1e6, t_full / 1e6, g_full / t_full);
    let _ = writeln!(out, "| (4) old comparison: full gRPC vs bytes-only raw TCP | {:.2} M rows/s | {:.2} M rows/s | {:.2}x | |", g_full / 1e6, t_bytes / 1e6, g_full / t_bytes);
    Ok(out)
}

/// Scale mode: full checkpoint write and load (into a fresh shard), then
/// with `--delta` a delta after touching `--delta-rows` rows, the chain's
/// restore, and the peak RSS of an in-place restore over the live table.
fn scale_checkpoints(
    a: &BenchArgs,
    shard: &Shard,
    dir: &std::path::Path,
    mut step: u64,
    out: &mut String,
) -> Result<()> {
    let mb_s = |bytes: u64, d: Duration| bytes as f64 / 1e6 / d.as_secs_f64();
    let t0 = Instant::now();
    let info = shard.checkpoint_as(step, 0, true)?.info;
    let w = t0.elapsed();
    let _ = writeln!(
        out,
        "| (5) full checkpoint write | {:.2} s ({:.0} MB, {:.0} MB/s) | | | |",
        w.as_secs_f64(),
        info.bytes as f64 / 1e6,
        mb_s(info.bytes, w)
    );
    let fresh = Shard::new(ShardConfig {
        checkpoint_dir: Some(dir.to_path_buf()),
        ..Default::default()
    })?;
    let t0 = Instant::now();
    let (_, rows) = fresh.restore(step)?;
    let r = t0.elapsed();
    drop(fresh);
    let _ = writeln!(
        out,
        "| (5) full checkpoint load (fresh shard) | {:.2} s ({rows} rows, {:.2} M rows/s, {:.0} MB/s) | | | |",
        r.as_secs_f64(),
        rows as f64 / r.as_secs_f64() / 1e6,
        mb_s(info.bytes, r)
    );
    if !a.delta {
        return Ok(());
    }
    // Touch delta_rows distinct rows at a new step.
    let dim = a.dim as usize;
    step += 1;
    let mut rng = Rng::new(1234);
    let mut ids: Vec<u64> = (0..a.delta_rows.min(a.rows))
        .map(|_| rng.below(a.rows))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let grads = vec![0.002f32; 65_536 * dim];
    for chunk in ids.chunks(65_536) {
        shard.push("bench", chunk, &grads[..chunk.len() * dim], &[], step)?;
    }
    step += 1;
    let t0 = Instant::now();
    let o = shard.checkpoint_as(step, 0, false)?;
    let dw = t0.elapsed();
    let _ = writeln!(
        out,
        "| (5) {} checkpoint write, {} rows touched | {:.3} s ({:.1} MB) | full {:.2} s ({:.0} MB) | {:.2}% | < 5% |",
        o.info.kind.as_str(),
        ids.len(),
        dw.as_secs_f64(),
        o.info.bytes as f64 / 1e6,
        w.as_secs_f64(),
        info.bytes as f64 / 1e6,
        100.0 * dw.as_secs_f64() / w.as_secs_f64()
    );
    // The restore's first pass alone: read, checksum and check every value
    // of the chain, loading nothing.
    let sdir = crate::checkpoint::shard_dir(dir, 0, 1);
    let chain = crate::ckpt_chain::chain_of(&sdir, 0, 1, step)?;
    let t0 = Instant::now();
    crate::ckpt_chain::verify_chain(&sdir, &chain)?;
    let v = t0.elapsed();
    let _ = writeln!(
        out,
        "| (5) chain verify pass only (read + crc + finite check) | {:.2} s ({:.0} MB/s) | | | |",
        v.as_secs_f64(),
        mb_s(chain.bytes(), v)
    );
    // In-place restore of the chain over the live table: peak RSS vs the
    // RSS of the restored table.
    let rss_live = proc_status_bytes("VmRSS");
    let reset = reset_peak_rss();
    let t0 = Instant::now();
    let (_, rows) = shard.restore(step)?;
    let r = t0.elapsed();
    let peak = proc_status_bytes("VmHWM");
    let rss_after = proc_status_bytes("VmRSS");
    let _ = writeln!(
        out,
        "| (5) in-place chain restore (base + delta: verify pass, then load pass) | {:.2} s ({rows} rows, {:.2} M rows/s, {:.0} MB/s) | | | |",
        r.as_secs_f64(),
        rows as f64 / r.as_secs_f64() / 1e6,
        mb_s(chain.bytes(), r)
    );
    let _ = writeln!(
        out,
        "| (5) peak RSS during in-place restore{} | {:.2} GB | RSS before {:.2} GB, after {:.2} GB | {:.2}x of after | <= 1.15x |",
        if reset { "" } else { " (VmHWM not reset: peak of the whole run)" },
        peak as f64 / 1e9,
        rss_live as f64 / 1e9,
        rss_after as f64 / 1e9,
        peak as f64 / rss_after.max(1) as f64
    );
    Ok(())
}

/// The `--load` mode: see [`crate::load`].
async fn run_load(a: &BenchArgs) -> Result<String> {
    let cfg = crate::load::LoadConfig {
        clients: a.clients,
        duration: Duration::from_secs_f64(a.seconds.max(0.0)),
        rows: a.load_rows,
        dim: a.dim,
        batch: a.batch,
        seed: 1,
    };
    let rss0 = rss_bytes();
    let r = crate::load::run(cfg.clone()).await?;
    let rss1 = rss_bytes();
    let mut out = r.markdown(&cfg);
    let _ = writeln!(
        out,
        "| process RSS before / after | {:.1} / {:.1} MB |",
        rss0 as f64 / 1e6,
        rss1 as f64 / 1e6
    );
    if r.mismatched_rows > 0 {
        return Err(PsError::Internal(format!(
            "{} rows differ from the serial replay\n{out}",
            r.mismatched_rows
        )));
    }
    Ok(out)
}

/// Serves `shard` over gRPC on a loopback port; returns its address and a
/// stop switch.
async fn start_grpc(
    shard: Arc<Shard>,
) -> Result<(
    std::net::SocketAddr,
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<Result<()>>,
)> {
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
    Ok((addr, tx, server))
}

/// gRPC pull + push of `next()`'s ids per round (`grads` holds a batch of
/// `dim`-wide gradients, sliced per round); returns rows/s.
async fn grpc_bench(
    shard: Arc<Shard>,
    seconds: f64,
    dim: usize,
    grads: &Bytes,
    next: &mut dyn FnMut() -> Vec<u64>,
) -> Result<f64> {
    let (addr, tx, server) = start_grpc(shard).await?;
    let ch = crate::client_endpoint(addr)?
        .connect()
        .await
        .map_err(|e| PsError::Internal(format!("connect: {e}")))?;
    let mut c = ParameterServerClient::new(ch)
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20);
    let t0 = Instant::now();
    let mut rows = 0u64;
    let mut step = 1_000_000;
    while t0.elapsed().as_secs_f64() < seconds {
        let ids = next();
        let idb = encode_u64(&ids);
        let r = c
            .pull(PullRequest {
                table: "bench".into(),
                ids: idb.clone(),
            })
            .await
            .map_err(|e| PsError::Internal(e.to_string()))?;
        std::hint::black_box(r);
        step += 1;
        c.push(PushRequest {
            table: "bench".into(),
            ids: idb,
            grads: grads.slice(..ids.len() * dim * 4),
            counts: Bytes::new(),
            step,
            request_id: 0,
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

async fn read_u32(s: &mut tokio::net::TcpStream) -> std::io::Result<usize> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b).await?;
    Ok(u32::from_le_bytes(b) as usize)
}

/// The raw-TCP server of [`tcp_bench`]: per round reads `[n u32][ids]`,
/// answers `n * dim` f32 rows, reads `[n u32][ids][grads]`, answers a
/// 16-byte ack. With a shard it decodes and calls `Shard::pull` /
/// `Shard::push` like the gRPC service; without, it answers fixed bytes.
async fn tcp_serve(
    mut s: tokio::net::TcpStream,
    shard: Option<Arc<Shard>>,
    dim: usize,
) -> std::io::Result<()> {
    let _ = s.set_nodelay(true);
    let mut ids = Vec::new();
    let mut grads = Vec::new();
    let mut step = 2_000_000;
    let zeros = vec![0u8; 1 << 20];
    loop {
        let n = read_u32(&mut s).await?;
        ids.resize(n * 8, 0);
        s.read_exact(&mut ids).await?;
        match &shard {
            Some(sh) => {
                let idv = decode_u64("ids", &ids).map_err(std::io::Error::other)?;
                let mut out = Vec::new();
                sh.pull("bench", &idv, &mut out)
                    .map_err(std::io::Error::other)?;
                s.write_all(&crate::service::rows_to_bytes(out)).await?;
            }
            None => {
                let mut left = n * dim * 4;
                while left > 0 {
                    let k = left.min(zeros.len());
                    s.write_all(&zeros[..k]).await?;
                    left -= k;
                }
            }
        }
        let n = read_u32(&mut s).await?;
        ids.resize(n * 8, 0);
        s.read_exact(&mut ids).await?;
        grads.resize(n * dim * 4, 0);
        s.read_exact(&mut grads).await?;
        if let Some(sh) = &shard {
            let idv = decode_u64("ids", &ids).map_err(std::io::Error::other)?;
            let g = decode_f32("grads", &grads).map_err(std::io::Error::other)?;
            step += 1;
            sh.push("bench", &idv, &g, &[], step)
                .map_err(std::io::Error::other)?;
        }
        s.write_all(&[1u8; 16]).await?;
    }
}

/// Raw TCP with the same bytes per round as gRPC pull + push (ids out, rows
/// back, ids + grads out, small ack back); with `shard`, the server also
/// does the same store work. Returns rows/s.
async fn tcp_bench(
    shard: Option<Arc<Shard>>,
    seconds: f64,
    dim: usize,
    grads: &Bytes,
    next: &mut dyn FnMut() -> Vec<u64>,
) -> Result<f64> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| PsError::io("bind", e))?;
    let addr = l.local_addr().map_err(|e| PsError::io("addr", e))?;
    let server = tokio::spawn(async move {
        if let Ok((s, _)) = l.accept().await {
            let _ = tcp_serve(s, shard, dim).await;
        }
    });
    let mut c = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| PsError::io("connect", e))?;
    let _ = c.set_nodelay(true);
    let mut rows = Vec::new();
    let mut ack = [0u8; 16];
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed().as_secs_f64() < seconds {
        let ids = next();
        let idb = encode_u64(&ids);
        let len = (ids.len() as u32).to_le_bytes();
        rows.resize(ids.len() * dim * 4, 0);
        let io = async {
            c.write_all(&len).await?;
            c.write_all(&idb).await?;
            c.read_exact(&mut rows).await?;
            c.write_all(&len).await?;
            c.write_all(&idb).await?;
            c.write_all(&grads[..ids.len() * dim * 4]).await?;
            c.read_exact(&mut ack).await?;
            Ok::<_, std::io::Error>(())
        };
        io.await.map_err(|e| PsError::io("raw tcp", e))?;
        std::hint::black_box(&rows);
        n += ids.len() as u64;
    }
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    drop(c);
    let _ = server.await;
    Ok(rate)
}
