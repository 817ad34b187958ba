//! Fused CPU kernel for the masked GRU recurrence and its attentional
//! variants (AUGRU, AGRU), with a hand-written backward through time.
//!
//! Input: the input projections `gx = x W + b` (`[B, T, 3H]`, computed with
//! ordinary candle ops outside), the recurrent weights `U` (`[H, 3H]`, gates
//! `[u | r | n]`) and, for the attentional kinds, `a` (`[B, T]`). Output: all
//! states `[B, T, H]`. Per valid step (`t < len_b`; other steps carry the state):
//! `gh = h_{t-1} U`, `u = sigmoid(gx_u + gh_u)`, `r = sigmoid(gx_r + gh_r)`,
//! `n = tanh(gx_n + r * gh_n)`, `h_t = h_{t-1} + z * (n - h_{t-1})` with
//! `z = u` (GRU), `z = a_t * u` (AUGRU) or `z = a_t` (AGRU).
//! Backward, with `dh` the running state gradient:
//! `dn = dh z`, `dz = dh (n - h_{t-1})`, `du = dz` / `a dz` / `0`,
//! `da_t = sum(dz u)` (AUGRU) / `sum(dz)` (AGRU),
//! `dgx_n = dn (1 - n^2)`, `dgh_n = dgx_n * r`, `dr = dgx_n * gh_n`,
//! `dgx_r = dgh_r = dr r (1 - r)`, `dgx_u = dgh_u = du u (1 - u)`,
//! `dh_{t-1} = dh (1 - z) + dgh U^T`, `dU = sum_t h_{t-1}^T dgh_t`.
//! Only rows still inside their history are computed at each step.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::kernels::{mm, slice, tensor, values, Real, SavedForward};
use crate::dispatch_real;

/// How the attention enters the state update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateKind {
    /// Plain GRU (`z = u`).
    Plain,
    /// AUGRU (`z = a u`).
    Augru,
    /// AGRU (`z = a`).
    Agru,
}

/// All states `[B, T, H]` of the masked recurrence over `gx` `[B, T, 3H]`.
pub fn gru_states(gx: &Tensor, w_hh: &Tensor, lens: &[usize]) -> Result<Tensor> {
    let op = GruSeq::new(GateKind::Plain, lens, w_hh.dim(0)?);
    gx.contiguous()?.apply_op2(&w_hh.contiguous()?, op)
}

/// All states `[B, T, H]` of the attention-gated recurrence (`kind` AUGRU or AGRU).
pub fn att_gru_states(
    kind: GateKind,
    gx: &Tensor,
    att: &Tensor,
    w_hh: &Tensor,
    lens: &[usize],
) -> Result<Tensor> {
    let op = GruSeq::new(kind, lens, w_hh.dim(0)?);
    gx.contiguous()?
        .apply_op3(&att.contiguous()?, &w_hh.contiguous()?, op)
}

/// `dst = a + b` element-wise (a loop that vectorizes).
fn sum_into<T: Real>(dst: &mut [T], a: &[T], b: &[T]) {
    for (v, (&x, &y)) in dst.iter_mut().zip(a.iter().zip(b)) {
        *v = x + y;
    }
}

struct GruSeq {
    kind: GateKind,
    lens: Vec<usize>,
    h: usize,
    cache: SavedForward,
}

/// Per valid step (in step-major order): gates and the previous state.
struct Cache<T> {
    /// (b, t) of each cached step, step-major.
    steps: Vec<(usize, usize)>,
    u: Vec<T>,
    r: Vec<T>,
    n: Vec<T>,
    ghn: Vec<T>,
    hprev: Vec<T>,
}

impl GruSeq {
    fn new(kind: GateKind, lens: &[usize], h: usize) -> Self {
        GruSeq {
            kind,
            lens: lens.to_vec(),
            h,
            cache: SavedForward::default(),
        }
    }

    fn fwd<T: Real>(
        &self,
        gx: &[T],
        att: Option<&[T]>,
        w: &[T],
        b: usize,
        t: usize,
    ) -> Result<(Vec<T>, Cache<T>)> {
        let h = self.h;
        let g3 = 3 * h;
        let mut states = vec![T::zero_(); b * t * h];
        let mut cur = vec![T::zero_(); b * h];
        let valid: usize = self.lens.iter().map(|&l| l.min(t)).sum();
        let mut c = Cache {
            steps: Vec::with_capacity(valid),
            u: vec![T::zero_(); valid * h],
            r: vec![T::zero_(); valid * h],
            n: vec![T::zero_(); valid * h],
            ghn: vec![T::zero_(); valid * h],
            hprev: vec![T::zero_(); valid * h],
        };
        let mut rows: Vec<usize> = Vec::with_capacity(b);
        let mut hp: Vec<T> = Vec::with_capacity(b * h);
        for s in 0..t {
            rows.clear();
            rows.extend((0..b).filter(|&bi| s < self.lens[bi]));
            if !rows.is_empty() {
                hp.clear();
                for &bi in &rows {
                    hp.extend_from_slice(&cur[bi * h..(bi + 1) * h]);
                }
                let gh = mm(&hp, false, w, false, rows.len(), h, g3)?;
                for (k, &bi) in rows.iter().enumerate() {
                    let gxr = &gx[(bi * t + s) * g3..(bi * t + s + 1) * g3];
                    let ghr = &gh[k * g3..(k + 1) * g3];
                    let prev = &hp[k * h..(k + 1) * h];
                    let o = c.steps.len() * h;
                    c.steps.push((bi, s));
                    // Element-wise over the row in separate zipped loops (no
                    // calls, pushes or index checks), so that they vectorize.
                    let (gx_u, gx_rn) = gxr.split_at(h);
                    let (gx_r, gx_n) = gx_rn.split_at(h);
                    let (gh_u, gh_rn) = ghr.split_at(h);
                    let (gh_r, gh_n) = gh_rn.split_at(h);
                    let u = &mut c.u[o..o + h];
                    sum_into(u, gx_u, gh_u);
                    T::sigmoid_in_place(u);
                    let r = &mut c.r[o..o + h];
                    sum_into(r, gx_r, gh_r);
                    T::sigmoid_in_place(r);
                    c.ghn[o..o + h].copy_from_slice(gh_n);
                    let n = &mut c.n[o..o + h];
                    for (v, (&x, (&rj, &y))) in
                        n.iter_mut().zip(gx_n.iter().zip(r.iter().zip(gh_n)))
                    {
                        *v = x + rj * y;
                    }
                    T::tanh_in_place(n);
                    c.hprev[o..o + h].copy_from_slice(prev);
                    let cur_row = &mut cur[bi * h..(bi + 1) * h];
                    let rows_iter = cur_row
                        .iter_mut()
                        .zip(prev.iter().zip(n.iter().zip(u.iter())));
                    match (self.kind, att.map(|a| a[bi * t + s])) {
                        (GateKind::Augru, Some(a)) => {
                            for (v, (&p, (&nj, &uj))) in rows_iter {
                                *v = p + a * uj * (nj - p);
                            }
                        }
                        (GateKind::Agru, Some(a)) => {
                            for (v, (&p, (&nj, _))) in rows_iter {
                                *v = p + a * (nj - p);
                            }
                        }
                        _ => {
                            for (v, (&p, (&nj, &uj))) in rows_iter {
                                *v = p + uj * (nj - p);
                            }
                        }
                    }
                }
            }
            for bi in 0..b {
                states[(bi * t + s) * h..(bi * t + s + 1) * h]
                    .copy_from_slice(&cur[bi * h..(bi + 1) * h]);
            }
        }
        Ok((states, c))
    }

    /// Returns `(dgx [B,T,3H], datt [B,T], dU [H,3H])`.
    fn bwd_t<T: Real>(
        &self,
        att: Option<&Tensor>,
        w: &Tensor,
        grad: &Tensor,
        b: usize,
        t: usize,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let h = self.h;
        let g3 = 3 * h;
        let wv: Vec<T> = values(w)?;
        let av: Option<Vec<T>> = att.map(values).transpose()?;
        let gv: Vec<T> = values(grad)?;
        let guard = self.cache.lock();
        let c: &Cache<T> = SavedForward::get(&guard, "fused gru")?;
        let mut dgx = vec![T::zero_(); b * t * g3];
        let mut datt = vec![T::zero_(); b * t];
        let mut dgh_all = vec![T::zero_(); c.steps.len() * g3];
        let mut dh = vec![T::zero_(); b * h];
        // Cached steps are step-major; walk them backwards grouped by step.
        let mut end = c.steps.len();
        // Per-element loops run over equal-length slices (no bounds checks,
        // so they vectorize); the attention gradient is reduced after.
        let mut dzs = vec![T::zero_(); h];
        for s in (0..t).rev() {
            for (dhr, gr) in dh.chunks_exact_mut(h).zip(gv.chunks_exact(t * h)) {
                for (d, &g) in dhr.iter_mut().zip(&gr[s * h..(s + 1) * h]) {
                    *d += g;
                }
            }
            let mut start = end;
            while start > 0 && c.steps[start - 1].1 == s {
                start -= 1;
            }
            if start == end {
                continue;
            }
            for idx in start..end {
                let bi = c.steps[idx].0;
                let a = av.as_ref().map(|a| a[bi * t + s]);
                // z = coef_u * u + coef_1 (AUGRU: a u; AGRU: a; GRU: u);
                // du = coef_u * dz (AGRU: the gate u is unused).
                let (coef_u, coef_1) = match (self.kind, a) {
                    (GateKind::Augru, Some(a)) => (a, T::zero_()),
                    (GateKind::Agru, Some(a)) => (T::zero_(), a),
                    _ => (T::one_(), T::zero_()),
                };
                let o = idx * h..(idx + 1) * h;
                let (u, r, n) = (&c.u[o.clone()], &c.r[o.clone()], &c.n[o.clone()]);
                let (ghn, prev) = (&c.ghn[o.clone()], &c.hprev[o]);
                let dhr = &mut dh[bi * h..(bi + 1) * h];
                let dgxr = &mut dgx[(bi * t + s) * g3..(bi * t + s + 1) * g3];
                let (gx_u, rest) = dgxr.split_at_mut(h);
                let (gx_r, gx_n) = rest.split_at_mut(h);
                let dghr = &mut dgh_all[idx * g3..(idx + 1) * g3];
                let (gh_u, rest) = dghr.split_at_mut(h);
                let (gh_r, gh_n) = rest.split_at_mut(h);
                let one = T::one_();
                for j in 0..h {
                    let (u, r, n) = (u[j], r[j], n[j]);
                    let z = coef_u * u + coef_1;
                    let d = dhr[j];
                    let dn = d * z;
                    let dz = d * (n - prev[j]);
                    dzs[j] = dz;
                    let du = coef_u * dz;
                    let dzn = dn * (one - n * n);
                    let dr = dzn * ghn[j];
                    let dzr = dr * r * (one - r);
                    let dzu = du * u * (one - u);
                    gx_u[j] = dzu;
                    gx_r[j] = dzr;
                    gx_n[j] = dzn;
                    gh_u[j] = dzu;
                    gh_r[j] = dzr;
                    gh_n[j] = dzn * r;
                    dhr[j] = d * (one - z);
                }
                datt[bi * t + s] = match (self.kind, a) {
                    (GateKind::Augru, Some(_)) => dzs
                        .iter()
                        .zip(u)
                        .fold(T::zero_(), |acc, (&dz, &u)| acc + dz * u),
                    (GateKind::Agru, Some(_)) => dzs.iter().fold(T::zero_(), |acc, &dz| acc + dz),
                    _ => T::zero_(),
                };
            }
            // dh_{t-1} += dgh U^T for the active rows.
            let na = end - start;
            let back = mm(&dgh_all[start * g3..end * g3], false, &wv, true, na, g3, h)?;
            for (br, idx) in back.chunks_exact(h).zip(start..end) {
                let bi = c.steps[idx].0;
                for (d, &v) in dh[bi * h..(bi + 1) * h].iter_mut().zip(br) {
                    *d += v;
                }
            }
            end = start;
        }
        let nsteps = c.steps.len();
        let dw = if nsteps > 0 {
            mm(&c.hprev, true, &dgh_all, false, h, nsteps, g3)?
        } else {
            vec![T::zero_(); h * g3]
        };
        Ok((
            tensor(dgx, &[b, t, g3])?,
            tensor(datt, &[b, t])?,
            tensor(dw, &[h, g3])?,
        ))
    }

    fn run<T: Real>(
        &self,
        gx: (&CpuStorage, &Layout),
        att: Option<(&CpuStorage, &Layout)>,
        w: (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let (b, t, _) = gx.1.shape().dims3()?;
        let gxs = slice::<T>(gx.0, gx.1)?;
        let ws = slice::<T>(w.0, w.1)?;
        let a = match att {
            Some((s, l)) => Some(slice::<T>(s, l)?),
            None => None,
        };
        let (states, cache) = self.fwd(gxs, a, ws, b, t)?;
        self.cache.save(cache);
        Ok((T::to_cpu_storage_owned(states), Shape::from((b, t, self.h))))
    }
}

fn run_plain<T: Real>(
    op: &GruSeq,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> Result<(CpuStorage, Shape)> {
    op.run::<T>((s1, l1), None, (s2, l2))
}

#[allow(clippy::too_many_arguments)]
fn run_att<T: Real>(
    op: &GruSeq,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    s3: &CpuStorage,
    l3: &Layout,
) -> Result<(CpuStorage, Shape)> {
    op.run::<T>((s1, l1), Some((s2, l2)), (s3, l3))
}

impl CustomOp2 for GruSeq {
    fn name(&self) -> &'static str {
        "masked-gru"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch_real!(s1.dtype(), run_plain(self, s1, l1, s2, l2))
    }

    fn bwd(
        &self,
        gx: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (b, t, _) = gx.dims3()?;
        let (dgx, _, dw) = match gx.dtype() {
            candle_core::DType::F32 => self.bwd_t::<f32>(None, w, grad, b, t)?,
            candle_core::DType::F64 => self.bwd_t::<f64>(None, w, grad, b, t)?,
            d => candle_core::bail!("fused gru: unsupported dtype {d:?}"),
        };
        Ok((Some(dgx), Some(dw)))
    }
}

impl CustomOp3 for GruSeq {
    fn name(&self) -> &'static str {
        "masked-attention-gru"
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
        dispatch_real!(s1.dtype(), run_att(self, s1, l1, s2, l2, s3, l3))
    }

    fn bwd(
        &self,
        gx: &Tensor,
        att: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, t, _) = gx.dims3()?;
        let (dgx, da, dw) = match gx.dtype() {
            candle_core::DType::F32 => self.bwd_t::<f32>(Some(att), w, grad, b, t)?,
            candle_core::DType::F64 => self.bwd_t::<f64>(Some(att), w, grad, b, t)?,
            d => candle_core::bail!("fused gru: unsupported dtype {d:?}"),
        };
        Ok((Some(dgx), Some(da), Some(dw)))
    }
}
