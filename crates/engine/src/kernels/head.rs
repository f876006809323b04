//! The fused LM head: per-target log-probabilities `log softmax(W h)[token]` without ever holding the
//! `[targets, vocab]` logits. Targets are processed in chunks of [`HEAD_CHUNK`]: the chunk's hidden rows are
//! gathered into a contiguous block, multiplied by `W^T` with the parallel GEMM, and reduced per row. The
//! backward recomputes the chunk's logits from the saved log-sum-exp instead of storing them.

use std::cell::RefCell;

use rayon::prelude::*;

use super::act::{exp_f32, max_lanes, multiversion, sum_lanes};
use super::matmul::{
    matmul,
    Accumulate::{Add, Overwrite},
};
use super::precision::Precision;
use crate::batch::Target;

/// Targets per chunk: large enough for an efficient GEMM (`[256, d] x [d, V]`), small enough that the
/// chunk's logits (`256 x 50257` floats = 51 MB for GPT-2) stay modest.
pub const HEAD_CHUNK: usize = 256;

/// Floats the head holds for `targets` targets: one chunk's logits `[chunk, vocab]` (this thread's,
/// kept between calls) and its gathered rows `[chunk, d]` and their gradient `[chunk, d]`.
pub fn head_scratch_floats(targets: usize, d: usize, vocab: usize) -> u64 {
    let chunk = HEAD_CHUNK.min(targets.max(1)) as u64;
    chunk * (vocab as u64 + 2 * d as u64)
}

thread_local! {
    /// The chunk's logits, kept from call to call: a fresh `HEAD_CHUNK x vocab` buffer per call (51 MB for
    /// GPT-2) was paid in page faults three times per micro-batch.
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
    head_forward_chunked(logp, lse, logit_sum, hidden, w, b, targets, d, vocab, HEAD_CHUNK, prec);
}

/// `logits[c, V] += b` row by row.
fn add_bias(logits: &mut [f32], b: Option<&[f32]>, vocab: usize) {
    if let Some(b) = b {
        assert_eq!(b.len(), vocab, "logprob head: b is not [vocab]");
        logits.par_chunks_mut(vocab).for_each(|row| row.iter_mut().zip(b).for_each(|(l, b)| *l += b));
    }
}

#[allow(clippy::too_many_arguments)]
fn head_forward_chunked(
    logp: &mut [f32],
    lse: &mut [f32],
    mut logit_sum: Option<&mut [f32]>,
    hidden: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    targets: &[Target],
    d: usize,
    vocab: usize,
    chunk: usize,
    prec: Precision,
) {
    let nt = targets.len();
    assert!(logp.len() == nt && lse.len() == nt, "logprob_head_forward: logp and lse must be [targets]");
    if let Some(s) = &logit_sum {
        assert_eq!(s.len(), nt, "logprob_head_forward: logit_sum must be [targets]");
    }
    check(hidden, w, targets, d, vocab);
    if nt == 0 || vocab == 0 {
        return;
    }
    let cap = chunk.min(nt);
    let mut h = vec![0.0f32; cap * d];
    with_logits(cap * vocab, |logits| {
        for c0 in (0..nt).step_by(chunk) {
            let tg = &targets[c0..(c0 + chunk).min(nt)];
            let c = tg.len();
            gather(&mut h[..c * d], hidden, tg, d);
            // [c, V] = [c, d] . [V, d]^T
            matmul(&mut logits[..c * vocab], &h[..c * d], w, c, vocab, d, false, true, Overwrite, prec);
            add_bias(&mut logits[..c * vocab], b, vocab);
            // (logp, lse, sum of logits) per row
            let stats: Vec<(f32, f32, f32)> = logits[..c * vocab]
                .par_chunks(vocab)
                .zip(tg)
                .map(|(row, t)| {
                    let (m, s, total) = row_stats(row);
                    let l = m + s.ln();
                    (row[t.token as usize] - l, l, total)
                })
                .collect();
            for (i, (lp, l, total)) in stats.into_iter().enumerate() {
                logp[c0 + i] = lp;
                lse[c0 + i] = l;
                if let Some(s) = logit_sum.as_deref_mut() {
                    s[c0 + i] = total;
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
    head_backward_chunked(dhidden, dw, db, dlogp, lse, hidden, w, b, targets, d, vocab, HEAD_CHUNK, prec);
}

#[allow(clippy::too_many_arguments)]
fn head_backward_chunked(
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
    chunk: usize,
    prec: Precision,
) {
    let nt = targets.len();
    assert!(dlogp.len() == nt && lse.len() == nt, "logprob_head_backward: dlogp and lse must be [targets]");
    assert_eq!(dhidden.len(), hidden.len(), "logprob_head_backward: dhidden is not [N, d]");
    if let Some(dw) = &dw {
        assert_eq!(dw.len(), vocab * d, "logprob_head_backward: dw is not [vocab, d]");
    }
    check(hidden, w, targets, d, vocab);
    if nt == 0 || vocab == 0 || d == 0 {
        return;
    }
    let cap = chunk.min(nt);
    let mut h = vec![0.0f32; cap * d];
    let mut dh = vec![0.0f32; cap * d];
    with_logits(cap * vocab, |logits| {
        for c0 in (0..nt).step_by(chunk) {
            let tg = &targets[c0..(c0 + chunk).min(nt)];
            let c = tg.len();
            let g = &dlogp[c0..c0 + c];
            if g.iter().all(|&g| g == 0.0) {
                continue; // nothing flows back through this chunk
            }
            gather(&mut h[..c * d], hidden, tg, d);
            matmul(&mut logits[..c * vocab], &h[..c * d], w, c, vocab, d, false, true, Overwrite, prec);
            add_bias(&mut logits[..c * vocab], b, vocab);
            logits[..c * vocab].par_chunks_mut(vocab).zip(tg).zip(g).zip(&lse[c0..c0 + c]).for_each(
                |(((row, t), &g), &l)| {
                    row_dlogits(row, g, l);
                    row[t.token as usize] += g;
                },
            );
            // [c, d] = [c, V] . [V, d]
            matmul(&mut dh[..c * d], &logits[..c * vocab], w, c, d, vocab, false, false, Overwrite, prec);
            for (row, t) in dh.chunks_exact(d).zip(tg) {
                let p = t.pos as usize;
                dhidden[p * d..(p + 1) * d].iter_mut().zip(row).for_each(|(a, &b)| *a += b);
            }
            if let Some(db) = db.as_deref_mut() {
                // [V] += rows of [c, V], in target order
                for row in logits[..c * vocab].chunks_exact(vocab) {
                    db.iter_mut().zip(row).for_each(|(a, &g)| *a += g);
                }
            }
            if let Some(dw) = dw.as_deref_mut() {
                // [V, d] += [c, V]^T . [c, d]
                matmul(dw, &logits[..c * vocab], &h[..c * d], vocab, d, c, true, false, Add, prec);
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
    fn naive(hidden: &[f32], w: &[f32], targets: &[Target], d: usize, v: usize) -> (Vec<Vec<f64>>, Vec<f64>, Vec<f64>) {
        let mut rows = vec![];
        let (mut lse, mut lp) = (vec![], vec![]);
        for t in targets {
            let h = &hidden[t.pos as usize * d..][..d];
            let row: Vec<f64> = (0..v).map(|j| (0..d).map(|k| h[k] as f64 * w[j * d + k] as f64).sum()).collect();
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

    #[test]
    fn forward_matches_f64_across_chunks() {
        let (n, d, v, nt) = (20, 16, 37, 45);
        let (hidden, w, targets) = setup(n, d, v, nt, 31);
        let (rows, lse_w, lp_w) = naive(&hidden, &w, &targets, d, v);
        let sum_w: Vec<f64> = rows.iter().map(|r| r.iter().sum()).collect();
        for chunk in [HEAD_CHUNK, 16, 7, 1] {
            let (mut lp, mut lse, mut sum) = (vec![0.0; nt], vec![0.0; nt], vec![0.0; nt]);
            head_forward_chunked(
                &mut lp,
                &mut lse,
                Some(&mut sum),
                &hidden,
                &w,
                None,
                &targets,
                d,
                v,
                chunk,
                Precision::F32,
            );
            assert_close("logp", &lp, &lp_w, 1e-5, 1.0);
            assert_close("lse", &lse, &lse_w, 1e-5, 1.0);
            assert_close("logit sum", &sum, &sum_w, 1e-5, 1.0);
        }
        // the public entry point, more targets than one chunk
        let nt = HEAD_CHUNK + 9;
        let (hidden, w, targets) = setup(n, d, v, nt, 32);
        let (_, _, lp_w) = naive(&hidden, &w, &targets, d, v);
        let (mut lp, mut lse) = (vec![0.0; nt], vec![0.0; nt]);
        logprob_head_forward(&mut lp, &mut lse, None, &hidden, &w, None, &targets, d, v, Precision::F32);
        assert_close("logp (public)", &lp, &lp_w, 1e-5, 1.0);
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
        for chunk in [HEAD_CHUNK, 4, 1] {
            let mut dh = vec![1.0f32; n * d];
            let mut dw = vec![-1.0f32; v * d];
            head_backward_chunked(
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
                chunk,
                Precision::F32,
            );
            assert_close(&format!("dhidden chunk {chunk}"), &dh, &gh, 1e-4, 1e-2);
            assert_close(&format!("dw chunk {chunk}"), &dw, &gw, 1e-4, 1e-2);
            let mut dh2 = vec![1.0f32; n * d];
            head_backward_chunked(
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
                chunk,
                Precision::F32,
            );
            assert_eq!(dh, dh2);
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
