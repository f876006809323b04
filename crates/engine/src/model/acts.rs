//! The buffers of a forward pass: what backward reads, the scratch every layer reuses, and the
//! embedding gradients a split batch holds back.

use crate::config::DecoderConfig;
use crate::kernels as k;
use crate::params::Params;

use super::lora_block::{LoraActs, LoraScratch};

/// Per-token words of the batch (token, position) and of the head's per-target vectors (target position
/// and token, log-sum-exp, log-prob, logit sum, log-prob gradient), counting one target per token.
const BATCH_FLOATS_PER_TOKEN: u64 = 8;

/// What a forward pass keeps for a backward pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Keep {
    /// Nothing: one set of buffers serves every layer (scoring, a reference pass). No backward.
    #[default]
    None,
    /// Every layer's [`LayerActs`]: backward reads them as they are.
    All,
    /// Each layer's input `x` (`[N, d]`) only, every block running in one reusable slot (gradient
    /// checkpointing): backward re-runs each block's forward from its input into that slot before its
    /// backward, about one extra forward per step for the activation memory of one layer. The gradients
    /// are those of [`Keep::All`] bit for bit: the same kernels on the same inputs, in the same order.
    LayerInputs,
}

impl From<bool> for Keep {
    /// `true`: [`Keep::All`]; `false`: [`Keep::None`].
    fn from(keep: bool) -> Keep {
        if keep {
            Keep::All
        } else {
            Keep::None
        }
    }
}

/// What forward keeps for one block (see the module doc of [`crate::model`]). `N` rows, `d = hidden`.
#[derive(Default)]
pub(crate) struct LayerActs {
    pub(crate) x: Vec<f32>,       // [N, d] block input
    pub(crate) qkv: Vec<f32>,     // [N, qkv_dim] after rotary
    pub(crate) qk_pre: Vec<f32>,  // [N * (n_heads + n_kv_heads), hd] q and k before their norm (qk_norm only)
    pub(crate) attn: Vec<f32>,    // [N, n_heads * hd]
    pub(crate) lse: Vec<f32>,     // [N, n_heads] (packed attention only)
    pub(crate) x_mid: Vec<f32>,   // [N, d] x + attention (sequential residual only)
    pub(crate) mlp_pre: Vec<f32>, // [N, mlp_in_dim]
    pub(crate) o_pre: Vec<f32>,   // [N, d] attention projection before its norm (post_norms only)
    pub(crate) mlp_out: Vec<f32>, // [N, d] MLP output before its norm (post_norms only)
    pub(crate) lora: LoraActs,    // the adapter's `u` per pair (with an adapter only)
}

impl LayerActs {
    /// Frees every buffer but the input `x` (a layer of a [`Keep::LayerInputs`] pass).
    fn keep_only_input(&mut self) {
        let x = std::mem::take(&mut self.x);
        *self = LayerActs { x, ..LayerActs::default() };
    }
}

impl LayerActs {
    /// Floats per token of the buffers above, as [`crate::Decoder::block_forward`] sizes them.
    fn floats_per_token(cfg: &DecoderConfig) -> u64 {
        let d = cfg.hidden as u64;
        let x_mid = if cfg.parallel_residual { 0 } else { d };
        let qk_pre = if cfg.qk_norm { ((cfg.n_heads + cfg.n_kv_heads) * cfg.head_dim) as u64 } else { 0 };
        let post_norm_inputs = if cfg.post_norms { 2 * d } else { 0 };
        d + cfg.qkv_dim() as u64
            + qk_pre
            + cfg.attn_dim() as u64
            + cfg.n_heads as u64
            + x_mid
            + cfg.mlp_in_dim() as u64
            + post_norm_inputs
    }
}

/// Buffers a block overwrites before reading; one set serves every layer.
#[derive(Default)]
pub(crate) struct Scratch {
    pub(crate) h: Vec<f32>,       // [N, d] norm output, then (forward) the MLP output
    pub(crate) o: Vec<f32>,       // [N, d] attention projection output
    pub(crate) act: Vec<f32>,     // [N, ff] MLP activation
    pub(crate) stat_a: Vec<f32>,  // [N] mean
    pub(crate) stat_b: Vec<f32>,  // [N] rstd
    pub(crate) dx: Vec<f32>,      // [N, d]
    pub(crate) dh: Vec<f32>,      // [N, d]
    pub(crate) dact: Vec<f32>,    // [N, ff]
    pub(crate) dpre: Vec<f32>,    // [N, mlp_in]
    pub(crate) dattn: Vec<f32>,   // [N, attn_dim]
    pub(crate) dqkv: Vec<f32>,    // [N, qkv_dim]
    pub(crate) lora: LoraScratch, // the adapter's (with an adapter only)
}

impl Scratch {
    /// Floats per token of the buffers above: the forward's (`h`, `o`, `act`, the two statistics) and,
    /// with `backward`, the gradients' too.
    fn floats_per_token(cfg: &DecoderConfig, backward: bool) -> u64 {
        let (d, ff) = (cfg.hidden as u64, cfg.ffn_hidden as u64);
        let forward = 2 * d + ff + 2;
        let grads = 2 * d + ff + cfg.mlp_in_dim() as u64 + cfg.attn_dim() as u64 + cfg.qkv_dim() as u64;
        forward + if backward { grads } else { 0 }
    }
}

/// Activations of one forward pass plus scratch space, reused across steps to avoid allocation.
#[derive(Default)]
pub struct Activations {
    pub(crate) n: usize,
    pub(crate) kept: Keep,
    /// One per layer ([`Keep::All`]: all of a layer's buffers; [`Keep::LayerInputs`]: its input alone), or
    /// the one slot of [`Keep::None`].
    pub(crate) layers: Vec<LayerActs>,
    /// The slot every block of a [`Keep::LayerInputs`] pass runs in (its `x` borrowed from `layers` while
    /// a block runs), empty otherwise.
    pub(crate) work: LayerActs,
    /// The layer whose activations `work` holds: the last after forward, then each layer backward
    /// recomputed, so that the last layer's block is not run twice in a row.
    pub(crate) work_layer: Option<usize>,
    /// The adapter's dropout seed of the pass ([`super::Model::dropout_seed`]): a checkpointed backward
    /// recomputes each block with the masks its forward drew.
    pub(crate) dropout_seed: Option<u64>,
    /// `[N, d]` input of the final norm
    pub(crate) x_final: Vec<f32>,
    /// `[N, d]` final hidden states (after the final norm): what the LM head, a reward head or a value
    /// head reads.
    pub hidden: Vec<f32>,
    /// `[targets]` log-sum-exp of the head's logits, saved for its backward
    pub(crate) head_lse: Vec<f32>,
    /// `[N, d]` gradient of the final hidden states (kept to reuse the allocation)
    pub(crate) dhidden: Vec<f32>,
    pub(crate) scratch: Scratch,
}

impl Activations {
    /// Floats per token that a forward pass of `cfg` holds, with the batch's and the head's per-target
    /// vectors. [`Keep::All`] (a forward for backward, then the backward): every block's [`LayerActs`],
    /// the final norm's input, the hidden states and their gradient, and the forward and backward
    /// scratch. [`Keep::LayerInputs`]: the same with every block's input alone plus one slot for the
    /// rest of a block. [`Keep::None`]: one block's buffers, reused by every block, the final norm's
    /// input, the hidden states and the forward scratch.
    pub fn floats_per_token(cfg: &DecoderConfig, keep: impl Into<Keep>) -> u64 {
        let (d, layer) = (cfg.hidden as u64, LayerActs::floats_per_token(cfg));
        let layers = cfg.n_layers as u64;
        let held = match keep.into() {
            Keep::All => layers * layer + 3 * d + Scratch::floats_per_token(cfg, true),
            Keep::LayerInputs => layers * d + (layer - d) + 3 * d + Scratch::floats_per_token(cfg, true),
            Keep::None => layer + 2 * d + Scratch::floats_per_token(cfg, false),
        };
        held + BATCH_FLOATS_PER_TOKEN
    }

    /// Sets up the layer buffers for a pass that keeps `keep`, freeing what it does not use (the buffers
    /// of another mode, left by an earlier pass).
    pub(crate) fn prepare_layers(&mut self, keep: Keep, n_layers: usize) {
        self.kept = keep;
        self.work_layer = None;
        let slots = if keep == Keep::None { 1 } else { n_layers };
        self.layers.resize_with(slots, LayerActs::default);
        if keep == Keep::LayerInputs {
            self.layers.iter_mut().for_each(LayerActs::keep_only_input);
        } else {
            self.work = LayerActs::default();
        }
    }
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
    pub(crate) rows: Vec<f32>,
    pub(crate) tokens: Vec<u32>,
    pub(crate) positions: Vec<u32>,
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

/// Per-target outputs of the LM head.
#[derive(Clone, Debug, Default)]
pub struct HeadOutput {
    /// `[targets]` log p(token | prefix)
    pub logp: Vec<f32>,
    /// `[targets]` sum of the logits over the vocabulary (for TRL's `logits/*` metrics)
    pub logit_sum: Vec<f32>,
}

/// Resizes without keeping contents (every user overwrites before reading).
pub(crate) fn fit(v: &mut Vec<f32>, n: usize) {
    if v.len() != n {
        v.clear();
        v.resize(n, 0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Batch;
    use crate::presets::{self, init_random};
    use crate::Decoder;

    /// Every float the buffers of `a` hold, the per-target head vector aside.
    fn held(a: &Activations) -> u64 {
        let s = &a.scratch;
        let layers: usize = a
            .layers
            .iter()
            .chain([&a.work])
            .map(|l| {
                l.x.len()
                    + l.qkv.len()
                    + l.qk_pre.len()
                    + l.attn.len()
                    + l.lse.len()
                    + l.x_mid.len()
                    + l.mlp_pre.len()
                    + l.o_pre.len()
                    + l.mlp_out.len()
            })
            .sum();
        let scratch = [&s.h, &s.o, &s.act, &s.stat_a, &s.stat_b, &s.dx, &s.dh, &s.dact, &s.dpre, &s.dattn, &s.dqkv];
        (layers + a.x_final.len() + a.hidden.len() + a.dhidden.len() + scratch.iter().map(|v| v.len()).sum::<usize>())
            as u64
    }

    #[test]
    fn floats_per_token_is_what_a_forward_and_backward_hold() {
        for cfg in [
            presets::tiny_gpt2(),
            presets::tiny_llama(),
            presets::tiny_neox(),
            presets::tiny_gptj(),
            presets::tiny_gemma3(),
        ] {
            let (m, p) = (Decoder::new(cfg.clone()), init_random(&cfg, 0.1, 3));
            let mut b = Batch::default();
            b.push_sequence(&[1, 2, 3, 4, 5], 1);
            b.push_sequence(&[6, 7, 8], 1);
            let n = b.len() as u64;
            let extra = n * BATCH_FLOATS_PER_TOKEN;

            let mut acts = Activations::default();
            m.forward(&p, &b, &mut acts, false).unwrap();
            assert_eq!(held(&acts) + extra, n * Activations::floats_per_token(&cfg, false), "{cfg:?}");

            let mut acts = Activations::default();
            let out = m.logprobs(&p, &b, &mut acts, true).unwrap();
            let mut grads = crate::Params::zeros(&cfg);
            m.backward_logprobs(&p, &b, &mut acts, &vec![1.0; out.logp.len()], &mut grads).unwrap();
            assert_eq!(held(&acts) + extra, n * Activations::floats_per_token(&cfg, true), "{cfg:?}");

            // The same buffers through a checkpointed pass: the layers' other buffers are freed.
            let out = m.logprobs(&p, &b, &mut acts, Keep::LayerInputs).unwrap();
            m.backward_logprobs(&p, &b, &mut acts, &vec![1.0; out.logp.len()], &mut grads).unwrap();
            let checkpointed = Activations::floats_per_token(&cfg, Keep::LayerInputs);
            assert_eq!(held(&acts) + extra, n * checkpointed, "{cfg:?}");
            assert!(checkpointed < Activations::floats_per_token(&cfg, Keep::All));
        }
    }
}
