//! The decoder block, forward and backward side by side: the one place that spells a layer of the
//! family. Training, scoring, a prompt's prefill and a decode step all run [`Decoder::block_forward`];
//! only how the rows attend ([`Attend`]) differs.
//!
//! ```text
//! h      = norm1(x)                                  [N, d]
//! qkv    = h W_qkv^T + b_qkv                         [N, qkv_dim]
//! q, k   = per-head RMSNorm    (qk_norm: Qwen3)
//! q, k   = rotary              (except layers_without_rope: SmolLM3)
//! attn   = attention(qkv)                            [N, n_heads * hd]
//! o      = attn W_o^T + b_o                          [N, d]
//! o      = post_attn_norm(o)   (post_norms: Gemma)
//! x_mid  = x + o            (sequential residual)    [N, d]
//! pre    = norm2(x_mid or x) W_in^T + b_in           [N, mlp_in]   (norm1 again with shared_norm: GPT-J)
//! m      = mlp(pre), then post_mlp_norm(m) (post_norms: Gemma)  [N, d]
//! out    = x_mid + m  or  x + o + m                  [N, d]
//! ```
//!
//! A new architecture switch (a norm on q and k, a layer without rotary, a norm after each branch) is
//! one step in `block_forward` and its mirror in `block_backward`, at the place the diagram names.
//!
//! A LoRA adapter adds its pairs' low-rank updates after each of the four linears ([`super::lora_block`]).
//! With a frozen base ([`LayerGrads::Adapter`]) backward computes input gradients only: no weight, bias
//! or norm gradient of the base.
//!
//! The four linears read their weights through [`LayerView::weight`]: the layer's f32 tensors, or a
//! frozen base's stored matrices (bf16, NF4: [`crate::quant`]), widened tile by tile inside the product.

use rayon::prelude::*;

use crate::batch::Batch;
use crate::generate::KvCache;
use crate::generate::LayerCache;
use crate::head_norm;
use crate::kernels::{self as k, LinearDims, LinearGrads, Precision, RopeTable};
use crate::lora::{LayerAdapter, Site};
use crate::params::LayerParams;
use crate::quant::bf16;

use super::acts::{fit, LayerActs, Scratch, CONVERT_CHUNK};
use super::linear::LayerView;
use super::lora_block::{self as lora, LayerLora};
use super::view::LayerGrads;
use super::{act_backward, act_forward, bias, bias_mut, norm_backward, norm_forward, Decoder};

/// How the rows of a block attend.
pub(crate) enum Attend<'a, 'c> {
    /// A packed stream (training, scoring, a prompt's prefill): each row attends within its span by the
    /// blocked kernel, and the projections are GEMMs. With `cache`, the rows' keys and values after
    /// rotary are also appended to it (a prefill).
    Packed { batch: &'a Batch, cache: Option<&'a mut LayerCache> },
    /// A decode step: row `r` is one new token of `caches[r]` at `positions[r]`; it appends its key and
    /// value to that cache's layer `layer` and attends to all of it. The projections are the
    /// row-independent kernels, so a row's result does not depend on the others.
    Cached { caches: &'a mut [&'c mut KvCache], layer: usize, positions: &'a [u32] },
}

impl Attend<'_, '_> {
    fn positions(&self) -> &[u32] {
        match self {
            Attend::Packed { batch, .. } => &batch.positions,
            Attend::Cached { positions, .. } => positions,
        }
    }
}

impl Decoder {
    /// Block `layer` on the `N = la.x.len() / d` rows of `la.x` (`[N, d]`), with the layer's adapter
    /// `adapter` if any: writes the block's output (the next residual stream) to `out` (`[N, d]`) and
    /// keeps in `la` what [`Decoder::block_backward`] reads.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn block_forward(
        &self,
        lp: LayerView,
        layer: usize,
        adapter: Option<LayerLora>,
        la: &mut LayerActs,
        s: &mut Scratch,
        rope: Option<&RopeTable>,
        attend: Attend,
        out: &mut [f32],
    ) {
        let cfg = &self.cfg;
        let (d, ff, hd, nh, nkv) = (cfg.hidden, cfg.ffn_hidden, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads);
        let n = la.x.len() / d;
        let (qkv_dim, mlp_in) = (cfg.qkv_dim(), cfg.mlp_in_dim());
        let packed = matches!(attend, Attend::Packed { .. });
        // y[n, out] = x[n, in] W^T + b, W the site's weight (f32 or stored), [out, in].
        let linear = |site: Site, y: &mut [f32], x: &[f32], b, inp, out| {
            lp.weight(site).forward(y, x, b, LinearDims { rows: n, inp, out }, packed, lp.precision)
        };
        la.lora.begin(adapter);
        fit(&mut la.qkv, n * qkv_dim);
        fit(&mut la.mlp_pre, n * mlp_in);
        for v in [&mut s.h, &mut s.o] {
            fit(v, n * d);
        }
        fit(&mut s.act, n * ff);
        fit(&mut s.stat_a, n);
        fit(&mut s.stat_b, n);

        // Attention: h = norm1(x); qkv = h W_qkv^T + b; rotate q, k; attend; o = attn W_o^T + b.
        norm_forward(cfg.norm, &lp.norm1, &mut s.h, &mut s.stat_a, &mut s.stat_b, &la.x, n, d);
        linear(Site::Qkv, &mut la.qkv, &s.h, bias(&lp.b_qkv), d, qkv_dim);
        lora::forward(Site::Qkv, adapter, &s.h, &mut la.qkv, &mut la.lora, &mut s.lora, n, packed);
        if let (Some(wq), Some(wk)) = (&lp.q_norm, &lp.k_norm) {
            head_norm::forward(cfg, &wq.data, &wk.data, &mut la.qkv, &mut la.qk_pre, n);
        }
        if let Some(t) = rope {
            let positions = attend.positions();
            k::rope_apply(&mut la.qkv, qkv_dim, 0, nh, hd, positions, t, false);
            k::rope_apply(&mut la.qkv, qkv_dim, nh * hd, nkv, hd, positions, t, false);
        }
        if lp.precision == Precision::Bf16 {
            // Attention reads q, k and v in bf16, as under autocast (where they are the outputs of a bf16
            // product): its softmax statistics then belong to the values a bf16 pass keeps for backward.
            la.qkv.par_chunks_mut(CONVERT_CHUNK).for_each(bf16::round_in_place);
        }
        self.attention_half(lp, layer, adapter, la, s, attend, true);

        // MLP input: norm2 of x (parallel residual) or of x_mid = x + attention (sequential).
        let mlp_input = if cfg.parallel_residual { &la.x } else { &la.x_mid };
        norm_forward(cfg.norm, lp.mlp_norm(), &mut s.h, &mut s.stat_a, &mut s.stat_b, mlp_input, n, d);
        linear(Site::MlpIn, &mut la.mlp_pre, &s.h, bias(&lp.b_in), d, mlp_in);
        lora::forward(Site::MlpIn, adapter, &s.h, &mut la.mlp_pre, &mut la.lora, &mut s.lora, n, packed);
        act_forward(cfg.mlp, &mut s.act, &la.mlp_pre, n, ff);
        // s.h is free again: it takes the MLP output.
        linear(Site::MlpOut, &mut s.h, &s.act, bias(&lp.b_out), ff, d);
        lora::forward(Site::MlpOut, adapter, &s.act, &mut s.h, &mut la.lora, &mut s.lora, n, packed);
        if let Some(post) = &lp.post_mlp_norm {
            fit(&mut la.mlp_out, n * d);
            la.mlp_out.copy_from_slice(&s.h);
            norm_forward(cfg.norm, post, &mut s.h, &mut s.stat_a, &mut s.stat_b, &la.mlp_out, n, d);
        }

        // Residual: out = (x + o) + mlp (parallel) or x_mid + mlp (sequential).
        if cfg.parallel_residual {
            k::add3(out, &la.x, &s.o);
            k::add_inplace(out, &s.h);
        } else {
            k::add3(out, &la.x_mid, &s.h);
        }
    }

    /// The attention half of [`Decoder::block_forward`] once `la.qkv` holds q, k and v: attention into
    /// `la.attn` (and its log-sum-exp), then with `project` the output projection into `s.o` (after its
    /// norm with `post_norms`) and, with a sequential residual, `la.x_mid = x + o`.
    ///
    /// The backward of a pass that did not keep `attn`, `o_pre` and `x_mid` ([`super::Activations`]'s
    /// `recomputes_attention`) re-runs it from what it kept (`x`, `qkv`, the adapter's `u`): the same
    /// kernels on the same inputs, so the same bits. `project: false` there skips the projection where
    /// backward reads none of its results (a parallel residual without a norm on the branch).
    #[allow(clippy::too_many_arguments)]
    fn attention_half(
        &self,
        lp: LayerView,
        layer: usize,
        adapter: Option<LayerLora>,
        la: &mut LayerActs,
        s: &mut Scratch,
        attend: Attend,
        project: bool,
    ) {
        let cfg = &self.cfg;
        let (d, hd, nh, nkv) = (cfg.hidden, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads);
        let n = la.x.len() / d;
        let (qkv_dim, attn_dim) = (cfg.qkv_dim(), cfg.attn_dim());
        let packed = matches!(attend, Attend::Packed { .. });
        fit(&mut la.attn, n * attn_dim);
        let (k_cols, v_cols) = (nh * hd..(nh + nkv) * hd, (nh + nkv) * hd..(nh + 2 * nkv) * hd);
        match attend {
            Attend::Packed { batch, cache } => {
                if let Some(c) = cache {
                    for row in la.qkv.chunks_exact(qkv_dim) {
                        c.k.extend_from_slice(&row[k_cols.clone()]);
                        c.v.extend_from_slice(&row[v_cols.clone()]);
                    }
                }
                fit(&mut la.lse, n * nh);
                k::attention_forward(
                    &mut la.attn,
                    &mut la.lse,
                    &la.qkv,
                    &self.attn_dims(layer),
                    &batch.spans,
                    &batch.groups,
                    lp.precision,
                );
            }
            Attend::Cached { caches, layer: cache_layer, .. } => {
                for (c, row) in caches.iter_mut().zip(la.qkv.chunks_exact(qkv_dim)) {
                    let c = &mut c.layers[cache_layer];
                    c.k.extend_from_slice(&row[k_cols.clone()]);
                    c.v.extend_from_slice(&row[v_cols.clone()]);
                }
                let keys: Vec<&[f32]> = caches.iter().map(|c| &c.layers[cache_layer].k[..]).collect();
                let values: Vec<&[f32]> = caches.iter().map(|c| &c.layers[cache_layer].v[..]).collect();
                k::decode_attention(&mut la.attn, &la.qkv, qkv_dim, &keys, &values, &self.attn_dims(layer));
            }
        }
        if !project {
            return;
        }
        fit(&mut s.o, n * d);
        fit(&mut s.stat_a, n);
        fit(&mut s.stat_b, n);
        lp.weight(Site::AttnOut).forward(
            &mut s.o,
            &la.attn,
            bias(&lp.b_o),
            LinearDims { rows: n, inp: attn_dim, out: d },
            packed,
            lp.precision,
        );
        lora::forward(Site::AttnOut, adapter, &la.attn, &mut s.o, &mut la.lora, &mut s.lora, n, packed);
        if let Some(post) = &lp.post_attn_norm {
            // o = post_attn_norm(o); the norm's input is kept for backward.
            fit(&mut la.o_pre, n * d);
            la.o_pre.copy_from_slice(&s.o);
            norm_forward(cfg.norm, post, &mut s.o, &mut s.stat_a, &mut s.stat_b, &la.o_pre, n, d);
        }
        if !cfg.parallel_residual {
            fit(&mut la.x_mid, n * d);
            k::add3(&mut la.x_mid, &la.x, &s.o);
        }
    }

    /// Re-runs the attention half of layer `layer`'s block on the packed batch `b` before its backward,
    /// for a pass that kept `la`'s input and q, k, v but not what attention made of them
    /// ([`Decoder::attention_half`]). `adapter`: the layer's adapter as its forward applied it.
    pub(crate) fn recompute_attention_half(
        &self,
        lp: LayerView,
        layer: usize,
        adapter: Option<LayerLora>,
        la: &mut LayerActs,
        s: &mut Scratch,
        b: &Batch,
    ) {
        // A parallel residual's backward reads `o` only through its post-norm's input.
        let project = !self.cfg.parallel_residual || lp.post_attn_norm.is_some();
        self.attention_half(lp, layer, adapter, la, s, Attend::Packed { batch: b, cache: None }, project);
    }

    /// The backward of [`Decoder::block_forward`] on a packed batch `b`, from what it kept in `la`. On
    /// entry `s.dx` (`[N, d]`) holds the gradient of the block's output; on exit, of its input. Gradients
    /// accumulate into `lg`: the base's parameters, or (frozen base) the pairs of the layer's adapter
    /// `adapter`, the one the forward applied. Norm outputs and the MLP activation are recomputed, not kept.
    /// `input_grad: false` (nothing below the block is trained: the lowest adapted layer of a frozen base)
    /// skips the products that only feed the input's gradient (the input gradients of w_qkv and, parallel
    /// residual, of w_in, and the norms'); `s.dx` is then left unspecified.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn block_backward(
        &self,
        lp: LayerView,
        layer: usize,
        adapter: Option<&LayerAdapter>,
        lg: LayerGrads,
        input_grad: bool,
        b: &Batch,
        la: &LayerActs,
        s: &mut Scratch,
        rope: Option<&RopeTable>,
    ) {
        let cfg = &self.cfg;
        let (n, d, ff) = (b.len(), cfg.hidden, cfg.ffn_hidden);
        let (qkv_dim, attn_dim, mlp_in) = (cfg.qkv_dim(), cfg.attn_dim(), cfg.mlp_in_dim());
        let mlp_input = if cfg.parallel_residual { &la.x } else { &la.x_mid };
        // `base`: where the base's gradients go (none when frozen); `pairs`: the adapter's, after each
        // linear's input gradient.
        let (mut base, mut pairs) = match lg {
            LayerGrads::Full(g) => (Some(g), None),
            LayerGrads::Adapter(g) => {
                (None, adapter.map(|adapter| lora::PairGrads { adapter, grads: g, acts: &la.lora }))
            }
        };
        // Parallel residual: w_in's input gradient reaches the adapters only through the block's input.
        let mlp_in_grad = input_grad || !cfg.parallel_residual;

        // MLP output norm (post_norms): s.dh = its input's gradient; otherwise the MLP output's gradient
        // is dx itself.
        if let Some(post) = &lp.post_mlp_norm {
            let g = base.as_deref_mut().and_then(|g| g.post_mlp_norm.as_mut());
            post_norm_backward(cfg.norm, post, g, s, &la.mlp_out, n, d);
        }
        let dmlp_out = if cfg.post_norms { &s.dh } else { &s.dx };

        // MLP: recompute h2 = norm2(input) and the activation, then back through w_out, act, w_in.
        norm_forward(cfg.norm, lp.mlp_norm(), &mut s.h, &mut s.stat_a, &mut s.stat_b, mlp_input, n, d);
        act_forward(cfg.mlp, &mut s.act, &la.mlp_pre, n, ff);
        let grads = linear_grads(base.as_deref_mut(), Site::MlpOut);
        let dims = LinearDims { rows: n, inp: ff, out: d };
        lp.weight(Site::MlpOut).backward(&mut s.dact, grads, dmlp_out, &s.act, dims, lp.precision);
        if let Some(pg) = &mut pairs {
            pg.site(Site::MlpOut, &mut s.lora, &s.act, dmlp_out, Some(&mut s.dact), n);
        }
        // An ungated MLP's pre-activation gradient has the activation's shape, and the activation is dead
        // once w_out's backward has read it: it takes the activation's buffer (`Scratch::dpre` stays empty).
        let shares = mlp_in == ff;
        let mut dpre = std::mem::take(if shares { &mut s.act } else { &mut s.dpre });
        act_backward(cfg.mlp, &mut dpre, &s.dact, &la.mlp_pre, n, ff);
        if mlp_in_grad {
            let grads = linear_grads(base.as_deref_mut(), Site::MlpIn);
            let dims = LinearDims { rows: n, inp: d, out: mlp_in };
            lp.weight(Site::MlpIn).backward(&mut s.dh, grads, &dpre, &s.h, dims, lp.precision);
        }
        if let Some(pg) = &mut pairs {
            pg.site(Site::MlpIn, &mut s.lora, &s.h, &dpre, mlp_in_grad.then_some(&mut s.dh[..]), n);
        }
        *(if shares { &mut s.act } else { &mut s.dpre }) = dpre;
        if !cfg.parallel_residual {
            // dx becomes the gradient of x_mid = x + attention.
            let g = base.as_deref_mut().map(LayerParams::mlp_norm_mut);
            let (stat_a, stat_b) = (&s.stat_a, &s.stat_b);
            norm_backward(cfg.norm, lp.mlp_norm(), g, &mut s.dx, &s.dh, mlp_input, stat_a, stat_b, n, d);
        } else {
            // Parallel: the MLP's norm reads x itself; its gradient joins dx after the attention branch
            // has used dx (the gradient of the layer output) as its own output gradient.
            std::mem::swap(&mut s.dh, &mut s.o);
        }

        // Attention: back through its output norm (post_norms), w_o, the attention kernel, the rotation
        // and w_qkv.
        if let Some(post) = &lp.post_attn_norm {
            let g = base.as_deref_mut().and_then(|g| g.post_attn_norm.as_mut());
            post_norm_backward(cfg.norm, post, g, s, &la.o_pre, n, d);
        }
        let do_proj = if cfg.post_norms { &s.dh } else { &s.dx };
        let grads = linear_grads(base.as_deref_mut(), Site::AttnOut);
        let dims = LinearDims { rows: n, inp: attn_dim, out: d };
        lp.weight(Site::AttnOut).backward(&mut s.dattn, grads, do_proj, &la.attn, dims, lp.precision);
        if let Some(pg) = &mut pairs {
            pg.site(Site::AttnOut, &mut s.lora, &la.attn, do_proj, Some(&mut s.dattn), n);
        }
        k::attention_backward(
            &mut s.dqkv,
            &s.dattn,
            &la.attn,
            &la.lse,
            &la.qkv,
            &self.attn_dims(layer),
            &b.spans,
            &b.groups,
            lp.precision,
        );
        if let Some(t) = rope {
            let hd = cfg.head_dim;
            k::rope_apply(&mut s.dqkv, qkv_dim, 0, cfg.n_heads, hd, &b.positions, t, true);
            k::rope_apply(&mut s.dqkv, qkv_dim, cfg.n_heads * hd, cfg.n_kv_heads, hd, &b.positions, t, true);
        }
        if let (Some(wq), Some(wk)) = (&lp.q_norm, &lp.k_norm) {
            let g = base.as_deref_mut().and_then(|g| g.q_norm.as_mut().zip(g.k_norm.as_mut()));
            let g = g.map(|(gq, gk)| (&mut gq.data[..], &mut gk.data[..]));
            head_norm::backward(cfg, &wq.data, &wk.data, g, &mut s.dqkv, &la.qk_pre, n);
        }
        norm_forward(cfg.norm, &lp.norm1, &mut s.h, &mut s.stat_a, &mut s.stat_b, &la.x, n, d);
        if input_grad {
            let grads = linear_grads(base.as_deref_mut(), Site::Qkv);
            let dims = LinearDims { rows: n, inp: d, out: qkv_dim };
            lp.weight(Site::Qkv).backward(&mut s.dh, grads, &s.dqkv, &s.h, dims, lp.precision);
        }
        if let Some(pg) = &mut pairs {
            pg.site(Site::Qkv, &mut s.lora, &s.h, &s.dqkv, input_grad.then_some(&mut s.dh[..]), n);
        }
        if !input_grad {
            return;
        }
        let g = base.as_deref_mut().map(|g| &mut g.norm1);
        norm_backward(cfg.norm, &lp.norm1, g, &mut s.dx, &s.dh, &la.x, &s.stat_a, &s.stat_b, n, d);
        if cfg.parallel_residual {
            // Now add the MLP branch's norm gradient (its dh was parked in s.o).
            norm_forward(cfg.norm, lp.mlp_norm(), &mut s.h, &mut s.stat_a, &mut s.stat_b, &la.x, n, d);
            let g = base.map(LayerParams::mlp_norm_mut);
            norm_backward(cfg.norm, lp.mlp_norm(), g, &mut s.dx, &s.o, &la.x, &s.stat_a, &s.stat_b, n, d);
        }
    }
}

/// The gradient slots of `site`'s weight and bias in `g`; none with a frozen base (`g = None`), which
/// skips the weight-gradient GEMM and leaves the input gradient alone.
fn linear_grads(g: Option<&mut LayerParams>, site: Site) -> LinearGrads<'_> {
    let Some(g) = g else { return LinearGrads { w: None, b: None } };
    let (w, b) = match site {
        Site::Qkv => (&mut g.w_qkv, &mut g.b_qkv),
        Site::AttnOut => (&mut g.w_o, &mut g.b_o),
        Site::MlpIn => (&mut g.w_in, &mut g.b_in),
        Site::MlpOut => (&mut g.w_out, &mut g.b_out),
    };
    LinearGrads { w: Some(&mut w.data), b: bias_mut(b) }
}

/// Backward of a norm on a branch's output (`post_norms`): from the gradient of its output in `s.dx`,
/// writes that of its input `x` (`[N, d]`) to `s.dh`; the weight gradient accumulates into `g` (none: frozen). Uses
/// `s.h` and the statistics as scratch.
fn post_norm_backward(
    kind: crate::config::NormKind,
    np: &crate::params::NormParams,
    g: Option<&mut crate::params::NormParams>,
    s: &mut Scratch,
    x: &[f32],
    n: usize,
    d: usize,
) {
    norm_forward(kind, np, &mut s.h, &mut s.stat_a, &mut s.stat_b, x, n, d);
    s.dh.iter_mut().for_each(|v| *v = 0.0);
    norm_backward(kind, np, g, &mut s.dh, &s.dx, x, &s.stat_a, &s.stat_b, n, d);
}
