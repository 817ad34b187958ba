//! Fused CPU kernel for the DIN activation-unit scores, with a hand-written
//! backward (candle `CustomOp3`).
//!
//! Same function as [`ActivationUnit::scores_reference`] for a sigmoid FFN
//! `4E -> h1 -> h2 -> 1`, evaluated on valid steps only (padded scores are 0).
//! The first layer is split by input block, `W1 = [W_q; W_k; W_d; W_p]`:
//! `[q, k, q-k, q*k] W1 = q (W_q + W_d) + [k, q*k] [W_k - W_d; W_p]`, so the
//! `q` part (`H1 = q A + b1`, `A = W_q + W_d`) is computed once per sample and
//! the per-step product has width `2E` instead of `4E`. Per valid step `n`:
//! `S1 = sigmoid(X_n Bm + H1_b)`, `S2 = sigmoid(S1 W2 + b2)`, `s = S2 w3 + b3`,
//! `X_n = [k_n, q_b * k_n]`, `Bm = [W_k - W_d; W_p]`.
//! Backward (`g` = dL/ds): `dZ2 = g w3^T * S2 (1 - S2)`, `dZ1 = dZ2 W2^T * S1 (1 - S1)`,
//! `dBm = X^T dZ1`, `dX = dZ1 Bm^T`, `dH1_b = sum_{n in b} dZ1_n`, `dA = q^T dH1`,
//! `dW_q = dA`, `dW_k = dBm_k`, `dW_d = dA - dBm_k`, `dW_p = dBm_p`,
//! `dk_n = dX_k + q_b * dX_p`, `dq_b = dH1_b A^T + sum_{n in b} k_n * dX_p`.
//! The parameters travel as one packed tensor (`cat` of the flattened
//! `W1, b1, W2, b2, W3, b3`), whose backward splits the gradient again.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::attention::ActivationUnit;
use super::kernels::{col_sums, cpu_real, mm, slice, tensor, values, Real, SavedForward};
use crate::dispatch_real;

/// Whether the fused kernel can run on `k`'s device and dtype.
pub fn supported(k: &Tensor) -> bool {
    cpu_real(k)
}

/// Fused scores `[B, T]` (see the module docs); requires two hidden layers.
pub fn scores(unit: &ActivationUnit, q: &Tensor, k: &Tensor, lens: &[usize]) -> Result<Tensor> {
    let (_, _, e) = k.dims3()?;
    let l = &unit.ffn.layers;
    if l.len() != 3 {
        return unit.scores_reference(q, k, super::mode::Mode::EVAL);
    }
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
    let op = AttnScores {
        lens: lens.to_vec(),
        e,
        h1: l[0].out_dim(),
        h2: l[1].out_dim(),
        cache: SavedForward::default(),
    };
    q.contiguous()?.apply_op3(&k.contiguous()?, &p, op)
}

struct AttnScores {
    lens: Vec<usize>,
    e: usize,
    h1: usize,
    h2: usize,
    cache: SavedForward,
}

struct Cache<T> {
    /// (row b, flat position b*T+t) of each valid step.
    valid: Vec<(usize, usize)>,
    x: Vec<T>,
    s1: Vec<T>,
    s2: Vec<T>,
}

/// Offsets of the packed parameters.
struct Packed {
    w1: usize,
    b1: usize,
    w2: usize,
    b2: usize,
    w3: usize,
    b3: usize,
    len: usize,
}

impl AttnScores {
    fn packed(&self) -> Packed {
        let (e, h1, h2) = (self.e, self.h1, self.h2);
        let w1 = 0;
        let b1 = w1 + 4 * e * h1;
        let w2 = b1 + h1;
        let b2 = w2 + h1 * h2;
        let w3 = b2 + h2;
        let b3 = w3 + h2;
        Packed {
            w1,
            b1,
            w2,
            b2,
            w3,
            b3,
            len: b3 + 1,
        }
    }

    /// `A = W_q + W_d` `[E, h1]` and `Bm = [W_k - W_d; W_p]` `[2E, h1]`.
    fn split_w1<T: Real>(&self, p: &[T]) -> (Vec<T>, Vec<T>) {
        let (e, h1) = (self.e, self.h1);
        let w1 = &p[..4 * e * h1];
        let blk = |i: usize| &w1[i * e * h1..(i + 1) * e * h1];
        let (wq, wk, wd, wp) = (blk(0), blk(1), blk(2), blk(3));
        let a: Vec<T> = wq.iter().zip(wd).map(|(&x, &y)| x + y).collect();
        let mut bm: Vec<T> = wk.iter().zip(wd).map(|(&x, &y)| x - y).collect();
        bm.extend_from_slice(wp);
        (a, bm)
    }

    fn fwd<T: Real>(
        &self,
        q: &[T],
        k: &[T],
        p: &[T],
        b: usize,
        t: usize,
    ) -> Result<(Vec<T>, Cache<T>)> {
        let (e, h1, h2) = (self.e, self.h1, self.h2);
        let o = self.packed();
        if p.len() != o.len {
            candle_core::bail!("fused attention: packed params {} != {}", p.len(), o.len);
        }
        let (a, bm) = self.split_w1(p);
        let mut hq = mm(q, false, &a, false, b, e, h1)?;
        for row in hq.chunks_exact_mut(h1) {
            for (v, &bias) in row.iter_mut().zip(&p[o.b1..o.b1 + h1]) {
                *v += bias;
            }
        }
        let valid: Vec<(usize, usize)> = (0..b)
            .flat_map(|bi| (0..self.lens[bi].min(t)).map(move |s| (bi, bi * t + s)))
            .collect();
        let nv = valid.len();
        let mut scores = vec![T::zero_(); b * t];
        if nv == 0 {
            return Ok((
                scores,
                Cache {
                    valid,
                    x: vec![],
                    s1: vec![],
                    s2: vec![],
                },
            ));
        }
        let mut x = Vec::with_capacity(nv * 2 * e);
        for &(bi, pos) in &valid {
            let kr = &k[pos * e..(pos + 1) * e];
            let qr = &q[bi * e..(bi + 1) * e];
            x.extend_from_slice(kr);
            x.extend(kr.iter().zip(qr).map(|(&kv, &qv)| kv * qv));
        }
        let mut s1 = mm(&x, false, &bm, false, nv, 2 * e, h1)?;
        for (n, row) in s1.chunks_exact_mut(h1).enumerate() {
            let hb = &hq[valid[n].0 * h1..(valid[n].0 + 1) * h1];
            for (v, &h) in row.iter_mut().zip(hb) {
                *v += h;
            }
            T::sigmoid_in_place(row);
        }
        let mut s2 = mm(&s1, false, &p[o.w2..o.w2 + h1 * h2], false, nv, h1, h2)?;
        let b2 = &p[o.b2..o.b2 + h2];
        let w3 = &p[o.w3..o.w3 + h2];
        let b3 = p[o.b3];
        for (n, row) in s2.chunks_exact_mut(h2).enumerate() {
            // The sigmoid over the row (vectorized), then the dot product.
            for (v, &bb) in row.iter_mut().zip(b2) {
                *v += bb;
            }
            T::sigmoid_in_place(row);
            let mut s = b3;
            for (&v, &w) in row.iter().zip(w3) {
                s += v * w;
            }
            scores[valid[n].1] = s;
        }
        Ok((scores, Cache { valid, x, s1, s2 }))
    }

    #[allow(clippy::type_complexity)]
    fn bwd_t<T: Real>(
        &self,
        q: &Tensor,
        k: &Tensor,
        p: &Tensor,
        g: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (e, h1, h2) = (self.e, self.h1, self.h2);
        let (b, t, _) = k.dims3()?;
        let o = self.packed();
        let qv: Vec<T> = values(q)?;
        let kv: Vec<T> = values(k)?;
        let pv: Vec<T> = values(p)?;
        let gv: Vec<T> = values(g)?;
        let guard = self.cache.lock();
        let cache: &Cache<T> = SavedForward::get(&guard, "fused attention")?;
        let nv = cache.valid.len();
        let mut dp = vec![T::zero_(); o.len];
        let mut dq = vec![T::zero_(); b * e];
        let mut dk = vec![T::zero_(); b * t * e];
        if nv > 0 {
            let (a, bm) = self.split_w1(&pv);
            let w3 = &pv[o.w3..o.w3 + h2];
            // Layer 3 and sigmoid 2.
            // (Row loops over zipped slices: no bounds checks, so they
            // vectorize; indexed loops here were ~10% of a DIN step.)
            let mut dz2 = vec![T::zero_(); nv * h2];
            let mut db3 = T::zero_();
            let one = T::one_();
            {
                let dw3 = &mut dp[o.w3..o.w3 + h2];
                for ((dzr, s2), &(_, pos)) in dz2
                    .chunks_exact_mut(h2)
                    .zip(cache.s2.chunks_exact(h2))
                    .zip(&cache.valid)
                {
                    let gn = gv[pos];
                    db3 += gn;
                    for (((dz, dw), &s), &w) in dzr.iter_mut().zip(dw3.iter_mut()).zip(s2).zip(w3) {
                        *dw += gn * s;
                        *dz = gn * w * s * (one - s);
                    }
                }
            }
            dp[o.b3] = db3;
            for (d, s) in dp[o.b2..o.b2 + h2].iter_mut().zip(col_sums(&dz2, h2)) {
                *d = s;
            }
            // Layer 2.
            let dw2 = mm(&cache.s1, true, &dz2, false, h1, nv, h2)?;
            dp[o.w2..o.w2 + h1 * h2].copy_from_slice(&dw2);
            let mut dz1 = mm(&dz2, false, &pv[o.w2..o.w2 + h1 * h2], true, nv, h2, h1)?;
            let mut dh1 = vec![T::zero_(); b * h1];
            for ((row, s1), &(bi, _)) in dz1
                .chunks_exact_mut(h1)
                .zip(cache.s1.chunks_exact(h1))
                .zip(&cache.valid)
            {
                let dhr = &mut dh1[bi * h1..(bi + 1) * h1];
                for ((r, &s), dh) in row.iter_mut().zip(s1).zip(dhr.iter_mut()) {
                    *r = *r * s * (one - s);
                    *dh += *r;
                }
            }
            for (d, s) in dp[o.b1..o.b1 + h1].iter_mut().zip(col_sums(&dz1, h1)) {
                *d = s;
            }
            // Layer 1 (split form).
            let dbm = mm(&cache.x, true, &dz1, false, 2 * e, nv, h1)?;
            let da = mm(&qv, true, &dh1, false, e, b, h1)?;
            let eh = e * h1;
            for i in 0..eh {
                dp[o.w1 + i] = da[i]; // W_q
                dp[o.w1 + eh + i] = dbm[i]; // W_k
                dp[o.w1 + 2 * eh + i] = da[i] - dbm[i]; // W_d
                dp[o.w1 + 3 * eh + i] = dbm[eh + i]; // W_p
            }
            let dx = mm(&dz1, false, &bm, true, nv, h1, 2 * e)?;
            for (dxr, &(bi, pos)) in dx.chunks_exact(2 * e).zip(&cache.valid) {
                let (dxk, dxp) = dxr.split_at(e);
                let (qr, kr) = (&qv[bi * e..(bi + 1) * e], &kv[pos * e..(pos + 1) * e]);
                let dkr = &mut dk[pos * e..(pos + 1) * e];
                for (((dkv, &a), &p), &q) in dkr.iter_mut().zip(dxk).zip(dxp).zip(qr) {
                    *dkv = a + q * p;
                }
                let dqr = &mut dq[bi * e..(bi + 1) * e];
                for ((dqv, &p), &k) in dqr.iter_mut().zip(dxp).zip(kr) {
                    *dqv += k * p;
                }
            }
            let dqa = mm(&dh1, false, &a, true, b, h1, e)?;
            for (d, v) in dq.iter_mut().zip(dqa) {
                *d += v;
            }
        }
        Ok((
            tensor(dq, &[b, e])?,
            tensor(dk, &[b, t, e])?,
            tensor(dp, &[o.len])?,
        ))
    }
}

impl CustomOp3 for AttnScores {
    fn name(&self) -> &'static str {
        "din-attention-scores"
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
        let (b, t, _) = l2.shape().dims3()?;
        fn run<T: Real>(
            op: &AttnScores,
            s: [(&CpuStorage, &Layout); 3],
            b: usize,
            t: usize,
        ) -> Result<(CpuStorage, Shape)> {
            let (q, k, p) = (
                slice::<T>(s[0].0, s[0].1)?,
                slice::<T>(s[1].0, s[1].1)?,
                slice::<T>(s[2].0, s[2].1)?,
            );
            let (scores, cache) = op.fwd(q, k, p, b, t)?;
            op.cache.save(cache);
            Ok((T::to_cpu_storage_owned(scores), Shape::from((b, t))))
        }
        dispatch_real!(s1.dtype(), run(self, [(s1, l1), (s2, l2), (s3, l3)], b, t))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        p: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dp) = match q.dtype() {
            candle_core::DType::F32 => self.bwd_t::<f32>(q, k, p, grad)?,
            candle_core::DType::F64 => self.bwd_t::<f64>(q, k, p, grad)?,
            d => candle_core::bail!("fused attention: unsupported dtype {d:?}"),
        };
        Ok((Some(dq), Some(dk), Some(dp)))
    }
}
