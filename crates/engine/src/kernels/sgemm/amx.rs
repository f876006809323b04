//! The bf16 product on AMX tiles (`tdpbf16ps`, Intel Sapphire Rapids and later): a third flavour of the
//! blocked driver, beside the f32 kernel and the `vdpbf16ps` one.
//!
//! `tdpbf16ps C, A, B` multiplies a tile of A (16 rows of 16 bf16 pairs along `k`, 64 bytes a row) by a
//! tile of B in pair layout (16 rows, one per `k` pair, of 16 column pair words) into a 16 x 16 f32 tile
//! of C: 8192 multiply-adds per instruction, against 32 for `vdpbf16ps`. The micro-tile is 32 x 32 of C,
//! four accumulator tiles (`tmm0..tmm3`) fed by two A tiles (`tmm4`, `tmm5`) and two B tiles (`tmm6`,
//! `tmm7`) per 32 values of `k`: the eight tile registers.
//!
//! Packing (operands rounded to bf16 exactly as the `vdpbf16ps` flavour rounds them, stored bf16 bits
//! taken as they are):
//! - B: the `vdpbf16ps` flavour's pair panels, 32 columns wide (two B tiles side by side, rows 128 bytes
//!   apart), each panel's steps padded with zero pairs to a multiple of 16 (whole tiles);
//! - A: 32-row slivers as two halves of 16 rows, each `[k tile][16 rows][16 pair words]` (one A tile per
//!   1 KiB, rows 64 bytes apart), made from the pair packing (`[steps][16 rows]`) by 16 x 16 transposes.
//!
//! Tiles are configured (`ldtilecfg`) by each task on its own thread before its first tile instruction
//! and released after its last: the configuration is per thread, and released tiles cost nothing to a
//! context switch. Using them needs the kernel's permission (Linux 5.16+): asked for once per process.
//!
//! Numerics: products of two bf16 are exact in f32, sums are f32, denormal inputs are read as zero and
//! denormal results flushed (as `vdpbf16ps`, and as the engine's threads do anyway). `k` blocks depend on
//! `k` alone and are whole tiles but the last, whose padding adds zero products; each C element is one
//! sequence of tile steps, starting from zero or from C, whatever the thread count or the place of its
//! tile, so the result does not depend on the thread count.

use core::arch::asm;
use core::arch::x86_64::*;
use std::marker::PhantomData;

use super::bf16::{pack_pair_panels, pack_pairs, Bf16Elem};
use super::kernel::{Store, AW};
use super::pack::{transpose16, Lines, Src};
use super::{Flavor, KC_MAX};

/// Rows (and columns) of C per tile.
const T: usize = 16;
/// Steps (`k` pairs) per tile, and 32-bit words per tile row.
const TK: usize = 16;
/// Rows of C per micro-tile and per A sliver: two A tiles.
const ROWS: usize = 2 * T;
/// Columns of C per micro-tile and per B panel: two B tiles.
const COLS: usize = 2 * T;

/// Whether this process may use AMX-BF16 tiles: the CPU has AMX-TILE and AMX-BF16, and Linux grants the
/// tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, asked for once; refused on
/// kernels before 5.16, or when a thread's signal stack is too small for the state).
pub(super) fn permitted() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        // SAFETY: CPUID leaf 7 exists on every x86-64 CPU that has AVX-512 (callers check that first).
        let edx = __cpuid_count(7, 0).edx;
        let (amx_bf16, amx_tile) = (edx & (1 << 22) != 0, edx & (1 << 24) != 0);
        amx_bf16 && amx_tile && request_tile_data()
    })
}

/// Asks Linux for the tile data state for this process (all its threads); true once it is granted.
#[cfg(target_os = "linux")]
fn request_tile_data() -> bool {
    const SYS_ARCH_PRCTL: usize = 158;
    const ARCH_GET_XCOMP_PERM: usize = 0x1022;
    const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
    const XFEATURE_XTILEDATA: usize = 18;
    // SAFETY: `arch_prctl` reads its arguments and writes only the u64 the GET form points to.
    let call = |code: usize, arg: usize| -> isize {
        let ret: isize;
        unsafe {
            asm!("syscall", inlateout("rax") SYS_ARCH_PRCTL as isize => ret, in("rdi") code, in("rsi") arg,
                 lateout("rcx") _, lateout("r11") _, options(nostack));
        }
        ret
    };
    let granted = || {
        let mut bits = 0u64;
        call(ARCH_GET_XCOMP_PERM, &mut bits as *mut u64 as usize) == 0 && bits & (1 << XFEATURE_XTILEDATA) != 0
    };
    granted() || (call(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 && granted())
}

#[cfg(not(target_os = "linux"))]
fn request_tile_data() -> bool {
    false
}

/// The tile configuration (palette 1): all eight tiles 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

static CONFIG: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1; // palette
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64; // bytes per row (u16, little-endian)
        c[48 + t] = T as u8; // rows
        t += 1;
    }
    TileConfig(c)
};

macro_rules! tile_load {
    ($t:literal, $ptr:expr, $stride:expr) => {
        asm!(concat!("tileloadd tmm", $t, ", [{p} + {s}*1]"), p = in(reg) $ptr, s = in(reg) $stride,
             options(nostack, readonly))
    };
}
macro_rules! tile_store {
    ($t:literal, $ptr:expr, $stride:expr) => {
        asm!(concat!("tilestored [{p} + {s}*1], tmm", $t), p = in(reg) $ptr, s = in(reg) $stride, options(nostack))
    };
}
macro_rules! tile_zero {
    ($t:literal) => {
        asm!(concat!("tilezero tmm", $t), options(nomem, nostack))
    };
}
macro_rules! tile_dot {
    ($c:literal, $a:literal, $b:literal) => {
        asm!(concat!("tdpbf16ps tmm", $c, ", tmm", $a, ", tmm", $b), options(nomem, nostack))
    };
}

/// The bf16 product of an A of `TA` and a B of `TB` on AMX tiles.
pub(super) struct Amx<TA, TB>(PhantomData<fn() -> (TA, TB)>);

impl<TA, TB> Amx<TA, TB> {
    pub fn new() -> Self {
        Amx(PhantomData)
    }
}

impl<TA: Bf16Elem, TB: Bf16Elem> Flavor for Amx<TA, TB> {
    type A = TA;
    type B = TB;
    const K_STEP: usize = 2;
    const K_ALIGN: usize = 2 * TK;
    const ROWS: usize = ROWS;
    const CALLS: usize = 1;
    // The tiles stream their B panels (a 960 KiB block) from L2, which bounds this loop at about half the
    // tile rate already; up to 1.9 MB of the next block's f32 source fetched into the same 2 MiB L2 evicts
    // the panels being read (SmolLM2-360M shapes on a Xeon: 1.3-1.6 TFLOP/s with the prefetch, 1.7-2.0
    // without; packing then reads memory, behind the hardware prefetchers).
    const PREFETCH_SOURCES: bool = false;

    fn steps(kc: usize) -> usize {
        kc.div_ceil(2 * TK) * TK
    }

    fn tile_vectors(_n: usize) -> usize {
        COLS / 16
    }

    unsafe fn begin(&self) {
        asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly));
    }

    unsafe fn end(&self) {
        asm!("tilerelease", options(nostack, nomem));
    }

    #[inline(always)]
    unsafe fn pack_a(&self, dst: *mut f32, src: Src<TA>, w: usize, kc: usize) {
        pack_a_tiles(dst as *mut u32, src, w, kc)
    }

    #[inline(always)]
    unsafe fn pack_b<const NR: usize>(&self, dst: *mut f32, src: Src<TB>, w: usize, kc: usize) {
        debug_assert_eq!(NR, COLS);
        let (steps, real) = (Self::steps(kc), kc.div_ceil(2));
        let dst = dst as *mut u32;
        pack_pair_panels::<COLS, TB>(dst, src, w, kc, steps);
        for jp in 0..w.div_ceil(COLS) {
            std::ptr::write_bytes(dst.add((jp * steps + real) * COLS), 0, (steps - real) * COLS);
        }
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
        debug_assert_eq!(16 * NV, COLS);
        sliver_tiles(steps / TK, ap as *const u8, bp as *const u8, n, c, ldc, rows, store, prefetch)
    }
}

/// Packs `w <= 32` rows of A by `kc` values of `k` into `[half][k tile][16 rows][16 pair words]` (halves
/// of 16 rows; only the halves that have rows), zero-padded to whole tiles: rows contiguous along `k`
/// directly, other layouts through the pair packing and a transpose.
///
/// # Safety
/// As [`pack_pairs`]; `dst` is 64-byte aligned and holds `KC_MAX * 3 * AW` words (the tiles, then the
/// staging area of the pair packing).
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn pack_a_tiles<TA: Bf16Elem>(dst: *mut u32, src: Src<TA>, w: usize, kc: usize) {
    let (real, tiles) = (kc.div_ceil(2), kc.div_ceil(2 * TK));
    if src.sp == 1 {
        // Rows contiguous along k (A stored `[m, k]`): 32 values are one tile row, no transpose.
        for x in 0..w.div_ceil(T) * T {
            let row = src.ptr.wrapping_add(x * src.sx);
            let half = dst.add(x / T * tiles * T * TK);
            for t in 0..tiles {
                let count = if x < w { (kc - t * 2 * TK).min(2 * TK) } else { 0 };
                let v = TA::load_pairs(row.wrapping_add(t * 2 * TK), count);
                _mm512_store_si512(half.add((t * T + x % T) * TK) as *mut _, v);
            }
        }
        return;
    }
    let stage = dst.add(2 * AW * KC_MAX);
    for h in 0..w.div_ceil(T) {
        let s = Src { ptr: src.ptr.add(h * T * src.sx), ..src };
        pack_pairs::<T, TA>(stage, s, (w - h * T).min(T), kc);
        let half = dst.add(h * tiles * T * TK);
        for t in 0..tiles {
            // Steps 16 t.. of the 16 rows, then transposed: row x's 16 pair words, one tile row.
            let mut r = [_mm512_setzero_ps(); 16];
            for (q, rq) in r.iter_mut().enumerate() {
                if t * TK + q < real {
                    *rq = _mm512_loadu_ps(stage.add((t * TK + q) * T) as *const f32);
                }
            }
            transpose16(&mut r);
            for (x, &rx) in r.iter().enumerate() {
                _mm512_store_ps(half.add((t * T + x) * TK) as *mut f32, rx);
            }
        }
    }
}

/// `C[0..rows, 0..n] (= or +=)` the packed A sliver (`tiles` k tiles per half) times the B panels,
/// 32 x 32 micro-tiles (32 x 16 when `rows <= 16`); edge micro-tiles go through a zero-padded copy.
///
/// # Safety
/// The tiles are configured on this thread ([`Flavor::begin`]); `ap` and `bp` as packed above for these
/// sizes; C addresses `rows` rows of `n` writable floats, `ldc` apart.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn sliver_tiles(
    tiles: usize,
    ap: *const u8,
    bp: *const u8,
    n: usize,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    store: Store,
    prefetch: [(&mut Lines, usize); 2],
) {
    let [(pa, na), (pb, nb)] = prefetch;
    let panels = n.div_ceil(COLS);
    // Bytes: an A tile, a k tile of a B panel (16 steps of 32 words), a B panel.
    let (a_tile, b_tile) = (T * TK * 4, TK * COLS * 4);
    let b_panel = tiles * b_tile;
    let a1 = ap.add(tiles * a_tile);
    let mut edge = Edge([0.0; ROWS * COLS]);
    let prefetch_c = |jp: usize| {
        let ct = c.add(jp * COLS);
        let last = (n - jp * COLS).min(COLS) - 1;
        for r in 0..rows.min(ROWS) {
            _mm_prefetch::<_MM_HINT_T0>(ct.add(r * ldc) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(ct.add(r * ldc + last) as *const i8);
        }
    };
    prefetch_c(0);
    for jp in 0..panels {
        pa.issue(na);
        pb.issue(nb);
        if jp + 1 < panels {
            prefetch_c(jp + 1);
        }
        let cols = (n - jp * COLS).min(COLS);
        let ct = c.add(jp * COLS);
        let b = bp.add(jp * b_panel);
        let two = rows > T;
        let full = cols == COLS && rows >= ROWS;
        // C's tiles: straight from C, or from a zero-padded copy of its edge.
        let (cp, cs) = if full {
            (ct, ldc * 4)
        } else {
            if store == Store::Add {
                edge.0.fill(0.0);
                for r in 0..rows {
                    std::ptr::copy_nonoverlapping(ct.add(r * ldc), edge.0.as_mut_ptr().add(r * COLS), cols);
                }
            }
            (edge.0.as_mut_ptr(), COLS * 4)
        };
        let (c0, c1, c2, c3) = (
            cp as *const u8,
            cp.add(T) as *const u8,
            cp.add(T * cs / 4) as *const u8,
            cp.add(T * cs / 4 + T) as *const u8,
        );
        if store == Store::Add {
            tile_load!(0, c0, cs);
            tile_load!(1, c1, cs);
            if two {
                tile_load!(2, c2, cs);
                tile_load!(3, c3, cs);
            }
        } else {
            tile_zero!(0);
            tile_zero!(1);
            tile_zero!(2);
            tile_zero!(3);
        }
        for t in 0..tiles {
            let bt = b.add(t * b_tile);
            tile_load!(4, ap.add(t * a_tile), 64usize);
            tile_load!(6, bt, COLS * 4);
            tile_load!(7, bt.add(T * 4), COLS * 4);
            tile_dot!(0, 4, 6);
            tile_dot!(1, 4, 7);
            if two {
                tile_load!(5, a1.add(t * a_tile), 64usize);
                tile_dot!(2, 5, 6);
                tile_dot!(3, 5, 7);
            }
        }
        tile_store!(0, c0, cs);
        tile_store!(1, c1, cs);
        if two {
            tile_store!(2, c2, cs);
            tile_store!(3, c3, cs);
        }
        if !full {
            for r in 0..rows {
                std::ptr::copy_nonoverlapping(edge.0.as_ptr().add(r * COLS), ct.add(r * ldc), cols);
            }
        }
    }
}

/// A zero-padded copy of an edge micro-tile of C, `[32][32]`.
#[repr(C, align(64))]
struct Edge([f32; ROWS * COLS]);
