//! The register-blocked micro-kernel: an `MR x NR` tile of C held in `MR * NV` zmm accumulators
//! (`NR = 16 * NV`), fed per `k` step by `NV` aligned loads of the packed B panel and `MR` broadcasts from
//! the packed A panel.
//!
//! `NV = 3` (8 x 48) is the main kernel: 24 accumulators + 3 B registers + the broadcast fit the 32 zmm
//! registers, 11 loads per 24 FMAs stay well within the load ports, and 48 divides the engine's widths
//! (768, 2304, 3072). `NV = 2` (8 x 32) serves widths such as 64 that 48 would pad by half; both reach
//! ~97% of the FMA peak on L1-resident panels. Tile width changes no result: each C element is the same
//! chain of FMAs either way.

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
    /// `C = tile`.
    Overwrite,
    /// `C += tile`.
    Add,
}

/// `C[0..mr, 0..n] (= or +=) Ap . Bp` for one packed A panel (`MR` rows at the start of a `[kc][AW]`
/// sliver) against `n.div_ceil(NR)` packed B panels (`[kc][NR]` each, consecutive, `NR = 16 * NV`), C
/// row-major with row stride `ldc`. Columns past `n` and rows past `mr` are computed from the packing's
/// zero padding and not stored.
///
/// Each C element is one chain of FMAs in `k` order from zero, added to C at the end: the result does not
/// depend on where the tile lies or on which thread runs it.
///
/// Before each tile, `prefetch` issues that many lines of each of two sources that are packed next.
///
/// # Safety
/// AVX-512F must be available; `ap` addresses `kc` steps of `AW` floats; `bp` holds `kc * NR` floats per
/// panel and is 64-byte aligned; C addresses `mr` rows of `n` writable floats.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn row_of_tiles<const NV: usize>(
    kc: usize,
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
    let [(pa, na), (pb, nb)] = prefetch;
    for jp in 0..n.div_ceil(nr) {
        pa.issue(na);
        pb.issue(nb);
        let cols = (n - jp * nr).min(nr);
        let ct = c.add(jp * nr);
        // Fetch the tile of C while the k loop runs: it is read only at the end.
        for r in 0..mr {
            let cr = ct.add(r * ldc);
            for v in 0..NV {
                if 16 * v < cols {
                    _mm_prefetch::<_MM_HINT_T0>(cr.add(16 * v) as *const i8);
                }
            }
            _mm_prefetch::<_MM_HINT_T0>(cr.add(cols - 1) as *const i8);
        }
        let acc = tile::<NV>(kc, ap, bp.add(jp * kc * nr));
        if cols == nr && mr == MR {
            store_full(&acc, ct, ldc, store);
        } else {
            store_edge(&acc, ct, ldc, mr, cols, store);
        }
    }
}

#[inline(always)]
unsafe fn tile<const NV: usize>(kc: usize, a: *const f32, b: *const f32) -> [[__m512; NV]; MR] {
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    let (mut a, mut b) = (a, b);
    for _ in 0..kc {
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
        a = a.add(AW);
        b = b.add(16 * NV);
    }
    acc
}

#[inline(always)]
unsafe fn store_full<const NV: usize>(acc: &[[__m512; NV]; MR], c: *mut f32, ldc: usize, store: Store) {
    for (r, row) in acc.iter().enumerate() {
        let cr = c.add(r * ldc);
        for (v, &x) in row.iter().enumerate() {
            let p = cr.add(16 * v);
            let y = if store == Store::Add { _mm512_add_ps(_mm512_loadu_ps(p), x) } else { x };
            _mm512_storeu_ps(p, y);
        }
    }
}

#[inline(always)]
unsafe fn store_edge<const NV: usize>(
    acc: &[[__m512; NV]; MR],
    c: *mut f32,
    ldc: usize,
    mr: usize,
    cols: usize,
    store: Store,
) {
    let mut masks = [0u16; NV];
    for (v, m) in masks.iter_mut().enumerate() {
        let w = cols.saturating_sub(16 * v).min(16);
        *m = ((1u32 << w) - 1) as u16;
    }
    for (r, row) in acc.iter().enumerate().take(mr) {
        let cr = c.add(r * ldc);
        for (v, &x) in row.iter().enumerate() {
            if masks[v] == 0 {
                break;
            }
            let p = cr.add(16 * v);
            let y = if store == Store::Add { _mm512_add_ps(_mm512_maskz_loadu_ps(masks[v], p), x) } else { x };
            _mm512_mask_storeu_ps(p, masks[v], y);
        }
    }
}
