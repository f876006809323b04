//! The bf16 product on AVX512_BF16: `vdpbf16ps` multiplies the bf16 pairs of two 32-bit lanes and adds
//! both products to an f32 lane, so the operands are packed as k pairs: word `(x, q)` of a sliver holds
//! `(x, 2q)` in its low half and `(x, 2q + 1)` in its high half (`[steps][W]` words, `steps = ceil(kc /
//! 2)`, an odd `kc` padded with a zero). The driver, the blocking, the C tile loads and stores and the
//! tile shapes are the f32 kernel's ([`super::Flavor`]); only the packing and the inner loop differ.
//!
//! Sources are f32, rounded as they are packed exactly as [`crate::quant::bf16::from_f32`] (on the
//! integer bits: [`super::pack::bf16_high_halves`]), or bf16 bits taken as they are (a stored bf16 weight: the
//! same packed words as widening it to f32 and rounding back, without the widening).
//!
//! Numerics: products of two bf16 are exact in f32; `vdpbf16ps` adds them to the accumulator in f32,
//! treating denormal inputs as zero and flushing denormal results (as the engine's threads do anyway,
//! with MXCSR's FTZ and DAZ). Each C element is one chain of such steps in `k` order, so the result
//! depends neither on the thread count nor on accumulating calls split at even `k`.

use core::arch::x86_64::*;
use std::marker::PhantomData;

use super::kernel::{row_of_tiles, Store, Tile, AW, MR};
use super::pack::{bf16_high_halves, mask, transpose16, Lines, Src};
use super::{sliver_of_panels, Flavor};

/// An element the bf16 packing reads: f32 (rounded to bf16) or `u16` (bf16 bits, already rounded).
pub(crate) trait Bf16Elem: Sized {
    /// Lanes `mask` of 16 consecutive elements at `ptr`: each lane's bf16 bits in its high half, the low
    /// half unspecified (masked-off lanes zero; they touch no memory).
    unsafe fn load_lanes(ptr: *const Self, mask: __mmask16) -> __m512i;
    /// The first `count <= 32` of 32 consecutive elements at `ptr` (the rest zero) as 16 pair words.
    unsafe fn load_pairs(ptr: *const Self, count: usize) -> __m512i;
    /// One element's bf16 bits.
    unsafe fn bits(ptr: *const Self) -> u16;
}

/// 16-bit lane `i` of the result takes lane `2 i + 1` of the pair `(lo, hi)` of `vpermt2w`: the bf16
/// halves of 32 rounded f32 lanes, in order.
static HIGH_HALVES: [u16; 32] = {
    let mut idx = [0u16; 32];
    let mut i = 0;
    while i < 32 {
        idx[i] = 2 * i as u16 + 1;
        i += 1;
    }
    idx
};

impl Bf16Elem for f32 {
    #[inline(always)]
    unsafe fn load_lanes(ptr: *const f32, mask: __mmask16) -> __m512i {
        bf16_high_halves(_mm512_maskz_loadu_ps(mask, ptr))
    }

    #[inline(always)]
    unsafe fn load_pairs(ptr: *const f32, count: usize) -> __m512i {
        let lo = bf16_high_halves(_mm512_maskz_loadu_ps(mask(count), ptr));
        let hi = bf16_high_halves(_mm512_maskz_loadu_ps(mask(count.saturating_sub(16)), ptr.wrapping_add(16)));
        let idx = _mm512_loadu_si512(HIGH_HALVES.as_ptr() as *const _);
        _mm512_permutex2var_epi16(lo, idx, hi)
    }

    #[inline(always)]
    unsafe fn bits(ptr: *const f32) -> u16 {
        crate::quant::bf16::from_f32(*ptr)
    }
}

impl Bf16Elem for u16 {
    #[inline(always)]
    unsafe fn load_lanes(ptr: *const u16, mask: __mmask16) -> __m512i {
        let h = _mm512_castsi512_si256(_mm512_maskz_loadu_epi16(mask as __mmask32, ptr as *const i16));
        _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h))
    }

    #[inline(always)]
    unsafe fn load_pairs(ptr: *const u16, count: usize) -> __m512i {
        let m = if count >= 32 { u32::MAX } else { (1u32 << count) - 1 };
        _mm512_maskz_loadu_epi16(m, ptr as *const i16)
    }

    #[inline(always)]
    unsafe fn bits(ptr: *const u16) -> u16 {
        *ptr
    }
}

/// Packs `w <= W` lanes by `kc` values of `k` of `src` into `dst[ceil(kc / 2)][W]` pair words,
/// zero-padded. The layouts are the f32 packing's: `sx == 1` pairs two source rows lane by lane,
/// `sp == 1` reads pairs along `k` and transposes 16 x 16 words, anything else goes element by element.
///
/// # Safety
/// AVX-512F and AVX512BW must be available; `src` addresses every `(x, p)` with `x < w`, `p < kc`; `dst`
/// holds `ceil(kc / 2) * W` writable words.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn pack_pairs<const W: usize, T: Bf16Elem>(dst: *mut u32, src: Src<T>, w: usize, kc: usize) {
    debug_assert!(w <= W);
    let steps = kc.div_ceil(2);
    if src.sx == 1 {
        for q in 0..steps {
            pair_rows::<W, T>(dst.add(q * W), src, 2 * q, kc, w);
        }
    } else if src.sp == 1 {
        for x0 in (0..W).step_by(16) {
            let lanes = (W - x0).min(16);
            let rows = w.saturating_sub(x0).min(lanes);
            let next = src.ptr.wrapping_add((x0 + 16) * src.sx);
            for q0 in (0..steps).step_by(16) {
                // The next 16 source rows, as the f32 packing does.
                for i in 0..16 {
                    let p = next.wrapping_add(i * src.sx + 2 * q0);
                    _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(31) as *const i8);
                }
                let count = (kc - 2 * q0).min(32);
                let mut r = [_mm512_setzero_ps(); 16];
                for (i, ri) in r.iter_mut().enumerate() {
                    let c = if i < rows { count } else { 0 };
                    *ri = _mm512_castsi512_ps(T::load_pairs(src.ptr.wrapping_add((x0 + i) * src.sx + 2 * q0), c));
                }
                transpose16(&mut r);
                let (cols, sm) = ((steps - q0).min(16), mask(lanes));
                for (q, &rq) in r.iter().enumerate() {
                    let m = if q < cols { sm } else { 0 };
                    _mm512_mask_storeu_ps(dst.wrapping_add((q0 + q) * W + x0) as *mut f32, m, rq);
                }
            }
        }
    } else {
        for q in 0..steps {
            for x in 0..W {
                let at = |p: usize| if x < w && p < kc { T::bits(src.ptr.add(x * src.sx + p * src.sp)) } else { 0 };
                *dst.add(q * W + x) = at(2 * q) as u32 | (at(2 * q + 1) as u32) << 16;
            }
        }
    }
}

/// One step of a `sx == 1` sliver: `dst[x] = (src(x, p), src(x, p + 1))` for the `W` lanes (zero past
/// `w`, and in the high halves when `p + 1 == kc`).
#[inline(always)]
unsafe fn pair_rows<const W: usize, T: Bf16Elem>(dst: *mut u32, src: Src<T>, p: usize, kc: usize, w: usize) {
    let (even, odd) = (src.ptr.add(p * src.sp), src.ptr.wrapping_add((p + 1) * src.sp));
    let has_odd = p + 1 < kc;
    for ch in 0..W.div_ceil(16) {
        let lanes = (W - 16 * ch).min(16);
        let valid = mask(w.saturating_sub(16 * ch).min(lanes));
        let lo = T::load_lanes(even.wrapping_add(16 * ch), valid);
        let hi = T::load_lanes(odd.wrapping_add(16 * ch), if has_odd { valid } else { 0 });
        // The even value's bits shifted to the low half, the odd value's high half kept.
        let word = _mm512_mask_blend_epi16(0xAAAA_AAAA, _mm512_srli_epi32::<16>(lo), hi);
        _mm512_mask_storeu_epi32(dst.add(16 * ch) as *mut i32, mask(lanes), word);
    }
}

/// Packs `w` lanes of `src` into `ceil(w / W)` panels of `[ceil(kc / 2)][W]` pair words, `stride` steps
/// apart (`stride >= ceil(kc / 2)`; the steps between are left as they are).
///
/// # Safety
/// As [`pack_pairs`], for `w` lanes and `dst` holding `ceil(w / W) * stride * W` words.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn pack_pair_panels<const W: usize, T: Bf16Elem>(
    dst: *mut u32,
    src: Src<T>,
    w: usize,
    kc: usize,
    stride: usize,
) {
    let (panels, steps) = (w.div_ceil(W), kc.div_ceil(2));
    debug_assert!(stride >= steps);
    if src.sx == 1 {
        // Step by step across all panels, so the source is read sequentially whatever the panel width.
        for q in 0..steps {
            for jp in 0..panels {
                let s = Src { ptr: src.ptr.add(jp * W), ..src };
                pair_rows::<W, T>(dst.add(jp * stride * W + q * W), s, 2 * q, kc, (w - jp * W).min(W));
            }
        }
    } else {
        for jp in 0..panels {
            let s = Src { ptr: src.ptr.add(jp * W * src.sx), ..src };
            pack_pairs::<W, T>(dst.add(jp * stride * W), s, (w - jp * W).min(W), kc);
        }
    }
}

/// `vdpbf16ps`, one k pair per step.
struct DotBf16;

impl Tile for DotBf16 {
    /// One step per iteration, as measured on the AMD EPYC, where bf16 products run on this kernel (on
    /// the Intel Xeon they run on AMX tiles; there this kernel ran as fast unrolled by four as not).
    const UNROLL: usize = 1;

    #[inline(always)]
    unsafe fn step<const NV: usize>(acc: &mut [[__m512; NV]; MR], a: *const f32, b: *const f32) {
        let a = a as *const i32;
        let mut bv = [std::mem::transmute::<__m512, __m512bh>(_mm512_setzero_ps()); NV];
        for (v, x) in bv.iter_mut().enumerate() {
            *x = std::mem::transmute::<__m512, __m512bh>(_mm512_load_ps(b.add(16 * v)));
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let av = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(*a.add(r)));
            for (x, &bvv) in row.iter_mut().zip(&bv) {
                *x = _mm512_dpbf16_ps(*x, av, bvv);
            }
        }
    }
}

/// [`row_of_tiles`] with the [`DotBf16`] tile.
///
/// # Safety
/// As [`row_of_tiles`], with AVX512_BF16.
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn row_of_tiles_bf16<const NV: usize>(
    steps: usize,
    ap: *const f32,
    bp: *const f32,
    n: usize,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    store: Store,
    prefetch: [(&mut Lines, usize); 2],
) {
    row_of_tiles::<NV, DotBf16>(steps, ap, bp, n, c, ldc, mr, store, prefetch)
}

/// The bf16 product of an A of `TA` and a B of `TB`.
pub(super) struct Bf16<TA, TB>(PhantomData<fn() -> (TA, TB)>);

impl<TA, TB> Bf16<TA, TB> {
    pub fn new() -> Self {
        Bf16(PhantomData)
    }
}

impl<TA: Bf16Elem, TB: Bf16Elem> Flavor for Bf16<TA, TB> {
    type A = TA;
    type B = TB;
    const K_STEP: usize = 2;
    const ROWS: usize = AW;
    const CALLS: usize = AW / MR;

    #[inline(always)]
    unsafe fn pack_a(&self, dst: *mut f32, src: Src<TA>, w: usize, kc: usize) {
        pack_pairs::<AW, TA>(dst as *mut u32, src, w, kc)
    }

    #[inline(always)]
    unsafe fn pack_b<const NR: usize>(&self, dst: *mut f32, src: Src<TB>, w: usize, kc: usize) {
        pack_pair_panels::<NR, TB>(dst as *mut u32, src, w, kc, kc.div_ceil(2))
    }

    #[inline(always)]
    unsafe fn sliver<const NV: usize>(
        &self,
        steps: usize,
        ap: *const f32,
        bp: *const f32,
        n: usize,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        store: Store,
        prefetch: [(&mut Lines, usize); 2],
    ) {
        sliver_of_panels(ap, c, ldc, rows, prefetch, |ap, c, mr, pf| {
            row_of_tiles_bf16::<NV>(steps, ap, bp, n, c, ldc, mr, store, pf)
        })
    }
}
