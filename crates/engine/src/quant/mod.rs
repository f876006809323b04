//! Frozen linear weights stored below f32: bf16, or bitsandbytes' NF4 (QLoRA's 4-bit NormalFloat with
//! per-64-value absmax scales, optionally double-quantised). A [`Matrix`] holds one weight `W[out, in]`
//! (PyTorch's `nn.Linear` layout) in its storage and applies it without ever widening all of it: the
//! products widen a tile of `W` at a time into a per-thread scratch (about [`TILE_FLOATS`] floats) and run
//! the f32 matrix product on it, so a matrix costs its stored bytes plus that scratch.
//!
//! A bf16 weight in a bf16 product ([`Precision::Bf16`]) is not widened at all where the bf16 kernel runs:
//! its bits are packed for `vdpbf16ps` as they are ([`bf16_stored_gemm`]), the same numbers as widening
//! them and rounding back.
//!
//! Numerics: every stored value widens to one exact f32 (`code * absmax` is the one rounding NF4
//! defines), and each output element is one f32 product over the whole reduction, in the same order as
//! [`crate::kernels::matmul`] on the widened matrix. Where the tiles and the whole product both run on
//! the crate's AVX-512 kernel (whose results do not depend on how columns are cut) the results are
//! bitwise those of the f32 product on the widened matrix; elsewhere they agree within f32 rounding of
//! the reduction.

pub mod bf16;
mod builder;
pub mod double_quant;
mod embedding;
mod frozen;
pub mod nf4;
#[cfg(target_arch = "x86_64")]
mod simd;

pub use builder::MatrixBuilder;
pub use double_quant::DoubleQuant;
pub use embedding::{FrozenEmbedding, Gather, Lookups};
pub use frozen::{FrozenError, FrozenLayer, FrozenLinears};
pub use nf4::{Nf4, Nf4Builder, Scales, BLOCK, NF4_CODE};

use std::cell::RefCell;

use rayon::prelude::*;

use crate::kernels::decode::linear_rows_forward;
use crate::kernels::matmul::{
    bf16_stored_gemm, gemm_view, linear_forward as f32_linear_forward, matmul, Accumulate, View,
};
use crate::kernels::precision::Precision;
use crate::kernels::threads::num_threads;

/// Floats in one tile of a widened weight (4 MiB per thread): each tile repacks the activations for the
/// product, so smaller tiles cost more (measured on a 2048 x 2048 weight, N = 256, one core: 1 MiB tiles
/// ran ~3% and 256 KiB tiles ~27% below the f32 product, 4 MiB tiles level with it).
pub const TILE_FLOATS: usize = 1 << 20;

/// Why a weight cannot be stored.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum QuantError {
    #[error("weight has {got} values, expected {rows} x {cols} = {want}")]
    Shape { rows: usize, cols: usize, want: usize, got: usize },
    #[error("value {index} is not finite; it cannot be quantised")]
    NonFinite { index: usize },
    #[error("{what}: expected {want} entries, got {got}")]
    Length { what: &'static str, want: usize, got: usize },
}

/// How a frozen weight is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    F32,
    Bf16,
    /// NF4 in blocks of [`BLOCK`] with f32 absmax, or (`double_quant`) 8-bit absmax.
    Nf4 {
        double_quant: bool,
    },
}

impl Storage {
    /// Bytes `numel` values take in this storage ([`Matrix::bytes`] of such a matrix).
    pub fn bytes(self, numel: usize) -> usize {
        let blocks = numel.div_ceil(BLOCK);
        match self {
            Storage::F32 => 4 * numel,
            Storage::Bf16 => 2 * numel,
            Storage::Nf4 { double_quant: false } => numel.div_ceil(2) + 4 * blocks,
            Storage::Nf4 { double_quant: true } => {
                numel.div_ceil(2) + blocks + 4 * blocks.div_ceil(double_quant::STATS_BLOCK) + 4
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Data {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
    Nf4(Nf4),
}

/// A frozen weight `W[rows = out, cols = in]` in its storage.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    rows: usize,
    cols: usize,
    data: Data,
}

impl Matrix {
    /// Stores `w` (`[rows, cols]`, row-major) as `storage` says; f32 keeps the vector itself.
    pub fn new(w: Vec<f32>, rows: usize, cols: usize, storage: Storage) -> Result<Self, QuantError> {
        let want = rows.saturating_mul(cols);
        if w.len() != want {
            return Err(QuantError::Shape { rows, cols, want, got: w.len() });
        }
        let data = match storage {
            Storage::F32 => Data::F32(w),
            Storage::Bf16 => return Self::bf16_from(w, rows, cols),
            Storage::Nf4 { double_quant } => Data::Nf4(Nf4::quantize(&w, double_quant)?),
        };
        Ok(Matrix { rows, cols, data })
    }

    /// `w` (`[rows, cols]`, row-major) stored in bf16, read where it is: no f32 copy of a table that
    /// stays in use (a tied embedding, whose head becomes this).
    pub fn bf16_of(w: &[f32], rows: usize, cols: usize) -> Result<Self, QuantError> {
        let mut m = MatrixBuilder::new(rows, cols, Storage::Bf16);
        m.push(w)?;
        m.finish()
    }

    /// `w` (`[rows, cols]`, row-major) stored in bf16, its f32 pages handed back as they are converted
    /// (`crate::pages::discard`, where the allocator maps them): the conversion holds a few MiB more
    /// than the bf16 copy, not the whole f32 table beside it (Llama-3-8B's head: 2 GiB in f32).
    pub fn bf16_from(mut w: Vec<f32>, rows: usize, cols: usize) -> Result<Self, QuantError> {
        const CHUNK: usize = 1 << 20; // floats: whole 2 MiB blocks, on a block boundary where `w`'s start is
        let want = rows.saturating_mul(cols);
        if w.len() != want {
            return Err(QuantError::Shape { rows, cols, want, got: w.len() });
        }
        let mut m = MatrixBuilder::new(rows, cols, Storage::Bf16);
        for chunk in w.chunks_mut(CHUNK) {
            m.push(chunk)?;
            crate::pages::discard(chunk);
        }
        m.finish()
    }

    /// An NF4 weight from bitsandbytes' arrays (e.g. a pre-quantised checkpoint's `weight`, `absmax`, ...).
    pub fn from_nf4(nf4: Nf4, rows: usize, cols: usize) -> Result<Self, QuantError> {
        let want = rows.saturating_mul(cols);
        if nf4.len() != want {
            return Err(QuantError::Shape { rows, cols, want, got: nf4.len() });
        }
        Ok(Matrix { rows, cols, data: Data::Nf4(nf4) })
    }

    /// Output features (`W`'s rows).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features (`W`'s columns).
    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn storage(&self) -> Storage {
        match &self.data {
            Data::F32(_) => Storage::F32,
            Data::Bf16(_) => Storage::Bf16,
            Data::Nf4(q) => Storage::Nf4 { double_quant: matches!(q.scales(), Scales::Double(_)) },
        }
    }

    /// The NF4 arrays, if stored so.
    pub fn as_nf4(&self) -> Option<&Nf4> {
        match &self.data {
            Data::Nf4(q) => Some(q),
            _ => None,
        }
    }

    /// Bytes the weight occupies.
    pub fn bytes(&self) -> usize {
        match &self.data {
            Data::F32(w) => 4 * w.len(),
            Data::Bf16(w) => 2 * w.len(),
            Data::Nf4(q) => q.bytes(),
        }
    }

    /// `out[i] = W[flat start + i]` in f32 (`W` flattened row-major).
    ///
    /// # Panics
    /// If the range is outside the matrix.
    pub fn widen_into(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        assert!(end <= self.rows * self.cols, "Matrix::widen_into: {start}..{end} outside the matrix");
        match &self.data {
            Data::F32(w) => out.copy_from_slice(&w[start..end]),
            Data::Bf16(w) => bf16::widen_into(&w[start..end], out),
            Data::Nf4(q) => q.dequantize_into(start, out),
        }
    }

    /// The whole weight in f32 (`[rows, cols]`): for tests, merging and export, one matrix at a time.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        self.widen_into(0, &mut out);
        out
    }

    /// `y[n, rows] = x[n, cols] . W^T (+ b[rows])`, the product in `prec`.
    pub fn linear_forward(&self, y: &mut [f32], x: &[f32], b: Option<&[f32]>, n: usize, prec: Precision) {
        self.forward_rows(0..self.rows, y, x, b, n, prec)
    }

    /// [`Matrix::linear_forward`] with the rows `rows` of `W` alone: `y[n, rows.len()] = x[n, cols] .
    /// W[rows]^T`, each element the number the whole product gives it (a block of an LM head's
    /// vocabulary).
    ///
    /// # Panics
    /// If `rows` is outside the matrix.
    pub fn linear_forward_rows(
        &self,
        rows: std::ops::Range<usize>,
        y: &mut [f32],
        x: &[f32],
        n: usize,
        prec: Precision,
    ) {
        self.check_rows(&rows, "linear_forward_rows");
        self.forward_rows(rows, y, x, None, n, prec)
    }

    fn forward_rows(
        &self,
        rows: std::ops::Range<usize>,
        y: &mut [f32],
        x: &[f32],
        b: Option<&[f32]>,
        n: usize,
        prec: Precision,
    ) {
        let (out_dim, in_dim) = (rows.len(), self.cols);
        let first = rows.start * in_dim;
        if let Data::F32(w) = &self.data {
            return f32_linear_forward(y, x, &w[first..rows.end * in_dim], b, n, in_dim, out_dim, prec);
        }
        assert_eq!(y.len(), n * out_dim, "Matrix::linear_forward: y is not [n, out]");
        assert_eq!(x.len(), n * in_dim, "Matrix::linear_forward: x is not [n, in]");
        if let Some(b) = b {
            assert_eq!(b.len(), out_dim, "Matrix::linear_forward: bias is not [out]");
            y.chunks_exact_mut(out_dim.max(1)).for_each(|r| r.copy_from_slice(b));
        }
        if n == 0 || out_dim == 0 {
            return;
        }
        if let (Data::Bf16(w), Precision::Bf16) = (&self.data, prec) {
            let lhs = View { ptr: x.as_ptr(), rs: in_dim as isize, cs: 1 }; // [n, in]
            let rhs = View { ptr: w[first..].as_ptr(), rs: 1, cs: in_dim as isize }; // W[rows]^T: [in, out]
                                                                                     // SAFETY: x is [n, in], W [out, in], y [n, out] (checked above); y is borrowed mutably.
            let ld = out_dim as isize;
            if unsafe { bf16_stored_gemm(n, out_dim, in_dim, y.as_mut_ptr(), ld, b.is_some(), lhs, rhs, true) } {
                return;
            }
        }
        // Tiles of whole rows of W, i.e. of columns of y: each task widens `W[r0..r1, :]` and writes
        // `y[:, r0..r1]`, the whole reduction in one product.
        let tile = tile_len(out_dim, in_dim, 16);
        let dst = SendPtr(y.as_mut_ptr());
        (0..out_dim.div_ceil(tile)).into_par_iter().for_each(|t| {
            let lhs = View { ptr: x.as_ptr(), rs: in_dim as isize, cs: 1 };
            let (r0, r1) = (t * tile, ((t + 1) * tile).min(out_dim));
            with_scratch((r1 - r0) * in_dim, |w| {
                self.widen_into(first + r0 * in_dim, w); // [r1 - r0, in]
                let rhs = View { ptr: w.as_ptr(), rs: 1, cs: in_dim as isize }; // W tile^T: [in, r1 - r0]
                                                                                // SAFETY: x is [n, in], the tile [r1 - r0, in]; y's columns r0..r1 of its n rows are in
                                                                                // bounds and written by this task alone; neither operand aliases y.
                unsafe {
                    let (d, ld) = (dst.at(r0), out_dim as isize);
                    gemm_view(n, r1 - r0, in_dim, d, ld, 1, b.is_some(), lhs, rhs, 1.0, false, prec);
                }
            });
        });
    }

    /// [`Self::linear_forward`] for the few rows of a decode step, through
    /// [`crate::kernels::linear_rows_forward`]: row `r` of `y` is bit-for-bit the same whatever `n` is,
    /// and the same as that kernel on the widened weight. The kernel reads f32 and bf16 storage as it is;
    /// NF4 tiles of rows of `W` are widened one after the other (the kernel is parallel within a tile).
    pub fn linear_rows_forward(&self, y: &mut [f32], x: &[f32], b: Option<&[f32]>, n: usize) {
        let (out_dim, in_dim) = (self.rows, self.cols);
        match &self.data {
            Data::F32(w) => return linear_rows_forward(y, x, w, b, n, in_dim, out_dim),
            Data::Bf16(w) => return linear_rows_forward(y, x, w, b, n, in_dim, out_dim),
            Data::Nf4(_) => {}
        }
        assert_eq!(y.len(), n * out_dim, "Matrix::linear_rows_forward: y is not [n, out]");
        if let Some(b) = b {
            assert_eq!(b.len(), out_dim, "Matrix::linear_rows_forward: bias is not [out]");
        }
        if n == 0 || out_dim == 0 {
            return;
        }
        let tile = (TILE_FLOATS / in_dim.max(1)).clamp(1, out_dim);
        let mut part = Vec::new();
        for r0 in (0..out_dim).step_by(tile) {
            let r1 = (r0 + tile).min(out_dim);
            with_scratch((r1 - r0) * in_dim, |w| {
                // [r1 - r0, in], widened in parallel: a decode step has few rows, so widening is most of it.
                let rows_per_task = (1 << 16) / in_dim.max(1) + 1;
                w.par_chunks_mut(rows_per_task * in_dim.max(1))
                    .enumerate()
                    .for_each(|(i, c)| self.widen_into((r0 + i * rows_per_task) * in_dim, c));
                part.resize(n * (r1 - r0), 0.0);
                let bias = b.map(|b| &b[r0..r1]);
                linear_rows_forward(&mut part, x, w, bias, n, in_dim, r1 - r0); // [n, r1 - r0]
            });
            for (yr, pr) in y.chunks_exact_mut(out_dim).zip(part.chunks_exact(r1 - r0)) {
                yr[r0..r1].copy_from_slice(pr);
            }
        }
    }

    /// `dx[n, cols] (= or +=, per acc) dy[n, rows] . W`: the input gradient of [`Self::linear_forward`],
    /// the product in `prec`.
    pub fn linear_input_grad(&self, dx: &mut [f32], dy: &[f32], n: usize, acc: Accumulate, prec: Precision) {
        self.input_grad_rows(0..self.rows, dx, dy, n, acc, prec)
    }

    /// [`Matrix::linear_input_grad`] through the rows `rows` of `W` alone: `dx[n, cols] (= or +=)
    /// dy[n, rows.len()] . W[rows]` (a block of a frozen LM head's vocabulary, as
    /// [`Matrix::linear_forward_rows`] is in the forward).
    ///
    /// # Panics
    /// If `rows` is outside the matrix.
    pub fn linear_input_grad_rows(
        &self,
        rows: std::ops::Range<usize>,
        dx: &mut [f32],
        dy: &[f32],
        n: usize,
        acc: Accumulate,
        prec: Precision,
    ) {
        self.check_rows(&rows, "linear_input_grad_rows");
        self.input_grad_rows(rows, dx, dy, n, acc, prec)
    }

    /// The `# Panics` of the `_rows` products: `rows` must lie inside the matrix.
    fn check_rows(&self, rows: &std::ops::Range<usize>, caller: &str) {
        assert!(rows.start <= rows.end && rows.end <= self.rows, "Matrix::{caller}: {rows:?} outside");
    }

    fn input_grad_rows(
        &self,
        rows: std::ops::Range<usize>,
        dx: &mut [f32],
        dy: &[f32],
        n: usize,
        acc: Accumulate,
        prec: Precision,
    ) {
        let (out_dim, in_dim) = (rows.len(), self.cols);
        let first = rows.start * in_dim;
        if let Data::F32(w) = &self.data {
            return matmul(dx, dy, &w[first..rows.end * in_dim], n, in_dim, out_dim, false, false, acc, prec);
        }
        assert_eq!(dx.len(), n * in_dim, "Matrix::linear_input_grad: dx is not [n, in]");
        assert_eq!(dy.len(), n * out_dim, "Matrix::linear_input_grad: dy is not [n, out]");
        if n == 0 || in_dim == 0 {
            return;
        }
        if let (Data::Bf16(w), Precision::Bf16) = (&self.data, prec) {
            let lhs = View { ptr: dy.as_ptr(), rs: out_dim as isize, cs: 1 }; // [n, out]
            let rhs = View { ptr: w[first..].as_ptr(), rs: in_dim as isize, cs: 1 }; // W[rows]: [out, in]
            let (d, ld, add) = (dx.as_mut_ptr(), in_dim as isize, acc == Accumulate::Add);
            // SAFETY: dy is [n, out], W [out, in], dx [n, in] (checked above); dx is borrowed mutably.
            if unsafe { bf16_stored_gemm(n, in_dim, out_dim, d, ld, add, lhs, rhs, true) } {
                return;
            }
        }
        // Tiles of columns of W, i.e. of columns of dx: each task widens `W[:, c0..c1]` (64-aligned, so
        // NF4 blocks do not straddle tiles when rows are whole blocks) and writes `dx[:, c0..c1]`.
        let tile = tile_len(in_dim, out_dim, BLOCK);
        let dst = SendPtr(dx.as_mut_ptr());
        (0..in_dim.div_ceil(tile)).into_par_iter().for_each(|t| {
            let lhs = View { ptr: dy.as_ptr(), rs: out_dim as isize, cs: 1 };
            let (c0, c1) = (t * tile, ((t + 1) * tile).min(in_dim));
            let width = c1 - c0;
            with_scratch(out_dim * width, |w| {
                for (r, row) in w.chunks_exact_mut(width).enumerate() {
                    self.widen_into(first + r * in_dim + c0, row); // [out, c1 - c0]
                }
                let rhs = View { ptr: w.as_ptr(), rs: width as isize, cs: 1 };
                // SAFETY: dy is [n, out], the tile [out, c1 - c0]; dx's columns c0..c1 of its n rows are in
                // bounds and written by this task alone; neither operand aliases dx.
                unsafe {
                    let (d, ld) = (dst.at(c0), in_dim as isize);
                    gemm_view(n, width, out_dim, d, ld, 1, acc == Accumulate::Add, lhs, rhs, 1.0, false, prec);
                }
            });
        });
    }
}

/// Length of a tile along a dimension of `total` units of `unit` floats each: at most [`TILE_FLOATS`]
/// floats, at least one tile per thread when there are enough units, a multiple of `align`.
fn tile_len(total: usize, unit: usize, align: usize) -> usize {
    let by_budget = (TILE_FLOATS / unit.max(1)).max(1);
    let by_threads = total.div_ceil(num_threads());
    by_budget.min(by_threads).next_multiple_of(align).min(total).max(1)
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: tasks write disjoint columns through it (see the callers).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer `i` floats on (a method, so closures capture the whole `Send` wrapper).
    ///
    /// # Safety
    /// As `pointer::add`.
    unsafe fn at(self, i: usize) -> *mut f32 {
        self.0.add(i)
    }
}

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on `len` floats of this thread's scratch (kept across calls; contents unspecified).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut v) => {
            if v.len() < len {
                v.resize(len, 0.0);
            }
            f(&mut v[..len])
        }
        // Re-entered on this thread (a task waiting inside rayon ran another): use a fresh buffer.
        Err(_) => f(&mut vec![0.0; len]),
    })
}

#[cfg(test)]
mod tests;
