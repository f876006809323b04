//! The decoder family's forward and backward passes, assembled from `crate::kernels`.
//!
//! Forward keeps, per layer, only what backward cannot cheaply recompute: the layer input `x`, the
//! post-rotary `qkv`, the attention output and its log-sum-exp, the mid-layer residual (sequential
//! layout only) and the MLP pre-activation. Norm outputs and MLP activations are recomputed in backward
//! (two passes over `[N, d]` instead of storing them), which keeps activation memory near
//! `N * (2d + qkv + attn + mlp_in)` floats per layer.

use crate::batch::Batch;
use crate::config::{DecoderConfig, MlpKind, NormKind, PositionKind};
use crate::head_norm;
use crate::kernels::{self as k, AttnDims, RopeTable};
use crate::params::{LayerParams, NormParams, Params};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EngineError {
    #[error("token id {token} at stream index {index} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange { token: u32, index: usize, vocab: usize },
    #[error("position {position} is beyond the model's {max} learned positions; shorten the sequence (e.g. --max-length {max})")]
    PositionOutOfRange { position: usize, max: usize },
    #[error("malformed batch: {0}")]
    MalformedBatch(String),
    #[error("gradient length {got} does not match the {want} targets of the batch")]
    GradientLength { got: usize, want: usize },
}

/// One decoder: its configuration and the rotary table derived from it.
pub struct Decoder {
    pub cfg: DecoderConfig,
    rope: Option<RopeTable>,
}

/// What forward keeps for one layer (see the module doc).
#[derive(Default)]
struct LayerActs {
    x: Vec<f32>,       // [N, d] layer input
    qkv: Vec<f32>,     // [N, qkv_dim] after rotary
    qk_pre: Vec<f32>,  // [N * (n_heads + n_kv_heads), hd] q and k heads before the q/k norm (qk_norm only)
    attn: Vec<f32>,    // [N, n_heads * hd]
    lse: Vec<f32>,     // [N, n_heads]
    x_mid: Vec<f32>,   // [N, d] x + attention (sequential residual only)
    mlp_pre: Vec<f32>, // [N, mlp_in_dim]
}

/// Activations of one forward pass plus scratch space, reused across steps to avoid allocation.
#[derive(Default)]
pub struct Activations {
    n: usize,
    kept: bool,
    layers: Vec<LayerActs>,
    /// `[N, d]` input of the final norm
    x_final: Vec<f32>,
    /// `[N, d]` final hidden states (after the final norm): what the LM head, a reward head or a value
    /// head reads.
    pub hidden: Vec<f32>,
    /// `[targets]` log-sum-exp of the head's logits, saved for its backward
    head_lse: Vec<f32>,
    /// `[N, d]` gradient of the final hidden states (kept to reuse the allocation)
    dhidden: Vec<f32>,
    scratch: Scratch,
}

/// Gradients of embedding lookups held back from one or more backward passes, added to the embedding
/// tables later, in the order they were held back.
///
/// Why: a tied model's token embedding also receives the LM head's gradient. A batch backward adds the
/// head's part (all targets) and then the lookups' part (all tokens); a batch pushed through in parts
/// would interleave them, part by part, and round differently. Holding the lookups back until every
/// part's head gradient is in makes the sum the same chain as the whole batch's, bit for bit.
#[derive(Default)]
pub struct PendingEmbeddingGrads {
    /// `[tokens, d]` gradient of each lookup's output.
    rows: Vec<f32>,
    tokens: Vec<u32>,
    positions: Vec<u32>,
}

impl PendingEmbeddingGrads {
    /// Drops whatever is held back (left by a backward pass whose step was abandoned).
    pub fn clear(&mut self) {
        self.rows.clear();
        self.tokens.clear();
        self.positions.clear();
    }

    /// Adds every held-back row into `grads.wte` (and `grads.wpe`, for learned positions) and empties.
    pub fn apply(&mut self, grads: &mut Params) {
        if !self.tokens.is_empty() {
            let d = self.rows.len() / self.tokens.len();
            let wpe = grads.wpe.as_mut().map(|t| &mut t.data[..]);
            k::embedding_backward(&mut grads.wte.data, wpe, &self.rows, &self.tokens, &self.positions, d);
        }
        self.clear();
    }
}

#[derive(Default)]
struct Scratch {
    h: Vec<f32>,      // [N, d] norm output
    o: Vec<f32>,      // [N, d] projection output
    act: Vec<f32>,    // [N, ff] MLP activation
    stat_a: Vec<f32>, // [N] mean
    stat_b: Vec<f32>, // [N] rstd
    dx: Vec<f32>,     // [N, d]
    dh: Vec<f32>,     // [N, d]
    dact: Vec<f32>,   // [N, ff]
    dpre: Vec<f32>,   // [N, mlp_in]
    dattn: Vec<f32>,  // [N, attn_dim]
    dqkv: Vec<f32>,   // [N, qkv_dim]
}

/// Resizes without keeping contents (every user overwrites before reading).
fn fit(v: &mut Vec<f32>, n: usize) {
    if v.len() != n {
        v.clear();
        v.resize(n, 0.0);
    }
}

/// Per-target outputs of the LM head.
#[derive(Clone, Debug, Default)]
pub struct HeadOutput {
    /// `[targets]` log p(token | prefix)
    pub logp: Vec<f32>,
    /// `[targets]` sum of the logits over the vocabulary (for TRL's `logits/*` metrics)
    pub logit_sum: Vec<f32>,
}

impl Decoder {
    pub fn new(cfg: DecoderConfig) -> Self {
        let rope = match cfg.positions {
            PositionKind::Rotary(r) => Some(RopeTable::new(&r, cfg.max_positions.max(1))),
            PositionKind::Learned => None,
        };
        Decoder { cfg, rope }
    }

    /// A rotary table long enough for `b` when its positions go past `max_positions` (rotary models
    /// extrapolate; learned positions are refused by `check_batch`).
    fn extended_rope(&self, b: &Batch) -> Option<RopeTable> {
        match self.cfg.positions {
            PositionKind::Rotary(r) if b.max_position() > self.cfg.max_positions => {
                Some(RopeTable::new(&r, b.max_position()))
            }
            _ => None,
        }
    }

    fn attn_dims(&self) -> AttnDims {
        AttnDims {
            n_heads: self.cfg.n_heads,
            n_kv_heads: self.cfg.n_kv_heads,
            head_dim: self.cfg.head_dim,
            window: self.cfg.sliding_window,
        }
    }

    /// Checks token ids, positions and the span/group structure before any kernel touches them.
    pub fn check_batch(&self, b: &Batch) -> Result<(), EngineError> {
        let n = b.tokens.len();
        if b.positions.len() != n {
            return Err(EngineError::MalformedBatch(format!("{} tokens but {} positions", n, b.positions.len())));
        }
        if let Some((index, &token)) = b.tokens.iter().enumerate().find(|(_, &t)| t as usize >= self.cfg.vocab_size) {
            return Err(EngineError::TokenOutOfRange { token, index, vocab: self.cfg.vocab_size });
        }
        if matches!(self.cfg.positions, PositionKind::Learned) && b.max_position() > self.cfg.max_positions {
            return Err(EngineError::PositionOutOfRange {
                position: b.max_position() - 1,
                max: self.cfg.max_positions,
            });
        }
        let mut at = 0u32;
        for g in &b.groups {
            if g.start != at || g.end < g.start {
                return Err(EngineError::MalformedBatch("groups must be contiguous and cover the stream".into()));
            }
            at = g.end;
        }
        if at as usize != n {
            return Err(EngineError::MalformedBatch("groups must cover the stream".into()));
        }
        let mut at = 0u32;
        for s in &b.spans {
            let ok = s.start == at
                && s.end >= s.start
                && s.own_start <= s.start
                && s.ctx_start <= s.ctx_end
                && s.ctx_end <= s.own_start
                && b.groups.iter().any(|g| g.start <= s.ctx_start.min(s.own_start) && s.end <= g.end);
            if !ok {
                return Err(EngineError::MalformedBatch(format!("span {s:?} is not valid")));
            }
            at = s.end;
        }
        if at as usize != n {
            return Err(EngineError::MalformedBatch("spans must cover the stream".into()));
        }
        if let Some(t) = b.targets.iter().find(|t| t.pos as usize >= n || t.token as usize >= self.cfg.vocab_size) {
            return Err(EngineError::MalformedBatch(format!("target {t:?} is outside the stream or vocabulary")));
        }
        Ok(())
    }

    /// Runs the trunk: fills `acts.hidden` (`[N, d]`, after the final norm). With `keep`, stores what
    /// [`Decoder::backward`] needs; without it, reuses one set of buffers for every layer.
    pub fn forward(&self, p: &Params, b: &Batch, acts: &mut Activations, keep: bool) -> Result<(), EngineError> {
        self.check_batch(b)?;
        let cfg = &self.cfg;
        let (n, d) = (b.len(), cfg.hidden);
        let extended = self.extended_rope(b);
        let rope = extended.as_ref().or(self.rope.as_ref());
        acts.n = n;
        acts.kept = keep;
        let slots = if keep { cfg.n_layers } else { 1 };
        acts.layers.resize_with(slots, LayerActs::default);
        let s = &mut acts.scratch;
        fit(&mut s.h, n * d);
        fit(&mut s.o, n * d);
        fit(&mut s.act, n * cfg.ffn_hidden);
        fit(&mut s.stat_a, n);
        fit(&mut s.stat_b, n);

        // The residual stream lives in each layer's `x`; the next layer's input is written straight
        // into its own slot (or back into the single slot when nothing is kept).
        // The residual stream lives in each layer's `x`: layer l writes its output straight into layer
        // l+1's slot. Without `keep` there is one slot, and its input and `x_final` swap roles each layer.
        // Buffers are reused from call to call, so a training step allocates nothing large.
        fit(&mut acts.layers[0].x, n * d);
        k::embedding_forward(
            &mut acts.layers[0].x,
            &p.wte.data,
            &b.tokens,
            p.wpe.as_ref().map(|t| &t.data[..]),
            &b.positions,
            d,
        );
        let n_layers = p.layers.len();
        for (l, lp) in p.layers.iter().enumerate() {
            let to_next_slot = keep && l + 1 < n_layers;
            let mut out = if to_next_slot {
                std::mem::take(&mut acts.layers[l + 1].x)
            } else {
                std::mem::take(&mut acts.x_final)
            };
            fit(&mut out, n * d);
            let slot = if keep { l } else { 0 };
            let rope = rope.filter(|_| cfg.rotary_in_layer(l));
            self.layer_forward(lp, b, &mut acts.layers[slot], &mut acts.scratch, rope, &mut out);
            if to_next_slot {
                acts.layers[l + 1].x = out;
            } else if l + 1 < n_layers {
                acts.x_final = std::mem::replace(&mut acts.layers[0].x, out);
            } else {
                acts.x_final = out;
            }
        }
        fit(&mut acts.hidden, n * d);
        let s = &mut acts.scratch;
        norm_forward(cfg.norm, &p.norm_f, &mut acts.hidden, &mut s.stat_a, &mut s.stat_b, &acts.x_final, n, d);
        Ok(())
    }

    /// One layer; returns the layer's output (the next residual stream) in a fresh or recycled buffer.
    fn layer_forward(
        &self,
        lp: &LayerParams,
        b: &Batch,
        la: &mut LayerActs,
        s: &mut Scratch,
        rope: Option<&RopeTable>,
        next: &mut [f32],
    ) {
        let cfg = &self.cfg;
        let (n, d) = (b.len(), cfg.hidden);
        let (qkv_dim, attn_dim, mlp_in) = (cfg.qkv_dim(), cfg.attn_dim(), cfg.mlp_in_dim());
        fit(&mut la.qkv, n * qkv_dim);
        fit(&mut la.attn, n * attn_dim);
        fit(&mut la.lse, n * cfg.n_heads);
        fit(&mut la.mlp_pre, n * mlp_in);

        // Attention: h = norm1(x); qkv = h W_qkv^T + b; rotate q, k; attend; o = attn W_o^T + b.
        norm_forward(cfg.norm, &lp.norm1, &mut s.h, &mut s.stat_a, &mut s.stat_b, &la.x, n, d);
        k::linear_forward(&mut la.qkv, &s.h, &lp.w_qkv.data, bias(&lp.b_qkv), n, d, qkv_dim);
        if let (Some(wq), Some(wk)) = (&lp.q_norm, &lp.k_norm) {
            head_norm::forward(cfg, &wq.data, &wk.data, &mut la.qkv, &mut la.qk_pre, n);
        }
        if let Some(t) = rope {
            let hd = cfg.head_dim;
            k::rope_apply(&mut la.qkv, qkv_dim, 0, cfg.n_heads, hd, &b.positions, t, false);
            k::rope_apply(&mut la.qkv, qkv_dim, cfg.n_heads * hd, cfg.n_kv_heads, hd, &b.positions, t, false);
        }
        k::attention_forward(&mut la.attn, &mut la.lse, &la.qkv, &self.attn_dims(), &b.spans, &b.groups);
        k::linear_forward(&mut s.o, &la.attn, &lp.w_o.data, bias(&lp.b_o), n, attn_dim, d);

        // MLP input: norm2 of x (parallel residual) or of x + attention (sequential).
        if cfg.parallel_residual {
            norm_forward(cfg.norm, lp.mlp_norm(), &mut s.h, &mut s.stat_a, &mut s.stat_b, &la.x, n, d);
        } else {
            fit(&mut la.x_mid, n * d);
            k::add3(&mut la.x_mid, &la.x, &s.o);
            norm_forward(cfg.norm, lp.mlp_norm(), &mut s.h, &mut s.stat_a, &mut s.stat_b, &la.x_mid, n, d);
        }
        k::linear_forward(&mut la.mlp_pre, &s.h, &lp.w_in.data, bias(&lp.b_in), n, d, mlp_in);
        act_forward(cfg.mlp, &mut s.act, &la.mlp_pre, n, cfg.ffn_hidden);
        // s.h is free again: reuse it for the MLP output.
        k::linear_forward(&mut s.h, &s.act, &lp.w_out.data, bias(&lp.b_out), n, cfg.ffn_hidden, d);

        if cfg.parallel_residual {
            k::add3(next, &la.x, &s.o);
            k::add_inplace(next, &s.h);
        } else {
            k::add3(next, &la.x_mid, &s.h);
        }
    }

    /// Log-probs at the batch's targets from `acts.hidden` (after [`Decoder::forward`]).
    pub fn head_forward(&self, p: &Params, b: &Batch, acts: &mut Activations) -> HeadOutput {
        let t = b.targets.len();
        let mut out = HeadOutput { logp: vec![0.0; t], logit_sum: vec![0.0; t] };
        fit(&mut acts.head_lse, t);
        k::logprob_head_forward(
            &mut out.logp,
            &mut acts.head_lse,
            Some(&mut out.logit_sum),
            &acts.hidden,
            &p.head().data,
            bias(&p.b_head),
            &b.targets,
            self.cfg.hidden,
            self.cfg.vocab_size,
        );
        out
    }

    /// Forward through trunk and head: per-target log-probs.
    pub fn logprobs(
        &self,
        p: &Params,
        b: &Batch,
        acts: &mut Activations,
        keep: bool,
    ) -> Result<HeadOutput, EngineError> {
        self.forward(p, b, acts, keep)?;
        Ok(self.head_forward(p, b, acts))
    }

    /// Backward from per-target log-prob gradients: accumulates into `grads` (`+=`).
    pub fn backward_logprobs(
        &self,
        p: &Params,
        b: &Batch,
        acts: &mut Activations,
        dlogp: &[f32],
        grads: &mut Params,
    ) -> Result<(), EngineError> {
        self.backward_logprobs_inner(p, b, acts, dlogp, grads, None)
    }

    /// [`Decoder::backward_logprobs`], holding the embedding lookups' gradient back in `pending` (added
    /// to `grads` by [`PendingEmbeddingGrads::apply`]) instead of adding it now.
    pub fn backward_logprobs_deferred(
        &self,
        p: &Params,
        b: &Batch,
        acts: &mut Activations,
        dlogp: &[f32],
        grads: &mut Params,
        pending: &mut PendingEmbeddingGrads,
    ) -> Result<(), EngineError> {
        self.backward_logprobs_inner(p, b, acts, dlogp, grads, Some(pending))
    }

    fn backward_logprobs_inner(
        &self,
        p: &Params,
        b: &Batch,
        acts: &mut Activations,
        dlogp: &[f32],
        grads: &mut Params,
        pending: Option<&mut PendingEmbeddingGrads>,
    ) -> Result<(), EngineError> {
        let mut dhidden = std::mem::take(&mut acts.dhidden);
        dhidden.clear();
        dhidden.resize(b.len() * self.cfg.hidden, 0.0);
        let result = self
            .head_backward(p, b, acts, dlogp, grads, &mut dhidden)
            .and_then(|_| self.backward_inner(p, b, acts, &dhidden, grads, pending));
        acts.dhidden = dhidden;
        result
    }

    /// The LM head's part of backward alone: `dhidden += d(logp)/d(hidden) · dlogp` (`[N, d]`) and the head
    /// weights' gradient into `grads`. For objectives that add their own gradient on the hidden states
    /// (a value head) before calling [`Decoder::backward`].
    pub fn head_backward(
        &self,
        p: &Params,
        b: &Batch,
        acts: &Activations,
        dlogp: &[f32],
        grads: &mut Params,
        dhidden: &mut [f32],
    ) -> Result<(), EngineError> {
        if dlogp.len() != b.targets.len() || acts.head_lse.len() != b.targets.len() {
            return Err(EngineError::GradientLength { got: dlogp.len(), want: b.targets.len() });
        }
        if dhidden.len() != b.len() * self.cfg.hidden {
            return Err(EngineError::MalformedBatch("dhidden must be [tokens, hidden]".into()));
        }
        let dw_head = match grads.lm_head.as_mut() {
            Some(t) => &mut t.data,
            None => &mut grads.wte.data,
        };
        k::logprob_head_backward(
            dhidden,
            Some(dw_head),
            bias_mut(&mut grads.b_head),
            dlogp,
            &acts.head_lse,
            &acts.hidden,
            &p.head().data,
            bias(&p.b_head),
            &b.targets,
            self.cfg.hidden,
            self.cfg.vocab_size,
        );
        Ok(())
    }

    /// Backward from a gradient on the final hidden states (`[N, d]`): accumulates into `grads`.
    /// Needs a forward with `keep = true` on the same batch.
    pub fn backward(
        &self,
        p: &Params,
        b: &Batch,
        acts: &mut Activations,
        dhidden: &[f32],
        grads: &mut Params,
    ) -> Result<(), EngineError> {
        self.backward_inner(p, b, acts, dhidden, grads, None)
    }

    fn backward_inner(
        &self,
        p: &Params,
        b: &Batch,
        acts: &mut Activations,
        dhidden: &[f32],
        grads: &mut Params,
        pending: Option<&mut PendingEmbeddingGrads>,
    ) -> Result<(), EngineError> {
        let cfg = &self.cfg;
        let (n, d) = (b.len(), cfg.hidden);
        if !acts.kept || acts.n != n {
            return Err(EngineError::MalformedBatch(
                "backward needs a forward with keep=true on the same batch".into(),
            ));
        }
        let extended = self.extended_rope(b);
        let rope = extended.as_ref().or(self.rope.as_ref());
        let s = &mut acts.scratch;
        fit(&mut s.dx, n * d);
        fit(&mut s.dh, n * d);
        fit(&mut s.dact, n * cfg.ffn_hidden);
        fit(&mut s.dpre, n * cfg.mlp_in_dim());
        fit(&mut s.dattn, n * cfg.attn_dim());
        fit(&mut s.dqkv, n * cfg.qkv_dim());

        // Final norm: recompute its statistics, then dx = d norm_f / d x_final.
        s.dx.iter_mut().for_each(|v| *v = 0.0);
        norm_forward(cfg.norm, &p.norm_f, &mut s.h, &mut s.stat_a, &mut s.stat_b, &acts.x_final, n, d);
        norm_backward(
            cfg.norm,
            &p.norm_f,
            &mut grads.norm_f,
            &mut s.dx,
            dhidden,
            &acts.x_final,
            &s.stat_a,
            &s.stat_b,
            n,
            d,
        );

        for l in (0..cfg.n_layers).rev() {
            let rope = rope.filter(|_| cfg.rotary_in_layer(l));
            self.layer_backward(&p.layers[l], &mut grads.layers[l], b, &acts.layers[l], s, rope);
        }
        match pending {
            Some(pe) => {
                pe.rows.extend_from_slice(&s.dx);
                pe.tokens.extend_from_slice(&b.tokens);
                pe.positions.extend_from_slice(&b.positions);
            }
            None => k::embedding_backward(
                &mut grads.wte.data,
                grads.wpe.as_mut().map(|t| &mut t.data[..]),
                &s.dx,
                &b.tokens,
                &b.positions,
                d,
            ),
        }
        Ok(())
    }

    /// On entry `s.dx` holds the gradient of the layer's output; on exit, of its input.
    fn layer_backward(
        &self,
        lp: &LayerParams,
        lg: &mut LayerParams,
        b: &Batch,
        la: &LayerActs,
        s: &mut Scratch,
        rope: Option<&RopeTable>,
    ) {
        let cfg = &self.cfg;
        let (n, d, ff) = (b.len(), cfg.hidden, cfg.ffn_hidden);
        let (qkv_dim, attn_dim, mlp_in) = (cfg.qkv_dim(), cfg.attn_dim(), cfg.mlp_in_dim());
        let mlp_input = if cfg.parallel_residual { &la.x } else { &la.x_mid };

        // MLP: recompute h2 = norm2(input) and the activation, then back through w_out, act, w_in.
        norm_forward(cfg.norm, lp.mlp_norm(), &mut s.h, &mut s.stat_a, &mut s.stat_b, mlp_input, n, d);
        act_forward(cfg.mlp, &mut s.act, &la.mlp_pre, n, ff);
        k::linear_backward(
            Some(&mut s.dact),
            Some(&mut lg.w_out.data),
            bias_mut(&mut lg.b_out),
            &s.dx,
            &s.act,
            &lp.w_out.data,
            n,
            ff,
            d,
            false,
        );
        act_backward(cfg.mlp, &mut s.dpre, &s.dact, &la.mlp_pre, n, ff);
        k::linear_backward(
            Some(&mut s.dh),
            Some(&mut lg.w_in.data),
            bias_mut(&mut lg.b_in),
            &s.dpre,
            &s.h,
            &lp.w_in.data,
            n,
            d,
            mlp_in,
            false,
        );
        if !cfg.parallel_residual {
            // dx becomes the gradient of x_mid = x + attention.
            norm_backward(
                cfg.norm,
                lp.mlp_norm(),
                lg.mlp_norm_mut(),
                &mut s.dx,
                &s.dh,
                mlp_input,
                &s.stat_a,
                &s.stat_b,
                n,
                d,
            );
        } else {
            // Parallel: the MLP's norm reads x itself; its gradient joins dx after the attention branch
            // has used dx (the gradient of the layer output) as its own output gradient.
            std::mem::swap(&mut s.dh, &mut s.o);
        }

        // Attention: back through w_o, the attention kernel, the rotation and w_qkv.
        k::linear_backward(
            Some(&mut s.dattn),
            Some(&mut lg.w_o.data),
            bias_mut(&mut lg.b_o),
            &s.dx,
            &la.attn,
            &lp.w_o.data,
            n,
            attn_dim,
            d,
            false,
        );
        k::attention_backward(
            &mut s.dqkv,
            &s.dattn,
            &la.attn,
            &la.lse,
            &la.qkv,
            &self.attn_dims(),
            &b.spans,
            &b.groups,
        );
        if let Some(t) = rope {
            let hd = cfg.head_dim;
            k::rope_apply(&mut s.dqkv, qkv_dim, 0, cfg.n_heads, hd, &b.positions, t, true);
            k::rope_apply(&mut s.dqkv, qkv_dim, cfg.n_heads * hd, cfg.n_kv_heads, hd, &b.positions, t, true);
        }
        if let (Some(wq), Some(wk), Some(gq), Some(gk)) = (&lp.q_norm, &lp.k_norm, &mut lg.q_norm, &mut lg.k_norm) {
            head_norm::backward(cfg, &wq.data, &wk.data, &mut gq.data, &mut gk.data, &mut s.dqkv, &la.qk_pre, n);
        }
        norm_forward(cfg.norm, &lp.norm1, &mut s.h, &mut s.stat_a, &mut s.stat_b, &la.x, n, d);
        k::linear_backward(
            Some(&mut s.dh),
            Some(&mut lg.w_qkv.data),
            bias_mut(&mut lg.b_qkv),
            &s.dqkv,
            &s.h,
            &lp.w_qkv.data,
            n,
            d,
            qkv_dim,
            false,
        );
        norm_backward(cfg.norm, &lp.norm1, &mut lg.norm1, &mut s.dx, &s.dh, &la.x, &s.stat_a, &s.stat_b, n, d);
        if cfg.parallel_residual {
            // Now add the MLP branch's norm gradient (its dh was parked in s.o).
            norm_forward(cfg.norm, lp.mlp_norm(), &mut s.h, &mut s.stat_a, &mut s.stat_b, &la.x, n, d);
            norm_backward(
                cfg.norm,
                lp.mlp_norm(),
                lg.mlp_norm_mut(),
                &mut s.dx,
                &s.o,
                &la.x,
                &s.stat_a,
                &s.stat_b,
                n,
                d,
            );
        }
    }
}

pub(crate) fn bias(t: &Option<crate::params::Tensor>) -> Option<&[f32]> {
    t.as_ref().map(|t| &t.data[..])
}

fn bias_mut(t: &mut Option<crate::params::Tensor>) -> Option<&mut [f32]> {
    t.as_mut().map(|t| &mut t.data[..])
}

/// `out = norm(x)`; `a`, `b` receive the statistics (mean and rstd, or rstd alone in `b` for RMSNorm).
#[allow(clippy::too_many_arguments)]
pub(crate) fn norm_forward(
    kind: NormKind,
    np: &NormParams,
    out: &mut [f32],
    a: &mut [f32],
    b: &mut [f32],
    x: &[f32],
    n: usize,
    d: usize,
) {
    match kind {
        NormKind::LayerNorm { eps } => {
            let bias = np.bias.as_ref().expect("LayerNorm has a bias");
            k::layer_norm_forward(out, a, b, x, &np.weight.data, &bias.data, n, d, eps)
        }
        NormKind::RmsNorm { eps } => k::rms_norm_forward(out, b, x, &np.weight.data, n, d, eps),
    }
}

/// `dx += d norm / d x · dout`, parameter gradients into `g`.
#[allow(clippy::too_many_arguments)]
fn norm_backward(
    kind: NormKind,
    np: &NormParams,
    g: &mut NormParams,
    dx: &mut [f32],
    dout: &[f32],
    x: &[f32],
    a: &[f32],
    b: &[f32],
    n: usize,
    d: usize,
) {
    match kind {
        NormKind::LayerNorm { .. } => {
            let gb = g.bias.as_mut().expect("LayerNorm has a bias");
            k::layer_norm_backward(dx, &mut g.weight.data, &mut gb.data, dout, x, a, b, &np.weight.data, n, d)
        }
        NormKind::RmsNorm { .. } => k::rms_norm_backward(dx, &mut g.weight.data, dout, x, b, &np.weight.data, n, d),
    }
}

pub(crate) fn act_forward(kind: MlpKind, out: &mut [f32], pre: &[f32], n: usize, ff: usize) {
    match kind {
        MlpKind::GeluTanh => k::gelu_tanh_forward(out, pre),
        MlpKind::GeluErf => k::gelu_erf_forward(out, pre),
        MlpKind::SwiGlu => k::swiglu_forward(out, pre, n, ff),
    }
}

fn act_backward(kind: MlpKind, dpre: &mut [f32], dout: &[f32], pre: &[f32], n: usize, ff: usize) {
    match kind {
        MlpKind::GeluTanh => k::gelu_tanh_backward(dpre, dout, pre),
        MlpKind::GeluErf => k::gelu_erf_backward(dpre, dout, pre),
        MlpKind::SwiGlu => k::swiglu_backward(dpre, dout, pre, n, ff),
    }
}
