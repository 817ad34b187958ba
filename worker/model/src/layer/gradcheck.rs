//! Finite-difference gradient checking for layers and models (used by tests).
//!
//! For a scalar function `f` of some `Var`s, compares the autograd gradient
//! `g = df/dv` with the central difference `(f(v + h) - f(v - h)) / 2h` on a
//! sample of entries of every var. Run it in `f64`; the relative error
//! `|g - n| / max(|g|, |n|)` must stay below the tolerance wherever
//! `max(|g|, |n|) > 1e-6`; smaller entries are dominated by the round-off of
//! the difference quotient (about `1e-16 * |f| / h`) and must agree to
//! `|g - n| <= 1e-9` instead. Use `h = 1e-5` for `O(1)` losses.

use candle_core::{DType, Result, Tensor, Var};

/// Outcome of one gradient check.
#[derive(Debug, Clone, Default)]
pub struct GradCheckReport {
    /// Largest relative error seen.
    pub max_rel: f64,
    /// Entries compared.
    pub checked: usize,
    /// Failures `(var name, flat index, analytic, numeric)`.
    pub failures: Vec<(String, usize, f64, f64)>,
}

/// Checks `f`'s gradient w.r.t. `vars` (name, var) on up to `per_var` entries
/// of each var (evenly strided), with step `h`, relative tolerance `tol`.
pub fn check<F>(
    vars: &[(String, Var)],
    f: F,
    per_var: usize,
    h: f64,
    tol: f64,
) -> Result<GradCheckReport>
where
    F: Fn() -> Result<Tensor>,
{
    let rel_floor = 1e-6;
    let abs_tol = 1e-9;
    let loss = f()?;
    let grads = loss.backward()?;
    let mut rep = GradCheckReport::default();
    for (name, var) in vars {
        assert_eq!(
            var.dtype(),
            DType::F64,
            "gradient checks run in f64 ({name})"
        );
        let shape = var.shape().clone();
        let base: Vec<f64> = var.as_tensor().flatten_all()?.to_vec1()?;
        let analytic: Vec<f64> = match grads.get(var.as_tensor()) {
            Some(g) => g.flatten_all()?.to_vec1()?,
            None => vec![0.0; base.len()],
        };
        let n = base.len();
        let stride = (n / per_var.max(1)).max(1);
        let mut idx = 0;
        while idx < n {
            let mut v = base.clone();
            v[idx] = base[idx] + h;
            var.set(&Tensor::from_vec(v.clone(), shape.clone(), var.device())?)?;
            let fp = f()?.to_scalar::<f64>()?;
            v[idx] = base[idx] - h;
            var.set(&Tensor::from_vec(v, shape.clone(), var.device())?)?;
            let fm = f()?.to_scalar::<f64>()?;
            let num = (fp - fm) / (2.0 * h);
            let a = analytic[idx];
            let scale = a.abs().max(num.abs());
            let rel = if scale > rel_floor {
                (a - num).abs() / scale
            } else {
                0.0
            };
            let bad = if scale > rel_floor {
                rel > tol
            } else {
                (a - num).abs() > abs_tol
            };
            rep.max_rel = rep.max_rel.max(rel);
            rep.checked += 1;
            if bad {
                rep.failures.push((name.clone(), idx, a, num));
            }
            idx += stride;
        }
        var.set(&Tensor::from_vec(base, shape, var.device())?)?;
    }
    Ok(rep)
}

/// Panics with a readable message unless `rep` has no failures.
pub fn assert_ok(what: &str, rep: &GradCheckReport) {
    assert!(rep.checked > 0, "{what}: nothing checked");
    assert!(
        rep.failures.is_empty(),
        "{what}: {} of {} entries off (max rel {:.3e}); first: {:?}",
        rep.failures.len(),
        rep.checked,
        rep.max_rel,
        &rep.failures[..rep.failures.len().min(5)]
    );
}
