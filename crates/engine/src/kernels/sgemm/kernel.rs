//! The register-blocked micro-kernel: an `MR x NR` tile of C held in `MR * NV` zmm accumulators
//! (`NR = 16 * NV`), fed per `k` step by `NV` aligned loads of the packed B panel and `MR` broadcasts from
//! the packed A panel.
//!
//! `NV = 3` (8 x 48) is the main kernel: 24 accumulators + 3 B registers + the broadcast fit the 32 zmm
//! registers, 11 loads per 24 FMAs stay well within the load ports, and 48 divides the engine's widths
//! (768, 2304, 3072). `NV = 2` (8 x 32) serves widths such as 64 that 48 would pad by half. On L1-resident
//! panels a C copy of the 8 x 48 loop ran at 80-84% of the rate of independent FMAs alone on the Intel Xeon
//! one step per iteration, and at 90% unrolled by four (`Fma::UNROLL`). Tile width changes no result: each
//! C element is the same chain of FMAs either way.
//!
//! The loop over a row of tiles and the loads and stores of C are shared with the bf16 kernel, which
//! differs only in its inner [`Tile`] (`vdpbf16ps` on k pairs, in `bf16.rs`).

use core::arch::x86_64::*;

use super::pack::Lines;

/// Rows of a micro-tile (broadcast from packed A).
pub(super) const MR: usize = 8;
/// Rows of a packed A sliver: two micro-tiles' rows interleaved (`[kc][AW]`), so that packing a
/// row-major A transposes whole 16 x 16 blocks.
pub(super) const AW: usize = 16;

/// How the tile is written back.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Store {
    /// `C = A . B`: the FMA chains start from zero.
    Overwrite,
    /// `C += A . B`: the FMA chains start from C's value.
    Add,
}

/// One packed step of a micro-kernel: `acc[r][v] += ` the products of a step of an A micro-panel (`MR`
/// words) and of a B panel (`16 * NV` words, 64-byte aligned).
pub(super) trait Tile {
    /// Packed steps per iteration of [`tile`]'s loop.
    const UNROLL: usize;
    unsafe fn step<const NV: usize>(acc: &mut [[__m512; NV]; MR], a: *const f32, b: *const f32);
}

/// The inner loop of a micro-kernel: `acc[r][v] += ` the products of `steps` packed steps of an A
/// micro-panel (`MR` words per step, `AW` apart) and of a B panel (`16 * NV` words per step, 64-byte
/// aligned), `T::UNROLL` steps per iteration.
#[inline(always)]
unsafe fn tile<const NV: usize, T: Tile>(acc: &mut [[__m512; NV]; MR], steps: usize, a: *const f32, b: *const f32) {
    let (mut a, mut b) = (a, b);
    for _ in 0..steps / T::UNROLL {
        for i in 0..T::UNROLL {
            T::step(acc, a.add(i * AW), b.add(i * 16 * NV));
        }
        a = a.add(T::UNROLL * AW);
        b = b.add(T::UNROLL * 16 * NV);
    }
    for _ in 0..steps % T::UNROLL {
        T::step(acc, a, b);
        a = a.add(AW);
        b = b.add(16 * NV);
    }
}

/// f32 FMAs, one `k` per step.
pub(super) struct Fma;

impl Tile for Fma {
    /// Unrolled by four, whole products ran 4-12% faster on the Intel Xeon (2 x 512-bit FMA units) than
    /// one step per iteration; unrolled by two or by eight they ran slower than by four.
    const UNROLL: usize = 4;

    #[inline(always)]
    unsafe fn step<const NV: usize>(acc: &mut [[__m512; NV]; MR], a: *const f32, b: *const f32) {
        let mut bv = [_mm512_setzero_ps(); NV];
        for (v, x) in bv.iter_mut().enumerate() {
            *x = _mm512_load_ps(b.add(16 * v));
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*a.add(r));
            for (x, &bvv) in row.iter_mut().zip(&bv) {
                *x = _mm512_fmadd_ps(av, bvv, *x);
            }
        }
    }
}

/// [`row_of_tiles`] with the f32 [`Fma`] tile.
///
/// # Safety
/// As [`row_of_tiles`].
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn row_of_tiles_f32<const NV: usize>(
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
    row_of_tiles::<NV, Fma>(steps, ap, bp, n, c, ldc, mr, store, prefetch)
}

/// `C[0..mr, 0..n] (= or +=) Ap . Bp` for one packed A panel (`MR` rows at the start of a `[steps][AW]`
/// sliver) against `n.div_ceil(NR)` packed B panels (`[steps][NR]` each, consecutive, `NR = 16 * NV`),
/// C row-major with row stride `ldc`. Columns past `n` and rows past `mr` are computed from the packing's
/// zero padding and not stored.
///
/// Each C element is one chain of FMAs (or of pair dot products) in `k` order, starting from zero
/// (`Overwrite`) or from C's value (`Add`): the result depends neither on where the tile lies or which
/// thread runs it, nor on how `k` is split into blocks or into separate accumulating calls (a gradient
/// summed over tokens in one call or in several is the same number; for pairs, at even cuts).
///
/// Before each tile, `prefetch` issues that many lines of each of two sources that are packed next.
///
/// # Safety
/// The CPU features of `T`'s instructions and AVX-512F must be available (callers are `#[target_feature]`
/// wrappers, into which this inlines); `ap` addresses `steps` steps of `AW` words; `bp` holds
/// `steps * NR` words per panel and is 64-byte aligned; C addresses `mr` rows of `n` writable floats.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn row_of_tiles<const NV: usize, T: Tile>(
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
    let nr = 16 * NV;
    let tiles = n.div_ceil(nr);
    let [(pa, na), (pb, nb)] = prefetch;
    let prefetch_c = |jp: usize| {
        let cols = (n - jp * nr).min(nr);
        let ct = c.add(jp * nr);
        for r in 0..mr {
            let cr = ct.add(r * ldc);
            for v in 0..NV {
                if 16 * v < cols {
                    _mm_prefetch::<_MM_HINT_T0>(cr.add(16 * v) as *const i8);
                }
            }
            _mm_prefetch::<_MM_HINT_T0>(cr.add(cols - 1) as *const i8);
        }
    };
    if tiles > 0 {
        prefetch_c(0);
    }
    for jp in 0..tiles {
        pa.issue(na);
        pb.issue(nb);
        let cols = (n - jp * nr).min(nr);
        let ct = c.add(jp * nr);
        // The next tile of C is read (Add) or written as its k loop starts: fetch it while this one runs.
        if jp + 1 < tiles {
            prefetch_c(jp + 1);
        }
        let full = cols == nr && mr == MR;
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        if store == Store::Add {
            if full {
                load_full(&mut acc, ct, ldc);
            } else {
                load_edge(&mut acc, ct, ldc, mr, cols);
            }
        }
        tile::<NV, T>(&mut acc, steps, ap, bp.add(jp * steps * nr));
        if full {
            store_full(&acc, ct, ldc);
        } else {
            store_edge(&acc, ct, ldc, mr, cols);
        }
    }
}

/// Column masks of a tile `cols` wide: lanes `0..cols` of each of its `NV` vectors.
#[inline(always)]
fn col_masks<const NV: usize>(cols: usize) -> [u16; NV] {
    let mut masks = [0u16; NV];
    for (v, m) in masks.iter_mut().enumerate() {
        let w = cols.saturating_sub(16 * v).min(16);
        *m = ((1u32 << w) - 1) as u16;
    }
    masks
}

#[inline(always)]
unsafe fn load_full<const NV: usize>(acc: &mut [[__m512; NV]; MR], c: *const f32, ldc: usize) {
    for (r, row) in acc.iter_mut().enumerate() {
        let cr = c.add(r * ldc);
        for (v, x) in row.iter_mut().enumerate() {
            *x = _mm512_loadu_ps(cr.add(16 * v));
        }
    }
}

#[inline(always)]
unsafe fn load_edge<const NV: usize>(acc: &mut [[__m512; NV]; MR], c: *const f32, ldc: usize, mr: usize, cols: usize) {
    let masks = col_masks::<NV>(cols);
    for (r, row) in acc.iter_mut().enumerate().take(mr) {
        let cr = c.add(r * ldc);
        for (v, x) in row.iter_mut().enumerate() {
            if masks[v] != 0 {
                *x = _mm512_maskz_loadu_ps(masks[v], cr.add(16 * v));
            }
        }
    }
}

#[inline(always)]
unsafe fn store_full<const NV: usize>(acc: &[[__m512; NV]; MR], c: *mut f32, ldc: usize) {
    for (r, row) in acc.iter().enumerate() {
        let cr = c.add(r * ldc);
        for (v, &x) in row.iter().enumerate() {
            _mm512_storeu_ps(cr.add(16 * v), x);
        }
    }
}

#[inline(always)]
unsafe fn store_edge<const NV: usize>(acc: &[[__m512; NV]; MR], c: *mut f32, ldc: usize, mr: usize, cols: usize) {
    let masks = col_masks::<NV>(cols);
    for (r, row) in acc.iter().enumerate().take(mr) {
        let cr = c.add(r * ldc);
        for (v, &x) in row.iter().enumerate() {
            if masks[v] != 0 {
                _mm512_mask_storeu_ps(cr.add(16 * v), masks[v], x);
            }
        }
    }
}
