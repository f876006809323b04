//! The register-blocked micro-kernel: an `MR x NR` tile of C held in `MR * NV` zmm accumulators
//! (`NR = 16 * NV`), fed per `k` step by `NV` aligned loads of the packed B panel and `MR` broadcasts from
//! the packed A panel. 8 x 48 uses 24 accumulators + 3 B registers, leaving room for the broadcast, and
//! needs 11 loads per 24 FMAs, well within the two load ports; it divides the engine's widths (768, 3072,
//! 256, 1024 rows) with no edge waste.

use core::arch::x86_64::*;

/// Rows of a micro-tile (broadcast from packed A).
pub(super) const MR: usize = 8;
/// zmm vectors across a micro-tile.
pub(super) const NV: usize = 3;
/// Columns of a micro-tile (loaded from packed B).
pub(super) const NR: usize = 16 * NV;

/// How the tile is written back.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Store {
    /// `C = tile`.
    Overwrite,
    /// `C += tile`.
    Add,
}

/// `C[0..mr, 0..n] (= or +=) Ap . Bp` for one packed A panel (`[kc][MR]`) against `n.div_ceil(NR)` packed B
/// panels (`[kc][NR]` each, consecutive), C row-major with row stride `ldc`. Columns past `n` and rows past
/// `mr` are computed from the packing's zero padding and not stored.
///
/// Each C element is one chain of FMAs in `k` order from zero, added to C at the end: the result does not
/// depend on where the tile lies or on which thread runs it.
///
/// # Safety
/// AVX-512F must be available; `ap` holds `kc * MR` floats, `bp` holds `kc * NR` floats per panel and is
/// 64-byte aligned; C addresses `mr` rows of `n` writable floats.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn row_of_tiles(
    kc: usize,
    ap: *const f32,
    bp: *const f32,
    n: usize,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    store: Store,
) {
    let panels = n.div_ceil(NR);
    for jp in 0..panels {
        let b = bp.add(jp * kc * NR);
        let cols = (n - jp * NR).min(NR);
        let ct = c.add(jp * NR);
        // Fetch the tile of C while the k loop runs: it is read only at the end.
        for r in 0..mr {
            let cr = ct.add(r * ldc);
            _mm_prefetch::<_MM_HINT_T0>(cr as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(cr.add(cols - 1) as *const i8);
            if cols > 16 {
                _mm_prefetch::<_MM_HINT_T0>(cr.add(16) as *const i8);
            }
            if cols > 32 {
                _mm_prefetch::<_MM_HINT_T0>(cr.add(32) as *const i8);
            }
        }
        let acc = tile(kc, ap, b);
        if cols == NR && mr == MR {
            store_full(&acc, ct, ldc, store);
        } else {
            store_edge(&acc, ct, ldc, mr, cols, store);
        }
    }
}

#[inline(always)]
unsafe fn tile(kc: usize, a: *const f32, b: *const f32) -> [[__m512; NV]; MR] {
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
        a = a.add(MR);
        b = b.add(NR);
    }
    acc
}

#[inline(always)]
unsafe fn store_full(acc: &[[__m512; NV]; MR], c: *mut f32, ldc: usize, store: Store) {
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
unsafe fn store_edge(acc: &[[__m512; NV]; MR], c: *mut f32, ldc: usize, mr: usize, cols: usize, store: Store) {
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
