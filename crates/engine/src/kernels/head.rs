//! The fused LM head: per-target log-probabilities `log softmax(W h)[token]` without ever holding the
//! `[targets, vocab]` logits. Targets are taken [`HEAD_TARGETS`] at a time (their hidden rows gathered into
//! one block), and the vocabulary a block of columns at a time: each block's logits `[targets, cols]` are
//! one product with those rows of `W`, reduced into running per-target statistics (an online
//! log-sum-exp) before the next block overwrites them. The backward recomputes each block's logits from
//! the saved log-sum-exp instead of storing them.
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
    matmul,
    Accumulate::{Add, Overwrite},
};
use super::precision::Precision;
use crate::batch::Target;

/// Most targets per pass over the vocabulary: `W` is packed once per this many targets.
pub const HEAD_TARGETS: usize = 1024;
/// Most floats of one block of logits `[targets, cols]` (16 MB).
const BLOCK_FLOATS: usize = 1 << 22;
/// Vocabulary columns per block are a multiple of this (whole `k` blocks of the products that sum over
/// the vocabulary, in f32 and bf16), and at least this many.
const COLS_ALIGN: usize = 512;

/// How the head cuts its work: targets per pass over the vocabulary, vocabulary columns per block.
#[derive(Clone, Copy, Debug)]
struct Blocks {
    targets: usize,
    cols: usize,
}

impl From<Blocks> for (usize, usize) {
    fn from(b: Blocks) -> (usize, usize) {
        (b.targets, b.cols)
    }
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
/// kept between calls) and the gathered rows `[targets, d]` and their gradient `[targets, d]`.
pub fn head_scratch_floats(targets: usize, d: usize, vocab: usize) -> u64 {
    let b = Blocks::for_targets(targets, vocab);
    b.targets as u64 * (b.cols as u64 + 2 * d as u64)
}

thread_local! {
    /// The block's logits, kept from call to call: a fresh buffer per call is paid in page faults.
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
        let out = f(&mut buf[..len]);
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

fn check(hidden: &[f32], w: &[f32], targets: &[Target], d: usize, vocab: usize) {
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
    w: &[f32],
    b: Option<&[f32]>,
    (v0, v1): (usize, usize),
    c: usize,
    d: usize,
    prec: Precision,
) {
    let cols = v1 - v0;
    // [c, cols] = [c, d] . [cols, d]^T
    matmul(logits, h, &w[v0 * d..v1 * d], c, cols, d, false, true, Overwrite, prec);
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
/// the backward; `logit_sum[t]` (optional) is the sum of the row's logits, for metrics.
/// `hidden: [N, d]`, `w: [vocab, d]`, `b: [vocab]` (GPT-J's head has one).
#[allow(clippy::too_many_arguments)]
pub fn logprob_head_forward(
    logp: &mut [f32],
    lse: &mut [f32],
    logit_sum: Option<&mut [f32]>,
    hidden: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    targets: &[Target],
    d: usize,
    vocab: usize,
    prec: Precision,
) {
    let blocks = Blocks::for_targets(targets.len(), vocab);
    head_forward_blocked(logp, lse, logit_sum, hidden, w, b, targets, d, vocab, blocks, prec);
}

#[allow(clippy::too_many_arguments)]
fn head_forward_blocked(
    logp: &mut [f32],
    lse: &mut [f32],
    mut logit_sum: Option<&mut [f32]>,
    hidden: &[f32],
    w: &[f32],
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
    check(hidden, w, targets, d, vocab);
    if nt == 0 || vocab == 0 {
        return;
    }
    let cap = blocks.targets.min(nt);
    let mut h = vec![0.0f32; cap * d];
    let mut stats = vec![RowStats::EMPTY; cap];
    with_logits(cap * blocks.cols, |logits| {
        for c0 in (0..nt).step_by(blocks.targets) {
            let tg = &targets[c0..(c0 + blocks.targets).min(nt)];
            let c = tg.len();
            gather(&mut h[..c * d], hidden, tg, d);
            let stats = &mut stats[..c];
            stats.fill(RowStats::EMPTY);
            for (v0, v1) in vocab_blocks(vocab, blocks.cols) {
                let logits = &mut logits[..c * (v1 - v0)];
                block_logits(logits, &h[..c * d], w, b, (v0, v1), c, d, prec);
                logits.par_chunks(v1 - v0).zip(stats.par_iter_mut()).zip(tg).for_each(|((row, s), t)| {
                    s.add_block(row, v0, t.token as usize);
                });
            }
            for (i, s) in stats.iter().enumerate() {
                let l = s.lse();
                logp[c0 + i] = s.target - l;
                lse[c0 + i] = l;
                if let Some(sum) = logit_sum.as_deref_mut() {
                    sum[c0 + i] = s.sum;
                }
            }
        }
    });
}

/// Backward of [`logprob_head_forward`] given `dlogp [T]`: with `dlogits[t] = dlogp[t] (onehot(token_t) -
/// softmax(logits[t]))`, `dhidden[pos_t] += dlogits[t] . W` (targets sharing a position add up) and
/// `dw += dlogits^T . hidden[pos]` when `dw` is given, `db += sum_t dlogits[t]` when `db` is (the bias `b`
/// of the forward, if any, must be passed again: the logits are recomputed).
#[allow(clippy::too_many_arguments)]
pub fn logprob_head_backward(
    dhidden: &mut [f32],
    dw: Option<&mut [f32]>,
    db: Option<&mut [f32]>,
    dlogp: &[f32],
    lse: &[f32],
    hidden: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    targets: &[Target],
    d: usize,
    vocab: usize,
    prec: Precision,
) {
    let blocks = Blocks::for_targets(targets.len(), vocab);
    head_backward_blocked(dhidden, dw, db, dlogp, lse, hidden, w, b, targets, d, vocab, blocks, prec);
}

#[allow(clippy::too_many_arguments)]
fn head_backward_blocked(
    dhidden: &mut [f32],
    mut dw: Option<&mut [f32]>,
    mut db: Option<&mut [f32]>,
    dlogp: &[f32],
    lse: &[f32],
    hidden: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    targets: &[Target],
    d: usize,
    vocab: usize,
    blocks: Blocks,
    prec: Precision,
) {
    let nt = targets.len();
    assert!(dlogp.len() == nt && lse.len() == nt, "logprob_head_backward: dlogp and lse must be [targets]");
    assert_eq!(dhidden.len(), hidden.len(), "logprob_head_backward: dhidden is not [N, d]");
    if let Some(dw) = &dw {
        assert_eq!(dw.len(), vocab * d, "logprob_head_backward: dw is not [vocab, d]");
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
    let mut dh = vec![0.0f32; cap * d];
    with_logits(cap * blocks.cols, |logits| {
        for c0 in (0..nt).step_by(blocks.targets) {
            let tg = &targets[c0..(c0 + blocks.targets).min(nt)];
            let c = tg.len();
            let (g, lse) = (&dlogp[c0..c0 + c], &lse[c0..c0 + c]);
            if g.iter().all(|&g| g == 0.0) {
                continue; // nothing flows back through these targets
            }
            let (h, dh) = (&mut h[..c * d], &mut dh[..c * d]);
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
                // [c, d] (= or +=) [c, cols] . [cols, d]
                let acc = if v0 == 0 { Overwrite } else { Add };
                matmul(dh, logits, &w[v0 * d..v1 * d], c, d, cols, false, false, acc, prec);
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
            for (row, t) in dh.chunks_exact(d).zip(tg) {
                let p = t.pos as usize;
                dhidden[p * d..(p + 1) * d].iter_mut().zip(row).for_each(|(a, &b)| *a += b);
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
mod tests {
    use super::*;
    use crate::kernels::threads::test_util::*;

    /// f64 reference: per target, the logits row, its log-sum-exp and the log-prob.
    #[allow(clippy::type_complexity)]
    fn naive(
        hidden: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        targets: &[Target],
        d: usize,
        v: usize,
    ) -> (Vec<Vec<f64>>, Vec<f64>, Vec<f64>) {
        let mut rows = vec![];
        let (mut lse, mut lp) = (vec![], vec![]);
        for t in targets {
            let h = &hidden[t.pos as usize * d..][..d];
            let bias = |j: usize| b.map_or(0.0, |b| b[j] as f64);
            let row: Vec<f64> =
                (0..v).map(|j| bias(j) + (0..d).map(|k| h[k] as f64 * w[j * d + k] as f64).sum::<f64>()).collect();
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let l = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            lp.push(row[t.token as usize] - l);
            lse.push(l);
            rows.push(row);
        }
        (rows, lse, lp)
    }

    fn setup(n: usize, d: usize, v: usize, nt: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<Target>) {
        let mut rng = Rng::new(seed);
        let hidden = rng.vec(n * d, 1.0);
        let w = rng.vec(v * d, 1.0);
        let mut targets: Vec<Target> =
            (0..nt).map(|_| Target { pos: rng.below(n) as u32, token: rng.below(v) as u32 }).collect();
        // several targets on one position (shared prompt end)
        targets[1].pos = targets[0].pos;
        targets[nt - 1].pos = targets[0].pos;
        (hidden, w, targets)
    }

    /// Target chunks and vocabulary blocks the tests cut the work into: one of each, several targets and
    /// one vocabulary block, one target and several blocks, uneven both ways.
    const CUTS: [(usize, usize); 5] = [(HEAD_TARGETS, 1 << 20), (16, 1 << 20), (HEAD_TARGETS, 5), (1, 8), (7, 3)];

    #[test]
    fn forward_matches_f64_across_blocks() {
        let (n, d, v, nt) = (20, 16, 37, 45);
        let (hidden, w, targets) = setup(n, d, v, nt, 31);
        let bias = Rng::new(36).vec(v, 1.0);
        for b in [None, Some(&bias[..])] {
            let (rows, lse_w, lp_w) = naive(&hidden, &w, b, &targets, d, v);
            let sum_w: Vec<f64> = rows.iter().map(|r| r.iter().sum()).collect();
            for (targets_per, cols) in CUTS {
                let blocks = Blocks { targets: targets_per, cols: cols.min(v) };
                let (mut lp, mut lse, mut sum) = (vec![0.0; nt], vec![0.0; nt], vec![0.0; nt]);
                head_forward_blocked(
                    &mut lp,
                    &mut lse,
                    Some(&mut sum),
                    &hidden,
                    &w,
                    b,
                    &targets,
                    d,
                    v,
                    blocks,
                    Precision::F32,
                );
                let what = format!("{blocks:?}, bias {}", b.is_some());
                assert_close(&format!("logp {what}"), &lp, &lp_w, 1e-5, 1.0);
                assert_close(&format!("lse {what}"), &lse, &lse_w, 1e-5, 1.0);
                assert_close(&format!("logit sum {what}"), &sum, &sum_w, 1e-5, 1.0);
            }
        }
        // the public entry point, more targets than one pass over the vocabulary
        let nt = HEAD_TARGETS + 9;
        let (hidden, w, targets) = setup(n, d, v, nt, 32);
        let (_, _, lp_w) = naive(&hidden, &w, None, &targets, d, v);
        let (mut lp, mut lse) = (vec![0.0; nt], vec![0.0; nt]);
        logprob_head_forward(&mut lp, &mut lse, None, &hidden, &w, None, &targets, d, v, Precision::F32);
        assert_close("logp (public)", &lp, &lp_w, 1e-5, 1.0);
    }

    #[test]
    fn blocks_stay_within_the_scratch_and_cover_the_vocabulary() {
        for (targets, vocab) in [(1, 50257), (256, 50257), (1024, 49152), (5000, 151936), (3, 100)] {
            let b = Blocks::for_targets(targets, vocab);
            assert!(b.targets >= 1 && b.targets <= HEAD_TARGETS.min(targets.max(1)));
            assert!(b.cols >= 1 && b.cols <= vocab);
            assert!(b.targets * b.cols <= BLOCK_FLOATS.max(b.targets * COLS_ALIGN), "{b:?}");
            assert!(b.cols == vocab || b.cols.is_multiple_of(COLS_ALIGN), "{b:?}");
            let covered: usize = vocab_blocks(vocab, b.cols).map(|(v0, v1)| v1 - v0).sum();
            assert_eq!(covered, vocab);
        }
    }

    #[test]
    fn backward_matches_f64_and_finite_differences() {
        let (n, d, v, nt) = (9, 6, 11, 13);
        let (hidden, w, targets) = setup(n, d, v, nt, 33);
        let mut rng = Rng::new(34);
        let mut g = rng.vec(nt, 1.0);
        g[3] = 0.0;
        let (mut lp, mut lse) = (vec![0.0; nt], vec![0.0; nt]);
        logprob_head_forward(&mut lp, &mut lse, None, &hidden, &w, None, &targets, d, v, Precision::F32);
        // L = sum_t g_t logp_t, differentiated numerically in f64.
        let loss = |h: &[f64], w: &[f64]| -> f64 {
            targets
                .iter()
                .zip(&g)
                .map(|(t, &g)| {
                    let hr = &h[t.pos as usize * d..][..d];
                    let row: Vec<f64> = (0..v).map(|j| (0..d).map(|k| hr[k] * w[j * d + k]).sum()).collect();
                    let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let l = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                    g as f64 * (row[t.token as usize] - l)
                })
                .sum()
        };
        let (h64, w64) = (to_f64(&hidden), to_f64(&w));
        let fd = |v0: &[f64], f: &dyn Fn(&[f64]) -> f64| -> Vec<f64> {
            let mut v = v0.to_vec();
            (0..v.len())
                .map(|i| {
                    let o = v[i];
                    v[i] = o + 1e-6;
                    let p = f(&v);
                    v[i] = o - 1e-6;
                    let m = f(&v);
                    v[i] = o;
                    (p - m) / 2e-6
                })
                .collect()
        };
        let gh: Vec<f64> = fd(&h64, &|h| loss(h, &w64)).iter().map(|x| x + 1.0).collect();
        let gw: Vec<f64> = fd(&w64, &|w| loss(&h64, w)).iter().map(|x| x - 1.0).collect();
        for (targets_per, cols) in CUTS {
            let blocks = Blocks { targets: targets_per, cols: cols.min(v) };
            let mut dh = vec![1.0f32; n * d];
            let mut dw = vec![-1.0f32; v * d];
            head_backward_blocked(
                &mut dh,
                Some(&mut dw),
                None,
                &g,
                &lse,
                &hidden,
                &w,
                None,
                &targets,
                d,
                v,
                blocks,
                Precision::F32,
            );
            assert_close(&format!("dhidden {blocks:?}"), &dh, &gh, 1e-4, 1e-2);
            assert_close(&format!("dw {blocks:?}"), &dw, &gw, 1e-4, 1e-2);
            let mut dh2 = vec![1.0f32; n * d];
            head_backward_blocked(
                &mut dh2,
                None,
                None,
                &g,
                &lse,
                &hidden,
                &w,
                None,
                &targets,
                d,
                v,
                blocks,
                Precision::F32,
            );
            assert_eq!(dh, dh2);
        }
    }

    /// Wall time of the head's forward and backward (with `dW`) on GPT-2's head and the bench's 1024
    /// targets, bf16 products, cut as before this module's vocabulary blocks (256 targets, the whole
    /// vocabulary) and as now, interleaved call by call so that a virtual machine's changing speed falls on
    /// every cut alike. A measurement, not a test:
    /// `cargo test --release -p dpo-engine --lib head_cut_timing -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn head_cut_timing() {
        crate::kernels::init_threads(std::thread::available_parallelism().map_or(1, |n| n.get()));
        let (n, d, v, nt) = (1280, 768, 50257, 1024);
        let mut rng = Rng::new(7);
        let hidden = rng.vec(n * d, 1.0);
        let w = rng.vec(v * d, 0.05);
        let targets: Vec<Target> =
            (0..nt).map(|i| Target { pos: (i + 256) as u32, token: rng.below(v) as u32 }).collect();
        let g = rng.vec(nt, 1.0);
        let cuts = [(256, v), Blocks::for_targets(nt, v).into(), (1024, 2048), (1024, 1024), (1024, 1536), (512, 2048)];
        let mut best = vec![(f64::INFINITY, f64::INFINITY); cuts.len()];
        let (mut lp, mut lse) = (vec![0.0; nt], vec![0.0; nt]);
        let (mut dh, mut dw) = (vec![0.0; n * d], vec![0.0; v * d]);
        for _ in 0..5 {
            for (i, &(t, c)) in cuts.iter().enumerate() {
                let blocks = Blocks { targets: t, cols: c };
                let start = std::time::Instant::now();
                let prec = Precision::Bf16;
                head_forward_blocked(&mut lp, &mut lse, None, &hidden, &w, None, &targets, d, v, blocks, prec);
                let forward = start.elapsed().as_secs_f64();
                head_backward_blocked(
                    &mut dh,
                    Some(&mut dw),
                    None,
                    &g,
                    &lse,
                    &hidden,
                    &w,
                    None,
                    &targets,
                    d,
                    v,
                    blocks,
                    prec,
                );
                let backward = start.elapsed().as_secs_f64() - forward;
                best[i] = (best[i].0.min(forward), best[i].1.min(backward));
            }
        }
        for (&(t, c), (f, b)) in cuts.iter().zip(best) {
            println!("{t:5} targets x {c:5} columns: forward {f:.3} s, backward {b:.3} s (best of 5)");
        }
    }

    #[test]
    fn logits_forward_is_a_plain_product() {
        let (hidden, w, _) = setup(3, 5, 7, 2, 35);
        let mut out = vec![0.0; 3 * 7];
        logits_forward(&mut out, &hidden, &w, 5, 7);
        let want: Vec<f64> = (0..3)
            .flat_map(|r| {
                let (h, w) = (&hidden, &w);
                (0..7).map(move |j| (0..5).map(|k| h[r * 5 + k] as f64 * w[j * 5 + k] as f64).sum())
            })
            .collect();
        assert_close("logits", &out, &want, 1e-5, 1.0);
    }
}
