//! The optimizer update rules, as plain functions on slices: the one
//! implementation of the math that the shards apply to embedding rows and
//! dense tensors (`ember_ps::optim`) and that the workers' in-process dense
//! optimizer applies (`ember_model::optim`). Each states its formula.

/// `w -= lr * g`.
#[inline]
pub fn sgd(w: &mut [f32], g: &[f32], lr: f32) {
    for (w, g) in w.iter_mut().zip(g) {
        *w -= lr * g;
    }
}

/// Adagrad: `acc += g²; w -= lr * g / (sqrt(acc) + eps)`.
#[inline]
pub fn adagrad(w: &mut [f32], acc: &mut [f32], g: &[f32], lr: f32, eps: f32) {
    for ((w, a), g) in w.iter_mut().zip(acc.iter_mut()).zip(g) {
        *a += g * g;
        *w -= lr * g / (a.sqrt() + eps);
    }
}

/// Adam with bias corrections `c1 = 1 - β1^t`, `c2 = 1 - β2^t`:
/// `m = β1 m + (1-β1) g; v = β2 v + (1-β2) g²; w -= lr * (m/c1) / (sqrt(v/c2) + eps)`.
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn adam(
    w: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    g: &[f32],
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    c1: f32,
    c2: f32,
) {
    for (((w, m), v), g) in w.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
        *m = beta1 * *m + (1.0 - beta1) * g;
        *v = beta2 * *v + (1.0 - beta2) * g * g;
        let mhat = *m / c1;
        let vhat = *v / c2;
        *w -= lr * mhat / (vhat.sqrt() + eps);
    }
}

/// Mean of `g²` over a row (0 for an empty row).
///
/// Summed in 8 interleaved lanes (value `i` into lane `i % 8`, the lanes
/// then added in order, then the tail), so the adds are independent and
/// vectorise; the order is fixed, so the result is deterministic.
#[inline]
fn mean_sq(g: &[f32]) -> f32 {
    if g.is_empty() {
        return 0.0;
    }
    let mut lanes = [0f32; 8];
    let mut chunks = g.chunks_exact(8);
    for c in &mut chunks {
        for (l, x) in lanes.iter_mut().zip(c) {
            *l += x * x;
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|x| x * x).sum();
    (lanes.iter().sum::<f32>() + tail) / g.len() as f32
}

/// Row-wise Adagrad: `acc += mean(g²); w -= lr * g / (sqrt(acc) + eps)`.
#[inline]
pub fn rowwise_adagrad(w: &mut [f32], acc: &mut f32, g: &[f32], lr: f32, eps: f32) {
    *acc += mean_sq(g);
    let scale = lr / (acc.sqrt() + eps);
    for (w, g) in w.iter_mut().zip(g) {
        *w -= scale * g;
    }
}

/// Partial row-wise Adam with bias corrections `c1 = 1 - β1^t`, `c2 = 1 - β2^t`:
/// `m = β1 m + (1-β1) g` per coordinate; `v = β2 v + (1-β2) mean(g²)` per row;
/// `w -= lr * (m/c1) / (sqrt(v/c2) + eps)`.
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn rowwise_adam(
    w: &mut [f32],
    m: &mut [f32],
    v: &mut f32,
    g: &[f32],
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    c1: f32,
    c2: f32,
) {
    *v = beta2 * *v + (1.0 - beta2) * mean_sq(g);
    let denom = (*v / c2).sqrt() + eps;
    for ((w, m), g) in w.iter_mut().zip(m.iter_mut()).zip(g) {
        *m = beta1 * *m + (1.0 - beta1) * g;
        *w -= lr * (*m / c1) / denom;
    }
}

/// FTRL-Proximal per coordinate:
/// `σ = (sqrt(n + g²) - sqrt(n)) / α; z += g - σ w; n += g²;`
/// `w = 0 if |z| <= l1 else -(z - sign(z) l1) / ((β + sqrt(n)) / α + l2)`.
/// The stored weight is the FTRL weight, so after its first update a row no
/// longer depends on its initial value (FTRL rows are usually zero-initialized).
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn ftrl(
    w: &mut [f32],
    z: &mut [f32],
    n: &mut [f32],
    g: &[f32],
    alpha: f32,
    beta: f32,
    l1: f32,
    l2: f32,
) {
    for (((w, z), n), g) in w.iter_mut().zip(z.iter_mut()).zip(n.iter_mut()).zip(g) {
        let n_new = *n + g * g;
        let sigma = (n_new.sqrt() - n.sqrt()) / alpha;
        *z += g - sigma * *w;
        *n = n_new;
        *w = if z.abs() <= l1 {
            0.0
        } else {
            -(*z - z.signum() * l1) / ((beta + n.sqrt()) / alpha + l2)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lane sum equals the mean of squares computed in f64, for widths
    /// below, at and past one 8-value chunk (tail included), and is 0 for
    /// an empty row.
    #[test]
    fn mean_sq_matches_the_f64_mean_at_every_width() {
        assert_eq!(mean_sq(&[]), 0.0);
        for n in [1usize, 3, 8, 9, 18, 32, 37] {
            let g: Vec<f32> = (0..n).map(|i| (i as f32 - 4.5) * 0.37).collect();
            let want = g.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>() / n as f64;
            let got = f64::from(mean_sq(&g));
            assert!(
                (got - want).abs() <= 1e-6 * want.max(1e-12),
                "n {n}: {got} vs {want}"
            );
        }
    }

    /// Row-wise Adagrad by hand: acc 0.1 + mean(g²) = 0.1 + 2.5, one scale
    /// for the row.
    #[test]
    fn rowwise_adagrad_by_hand() {
        let mut w = [1.0f32, -1.0];
        let mut acc = 0.1f32;
        rowwise_adagrad(&mut w, &mut acc, &[1.0, 2.0], 0.5, 0.0);
        let scale = 0.5 / 2.6f32.sqrt();
        assert!((acc - 2.6).abs() < 1e-6);
        assert!((w[0] - (1.0 - scale)).abs() < 1e-6 && (w[1] - (-1.0 - 2.0 * scale)).abs() < 1e-6);
    }
}
