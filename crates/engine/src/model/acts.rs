//! The buffers of a forward pass: what backward reads, the scratch every layer reuses, and the
//! embedding gradients a split batch holds back.

use crate::config::DecoderConfig;
use crate::kernels::{self as k, Precision};
use crate::pages;
use crate::params::Params;
use crate::quant::bf16;
use rayon::prelude::*;

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

impl Keep {
    /// What a forward for backward keeps: every layer's activations, or with `checkpointing` each
    /// layer's input alone.
    pub fn for_backward(checkpointing: bool) -> Keep {
        if checkpointing {
            Keep::LayerInputs
        } else {
            Keep::All
        }
    }
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
    /// The products ([`LayerActs::products_mut`]) in bf16, for a layer of a [`Keep::All`] pass that keeps
    /// them so ([`Activations::kept_bf16`]); its f32 products are then empty between blocks.
    pub(crate) bf16: Bf16Products,
}

/// How many of a layer's buffers are [`LayerActs::products_mut`].
const PRODUCTS: usize = 6;

/// Values per parallel task when products are narrowed or widened: about 20 µs of the loop on one core,
/// long enough to pay for the task. (A step converts each product twice: about 60 ms of a GPT-2-small
/// step of 1280 tokens on one core, under 1%.)
pub(crate) const CONVERT_CHUNK: usize = 1 << 16;

/// A layer's products in bf16, in the order of [`LayerActs::products_mut`].
#[derive(Default)]
pub(crate) struct Bf16Products([Vec<u16>; PRODUCTS]);

impl LayerActs {
    /// Frees every buffer but the input `x` (a layer of a [`Keep::LayerInputs`] pass).
    fn keep_only_input(&mut self) {
        let x = std::mem::take(&mut self.x);
        *self = LayerActs { x, ..LayerActs::default() };
    }

    /// The kept outputs of the block's matrix products and of attention: `qkv`, `qk_pre`, `attn`,
    /// `mlp_pre`, `o_pre`, `mlp_out`. Under autocast each is a bf16 tensor (the output of a bf16 linear,
    /// or of attention on bf16 operands), and the backward reads it as such, so a bf16 pass may keep
    /// them in bf16 at no cost in accuracy beyond autocast's. The rest stays f32, as autocast keeps it:
    /// the residual stream (`x`, `x_mid`: each layer adds to it, and the norms read it), attention's
    /// log-sum-exp, and the adapter's `u` (its products are f32).
    fn products_mut(&mut self) -> [&mut Vec<f32>; PRODUCTS] {
        [&mut self.qkv, &mut self.qk_pre, &mut self.attn, &mut self.mlp_pre, &mut self.o_pre, &mut self.mlp_out]
    }

    /// Exchanges the f32 products of `self` and `other`: a layer kept in bf16 borrows the pass's one set
    /// of f32 product buffers (`other`, [`Activations::work`]) while its block runs.
    pub(crate) fn swap_products(&mut self, other: &mut LayerActs) {
        for (a, b) in self.products_mut().into_iter().zip(other.products_mut()) {
            std::mem::swap(a, b);
        }
    }

    /// Keeps the f32 products in `self.bf16`, each value rounded to the nearest bf16.
    pub(crate) fn narrow_products(&mut self) {
        let mut kept = std::mem::take(&mut self.bf16);
        for (src, dst) in self.products_mut().into_iter().zip(&mut kept.0) {
            pages::reuse(dst);
            dst.resize(src.len(), 0);
            let chunks = src.par_chunks(CONVERT_CHUNK).zip(dst.par_chunks_mut(CONVERT_CHUNK));
            chunks.for_each(|(src, dst)| bf16::narrow_into(src, dst));
        }
        self.bf16 = kept;
    }

    /// Widens `self.bf16` into the f32 products (the inverse of [`LayerActs::narrow_products`], up to
    /// the rounding).
    pub(crate) fn widen_products(&mut self) {
        let kept = std::mem::take(&mut self.bf16);
        for (src, dst) in kept.0.iter().zip(self.products_mut()) {
            fit(dst, src.len());
            let chunks = src.par_chunks(CONVERT_CHUNK).zip(dst.par_chunks_mut(CONVERT_CHUNK));
            chunks.for_each(|(src, dst)| bf16::widen_into(src, dst));
        }
        self.bf16 = kept;
    }

    /// Rounds the f32 products to bf16 in place: what [`LayerActs::narrow_products`] then
    /// [`LayerActs::widen_products`] give, for the one slot of a [`Keep::LayerInputs`] pass.
    pub(crate) fn round_products(&mut self) {
        for v in self.products_mut() {
            v.par_chunks_mut(CONVERT_CHUNK).for_each(bf16::round_in_place);
        }
    }

    /// The buffers a [`Keep::None`] pass's slot fills besides its input `x`: the products (in the order
    /// of [`LayerActs::products_mut`]), `lse` and `x_mid`; bit `i` of [`Activations::lent`] is buffer `i`.
    fn slot_buffers_mut(&mut self) -> [&mut Vec<f32>; PRODUCTS + 2] {
        let s = self;
        [&mut s.qkv, &mut s.qk_pre, &mut s.attn, &mut s.mlp_pre, &mut s.o_pre, &mut s.mlp_out, &mut s.lse, &mut s.x_mid]
    }

    /// Hands the pages of every buffer back where it can ([`crate::pages::discard`]):
    /// backward is done with the layer, and its next forward writes every buffer before reading it.
    /// Lengths are kept, so the next pass allocates nothing.
    pub(crate) fn discard(&mut self) {
        pages::discard(&mut self.x);
        self.slot_buffers_mut().into_iter().for_each(|v| pages::discard(v));
        self.bf16.0.iter_mut().for_each(|v| pages::discard(v));
    }

    /// What [`crate::Decoder`]'s attention half writes from q, k, v and the input, and backward reads:
    /// `attn`, `o_pre`, `x_mid`. An f32 pass recomputes them before each layer's backward
    /// ([`Activations::recomputes_attention`]) instead of keeping them per layer.
    fn attention_outputs_mut(&mut self) -> [&mut Vec<f32>; 3] {
        [&mut self.attn, &mut self.o_pre, &mut self.x_mid]
    }

    /// Exchanges the attention outputs of `self` and `other`: a layer of a pass that recomputes them
    /// borrows the pass's one set ([`Activations::work`]) while its block runs, forward or backward.
    pub(crate) fn swap_attention_outputs(&mut self, other: &mut LayerActs) {
        for (a, b) in self.attention_outputs_mut().into_iter().zip(other.attention_outputs_mut()) {
            std::mem::swap(a, b);
        }
    }

    /// Frees the f32 products (a layer that keeps them in bf16).
    fn free_f32_products(&mut self) {
        self.products_mut().into_iter().for_each(|v| *v = Vec::new());
    }

    /// Floats per token of the buffers above, as [`crate::Decoder::block_forward`] sizes them: those
    /// always kept in f32, and the products ([`LayerActs::products_mut`]).
    fn floats_per_token(cfg: &DecoderConfig) -> LayerFloats {
        let d = cfg.hidden as u64;
        let x_mid = if cfg.parallel_residual { 0 } else { d };
        let qk_pre = if cfg.qk_norm { ((cfg.n_heads + cfg.n_kv_heads) * cfg.head_dim) as u64 } else { 0 };
        let post_norm_inputs = if cfg.post_norms { 2 * d } else { 0 };
        LayerFloats {
            f32: d + cfg.n_heads as u64 + x_mid,
            products: cfg.qkv_dim() as u64
                + qk_pre
                + cfg.attn_dim() as u64
                + cfg.mlp_in_dim() as u64
                + post_norm_inputs,
            attention_outputs: cfg.attn_dim() as u64 + x_mid + if cfg.post_norms { d } else { 0 },
        }
    }
}

/// Per-token values of a layer's [`LayerActs`].
struct LayerFloats {
    /// `x`, `lse`, `x_mid`: f32 in every pass.
    f32: u64,
    /// [`LayerActs::products_mut`]: bf16 in a bf16 pass that keeps every layer.
    products: u64,
    /// [`LayerActs::attention_outputs_mut`] (of the two above): one set for every layer in an f32 pass
    /// that keeps every layer ([`Activations::recomputes_attention`]).
    attention_outputs: u64,
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
    pub(crate) dpre: Vec<f32>,    // [N, mlp_in] (gated MLPs; an ungated one uses `act`)
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
        // `dpre` shares the activation's buffer where it has its shape (an ungated MLP).
        let dpre = if cfg.mlp_in_dim() == cfg.ffn_hidden { 0 } else { cfg.mlp_in_dim() as u64 };
        let grads = 2 * d + ff + dpre + cfg.attn_dim() as u64 + cfg.qkv_dim() as u64;
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
    /// a block runs); in a [`Keep::All`] pass that keeps bf16, the f32 products every layer borrows while
    /// its block runs, forward and backward; empty otherwise.
    pub(crate) work: LayerActs,
    /// The layer whose activations `work` holds in a [`Keep::LayerInputs`] pass: the last after forward,
    /// then each layer backward recomputed, so that the last layer's block is not run twice in a row.
    pub(crate) work_layer: Option<usize>,
    /// The pass keeps its layers' products ([`LayerActs::products_mut`]) rounded to bf16: a bf16 pass
    /// that keeps something, unless [`Activations::keeping_f32`].
    pub(crate) kept_bf16: bool,
    /// [`Activations::keeping_f32`].
    keep_f32: bool,
    /// The pass keeps every layer in f32 but their attention outputs ([`LayerActs::attention_outputs_mut`]):
    /// one set in `work` serves every block, and backward re-runs each layer's attention half from its
    /// kept input and q, k, v (`Decoder::recompute_attention_half`) before the layer's backward. Unless
    /// [`Activations::keeping_attention`].
    pub(crate) recomputes_attention: bool,
    /// [`Activations::keeping_attention`].
    keep_attention: bool,
    /// Which of `work`'s buffers ([`LayerActs::slot_buffers_mut`], one bit each) a [`Keep::None`] pass
    /// run on the buffers of a training pass borrowed for its slot (`layers[0]`), to give back after it.
    lent: u16,
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
    /// `[targets, d]` the softmax-weighted mean of the head's rows per target (`kernels::head`'s
    /// `expect`), kept by a pass for backward: the head's input gradient comes from it, without the
    /// logits (`Decoder::backward_logprobs`); empty after a pass that keeps nothing.
    pub(crate) head_expect: Vec<f32>,
    /// `[N, d]` gradient of the final hidden states (kept to reuse the allocation)
    pub(crate) dhidden: Vec<f32>,
    pub(crate) scratch: Scratch,
}

impl Activations {
    /// Buffers whose bf16 passes keep every activation in f32, as an f32 pass does: backward reads the
    /// products unrounded, more accurate than autocast, for the memory of an f32 pass
    /// ([`Activations::bytes_per_token`] with [`Precision::F32`]). The reference that keeping bf16 is
    /// tested and measured against.
    pub fn keeping_f32(self) -> Self {
        Activations { keep_f32: true, ..self }
    }

    /// Buffers whose passes keep every layer's attention outputs, never recomputing them: about 2-3% less
    /// work a step than an f32 pass does by default, for 20% more of its activation memory (SmolLM2-135M:
    /// 1152 of 5769 floats a token a layer). The reference that recomputing is tested against.
    pub fn keeping_attention(self) -> Self {
        Activations { keep_attention: true, ..self }
    }

    /// Bytes per token that a forward pass of `cfg` in `precision` holds (then its backward, when it
    /// keeps something), with the batch's and the head's per-target vectors.
    ///
    /// [`Keep::All`] (a forward for backward, then the backward): every block's [`LayerActs`], the final
    /// norm's input, the hidden states and their gradient, and the forward and backward scratch; in f32,
    /// one set of attention outputs for every layer ([`Activations::recomputes_attention`]). In
    /// bf16, each layer's products ([`LayerActs::products_mut`]) are kept in bf16, and one set of f32
    /// product buffers serves every block while it runs. [`Keep::LayerInputs`]: the same with every
    /// block's input alone plus one f32 slot for the rest of a block (in bf16 too: the slot holds one
    /// layer, rounded in place). [`Keep::None`]: one block's buffers, reused by every block, the final
    /// norm's input, the hidden states and the forward scratch.
    pub fn bytes_per_token(cfg: &DecoderConfig, keep: impl Into<Keep>, precision: Precision) -> u64 {
        let (d, layers) = (cfg.hidden as u64, cfg.n_layers as u64);
        let LayerFloats { f32: kept_f32, products, attention_outputs } = LayerActs::floats_per_token(cfg);
        let layer = kept_f32 + products;
        let (f32_floats, bf16_values) = match keep.into() {
            Keep::All if precision == Precision::Bf16 => {
                (layers * kept_f32 + products + 3 * d + Scratch::floats_per_token(cfg, true), layers * products)
            }
            // Every layer's but the attention outputs, and one set of those.
            Keep::All => {
                let kept = layers * (layer - attention_outputs) + attention_outputs;
                (kept + 3 * d + Scratch::floats_per_token(cfg, true), 0)
            }
            Keep::LayerInputs => (layers * d + (layer - d) + 3 * d + Scratch::floats_per_token(cfg, true), 0),
            Keep::None => (layer + 2 * d + Scratch::floats_per_token(cfg, false), 0),
        };
        4 * (f32_floats + BATCH_FLOATS_PER_TOKEN) + 2 * bf16_values
    }

    /// Bytes per token of [`Activations::bytes_per_token`] that backward hands back after each layer
    /// ([`LayerActs::discard`]): a layer's kept buffers, or with [`Keep::LayerInputs`] its input.
    pub fn released_per_layer_bytes_per_token(cfg: &DecoderConfig, keep: impl Into<Keep>, precision: Precision) -> u64 {
        let LayerFloats { f32: kept_f32, products, attention_outputs } = LayerActs::floats_per_token(cfg);
        match keep.into() {
            Keep::All if precision == Precision::Bf16 => 4 * kept_f32 + 2 * products,
            Keep::All => 4 * (kept_f32 + products - attention_outputs),
            Keep::LayerInputs => 4 * cfg.hidden as u64,
            Keep::None => 0,
        }
    }

    /// [`Activations::bytes_per_token`] of an f32 pass, in floats. Kept for the callers that count
    /// floats; a bf16 pass is counted only in bytes.
    pub fn floats_per_token(cfg: &DecoderConfig, keep: impl Into<Keep>) -> u64 {
        Activations::bytes_per_token(cfg, keep, Precision::F32) / 4
    }

    /// Sets up the layer buffers for a pass in `precision` that keeps `keep`, freeing what it does not
    /// use (the buffers of another mode or precision, left by an earlier pass).
    ///
    /// A [`Keep::None`] pass frees nothing: it runs in `layers[0]`, borrowing from `work` whatever a
    /// training pass's layout keeps there (the f32 products of a bf16 pass, the whole slot of a
    /// checkpointed one), and [`Activations::end_pass`] gives it back. So the reference's forward can run
    /// on the buffers of the policy's training pass (a DPO step, before the policy's forward): it
    /// overwrites their contents, dead between steps, and the step holds no second set of buffers.
    pub(crate) fn prepare_layers(&mut self, keep: Keep, n_layers: usize, precision: Precision) {
        debug_assert_eq!(self.lent, 0, "a pass left borrowed buffers");
        self.kept = keep;
        self.work_layer = None;
        if keep == Keep::None {
            if self.layers.is_empty() {
                self.layers.push(LayerActs::default());
            }
            self.lent = self.exchange_slot(|_, slot, work| slot.capacity() < work.capacity());
            self.kept_bf16 = false;
            self.recomputes_attention = false;
            return;
        }
        self.kept_bf16 = precision == Precision::Bf16 && !self.keep_f32;
        // A bf16 pass keeps its attention outputs in bf16 (half the bytes) and has its speed to keep.
        self.recomputes_attention = keep == Keep::All && !self.kept_bf16 && !self.keep_attention;
        self.layers.resize_with(n_layers, LayerActs::default);
        match keep {
            Keep::LayerInputs => self.layers.iter_mut().for_each(LayerActs::keep_only_input),
            // Kept in bf16: each layer's bf16 products, and the f32 ones in `work` alone.
            Keep::All if self.kept_bf16 => {
                self.layers.iter_mut().for_each(LayerActs::free_f32_products);
                let mut work = LayerActs::default();
                work.swap_products(&mut self.work);
                self.work = work;
            }
            // Recomputed: one set of attention outputs, in `work`.
            Keep::All if self.recomputes_attention => {
                for la in &mut self.layers {
                    la.bf16 = Bf16Products::default();
                    la.attention_outputs_mut().into_iter().for_each(|v| *v = Vec::new());
                }
                let mut work = LayerActs::default();
                work.swap_attention_outputs(&mut self.work);
                self.work = work;
            }
            // `Keep::None` returned above.
            Keep::All | Keep::None => {
                self.layers.iter_mut().for_each(|la| la.bf16 = Bf16Products::default());
                self.work = LayerActs::default();
            }
        }
    }

    /// Ends a forward pass: gives back what a [`Keep::None`] pass borrowed from `work`
    /// ([`Activations::prepare_layers`]).
    pub(crate) fn end_pass(&mut self) {
        let lent = std::mem::take(&mut self.lent);
        self.exchange_slot(|i, _, _| lent & (1 << i) != 0);
    }

    /// Swaps each buffer of `layers[0]`'s slot ([`LayerActs::slot_buffers_mut`]) with `work`'s where
    /// `swap(i, slot's, work's)` says so; returns which it swapped, bit `i` for buffer `i`.
    fn exchange_slot(&mut self, swap: impl Fn(usize, &Vec<f32>, &Vec<f32>) -> bool) -> u16 {
        let (slot, work) = (&mut self.layers[0], &mut self.work);
        let mut swapped = 0;
        for (i, (s, w)) in slot.slot_buffers_mut().into_iter().zip(work.slot_buffers_mut()).enumerate() {
            if swap(i, s, w) {
                std::mem::swap(s, w);
                swapped |= 1 << i;
            }
        }
        swapped
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
            let (wte, wpe) = super::view::embedding_grads(grads);
            k::embedding_backward(wte, wpe, &self.rows, &self.tokens, &self.positions, d);
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

/// Resizes without keeping contents (every user overwrites before reading). A buffer whose pages were
/// handed back gets pooled ones first ([`pages::reuse`]).
pub(crate) fn fit(v: &mut Vec<f32>, n: usize) {
    pages::reuse(v);
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
    use crate::{Decoder, Model};

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Every byte the buffers of `a` hold, the per-target head vector aside.
    fn held(a: &Activations) -> u64 {
        let s = &a.scratch;
        let (mut f32s, mut bf16s) = (0, 0);
        for l in a.layers.iter().chain([&a.work]) {
            f32s += [&l.x, &l.qkv, &l.qk_pre, &l.attn, &l.lse, &l.x_mid, &l.mlp_pre, &l.o_pre, &l.mlp_out]
                .iter()
                .map(|v| v.len())
                .sum::<usize>();
            bf16s += l.bf16.0.iter().map(Vec::len).sum::<usize>();
        }
        let scratch = [&s.h, &s.o, &s.act, &s.stat_a, &s.stat_b, &s.dx, &s.dh, &s.dact, &s.dpre, &s.dattn, &s.dqkv];
        f32s += a.x_final.len() + a.hidden.len() + a.dhidden.len() + scratch.iter().map(|v| v.len()).sum::<usize>();
        (4 * f32s + 2 * bf16s) as u64
    }

    #[test]
    fn bytes_per_token_is_what_a_forward_and_backward_hold() {
        for cfg in [
            presets::tiny_gpt2(),
            presets::tiny_llama(),
            presets::tiny_neox(),
            presets::tiny_gptj(),
            presets::tiny_gemma3(),
            DecoderConfig { n_layers: 5, ..presets::tiny_llama() },
        ] {
            let (m, p) = (Decoder::new(cfg.clone()), init_random(&cfg, 0.1, 3));
            let mut b = Batch::default();
            b.push_sequence(&[1, 2, 3, 4, 5], 1);
            b.push_sequence(&[6, 7, 8], 1);
            let n = b.len() as u64;
            let extra = 4 * n * BATCH_FLOATS_PER_TOKEN;
            let mut grads = crate::Params::zeros(&cfg);
            // One set of buffers through every precision and training mode in turn: each pass frees what
            // an earlier one left and it does not use (a pass without backward leaves the backward's
            // scratch allocated: it gets fresh buffers).
            let mut acts = Activations::default();
            for precision in Precision::ALL {
                let model = Model::new(&p, None).with_precision(precision);
                let bytes = |keep: Keep| n * Activations::bytes_per_token(&cfg, keep, precision);
                let mut scoring = Activations::default();
                m.forward(model, &b, &mut scoring, false).unwrap();
                assert_eq!(held(&scoring) + extra, bytes(Keep::None), "{cfg:?} {precision}");

                for keep in [Keep::All, Keep::LayerInputs] {
                    let out = m.logprobs(model, &b, &mut acts, keep).unwrap();
                    m.backward_logprobs(model, &b, &mut acts, &vec![1.0; out.logp.len()], &mut grads).unwrap();
                    assert_eq!(held(&acts) + extra, bytes(keep), "{cfg:?} {precision} {keep:?}");
                }
                assert!(bytes(Keep::LayerInputs) < bytes(Keep::All), "{cfg:?} {precision}");
                // A scoring pass run on a training pass's buffers (a DPO step's reference forward) holds
                // nothing more, gives the log-probs of fresh buffers, and leaves the training pass's
                // results unchanged.
                let scored = m.logprobs(model, &b, &mut Activations::default(), Keep::None).unwrap();
                for keep in [Keep::All, Keep::LayerInputs] {
                    let mut trained = crate::Params::zeros(&cfg);
                    let out = m.logprobs(model, &b, &mut acts, keep).unwrap();
                    let dlogp = vec![1.0; out.logp.len()];
                    m.backward_logprobs(model, &b, &mut acts, &dlogp, &mut trained).unwrap();
                    let held_before = held(&acts);
                    let shared = m.logprobs(model, &b, &mut acts, Keep::None).unwrap();
                    assert_eq!(held(&acts), held_before, "{cfg:?} {precision} {keep:?}");
                    assert_eq!(bits(&shared.logp), bits(&scored.logp), "{cfg:?} {precision} {keep:?}");
                    let mut again = crate::Params::zeros(&cfg);
                    let out2 = m.logprobs(model, &b, &mut acts, keep).unwrap();
                    m.backward_logprobs(model, &b, &mut acts, &dlogp, &mut again).unwrap();
                    assert_eq!(bits(&out2.logp), bits(&out.logp), "{cfg:?} {precision} {keep:?}");
                    assert!(again == trained, "{cfg:?} {precision} {keep:?}: gradients differ");
                    assert_eq!(held(&acts), held_before, "{cfg:?} {precision} {keep:?}");
                }
                // Buffers that keep f32 in a bf16 pass hold what an f32 pass does.
                let mut f32_kept = Activations::default().keeping_f32();
                let out = m.logprobs(model, &b, &mut f32_kept, Keep::All).unwrap();
                m.backward_logprobs(model, &b, &mut f32_kept, &vec![1.0; out.logp.len()], &mut grads).unwrap();
                let f32_bytes = n * Activations::bytes_per_token(&cfg, Keep::All, Precision::F32);
                assert_eq!(held(&f32_kept) + extra, f32_bytes, "{cfg:?} {precision}");
            }
            // An f32 pass that keeps every layer's attention outputs holds L - 1 sets more than one that
            // recomputes them.
            let mut kept = Activations::default().keeping_attention();
            let model = Model::new(&p, None);
            let out = m.logprobs(model, &b, &mut kept, Keep::All).unwrap();
            m.backward_logprobs(model, &b, &mut kept, &vec![1.0; out.logp.len()], &mut grads).unwrap();
            let LayerFloats { attention_outputs, products, .. } = LayerActs::floats_per_token(&cfg);
            let (l, f32_all) = (cfg.n_layers as u64, Activations::bytes_per_token(&cfg, Keep::All, Precision::F32));
            assert_eq!(held(&kept) + extra, n * (f32_all + 4 * (l - 1) * attention_outputs), "{cfg:?}");
            // The floats of an f32 pass are its bytes over 4. A bf16 pass that keeps every layer holds
            // 2 bytes of each product per layer and 4 in the one f32 set, and the L - 1 sets of attention
            // outputs an f32 pass recomputes.
            for keep in [Keep::None, Keep::All, Keep::LayerInputs] {
                let f32_bytes = Activations::bytes_per_token(&cfg, keep, Precision::F32);
                assert_eq!(4 * Activations::floats_per_token(&cfg, keep), f32_bytes);
                let bf16_bytes = Activations::bytes_per_token(&cfg, keep, Precision::Bf16);
                let (l, products, outputs) = (l as i64, products as i64, attention_outputs as i64);
                let saved = if keep == Keep::All { (2 * l - 4) * products - 4 * (l - 1) * outputs } else { 0 };
                assert_eq!(bf16_bytes as i64 + saved, f32_bytes as i64, "{cfg:?} {keep:?}");
            }
        }
    }
}
