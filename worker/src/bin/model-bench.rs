//! `model-bench`: samples/s of one training step (forward + backward + local
//! dense Adam) for BaseModel, DIN and DIEN on synthetic ML-100k-like batches.
//!
//! Batches: B = 128 (default), history lengths log-normal with median 65
//! capped at `--max-len` 100 (ML-100k-like), 1682 items, 19 categories, one
//! random negative per step (DIEN), embedding 18 + 18. Rows are pre-pulled
//! (no store in the timed loop). One thread unless `--threads N` (the batch
//! split into N data-parallel parts, or with `--intra-op` candle's N threads).
//!
//! Also prints the multiply-adds per sample on valid steps (forward; the
//! backward is counted as 2x forward) and the resulting fraction of the
//! machine's peak FLOP rate: by default measured on this core at start (12
//! independent AVX2 FMA chains, best of 5 runs, so that the clock the CPU
//! really runs at is in the figure); `--peak-gflops X` sets it instead (the
//! earlier default was an assumed 2 FMA x 8 lanes x 2 flop x 2.45 GHz =
//! 78.4 GFLOP/s).
//!
//! Calls `model::tune_allocator` first unless `--no-tune-alloc`.
//!
//! Run: `target/debug/model-bench [--models base,din,dien] [--threads N [--intra-op]]`;
//! on a GPU build (`--features cuda`) add `--device cuda`.

use std::time::Instant;

use clap::Parser;
use ember_worker::batch::{Batch, Sample};
use ember_worker::model::{
    build_model, CtrModel, DenseOptimizer, ModelConfig, ModelKind, SparseRows,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, LogNormal};

/// Model training-step benchmark.
#[derive(Parser, Debug)]
struct Args {
    /// Comma-separated models: base, din, dien.
    #[arg(long, default_value = "base,din,dien")]
    models: String,
    /// Batch size.
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// History cap.
    #[arg(long, default_value_t = 100)]
    max_len: usize,
    /// Seconds to measure per model (after 2 warm-up steps).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Use the fused CPU kernels.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    fused: bool,
    /// Use Dice instead of PReLU in the MLP.
    #[arg(long)]
    dice: bool,
    /// Threads per step: the batch is split data-parallel into this many
    /// parts (`CtrModel::set_threads`), candle's ops single-threaded; with
    /// `--intra-op`, candle's gemm/rayon threads instead.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Use `--threads` as candle's intra-op (gemm/rayon) threads instead of
    /// splitting the batch.
    #[arg(long)]
    intra_op: bool,
    /// Keep glibc's default allocator settings (no `tune_allocator`).
    #[arg(long)]
    no_tune_alloc: bool,
    /// Peak GFLOP/s used for the efficiency figure (default: measured).
    #[arg(long)]
    peak_gflops: Option<f64>,
    /// Batches from this samples file (the training format of `ember
    /// train`) instead of synthetic ones: `--data-batches` batches of
    /// samples taken evenly over the whole file, so that the step measured is
    /// the one a cluster job on that file runs.
    #[arg(long)]
    data: Option<std::path::PathBuf>,
    /// Batches taken from `--data`.
    #[arg(long, default_value_t = 64)]
    data_batches: usize,
    /// Device: cpu, or cuda (GPU 0; needs the `cuda` feature). The fused
    /// kernels are CPU-only: on cuda the models take the reference path.
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn samples(n: usize, max_len: usize, rng: &mut StdRng) -> Vec<Sample> {
    let len_dist = LogNormal::new((65f64).ln(), 0.7).expect("lognormal");
    let cat = |i: u64| i % 19 + 1;
    (0..n)
        .map(|_| {
            let l = (len_dist.sample(rng).round() as usize).clamp(1, max_len);
            let hist: Vec<u64> = (0..l).map(|_| rng.random_range(1..=1682)).collect();
            let neg: Vec<u64> = (0..l).map(|_| rng.random_range(1..=1682)).collect();
            let item = rng.random_range(1..=1682);
            Sample {
                label: if rng.random_bool(0.5) { 1.0 } else { 0.0 },
                user: rng.random_range(1..=943),
                item,
                cat: cat(item),
                hist_cats: hist.iter().map(|&i| cat(i)).collect(),
                hist_items: hist,
                neg_cats: neg.iter().map(|&i| cat(i)).collect(),
                neg_items: neg,
                ..Default::default()
            }
        })
        .collect()
}

/// `n` batches of `batch` samples taken evenly over the samples file `path`
/// (every k-th sample, k = samples in the file / (n * batch), at least 1).
fn file_batches(
    path: &std::path::Path,
    batch: usize,
    n: usize,
    max_len: usize,
) -> anyhow::Result<Vec<Batch>> {
    use ember_worker::data::reader::SampleReader;
    let files = [path.to_path_buf()];
    let mut total = 0usize;
    let mut r = SampleReader::open(&files, 0, 1, false)?;
    while let Some(s) = r.read()? {
        total += 1;
        r.recycle(s);
    }
    let want = n.max(1) * batch;
    anyhow::ensure!(
        total >= batch,
        "{}: {total} samples, fewer than one batch of {batch}",
        path.display()
    );
    let every = (total / want).max(1);
    let mut kept = Vec::with_capacity(want.min(total));
    let mut r = SampleReader::open(&files, 0, 1, false)?;
    let mut i = 0usize;
    while let Some(s) = r.read()? {
        if i.is_multiple_of(every) && kept.len() < want {
            kept.push(s);
        }
        i += 1;
    }
    println!(
        "data {}: {} of {total} samples (every {every}th), {} batches",
        path.display(),
        kept.len(),
        kept.len() / batch
    );
    Ok(kept
        .chunks_exact(batch)
        .map(|c| Batch::from_samples(c, max_len))
        .collect())
}

fn rows(batch: &Batch, tables: &[(String, usize)], rng: &mut StdRng) -> SparseRows {
    let mut r = SparseRows::new();
    for ids in batch.tables() {
        if let Some((_, d)) = tables.iter().find(|(n, _)| *n == ids.table) {
            r.insert(
                &ids.table,
                (0..ids.unique.len() * d)
                    .map(|_| rng.random_range(-0.05..0.05))
                    .collect(),
            );
        }
    }
    r
}

/// CPU time (user + system) of this process in seconds, from /proc/self/stat
/// (robust to other processes competing for the cores; 10 ms resolution).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields after the command: state(0) ... utime(11) stime(12).
    (ticks(11) + ticks(12)) / 100.0
}

/// Forward multiply-adds per sample given the mean valid length `l`.
fn macs_per_sample(kind: ModelKind, l: f64) -> f64 {
    let e = 36.0;
    let mlp = |inp: f64| inp * 200.0 + 200.0 * 80.0 + 80.0;
    let att = 4.0 * e * 80.0 + 80.0 * 40.0 + 40.0;
    let gru = 2.0 * e * 3.0 * e;
    let aux = 2.0 * ((2.0 * e) * 100.0 + 100.0 * 50.0 + 50.0);
    match kind {
        ModelKind::Base => mlp(2.0 * e),
        ModelKind::Din => mlp(4.0 * e) + l * att,
        ModelKind::Dien => mlp(4.0 * e) + l * (att + 2.0 * gru) + (l - 1.0).max(0.0) * aux,
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Data-parallel: one intra-op thread per part; intra-op: candle's threads.
    let intra = if args.intra_op { args.threads } else { 1 };
    std::env::set_var("RAYON_NUM_THREADS", intra.to_string());
    let device = match args.device.as_str() {
        "cpu" => candle_core::Device::Cpu,
        "cuda" => candle_core::Device::new_cuda(0)?,
        other => anyhow::bail!("unknown device {other} (cpu or cuda)"),
    };
    let tuned = !args.no_tune_alloc && ember_worker::model::tune_allocator();
    let mut rng = StdRng::seed_from_u64(7);
    let pool: Vec<Batch> = match &args.data {
        None => (0..8)
            .map(|_| {
                Batch::from_samples(&samples(args.batch, args.max_len, &mut rng), args.max_len)
            })
            .collect(),
        Some(path) => file_batches(path, args.batch, args.data_batches, args.max_len)?,
    };
    let mean_len = pool.iter().flat_map(|b| b.lens.iter()).sum::<usize>() as f64
        / (pool.len() * args.batch) as f64;
    let mean_t = pool.iter().map(|b| b.max_len).sum::<usize>() as f64 / pool.len() as f64;
    println!(
        "device {} | batch {} | mean valid length {:.1} | mean padded T {:.1} | fused {} | threads {} ({}) | tuned allocator {}",
        args.device,
        args.batch,
        mean_len,
        mean_t,
        args.fused,
        args.threads,
        if args.intra_op { "intra-op" } else { "data-parallel" },
        tuned
    );
    let peak = match args.peak_gflops {
        Some(p) => {
            println!("peak {p:.1} GFLOP/s (given)");
            p
        }
        None => match measured_peak_gflops() {
            Some(p) => {
                println!("peak {p:.1} GFLOP/s (measured: one core, AVX2 FMA chains)");
                p
            }
            None => {
                println!("peak 78.4 GFLOP/s (assumed: no AVX2 + FMA to measure with)");
                78.4
            }
        },
    };
    println!(
        "{:<6} {:>10} {:>10} {:>10} {:>10} {:>12} {:>10} {:>8}",
        "model", "samples/s", "ms/batch", "cpu ms", "fwd ms", "MAC/sample", "GFLOP/s", "%peak"
    );
    for name in args.models.split(',') {
        let kind = match name.trim() {
            "base" => ModelKind::Base,
            "din" => ModelKind::Din,
            "dien" => ModelKind::Dien,
            other => anyhow::bail!("unknown model {other}"),
        };
        let mut cfg = ModelConfig::of(kind);
        cfg.fused = args.fused;
        if args.dice {
            cfg.activation = ember_worker::layer::mlp::Activation::Dice;
        }
        let mut model = build_model(&cfg, &device)?;
        if !args.intra_op {
            model.set_threads(args.threads);
        }
        let tables = model.sparse_tables();
        let inputs: Vec<(Batch, SparseRows)> = pool
            .iter()
            .map(|b| (b.clone(), rows(b, &tables, &mut rng)))
            .collect();
        let mut opt = DenseOptimizer::adam(1e-3);
        let step = |model: &mut Box<dyn CtrModel>,
                    opt: &mut DenseOptimizer,
                    i: usize|
         -> anyhow::Result<()> {
            let (b, r) = &inputs[i % inputs.len()];
            let out = model.step(b, r, true)?;
            opt.apply(&mut **model, &out.dense_grads)?;
            Ok(())
        };
        for i in 0..2 {
            step(&mut model, &mut opt, i)?;
        }
        let t0 = Instant::now();
        let c0 = cpu_seconds();
        let mut n = 0;
        while t0.elapsed().as_secs_f64() < args.seconds || n < 3 {
            step(&mut model, &mut opt, n)?;
            n += 1;
        }
        let train_s = t0.elapsed().as_secs_f64() / n as f64;
        let cpu_s = (cpu_seconds() - c0) / n as f64;
        // Forward only (eval mode).
        let t1 = Instant::now();
        let m = 3;
        for i in 0..m {
            let (b, r) = &inputs[i % inputs.len()];
            model.step(b, r, false)?;
        }
        let fwd_s = t1.elapsed().as_secs_f64() / m as f64;
        let sps = args.batch as f64 / train_s;
        let macs = macs_per_sample(kind, mean_len);
        let gflops = 2.0 * 3.0 * macs * sps / 1e9;
        println!(
            "{:<6} {:>10.0} {:>10.1} {:>10.1} {:>10.1} {:>12.0} {:>10.2} {:>7.1}%",
            name,
            sps,
            train_s * 1e3,
            cpu_s * 1e3,
            fwd_s * 1e3,
            macs,
            gflops,
            100.0 * gflops / peak
        );
    }
    Ok(())
}

/// This core's f32 FMA rate in GFLOP/s: 12 independent chains of AVX2
/// `a = a * m + c` (enough to cover the FMA latency on two pipes), best of 5
/// timed runs. None without AVX2 + FMA.
fn measured_peak_gflops() -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        let mut best = 0f64;
        for _ in 0..5 {
            let iters = 20_000_000u64;
            let t = Instant::now();
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            let sink = unsafe { fma_chains_avx2(iters) };
            let s = t.elapsed().as_secs_f64();
            std::hint::black_box(sink);
            best = best.max((12 * 8 * 2) as f64 * iters as f64 / s / 1e9);
        }
        return Some(best);
    }
    None
}

/// `iters` rounds of 12 independent 8-lane FMAs; returns a value depending on
/// all of them so that none is optimised away.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_chains_avx2(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let m = _mm256_set1_ps(0.999_999);
    let c = _mm256_set1_ps(1e-6);
    let (mut a0, mut a1, mut a2, mut a3) = (
        _mm256_set1_ps(0.1),
        _mm256_set1_ps(0.2),
        _mm256_set1_ps(0.3),
        _mm256_set1_ps(0.4),
    );
    let (mut a4, mut a5, mut a6, mut a7) = (
        _mm256_set1_ps(0.5),
        _mm256_set1_ps(0.6),
        _mm256_set1_ps(0.7),
        _mm256_set1_ps(0.8),
    );
    let (mut a8, mut a9, mut a10, mut a11) = (
        _mm256_set1_ps(0.9),
        _mm256_set1_ps(1.0),
        _mm256_set1_ps(1.1),
        _mm256_set1_ps(1.2),
    );
    for _ in 0..iters {
        a0 = _mm256_fmadd_ps(a0, m, c);
        a1 = _mm256_fmadd_ps(a1, m, c);
        a2 = _mm256_fmadd_ps(a2, m, c);
        a3 = _mm256_fmadd_ps(a3, m, c);
        a4 = _mm256_fmadd_ps(a4, m, c);
        a5 = _mm256_fmadd_ps(a5, m, c);
        a6 = _mm256_fmadd_ps(a6, m, c);
        a7 = _mm256_fmadd_ps(a7, m, c);
        a8 = _mm256_fmadd_ps(a8, m, c);
        a9 = _mm256_fmadd_ps(a9, m, c);
        a10 = _mm256_fmadd_ps(a10, m, c);
        a11 = _mm256_fmadd_ps(a11, m, c);
    }
    let s = _mm256_add_ps(
        _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
        _mm256_add_ps(
            _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)),
            _mm256_add_ps(_mm256_add_ps(a8, a9), _mm256_add_ps(a10, a11)),
        ),
    );
    let mut out = [0f32; 8];
    // SAFETY: `out` holds the 8 f32 an unaligned 256-bit store writes.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), s) };
    out.iter().sum()
}
