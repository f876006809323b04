//! f32 matrix product for x86-64 CPUs with AVX-512F, written the BLIS way.
//!
//! `C[m, n] (= or +=) A[m, k] . B[k, n]` on strided operands:
//! - B is packed a `KC x NC` block at a time into `NR`-wide panels (`[kc][NR]` each) that stay in L2;
//! - A is packed one `MR`-tall panel (`[kc][MR]`) at a time, which stays in L1 while the micro-kernel sweeps
//!   it across the block's B panels;
//! - packing absorbs transposes and pads edges with zeros, so the micro-kernel sees one layout; edge tiles
//!   are stored through masks.
//!
//! Threads each own a disjoint rectangle of C (a range of columns, or of rows when that packs less) and
//! run the loops above on it with their own pack buffers, reused across calls. `k` is cut into blocks that
//! depend on `k` alone, and every C element is accumulated by one thread, block after block, each block a
//! fixed chain of FMAs: results are bitwise the same for any thread count and schedule.

mod kernel;
mod pack;

use std::cell::RefCell;

use rayon::prelude::*;

use kernel::{row_of_tiles, Store, MR, NR};
use pack::{pack, Src};

/// Largest `k` block: a `[KC][MR]` A panel (8 KiB) stays in L1 next to the B panel streaming through.
const KC_MAX: usize = 256;
/// Largest column block (a multiple of `NR`): the `KC x NC` packed B block (960 KiB) stays in L2 (2 MiB).
const NC_MAX: usize = 20 * NR;
/// Floats in one thread's pack buffers: the B block, then one A panel.
const BUF_LEN: usize = KC_MAX * NC_MAX + KC_MAX * MR;

/// A strided f32 matrix operand: element `(i, j)` is at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy)]
pub(crate) struct Mat {
    pub ptr: *const f32,
    pub rs: usize,
    pub cs: usize,
}

/// Whether this CPU runs the kernel.
pub(crate) fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// `C[m, n] = (C if accumulate) + A[m, k] . B[k, n]`, C row-major with row stride `ldc`, split into `tasks`
/// parallel tasks on the rayon pool (1: on the caller). The result does not depend on `tasks`.
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
    let p = Problem { k, a, b, c: SendPtr(c), ldc, accumulate };
    let parts = partition(m, n, tasks);
    if parts.len() == 1 {
        with_buffer(|buf| p.run(0..m, 0..n, buf));
    } else {
        parts.into_par_iter().for_each(|(rows, cols)| with_buffer(|buf| p.run(rows, cols, buf)));
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: tasks write disjoint elements of C through it (see `partition`).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

struct Problem {
    k: usize,
    a: Mat,
    b: Mat,
    c: SendPtr,
    ldc: usize,
    accumulate: bool,
}

// SAFETY: the operands are only read, and C is written in disjoint rectangles (see `sgemm`'s contract).
unsafe impl Sync for Problem {}

type Range = std::ops::Range<usize>;

/// Splits C into at most `tasks` disjoint rectangles of whole micro-tiles: column ranges when that packs
/// less than row ranges, else row ranges.
fn partition(m: usize, n: usize, tasks: usize) -> Vec<(Range, Range)> {
    let (mt, nt) = (m.div_ceil(MR), n.div_ceil(NR));
    let tasks = tasks.max(1);
    // Packing per multiply-add: splitting columns packs all of A once per task (`1 / (n / tasks)`) and B
    // once (`1 / m`); splitting rows packs A once per column block (`1 / min(n, NC)`) and B once per task.
    let per_col_task = n.div_ceil(tasks).min(NC_MAX) as f64;
    let cost_cols = 1.0 / per_col_task + 1.0 / m as f64;
    let cost_rows = 1.0 / n.min(NC_MAX) as f64 + tasks as f64 / m as f64;
    let split_cols = (nt >= tasks && cost_cols <= cost_rows) || mt < tasks;
    let (tiles, step, len) = if split_cols { (nt, NR, n) } else { (mt, MR, m) };
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

impl Problem {
    /// The blocked loops over the rectangle `rows x cols` of C.
    fn run(&self, rows: Range, cols: Range, buf: *mut f32) {
        // SAFETY: `sgemm`'s caller checked the CPU and the operands.
        unsafe { self.run_avx512(rows, cols, buf) }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn run_avx512(&self, rows: Range, cols: Range, buf: *mut f32) {
        let (k, a, b) = (self.k, self.a, self.b);
        // k blocks depend on k alone (determinism); column blocks are balanced multiples of NR.
        let kc_step = k.div_ceil(k.div_ceil(KC_MAX));
        let ncols = cols.len();
        let nc_step = ncols.div_ceil(ncols.div_ceil(NC_MAX)).next_multiple_of(NR);
        let (bbuf, abuf) = (buf, buf.add(KC_MAX * NC_MAX));
        for jc in cols.clone().step_by(nc_step) {
            let nc = nc_step.min(cols.end - jc);
            for (bi, pc) in (0..k).step_by(kc_step).enumerate() {
                let kc = kc_step.min(k - pc);
                let t0 = core::arch::x86_64::_rdtsc();
                for (jp, j) in (jc..jc + nc).step_by(NR).enumerate() {
                    let src = Src { ptr: b.ptr.add(pc * b.rs + j * b.cs), sx: b.cs, sp: b.rs };
                    pack::<NR>(bbuf.add(jp * kc * NR), src, NR.min(jc + nc - j), kc);
                }
                let t1 = core::arch::x86_64::_rdtsc();
                PROF[0].fetch_add(t1 - t0, std::sync::atomic::Ordering::Relaxed);
                let store = if bi == 0 && !self.accumulate { Store::Overwrite } else { Store::Add };
                for i in rows.clone().step_by(MR) {
                    let mr = MR.min(rows.end - i);
                    let src = Src { ptr: a.ptr.add(i * a.rs + pc * a.cs), sx: a.rs, sp: a.cs };
                    let t2 = core::arch::x86_64::_rdtsc();
                    pack::<MR>(abuf, src, mr, kc);
                    let t3 = core::arch::x86_64::_rdtsc();
                    PROF[1].fetch_add(t3 - t2, std::sync::atomic::Ordering::Relaxed);
                    row_of_tiles(kc, abuf, bbuf, nc, self.c.0.add(i * self.ldc + jc), self.ldc, mr, store);
                    PROF[2].fetch_add(core::arch::x86_64::_rdtsc() - t3, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;

pub static PROF: [std::sync::atomic::AtomicU64; 3] =
    [std::sync::atomic::AtomicU64::new(0), std::sync::atomic::AtomicU64::new(0), std::sync::atomic::AtomicU64::new(0)];
pub fn prof_take() -> [u64; 3] {
    [0, 1, 2].map(|i| PROF[i].swap(0, std::sync::atomic::Ordering::Relaxed))
}
