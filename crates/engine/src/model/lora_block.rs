//! LoRA inside the block: after each of a block's four linears, the adapter's pairs on that site add
//! their low-rank update to their rows of the output. Forward and backward side by side.
//!
//! ```text
//! forward   xd      = dropout(x)                   [N, in]   (training passes with dropout only; else x)
//!           us      = scale · xd A^T               [N, r]    kept for backward (small)
//!           y[:, R] += us B^T                      [N, |R|]  R = the pair's rows of the site's output
//! backward  dB^T    = us^T dy[:, R]                [r, |R|]  then added, transposed, to dB [|R|, r]
//!           du      = scale · dy[:, R] B           [N, r]
//!           dA      += du^T xd                     [r, in]
//!           dx      += dropout'(du A)              [N, in]   (the same mask, scaled by 1/(1-p))
//! ```
//! The products with `r` on a side (`us`, `du`, `dA`, `dB`) run on [`k::rank_product`] and
//! [`k::rank_outer`], which read `x` and `dy` where they lie; the blocked GEMM would pack all of them
//! into panels for `r` multiply-adds a value. The two with `r` as the sum's length (`y`, `dx`) are
//! ordinary products on the GEMM. None depends on the thread count.
//! The dropout mask is never stored: it is a hash of (seed, layer, pair, element), regenerated in
//! backward from the seed the forward recorded in [`LoraActs`]. The input `x` itself is what the block
//! keeps or recomputes for its own backward.

use rayon::prelude::*;

use crate::config::DecoderConfig;
use crate::kernels::{self as k, Accumulate, Cols, Precision};
use crate::lora::{Adapter, LayerAdapter, Site};

use super::acts::{fit, Keep};

/// One layer's adapter as a pass applies it.
#[derive(Clone, Copy)]
pub(crate) struct LayerLora<'a> {
    pub(crate) adapter: &'a LayerAdapter,
    /// Present in training passes of an adapter with dropout.
    pub(crate) dropout: Option<Dropout>,
}

/// PEFT's `lora_dropout` on the adapter's input: each element kept with probability `1 - p` and scaled
/// by `1 / (1 - p)`, independently for every pair (PEFT gives each module its own dropout).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Dropout {
    p: f32,
    /// The pass's seed mixed with the layer index.
    seed: u64,
}

/// Elements per parallel task of the mask kernels.
const MASK_CHUNK: usize = 1 << 14;

/// The adapter's products stay f32 whatever the pass's precision: rank-r products are a few percent of a
/// step's FLOPs, and f32 operands keep the small early values of `B` (zero at the start) exact. (Measured
/// on a Xeon with AMX, loaded: in bf16 on the AMX kernel they cost more CPU time, not less; at rank 16
/// its 32-row slivers run half empty and the `k = r` products are all packing and tile traffic.)
const LORA_PRECISION: Precision = Precision::F32;

impl Dropout {
    pub(crate) fn new(p: f32, seed: u64, layer: usize) -> Self {
        Dropout { p, seed: splitmix64(seed ^ splitmix64(layer as u64 + 1)) }
    }

    /// `out = x ⊙ mask / (1 - p)`: the input pair `pair` reads.
    fn apply(self, pair: usize, x: &[f32], out: &mut [f32]) {
        self.zip_mask(pair, out, x, |o, v, keep| *o = if keep { v } else { 0.0 });
    }

    /// `dx += g ⊙ mask / (1 - p)`: the input gradient through the same mask as [`Dropout::apply`].
    fn apply_add(self, pair: usize, g: &[f32], dx: &mut [f32]) {
        self.zip_mask(pair, dx, g, |o, v, keep| {
            if keep {
                *o += v
            }
        });
    }

    /// Calls `f(out[i], src[i] / (1 - p), keep_i)` for every element, in parallel; `keep_i` depends on
    /// the seed, the pair and `i` alone.
    fn zip_mask(self, pair: usize, out: &mut [f32], src: &[f32], f: impl Fn(&mut f32, f32, bool) + Sync) {
        assert_eq!(out.len(), src.len(), "dropout: lengths differ");
        let seed = splitmix64(self.seed ^ splitmix64(pair as u64 + 1));
        // Keep when a 24-bit hash is at least p · 2^24 (p < 1, checked by `Model::check`).
        let threshold = (self.p as f64 * (1u64 << 24) as f64) as u64;
        let inv_keep = 1.0 / (1.0 - self.p);
        out.par_chunks_mut(MASK_CHUNK).zip(src.par_chunks(MASK_CHUNK)).enumerate().for_each(|(c, (o, s))| {
            for (j, (o, &v)) in o.iter_mut().zip(s).enumerate() {
                let i = (c * MASK_CHUNK + j) as u64;
                let keep = splitmix64(seed.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15))) >> 40 >= threshold;
                f(o, v * inv_keep, keep);
            }
        });
    }
}

/// SplitMix64's finaliser: a well-mixed 64-bit hash of `x`.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What a block's forward keeps of its adapter for backward.
#[derive(Default)]
pub(crate) struct LoraActs {
    /// `u[i]`: pair `i`'s `scale · xd A^T`, `[N, r]` (pair order of the layer's adapter); a decode step's
    /// `xd A^T`, which nothing reads after it.
    pub(crate) u: Vec<Vec<f32>>,
    /// The dropout the forward applied, regenerated by backward.
    pub(crate) dropout: Option<Dropout>,
}

impl LoraActs {
    /// Starts a block's forward: one `u` per pair of `lora` (none without an adapter).
    pub(crate) fn begin(&mut self, lora: Option<LayerLora>) {
        let pairs = lora.map_or(0, |l| l.adapter.pairs.len());
        self.u.resize_with(pairs, Vec::new);
        self.dropout = lora.and_then(|l| l.dropout);
    }
}

/// Floats per token that a pass through `adapter` holds on top of the base's activations: with
/// [`Keep::All`] (a forward for backward, then the backward), every layer's `u` and the backward's scratch
/// (`du`, and with dropout the dropped input and `du A` before the mask); with [`Keep::LayerInputs`], one
/// layer's `u` (the slot's) and that scratch; with [`Keep::None`], one layer's `u` at a time.
pub(crate) fn floats_per_token(cfg: &DecoderConfig, adapter: &Adapter, keep: Keep) -> u64 {
    let u = |l: &LayerAdapter| l.pairs.iter().map(|p| p.target.r as u64).sum::<u64>();
    let one_layer = adapter.layers.iter().map(u).max().unwrap_or(0);
    if keep == Keep::None {
        return one_layer;
    }
    let pairs = adapter.layers.iter().flat_map(|l| &l.pairs);
    let max_r = pairs.clone().map(|p| p.target.r as u64).max().unwrap_or(0);
    let max_in = pairs.map(|p| p.target.site.dims(cfg).0 as u64).max().unwrap_or(0);
    let dropped = if adapter.dropout > 0.0 { 2 * max_in } else { 0 };
    let held = if keep == Keep::All { adapter.layers.iter().map(u).sum::<u64>() } else { one_layer };
    held + max_r + dropped
}

/// Scratch the adapter's kernels overwrite before reading; one set serves every layer.
#[derive(Default)]
pub(crate) struct LoraScratch {
    xd: Vec<f32>,  // [N, in] dropped-out input (dropout only)
    du: Vec<f32>,  // [N, r] gradient of u
    dxd: Vec<f32>, // [N, in] du A before the mask (dropout only)
    v: Vec<f32>,   // [N, |R|] u B^T of a decode step (row-independent path only)
    /// `[in, r]` a pair's `A^T` (forward only): one site's size, left out of [`floats_per_token`] too.
    at: Vec<f32>,
    /// `[r, |R|]` a pair's `dB^T` (backward only): one site's size whatever the token count, so
    /// [`floats_per_token`] leaves it out (160 KiB at rank 16 on a 2560-row site).
    dbt: Vec<f32>,
}

/// Forward of the pairs of `lora` on `site`: `y[:, R] += scale · (dropout(x) A^T) B^T` for each, after
/// the site's own linear wrote `y` (`[N, out]`) from `x` (`[N, in]`). Keeps `u` in `acts`. `packed`: GEMMs
/// (training, scoring, prefill); otherwise a decode step's row-independent kernels, as the block's own.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    site: Site,
    lora: Option<LayerLora>,
    x: &[f32],
    y: &mut [f32],
    acts: &mut LoraActs,
    s: &mut LoraScratch,
    n: usize,
    packed: bool,
) {
    let Some(lora) = lora else { return };
    let (inp, out) = (x.len() / n.max(1), y.len() / n.max(1));
    let LoraScratch { xd, v, at, .. } = s;
    for (i, pair) in lora.adapter.pairs.iter().enumerate().filter(|(_, p)| p.target.site == site) {
        let t = &pair.target;
        let (r, rows) = (t.r, t.rows.len());
        let xin = dropped_input(lora.dropout, i, x, xd);
        let u = &mut acts.u[i];
        fit(u, n * r);
        if packed {
            // us = scale · xd A^T    [N, r]
            let at = at_least(at, inp * r);
            for (j, a) in pair.a.data.chunks_exact(inp).enumerate() {
                at.iter_mut().skip(j).step_by(r).zip(a).for_each(|(t, &a)| *t = a);
            }
            k::rank_product(u, Cols::all(xin, inp), at, n, inp, r, t.scale);
            // y[:, R] += us B^T         [N, |R|]
            let (u, b) = (Cols::all(u, r), Cols::all(&pair.b.data, r));
            let dims = (n, rows, r);
            k::matmul_cols(y, out, t.rows.start, u, false, b, true, dims, 1.0, Accumulate::Add, LORA_PRECISION);
        } else {
            k::linear_rows_forward(u, xin, &pair.a.data, None, n, inp, r); // [N, r]
            let v = at_least(v, n * rows);
            k::linear_rows_forward(v, u, &pair.b.data, None, n, r, rows); // [N, |R|]
            for (y, v) in y.chunks_exact_mut(out).zip(v.chunks_exact(rows)) {
                y[t.rows.clone()].iter_mut().zip(v).for_each(|(y, &v)| *y += t.scale * v);
            }
        }
    }
}

/// The input pair `pair` reads: `x` itself, or with `dropout` its dropped-out copy, written to `xd`.
fn dropped_input<'s>(dropout: Option<Dropout>, pair: usize, x: &'s [f32], xd: &'s mut Vec<f32>) -> &'s [f32] {
    match dropout {
        Some(d) => {
            let xd = at_least(xd, x.len());
            d.apply(pair, x, xd);
            xd
        }
        None => x,
    }
}

/// The first `len` floats of the scratch vector `v`, grown to exactly `len` if shorter: a scratch keeps
/// its largest size, which is what [`floats_per_token`] counts.
fn at_least(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        v.reserve_exact(len - v.len());
        v.resize(len, 0.0);
    }
    &mut v[..len]
}

/// Where a layer's backward sends its adapter's gradients: the pairs the forward applied, their
/// gradient buffer and what the forward kept.
pub(crate) struct PairGrads<'a> {
    pub(crate) adapter: &'a LayerAdapter,
    pub(crate) grads: &'a mut LayerAdapter,
    pub(crate) acts: &'a LoraActs,
}

impl PairGrads<'_> {
    /// Backward of [`forward`] on `site`: from `dy` (`[N, out]`, the gradient of the site's output) and
    /// the site's input `x` (`[N, in]`) the forward read, accumulates the pairs' gradients and adds their
    /// input gradient to `dx` (`[N, in]`, which already holds the base linear's); `None` when nothing
    /// reads the input's gradient (the first layer of a frozen base), which skips that product.
    pub(crate) fn site(
        &mut self,
        site: Site,
        s: &mut LoraScratch,
        x: &[f32],
        dy: &[f32],
        mut dx: Option<&mut [f32]>,
        n: usize,
    ) {
        let (inp, out) = (x.len() / n.max(1), dy.len() / n.max(1));
        let LoraScratch { xd, du, dxd, dbt, .. } = s;
        let dropout = self.acts.dropout;
        for (i, (pair, g)) in self.adapter.pairs.iter().zip(&mut self.grads.pairs).enumerate() {
            if pair.target.site != site {
                continue;
            }
            let t = &pair.target;
            let (r, rows) = (t.r, t.rows.len());
            let u = &self.acts.u[i]; // us [N, r]
            let dy_rows = Cols { data: dy, ld: out, col: t.rows.start };
            // dB^T = us^T dy[:, R]    [r, |R|], then dB += its transpose
            let dbt = at_least(dbt, r * rows);
            k::rank_outer(dbt, u, dy_rows, n, r, rows, Accumulate::Overwrite);
            for (j, db) in g.b.data.chunks_exact_mut(r).enumerate() {
                db.iter_mut().zip(dbt[j..].iter().step_by(rows)).for_each(|(d, &v)| *d += v);
            }
            // du = scale · dy[:, R] B    [N, r]
            let du = at_least(du, n * r);
            k::rank_product(du, dy_rows, &pair.b.data, n, rows, r, t.scale);
            // dA += du^T xd                  [r, in]
            let xin = dropped_input(dropout, i, x, xd);
            k::rank_outer(&mut g.a.data, du, Cols::all(xin, inp), n, r, inp, Accumulate::Add);
            // dx += du A, through the forward's dropout mask when it had one    [N, in]
            let Some(dx) = dx.as_deref_mut() else { continue };
            match dropout {
                Some(d) => {
                    let dxd = at_least(dxd, n * inp);
                    k::matmul(dxd, du, &pair.a.data, n, inp, r, false, false, Accumulate::Overwrite, LORA_PRECISION);
                    d.apply_add(i, dxd, dx);
                }
                None => k::matmul(dx, du, &pair.a.data, n, inp, r, false, false, Accumulate::Add, LORA_PRECISION),
            }
        }
    }
}

#[cfg(test)]
#[path = "lora_block_tests.rs"]
mod tests;
