//! A frozen weight stored as its values arrive: a checkpoint is read a block of the file at a time
//! (`hf`'s stored loads), and each block goes into the weight's storage at once, so the f32 weight is
//! never held whole beside what it becomes (Llama-3-8B's `gate_proj` and `up_proj` rows: 470 MB in f32,
//! twice that while concatenated; its head: 2 GiB).

use super::nf4::Nf4Builder;
use super::{bf16, Data, Matrix, QuantError, Storage};

/// Builds a [`Matrix`] `[rows, cols]` from its row-major values pushed in order, in pieces of any
/// length: the same matrix as [`Matrix::new`] on all of them.
#[derive(Debug)]
pub struct MatrixBuilder {
    rows: usize,
    cols: usize,
    pushed: usize,
    data: Building,
}

#[derive(Debug)]
enum Building {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
    Nf4(Nf4Builder),
}

impl MatrixBuilder {
    pub fn new(rows: usize, cols: usize, storage: Storage) -> Self {
        let n = rows.saturating_mul(cols);
        let data = match storage {
            Storage::F32 => Building::F32(Vec::with_capacity(n)),
            Storage::Bf16 => Building::Bf16(Vec::with_capacity(n)),
            Storage::Nf4 { double_quant } => Building::Nf4(Nf4Builder::new(n, double_quant)),
        };
        MatrixBuilder { rows, cols, pushed: 0, data }
    }

    /// The next `values`. Fails on more values than the shape holds, or (bf16, NF4) on a non-finite one,
    /// its index counted from the matrix's first value.
    pub fn push(&mut self, values: &[f32]) -> Result<(), QuantError> {
        let (rows, cols) = (self.rows, self.cols);
        let want = rows.saturating_mul(cols);
        if self.pushed + values.len() > want {
            return Err(QuantError::Shape { rows, cols, want, got: self.pushed + values.len() });
        }
        match &mut self.data {
            Building::F32(v) => v.extend_from_slice(values),
            Building::Bf16(v) => {
                if let Some(at) = values.iter().position(|x| !x.is_finite()) {
                    return Err(QuantError::NonFinite { index: self.pushed + at });
                }
                v.extend(values.iter().map(|&x| bf16::from_f32(x)));
            }
            Building::Nf4(q) => q.push(values)?,
        }
        self.pushed += values.len();
        Ok(())
    }

    /// The matrix; fails unless every value was pushed.
    pub fn finish(self) -> Result<Matrix, QuantError> {
        let (rows, cols) = (self.rows, self.cols);
        let want = rows.saturating_mul(cols);
        if self.pushed != want {
            return Err(QuantError::Shape { rows, cols, want, got: self.pushed });
        }
        let data = match self.data {
            Building::F32(v) => Data::F32(v),
            Building::Bf16(v) => Data::Bf16(v),
            Building::Nf4(q) => Data::Nf4(q.finish()?),
        };
        Ok(Matrix { rows, cols, data })
    }
}
