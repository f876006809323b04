//! The decoder family's forward and backward passes, assembled from `crate::kernels`.
//!
//! Forward keeps, per layer, only what backward cannot cheaply recompute: the layer input `x`, the
//! post-rotary `qkv`, attention's log-sum-exp and the MLP pre-activation. Norm outputs and MLP
//! activations are recomputed in backward (two passes over `[N, d]` instead of storing them). An f32
//! pass also recomputes each layer's attention half before its backward (attention, its output
//! projection and the mid-layer residual: about 2.6% more products on SmolLM2-135M for a fifth of the
//! activations), so it keeps `N * (d + qkv + mlp_in)` floats per layer plus one layer's `attn` and
//! `x_mid`. A bf16 pass keeps the attention output and the mid-layer residual too, and the products
//! among what it keeps (`qkv`, `attn`, `mlp_pre`) in bf16, as autocast does: `N * (2d + (qkv + attn +
//! mlp_in) / 2)` floats' worth ([`Activations::bytes_per_token`]); at half the bytes, recomputing them
//! would cost its step more than it saves.

mod acts;
mod backward;
mod block;
mod forward;
mod linear;
mod lora_block;
mod view;

pub use acts::{Activations, HeadOutput, Keep, PendingEmbeddingGrads};
pub(crate) use acts::{LayerActs, Scratch};
pub(crate) use block::Attend;
pub use view::{Grads, Model};

/// The factor `sqrt(hidden)` of scaled embeddings, rounded to f32 as HF casts it to the weights' dtype.
pub(crate) fn embedding_scale(cfg: &DecoderConfig) -> Option<f32> {
    cfg.scaled_embeddings.then(|| (cfg.hidden as f64).sqrt() as f32)
}

use crate::batch::Batch;
use crate::config::{DecoderConfig, MlpKind, NormKind, PositionKind};
use crate::kernels::{self as k, AttnDims, Precision, RopeTable};
use crate::params::NormParams;
use std::borrow::Cow;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EngineError {
    #[error("token id {token} at stream index {index} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange { token: u32, index: usize, vocab: usize },
    #[error(
        "token id {token} at stream index {index} is not among the tokens whose embeddings the frozen model \
         kept (those of the run's data)"
    )]
    TokenNotKept { token: u32, index: usize },
    #[error("position {position} is beyond the model's {max} learned positions")]
    PositionOutOfRange { position: usize, max: usize },
    #[error("malformed batch: {0}")]
    MalformedBatch(String),
    #[error("gradient length {got} does not match the {want} targets of the batch")]
    GradientLength { got: usize, want: usize },
    #[error("LoRA adapter does not fit: {0}")]
    AdapterMismatch(String),
    #[error(
        "full gradients were asked of a pass through a LoRA adapter: the adapter's own gradient would be \
         dropped; use Grads::Adapter (frozen base) or merge the adapter into the base first"
    )]
    FullGradsWithAdapter,
    #[error("frozen base linears do not fit: {0}")]
    FrozenMismatch(String),
    #[error(
        "full gradients were asked of a base stored frozen (block linears in bf16/NF4, or a bf16 embedding and \
         head): it has no gradients; train an adapter (Grads::Adapter) on it"
    )]
    FullGradsOfFrozenBase,
}

/// The rotary tables of a rotary model: the one most layers use and, with
/// [`DecoderConfig::global_layers`], the full-attention layers' own (another base).
pub(crate) struct Ropes {
    pub(crate) local: RopeTable,
    pub(crate) global: Option<RopeTable>,
}

impl Ropes {
    /// The tables for positions `0..max_pos`; `None` for learned positions.
    pub(crate) fn new(cfg: &DecoderConfig, max_pos: usize) -> Option<Ropes> {
        let PositionKind::Rotary(r) = cfg.positions else { return None };
        let global = cfg.global_layers.as_ref().map(|g| RopeTable::new(&g.rope, max_pos));
        Some(Ropes { local: RopeTable::new(&r, max_pos), global })
    }

    pub(crate) fn max_pos(&self) -> usize {
        self.local.max_pos()
    }
}

/// One decoder: its configuration and the rotary tables derived from it.
pub struct Decoder {
    pub cfg: DecoderConfig,
    rope: Option<Ropes>,
}

impl Decoder {
    pub fn new(cfg: DecoderConfig) -> Self {
        let rope = Ropes::new(&cfg, cfg.max_positions.max(1));
        Decoder { cfg, rope }
    }

    /// The rotary table block `layer` applies: from `ropes`, the global table in a full-attention layer,
    /// none in a layer without rotary (SmolLM3's `no_rope_layers`).
    pub(crate) fn block_rope<'t>(&self, ropes: Option<&'t Ropes>, layer: usize) -> Option<&'t RopeTable> {
        let ropes = ropes.filter(|_| self.cfg.rotary_in_layer(layer))?;
        match &ropes.global {
            Some(g) if self.cfg.is_global_layer(layer) => Some(g),
            _ => Some(&ropes.local),
        }
    }

    /// Rotary tables long enough for `b` when its positions go past `max_positions` (rotary models
    /// extrapolate; learned positions are refused by `check_batch`).
    pub(crate) fn extended_rope(&self, b: &Batch) -> Option<Ropes> {
        if b.max_position() > self.cfg.max_positions {
            Ropes::new(&self.cfg, b.max_position())
        } else {
            None
        }
    }

    /// The attention geometry of layer `layer` (its window: none in a full-attention layer).
    pub(crate) fn attn_dims(&self, layer: usize) -> AttnDims {
        AttnDims {
            n_heads: self.cfg.n_heads,
            n_kv_heads: self.cfg.n_kv_heads,
            head_dim: self.cfg.head_dim,
            window: self.cfg.window_in_layer(layer),
        }
    }

    /// Floats per token that an f32 [`Decoder::forward`] holds (see [`Activations::floats_per_token`]).
    pub fn activation_floats_per_token(&self, keep: impl Into<Keep>) -> u64 {
        Activations::floats_per_token(&self.cfg, keep)
    }

    /// Bytes per token that [`Decoder::forward`] in `precision` holds (see
    /// [`Activations::bytes_per_token`]).
    pub fn activation_bytes_per_token(&self, keep: impl Into<Keep>, precision: Precision) -> u64 {
        Activations::bytes_per_token(&self.cfg, keep, precision)
    }

    /// Floats per token that a pass through `adapter` holds on top of
    /// [`Decoder::activation_floats_per_token`] (the adapter's `u = x A^T` per pair and its scratch; with
    /// `keep`, dropout's buffers counted when `adapter.dropout > 0`).
    pub fn adapter_activation_floats_per_token(&self, adapter: &crate::lora::Adapter, keep: impl Into<Keep>) -> u64 {
        lora_block::floats_per_token(&self.cfg, adapter, keep.into())
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
}

pub(crate) fn bias(t: &Option<crate::params::Tensor>) -> Option<&[f32]> {
    t.as_ref().map(|t| &t.data[..])
}

pub(crate) fn bias_mut(t: &mut Option<crate::params::Tensor>) -> Option<&mut [f32]> {
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
        NormKind::RmsNorm { eps } | NormKind::RmsNormUnitOffset { eps } => {
            k::rms_norm_forward(out, b, x, &rms_scale(kind, &np.weight.data), n, d, eps)
        }
    }
}

/// The factor an RMSNorm multiplies by: its weight, or `1 + w` for a unit-offset norm (Gemma). The
/// gradient of either with respect to `w` is that with respect to the factor.
pub(crate) fn rms_scale(kind: NormKind, w: &[f32]) -> Cow<'_, [f32]> {
    match kind {
        NormKind::RmsNormUnitOffset { .. } => Cow::Owned(w.iter().map(|&w| 1.0 + w).collect()),
        NormKind::RmsNorm { .. } | NormKind::LayerNorm { .. } => Cow::Borrowed(w),
    }
}

/// `dx += d norm / d x · dout`, parameter gradients into `g` (none: a frozen norm, not computed).
#[allow(clippy::too_many_arguments)]
pub(crate) fn norm_backward(
    kind: NormKind,
    np: &NormParams,
    g: Option<&mut NormParams>,
    dx: &mut [f32],
    dout: &[f32],
    x: &[f32],
    a: &[f32],
    b: &[f32],
    n: usize,
    d: usize,
) {
    match (kind, g) {
        (NormKind::LayerNorm { .. }, Some(g)) => {
            let gb = g.bias.as_mut().expect("LayerNorm has a bias");
            k::layer_norm_backward(dx, &mut g.weight.data, &mut gb.data, dout, x, a, b, &np.weight.data, n, d)
        }
        (NormKind::LayerNorm { .. }, None) => k::layer_norm_input_grad(dx, dout, x, a, b, &np.weight.data, n, d),
        (NormKind::RmsNorm { .. } | NormKind::RmsNormUnitOffset { .. }, g) => {
            let w = rms_scale(kind, &np.weight.data);
            match g {
                Some(g) => k::rms_norm_backward(dx, &mut g.weight.data, dout, x, b, &w, n, d),
                None => k::rms_norm_input_grad(dx, dout, x, b, &w, n, d),
            }
        }
    }
}

pub(crate) fn act_forward(kind: MlpKind, out: &mut [f32], pre: &[f32], n: usize, ff: usize) {
    match kind {
        MlpKind::GeluTanh => k::gelu_tanh_forward(out, pre),
        MlpKind::GeluErf => k::gelu_erf_forward(out, pre),
        MlpKind::SwiGlu => k::swiglu_forward(out, pre, n, ff),
        MlpKind::GeGluTanh => k::geglu_tanh_forward(out, pre, n, ff),
    }
}

pub(crate) fn act_backward(kind: MlpKind, dpre: &mut [f32], dout: &[f32], pre: &[f32], n: usize, ff: usize) {
    match kind {
        MlpKind::GeluTanh => k::gelu_tanh_backward(dpre, dout, pre),
        MlpKind::GeluErf => k::gelu_erf_backward(dpre, dout, pre),
        MlpKind::SwiGlu => k::swiglu_backward(dpre, dout, pre, n, ff),
        MlpKind::GeGluTanh => k::geglu_tanh_backward(dpre, dout, pre, n, ff),
    }
}
