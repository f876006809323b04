//! The buffers of a forward pass: what backward reads, the scratch every layer reuses, and the
//! embedding gradients a split batch holds back.

use crate::kernels as k;
use crate::params::Params;

/// What forward keeps for one block (see the module doc of [`crate::model`]). `N` rows, `d = hidden`.
#[derive(Default)]
pub(crate) struct LayerActs {
    pub(crate) x: Vec<f32>,       // [N, d] block input
    pub(crate) qkv: Vec<f32>,     // [N, qkv_dim] after rotary
    pub(crate) attn: Vec<f32>,    // [N, n_heads * hd]
    pub(crate) lse: Vec<f32>,     // [N, n_heads] (packed attention only)
    pub(crate) x_mid: Vec<f32>,   // [N, d] x + attention (sequential residual only)
    pub(crate) mlp_pre: Vec<f32>, // [N, mlp_in_dim]
}

/// Buffers a block overwrites before reading; one set serves every layer.
#[derive(Default)]
pub(crate) struct Scratch {
    pub(crate) h: Vec<f32>,      // [N, d] norm output, then (forward) the MLP output
    pub(crate) o: Vec<f32>,      // [N, d] attention projection output
    pub(crate) act: Vec<f32>,    // [N, ff] MLP activation
    pub(crate) stat_a: Vec<f32>, // [N] mean
    pub(crate) stat_b: Vec<f32>, // [N] rstd
    pub(crate) dx: Vec<f32>,     // [N, d]
    pub(crate) dh: Vec<f32>,     // [N, d]
    pub(crate) dact: Vec<f32>,   // [N, ff]
    pub(crate) dpre: Vec<f32>,   // [N, mlp_in]
    pub(crate) dattn: Vec<f32>,  // [N, attn_dim]
    pub(crate) dqkv: Vec<f32>,   // [N, qkv_dim]
}

/// Activations of one forward pass plus scratch space, reused across steps to avoid allocation.
#[derive(Default)]
pub struct Activations {
    pub(crate) n: usize,
    pub(crate) kept: bool,
    pub(crate) layers: Vec<LayerActs>,
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
