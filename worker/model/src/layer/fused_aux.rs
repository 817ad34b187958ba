//! Fused CPU kernel for the DIEN auxiliary net on positive and negative
//! behaviours at once, with a hand-written backward (candle `CustomOp3`).
//!
//! Same function as [`AuxNet::logits`] (sigmoid MLP `H+E -> h1 -> h2 -> 1` on
//! `[h_n, e]`) for the `2N` rows `[h_n, e_n]` (positives, rows `0..N`) and
//! `[h_n, e'_n]` (negatives, rows `N..2N`). The first layer is split by input
//! block, `W1 = [W_h; W_e]`, and the state part `G_n = h_n W_h + b1` is shared by
//! the positive and the negative row. Per row `m` (state `n = m mod N`):
//! `S1 = sigmoid(e_m W_e + G_n)`, `S2 = sigmoid(S1 W2 + b2)`, `f = S2 w3 + b3`.
//! Backward (`g` = dL/df): `dZ2 = g w3^T * S2 (1 - S2)`,
//! `dZ1 = dZ2 W2^T * S1 (1 - S1)`, `dG_n = dZ1_n + dZ1_{N+n}`,
//! `dW_e = E^T dZ1`, `dW_h = H^T dG`, `db1 = sum dG`, `de = dZ1 W_e^T`,
//! `dh = dG W_h^T`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::aux::AuxNet;
use super::kernels::{col_sums, mm, slice, tensor, values, Real, SavedForward};
use crate::dispatch_real;

/// Logits `[2N]` of `[h, e_pos]` then `[h, e_neg]` for `hs` `[N, H]` and
/// `e2 = cat(e_pos, e_neg)` `[2N, E]`.
pub fn aux_logits(net: &AuxNet, hs: &Tensor, e2: &Tensor) -> Result<Tensor> {
    let l = &net.mlp.layers;
    let (_, h) = hs.dims2()?;
    let (_, e) = e2.dims2()?;
    let parts: Vec<Tensor> = l
        .iter()
        .flat_map(|lin| {
            [
                lin.weight.as_tensor().flatten_all(),
                lin.bias.as_tensor().flatten_all(),
            ]
        })
        .collect::<Result<_>>()?;
    let p = Tensor::cat(&parts, 0)?;
    let op = AuxOp {
        h,
        e,
        h1: l[0].out_dim(),
        h2: l[1].out_dim(),
        cache: SavedForward::default(),
    };
    hs.contiguous()?.apply_op3(&e2.contiguous()?, &p, op)
}

struct AuxOp {
    h: usize,
    e: usize,
    h1: usize,
    h2: usize,
    cache: SavedForward,
}

struct Cache<T> {
    s1: Vec<T>,
    s2: Vec<T>,
}

struct Off {
    b1: usize,
    w2: usize,
    b2: usize,
    w3: usize,
    b3: usize,
    len: usize,
}

impl AuxOp {
    fn off(&self) -> Off {
        let b1 = (self.h + self.e) * self.h1;
        let w2 = b1 + self.h1;
        let b2 = w2 + self.h1 * self.h2;
        let w3 = b2 + self.h2;
        let b3 = w3 + self.h2;
        Off {
            b1,
            w2,
            b2,
            w3,
            b3,
            len: b3 + 1,
        }
    }

    fn fwd<T: Real>(&self, hs: &[T], e2: &[T], p: &[T], n: usize) -> Result<(Vec<T>, Cache<T>)> {
        let (h, e, h1, h2) = (self.h, self.e, self.h1, self.h2);
        let o = self.off();
        if p.len() != o.len {
            candle_core::bail!("fused aux: packed params {} != {}", p.len(), o.len);
        }
        let wh = &p[..h * h1];
        let we = &p[h * h1..(h + e) * h1];
        let mut g = mm(hs, false, wh, false, n, h, h1)?;
        for row in g.chunks_exact_mut(h1) {
            for (v, &b) in row.iter_mut().zip(&p[o.b1..o.b1 + h1]) {
                *v += b;
            }
        }
        let mut s1 = mm(e2, false, we, false, 2 * n, e, h1)?;
        for (m, row) in s1.chunks_exact_mut(h1).enumerate() {
            let gr = &g[(m % n) * h1..(m % n + 1) * h1];
            for (v, &gv) in row.iter_mut().zip(gr) {
                *v += gv;
            }
            T::sigmoid_in_place(row);
        }
        let mut s2 = mm(&s1, false, &p[o.w2..o.w2 + h1 * h2], false, 2 * n, h1, h2)?;
        let (b2, w3, b3) = (&p[o.b2..o.b2 + h2], &p[o.w3..o.w3 + h2], p[o.b3]);
        let mut out = Vec::with_capacity(2 * n);
        for row in s2.chunks_exact_mut(h2) {
            // The sigmoid over the row (vectorized), then the dot product.
            for (v, &bb) in row.iter_mut().zip(b2) {
                *v += bb;
            }
            T::sigmoid_in_place(row);
            let mut f = b3;
            for (&v, &w) in row.iter().zip(w3) {
                f += v * w;
            }
            out.push(f);
        }
        Ok((out, Cache { s1, s2 }))
    }

    fn bwd_t<T: Real>(
        &self,
        hs: &Tensor,
        e2: &Tensor,
        p: &Tensor,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (h, e, h1, h2) = (self.h, self.e, self.h1, self.h2);
        let (n, _) = hs.dims2()?;
        let o = self.off();
        let (hv, ev, pv, gv): (Vec<T>, Vec<T>, Vec<T>, Vec<T>) =
            (values(hs)?, values(e2)?, values(p)?, values(grad)?);
        let guard = self.cache.lock();
        let c: &Cache<T> = SavedForward::get(&guard, "fused aux")?;
        let mut dp = vec![T::zero_(); o.len];
        let w3 = &pv[o.w3..o.w3 + h2];
        let mut dz2 = vec![T::zero_(); 2 * n * h2];
        let mut db3 = T::zero_();
        for m in 0..2 * n {
            let gm = gv[m];
            db3 += gm;
            let s2 = &c.s2[m * h2..(m + 1) * h2];
            for j in 0..h2 {
                dp[o.w3 + j] += gm * s2[j];
                dz2[m * h2 + j] = gm * w3[j] * s2[j] * (T::one_() - s2[j]);
            }
        }
        dp[o.b3] = db3;
        for (d, s) in dp[o.b2..o.b2 + h2].iter_mut().zip(col_sums(&dz2, h2)) {
            *d = s;
        }
        let dw2 = mm(&c.s1, true, &dz2, false, h1, 2 * n, h2)?;
        dp[o.w2..o.w2 + h1 * h2].copy_from_slice(&dw2);
        let mut dz1 = mm(&dz2, false, &pv[o.w2..o.w2 + h1 * h2], true, 2 * n, h2, h1)?;
        for (v, &s) in dz1.iter_mut().zip(&c.s1) {
            *v = *v * s * (T::one_() - s);
        }
        let mut dg = dz1[..n * h1].to_vec();
        for (d, &v) in dg.iter_mut().zip(&dz1[n * h1..]) {
            *d += v;
        }
        for (d, s) in dp[o.b1..o.b1 + h1].iter_mut().zip(col_sums(&dg, h1)) {
            *d = s;
        }
        let dwh = mm(&hv, true, &dg, false, h, n, h1)?;
        let dwe = mm(&ev, true, &dz1, false, e, 2 * n, h1)?;
        dp[..h * h1].copy_from_slice(&dwh);
        dp[h * h1..(h + e) * h1].copy_from_slice(&dwe);
        let dh = mm(&dg, false, &pv[..h * h1], true, n, h1, h)?;
        let de = mm(&dz1, false, &pv[h * h1..(h + e) * h1], true, 2 * n, h1, e)?;
        Ok((
            tensor(dh, &[n, h])?,
            tensor(de, &[2 * n, e])?,
            tensor(dp, &[o.len])?,
        ))
    }
}

fn run<T: Real>(op: &AuxOp, s: [(&CpuStorage, &Layout); 3]) -> Result<(CpuStorage, Shape)> {
    let (n, _) = s[0].1.shape().dims2()?;
    let (hs, e2, p) = (
        slice::<T>(s[0].0, s[0].1)?,
        slice::<T>(s[1].0, s[1].1)?,
        slice::<T>(s[2].0, s[2].1)?,
    );
    let (out, cache) = op.fwd(hs, e2, p, n)?;
    op.cache.save(cache);
    Ok((T::to_cpu_storage_owned(out), Shape::from(2 * n)))
}

impl CustomOp3 for AuxOp {
    fn name(&self) -> &'static str {
        "dien-aux-logits"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch_real!(s1.dtype(), run(self, [(s1, l1), (s2, l2), (s3, l3)]))
    }

    fn bwd(
        &self,
        hs: &Tensor,
        e2: &Tensor,
        p: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dh, de, dp) = match hs.dtype() {
            candle_core::DType::F32 => self.bwd_t::<f32>(hs, e2, p, grad)?,
            candle_core::DType::F64 => self.bwd_t::<f64>(hs, e2, p, grad)?,
            d => candle_core::bail!("fused aux: unsupported dtype {d:?}"),
        };
        Ok((Some(dh), Some(de), Some(dp)))
    }
}
