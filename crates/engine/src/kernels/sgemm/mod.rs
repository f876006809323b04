//! f32 matrix product for x86-64 CPUs with AVX-512F, written the BLIS way.
//!
//! `C[m, n] (= or +=) A[m, k] . B[k, n]` on strided operands:
//! - B is packed a `KC x NC` block at a time (`KC = 256`, `NC = 960`, 960 KiB: L2 holds it) into panels
//!   `NR = 48` (or 32) columns wide, `[kc][NR]` each;
//! - A is packed 16 rows at a time into a `[kc][16]` sliver (16 KiB: L1 holds it), two micro-panels of
//!   `MR = 8` rows that the micro-kernel sweeps across all the block's B panels;
//! - the `8 x NR` micro-kernel keeps its tile of C in 24 (or 16) zmm registers through the `kc` steps and
//!   then adds it to C (or overwrites C, in the first `k` block of a product that does not accumulate);
//! - packing absorbs transposes and pads edges with zeros, so the micro-kernel sees one layout; edge tiles
//!   are stored through masks;
//! - while a block runs, the source of the next block and of the next A sliver is prefetched into L2 a few
//!   lines per tile, so packing reads L2 rather than memory (the 50257-column LM head streams 154 MB); not
//!   on AMX tiles, which need the L2 for the B panels they stream (`Flavor::PREFETCH_SOURCES`).
//!
//! Threads each own a disjoint rectangle of C (a range of columns, or of rows when that packs less) and
//! run the loops above on it with their own pack buffers, kept per thread across calls. `k` is cut into
//! blocks that depend on `k` alone, and every C element is accumulated by one thread, block after block,
//! each block a fixed chain of FMAs: results are bitwise the same for any thread count and schedule.
//!
//! Measured on 2 cores of an Intel Xeon (AVX-512, 2 FMA units): 70-84% of the rate of independent FMAs
//! alone, measured in the same run (`examples/gemm_shapes.rs`; 350-400 GFLOP/s on the GPT-2-small training
//! shapes when that peak was 474), against 140-170 GFLOP/s for the `gemm` crate's AVX2 path (an earlier Xeon).
//!
//! The same driver runs the bf16 product ([`bf16_gemm`], `bf16.rs`): operands packed as bf16 k pairs,
//! one `vdpbf16ps` (32 multiply-adds) where f32 does one FMA (16), the same tiles and blocks with `KC`
//! counted in pairs (512 values of `k`; 256 measured ~3% slower, and `NC = 480` ~8% slower, on a Zen 4
//! EPYC). There, on L1-resident panels, 8 x 48 and 8 x 32 tiles both run `vdpbf16ps` at one per cycle,
//! the FMA's rate: twice the f32 multiply-adds. The f32 product can also round its operands to bf16 as
//! it packs them ([`sgemm_rounded_to_bf16`]): the bf16 product where AVX512_BF16 is missing.
//!
//! Where the CPU has AMX-BF16 tiles (and Linux grants them), the bf16 product runs on a third flavour
//! (`amx.rs`): 32 x 32 micro-tiles of four 16 x 16 accumulator tiles, `tdpbf16ps` doing 8192 multiply-adds
//! where `vdpbf16ps` does 32; same driver, blocks and determinism rule, its own packing of A (32-row
//! slivers in tile rows) and the `vdpbf16ps` pair panels for B. `DPO_GEMM` picks a slower path by hand:
//! `portable` (no AVX-512 kernel at all), `avx512_bf16` (`vdpbf16ps` even where AMX is there).

mod amx;
mod bf16;
mod kernel;
mod pack;

use std::cell::RefCell;

use rayon::prelude::*;

pub(crate) use bf16::Bf16Elem;
use kernel::{Store, AW, MR};
pub(crate) use pack::round_to_bf16_in_place;
use pack::{Lines, Src};

/// Largest `k` block, in packed steps (one `k` for f32, a pair for bf16): a `[KC][AW]` A sliver (16 KiB)
/// stays in L1 next to the B panel streaming through; longer blocks measured no faster.
const KC_MAX: usize = 256;
/// Largest column block (a multiple of both tile widths, 32 and 48): the `KC x NC` packed B block
/// (960 KiB) stays in L2 (2 MiB) beside the source of the next block, which is prefetched meanwhile.
const NC_MAX: usize = 960;
/// 32-bit words (f32, or bf16 pairs) in one thread's pack buffers: the B block, then one A sliver (the
/// AMX flavour's: 32 rows, and a 16-row staging area for its transpose).
const BUF_LEN: usize = KC_MAX * NC_MAX + KC_MAX * 3 * AW;
/// Most words of packed A slivers a task keeps for one `k` block, to pack them once for all its column
/// blocks (1280 rows by a full block: 1.3 MB in f32, 1 MB in bf16 pairs; more rows pack per column block).
const A_ONCE_MAX: usize = 1 << 19;
/// Fewest multiply-adds worth a parallel task (~25 us): waking the pool costs more below that.
const TASK_FMAS: usize = 1 << 22;

/// A strided matrix operand of `T` (f32, or bf16 bits for the bf16 kernel): element `(i, j)` is at
/// `ptr + i * rs + j * cs`.
pub(crate) struct Mat<T = f32> {
    pub ptr: *const T,
    pub rs: usize,
    pub cs: usize,
}

impl<T> Clone for Mat<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Mat<T> {}

/// Whether this kernel runs: the CPU has AVX-512F, and the environment variable `DPO_GEMM` is not
/// `portable` (which selects the `gemm` crate's kernels everywhere, to measure what this one adds or to
/// exercise the fallback on an AVX-512 machine).
pub(crate) fn available() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f") && gemm_switch() != Some("portable"))
}

/// The value of `DPO_GEMM`, which forces a slower path: `portable` (no AVX-512 kernel: the `gemm` crate,
/// and bf16 products emulated in f32), `avx512_bf16` (bf16 products on `vdpbf16ps` where the CPU also has
/// AMX). Other values, and none, leave the choice to the CPU.
fn gemm_switch() -> Option<&'static str> {
    static VALUE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    VALUE.get_or_init(|| std::env::var("DPO_GEMM").ok()).as_deref()
}

/// Whether the `vdpbf16ps` kernel can run: [`available`], and the CPU has AVX512_BF16 and AVX512BW
/// (16-bit lane moves in its packing; every CPU with AVX512_BF16 has it).
pub(crate) fn avx512_bf16_available() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        available()
            && std::arch::is_x86_feature_detected!("avx512bf16")
            && std::arch::is_x86_feature_detected!("avx512bw")
    })
}

/// Whether the AMX kernel runs: [`available`] with AVX512BW (its packing), the CPU has AMX-BF16 and the
/// OS lets this process use the tiles (`amx.rs`), and `DPO_GEMM` is not `avx512_bf16`.
pub(crate) fn amx_available() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        available()
            && std::arch::is_x86_feature_detected!("avx512bw")
            && gemm_switch() != Some("avx512_bf16")
            && amx::permitted()
    })
}

/// Whether a bf16 kernel runs ([`bf16_gemm`]): AMX tiles or `vdpbf16ps`.
pub(crate) fn bf16_available() -> bool {
    amx_available() || avx512_bf16_available()
}

/// `C[m, n] = (C if accumulate) + A[m, k] . B[k, n]`, C row-major with row stride `ldc`, on up to `tasks`
/// parallel tasks of the rayon pool (fewer for small products; 1 runs on the caller). The result does not
/// depend on `tasks`.
///
/// # Safety
/// [`available`] must be true; `a` and `b` must address every element for these sizes, C every element
/// `(i, j)` at `c + i * ldc + j`, writable and not aliased by `a` or `b`, for the duration of the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: Mat,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    tasks: usize,
) {
    gemm(F32 { round_to_bf16: false }, m, n, k, a, b, c, ldc, accumulate, tasks)
}

/// [`sgemm`] with both operands rounded to bf16 as they are packed (`quant::bf16::from_f32`): the bf16
/// product on CPUs without AVX512_BF16, in f32 arithmetic at f32 speed, without copies of the operands.
///
/// # Safety
/// As [`sgemm`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm_rounded_to_bf16(
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: Mat,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    tasks: usize,
) {
    gemm(F32 { round_to_bf16: true }, m, n, k, a, b, c, ldc, accumulate, tasks)
}

/// The bf16 product: `C[m, n] = (C if accumulate) + bf16(A)[m, k] . bf16(B)[k, n]` in f32 arithmetic,
/// each operand f32 (rounded as it is packed) or bf16 bits (taken as they are), on AMX tiles where
/// [`amx_available`], else on `vdpbf16ps`. The result does not depend on `tasks`. On `vdpbf16ps` each C
/// element is one chain of pair-wise dot products in `k` order, so neither does it depend on how `k` is
/// split into accumulating calls at even offsets; AMX groups `k` by tiles of 32.
///
/// # Safety
/// [`bf16_available`] must be true; otherwise as [`sgemm`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn bf16_gemm<TA: Bf16Elem, TB: Bf16Elem>(
    m: usize,
    n: usize,
    k: usize,
    a: Mat<TA>,
    b: Mat<TB>,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    tasks: usize,
) {
    bf16_gemm_on(amx_available(), m, n, k, a, b, c, ldc, accumulate, tasks)
}

/// [`bf16_gemm`] on AMX tiles (`amx`) or on `vdpbf16ps`.
///
/// # Safety
/// [`amx_available`] (`amx`) or [`avx512_bf16_available`] must be true; otherwise as [`sgemm`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn bf16_gemm_on<TA: Bf16Elem, TB: Bf16Elem>(
    amx: bool,
    m: usize,
    n: usize,
    k: usize,
    a: Mat<TA>,
    b: Mat<TB>,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    tasks: usize,
) {
    if amx {
        gemm(amx::Amx::<TA, TB>::new(), m, n, k, a, b, c, ldc, accumulate, tasks)
    } else {
        gemm(bf16::Bf16::<TA, TB>::new(), m, n, k, a, b, c, ldc, accumulate, tasks)
    }
}

/// One kind of product the blocked driver runs: how a sliver of each operand is packed, and the
/// micro-kernel over them. The f32 and bf16 flavours pack `[steps][W]` 32-bit words (a step is `K_STEP`
/// values of `k`) and sweep `MR`-row micro-panels; the AMX flavour packs its own tile layouts (`amx.rs`).
trait Flavor: Sync {
    /// Source element types of A and B.
    type A;
    type B;
    /// Values of `k` per packed step.
    const K_STEP: usize;
    /// `k` blocks are multiples of this but the last (whole steps, or whole tiles).
    const K_ALIGN: usize = Self::K_STEP;
    /// Rows of C per packed A sliver (a multiple of [`AW`]), the unit in which rows are split among tasks.
    const ROWS: usize;
    /// Micro-kernel calls per sliver and column tile (prefetches are spread over them).
    const CALLS: usize;
    /// Whether the micro-kernel prefetches the sources of the next B block and A sliver into L2 while it
    /// runs (so that packing them reads L2, not memory).
    const PREFETCH_SOURCES: bool = true;
    /// Packed steps of a block of `kc` values of `k`: B panels are `steps * NR` words apart.
    fn steps(kc: usize) -> usize {
        kc.div_ceil(Self::K_STEP)
    }
    /// zmm vectors per tile row for `n` columns (`NR = 16 * NV`).
    fn tile_vectors(n: usize) -> usize {
        tile_vectors(n)
    }
    /// Called once per task before its first micro-kernel, and once after its last, on its thread.
    unsafe fn begin(&self) {}
    unsafe fn end(&self) {}
    /// Packs `w <= ROWS` rows of A by `kc` values of `k` into `dst`, zero-padded.
    unsafe fn pack_a(&self, dst: *mut f32, src: Src<Self::A>, w: usize, kc: usize);
    /// Packs `w` columns of B by `kc` values of `k` into `ceil(w / NR)` panels of `steps(kc)` steps.
    unsafe fn pack_b<const NR: usize>(&self, dst: *mut f32, src: Src<Self::B>, w: usize, kc: usize);
    /// `C[0..rows, 0..n] (= or +=)` the packed sliver `ap` times the row of packed B panels `bp`.
    #[allow(clippy::too_many_arguments)]
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
    );
}

/// The sliver of the f32 and bf16 flavours: its `AW` rows as two micro-panels of `MR` rows, each swept
/// across the B panels by `row_of_tiles` (the flavour's micro-kernel).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn sliver_of_panels(
    ap: *const f32,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    prefetch: [(&mut Lines, usize); 2],
    mut row_of_tiles: impl FnMut(*const f32, *mut f32, usize, [(&mut Lines, usize); 2]),
) {
    let [(pa, na), (pb, nb)] = prefetch;
    for i2 in (0..rows).step_by(MR) {
        row_of_tiles(ap.add(i2), c.add(i2 * ldc), MR.min(rows - i2), [(&mut *pa, na), (&mut *pb, nb)]);
    }
}

/// The f32 product, its operands optionally rounded to bf16 as they are packed.
struct F32 {
    round_to_bf16: bool,
}

impl Flavor for F32 {
    type A = f32;
    type B = f32;
    const K_STEP: usize = 1;
    const ROWS: usize = AW;
    const CALLS: usize = AW / MR;

    #[inline(always)]
    unsafe fn pack_a(&self, dst: *mut f32, src: Src<f32>, w: usize, kc: usize) {
        if self.round_to_bf16 {
            pack::pack::<AW, true>(dst, src, w, kc)
        } else {
            pack::pack::<AW, false>(dst, src, w, kc)
        }
    }

    #[inline(always)]
    unsafe fn pack_b<const NR: usize>(&self, dst: *mut f32, src: Src<f32>, w: usize, kc: usize) {
        if self.round_to_bf16 {
            pack::pack_panels::<NR, true>(dst, src, w, kc)
        } else {
            pack::pack_panels::<NR, false>(dst, src, w, kc)
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
        sliver_of_panels(ap, c, ldc, rows, prefetch, |ap, c, mr, pf| {
            kernel::row_of_tiles_f32::<NV>(steps, ap, bp, n, c, ldc, mr, store, pf)
        })
    }
}

/// The blocked product of any [`Flavor`]: see the module's documentation.
///
/// # Safety
/// As [`sgemm`], with the CPU features the flavour's kernels need.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm<F: Flavor>(
    flavor: F,
    m: usize,
    n: usize,
    k: usize,
    a: Mat<F::A>,
    b: Mat<F::B>,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    tasks: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                std::ptr::write_bytes(c.add(i * ldc), 0, n);
            }
        }
        return;
    }
    let p = Problem { flavor, k, a, b, c: SendPtr(c), ldc, accumulate };
    let nv = F::tile_vectors(n);
    let tasks = tasks.min(m.saturating_mul(n).saturating_mul(k) / TASK_FMAS).max(1);
    let parts = partition(m, n, tasks, F::ROWS, 16 * nv);
    let run = |(rows, cols): (Range, Range)| {
        with_buffer(|buf| {
            // SAFETY: the caller checked the CPU and the operands; `partition` gives disjoint rectangles.
            unsafe {
                if nv == 2 {
                    p.run::<2, 32>(rows, cols, buf)
                } else {
                    p.run::<3, 48>(rows, cols, buf)
                }
            }
        })
    };
    if parts.len() == 1 {
        run((0..m, 0..n));
    } else {
        parts.into_par_iter().for_each(run);
    }
}

/// zmm vectors per tile row for `n` columns: 3 (48 columns) unless 32-column tiles pad much less.
fn tile_vectors(n: usize) -> usize {
    let used = |nr: usize| n as f64 / n.next_multiple_of(nr) as f64;
    // 8 x 32 runs ~3% slower than 8 x 48 on full tiles (more broadcasts per FMA).
    if used(32) * 0.97 > used(48) {
        2
    } else {
        3
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: tasks write disjoint elements of C through it (see `partition`).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

struct Problem<F: Flavor> {
    flavor: F,
    k: usize,
    a: Mat<F::A>,
    b: Mat<F::B>,
    c: SendPtr,
    ldc: usize,
    accumulate: bool,
}

// SAFETY: the operands are only read, and C is written in disjoint rectangles (see `sgemm`'s contract).
unsafe impl<F: Flavor> Sync for Problem<F> {}

type Range = std::ops::Range<usize>;

/// Splits C into at most `tasks` disjoint rectangles of whole tiles (`nr` columns, `mr` rows): column
/// ranges when that packs less than row ranges, else row ranges.
fn partition(m: usize, n: usize, tasks: usize, mr: usize, nr: usize) -> Vec<(Range, Range)> {
    let (mt, nt) = (m.div_ceil(mr), n.div_ceil(nr));
    let tasks = tasks.max(1);
    // Packing per multiply-add: splitting columns packs all of A once per task and column block
    // (`1 / min(n / tasks, NC)`) and B once (`1 / m`); splitting rows packs A once per column block
    // (`1 / min(n, NC)`) and all of B once per task (`tasks / m`).
    let cost_cols = 1.0 / n.div_ceil(tasks).min(NC_MAX) as f64 + 1.0 / m as f64;
    let cost_rows = 1.0 / n.min(NC_MAX) as f64 + tasks as f64 / m as f64;
    let split_cols = (nt >= tasks && cost_cols <= cost_rows) || mt < tasks;
    let (tiles, step, len) = if split_cols { (nt, nr, n) } else { (mt, mr, m) };
    let t = tasks.min(tiles);
    (0..t)
        .map(|i| {
            let r = (tiles * i / t * step)..(tiles * (i + 1) / t * step).min(len);
            if split_cols {
                (0..m, r)
            } else {
                (r, 0..n)
            }
        })
        .collect()
}

thread_local! {
    static BUF: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static A_ONCE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's buffer for the A slivers of a `k` block ([`Problem::run`]'s `a_once`): at
/// least `words` floats and a sliver's scratch of slack, 64-byte aligned, kept across calls (at most
/// [`A_ONCE_MAX`] words and the slack). `words == 0` allocates nothing.
fn with_a_buffer<R>(words: usize, f: impl FnOnce(*mut f32) -> R) -> R {
    if words == 0 {
        return f(std::ptr::null_mut());
    }
    let len = words + KC_MAX * 3 * AW + 16;
    let aligned = |v: &mut Vec<f32>| {
        if v.len() < len {
            *v = vec![0.0; len];
        }
        let off = v.as_ptr().align_offset(64);
        // SAFETY: `off < 16` and the vector holds `len` floats.
        unsafe { v.as_mut_ptr().add(off) }
    };
    A_ONCE.with(|cell| match cell.try_borrow_mut() {
        Ok(mut v) => f(aligned(&mut v)),
        Err(_) => f(aligned(&mut Vec::new())),
    })
}

/// Runs `f` on this thread's pack buffer (`BUF_LEN` floats, 64-byte aligned), allocated on first use.
fn with_buffer<R>(f: impl FnOnce(*mut f32) -> R) -> R {
    fn aligned(v: &mut Vec<f32>) -> *mut f32 {
        if v.len() < BUF_LEN + 16 {
            *v = vec![0.0; BUF_LEN + 16];
        }
        let off = v.as_ptr().align_offset(64);
        // SAFETY: `off < 16` and the vector holds `BUF_LEN + 16` floats.
        unsafe { v.as_mut_ptr().add(off) }
    }
    BUF.with(|cell| match cell.try_borrow_mut() {
        Ok(mut v) => f(aligned(&mut v)),
        // Re-entered on this thread (cannot happen today: `run` does not yield to rayon); use a fresh one.
        Err(_) => f(aligned(&mut Vec::new())),
    })
}

impl<F: Flavor> Problem<F> {
    /// The blocked loops over the rectangle `rows x cols` of C, with `8 x NR` tiles (`NR = 16 * NV`).
    ///
    /// Where the rectangle has several column blocks and its rows' A slivers for one `k` block fit
    /// [`A_ONCE_MAX`], the loops run `k` block outermost and pack those slivers once per `k` block, for
    /// all the column blocks, instead of once per column block (the LM head's 256 rows were packed 26
    /// times per product); each C element still takes its `k` blocks in order, so the bits are the same.
    ///
    /// # Safety
    /// As [`sgemm`], for this rectangle; `buf` holds `BUF_LEN` floats, 64-byte aligned.
    #[target_feature(enable = "avx512f")]
    unsafe fn run<const NV: usize, const NR: usize>(&self, rows: Range, cols: Range, buf: *mut f32) {
        debug_assert_eq!(NR, 16 * NV);
        let (k, a, b, flavor) = (self.k, self.a, self.b, &self.flavor);
        // k blocks depend on k alone (determinism), whole steps but the last; column blocks are balanced
        // multiples of NR.
        let kc_max = KC_MAX * F::K_STEP;
        let kc_step = k.div_ceil(k.div_ceil(kc_max)).next_multiple_of(F::K_ALIGN);
        let ncols = cols.len();
        let nc_step = ncols.div_ceil(ncols.div_ceil(NC_MAX)).next_multiple_of(NR);
        let (bbuf, abuf) = (buf, buf.add(KC_MAX * NC_MAX));
        let a_src = |i: usize, pc: usize| Src { ptr: a.ptr.add(i * a.rs + pc * a.cs), sx: a.rs, sp: a.cs };
        let b_src = |pc: usize, jc: usize| Src { ptr: b.ptr.add(pc * b.rs + jc * b.cs), sx: b.cs, sp: b.rs };
        let slivers = rows.len().div_ceil(F::ROWS);
        // Words of one packed A sliver of a full k block (the last block's are no longer).
        let sliver_words = F::steps(kc_step.min(k)) * F::ROWS;
        let a_once = ncols > nc_step && slivers * sliver_words <= A_ONCE_MAX;
        // Blocks in order: column block, then k block within it; k block outermost with `a_once`.
        let blocks: Vec<(usize, usize)> = if a_once {
            (0..k).step_by(kc_step).flat_map(|pc| cols.clone().step_by(nc_step).map(move |jc| (jc, pc))).collect()
        } else {
            cols.clone().step_by(nc_step).flat_map(|jc| (0..k).step_by(kc_step).map(move |pc| (jc, pc))).collect()
        };
        with_a_buffer(if a_once { slivers * sliver_words } else { 0 }, |abig| {
            flavor.begin();
            for (bi, &(jc, pc)) in blocks.iter().enumerate() {
                let nc = nc_step.min(cols.end - jc);
                let kc = kc_step.min(k - pc);
                let tiles_per_row = nc.div_ceil(NR);
                let steps = F::steps(kc);
                if a_once && jc == cols.start {
                    // This k block's slivers, in order: a sliver's scratch past its end (the AMX
                    // flavour's staging) lands on later slivers, packed after it, or on the slack.
                    for (s, i) in rows.clone().step_by(F::ROWS).enumerate() {
                        flavor.pack_a(abig.add(s * sliver_words), a_src(i, pc), F::ROWS.min(rows.end - i), kc);
                    }
                }
                flavor.pack_b::<NR>(bbuf, b_src(pc, jc), nc, kc);
                // While this block runs, the next block's B source is fetched into L2, a few lines per tile.
                let next = blocks.get(bi + 1).copied();
                let mut pf_b = match next {
                    Some((jn, pn)) if F::PREFETCH_SOURCES => {
                        Lines::of(b_src(pn, jn), nc_step.min(cols.end - jn), kc_step.min(k - pn))
                    }
                    _ => Lines::none(),
                };
                let per_tile_b = pf_b.left().div_ceil(slivers * F::CALLS * tiles_per_row);
                let store = if pc == 0 && !self.accumulate { Store::Overwrite } else { Store::Add };
                for (s, i) in rows.clone().step_by(F::ROWS).enumerate() {
                    let h = F::ROWS.min(rows.end - i);
                    let mut pf_a = if a_once {
                        Lines::none()
                    } else {
                        flavor.pack_a(abuf, a_src(i, pc), h, kc);
                        // ... and the next A sliver's source.
                        if !F::PREFETCH_SOURCES {
                            Lines::none()
                        } else if i + F::ROWS < rows.end {
                            Lines::of(a_src(i + F::ROWS, pc), F::ROWS.min(rows.end - i - F::ROWS), kc)
                        } else if let Some((_, pn)) = next {
                            Lines::of(a_src(rows.start, pn), F::ROWS.min(rows.len()), kc_step.min(k - pn))
                        } else {
                            Lines::none()
                        }
                    };
                    let ap = if a_once { abig.add(s * sliver_words) } else { abuf };
                    let per_tile_a = pf_a.left().div_ceil(F::CALLS * tiles_per_row);
                    let c = self.c.0.add(i * self.ldc + jc);
                    let prefetch = [(&mut pf_a, per_tile_a), (&mut pf_b, per_tile_b)];
                    flavor.sliver::<NV>(steps, ap, bbuf, nc, c, self.ldc, h, store, prefetch);
                }
            }
            flavor.end();
        })
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_bf16;
