//! Causal, grouped-query, span-masked attention in memory linear in the sequence length.
//!
//! Work is split into one task per (group, key/value head): a task owns every query head that reads its
//! key/value head, for every row of its group, so the tasks write disjoint parts of `out`, `lse` and
//! `dqkv` and the backward's `dK`/`dV` accumulation needs no synchronisation. Inside a task, queries are
//! processed in blocks of [`BQ`] rows of one span; the scores of a block (all its query heads stacked,
//! against the block's whole key range) are one GEMM into a per-task scratch of `rep * BQ` rows, never a
//! `[T, T]` matrix. The backward is FlashAttention's: `P = exp(S - lse)` is recomputed, `D_i = rowsum(dO
//! * O)`, `dS = P * (dP - D)`, `dQ = scale dS K`, `dK += scale dS^T Q`, `dV += P^T dO`.
//!
//! Masking (see [`crate::batch`]): query `i` of span `s` sees keys `s.ctx_start..s.ctx_end` and
//! `s.own_start..=i`. With a sliding window `w`, a key is kept when its distance to the query is below
//! `w`, where distance counts positions along the query's causal run: `i - j` for an own key, and
//! `(i - own_start) + (ctx_end - j)` for a context key (the context is taken to sit directly before the
//! own run, which is how a shared prompt and a completion are laid out). For a plain sequence this is
//! Mistral's `i - j < w`.

use std::ops::Range;

use rayon::prelude::*;

use super::act::{dot_lanes, exp_f32, max_lanes, multiversion, sum_lanes};
use super::matmul::{gemm_view, View};
use super::precision::Precision;
use crate::batch::Span;

/// Shape of one attention layer. `qkv` rows hold the query heads, then the key heads, then the value
/// heads, `head_dim` columns each; query head `h` reads key/value head `h / (n_heads / n_kv_heads)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnDims {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Keys at distance `>= window` are masked (Mistral's sliding window); `None`: full causal.
    pub window: Option<usize>,
}

impl AttnDims {
    /// Columns of the fused q/k/v rows: `(n_heads + 2 n_kv_heads) head_dim`.
    pub fn qkv_dim(&self) -> usize {
        (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
    }

    fn rep(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }
}

/// Query rows per block.
pub const BQ: usize = 64;

/// A raw pointer that tasks writing disjoint elements may share.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: used only to write elements that exactly one task owns (see `plan`).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer (a method, so closures capture the whole `Send` wrapper, not the raw field).
    fn get(&self) -> *mut f32 {
        self.0
    }
}

/// Checks the layout and returns, per group, its spans and the widest key range of a block.
///
/// The checks make the tasks' writes disjoint: groups are ordered and disjoint, and every span lies in a
/// group together with all the keys it reads.
fn plan(dims: &AttnDims, n: usize, spans: &[Span], groups: &[Range<u32>]) -> Vec<(Vec<Span>, usize)> {
    assert!(dims.head_dim > 0 && dims.n_kv_heads > 0, "attention: empty heads");
    assert!(dims.n_heads.is_multiple_of(dims.n_kv_heads), "attention: n_heads is not a multiple of n_kv_heads");
    assert!(dims.window != Some(0), "attention: a window of 0 masks every key");
    let mut prev_end = 0u32;
    for g in groups {
        assert!(g.start >= prev_end && g.start <= g.end, "attention: groups overlap or are out of order");
        assert!(g.end as usize <= n, "attention: group {g:?} past the {n} rows");
        prev_end = g.end;
    }
    let mut per_group: Vec<(Vec<Span>, usize)> = vec![(Vec::new(), 0); groups.len()];
    for s in spans {
        let gi = groups.partition_point(|g| g.end <= s.start);
        let ok = gi < groups.len() && {
            let g = &groups[gi];
            s.start >= g.start
                && s.start <= s.end
                && s.end <= g.end
                && s.own_start >= g.start
                && s.own_start <= s.start
                && s.ctx_start <= s.ctx_end
                && (s.ctx_start == s.ctx_end || (s.ctx_start >= g.start && s.ctx_end <= s.own_start))
        };
        assert!(ok, "attention: span {s:?} is not inside one group with the keys it reads");
        if s.start == s.end {
            continue;
        }
        let nk = (s.ctx_end - s.ctx_start) as usize + (s.end - s.own_start) as usize;
        let e = &mut per_group[gi];
        e.0.push(*s);
        e.1 = e.1.max(nk);
    }
    per_group
}

/// The key layout of one query block `q0..q1` of a span: score columns `0..nctx` are the context keys
/// `cs..ce`, columns `nctx..nk` the own keys `os..q1`.
#[derive(Clone, Copy)]
struct Block {
    q0: usize,
    q1: usize,
    cs: usize,
    ce: usize,
    os: usize,
}

impl Block {
    fn new(s: &Span, q0: usize) -> Self {
        Block {
            q0,
            q1: (q0 + BQ).min(s.end as usize),
            cs: s.ctx_start as usize,
            ce: s.ctx_end as usize,
            os: s.own_start as usize,
        }
    }
    fn bq(&self) -> usize {
        self.q1 - self.q0
    }
    fn nctx(&self) -> usize {
        self.ce - self.cs
    }
    fn nk(&self) -> usize {
        self.nctx() + self.q1 - self.os
    }
    /// `(first key row, keys, first score column)` of the context part and the own part.
    fn parts(&self) -> [(usize, usize, usize); 2] {
        [(self.cs, self.nctx(), 0), (self.os, self.q1 - self.os, self.nctx())]
    }
    /// Score columns query `i` may see: `(context columns, own columns)`.
    fn cols(&self, i: usize, window: Option<usize>) -> (Range<usize>, Range<usize>) {
        let nctx = self.nctx();
        let own_hi = nctx + (i - self.os) + 1;
        match window {
            None => (0..nctx, nctx..own_hi),
            Some(w) => {
                let own_lo = (i + 1).saturating_sub(w).max(self.os);
                let ctx_lo = (self.ce + (i - self.os) + 1).saturating_sub(w).clamp(self.cs, self.ce);
                (ctx_lo - self.cs..nctx, nctx + own_lo - self.os..own_hi)
            }
        }
    }
}

/// Per-task constants.
struct Geo {
    hd: usize,
    qd: usize,
    rep: usize,
    /// first query head of the task
    h0: usize,
    /// column of the task's key head / value head in `qkv`
    koff: usize,
    voff: usize,
    scale: f32,
    /// The products' arithmetic: the pass's, as autocast runs `scaled_dot_product_attention` in bf16
    /// (`Q K^T`, `P V` and their backward take bf16 operands; the softmax and its statistics stay f32).
    precision: Precision,
}

impl Geo {
    fn new(dims: &AttnDims, kv: usize, precision: Precision) -> Self {
        let (nh, hd, rep) = (dims.n_heads, dims.head_dim, dims.rep());
        Geo {
            hd,
            qd: dims.qkv_dim(),
            rep,
            h0: kv * rep,
            koff: (nh + kv) * hd,
            voff: (nh + dims.n_kv_heads + kv) * hd,
            scale: 1.0 / (hd as f32).sqrt(),
            precision,
        }
    }

    /// Stacked, scaled queries of a block: `qs[hh * bq + r] = scale * q(q0 + r, h0 + hh)`.
    fn load_q(&self, qs: &mut [f32], qkv: &[f32], b: &Block) {
        let bq = b.bq();
        for (mi, dst) in qs.chunks_exact_mut(self.hd).take(self.rep * bq).enumerate() {
            let (hh, r) = (mi / bq, mi % bq);
            let src = &qkv[(b.q0 + r) * self.qd + (self.h0 + hh) * self.hd..][..self.hd];
            dst.iter_mut().zip(src).for_each(|(d, &s)| *d = s * self.scale);
        }
    }

    /// `s[m, nk] = qs[m, hd] . K[keys]^T` for the block's two key parts.
    ///
    /// # Safety
    /// `qkv` must hold every key row of the block.
    unsafe fn scores(&self, s: &mut [f32], qs: &[f32], qkv: &[f32], b: &Block) {
        let (m, nk) = (self.rep * b.bq(), b.nk());
        assert!(s.len() >= m * nk && qs.len() >= m * self.hd);
        for (k0, n, c0) in b.parts() {
            let rhs = View { ptr: qkv.as_ptr().add(k0 * self.qd + self.koff), rs: 1, cs: self.qd as isize };
            let lhs = View { ptr: qs.as_ptr(), rs: self.hd as isize, cs: 1 };
            gemm_view(
                m,
                n,
                self.hd,
                s.as_mut_ptr().add(c0),
                nk as isize,
                1,
                false,
                lhs,
                rhs,
                1.0,
                false,
                self.precision,
            );
        }
    }

    /// `dst[m, hd] = p[m, nk] . X[keys]` for X at column `xoff` of `qkv` (V, or K).
    ///
    /// # Safety
    /// `qkv` must hold every key row of the block.
    unsafe fn times_keys(&self, dst: &mut [f32], p: &[f32], qkv: &[f32], b: &Block, xoff: usize) {
        let (m, nk) = (self.rep * b.bq(), b.nk());
        assert!(dst.len() >= m * self.hd && p.len() >= m * nk);
        for (part, (k0, n, c0)) in b.parts().into_iter().enumerate() {
            let lhs = View { ptr: p.as_ptr().add(c0), rs: nk as isize, cs: 1 };
            let rhs = View { ptr: qkv.as_ptr().add(k0 * self.qd + xoff), rs: self.qd as isize, cs: 1 };
            // The first part overwrites (zero-fills when it has no keys), the second accumulates.
            gemm_view(
                m,
                self.hd,
                n,
                dst.as_mut_ptr(),
                self.hd as isize,
                1,
                part > 0,
                lhs,
                rhs,
                1.0,
                false,
                self.precision,
            );
        }
    }
}

multiversion! {
    /// Softmax numerator of one score row in place: `exp(s - max)` on the visible columns, 0 elsewhere.
    /// Returns `(max, sum)`.
    fn softmax_row(row: &mut [f32], ctx: Range<usize>, own: Range<usize>) -> (f32, f32) {
        let m = max_lanes(&row[ctx.clone()]).max(max_lanes(&row[own.clone()]));
        row[..ctx.start].fill(0.0);
        row[ctx.end..own.start].fill(0.0);
        row[own.end..].fill(0.0);
        let mut sum = 0.0f32;
        for r in [ctx, own] {
            let seg = &mut row[r];
            seg.iter_mut().for_each(|v| *v = exp_f32(*v - m));
            sum += sum_lanes(seg);
        }
        (m, sum)
    }
}

multiversion! {
    /// Probabilities of one score row from the saved log-sum-exp: `exp(s - lse)` visible, 0 elsewhere.
    fn prob_row(row: &mut [f32], ctx: Range<usize>, own: Range<usize>, lse: f32) {
        row[..ctx.start].fill(0.0);
        row[ctx.end..own.start].fill(0.0);
        row[own.end..].fill(0.0);
        for r in [ctx, own] {
            row[r].iter_mut().for_each(|v| *v = exp_f32(*v - lse));
        }
    }
}

multiversion! {
    /// `dp = p * (dp - d)` (the softmax backward of one row).
    fn dsoftmax_row(dp: &mut [f32], p: &[f32], d: f32) {
        for (g, &p) in dp.iter_mut().zip(p) {
            *g = p * (*g - d);
        }
    }
}

/// Tasks, largest groups first (better balance when groups differ in length).
fn tasks(groups: &[Range<u32>], n_kv: usize) -> Vec<(usize, usize)> {
    let mut t: Vec<(usize, usize)> = (0..groups.len()).flat_map(|g| (0..n_kv).map(move |kv| (g, kv))).collect();
    t.sort_by_key(|&(g, _)| std::cmp::Reverse(groups[g].end - groups[g].start));
    t
}

/// `out[N, n_heads * hd]`: softmax(scale q k^T, masked) v per query head; `lse[N, n_heads]`: the
/// log-sum-exp of each row of scaled scores, for the backward. Rows outside every span are left as they
/// are. `qkv: [N, qkv_dim]`. The products run in `precision` (see [`Geo::precision`]).
pub fn attention_forward(
    out: &mut [f32],
    lse: &mut [f32],
    qkv: &[f32],
    dims: &AttnDims,
    spans: &[Span],
    groups: &[Range<u32>],
    precision: Precision,
) {
    let (nh, hd) = (dims.n_heads, dims.head_dim);
    let n = qkv.len() / dims.qkv_dim().max(1);
    assert_eq!(qkv.len(), n * dims.qkv_dim(), "attention_forward: qkv is not [N, qkv_dim]");
    assert_eq!(out.len(), n * nh * hd, "attention_forward: out is not [N, n_heads * head_dim]");
    assert_eq!(lse.len(), n * nh, "attention_forward: lse is not [N, n_heads]");
    let per_group = plan(dims, n, spans, groups);
    let (out_p, lse_p) = (SharedMut(out.as_mut_ptr()), SharedMut(lse.as_mut_ptr()));
    tasks(groups, dims.n_kv_heads).into_par_iter().for_each(|(gi, kv)| {
        let (spans, nk_max) = &per_group[gi];
        if spans.is_empty() {
            return;
        }
        let geo = Geo::new(dims, kv, precision);
        let m_max = geo.rep * BQ;
        let mut qs = vec![0.0f32; m_max * hd];
        let mut o = vec![0.0f32; m_max * hd];
        let mut s = vec![0.0f32; m_max * nk_max];
        let mut inv = vec![0.0f32; m_max];
        for span in spans {
            for q0 in (span.start as usize..span.end as usize).step_by(BQ) {
                let b = Block::new(span, q0);
                let (bq, nk) = (b.bq(), b.nk());
                let m = geo.rep * bq;
                geo.load_q(&mut qs, qkv, &b);
                // SAFETY: `plan` checked that the block's keys are rows of `qkv` inside the group.
                unsafe { geo.scores(&mut s, &qs, qkv, &b) };
                for (mi, row) in s[..m * nk].chunks_exact_mut(nk).enumerate() {
                    let (hh, i) = (mi / bq, b.q0 + mi % bq);
                    let (ctx, own) = b.cols(i, dims.window);
                    let (mx, sum) = softmax_row(row, ctx, own);
                    inv[mi] = 1.0 / sum;
                    // SAFETY: row i, head h0 + hh of `lse` belongs to this task alone.
                    unsafe { *lse_p.get().add(i * nh + geo.h0 + hh) = mx + sum.ln() };
                }
                // SAFETY: as for the scores.
                unsafe { geo.times_keys(&mut o, &s, qkv, &b, geo.voff) };
                for (mi, src) in o[..m * hd].chunks_exact(hd).enumerate() {
                    let (hh, i) = (mi / bq, b.q0 + mi % bq);
                    // SAFETY: row i, head h0 + hh of `out` belongs to this task alone, and is in bounds.
                    let dst =
                        unsafe { std::slice::from_raw_parts_mut(out_p.get().add((i * nh + geo.h0 + hh) * hd), hd) };
                    dst.iter_mut().zip(src).for_each(|(d, &v)| *d = v * inv[mi]);
                }
            }
        }
    });
}

/// Backward of [`attention_forward`]: `dqkv [N, qkv_dim]` is overwritten with the gradients of the
/// queries, keys and values (rows outside every group are zeroed).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dqkv: &mut [f32],
    dout: &[f32],
    out: &[f32],
    lse: &[f32],
    qkv: &[f32],
    dims: &AttnDims,
    spans: &[Span],
    groups: &[Range<u32>],
    precision: Precision,
) {
    let (nh, hd, qd) = (dims.n_heads, dims.head_dim, dims.qkv_dim());
    let n = qkv.len() / qd.max(1);
    assert_eq!(qkv.len(), n * qd, "attention_backward: qkv is not [N, qkv_dim]");
    assert_eq!(dqkv.len(), n * qd, "attention_backward: dqkv is not [N, qkv_dim]");
    assert!(out.len() == n * nh * hd && dout.len() == n * nh * hd, "attention_backward: out/dout shapes");
    assert_eq!(lse.len(), n * nh, "attention_backward: lse is not [N, n_heads]");
    let per_group = plan(dims, n, spans, groups);
    // Rows no task owns.
    let mut covered = 0usize;
    for g in groups {
        dqkv[covered * qd..g.start as usize * qd].fill(0.0);
        covered = g.end as usize;
    }
    dqkv[covered * qd..].fill(0.0);

    let dqkv_p = SharedMut(dqkv.as_mut_ptr());
    tasks(groups, dims.n_kv_heads).into_par_iter().for_each(|(gi, kv)| {
        let geo = Geo::new(dims, kv, precision);
        let g = &groups[gi];
        // Zero this task's columns of its rows: its query heads, its key head, its value head.
        for r in g.start as usize..g.end as usize {
            for (c0, w) in [(geo.h0 * hd, geo.rep * hd), (geo.koff, hd), (geo.voff, hd)] {
                // SAFETY: these columns of row r belong to this task alone.
                unsafe { std::slice::from_raw_parts_mut(dqkv_p.get().add(r * qd + c0), w).fill(0.0) };
            }
        }
        let (spans, nk_max) = &per_group[gi];
        if spans.is_empty() {
            return;
        }
        let m_max = geo.rep * BQ;
        let mut qs = vec![0.0f32; m_max * hd];
        let mut dos = vec![0.0f32; m_max * hd];
        let mut dqs = vec![0.0f32; m_max * hd];
        let mut dvec = vec![0.0f32; m_max];
        let mut p = vec![0.0f32; m_max * nk_max];
        let mut dp = vec![0.0f32; m_max * nk_max];
        for span in spans {
            for q0 in (span.start as usize..span.end as usize).step_by(BQ) {
                let b = Block::new(span, q0);
                let (bq, nk) = (b.bq(), b.nk());
                let m = geo.rep * bq;
                geo.load_q(&mut qs, qkv, &b);
                for (mi, (dst, d)) in dos.chunks_exact_mut(hd).zip(dvec.iter_mut()).take(m).enumerate() {
                    let (hh, i) = (mi / bq, b.q0 + mi % bq);
                    let at = (i * nh + geo.h0 + hh) * hd;
                    dst.copy_from_slice(&dout[at..at + hd]);
                    *d = dot_lanes(&dout[at..at + hd], &out[at..at + hd]);
                }
                // SAFETY (all gemms below): `plan` checked that the block's keys are rows of the group,
                // whose key and value columns belong to this task alone.
                unsafe { geo.scores(&mut p, &qs, qkv, &b) };
                for (mi, row) in p[..m * nk].chunks_exact_mut(nk).enumerate() {
                    let (hh, i) = (mi / bq, b.q0 + mi % bq);
                    let (ctx, own) = b.cols(i, dims.window);
                    prob_row(row, ctx, own, lse[i * nh + geo.h0 + hh]);
                }
                // dP[m, nk] = dO[m, hd] . V[keys]^T
                for (k0, nkp, c0) in b.parts() {
                    let lhs = View { ptr: dos.as_ptr(), rs: hd as isize, cs: 1 };
                    let rhs = unsafe { View { ptr: qkv.as_ptr().add(k0 * qd + geo.voff), rs: 1, cs: qd as isize } };
                    unsafe {
                        gemm_view(
                            m,
                            nkp,
                            hd,
                            dp.as_mut_ptr().add(c0),
                            nk as isize,
                            1,
                            false,
                            lhs,
                            rhs,
                            1.0,
                            false,
                            geo.precision,
                        )
                    };
                }
                for (mi, (g, p)) in dp[..m * nk].chunks_exact_mut(nk).zip(p.chunks_exact(nk)).enumerate() {
                    dsoftmax_row(g, p, dvec[mi]);
                }
                // dQ = scale dS . K, written to this task's query columns.
                unsafe { geo.times_keys(&mut dqs, &dp, qkv, &b, geo.koff) };
                for (mi, src) in dqs[..m * hd].chunks_exact(hd).enumerate() {
                    let (hh, i) = (mi / bq, b.q0 + mi % bq);
                    let dst =
                        unsafe { std::slice::from_raw_parts_mut(dqkv_p.get().add(i * qd + (geo.h0 + hh) * hd), hd) };
                    dst.iter_mut().zip(src).for_each(|(d, &v)| *d += v * geo.scale);
                }
                // dK[keys] += dS^T . (scale Q);  dV[keys] += P^T . dO
                for (k0, nkp, c0) in b.parts() {
                    for (src, rhs_buf, off) in [(&dp, &qs, geo.koff), (&p, &dos, geo.voff)] {
                        let lhs = unsafe { View { ptr: src.as_ptr().add(c0), rs: 1, cs: nk as isize } };
                        let rhs = View { ptr: rhs_buf.as_ptr(), rs: hd as isize, cs: 1 };
                        unsafe {
                            gemm_view(
                                nkp,
                                hd,
                                m,
                                dqkv_p.get().add(k0 * qd + off),
                                qd as isize,
                                1,
                                true,
                                lhs,
                                rhs,
                                1.0,
                                false,
                                geo.precision,
                            )
                        };
                    }
                }
            }
        }
    });
}

#[cfg(test)]
#[path = "attention_tests.rs"]
mod tests;
