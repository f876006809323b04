//! Matrix products on strided operands, so transposed operands cost nothing, and the linear layer built on
//! them. On CPUs with AVX-512F the products run on this crate's own kernel ([`super::sgemm`]: the `gemm`
//! crate only uses AVX2 on stable Rust, half the FMA width); elsewhere, and for shapes too thin for that
//! kernel's tiles, through the `gemm` crate.
//!
//! bf16 products ([`Precision::Bf16`]) run, in order of preference, on a bf16 kernel (AMX tiles where the
//! CPU has AMX-BF16, else `vdpbf16ps` where it has AVX512_BF16; see [`super::precision::Bf16Kernel`]), on
//! the f32 kernel rounding its operands as it packs them (AVX-512F), or on rounded copies of the operands
//! through the `gemm` crate. All compute the product of the bf16-rounded operands in f32 arithmetic; they
//! differ only in how the sums are grouped.

use rayon::prelude::*;

use super::act::{rows_per_task, CHUNK};
use super::precision::Precision;
use super::threads::num_threads;

/// Products with more multiply-adds than this use the thread pool; smaller ones run on the caller.
const PAR_FLOPS: usize = 1 << 18;

fn parallelism(m: usize, n: usize, k: usize) -> gemm::Parallelism {
    let threads = num_threads();
    if threads > 1 && m.saturating_mul(n).saturating_mul(k) > PAR_FLOPS {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}

/// Whether a product of these sizes runs on the AVX-512 kernel: the CPU has it, and the product is not so
/// thin (fewer than 4 rows or 32 columns: vector-matrix products, decoding) or small that its `8 x 48`
/// tiles, mostly padding, or its packing would lose to the `gemm` crate (measured).
#[cfg(target_arch = "x86_64")]
fn use_sgemm(m: usize, n: usize, k: usize) -> bool {
    m >= 4 && n >= 32 && m.saturating_mul(n).saturating_mul(k) > 1 << 15 && super::sgemm::available()
}

/// Whether a bf16 product of these sizes runs on a bf16 kernel: the shapes of [`use_sgemm`] (the kernels
/// share the blocked driver), on a CPU with AVX512_BF16 or AMX-BF16.
#[cfg(target_arch = "x86_64")]
pub(crate) fn use_bf16_kernel(m: usize, n: usize, k: usize) -> bool {
    #[cfg(test)]
    if tests::EMULATE_BF16.get() {
        return false;
    }
    use_sgemm(m, n, k) && super::sgemm::bf16_available()
}

/// A strided view of a matrix operand of f32 (or of bf16 bits, `u16`, for [`bf16_stored_gemm`]): element
/// `(i, j)` is at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy)]
pub(crate) struct View<T = f32> {
    pub ptr: *const T,
    pub rs: isize,
    pub cs: isize,
}

/// `dst[m, n] = (dst if accumulate) + alpha * lhs[m, k] . rhs[k, n]` on strided views, single-threaded
/// unless `parallel`, with the operands rounded as `prec` says.
///
/// # Safety
/// Every element the views address for these sizes must be in bounds (and `dst`'s writable, not aliased
/// by `lhs` or `rhs`) for the duration of the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_view(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    dst_cs: isize,
    accumulate: bool,
    lhs: View,
    rhs: View,
    alpha: f32,
    parallel: bool,
    prec: Precision,
) {
    #[cfg(target_arch = "x86_64")]
    if dst_cs == 1 && alpha == 1.0 && use_sgemm(m, n, k) {
        let strides = [dst_rs, lhs.rs, lhs.cs, rhs.rs, rhs.cs];
        if strides.iter().all(|&s| s >= 0) {
            use super::sgemm;
            let mat = |v: View| sgemm::Mat { ptr: v.ptr, rs: v.rs as usize, cs: v.cs as usize };
            let (a, b, ldc) = (mat(lhs), mat(rhs), dst_rs as usize);
            let tasks = if parallel { num_threads() } else { 1 };
            match prec {
                Precision::F32 => sgemm::sgemm(m, n, k, a, b, dst, ldc, accumulate, tasks),
                Precision::Bf16 if use_bf16_kernel(m, n, k) => {
                    sgemm::bf16_gemm(m, n, k, a, b, dst, ldc, accumulate, tasks)
                }
                Precision::Bf16 => sgemm::sgemm_rounded_to_bf16(m, n, k, a, b, dst, ldc, accumulate, tasks),
            }
            return;
        }
    }
    if prec == Precision::Bf16 {
        return bf16_emulated(m, n, k, dst, dst_rs, dst_cs, accumulate, lhs, rhs, alpha, parallel);
    }
    let par = if parallel { parallelism(m, n, k) } else { gemm::Parallelism::None };
    // gemm computes dst := a * dst + b * lhs . rhs; `a` is ignored when dst is not read.
    gemm::gemm(
        m, n, k, dst, dst_cs, dst_rs, accumulate, lhs.ptr, lhs.cs, lhs.rs, rhs.ptr, rhs.cs, rhs.rs, 1.0, alpha, false,
        false, false, par,
    );
}

/// [`gemm_view`] in bf16 where neither AVX-512 kernel takes the product (thin shapes, `alpha != 1`,
/// negative strides, CPUs without AVX-512F): the `gemm` crate's f32 product on rounded copies of both
/// operands.
#[allow(clippy::too_many_arguments)]
unsafe fn bf16_emulated(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    dst_cs: isize,
    accumulate: bool,
    lhs: View,
    rhs: View,
    alpha: f32,
    parallel: bool,
) {
    // Copied in the source's order (rows where they are contiguous; columns where those are, as a
    // transposed operand's), then rounded in one vectorised pass: the values of rounding one by one.
    let round = |v: View, rows: usize, cols: usize| -> Vec<f32> {
        let mut out = vec![0.0f32; rows * cols];
        if v.rs == 1 && v.cs != 1 {
            for j in 0..cols {
                let col = v.ptr.offset(j as isize * v.cs);
                for (i, x) in std::slice::from_raw_parts(col, rows).iter().enumerate() {
                    out[i * cols + j] = *x;
                }
            }
        } else {
            for (i, row) in out.chunks_exact_mut(cols.max(1)).enumerate() {
                let src = v.ptr.offset(i as isize * v.rs);
                if v.cs == 1 {
                    row.copy_from_slice(std::slice::from_raw_parts(src, cols));
                } else {
                    row.iter_mut().enumerate().for_each(|(j, x)| *x = *src.offset(j as isize * v.cs));
                }
            }
        }
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if super::sgemm::available() {
            done = super::sgemm::round_to_bf16_in_place(&mut out);
        }
        crate::quant::bf16::round_in_place(&mut out[done..]);
        out
    };
    let (a, b) = (round(lhs, m, k), round(rhs, k, n));
    let a_view = View { ptr: a.as_ptr(), rs: k as isize, cs: 1 };
    let b_view = View { ptr: b.as_ptr(), rs: n as isize, cs: 1 };
    gemm_view(m, n, k, dst, dst_rs, dst_cs, accumulate, a_view, b_view, alpha, parallel, Precision::F32);
}

/// `dst[m, n] = (dst if accumulate) + lhs[m, k] . rhs[k, n]` in bf16 where `rhs` is stored in bf16 (a
/// frozen weight): its bits are packed as they are, no widened copy, the same numbers as widening it and
/// calling [`gemm_view`] with [`Precision::Bf16`]. Returns false, having done nothing, where the bf16
/// kernel does not take the product (the caller then widens).
///
/// # Safety
/// As [`gemm_view`], with `dst`'s columns contiguous.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn bf16_stored_gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    accumulate: bool,
    lhs: View,
    rhs: View<u16>,
    parallel: bool,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if use_bf16_kernel(m, n, k) && [dst_rs, lhs.rs, lhs.cs, rhs.rs, rhs.cs].iter().all(|&s| s >= 0) {
        use super::sgemm::{bf16_gemm, Mat};
        let a = Mat { ptr: lhs.ptr, rs: lhs.rs as usize, cs: lhs.cs as usize };
        let b = Mat { ptr: rhs.ptr, rs: rhs.rs as usize, cs: rhs.cs as usize };
        let tasks = if parallel { num_threads() } else { 1 };
        bf16_gemm(m, n, k, a, b, dst, dst_rs as usize, accumulate, tasks);
        return true;
    }
    let _ = (m, n, k, dst, dst_rs, accumulate, lhs, rhs, parallel);
    false
}

/// `C[m, n] (= or +=, per acc) op(A) . op(B)`. `A` is stored `[m, k]` (`[k, m]` when `a_t`), `B` is
/// stored `[k, n]` (`[n, k]` when `b_t`). Uses the thread pool for large products.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    n: usize,
    k: usize,
    a_t: bool,
    b_t: bool,
    acc: Accumulate,
    prec: Precision,
) {
    assert_eq!(c.len(), m * n, "matmul: C is not [m, n]");
    assert_eq!(a.len(), m * k, "matmul: A has the wrong size");
    assert_eq!(b.len(), k * n, "matmul: B has the wrong size");
    if m == 0 || n == 0 {
        return;
    }
    let (m_, n_, k_) = (m as isize, n as isize, k as isize);
    let lhs = if a_t { View { ptr: a.as_ptr(), rs: 1, cs: m_ } } else { View { ptr: a.as_ptr(), rs: k_, cs: 1 } };
    let rhs = if b_t { View { ptr: b.as_ptr(), rs: 1, cs: k_ } } else { View { ptr: b.as_ptr(), rs: n_, cs: 1 } };
    // SAFETY: the lengths were checked against the shapes, `c` is borrowed mutably and so not aliased.
    unsafe { gemm_view(m, n, k, c.as_mut_ptr(), n_, 1, acc == Accumulate::Add, lhs, rhs, 1.0, true, prec) };
}

/// A row-major matrix of `ld` floats per row, of which a product reads or writes the columns from `col`
/// on: a block of columns of a wider matrix (one LoRA module's rows of a fused projection's output).
#[derive(Clone, Copy, Debug)]
pub struct Cols<'a> {
    pub data: &'a [f32],
    pub ld: usize,
    pub col: usize,
}

impl<'a> Cols<'a> {
    /// A whole contiguous matrix of `ld` columns.
    pub fn all(data: &'a [f32], ld: usize) -> Self {
        Cols { data, ld, col: 0 }
    }

    /// Panics, naming `what`, unless the `rows x cols` block from column `col` lies inside `data`.
    pub(crate) fn assert_holds(self, rows: usize, cols: usize, what: &str) {
        let in_bounds = rows == 0
            || cols == 0
            || (self.col + cols <= self.ld && (rows - 1) * self.ld + self.col + cols <= self.data.len());
        assert!(in_bounds, "{what}: block [{rows}, {cols}] at column {} is outside [_, {}]", self.col, self.ld);
    }

    /// The view of the `rows x cols` block from column `col` (transposed: read as `cols x rows`), after
    /// checking it lies inside `data`.
    fn view(self, rows: usize, cols: usize, transposed: bool, what: &str) -> View {
        self.assert_holds(rows, cols, &format!("matmul_cols: {what}"));
        let ptr = self.data[self.col.min(self.data.len())..].as_ptr();
        let ld = self.ld as isize;
        if transposed {
            View { ptr, rs: 1, cs: ld }
        } else {
            View { ptr, rs: ld, cs: 1 }
        }
    }
}

/// [`matmul`] on blocks of columns: `C[m, n] (= or +=, per acc) alpha · op(A) . op(B)` where `C` is the
/// columns `c_col..c_col + n` of the row-major `[m, c_ld]` matrix `c`, `op(A)` is `[m, k]` (`A` stored
/// `[k, m]` when `a_t`) and `op(B)` is `[k, n]` (`B` stored `[n, k]` when `b_t`). Uses the thread pool for
/// large products.
#[allow(clippy::too_many_arguments)]
pub fn matmul_cols(
    c: &mut [f32],
    c_ld: usize,
    c_col: usize,
    a: Cols,
    a_t: bool,
    b: Cols,
    b_t: bool,
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    acc: Accumulate,
    prec: Precision,
) {
    if m == 0 || n == 0 {
        return;
    }
    Cols { data: c, ld: c_ld, col: c_col }.view(m, n, false, "C");
    let lhs = if a_t { a.view(k, m, true, "A") } else { a.view(m, k, false, "A") };
    let rhs = if b_t { b.view(n, k, true, "B") } else { b.view(k, n, false, "B") };
    // SAFETY: every block was checked to lie inside its slice (C's just above, so `c_col < c.len()`); `c`
    // is borrowed mutably, so not aliased by `a` or `b`, and `dst` derives from that exclusive borrow.
    unsafe {
        let dst = c.as_mut_ptr().add(c_col);
        gemm_view(m, n, k, dst, c_ld as isize, 1, acc == Accumulate::Add, lhs, rhs, alpha, true, prec)
    };
}

/// `y[rows, out] = x[rows, in] . W[out, in]^T (+ b[out])` (PyTorch's `nn.Linear` layout), the product in `prec`.
#[allow(clippy::too_many_arguments)]
pub fn linear_forward(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    rows: usize,
    in_dim: usize,
    out_dim: usize,
    prec: Precision,
) {
    assert_eq!(y.len(), rows * out_dim, "linear_forward: y is not [rows, out]");
    if let Some(b) = b {
        assert_eq!(b.len(), out_dim, "linear_forward: bias is not [out]");
        if out_dim > 0 {
            y.par_chunks_mut(out_dim).with_min_len(rows_per_task(out_dim)).for_each(|r| r.copy_from_slice(b));
        }
    }
    // The bias rows are already in y: add the product to them.
    let acc = if b.is_some() { Accumulate::Add } else { Accumulate::Overwrite };
    matmul(y, x, w, rows, out_dim, in_dim, false, true, acc, prec);
}

/// Whether a kernel overwrites its output (`=`) or adds to it (`+=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accumulate {
    Overwrite,
    Add,
}

/// The shapes of a linear layer applied to `rows` rows: `x[rows, inp] -> y[rows, out]`, `W[out, inp]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearDims {
    pub rows: usize,
    pub inp: usize,
    pub out: usize,
}

/// Where the parameter gradients of a linear layer accumulate (`+=`): `w: [out, inp]`, `b: [out]`;
/// an absent one is not computed.
pub struct LinearGrads<'a> {
    pub w: Option<&'a mut [f32]>,
    pub b: Option<&'a mut [f32]>,
}

/// Backward of [`linear_forward`] on the layer `w` (`[out, inp]`) that read `x` (`[rows, inp]`):
/// `dx[rows, inp] (= or +=, per dx_mode) dy . W`, `grads.w += dy^T . x`, `grads.b += column sums of dy`.
/// Absent outputs are skipped.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    dx: Option<&mut [f32]>,
    dx_mode: Accumulate,
    grads: LinearGrads,
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    dims: LinearDims,
    prec: Precision,
) {
    let LinearDims { rows, inp: in_dim, out: out_dim } = dims;
    assert_eq!(dy.len(), rows * out_dim, "linear_backward: dy is not [rows, out]");
    if let Some(dx) = dx {
        matmul(dx, dy, w, rows, in_dim, out_dim, false, false, dx_mode, prec);
    }
    let LinearGrads { w: dw, b: db } = grads;
    if let Some(dw) = dw {
        matmul(dw, dy, x, out_dim, in_dim, rows, true, false, Accumulate::Add, prec);
    }
    if let Some(db) = db {
        assert_eq!(db.len(), out_dim, "linear_backward: db is not [out]");
        col_sums_add(db, dy, rows, out_dim);
    }
}

/// `acc[j] += sum_i m[i, j]`, parallel over column blocks (each thread owns its columns; fixed order).
fn col_sums_add(acc: &mut [f32], m: &[f32], rows: usize, cols: usize) {
    if cols == 0 {
        return;
    }
    let block = if rows * cols > CHUNK { cols.div_ceil(num_threads()).next_multiple_of(16) } else { cols };
    acc.par_chunks_mut(block).enumerate().for_each(|(bi, a)| {
        let c0 = bi * block;
        let w = a.len();
        for r in m.chunks_exact(cols).take(rows) {
            for (a, &v) in a.iter_mut().zip(&r[c0..c0 + w]) {
                *a += v;
            }
        }
    });
}

/// `a += b`, in parallel for large inputs.
pub fn add_inplace(a: &mut [f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "add_inplace: lengths differ");
    let f = |a: &mut [f32], b: &[f32]| a.iter_mut().zip(b).for_each(|(a, &b)| *a += b);
    if a.len() <= CHUNK {
        f(a, b);
    } else {
        a.par_chunks_mut(CHUNK).zip(b.par_chunks(CHUNK)).for_each(|(a, b)| f(a, b));
    }
}

/// `out = a + b`, in parallel for large inputs.
pub fn add3(out: &mut [f32], a: &[f32], b: &[f32]) {
    assert!(out.len() == a.len() && a.len() == b.len(), "add3: lengths differ");
    let f = |o: &mut [f32], a: &[f32], b: &[f32]| {
        o.iter_mut().zip(a).zip(b).for_each(|((o, &a), &b)| *o = a + b);
    };
    if out.len() <= CHUNK {
        f(out, a, b);
    } else {
        out.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK)).zip(b.par_chunks(CHUNK)).for_each(|((o, a), b)| f(o, a, b));
    }
}

#[cfg(test)]
#[path = "matmul_tests.rs"]
pub(crate) mod tests;
