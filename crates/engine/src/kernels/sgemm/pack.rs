//! Packing: copies a `w x kc` sliver of an operand into the `[kc][W]` layout the micro-kernel reads
//! (`W` = 16 for an A sliver, `NR` for a B panel), zero-padding lanes `w..W`. The operand's element
//! `(x, p)` (`x` across the sliver, `p` along `k`) is at `src + x * sx + p * sp`; the two layouts that
//! occur are handled with vector code, anything else element by element:
//! - `sx == 1` (A stored `[k, m]`, B stored `[k, n]`): each `p` is a contiguous run of `w` floats, a copy;
//! - `sp == 1` (A stored `[m, k]`, B stored `[n, k]`): each `x` is a contiguous run along `k`, a transpose,
//!   done 16 x 16 in registers.
//!
//! With `ROUND`, every value is rounded to bf16 as it is packed ([`round_to_bf16`]): the bf16 product
//! computed by the f32 micro-kernel.

use core::arch::x86_64::*;

/// A strided sliver source of `T` (f32, or bf16 bits): element `(x, p)` at `ptr + x * sx + p * sp`.
pub(super) struct Src<T> {
    pub ptr: *const T,
    pub sx: usize,
    pub sp: usize,
}

impl<T> Clone for Src<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Src<T> {}

/// The cache lines of a sliver `w x kc` of a source, prefetched into L2 a few at a time while the
/// micro-kernel runs, so that packing it later reads L2 instead of memory.
pub(super) struct Lines {
    base: *const u8,
    stride: usize,
    runs: usize,
    len: usize,
    per_run: usize,
    run: usize,
    line: usize,
}

impl Lines {
    pub fn none() -> Self {
        Lines { base: std::ptr::null(), stride: 0, runs: 0, len: 0, per_run: 0, run: 0, line: 0 }
    }

    /// The lines of `w` lanes by `kc` steps of `src` (none for the element-wise layout).
    pub fn of<T>(src: Src<T>, w: usize, kc: usize) -> Self {
        let size = std::mem::size_of::<T>();
        let (stride, runs, len) = if src.sx == 1 {
            (src.sp * size, kc, w * size)
        } else if src.sp == 1 {
            (src.sx * size, w, kc * size)
        } else {
            return Self::none();
        };
        if runs == 0 || len == 0 {
            return Self::none();
        }
        // A run may straddle one more line than its length needs; its last byte is fetched last.
        let per_run = len.div_ceil(64) + 1;
        Lines { base: src.ptr as *const u8, stride, runs, len, per_run, run: 0, line: 0 }
    }

    /// Lines still to fetch (an upper bound).
    pub fn left(&self) -> usize {
        (self.runs - self.run) * self.per_run - self.line
    }

    /// Prefetches the next `n` lines.
    #[inline(always)]
    pub unsafe fn issue(&mut self, n: usize) {
        for _ in 0..n {
            if self.run >= self.runs {
                return;
            }
            let off = (self.line * 64).min(self.len - 1);
            let p = self.base.wrapping_add(self.run * self.stride + off);
            _mm_prefetch::<_MM_HINT_T1>(p as *const i8);
            self.line += 1;
            if self.line == self.per_run {
                self.line = 0;
                self.run += 1;
            }
        }
    }
}

/// Lanes `0..n` (all 16 from `n = 16` on).
#[inline(always)]
pub(super) fn mask(n: usize) -> __mmask16 {
    if n >= 16 {
        0xFFFF
    } else {
        ((1u32 << n) - 1) as __mmask16
    }
}

/// Each lane of `v` rounded to bf16, in the lane's high 16 bits (the low 16 bits are left unspecified:
/// callers keep only the high halves), exactly as [`crate::quant::bf16::from_f32`]: nearest with ties to
/// even, a NaN becomes `0x7FC0`, denormals are kept (`vcvtne2ps2bf16` would flush them and keep NaN
/// signs, so the rounding is done on the integer bits).
#[inline(always)]
pub(super) unsafe fn bf16_high_halves(v: __m512) -> __m512i {
    let bits = _mm512_castps_si512(v);
    let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
    let rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
    _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0_0000))
}

/// `v`, rounded to bf16 and widened back when `ROUND`.
#[inline(always)]
unsafe fn rounded<const ROUND: bool>(v: __m512) -> __m512 {
    if ROUND {
        let top = _mm512_and_si512(bf16_high_halves(v), _mm512_set1_epi32(0xFFFF_0000u32 as i32));
        _mm512_castsi512_ps(top)
    } else {
        v
    }
}

/// `v[i] = to_f32(from_f32(v[i]))` ([`crate::quant::bf16`]) 16 lanes at a time: the rounded copies of
/// the thin bf16 products that no kernel here takes (`matmul::bf16_emulated`), where the scalar loop,
/// which the compiler leaves unvectorised there, cost 1-2% of a bf16 step. Returns how many leading
/// values it rounded (a multiple of 16); the caller rounds the rest.
///
/// # Safety
/// AVX-512F must be available.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn round_to_bf16_in_place(v: &mut [f32]) -> usize {
    let whole = v.len() / 16 * 16;
    for c in v[..whole].chunks_exact_mut(16) {
        let x = rounded::<true>(_mm512_loadu_ps(c.as_ptr()));
        _mm512_storeu_ps(c.as_mut_ptr(), x);
    }
    whole
}

/// Packs `w <= W` lanes by `kc` steps of `src` into `dst[kc][W]` (rounded to bf16 when `ROUND`).
///
/// # Safety
/// AVX-512F must be available; `src` addresses every `(x, p)` with `x < w`, `p < kc`; `dst` holds `kc * W`
/// writable floats.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn pack<const W: usize, const ROUND: bool>(dst: *mut f32, src: Src<f32>, w: usize, kc: usize) {
    debug_assert!(w <= W);
    if src.sx == 1 {
        pack_copy::<W, ROUND>(dst, src, w, kc);
    } else if src.sp == 1 {
        pack_transpose::<W, ROUND>(dst, src, w, kc);
    } else {
        use crate::quant::bf16::{from_f32, to_f32};
        for p in 0..kc {
            for x in 0..W {
                let v = if x < w { *src.ptr.add(x * src.sx + p * src.sp) } else { 0.0 };
                *dst.add(p * W + x) = if ROUND { to_f32(from_f32(v)) } else { v };
            }
        }
    }
}

/// Packs `w` lanes (`ceil(w / W)` consecutive panels of `[kc][W]`, the last zero-padded) of `src`.
///
/// # Safety
/// As [`pack`], for `w` lanes and `dst` holding `ceil(w / W) * kc * W` floats.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn pack_panels<const W: usize, const ROUND: bool>(dst: *mut f32, src: Src<f32>, w: usize, kc: usize) {
    let panels = w.div_ceil(W);
    if src.sx == 1 {
        // Row by row along the source, so its reads are sequential whatever the panel width.
        let chunks = W.div_ceil(16);
        for p in 0..kc {
            let s = src.ptr.add(p * src.sp);
            _mm_prefetch::<_MM_HINT_T0>(s.wrapping_add(4 * src.sp) as *const i8);
            for jp in 0..panels {
                let d = dst.add(jp * kc * W + p * W);
                for ch in 0..chunks {
                    let x = jp * W + 16 * ch;
                    let lanes = (W - 16 * ch).min(16);
                    let valid = w.saturating_sub(x).min(lanes);
                    let v = rounded::<ROUND>(_mm512_maskz_loadu_ps(mask(valid), s.wrapping_add(x)));
                    _mm512_mask_storeu_ps(d.add(16 * ch), mask(lanes), v);
                }
                if jp % 2 == 1 {
                    _mm_prefetch::<_MM_HINT_T0>(s.wrapping_add(4 * src.sp + jp * W) as *const i8);
                }
            }
        }
    } else {
        for jp in 0..panels {
            let s = Src { ptr: src.ptr.add(jp * W * src.sx), ..src };
            pack::<W, ROUND>(dst.add(jp * kc * W), s, (w - jp * W).min(W), kc);
        }
    }
}

#[inline(always)]
unsafe fn pack_copy<const W: usize, const ROUND: bool>(dst: *mut f32, src: Src<f32>, w: usize, kc: usize) {
    let chunks = W.div_ceil(16);
    for p in 0..kc {
        let s = src.ptr.add(p * src.sp);
        let d = dst.add(p * W);
        for ch in 0..chunks {
            let lanes = (W - 16 * ch).min(16);
            let valid = w.saturating_sub(16 * ch).min(lanes);
            let v = rounded::<ROUND>(_mm512_maskz_loadu_ps(mask(valid), s.wrapping_add(16 * ch)));
            _mm512_mask_storeu_ps(d.add(16 * ch), mask(lanes), v);
        }
    }
}

#[inline(always)]
unsafe fn pack_transpose<const W: usize, const ROUND: bool>(dst: *mut f32, src: Src<f32>, w: usize, kc: usize) {
    for x0 in (0..W).step_by(16) {
        let lanes = (W - x0).min(16);
        let rows = w.saturating_sub(x0).min(lanes);
        // The next 16 source rows (this panel's next group, or the next panel's first), a line per
        // 16 x 16 block of this group, so they arrive while this group is transposed.
        let next = src.ptr.wrapping_add((x0 + 16) * src.sx);
        for p0 in (0..kc).step_by(16) {
            for i in 0..16 {
                _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(i * src.sx + p0) as *const i8);
            }
            let cols = (kc - p0).min(16);
            let cm = mask(cols);
            // Fixed trip counts with masks (a zero mask touches no memory) keep `r` in registers.
            let mut r = [_mm512_setzero_ps(); 16];
            for (i, ri) in r.iter_mut().enumerate() {
                let m = if i < rows { cm } else { 0 };
                *ri = rounded::<ROUND>(_mm512_maskz_loadu_ps(m, src.ptr.wrapping_add((x0 + i) * src.sx + p0)));
            }
            transpose16(&mut r);
            let sm = mask(lanes);
            for (q, &rq) in r.iter().enumerate() {
                let m = if q < cols { sm } else { 0 };
                _mm512_mask_storeu_ps(dst.wrapping_add((p0 + q) * W + x0), m, rq);
            }
        }
    }
}

/// Transposes the 16 x 16 matrix of 32-bit lanes held in `r` (row `i` in `r[i]`) in place.
#[inline(always)]
pub(super) unsafe fn transpose16(r: &mut [__m512; 16]) {
    // t: pairs of rows interleaved within each 128-bit lane.
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // u[4g + c], 128-bit lane l: rows 4g..4g+4 of column c + 4l.
    let mut u = [_mm512_setzero_ps(); 16];
    for g in 0..4 {
        let (t0, t1, t2, t3) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
        u[4 * g] = _mm512_shuffle_ps::<0x44>(t0, t2);
        u[4 * g + 1] = _mm512_shuffle_ps::<0xEE>(t0, t2);
        u[4 * g + 2] = _mm512_shuffle_ps::<0x44>(t1, t3);
        u[4 * g + 3] = _mm512_shuffle_ps::<0xEE>(t1, t3);
    }
    // Column c + 4l gathers lane l of u[c], u[4 + c], u[8 + c], u[12 + c].
    for c in 0..4 {
        let v0 = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
        let w0 = _mm512_shuffle_f32x4::<0xDD>(u[c], u[4 + c]);
        let v1 = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
        let w1 = _mm512_shuffle_f32x4::<0xDD>(u[8 + c], u[12 + c]);
        r[c] = _mm512_shuffle_f32x4::<0x88>(v0, v1);
        r[c + 8] = _mm512_shuffle_f32x4::<0xDD>(v0, v1);
        r[c + 4] = _mm512_shuffle_f32x4::<0x88>(w0, w1);
        r[c + 12] = _mm512_shuffle_f32x4::<0xDD>(w0, w1);
    }
}
