//! Kernels of autoregressive decoding: a handful of rows (one new token per sequence) against the weights
//! and against each sequence's key/value cache.
//!
//! Both kernels compute every output element as one dot product in a fixed order that depends only on
//! the inner dimension, never on how many rows are computed together or on the thread count. A GEMM
//! cannot promise that (the `gemm` crate switches to a matrix-vector path for one row and picks its
//! k-blocking from the whole shape), and sampling needs it: a sequence must draw the same tokens whether
//! it is decoded alone or beside others. For the few rows of a decode step the products are bound by
//! reading the weights anyway, which these kernels do once per step.

use rayon::prelude::*;

use super::act::{dot_lanes, exp_f32, max_lanes, multiversion, sum_lanes};
use super::attention::AttnDims;
use super::threads::num_threads;

/// A weight element the decode kernels read: an f32, or a bf16 (`u16`, the top half of an f32) widened
/// as it is loaded. Widening is exact, so a bf16 weight gives the bits its widened f32 copy gives, while
/// the step reads half the bytes (decoding is bound by reading the weights).
pub trait DecodeWeight: Copy + Send + Sync + sealed::Sealed {
    /// The weight as an f32.
    fn widen(self) -> f32;

    /// Eight weights from `p`, widened.
    ///
    /// # Safety
    /// AVX2; `p` points at eight readable weights.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for u16 {}
}

impl DecodeWeight for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl DecodeWeight for u16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        crate::quant::bf16::to_f32(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load8(p: *const u16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h))
    }
}

/// The dot product every output of [`linear_rows_forward`] is, on every path: eight lanes `acc[l] =
/// fma(w[i + l], x[i + l], acc[l])` over the full chunks of eight, the lanes summed by one fixed tree,
/// plus the tail accumulated by `fma` in order. The AVX2 tiles below perform exactly these operations, so
/// a product's value does not depend on the tile it was computed in.
#[inline(always)]
fn dot8<W: DecodeWeight>(w: &[W], x: &[f32]) -> f32 {
    let d = x.len();
    let full = d / 8 * 8;
    let mut acc = [0.0f32; 8];
    for (wc, xc) in w[..full].chunks_exact(8).zip(x[..full].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] = wc[l].widen().mul_add(xc[l], acc[l]);
        }
    }
    let mut tail = 0.0f32;
    for j in full..d {
        tail = w[j].widen().mul_add(x[j], tail);
    }
    hsum8(&acc) + tail
}

/// `((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))`: the order of the AVX2 reduction.
#[inline(always)]
fn hsum8(a: &[f32; 8]) -> f32 {
    let s = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    (s[0] + s[2]) + (s[1] + s[3])
}

/// `yt[c, r] = w[c] . x[r]` for the weight rows of one task: `w: [cols, d]`, `x: [rows, d]`, `yt: [cols,
/// rows]` (transposed, so that a task owns a contiguous block). `pairs`: `x`'s rows in pairs as the
/// AVX-512 tiles read them ([`pair_rows`]), where the CPU has AVX-512 and there are two rows or more.
fn linear_block<W: DecodeWeight>(yt: &mut [f32], w: &[W], x: &[f32], pairs: Option<&[f32]>, rows: usize, d: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(pairs) = pairs {
        // SAFETY: `pairs` is only made where the CPU has AVX-512 (and so AVX2 and FMA).
        unsafe { avx512::linear_block(yt, w, x, pairs, rows, d) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if super::act::has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA; the shapes are checked by the caller.
        unsafe { avx2::linear_block(yt, w, x, rows, d) };
        return;
    }
    let _ = pairs;
    for (c, yc) in yt.chunks_exact_mut(rows).enumerate() {
        let wc = &w[c * d..(c + 1) * d];
        for (r, y) in yc.iter_mut().enumerate() {
            *y = dot8(wc, &x[r * d..(r + 1) * d]);
        }
    }
}

/// `x: [rows, d]`'s full chunks of eight with rows `2p` and `2p + 1` side by side: chunk `c` of pair `p` is
/// the sixteen floats at `(p * d / 8 + c) * 16` (an odd last row is left out), what one AVX-512 register
/// holds so that its two halves run two rows' [`dot8`] lanes at once.
fn pair_rows(x: &[f32], rows: usize, d: usize) -> Vec<f32> {
    let chunks = d / 8;
    let mut out = Vec::with_capacity(rows / 2 * chunks * 16);
    for p in 0..rows / 2 {
        let (a, b) = (&x[2 * p * d..][..d], &x[(2 * p + 1) * d..][..d]);
        for c in 0..chunks {
            out.extend_from_slice(&a[8 * c..8 * c + 8]);
            out.extend_from_slice(&b[8 * c..8 * c + 8]);
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::DecodeWeight;

    /// `hsum8` of a vector, same order.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)); // a_i + a_{i+4}
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s)); // (s0 + s2), (s1 + s3)
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// `out[i][j] = dot8(w row i, x row j)` for `RW` weight rows and `RX` input rows, sharing the loads:
    /// per chunk of eight, `RW + RX` loads feed `RW * RX` fused multiply-adds.
    ///
    /// # Safety
    /// AVX2 and FMA; `w` holds `RW` rows and `x` holds `RX` rows of `d` floats.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile<W: DecodeWeight, const RW: usize, const RX: usize>(
        w: *const W,
        x: *const f32,
        d: usize,
    ) -> [[f32; RX]; RW] {
        let full = d / 8 * 8;
        let mut acc = [[_mm256_setzero_ps(); RX]; RW];
        let mut i = 0;
        while i < full {
            let mut xv = [_mm256_setzero_ps(); RX];
            for (b, v) in xv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(x.add(b * d + i));
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let wv = W::load8(w.add(r * d + i));
                for (a, &xv) in a.iter_mut().zip(&xv) {
                    *a = _mm256_fmadd_ps(wv, xv, *a);
                }
            }
            i += 8;
        }
        let mut out = [[0.0f32; RX]; RW];
        for r in 0..RW {
            for b in 0..RX {
                let mut tail = 0.0f32;
                for j in full..d {
                    tail = (*w.add(r * d + j)).widen().mul_add(*x.add(b * d + j), tail);
                }
                out[r][b] = hsum(acc[r][b]) + tail;
            }
        }
        out
    }

    /// Weight rows by fours, input rows by twos, remainders by ones.
    ///
    /// # Safety
    /// AVX2 and FMA; `w: [cols, d]`, `x: [rows, d]`, `yt: [cols, rows]`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn linear_block<W: DecodeWeight>(yt: &mut [f32], w: &[W], x: &[f32], rows: usize, d: usize) {
        let cols = yt.len() / rows;
        assert!(w.len() >= cols * d && x.len() >= rows * d);
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut c = 0;
        while c < cols {
            let rw = if cols - c >= 4 { 4 } else { 1 };
            let mut r = 0;
            while r < rows {
                let rx = if rows - r >= 2 { 2 } else { 1 };
                let (wt, xt) = (wp.add(c * d), xp.add(r * d));
                match (rw, rx) {
                    (4, 2) => {
                        let o = tile::<W, 4, 2>(wt, xt, d);
                        for (i, o) in o.iter().enumerate() {
                            yt[(c + i) * rows + r..][..2].copy_from_slice(o);
                        }
                    }
                    (4, _) => {
                        let o = tile::<W, 4, 1>(wt, xt, d);
                        for (i, o) in o.iter().enumerate() {
                            yt[(c + i) * rows + r] = o[0];
                        }
                    }
                    (_, 2) => yt[c * rows + r..][..2].copy_from_slice(&tile::<W, 1, 2>(wt, xt, d)[0]),
                    _ => yt[c * rows + r] = tile::<W, 1, 1>(wt, xt, d)[0][0],
                }
                r += rx;
            }
            c += rw;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{avx2, DecodeWeight};

    /// `out[i][2p + h] = dot8(w row i, x row 2p + h)` for `RW` weight rows and `RP` pairs of input rows:
    /// per chunk of eight, the weights' eight floats are broadcast to both halves of a register and
    /// multiplied into a pair's two rows at once, each half running exactly [`super::dot8`]'s lanes.
    ///
    /// # Safety
    /// AVX-512F, AVX2 and FMA; `w` holds `RW` rows of `d` floats, `pairs` the `RP` pairs' chunks
    /// ([`super::pair_rows`]; `chunks` a pair) and `x` their rows (for the tail past the full chunks).
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn tile<W: DecodeWeight, const RW: usize, const RP: usize>(
        w: *const W,
        pairs: *const f32,
        x: *const f32,
        d: usize,
    ) -> [[[f32; 2]; RP]; RW] {
        let chunks = d / 8;
        let chunks_a_line = 64 / (8 * size_of::<W>()); // chunks of eight weights in a cache line
        let mut acc = [[_mm512_setzero_ps(); RP]; RW];
        for c in 0..chunks {
            let mut xv = [_mm512_setzero_ps(); RP];
            for (p, v) in xv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(pairs.add((p * chunks + c) * 16));
            }
            for (r, a) in acc.iter_mut().enumerate() {
                if c % chunks_a_line == 0 {
                    // The next tile's rows, a cache line at a time: the rows of one tile are short streams
                    // the hardware prefetcher does not follow in time.
                    _mm_prefetch::<_MM_HINT_T0>(w.add((RW + r) * d + 8 * c).cast::<i8>());
                }
                let w8 = _mm256_castps_pd(W::load8(w.add(r * d + 8 * c)));
                let wv = _mm512_castpd_ps(_mm512_broadcast_f64x4(w8));
                for (a, &xv) in a.iter_mut().zip(&xv) {
                    *a = _mm512_fmadd_ps(wv, xv, *a);
                }
            }
        }
        // The accumulators' halves summed eight registers at a time, in `hsum8`'s order.
        let mut out = [[[0.0f32; 2]; RP]; RW];
        for first in (0..RW * RP).step_by(8) {
            let group = first..(first + 8).min(RW * RP); // accumulator i is acc[i / RP][i % RP]
            let mut v = [_mm512_setzero_ps(); 8];
            for (v, i) in v.iter_mut().zip(group.clone()) {
                *v = acc[i / RP][i % RP];
            }
            let mut sums = [0.0f32; 16];
            _mm512_storeu_ps(sums.as_mut_ptr(), hsum_halves8(v));
            for (j, i) in group.enumerate() {
                let (r, p) = (i / RP, i % RP);
                for h in 0..2 {
                    let row = x.add((2 * p + h) * d);
                    let mut tail = 0.0f32;
                    for k in 8 * chunks..d {
                        tail = (*w.add(r * d + k)).widen().mul_add(*row.add(k), tail);
                    }
                    out[r][p][h] = sums[4 * (2 * (j % 2) + h) + j / 2] + tail;
                }
            }
        }
        out
    }

    /// The sixteen eight-lane halves of `v` each summed by [`super::hsum8`]'s tree, all at once: half `h`
    /// of `v[j]` at `4 * (2 * (j % 2) + h) + j / 2`. Lanes are paired across registers so that every add
    /// is one of the tree's: `s_i = a_i + a_{i+4}`, then `s_0 + s_2` and `s_1 + s_3`, then their sum.
    ///
    /// # Safety
    /// AVX-512F.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn hsum_halves8(v: [__m512; 8]) -> __m512 {
        // [a.L0, a.L2, b.L0, b.L2] + [a.L1, a.L3, b.L1, b.L3]: lane k holds s_0..s_3 of half k % 2 of
        // register k / 2 of the pair.
        let s = |a: __m512, b: __m512| {
            _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(a, b), _mm512_shuffle_f32x4::<0xDD>(a, b))
        };
        let (s01, s23, s45, s67) = (s(v[0], v[1]), s(v[2], v[3]), s(v[4], v[5]), s(v[6], v[7]));
        // Per lane [s_0 + s_2, s_1 + s_3] of the first operand, then of the second.
        let z = |a: __m512, b: __m512| {
            let (a, b) = (_mm512_castps_pd(a), _mm512_castps_pd(b));
            _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)))
        };
        let (z0, z1) = (z(s01, s23), z(s45, s67));
        _mm512_add_ps(_mm512_shuffle_ps::<0x88>(z0, z1), _mm512_shuffle_ps::<0xDD>(z0, z1))
    }

    /// `RW` weight rows against pairs `p0..p0 + rp` (`rp` 1 to 4, or 8) into `yt: [cols, rows]` at column `c`.
    ///
    /// # Safety
    /// As [`tile`], for the rows and pairs named.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn tiles<W: DecodeWeight, const RW: usize>(
        yt: &mut [f32],
        w: &[W],
        x: &[f32],
        pairs: &[f32],
        at: [usize; 4],
    ) {
        let [c, p0, rp, rows] = at;
        let d = x.len() / rows;
        let (wt, pt, xt) = (w.as_ptr().add(c * d), pairs.as_ptr().add(p0 * (d / 8) * 16), x.as_ptr().add(2 * p0 * d));
        let mut put = |i: usize, p: usize, v: [f32; 2]| yt[(c + i) * rows + 2 * (p0 + p)..][..2].copy_from_slice(&v);
        match rp {
            8 => store(&tile::<W, RW, 8>(wt, pt, xt, d), &mut put),
            4 => store(&tile::<W, RW, 4>(wt, pt, xt, d), &mut put),
            3 => store(&tile::<W, RW, 3>(wt, pt, xt, d), &mut put),
            2 => store(&tile::<W, RW, 2>(wt, pt, xt, d), &mut put),
            _ => store(&tile::<W, RW, 1>(wt, pt, xt, d), &mut put),
        }
    }

    /// A tile's sums `[weight row][pair][half]` handed to `put(row, pair, halves)`.
    fn store<const RP: usize>(out: &[[[f32; 2]; RP]], mut put: impl FnMut(usize, usize, [f32; 2])) {
        for (i, o) in out.iter().enumerate() {
            for (p, v) in o.iter().enumerate() {
                put(i, p, *v);
            }
        }
    }

    /// Weight rows by fours against pairs of input rows by up to fours; eight pairs at a time (sixteen
    /// rows and more) by two weight rows, so that each weight loaded (and widened) feeds eight pairs; an
    /// odd last row by the AVX2 tiles. Sixteen accumulators either way.
    ///
    /// # Safety
    /// AVX-512F, AVX2 and FMA; `w: [cols, d]`, `x: [rows, d]`, `pairs` = `pair_rows(x)`, `yt: [cols, rows]`.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn linear_block<W: DecodeWeight>(
        yt: &mut [f32],
        w: &[W],
        x: &[f32],
        pairs: &[f32],
        rows: usize,
        d: usize,
    ) {
        let cols = yt.len() / rows;
        assert!(w.len() >= cols * d && x.len() >= rows * d && pairs.len() >= rows / 2 * (d / 8) * 16);
        let mut c = 0;
        while c < cols {
            let rw = if cols - c >= 4 { 4 } else { 1 };
            let mut p = 0;
            while p < rows / 2 {
                let rp = if rw == 4 && rows / 2 - p >= 8 { 8 } else { (rows / 2 - p).min(4) };
                match (rw, rp) {
                    (4, 8) => {
                        tiles::<W, 2>(yt, w, x, pairs, [c, p, 8, rows]);
                        tiles::<W, 2>(yt, w, x, pairs, [c + 2, p, 8, rows]);
                    }
                    (4, _) => tiles::<W, 4>(yt, w, x, pairs, [c, p, rp, rows]),
                    _ => tiles::<W, 1>(yt, w, x, pairs, [c, p, rp, rows]),
                }
                p += rp;
            }
            if rows % 2 == 1 {
                let (wt, xt, r) = (w.as_ptr().add(c * d), x.as_ptr().add((rows - 1) * d), rows - 1);
                match rw {
                    4 => {
                        for (i, o) in avx2::tile::<W, 4, 1>(wt, xt, d).iter().enumerate() {
                            yt[(c + i) * rows + r] = o[0];
                        }
                    }
                    _ => yt[c * rows + r] = avx2::tile::<W, 1, 1>(wt, xt, d)[0][0],
                }
            }
            c += rw;
        }
    }
}

/// `y[rows, out] = x[rows, in] . W[out, in]^T (+ b[out])`, like [`super::linear_forward`], for the few
/// rows of a decode step. Row `r` of `y` is bit-for-bit the same whatever `rows` is and however many
/// threads run (see the module doc). Parallel over blocks of output columns; each block of `W` is read
/// once for all rows. `W`'s elements are f32 or bf16 ([`DecodeWeight`]).
pub fn linear_rows_forward<W: DecodeWeight>(
    y: &mut [f32],
    x: &[f32],
    w: &[W],
    b: Option<&[f32]>,
    rows: usize,
    in_dim: usize,
    out_dim: usize,
) {
    assert_eq!(y.len(), rows * out_dim, "linear_rows_forward: y is not [rows, out]");
    assert_eq!(x.len(), rows * in_dim, "linear_rows_forward: x is not [rows, in]");
    assert_eq!(w.len(), out_dim * in_dim, "linear_rows_forward: W is not [out, in]");
    if let Some(b) = b {
        assert_eq!(b.len(), out_dim, "linear_rows_forward: bias is not [out]");
    }
    if rows == 0 || out_dim == 0 {
        return;
    }
    // About eight tasks per thread, at least a tile of weight rows and ~64K multiply-adds each.
    let min_cols = (65_536 / (rows * in_dim).max(1)).max(4);
    let cols = out_dim.div_ceil(8 * num_threads()).max(min_cols).next_multiple_of(4).min(out_dim);
    let mut yt = vec![0.0f32; out_dim * rows];
    #[cfg(target_arch = "x86_64")]
    let pairs = (rows >= 2 && super::act::has_avx512()).then(|| pair_rows(x, rows, in_dim));
    #[cfg(not(target_arch = "x86_64"))]
    let pairs: Option<Vec<f32>> = None;
    yt.par_chunks_mut(cols * rows)
        .zip(w.par_chunks(cols * in_dim))
        .for_each(|(yt, w)| linear_block(yt, w, x, pairs.as_deref(), rows, in_dim));
    for (r, yr) in y.chunks_exact_mut(out_dim).enumerate() {
        for (c, o) in yr.iter_mut().enumerate() {
            *o = yt[c * rows + r];
        }
        if let Some(b) = b {
            yr.iter_mut().zip(b).for_each(|(o, &b)| *o += b);
        }
    }
}

multiversion! {
    /// One query head against keys `lo..len` of one key/value head: `o[hd] = softmax(qs . K^T) V`, with
    /// `qs` already scaled. `k`, `v`: rows of `stride` floats, the head's columns starting at `off`;
    /// `s`: scratch of `len - lo` scores.
    fn attend_head(o: &mut [f32], s: &mut [f32], qs: &[f32], k: &[f32], v: &[f32], stride: usize, off: usize, lo: usize) {
        let hd = qs.len();
        for (j, sj) in s.iter_mut().enumerate() {
            let at = (lo + j) * stride + off;
            *sj = dot_lanes(qs, &k[at..at + hd]);
        }
        let m = max_lanes(s);
        s.iter_mut().for_each(|x| *x = exp_f32(*x - m));
        let inv = 1.0 / sum_lanes(s);
        o.fill(0.0);
        for (j, &p) in s.iter().enumerate() {
            let at = (lo + j) * stride + off;
            o.iter_mut().zip(&v[at..at + hd]).for_each(|(o, &v)| *o += p * v);
        }
        o.iter_mut().for_each(|x| *x *= inv);
    }
}

/// Attention of one new query row per sequence to that sequence's cache.
///
/// `out: [B, n_heads * hd]`; query row `b` starts at `q[b * q_stride]` and holds the query heads side by
/// side (the leading columns of a fused q/k/v row). `keys[b]`, `values[b]`: `[len_b, n_kv_heads * hd]`,
/// the sequence's keys and values after rotary, the new token's own included, so the query sits at
/// position `len_b - 1` and sees keys `0..len_b` (with a sliding window `w`, keys `len_b - w..len_b`:
/// Mistral's `i - j < w`). Query head `h` reads key/value head `h / (n_heads / n_kv_heads)`, as in
/// [`super::attention_forward`]. Parallel over (sequence, key/value head).
pub fn decode_attention(
    out: &mut [f32],
    q: &[f32],
    q_stride: usize,
    keys: &[&[f32]],
    values: &[&[f32]],
    dims: &AttnDims,
) {
    let (nh, nkv, hd) = (dims.n_heads, dims.n_kv_heads, dims.head_dim);
    let bsz = keys.len();
    assert!(hd > 0 && nkv > 0 && nh % nkv == 0, "decode_attention: bad head counts");
    assert!(dims.window != Some(0), "decode_attention: a window of 0 masks every key");
    assert_eq!(values.len(), bsz, "decode_attention: keys and values differ in count");
    assert_eq!(out.len(), bsz * nh * hd, "decode_attention: out is not [B, n_heads * hd]");
    assert!(q_stride >= nh * hd, "decode_attention: query stride shorter than the query heads");
    assert!(bsz == 0 || q.len() >= (bsz - 1) * q_stride + nh * hd, "decode_attention: q too short");
    let kvd = nkv * hd;
    for (k, v) in keys.iter().zip(values) {
        assert!(
            k.len() == v.len() && k.len() % kvd == 0 && !k.is_empty(),
            "decode_attention: a cache is not [len >= 1, n_kv_heads * hd]"
        );
    }
    let rep = nh / nkv;
    let scale = 1.0 / (hd as f32).sqrt();
    // Task t = b * nkv + kv owns the `rep` query heads of key/value head kv of row b: contiguous in `out`.
    out.par_chunks_mut(rep * hd).enumerate().for_each(|(t, o)| {
        let (b, kv) = (t / nkv, t % nkv);
        let (k, v) = (keys[b], values[b]);
        let len = k.len() / kvd;
        let lo = dims.window.map_or(0, |w| len.saturating_sub(w));
        let mut s = vec![0.0f32; len - lo];
        let mut qs = vec![0.0f32; hd];
        for hh in 0..rep {
            let h = kv * rep + hh;
            let src = &q[b * q_stride + h * hd..][..hd];
            qs.iter_mut().zip(src).for_each(|(d, &x)| *d = x * scale);
            attend_head(&mut o[hh * hd..(hh + 1) * hd], &mut s, &qs, k, v, kvd, kv * hd, lo);
        }
    });
}

#[cfg(test)]
#[path = "decode_tests.rs"]
mod tests;
