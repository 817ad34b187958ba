//! f32 matrix products for the fused kernels' shapes, built for AVX2 + FMA:
//! many rows against a small matrix (`C = A op(B)`, `A` `[m, k]` with `m` in
//! the thousands and `k`, `n` <= a few hundred: the forward products and the
//! input gradients), and the weight gradients (`C = A^T B`, `A` `[k, m]`,
//! `B` `[k, n]`, `k` in the thousands, `C` small).
//!
//! One register tile serves both: `R <= 6` rows by `V <= 2` vectors (16
//! columns) of `C`, `C[i, j..j + 8] = sum_p a(i, p) * B[p, j..j + 8]`, from
//! broadcasts of `a(i, p)` (`A[i, p]`, or `A[p, i]` for `A^T`) and vector
//! loads of `B`'s row `p`; 12 accumulators, 2 `B` vectors and a broadcast fit
//! AVX2's 16 registers without a spill. Each element is one FMA chain in `p`
//! order from zero (for `A op(B)` this is the order `gemm` 0.19 uses, so the
//! results are bit for bit the same on these shapes; test
//! `skinny_products_match_a_triple_loop_and_gemm`).
//! - `A op(B)`: `op(B)` is first copied into `Bp` `[k, np]`, `np` = `n`
//!   rounded up to 8 lanes with zero columns (so `B^T` and `B` share the
//!   kernel and every load is a whole vector); `A` is not packed. Rows go in
//!   chunks of [`ROW_CHUNK`] whose `A` rows stay in L2 while each 16-column
//!   block of `Bp` (L1-resident) passes over them.
//! - `A^T B`: neither operand is copied; `p` goes in chunks of [`K_CHUNK`]
//!   (their rows of `A` and `B` stay in L2), each chunk's tile is added into
//!   `C` (stored by the first chunk), and a partial last vector of `B` is
//!   read with a masked load.
//!
//! Why: `gemm` packs its operands on every call and reached about 60 GFLOP/s
//! on these shapes on a core whose FMA peak is ~140; this kernel 108-121
//! on `A op(B)` and 1.5-1.6x gemm on `A^T B` (BENCHMARKS.md, "A kernel for
//! skinny products").

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::{
    __m256, __m256i, _mm256_add_ps, _mm256_broadcast_ss, _mm256_fmadd_ps, _mm256_loadu_ps,
    _mm256_loadu_si256, _mm256_maskload_ps, _mm256_maskstore_ps, _mm256_setzero_ps,
    _mm256_storeu_ps,
};

/// f32 lanes in one AVX2 vector.
const LANES: usize = 8;
/// Rows of `C` per chunk in `A op(B)`: 256 rows of `k = 100` are 100 KiB of `A`.
const ROW_CHUNK: usize = 256;
/// Inner-dimension rows per chunk in `A^T B`: 256 rows of `A` and `B` with
/// `m = n = 100` are 200 KiB.
const K_CHUNK: usize = 256;
/// Rows and vectors of the full register tile.
const TILE_ROWS: usize = 6;
const TILE_VECS: usize = 2;

/// `C = op(A) op(B)` `[m, n]` row-major for `op(A)` `[m, k]` and `op(B)`
/// `[k, n]` (`a` stored `[k, m]` when `ta`, `b` `[n, k]` when `tb`), or None
/// when this kernel does not take the case (no AVX2 + FMA, `A^T B^T`, a
/// size that does not match, a zero dimension): the caller
/// ([`super::kernels::mm`]) then uses `gemm`.
pub fn mm_f32(
    a: &[f32],
    ta: bool,
    b: &[f32],
    tb: bool,
    m: usize,
    k: usize,
    n: usize,
) -> Option<Vec<f32>> {
    let fits = a.len() == m * k && b.len() == k * n && m > 0 && k > 0 && n > 0;
    #[cfg(target_arch = "x86_64")]
    if fits && !(ta && tb) && super::kernels::avx2_fma() {
        let mut c: Vec<f32> = Vec::with_capacity(m * n);
        if ta {
            // SAFETY: AVX2 + FMA (checked); `a` is [k, m], `b` [k, n] and
            // `c` has room for [m, n]. The first k-chunk stores every
            // element of C (all row tiles, all column blocks, the partial
            // last vector masked), so all m * n are initialised before
            // `set_len`; later chunks add into them.
            unsafe {
                run_at_b(a, b, c.as_mut_ptr(), m, k, n);
                c.set_len(m * n);
            }
        } else {
            let np = n.div_ceil(LANES) * LANES;
            let mut bp = vec![0f32; k * np];
            for (p, row) in bp.chunks_exact_mut(np).enumerate() {
                for (j, x) in row[..n].iter_mut().enumerate() {
                    *x = if tb { b[j * k + p] } else { b[p * n + j] };
                }
            }
            // SAFETY: AVX2 + FMA (checked); `a` is [m, k], `bp` [k, np] and
            // `c` has room for [m, n]; every (row, column) is stored once
            // (rows in chunks and tiles, columns in blocks, the partial
            // last vector masked), so all m * n are initialised.
            unsafe {
                run_a_b(a, &bp, c.as_mut_ptr(), m, k, n, np);
                c.set_len(m * n);
            }
        }
        return Some(c);
    }
    let _ = (a, ta, b, tb, m, k, n, fits);
    None
}

/// Where a tile reads `A`, `B` and writes `C` (raw pointers and strides).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Tile {
    /// `a(row 0, p = 0)`.
    a: *const f32,
    /// Step between the tile's rows in `A`.
    a_row: usize,
    /// Step between consecutive `p` in `A`.
    a_p: usize,
    /// `B[p = 0, column 0]`.
    b: *const f32,
    /// Step between consecutive `p` in `B`.
    ldb: usize,
    /// Length of the sum.
    k: usize,
    /// `C[row 0, column 0]`.
    c: *mut f32,
    /// Row stride of `C`.
    ldc: usize,
    /// Columns of `C` this tile owns (`<= 8 V`).
    cols: usize,
    /// Add into `C` instead of storing.
    add: bool,
}

/// `A op(B)`: row chunks, 16-column blocks of `Bp`, 6-row tiles (and the
/// 1..5-row, 1-vector remainders).
///
/// # Safety
/// AVX2 + FMA; `a.len() == m * k`, `bp.len() == k * np` with `np` a
/// multiple of 8 and `>= n`, `c` writable for `m * n` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_a_b(a: &[f32], bp: &[f32], c: *mut f32, m: usize, k: usize, n: usize, np: usize) {
    let mut i0 = 0;
    while i0 < m {
        let i1 = (i0 + ROW_CHUNK).min(m);
        let mut j = 0;
        while j < n {
            let cols = (n - j).min(TILE_VECS * LANES);
            let mut i = i0;
            while i < i1 {
                let rows = (i1 - i).min(TILE_ROWS);
                let t = Tile {
                    a: a.as_ptr().wrapping_add(i * k),
                    a_row: k,
                    a_p: 1,
                    b: bp.as_ptr().wrapping_add(j),
                    ldb: np,
                    k,
                    c: c.wrapping_add(i * n + j),
                    ldc: n,
                    cols,
                    add: false,
                };
                // SAFETY: rows i..i+rows < m of `a` and `c`; `Bp` is padded,
                // so the tile's whole vectors j..j+8v <= np are readable.
                unsafe { dispatch::<false>(t, rows) };
                i += rows;
            }
            j += cols;
        }
        i0 = i1;
    }
}

/// `A^T B`: `p` chunks, 16-column blocks of `B`, 6-row tiles of `C`.
///
/// # Safety
/// AVX2 + FMA; `a.len() == k * m`, `b.len() == k * n`, `c` writable for
/// `m * n` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_at_b(a: &[f32], b: &[f32], c: *mut f32, m: usize, k: usize, n: usize) {
    let mut p0 = 0;
    while p0 < k {
        let kc = (k - p0).min(K_CHUNK);
        let mut j = 0;
        while j < n {
            let cols = (n - j).min(TILE_VECS * LANES);
            let mut i = 0;
            while i < m {
                let rows = (m - i).min(TILE_ROWS);
                let t = Tile {
                    a: a.as_ptr().wrapping_add(p0 * m + i),
                    a_row: 1,
                    a_p: m,
                    b: b.as_ptr().wrapping_add(p0 * n + j),
                    ldb: n,
                    k: kc,
                    c: c.wrapping_add(i * n + j),
                    ldc: n,
                    cols,
                    add: p0 > 0,
                };
                // SAFETY: rows p0..p0+kc < k of `a` and `b`, columns
                // i..i+rows < m of `a`; the tile reads columns j..j+cols <= n
                // of `b` (a partial last vector masked) and writes rows
                // i..i+rows, columns j..j+cols of `c`.
                unsafe {
                    if cols.is_multiple_of(LANES) {
                        dispatch::<false>(t, rows)
                    } else {
                        dispatch::<true>(t, rows)
                    }
                };
                i += rows;
            }
            j += cols;
        }
        p0 += kc;
    }
}

/// Runs the tile of `rows` (1..=6) rows and `ceil(cols / 8)` vectors.
///
/// # Safety
/// As [`tile`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dispatch<const MASKED: bool>(t: Tile, rows: usize) {
    let two = t.cols > LANES;
    // SAFETY: the caller's contract, with R = rows and V = 1 or 2.
    unsafe {
        match (rows, two) {
            (6, true) => tile::<6, 2, MASKED>(t),
            (6, false) => tile::<6, 1, MASKED>(t),
            (5, true) => tile::<5, 2, MASKED>(t),
            (5, false) => tile::<5, 1, MASKED>(t),
            (4, true) => tile::<4, 2, MASKED>(t),
            (4, false) => tile::<4, 1, MASKED>(t),
            (3, true) => tile::<3, 2, MASKED>(t),
            (3, false) => tile::<3, 1, MASKED>(t),
            (2, true) => tile::<2, 2, MASKED>(t),
            (2, false) => tile::<2, 1, MASKED>(t),
            (_, true) => tile::<1, 2, MASKED>(t),
            (_, false) => tile::<1, 1, MASKED>(t),
        }
    }
}

/// One `R x 8V` tile: `acc[r][x] = sum_{p < k} a(r, p) * B[p, 8x..8x + 8]`,
/// then stored into (or added to) `C`'s first `cols` columns. With
/// `MASKED`, `B`'s last vector is read with a mask of `cols - 8 (V - 1)`
/// lanes (only those are readable); else all `8V` lanes are.
///
/// # Safety
/// AVX2 + FMA; `a(r, p) = *t.a.add(r * t.a_row + p * t.a_p)` readable for
/// `r < R`, `p < k`; `B` rows `t.b.add(p * t.ldb)` readable for the lanes
/// said above; `C` rows `t.c.add(r * t.ldc)` writable for `cols` values
/// (and readable when `t.add`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile<const R: usize, const V: usize, const MASKED: bool>(t: Tile) {
    // Pointer bumps in wrapping arithmetic: no index arithmetic or checks
    // in the inner loop.
    let last = mask(t.cols - (V - 1) * LANES);
    let mut acc: [[__m256; V]; R] = [[_mm256_setzero_ps(); V]; R];
    let mut ar: [*const f32; R] = [t.a; R];
    for (r, ar) in ar.iter_mut().enumerate() {
        *ar = t.a.wrapping_add(r * t.a_row);
    }
    let mut bp = t.b;
    for _ in 0..t.k {
        let mut bv: [__m256; V] = [_mm256_setzero_ps(); V];
        for (x, bv) in bv.iter_mut().enumerate() {
            let src = bp.wrapping_add(x * LANES);
            // SAFETY: the lanes read are readable (the contract above).
            *bv = unsafe {
                if MASKED && x == V - 1 {
                    _mm256_maskload_ps(src, last)
                } else {
                    _mm256_loadu_ps(src)
                }
            };
        }
        for (acc, ar) in acc.iter_mut().zip(ar.iter_mut()) {
            // SAFETY: a(r, p) is readable (the contract above).
            let av = unsafe { _mm256_broadcast_ss(&**ar) };
            *ar = ar.wrapping_add(t.a_p);
            for (acc, bv) in acc.iter_mut().zip(&bv) {
                *acc = _mm256_fmadd_ps(av, *bv, *acc);
            }
        }
        bp = bp.wrapping_add(t.ldb);
    }
    for (r, acc) in acc.iter().enumerate() {
        for (x, acc) in acc.iter().enumerate() {
            let col = x * LANES;
            let dst = t.c.wrapping_add(r * t.ldc + col);
            let whole = col + LANES <= t.cols;
            // SAFETY: C's row r is writable (and readable when adding) for
            // `cols` values; a partial vector is read and written masked.
            unsafe {
                let mut v = *acc;
                if t.add {
                    let old = if whole {
                        _mm256_loadu_ps(dst)
                    } else {
                        _mm256_maskload_ps(dst, last)
                    };
                    v = _mm256_add_ps(old, v);
                }
                if whole {
                    _mm256_storeu_ps(dst, v);
                } else {
                    _mm256_maskstore_ps(dst, last, v);
                }
            }
        }
    }
}

/// A mask of the first `lanes` lanes (1..=8).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
fn mask(lanes: usize) -> __m256i {
    const M: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];
    let from = LANES - lanes.clamp(1, LANES);
    // SAFETY: `from` is in 0..=7, so the 8 values read lie inside M.
    unsafe { _mm256_loadu_si256(M[from..from + LANES].as_ptr().cast()) }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::mm_f32;
    use crate::layer::kernels::mm_gemm;

    /// Deterministic values in [-1, 1) with no structure a kernel could
    /// exploit by accident.
    fn values(len: usize, salt: u64) -> Vec<f32> {
        let mut rng = ember_proto::rng::SplitMix64::new(salt);
        (0..len)
            .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
            .collect()
    }

    /// `op(A) op(B)` by a triple loop in f64.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        a: &[f32],
        ta: bool,
        b: &[f32],
        tb: bool,
        m: usize,
        k: usize,
        n: usize,
    ) -> Vec<f64> {
        let at = |i: usize, p: usize| f64::from(if ta { a[p * m + i] } else { a[i * k + p] });
        let bt = |p: usize, j: usize| f64::from(if tb { b[j * k + p] } else { b[p * n + j] });
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| at(i, p) * bt(p, j)).sum();
            }
        }
        c
    }

    /// Every row remainder of the 6-row tile, every column remainder of the
    /// 16-column block (a partial last vector, one vector, two), several
    /// `K_CHUNK`s of `A^T B` (k = 600: chunks of 256, 256, 88), against an
    /// f64 triple loop to f32 accuracy; and for `A op(B)` (one FMA chain per
    /// element in `p` order, as gemm) bit for bit equal to gemm on the
    /// DIEN aux net's and GRU's shapes. `A^T B^T` is not taken (None).
    #[test]
    fn skinny_products_match_a_triple_loop_and_gemm() {
        if !super::super::kernels::avx2_fma() {
            eprintln!("SKIP skinny_products_match_a_triple_loop_and_gemm: no AVX2 + FMA here");
            return;
        }
        let mut shapes = vec![(600, 7, 5), (13, 600, 17), (7, 36, 100)];
        for m in 1..=13 {
            for n in [1, 3, 8, 9, 16, 17, 23, 33] {
                shapes.push((m, 5, n));
            }
        }
        for (s, &(m, k, n)) in shapes.iter().enumerate() {
            for (ta, tb) in [(false, false), (false, true), (true, false)] {
                let a = values(m * k, 2 * s as u64);
                let b = values(k * n, 2 * s as u64 + 1);
                let got = mm_f32(&a, ta, &b, tb, m, k, n).expect("taken");
                let want = reference(&a, ta, &b, tb, m, k, n);
                for (idx, (g, w)) in got.iter().zip(&want).enumerate() {
                    let tol = 1e-5 * (k as f64).sqrt() * (1.0 + w.abs());
                    assert!(
                        (f64::from(*g) - w).abs() <= tol,
                        "[{m}, {k}] x [{k}, {n}] ta {ta} tb {tb}: element {idx} is {g}, want {w}"
                    );
                }
            }
        }
        assert!(mm_f32(&[0.0; 6], true, &[0.0; 6], true, 2, 3, 2).is_none());
        assert!(mm_f32(&[0.0; 6], false, &[0.0; 5], false, 2, 3, 2).is_none());
        for &(m, k, n, tb) in &[
            (1000, 36, 100, false),
            (1000, 100, 50, false),
            (1000, 50, 100, true),
            (1000, 100, 36, true),
            (700, 36, 108, false),
        ] {
            let a = values(m * k, 7);
            let b = values(k * n, 8);
            let got = mm_f32(&a, false, &b, tb, m, k, n).expect("taken");
            let want = mm_gemm(&a, false, &b, tb, m, k, n).expect("gemm");
            let same = got
                .iter()
                .zip(&want)
                .all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(
                same,
                "[{m}, {k}] x [{k}, {n}] tb {tb}: not bit for bit gemm's result"
            );
        }
    }
}
