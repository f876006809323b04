//! The decoder family's forward and backward passes, assembled from `crate::kernels`.
//!
//! Forward keeps, per layer, only what backward cannot cheaply recompute: the layer input `x`, the
//! post-rotary `qkv`, the attention output and its log-sum-exp, the mid-layer residual (sequential
//! layout only) and the MLP pre-activation. Norm outputs and MLP activations are recomputed in backward
//! (two passes over `[N, d]` instead of storing them), which keeps activation memory near
//! `N * (2d + qkv + attn + mlp_in)` floats per layer.

mod acts;
mod backward;
mod block;
mod forward;

pub use acts::{Activations, HeadOutput, PendingEmbeddingGrads};
pub(crate) use acts::{LayerActs, Scratch};
pub(crate) use block::Attend;

use crate::batch::Batch;
use crate::config::{DecoderConfig, MlpKind, NormKind, PositionKind};
use crate::kernels::{self as k, AttnDims, RopeTable};
use crate::params::NormParams;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EngineError {
    #[error("token id {token} at stream index {index} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange { token: u32, index: usize, vocab: usize },
    #[error("position {position} is beyond the model's {max} learned positions")]
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

impl Decoder {
    pub fn new(cfg: DecoderConfig) -> Self {
        let rope = match cfg.positions {
            PositionKind::Rotary(r) => Some(RopeTable::new(&r, cfg.max_positions.max(1))),
            PositionKind::Learned => None,
        };
        Decoder { cfg, rope }
    }

    /// The rotary table block `layer` applies: `rope`, unless the layer has none (SmolLM3's
    /// `no_rope_layers`).
    pub(crate) fn block_rope<'t>(&self, rope: Option<&'t RopeTable>, layer: usize) -> Option<&'t RopeTable> {
        rope.filter(|_| self.cfg.rotary_in_layer(layer))
    }

    /// A rotary table long enough for `b` when its positions go past `max_positions` (rotary models
    /// extrapolate; learned positions are refused by `check_batch`).
    pub(crate) fn extended_rope(&self, b: &Batch) -> Option<RopeTable> {
        match self.cfg.positions {
            PositionKind::Rotary(r) if b.max_position() > self.cfg.max_positions => {
                Some(RopeTable::new(&r, b.max_position()))
            }
            _ => None,
        }
    }

    pub(crate) fn attn_dims(&self) -> AttnDims {
        AttnDims {
            n_heads: self.cfg.n_heads,
            n_kv_heads: self.cfg.n_kv_heads,
            head_dim: self.cfg.head_dim,
            window: self.cfg.sliding_window,
        }
    }

    /// Floats per token that [`Decoder::forward`] holds (see [`Activations::floats_per_token`]).
    pub fn activation_floats_per_token(&self, keep: bool) -> u64 {
        Activations::floats_per_token(&self.cfg, keep)
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
        NormKind::RmsNorm { eps } => k::rms_norm_forward(out, b, x, &np.weight.data, n, d, eps),
    }
}

/// `dx += d norm / d x · dout`, parameter gradients into `g`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn norm_backward(
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

pub(crate) fn act_backward(kind: MlpKind, dpre: &mut [f32], dout: &[f32], pre: &[f32], n: usize, ff: usize) {
    match kind {
        MlpKind::GeluTanh => k::gelu_tanh_backward(dpre, dout, pre),
        MlpKind::GeluErf => k::gelu_erf_backward(dpre, dout, pre),
        MlpKind::SwiGlu => k::swiglu_backward(dpre, dout, pre, n, ff),
    }
}
