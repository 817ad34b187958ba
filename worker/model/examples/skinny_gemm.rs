//! GFLOP/s of `gemm` 0.19 and of Ember's skinny kernel
//! (`ember_model::layer::skinny_gemm`) on the fused kernels' shapes (DIEN's
//! aux net at batch 128 and mean length 65.5, the GRU's input projection),
//! best of 30 alternating calls each, one thread:
//! `RAYON_NUM_THREADS=1 cargo run -p ember-model --example skinny_gemm`.
use ember_model::layer::kernels::mm_gemm;
use ember_model::layer::skinny_gemm::mm_f32;
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    let n = 8256usize;
    let shapes: &[(&str, usize, usize, usize, bool, bool)] = &[
        ("dW2 = S1^T dZ2", 100, 2 * n, 50, true, false),
        ("dWh = H^T dG", 36, n, 100, true, false),
        ("dWe = E^T dZ1", 36, 2 * n, 100, true, false),
        ("dWgru = Hp^T dG", 36, 12800, 108, true, false),
        ("G = H Wh", n, 36, 100, false, false),
        ("Z1 = E We", 2 * n, 36, 100, false, false),
        ("Z2 = S1 W2", 2 * n, 100, 50, false, false),
        ("dZ1 = dZ2 W2^T", 2 * n, 50, 100, false, true),
        ("dh = dG Wh^T", n, 100, 36, false, true),
        ("de = dZ1 We^T", 2 * n, 100, 36, false, true),
        ("gru x W [B*T,36]x[36,108]", 12800, 36, 108, false, false),
        ("small", 37, 36, 108, false, false),
    ];
    for &(name, m, k, nn, ta, tb) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect();
        let b: Vec<f32> = (0..k * nn).map(|i| (i % 5) as f32 * 0.1 - 0.2).collect();
        let (mut t1, mut t2) = (f64::MAX, f64::MAX);
        for _ in 0..30 {
            let t = Instant::now();
            std::hint::black_box(mm_gemm(&a, ta, &b, tb, m, k, nn)?);
            t1 = t1.min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            std::hint::black_box(mm_f32(&a, ta, &b, tb, m, k, nn).ok_or_else(no_kernel)?);
            t2 = t2.min(t.elapsed().as_secs_f64());
        }
        let c1 = mm_gemm(&a, ta, &b, tb, m, k, nn)?;
        let c2 = mm_f32(&a, ta, &b, tb, m, k, nn).ok_or_else(no_kernel)?;
        let same = c1
            .iter()
            .zip(&c2)
            .filter(|(x, y)| x.to_bits() == y.to_bits())
            .count();
        let f = 2.0 * (m * k * nn) as f64 / 1e9;
        println!(
            "{name:28} gemm {:6.1} GFLOP/s | skinny {:6.1} GFLOP/s ({:.2}x)  bit-equal {}/{}",
            f / t1,
            f / t2,
            t1 / t2,
            same,
            c1.len()
        );
    }
    Ok(())
}

/// The error when the skinny kernel does not take a shape (no AVX2 + FMA).
fn no_kernel() -> candle_core::Error {
    candle_core::Error::Msg("the skinny kernel needs AVX2 + FMA".into())
}
