//! The switches that tell one member of the decoder family from another.
//!
//! GPT-2, Llama 1/2/3, Mistral, Qwen2, SmolLM2 and GPT-NeoX/Pythia are the same pre-norm decoder with a
//! handful of choices: how positions enter, which norm, which MLP, whether the residual is parallel, which
//! projections carry a bias, whether the LM head shares the embedding. `crates/hf` maps an HF
//! `config.json` onto this struct; the engine never sees `config.json`.

/// Normalisation layer used before attention, before the MLP and at the end of the trunk.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NormKind {
    /// `(x - mean) / sqrt(var + eps) * w + b` (GPT-2, GPT-NeoX).
    LayerNorm { eps: f32 },
    /// `x / sqrt(mean(x^2) + eps) * w` (Llama, Mistral, Qwen2).
    RmsNorm { eps: f32 },
    /// `x / sqrt(mean(x^2) + eps) * (1 + w)`: the weight is stored as an offset from one (Gemma).
    RmsNormUnitOffset { eps: f32 },
}

/// The MLP between the two residual additions.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MlpKind {
    /// `W_out gelu(W_in x + b_in) + b_out`, GELU by its tanh approximation (GPT-2's `gelu_new`).
    GeluTanh,
    /// Same with the exact erf GELU (GPT-NeoX's `gelu`).
    GeluErf,
    /// `W_down (silu(W_gate x) * W_up x)` (Llama's SwiGLU). `w_in` holds gate rows then up rows.
    SwiGlu,
    /// `W_down (gelu_tanh(W_gate x) * W_up x)` (Gemma's GeGLU), `w_in` laid out as for SwiGLU.
    GeGluTanh,
}

/// How the rotary frequencies are rescaled for long contexts (`rope_scaling` / `rope_parameters`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (HF `rope_type: linear`).
    Linear {
        factor: f32,
    },
    /// Llama 3.1's frequency-dependent rescaling (HF `rope_type: llama3`).
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_positions: usize,
    },
}

/// Which pairs of dimensions a rotation mixes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeStyle {
    /// Dimension `i` with `i + rotary_dim/2` (HF `rotate_half`: Llama, NeoX, Qwen2, Mistral).
    Half,
    /// Dimension `2i` with `2i + 1` (GPT-J).
    Interleaved,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeConfig {
    pub theta: f32,
    /// Leading dimensions of each head that rotate; the rest pass through (NeoX `rotary_pct`).
    pub rotary_dim: usize,
    pub style: RopeStyle,
    pub scaling: RopeScaling,
}

/// Layers that attend to the whole context, interleaved with sliding-window ones (Gemma 3's
/// `layer_types`): they ignore `sliding_window` and rotate with their own base.
#[derive(Clone, Debug, PartialEq)]
pub struct GlobalLayers {
    /// Indices of the full-attention layers.
    pub layers: Vec<usize>,
    /// Their rotary embedding (`rope_parameters.full_attention`: another base, possibly rescaled).
    pub rope: RopeConfig,
}

/// How positions enter the model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PositionKind {
    /// A learned table `wpe[max_positions, d]` added to the token embedding (GPT-2).
    Learned,
    /// Rotary embeddings applied to queries and keys.
    Rotary(RopeConfig),
}

/// One decoder of the family. Shapes below use `d = hidden`, `hd = head_dim`, `ff = ffn_hidden`.
#[derive(Clone, Debug, PartialEq)]
pub struct DecoderConfig {
    pub vocab_size: usize,
    pub hidden: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    /// Key/value heads; fewer than `n_heads` is grouped-query attention.
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn_hidden: usize,
    pub max_positions: usize,
    pub norm: NormKind,
    pub mlp: MlpKind,
    pub positions: PositionKind,
    /// Bias on the fused q/k/v projection (GPT-2, NeoX, Qwen2).
    pub qkv_bias: bool,
    /// Bias on the attention output projection (GPT-2, NeoX).
    pub attn_out_bias: bool,
    /// Biases on the MLP projections (GPT-2, NeoX).
    pub mlp_bias: bool,
    /// `x + attn(norm1(x)) + mlp(norm2(x))` instead of the sequential residual (NeoX).
    pub parallel_residual: bool,
    /// The LM head is the token embedding (GPT-2, SmolLM2, Qwen2 small sizes).
    pub tied_embeddings: bool,
    /// Keys further back than this are masked (Mistral); `None` is full causal attention.
    pub sliding_window: Option<usize>,
    /// Per-head RMSNorm of queries and keys before the rotation, weights `q_norm`, `k_norm: [hd]`
    /// (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Layers (indices) whose attention has no rotary embedding at all (SmolLM3's `no_rope_layers`).
    pub layers_without_rope: Vec<usize>,
    /// The MLP reads the attention's norm: one norm per layer, no `norm2` (GPT-J's `ln_1`, with the
    /// parallel residual).
    pub shared_norm: bool,
    /// The LM head has a bias `b_head [vocab]` (GPT-J).
    pub head_bias: bool,
    /// The token embedding is multiplied by `sqrt(hidden)` (rounded to f32) before the first block
    /// (Gemma).
    pub scaled_embeddings: bool,
    /// Norms on the attention and MLP outputs before each residual add, weights `post_attn_norm`,
    /// `post_mlp_norm` (Gemma 2/3's `post_attention_layernorm`, `post_feedforward_layernorm`).
    pub post_norms: bool,
    /// Full-attention layers among sliding-window ones, with their own rotary base (Gemma 3).
    pub global_layers: Option<GlobalLayers>,
}

/// The sizes of a decoder, apart from its family's switches. `DecoderConfig::gpt2(dims)`,
/// `::llama(dims)` and `::neox(dims)` add those switches.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dims {
    pub vocab_size: usize,
    pub hidden: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    /// Key/value heads; fewer than `n_heads` is grouped-query attention.
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn_hidden: usize,
    pub max_positions: usize,
}

impl RopeConfig {
    /// `rotate_half` rotary embeddings without rescaling, over the first `rotary_dim` dimensions of a head.
    pub fn half(theta: f32, rotary_dim: usize) -> Self {
        RopeConfig { theta, rotary_dim, style: RopeStyle::Half, scaling: RopeScaling::None }
    }
}

/// The family constructors. Each gives the switches of its family with the defaults of the HF config
/// class (`GPT2Config`, `LlamaConfig`, `GPTNeoXConfig`); a member that differs overrides fields with
/// `DecoderConfig { qkv_bias: true, ..DecoderConfig::llama(dims) }`. A field added to `DecoderConfig` is
/// set here and nowhere else.
impl DecoderConfig {
    fn with_dims(d: Dims, norm: NormKind, mlp: MlpKind, positions: PositionKind) -> Self {
        DecoderConfig {
            vocab_size: d.vocab_size,
            hidden: d.hidden,
            n_layers: d.n_layers,
            n_heads: d.n_heads,
            n_kv_heads: d.n_kv_heads,
            head_dim: d.head_dim,
            ffn_hidden: d.ffn_hidden,
            max_positions: d.max_positions,
            norm,
            mlp,
            positions,
            qkv_bias: false,
            attn_out_bias: false,
            mlp_bias: false,
            parallel_residual: false,
            tied_embeddings: false,
            sliding_window: None,
            qk_norm: false,
            layers_without_rope: Vec::new(),
            shared_norm: false,
            head_bias: false,
            scaled_embeddings: false,
            post_norms: false,
            global_layers: None,
        }
    }

    /// GPT-2: LayerNorm (eps 1e-5), learned positions, tanh GELU, biases everywhere, sequential residual,
    /// LM head tied to the embedding.
    pub fn gpt2(dims: Dims) -> Self {
        DecoderConfig {
            qkv_bias: true,
            attn_out_bias: true,
            mlp_bias: true,
            tied_embeddings: true,
            ..Self::with_dims(dims, NormKind::LayerNorm { eps: 1e-5 }, MlpKind::GeluTanh, PositionKind::Learned)
        }
    }

    /// Llama: RMSNorm (eps 1e-6), rotary over the whole head (theta 10000, `rotate_half`), SwiGLU, no
    /// biases, sequential residual, untied LM head.
    pub fn llama(dims: Dims) -> Self {
        let rope = RopeConfig::half(10000.0, dims.head_dim);
        Self::with_dims(dims, NormKind::RmsNorm { eps: 1e-6 }, MlpKind::SwiGlu, PositionKind::Rotary(rope))
    }

    /// GPT-NeoX / Pythia: LayerNorm (eps 1e-5), rotary over the first quarter of each head (`rotary_pct`
    /// 0.25, theta 10000), erf GELU, biases everywhere, parallel residual, untied LM head.
    pub fn neox(dims: Dims) -> Self {
        let rope = RopeConfig::half(10000.0, dims.head_dim / 4);
        DecoderConfig {
            qkv_bias: true,
            attn_out_bias: true,
            mlp_bias: true,
            parallel_residual: true,
            ..Self::with_dims(dims, NormKind::LayerNorm { eps: 1e-5 }, MlpKind::GeluErf, PositionKind::Rotary(rope))
        }
    }

    /// Whether layer `layer` rotates its queries and keys (rotary models, except `layers_without_rope`).
    pub fn rotary_in_layer(&self, layer: usize) -> bool {
        matches!(self.positions, PositionKind::Rotary(_)) && !self.layers_without_rope.contains(&layer)
    }

    /// The rotary embedding of rotary models (of the non-global layers, with `global_layers`).
    fn positions_rope(&self) -> Option<RopeConfig> {
        match self.positions {
            PositionKind::Rotary(r) => Some(r),
            PositionKind::Learned => None,
        }
    }

    /// Whether layer `layer` is one of the full-attention layers of [`DecoderConfig::global_layers`].
    pub fn is_global_layer(&self, layer: usize) -> bool {
        self.global_layers.as_ref().is_some_and(|g| g.layers.contains(&layer))
    }

    /// The keys layer `layer` may look back over: `sliding_window`, except in a global layer.
    pub fn window_in_layer(&self, layer: usize) -> Option<usize> {
        self.sliding_window.filter(|_| !self.is_global_layer(layer))
    }

    /// Columns of the fused q/k/v projection output: `(n_heads + 2 n_kv_heads) * head_dim`.
    pub fn qkv_dim(&self) -> usize {
        (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
    }

    /// Width of the attention output before `w_o`: `n_heads * head_dim`.
    pub fn attn_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Rows of `w_in`: `ff` for a plain MLP, `2 ff` (gate, then up) for SwiGLU.
    pub fn mlp_in_dim(&self) -> usize {
        match self.mlp {
            MlpKind::SwiGlu | MlpKind::GeGluTanh => 2 * self.ffn_hidden,
            MlpKind::GeluTanh | MlpKind::GeluErf => self.ffn_hidden,
        }
    }

    /// Parameters of a decoder of this shape: the size of `Params::zeros(self)`, without allocating.
    pub fn param_count(&self) -> u64 {
        let (d, v) = (self.hidden as u64, self.vocab_size as u64);
        let norm = match self.norm {
            NormKind::LayerNorm { .. } => 2 * d, // weight, bias
            NormKind::RmsNorm { .. } | NormKind::RmsNormUnitOffset { .. } => d,
        };
        let (qkv, attn) = (self.qkv_dim() as u64, self.attn_dim() as u64);
        let (mlp_in, ff) = (self.mlp_in_dim() as u64, self.ffn_hidden as u64);
        let on = |b: bool, n: u64| if b { n } else { 0 };
        let norms = if self.shared_norm { norm } else { 2 * norm } + on(self.post_norms, 2 * norm);
        let layer = norms
            + qkv * d
            + on(self.qkv_bias, qkv)
            + on(self.qk_norm, 2 * self.head_dim as u64)
            + d * attn
            + on(self.attn_out_bias, d)
            + mlp_in * d
            + on(self.mlp_bias, mlp_in)
            + d * ff
            + on(self.mlp_bias, d);
        let wpe = on(matches!(self.positions, PositionKind::Learned), self.max_positions as u64 * d);
        let lm_head = on(!self.tied_embeddings, v * d) + on(self.head_bias, v);
        v * d + wpe + self.n_layers as u64 * layer + norm + lm_head
    }

    /// Checks the invariants the kernels rely on; the message names the offending sizes.
    pub fn validate(&self) -> Result<(), String> {
        let fail = |m: String| Err(m);
        if self.hidden == 0 || self.n_layers == 0 || self.vocab_size == 0 || self.head_dim == 0 {
            return fail("hidden size, layer count, vocabulary and head_dim must be positive".into());
        }
        if self.n_heads == 0 || self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return fail(format!(
                "num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({})",
                self.n_heads, self.n_kv_heads
            ));
        }
        let global_rope = self.global_layers.as_ref().map(|g| g.rope);
        for r in [self.positions_rope(), global_rope].into_iter().flatten() {
            if r.rotary_dim == 0 || r.rotary_dim > self.head_dim || !r.rotary_dim.is_multiple_of(2) {
                return fail(format!(
                    "rotary dimension {} must be even and within head_dim {}",
                    r.rotary_dim, self.head_dim
                ));
            }
        }
        if self.post_norms && (self.parallel_residual || self.shared_norm) {
            return fail("norms after each branch (post_norms) need the sequential residual and two norms".into());
        }
        if self.global_layers.as_ref().is_some_and(|g| g.layers.iter().any(|&l| l >= self.n_layers)) {
            return fail(format!("a full-attention layer index is not below the {} layers", self.n_layers));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::Params;
    use crate::presets::{tiny_gpt2, tiny_gptj, tiny_llama, tiny_neox};

    #[test]
    fn param_count_is_the_size_of_zeroed_params() {
        let mixed_biases = DecoderConfig { qkv_bias: true, attn_out_bias: false, mlp_bias: true, ..tiny_llama() };
        let untied_gpt2 = DecoderConfig { tied_embeddings: false, attn_out_bias: false, ..tiny_gpt2() };
        let qwen3_smollm3 = DecoderConfig { qk_norm: true, layers_without_rope: vec![1], ..tiny_llama() };
        let gptj_hf = DecoderConfig { shared_norm: true, head_bias: true, tied_embeddings: false, ..tiny_gptj() };
        let gemma3 = crate::presets::tiny_gemma3();
        for cfg in [
            tiny_gpt2(),
            tiny_llama(),
            tiny_neox(),
            tiny_gptj(),
            mixed_biases,
            untied_gpt2,
            qwen3_smollm3,
            gptj_hf,
            gemma3,
        ] {
            assert_eq!(cfg.param_count(), Params::zeros(&cfg).numel() as u64, "{cfg:?}");
        }
    }
}
