//! Products with a side only `r` wide: LoRA's rank-`r` factors applied and differentiated.
//!
//! ```text
//! rank_product   C[n, r]  =  alpha · X[n, k] · W[k, r]     u = s · x A^T (W = A^T), du = s · dy B (W = B)
//! rank_outer     C[r, m] (=|+=) U[n, r]^T · X[n, m]         dA += du^T x, dB^T = u^T dy
//! ```
//! The blocked GEMM packs its wide operand (here `X`, thousands of rows) into panels before multiplying;
//! with only `r` values on the other side each packed value then feeds `r` multiply-adds, so the packing
//! costs as much as the product. These read `X` in place, once, and keep the `r`-wide side in registers:
//! 16 lanes of `r` (or of the strip of `m`) by 8 rows of `X` (by 16 of `r`) of accumulators.
//!
//! Numerics: each output is one chain of fused multiply-adds in the order of the sum's index, from zero
//! (or from `C`), then scaled by `alpha`. Tasks split the rows of `X` ([`rank_product`]) or the columns of
//! `C` ([`rank_outer`]), never a sum, so the bits do not depend on the thread count; the AVX-512 kernels
//! and the portable loops give the same bits (both fuse each multiply-add).

use std::ops::Range;

use rayon::prelude::*;

use super::matmul::{Accumulate, Cols};

/// Lanes of one accumulator row: the `r` values of [`rank_product`], the strip of `m` of [`rank_outer`].
const L: usize = 16;
/// Rows of `X` per register block of [`rank_product`].
const ROWS: usize = 8;
/// Rows of `X` per parallel task of [`rank_product`].
const TASK_ROWS: usize = 64;
/// Strips of `L` columns of `C` per parallel task of [`rank_outer`].
const STRIPS: usize = 4;
/// Rows of `X` per block of [`rank_outer`]: 32 lines of each strip, fetched once for all its rows of `r`.
const BLOCK: usize = 32;

/// `C[n, r] = alpha · X[n, k] · W[k, r]`, `X` the `k` columns of `x` from `x.col`, `W` row-major.
pub fn rank_product(c: &mut [f32], x: Cols, w: &[f32], n: usize, k: usize, r: usize, alpha: f32) {
    assert_eq!(c.len(), n * r, "rank_product: C is not [n, r]");
    assert_eq!(w.len(), k * r, "rank_product: W is not [k, r]");
    x.assert_holds(n, k, "rank_product: X");
    if n == 0 || r == 0 {
        return;
    }
    // W with its rows padded to whole lanes (zeros), when `r` is not a multiple of them.
    let rp = r.div_ceil(L) * L;
    let owned: Vec<f32>;
    let w = if rp == r {
        w
    } else {
        owned = padded(w, r);
        &owned[..]
    };
    let Cols { data, ld, col } = x;
    c.par_chunks_mut(TASK_ROWS * r).enumerate().for_each(|(t, c)| {
        let x = &data[t * TASK_ROWS * ld + col..];
        let rows = c.len() / r;
        assert!((rows - 1) * ld + k <= x.len() && w.len() == k * rp);
        #[cfg(target_arch = "x86_64")]
        if super::act::has_avx512() {
            // SAFETY: the CPU has AVX-512F; X's rows, W and C are in bounds (asserted above).
            return unsafe { avx512::product_rows(c, x, ld, w, k, r, alpha) };
        }
        portable::product_rows(c, x, ld, w, k, r, alpha);
    });
}

/// `W [k, r]` with each row padded with zeros to whole lanes.
fn padded(w: &[f32], r: usize) -> Vec<f32> {
    let rp = r.div_ceil(L) * L;
    w.chunks_exact(r).flat_map(|row| row.iter().copied().chain(std::iter::repeat_n(0.0, rp - r))).collect()
}

/// `C[r, m] (= or +=, per acc) U[n, r]^T · X[n, m]`, `X` the `m` columns of `x` from `x.col`.
pub fn rank_outer(c: &mut [f32], u: &[f32], x: Cols, n: usize, r: usize, m: usize, acc: Accumulate) {
    assert_eq!(c.len(), r * m, "rank_outer: C is not [r, m]");
    assert_eq!(u.len(), n * r, "rank_outer: U is not [n, r]");
    x.assert_holds(n, m, "rank_outer: X");
    if r == 0 || m == 0 {
        return;
    }
    // Each task sums a group of strips of L columns of C over all n rows, into `[strip][r][L]`; the
    // groups are written back in order.
    let add = acc == Accumulate::Add;
    let group = STRIPS * L;
    let groups: Vec<Vec<f32>> = (0..m.div_ceil(group))
        .into_par_iter()
        .map(|gi| {
            let (j0, width) = (gi * group, (m - gi * group).min(group));
            let mut strips = vec![0.0f32; width.div_ceil(L) * r * L];
            if add {
                for (at, cs) in strip_rows(j0, width, r, m) {
                    strips[at..at + cs.len()].copy_from_slice(&c[cs]);
                }
            }
            let group = Group { u, x: x.data, ld: x.ld, col: x.col + j0, width, n, r };
            #[cfg(target_arch = "x86_64")]
            if super::act::has_avx512() {
                // SAFETY: the CPU has AVX-512F; X's rows and U are in bounds (asserted above), `strips`
                // holds `r * L` floats per strip of `width`.
                unsafe { avx512::outer_strips(&mut strips, &group) };
                return strips;
            }
            portable::outer_strips(&mut strips, &group);
            strips
        })
        .collect();
    for (gi, strips) in groups.iter().enumerate() {
        let (j0, width) = (gi * group, (m - gi * group).min(group));
        for (at, cs) in strip_rows(j0, width, r, m) {
            let len = cs.len();
            c[cs].copy_from_slice(&strips[at..at + len]);
        }
    }
}

/// A task's share of [`rank_outer`]: its `width` columns of `X` from `col` (`ld` apart), all `n` rows, and
/// `U` (`[n, r]`).
struct Group<'a> {
    u: &'a [f32],
    x: &'a [f32],
    ld: usize,
    col: usize,
    width: usize,
    n: usize,
    r: usize,
}

/// Where the rows of a group's strips (`[strip][r][L]`, columns `j0..j0 + width` of `C [r, m]`) lie: for
/// strip `s` and row `q`, the offset of the row in the strips and the range of `C` it holds.
fn strip_rows(j0: usize, width: usize, r: usize, m: usize) -> impl Iterator<Item = (usize, Range<usize>)> {
    (0..width.div_ceil(L)).flat_map(move |s| {
        let (js, w) = (j0 + s * L, (width - s * L).min(L));
        (0..r).map(move |q| ((s * r + q) * L, q * m + js..q * m + js + w))
    })
}

/// The kernels in plain Rust, for CPUs without AVX-512: the same fused multiply-adds in the same order.
mod portable {
    use super::{Group, L};

    /// As [`super::avx512::product_rows`].
    pub(super) fn product_rows(c: &mut [f32], x: &[f32], ld: usize, w: &[f32], k: usize, r: usize, alpha: f32) {
        let rp = r.div_ceil(L) * L;
        for (i, c) in c.chunks_exact_mut(r).enumerate() {
            let x = &x[i * ld..i * ld + k];
            for (q, c) in c.iter_mut().enumerate() {
                *c = alpha * x.iter().zip(w[q..].iter().step_by(rp)).fold(0.0f32, |a, (&x, &w)| x.mul_add(w, a));
            }
        }
    }

    /// As [`super::avx512::outer_strips`].
    pub(super) fn outer_strips(strips: &mut [f32], g: &Group) {
        let Group { u, x, ld, col, width, n, r } = *g;
        for (s, strip) in strips.chunks_exact_mut(r * L).enumerate() {
            let w = (width - s * L).min(L);
            for (q, row) in strip.chunks_exact_mut(L).enumerate() {
                for (l, v) in row[..w].iter_mut().enumerate() {
                    *v = (0..n).fold(*v, |a, t| u[t * r + q].mul_add(x[t * ld + col + s * L + l], a));
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use core::arch::x86_64::*;

    use super::{Group, BLOCK, L, ROWS};

    /// [`super::rank_product`] for the rows of `c` (`[rows, r]`), row `i` of X at `x[i * ld..][..k]`, `w`
    /// `[k, rp]` (rows padded to whole lanes).
    ///
    /// # Safety
    /// The CPU has AVX-512F; `x` holds `(rows - 1) * ld + k` floats, `w` `k * rp`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn product_rows(c: &mut [f32], x: &[f32], ld: usize, w: &[f32], k: usize, r: usize, alpha: f32) {
        let (rows, rp) = (c.len() / r, r.div_ceil(L) * L);
        let mut i = 0;
        while i < rows {
            if rows - i >= ROWS {
                product_block::<ROWS>(c, x, ld, w, k, r, rp, alpha, i);
                i += ROWS;
            } else {
                product_block::<1>(c, x, ld, w, k, r, rp, alpha, i);
                i += 1;
            }
        }
    }

    /// Rows `i..i + B` of [`product_rows`], one lane group of `r` at a time: `B` accumulators, and per
    /// step of the sum one load of `W`'s row and `B` broadcasts of `X`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn product_block<const B: usize>(
        c: &mut [f32],
        x: &[f32],
        ld: usize,
        w: &[f32],
        k: usize,
        r: usize,
        rp: usize,
        alpha: f32,
        i: usize,
    ) {
        let (xp, wp, cp) = (x.as_ptr().add(i * ld), w.as_ptr(), c.as_mut_ptr().add(i * r));
        for g in 0..rp / L {
            let mut acc = [_mm512_setzero_ps(); B];
            for j in 0..k {
                let wv = _mm512_loadu_ps(wp.add(j * rp + g * L));
                for (q, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_set1_ps(*xp.add(q * ld + j)), wv, *a);
                }
            }
            let mask = lanes(r - g * L);
            for (q, a) in acc.iter().enumerate() {
                _mm512_mask_storeu_ps(cp.add(q * r + g * L), mask, _mm512_mul_ps(_mm512_set1_ps(alpha), *a));
            }
        }
    }

    /// `strips[s][q, l] += sum_t U[t, q] · X[t, col + s L + l]` for the strips of `width` columns
    /// (`[strip][r][L]`). Rows of X go in blocks of [`BLOCK`]: for each block, every strip's 16 rows of
    /// `r` are summed over it in registers, so a block's lines of X are fetched once for all strips.
    ///
    /// # Safety
    /// The CPU has AVX-512F; in `g`, `u` holds `n * r` floats, `x` `(n - 1) * ld + col + width`; `strips`
    /// `width.div_ceil(L) * r * L`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn outer_strips(strips: &mut [f32], g: &Group) {
        let Group { u, x, ld, col, width, n, r } = *g;
        let (up, sp) = (u.as_ptr(), strips.as_mut_ptr());
        for t0 in (0..n).step_by(BLOCK) {
            let t1 = (t0 + BLOCK).min(n);
            for s in 0..width.div_ceil(L) {
                let (xmask, xp) = (lanes(width - s * L), x.as_ptr().add(col + s * L));
                let strip = sp.add(s * r * L);
                for q0 in (0..r).step_by(L) {
                    let rows = (r - q0).min(L);
                    let mut acc = [_mm512_setzero_ps(); L];
                    for (q, a) in acc.iter_mut().enumerate().take(rows) {
                        *a = _mm512_loadu_ps(strip.add((q0 + q) * L));
                    }
                    for t in t0..t1 {
                        if q0 == 0 && t + BLOCK < n {
                            // The same line of the next block: fetched while this block's strips run.
                            _mm_prefetch::<_MM_HINT_T0>(xp.add((t + BLOCK) * ld) as *const i8);
                        }
                        let xv = _mm512_maskz_loadu_ps(xmask, xp.add(t * ld));
                        let ut = up.add(t * r + q0);
                        if rows == L {
                            for (q, a) in acc.iter_mut().enumerate() {
                                *a = _mm512_fmadd_ps(_mm512_set1_ps(*ut.add(q)), xv, *a);
                            }
                        } else {
                            for (q, a) in acc.iter_mut().enumerate().take(rows) {
                                *a = _mm512_fmadd_ps(_mm512_set1_ps(*ut.add(q)), xv, *a);
                            }
                        }
                    }
                    for (q, a) in acc.iter().enumerate().take(rows) {
                        _mm512_storeu_ps(strip.add((q0 + q) * L), *a);
                    }
                }
            }
        }
    }

    /// The mask of the first `n.min(16)` lanes.
    #[inline(always)]
    fn lanes(n: usize) -> __mmask16 {
        if n >= L {
            0xFFFF
        } else {
            ((1u32 << n) - 1) as __mmask16
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::threads::test_util::{assert_close, Rng};

    fn on_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(f)
    }

    /// The products against f64 sums, for ranks around the lane width, `X` a block of columns inside a
    /// wider matrix, row counts around the register block and the task, both accumulation modes; and the
    /// same bits on 1 and 3 threads.
    #[test]
    fn match_f64_sums_whatever_the_thread_count() {
        let mut rng = Rng::new(5);
        for (n, k, r) in [(1, 3, 1), (9, 17, 16), (70, 40, 5), (131, 33, 20), (200, 64, 32)] {
            let (ld, col) = (k + 7, 3);
            let x = rng.vec(n * ld, 1.0);
            let w = rng.vec(k * r, 1.0);
            let xs = Cols { data: &x, ld, col };
            let mut c = vec![f32::NAN; n * r];
            rank_product(&mut c, xs, &w, n, k, r, 0.5);
            let want: Vec<f64> = (0..n * r)
                .map(|e| (0..k).map(|j| x[e / r * ld + col + j] as f64 * w[j * r + e % r] as f64).sum::<f64>() * 0.5)
                .collect();
            assert_close(&format!("rank_product {n} {k} {r}"), &c, &want, 1e-5, 1.0);
            let mut plain = vec![0.0; n * r];
            let wp = padded(&w, r);
            portable::product_rows(&mut plain, &x[col..], ld, &wp, k, r, 0.5);
            assert_eq!(plain, c, "rank_product {n} {k} {r}: the portable loops");
            for threads in [1, 3] {
                let again = on_threads(threads, || {
                    let mut c = vec![0.0; n * r];
                    rank_product(&mut c, xs, &w, n, k, r, 0.5);
                    c
                });
                assert_eq!(again, c, "rank_product {n} {k} {r} on {threads} threads");
            }

            // C[r, m] over the rows of X, its m = k columns, with U the [n, r] product above.
            let m = k;
            let start = rng.vec(r * m, 1.0);
            for acc in [Accumulate::Overwrite, Accumulate::Add] {
                let mut o = start.clone();
                rank_outer(&mut o, &c, xs, n, r, m, acc);
                let want: Vec<f64> = (0..r * m)
                    .map(|e| {
                        let (q, j) = (e / m, e % m);
                        let base = if acc == Accumulate::Add { start[e] as f64 } else { 0.0 };
                        base + (0..n).map(|t| c[t * r + q] as f64 * x[t * ld + col + j] as f64).sum::<f64>()
                    })
                    .collect();
                assert_close(&format!("rank_outer {n} {k} {r} {acc:?}"), &o, &want, 1e-5, 1.0);
                if acc == Accumulate::Overwrite && m <= STRIPS * L {
                    // One task's group of strips, `[strip][r][L]`, through the portable loops.
                    let mut strips = vec![0.0f32; m.div_ceil(L) * r * L];
                    portable::outer_strips(&mut strips, &Group { u: &c, x: &x, ld, col, width: m, n, r });
                    for (q, j) in (0..r).flat_map(|q| (0..m).map(move |j| (q, j))) {
                        let v = strips[(j / L) * r * L + q * L + j % L];
                        assert_eq!(v.to_bits(), o[q * m + j].to_bits(), "rank_outer {n} {k} {r}: the portable loops");
                    }
                }
                for threads in [1, 3] {
                    let again = on_threads(threads, || {
                        let mut o = start.clone();
                        rank_outer(&mut o, &c, xs, n, r, m, acc);
                        o
                    });
                    assert_eq!(again, o, "rank_outer {n} {k} {r} {acc:?} on {threads} threads");
                }
            }
        }
    }
}
