//! The fused LM head: per-target log-probabilities `log softmax(W h)[token]` without ever holding the
//! `[targets, vocab]` logits. Targets are taken [`HEAD_TARGETS`] at a time (their hidden rows gathered into
//! one block), and the vocabulary a block of columns at a time: each block's logits `[targets, cols]` are
//! one product with those rows of `W`, reduced into running per-target statistics (an online
//! log-sum-exp) before the next block overwrites them. The backward recomputes each block's logits from
//! the saved log-sum-exp instead of storing them.
//!
//! The input gradient needs no recompute: the gradient of `logp[t]` with respect to the hidden row is
//! `W[token_t] - E_p[W]`, where `E_p[W] = sum_v softmax(logits[t])_v W[v]` is one more product per block
//! in the forward (accumulated with the online log-sum-exp, as flash attention accumulates its output),
//! the product the backward would have run on the recomputed block. The forward keeps `[targets, d]` of
//! it ([`logprob_head_forward`]'s `expect`), and [`logprob_head_input_grad`] is that backward. A frozen
//! head (a LoRA run's) then needs no other: one logits product fewer a step. A trained head's weight
//! gradient still recomputes the logits ([`logprob_head_backward`] without `dhidden`), and can run after
//! the blocks' backward, when their activations are gone.
//!
//! Why blocks of the vocabulary rather than chunks of targets (as before): every product packs the part
//! of `W` it reads, so chunks of 256 targets packed the whole `W` (154 MB in f32 for GPT-2) four times a
//! pass in each orientation, and read `dW` four times; by vocabulary blocks each row of `W` is packed once
//! per pass and orientation for up to [`HEAD_TARGETS`] targets, `dW` is written once, and the scratch is one
//! block (`targets x cols`, at most [`BLOCK_FLOATS`]) instead of `256 x vocab` (51 MB for GPT-2).

use std::cell::RefCell;

use rayon::prelude::*;

use super::act::{exp_f32, max_lanes, multiversion, sum_lanes};
use super::matmul::{
    matmul, Accumulate,
    Accumulate::{Add, Overwrite},
};
use super::precision::Precision;
use crate::batch::Target;
use crate::quant::Matrix;

/// Most targets per pass over the vocabulary: `W` is packed once per this many targets.
pub const HEAD_TARGETS: usize = 1024;
/// Most floats of one block of logits `[targets, cols]` (16 MB).
const BLOCK_FLOATS: usize = 1 << 22;
/// Vocabulary columns per block are a multiple of this (whole `k` blocks of the products that sum over
/// the vocabulary, in f32 and bf16), and at least this many.
const COLS_ALIGN: usize = 512;

/// The head's weight `W: [vocab, d]` as a pass reads it: f32, or stored (a frozen model's head in bf16,
/// `crate::quant::FrozenEmbedding`: a bf16 product reads the same numbers from either).
#[derive(Clone, Copy)]
pub enum HeadWeight<'a> {
    F32(&'a [f32]),
    Stored(&'a Matrix),
}

impl<'a> From<&'a [f32]> for HeadWeight<'a> {
    fn from(w: &'a [f32]) -> Self {
        HeadWeight::F32(w)
    }
}

impl<'a> From<&'a Vec<f32>> for HeadWeight<'a> {
    fn from(w: &'a Vec<f32>) -> Self {
        HeadWeight::F32(w)
    }
}

impl HeadWeight<'_> {
    fn len(&self) -> usize {
        match self {
            HeadWeight::F32(w) => w.len(),
            HeadWeight::Stored(m) => m.rows() * m.cols(),
        }
    }

    /// `out[c, d] (= or +=) p[c, v1 - v0] . W[v0..v1]`: a block's part of `E_p[W]`, or of the input
    /// gradient.
    #[allow(clippy::too_many_arguments)]
    fn block_input_product(
        &self,
        out: &mut [f32],
        p: &[f32],
        (v0, v1): (usize, usize),
        c: usize,
        d: usize,
        acc: Accumulate,
        prec: Precision,
    ) {
        match self {
            HeadWeight::F32(w) => matmul(out, p, &w[v0 * d..v1 * d], c, d, v1 - v0, false, false, acc, prec),
            HeadWeight::Stored(m) => m.linear_input_grad_rows(v0..v1, out, p, c, acc, prec),
        }
    }

    /// Row `v` of `W` (`[d]`) into `out`.
    fn row_into(&self, v: usize, out: &mut [f32]) {
        let d = out.len();
        match self {
            HeadWeight::F32(w) => out.copy_from_slice(&w[v * d..(v + 1) * d]),
            HeadWeight::Stored(m) => m.widen_into(v * d, out),
        }
    }
}

/// How the head cuts its work: targets per pass over the vocabulary, vocabulary columns per block.
#[derive(Clone, Copy, Debug)]
struct Blocks {
    targets: usize,
    cols: usize,
}

impl Blocks {
    /// The blocks for `targets` targets: all of them up to [`HEAD_TARGETS`], and as many columns as keep a
    /// block under [`BLOCK_FLOATS`].
    fn for_targets(targets: usize, vocab: usize) -> Blocks {
        let targets = targets.clamp(1, HEAD_TARGETS);
        let cols = (BLOCK_FLOATS / targets / COLS_ALIGN * COLS_ALIGN).max(COLS_ALIGN);
        Blocks { targets, cols: cols.min(vocab.max(1)) }
    }
}

/// Floats the head holds for `targets` targets: one block of logits `[targets, cols]` (this thread's,
/// kept between calls) and the gathered rows `[targets, d]` and their gradient `[targets, d]` (in a pass
/// for backward, `expect`, `[targets, d]`, in its place: the backward's recompute then leaves it out).
pub fn head_scratch_floats(targets: usize, d: usize, vocab: usize) -> u64 {
    let b = Blocks::for_targets(targets, vocab);
    b.targets as u64 * (b.cols as u64 + 2 * d as u64)
}

thread_local! {
    /// The block's logits, kept from call to call: a fresh buffer per call is paid in page faults (on
    /// small pages; on huge pages, a fault per 2 MiB).
    static LOGITS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's logits buffer of at least `len` floats (contents unspecified).
fn with_logits<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    LOGITS.with(|cell| {
        // Taken out while in use, so a nested call (none today) would get a buffer of its own.
        let mut buf = cell.take();
        if buf.len() < len {
            buf = vec![0.0; len];
        }
        crate::pages::reuse(&mut buf);
        let out = f(&mut buf[..len]);
        // Its pages go back between calls (on huge pages, `crate::pages`): the block is dead from one
        // call to the next, and a training step's peak (its last layer's backward) comes in between.
        crate::pages::discard(&mut buf);
        cell.replace(buf);
        out
    })
}

multiversion! {
    /// `(max, sum exp(l - max), sum l)` of one row of logits.
    fn row_stats(l: &[f32]) -> (f32, f32, f32) {
        let m = max_lanes(l);
        let mut acc = [0.0f32; 16];
        let mut chunks = l.chunks_exact(16);
        for c in &mut chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += exp_f32(v - m);
            }
        }
        let mut tail = 0.0f32;
        for &v in chunks.remainder() {
            tail += exp_f32(v - m);
        }
        (m, sum_lanes(&acc) + tail, sum_lanes(l))
    }
}

multiversion! {
    /// `l = exp(l - m)` in place.
    fn row_exp(l: &mut [f32], m: f32) {
        for v in l.iter_mut() {
            *v = exp_f32(*v - m);
        }
    }
}

multiversion! {
    /// `l = -g * softmax(l)` in place, given the row's log-sum-exp (the one-hot term is added by the caller).
    fn row_dlogits(l: &mut [f32], g: f32, lse: f32) {
        for v in l.iter_mut() {
            *v = -g * exp_f32(*v - lse);
        }
    }
}

/// One target's statistics over the vocabulary blocks seen so far: the online log-sum-exp (`sum exp(l -
/// max)` with the running max), the sum of the logits, and the target's logit once its block is seen.
#[derive(Clone, Copy)]
struct RowStats {
    max: f32,
    sum_exp: f32,
    sum: f32,
    target: f32,
}

impl RowStats {
    const EMPTY: RowStats = RowStats { max: f32::NEG_INFINITY, sum_exp: 0.0, sum: 0.0, target: 0.0 };

    /// Folds in one block's row `l` of logits for vocabulary columns `v0..`, the target's being `token`.
    fn add_block(&mut self, l: &[f32], v0: usize, token: usize) {
        let (m, s, sum) = row_stats(l);
        if m > self.max {
            self.sum_exp = self.sum_exp * (self.max - m).exp() + s;
            self.max = m;
        } else {
            self.sum_exp += s * (m - self.max).exp();
        }
        self.sum += sum;
        if (v0..v0 + l.len()).contains(&token) {
            self.target = l[token - v0];
        }
    }

    fn lse(&self) -> f32 {
        self.max + self.sum_exp.ln()
    }
}

fn check(hidden: &[f32], w: HeadWeight, targets: &[Target], d: usize, vocab: usize) {
    assert_eq!(w.len(), vocab * d, "logprob head: W is not [vocab, d]");
    assert_eq!(hidden.len() % d.max(1), 0, "logprob head: hidden is not [N, d]");
    let n = hidden.len() / d.max(1);
    for t in targets {
        assert!((t.pos as usize) < n, "logprob head: target position {} outside the {n} rows", t.pos);
        assert!((t.token as usize) < vocab, "logprob head: target token {} outside the vocabulary {vocab}", t.token);
    }
}

/// Copies the hidden rows of `targets` into `h: [targets.len(), d]`.
fn gather(h: &mut [f32], hidden: &[f32], targets: &[Target], d: usize) {
    for (row, t) in h.chunks_exact_mut(d).zip(targets) {
        let p = t.pos as usize;
        row.copy_from_slice(&hidden[p * d..(p + 1) * d]);
    }
}

/// `logits[t, v0..v1] = h[t] . W[v0..v1]^T + b[v0..v1]` for the `c` gathered rows `h: [c, d]`, into
/// `logits: [c, v1 - v0]`.
#[allow(clippy::too_many_arguments)]
fn block_logits(
    logits: &mut [f32],
    h: &[f32],
    w: HeadWeight,
    b: Option<&[f32]>,
    (v0, v1): (usize, usize),
    c: usize,
    d: usize,
    prec: Precision,
) {
    let cols = v1 - v0;
    // [c, cols] = [c, d] . [cols, d]^T
    match w {
        HeadWeight::F32(w) => matmul(logits, h, &w[v0 * d..v1 * d], c, cols, d, false, true, Overwrite, prec),
        HeadWeight::Stored(m) => m.linear_forward_rows(v0..v1, logits, h, c, prec),
    }
    if let Some(b) = b {
        let b = &b[v0..v1];
        logits.par_chunks_mut(cols).for_each(|row| row.iter_mut().zip(b).for_each(|(l, b)| *l += b));
    }
}

/// The vocabulary's blocks `(v0, v1)` of at most `cols` columns, in order.
fn vocab_blocks(vocab: usize, cols: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..vocab).step_by(cols).map(move |v0| (v0, (v0 + cols).min(vocab)))
}

/// `logp[t] = logits[t, token_t] - lse[t]` with `logits[t] = W . hidden[pos_t] + b`, saving `lse [T]` for
/// the backward; `logit_sum[t]` (optional) is the sum of the row's logits, for metrics; `expect`
/// (optional, `[T, d]`) is `E_p[W] = softmax(logits[t]) . W` per target, for
/// [`logprob_head_input_grad`]. `hidden: [N, d]`, `w: [vocab, d]`, `b: [vocab]` (GPT-J's head has one).
#[allow(clippy::too_many_arguments)]
pub fn logprob_head_forward<'w>(
    logp: &mut [f32],
    lse: &mut [f32],
    logit_sum: Option<&mut [f32]>,
    expect: Option<&mut [f32]>,
    hidden: &[f32],
    w: impl Into<HeadWeight<'w>>,
    b: Option<&[f32]>,
    targets: &[Target],
    d: usize,
    vocab: usize,
    prec: Precision,
) {
    let blocks = Blocks::for_targets(targets.len(), vocab);
    head_forward_blocked(logp, lse, logit_sum, expect, hidden, w.into(), b, targets, d, vocab, blocks, prec);
}

#[allow(clippy::too_many_arguments)]
fn head_forward_blocked(
    logp: &mut [f32],
    lse: &mut [f32],
    mut logit_sum: Option<&mut [f32]>,
    mut expect: Option<&mut [f32]>,
    hidden: &[f32],
    w: HeadWeight,
    b: Option<&[f32]>,
    targets: &[Target],
    d: usize,
    vocab: usize,
    blocks: Blocks,
    prec: Precision,
) {
    let nt = targets.len();
    assert!(logp.len() == nt && lse.len() == nt, "logprob_head_forward: logp and lse must be [targets]");
    if let Some(s) = &logit_sum {
        assert_eq!(s.len(), nt, "logprob_head_forward: logit_sum must be [targets]");
    }
    if let Some(b) = b {
        assert_eq!(b.len(), vocab, "logprob head: b is not [vocab]");
    }
    if let Some(e) = &expect {
        assert_eq!(e.len(), nt * d, "logprob_head_forward: expect must be [targets, d]");
    }
    check(hidden, w, targets, d, vocab);
    if nt == 0 || vocab == 0 {
        return;
    }
    let cap = blocks.targets.min(nt);
    let mut h = vec![0.0f32; cap * d];
    let mut stats = vec![RowStats::EMPTY; cap];
    // Per target: the factor that brings `expect`'s running sum to the block's running max.
    let mut rescale = vec![0.0f32; if expect.is_some() { cap } else { 0 }];
    with_logits(cap * blocks.cols, |logits| {
        for c0 in (0..nt).step_by(blocks.targets) {
            let tg = &targets[c0..(c0 + blocks.targets).min(nt)];
            let c = tg.len();
            gather(&mut h[..c * d], hidden, tg, d);
            let stats = &mut stats[..c];
            stats.fill(RowStats::EMPTY);
            for (v0, v1) in vocab_blocks(vocab, blocks.cols) {
                let cols = v1 - v0;
                let logits = &mut logits[..c * cols];
                block_logits(logits, &h[..c * d], w, b, (v0, v1), c, d, prec);
                let rows = logits.par_chunks_mut(cols).zip(stats.par_iter_mut()).zip(tg);
                match expect.as_deref_mut() {
                    Some(expect) => {
                        // acc[t] = acc[t] exp(max_before - max) + exp(logits[t] - max) . W[v0..v1]: the
                        // sum of `exp(l - max) W[v]` over the blocks seen, at the running max.
                        rows.zip(&mut rescale[..c]).for_each(|(((row, s), t), r)| {
                            let before = s.max;
                            s.add_block(row, v0, t.token as usize);
                            *r = if before == f32::NEG_INFINITY { 0.0 } else { (before - s.max).exp() };
                            row_exp(row, s.max);
                        });
                        let acc = &mut expect[c0 * d..(c0 + c) * d];
                        if v0 > 0 {
                            acc.par_chunks_mut(d)
                                .zip(&rescale[..c])
                                .for_each(|(a, &r)| a.iter_mut().for_each(|x| *x *= r));
                        }
                        // [c, d] (= or +=) [c, cols] . [cols, d]
                        let mode = if v0 == 0 { Overwrite } else { Add };
                        w.block_input_product(acc, logits, (v0, v1), c, d, mode, prec);
                    }
                    None => rows.for_each(|((row, s), t)| s.add_block(row, v0, t.token as usize)),
                }
            }
            for (i, s) in stats.iter().enumerate() {
                let l = s.lse();
                logp[c0 + i] = s.target - l;
                lse[c0 + i] = l;
                if let Some(sum) = logit_sum.as_deref_mut() {
                    sum[c0 + i] = s.sum;
                }
            }
            if let Some(expect) = expect.as_deref_mut() {
                let acc = &mut expect[c0 * d..(c0 + c) * d];
                acc.par_chunks_mut(d).zip(&stats[..]).for_each(|(a, s)| {
                    let inv = 1.0 / s.sum_exp;
                    a.iter_mut().for_each(|x| *x *= inv);
                });
            }
        }
    });
}

/// Backward of [`logprob_head_forward`] into the hidden rows alone, from the forward's `expect`: with
/// `dlogits[t] = dlogp[t] (onehot(token_t) - softmax(logits[t]))`, `dlogits[t] . W = dlogp[t]
/// (W[token_t] - expect[t])`, added to `dhidden[pos_t]` (targets sharing a position add up). For a frozen head: no
/// weight gradient, and no logits recomputed. In a bf16 pass `W[token_t]` is rounded to bf16, as the
/// product it stands for reads it (a stored bf16 head's rows are already).
#[allow(clippy::too_many_arguments)]
pub fn logprob_head_input_grad<'w>(
    dhidden: &mut [f32],
    dlogp: &[f32],
    expect: &[f32],
    w: impl Into<HeadWeight<'w>>,
    targets: &[Target],
    d: usize,
    vocab: usize,
    prec: Precision,
) {
    let (nt, w) = (targets.len(), w.into());
    assert!(dlogp.len() == nt && expect.len() == nt * d, "logprob_head_input_grad: dlogp or expect mis-sized");
    check(dhidden, w, targets, d, vocab);
    let round = |x: f32| match prec {
        Precision::Bf16 => crate::quant::bf16::round(x),
        Precision::F32 => x,
    };
    let mut wy = vec![0.0f32; d];
    for ((t, &g), e) in targets.iter().zip(dlogp).zip(expect.chunks_exact(d.max(1))) {
        if g == 0.0 {
            continue;
        }
        let p = t.pos as usize;
        w.row_into(t.token as usize, &mut wy);
        dhidden[p * d..(p + 1) * d].iter_mut().zip(&wy).zip(e).for_each(|((a, &w), &e)| *a += g * (round(w) - e));
    }
}

/// Backward of [`logprob_head_forward`] given `dlogp [T]`: with `dlogits[t] = dlogp[t] (onehot(token_t) -
/// softmax(logits[t]))`, `dhidden[pos_t] += dlogits[t] . W` when `dhidden` is given (targets sharing a
/// position add up), `dw += dlogits^T . hidden[pos]` when `dw` is, `db += sum_t dlogits[t]` when `db` is
/// (the bias `b` of the forward, if any, must be passed again: the logits are recomputed). A stored
/// (frozen) `w` has no weight gradient: `dw` must then be `None`.
#[allow(clippy::too_many_arguments)]
pub fn logprob_head_backward<'w>(
    dhidden: Option<&mut [f32]>,
    dw: Option<&mut [f32]>,
    db: Option<&mut [f32]>,
    dlogp: &[f32],
    lse: &[f32],
    hidden: &[f32],
    w: impl Into<HeadWeight<'w>>,
    b: Option<&[f32]>,
    targets: &[Target],
    d: usize,
    vocab: usize,
    prec: Precision,
) {
    let blocks = Blocks::for_targets(targets.len(), vocab);
    head_backward_blocked(dhidden, dw, db, dlogp, lse, hidden, w.into(), b, targets, d, vocab, blocks, prec);
}

#[allow(clippy::too_many_arguments)]
fn head_backward_blocked(
    mut dhidden: Option<&mut [f32]>,
    mut dw: Option<&mut [f32]>,
    mut db: Option<&mut [f32]>,
    dlogp: &[f32],
    lse: &[f32],
    hidden: &[f32],
    w: HeadWeight,
    b: Option<&[f32]>,
    targets: &[Target],
    d: usize,
    vocab: usize,
    blocks: Blocks,
    prec: Precision,
) {
    let nt = targets.len();
    assert!(dlogp.len() == nt && lse.len() == nt, "logprob_head_backward: dlogp and lse must be [targets]");
    if let Some(dhidden) = &dhidden {
        assert_eq!(dhidden.len(), hidden.len(), "logprob_head_backward: dhidden is not [N, d]");
    }
    if let Some(dw) = &dw {
        assert_eq!(dw.len(), vocab * d, "logprob_head_backward: dw is not [vocab, d]");
        assert!(matches!(w, HeadWeight::F32(_)), "logprob_head_backward: a stored head has no weight gradient");
    }
    if let Some(b) = b {
        assert_eq!(b.len(), vocab, "logprob head: b is not [vocab]");
    }
    check(hidden, w, targets, d, vocab);
    if nt == 0 || vocab == 0 || d == 0 {
        return;
    }
    let cap = blocks.targets.min(nt);
    let mut h = vec![0.0f32; cap * d];
    // The block's input gradient, where one is asked for.
    let mut dh = vec![0.0f32; if dhidden.is_some() { cap * d } else { 0 }];
    with_logits(cap * blocks.cols, |logits| {
        for c0 in (0..nt).step_by(blocks.targets) {
            let tg = &targets[c0..(c0 + blocks.targets).min(nt)];
            let c = tg.len();
            let (g, lse) = (&dlogp[c0..c0 + c], &lse[c0..c0 + c]);
            if g.iter().all(|&g| g == 0.0) {
                continue; // nothing flows back through these targets
            }
            let (h, dh) = (&mut h[..c * d], &mut dh[..if dhidden.is_some() { c * d } else { 0 }]);
            gather(h, hidden, tg, d);
            for (v0, v1) in vocab_blocks(vocab, blocks.cols) {
                let cols = v1 - v0;
                let logits = &mut logits[..c * cols];
                block_logits(logits, h, w, b, (v0, v1), c, d, prec);
                logits.par_chunks_mut(cols).zip(tg).zip(g).zip(lse).for_each(|(((row, t), &g), &l)| {
                    row_dlogits(row, g, l);
                    if let Some(v) = (t.token as usize).checked_sub(v0).filter(|&v| v < cols) {
                        row[v] += g;
                    }
                });
                if dhidden.is_some() {
                    // [c, d] (= or +=) [c, cols] . [cols, d]
                    let acc = if v0 == 0 { Overwrite } else { Add };
                    w.block_input_product(dh, logits, (v0, v1), c, d, acc, prec);
                }
                if let Some(db) = db.as_deref_mut() {
                    // [cols] += rows of [c, cols], in target order
                    for row in logits.chunks_exact(cols) {
                        db[v0..v1].iter_mut().zip(row).for_each(|(a, &g)| *a += g);
                    }
                }
                if let Some(dw) = dw.as_deref_mut() {
                    // [cols, d] += [c, cols]^T . [c, d]
                    matmul(&mut dw[v0 * d..v1 * d], logits, h, cols, d, c, true, false, Add, prec);
                }
            }
            if let Some(dhidden) = dhidden.as_deref_mut() {
                for (row, t) in dh.chunks_exact(d).zip(tg) {
                    let p = t.pos as usize;
                    dhidden[p * d..(p + 1) * d].iter_mut().zip(row).for_each(|(a, &b)| *a += b);
                }
            }
        }
    });
}

/// `out[rows, V] = hidden_rows[rows, d] . W[V, d]^T` in f32 (full logits, for tests of sampling).
pub fn logits_forward(out: &mut [f32], hidden_rows: &[f32], w: &[f32], d: usize, vocab: usize) {
    assert_eq!(w.len(), vocab * d, "logits_forward: W is not [vocab, d]");
    let rows = hidden_rows.len().checked_div(d).unwrap_or_else(|| out.len().checked_div(vocab).unwrap_or(0));
    assert_eq!(hidden_rows.len(), rows * d, "logits_forward: hidden_rows is not [rows, d]");
    assert_eq!(out.len(), rows * vocab, "logits_forward: out is not [rows, vocab]");
    matmul(out, hidden_rows, w, rows, vocab, d, false, true, Overwrite, Precision::F32);
}

#[cfg(test)]
#[path = "head_tests.rs"]
mod tests;
