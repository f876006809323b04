//! A block's linear weights as a pass reads them: the base's f32 tensors, or, for a frozen base stored
//! below f32 ([`crate::quant::FrozenLinears`]: bf16, NF4), its [`Matrix`]es. The block calls one
//! `forward` and one `backward` per linear and does not care which.

use std::ops::Deref;

use crate::kernels::{self as k, Accumulate, LinearDims, LinearGrads, Precision};
use crate::lora::Site;
use crate::params::LayerParams;
use crate::quant::{FrozenLayer, Matrix};

/// One linear's weight `[out, in]`.
#[derive(Clone, Copy)]
pub(crate) enum Weight<'a> {
    F32(&'a [f32]),
    Stored(&'a Matrix),
}

impl Weight<'_> {
    /// `y[n, out] = x[n, in] W^T (+ b)`: a GEMM in `prec` (`packed`) or the row-independent decode
    /// kernel (f32: decoding reads each weight once per token, so it is bound by memory, not arithmetic).
    pub(crate) fn forward(
        self,
        y: &mut [f32],
        x: &[f32],
        b: Option<&[f32]>,
        dims: LinearDims,
        packed: bool,
        prec: Precision,
    ) {
        let LinearDims { rows: n, inp, out } = dims;
        match (self, packed) {
            (Weight::F32(w), true) => k::linear_forward(y, x, w, b, n, inp, out, prec),
            (Weight::F32(w), false) => k::linear_rows_forward(y, x, w, b, n, inp, out),
            (Weight::Stored(m), true) => m.linear_forward(y, x, b, n, prec),
            (Weight::Stored(m), false) => m.linear_rows_forward(y, x, b, n),
        }
    }

    /// `dx = dy W` (overwritten) and, on an f32 weight, the parameter gradients `grads` of the layer that
    /// read `x`, the products in `prec`. A stored weight is frozen: asking it for parameter gradients is a
    /// bug (`Grads::check` refuses full gradients of a frozen base before any pass runs).
    pub(crate) fn backward(
        self,
        dx: &mut [f32],
        grads: LinearGrads,
        dy: &[f32],
        x: &[f32],
        dims: LinearDims,
        prec: Precision,
    ) {
        match self {
            Weight::F32(w) => k::linear_backward(Some(dx), Accumulate::Overwrite, grads, dy, x, w, dims, prec),
            Weight::Stored(m) => {
                assert!(grads.w.is_none() && grads.b.is_none(), "a stored (frozen) weight has no gradients");
                m.linear_input_grad(dx, dy, dims.rows, Accumulate::Overwrite, prec);
            }
        }
    }
}

/// A layer as a pass reads it: its f32 parameters (norms, biases; the linears too unless frozen), for a
/// frozen base its stored linears, and the precision of its linears' products. Dereferences to the
/// parameters.
#[derive(Clone, Copy)]
pub(crate) struct LayerView<'a> {
    pub params: &'a LayerParams,
    pub frozen: Option<&'a FrozenLayer>,
    pub precision: Precision,
}

impl<'a> LayerView<'a> {
    /// The weight of the linear at `site`.
    pub(crate) fn weight(&self, site: Site) -> Weight<'a> {
        match self.frozen {
            Some(f) => Weight::Stored(f.get(site)),
            None => Weight::F32(&site.weight(self.params).data),
        }
    }
}

impl<'a> From<&'a LayerParams> for LayerView<'a> {
    fn from(params: &'a LayerParams) -> Self {
        LayerView { params, frozen: None, precision: Precision::F32 }
    }
}

impl Deref for LayerView<'_> {
    type Target = LayerParams;

    fn deref(&self) -> &LayerParams {
        self.params
    }
}
