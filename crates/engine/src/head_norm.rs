//! Per-head RMSNorm of queries and keys before the rotation (Qwen3 and Gemma 3's `q_norm` / `k_norm`).
//!
//! Each head's `hd` query values are normalised with one weight vector `q_norm [hd]` shared by all query
//! heads, and likewise each key head with `k_norm [hd]`: HF `Qwen3RMSNorm(head_dim)` applied to
//! `q.view(.., n_heads, head_dim)`. With the model's unit-offset norm (Gemma 3) the factor is `1 + w`. The q and k columns of the fused `[N, qkv_dim]` rows are gathered
//! into `[N * heads, hd]` blocks so that the ordinary RMSNorm kernels do the work.

use crate::config::{DecoderConfig, NormKind};
use crate::kernels as k;
use crate::model::rms_scale;

/// `[rows, width]` columns `offset..offset + width` of `[rows, stride]` rows, copied out (`to_rows` false)
/// or back in (`to_rows` true).
fn columns(rows: &mut [f32], block: &mut [f32], stride: usize, offset: usize, width: usize, to_rows: bool) {
    for (row, b) in rows.chunks_exact_mut(stride).zip(block.chunks_exact_mut(width)) {
        let r = &mut row[offset..offset + width];
        if to_rows {
            r.copy_from_slice(b);
        } else {
            b.copy_from_slice(r);
        }
    }
}

/// The epsilon of the model's norms (HF passes `rms_norm_eps` to the q/k norms too).
fn eps(cfg: &DecoderConfig) -> f32 {
    match cfg.norm {
        NormKind::RmsNorm { eps } | NormKind::RmsNormUnitOffset { eps } | NormKind::LayerNorm { eps } => eps,
    }
}

/// The q (then k) block sizes: `(q heads, k heads)` rows of `hd`.
fn blocks(cfg: &DecoderConfig, n: usize) -> (usize, usize) {
    (n * cfg.n_heads, n * cfg.n_kv_heads)
}

/// Normalises the q and k columns of `qkv [n, qkv_dim]` in place; `pre` receives them before the norm,
/// q heads `[n * n_heads, hd]` then k heads `[n * n_kv_heads, hd]` (what backward reads).
pub(crate) fn forward(cfg: &DecoderConfig, wq: &[f32], wk: &[f32], qkv: &mut [f32], pre: &mut Vec<f32>, n: usize) {
    let (wq, wk) = (&*rms_scale(cfg.norm, wq), &*rms_scale(cfg.norm, wk));
    let (hd, qd) = (cfg.head_dim, cfg.qkv_dim());
    let (qr, kr) = blocks(cfg, n);
    pre.clear();
    pre.resize((qr + kr) * hd, 0.0);
    let (pq, pk) = pre.split_at_mut(qr * hd);
    columns(qkv, pq, qd, 0, cfg.n_heads * hd, false);
    columns(qkv, pk, qd, cfg.n_heads * hd, cfg.n_kv_heads * hd, false);
    let mut out = vec![0.0f32; (qr + kr) * hd]; // [q rows + k rows, hd]
    let mut rstd = vec![0.0f32; qr + kr];
    let (oq, ok) = out.split_at_mut(qr * hd);
    let (rq, rk) = rstd.split_at_mut(qr);
    k::rms_norm_forward(oq, rq, pq, wq, qr, hd, eps(cfg));
    k::rms_norm_forward(ok, rk, pk, wk, kr, hd, eps(cfg));
    columns(qkv, oq, qd, 0, cfg.n_heads * hd, true);
    columns(qkv, ok, qd, cfg.n_heads * hd, cfg.n_kv_heads * hd, true);
}

/// Backward of [`forward`]: on entry the q and k columns of `dqkv [n, qkv_dim]` hold the gradient of the
/// normalised values, on exit of the values before the norm; `dw = (dwq, dwk) +=` the weight gradients
/// (`None`: frozen norms, the input gradient alone).
pub(crate) fn backward(
    cfg: &DecoderConfig,
    wq: &[f32],
    wk: &[f32],
    dw: Option<(&mut [f32], &mut [f32])>,
    dqkv: &mut [f32],
    pre: &[f32],
    n: usize,
) {
    let (wq, wk) = (&*rms_scale(cfg.norm, wq), &*rms_scale(cfg.norm, wk));
    let (hd, qd) = (cfg.head_dim, cfg.qkv_dim());
    let (qr, kr) = blocks(cfg, n);
    let (pq, pk) = pre.split_at(qr * hd);
    // Recompute the statistics (the normalised values themselves are not needed).
    let mut scratch = vec![0.0f32; (qr + kr) * hd];
    let mut rstd = vec![0.0f32; qr + kr];
    {
        let (sq, sk) = scratch.split_at_mut(qr * hd);
        let (rq, rk) = rstd.split_at_mut(qr);
        k::rms_norm_forward(sq, rq, pq, wq, qr, hd, eps(cfg));
        k::rms_norm_forward(sk, rk, pk, wk, kr, hd, eps(cfg));
    }
    let mut dout = scratch; // [q rows + k rows, hd] gradient of the normalised values
    let (dq, dk) = dout.split_at_mut(qr * hd);
    columns(dqkv, dq, qd, 0, cfg.n_heads * hd, false);
    columns(dqkv, dk, qd, cfg.n_heads * hd, cfg.n_kv_heads * hd, false);
    let mut dx = vec![0.0f32; (qr + kr) * hd];
    let (xq, xk) = dx.split_at_mut(qr * hd);
    let (rq, rk) = rstd.split_at(qr);
    match dw {
        Some((dwq, dwk)) => {
            k::rms_norm_backward(xq, dwq, dq, pq, rq, wq, qr, hd);
            k::rms_norm_backward(xk, dwk, dk, pk, rk, wk, kr, hd);
        }
        None => {
            k::rms_norm_input_grad(xq, dq, pq, rq, wq, qr, hd);
            k::rms_norm_input_grad(xk, dk, pk, rk, wk, kr, hd);
        }
    }
    columns(dqkv, xq, qd, 0, cfg.n_heads * hd, true);
    columns(dqkv, xk, qd, cfg.n_heads * hd, cfg.n_kv_heads * hd, true);
}
