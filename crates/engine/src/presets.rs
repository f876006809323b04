//! Model shapes used by benchmarks and the built-in experiment, and random initialisation.

use crate::config::*;
use crate::params::{Params, Tensor};
use crate::rng::Rng;

/// GPT-2 small: 12 layers, d 768, 12 heads, vocabulary 50257, 1024 positions (124M parameters).
pub fn gpt2_small() -> DecoderConfig {
    DecoderConfig::gpt2(Dims {
        vocab_size: 50257,
        hidden: 768,
        n_layers: 12,
        n_heads: 12,
        n_kv_heads: 12,
        head_dim: 64,
        ffn_hidden: 3072,
        max_positions: 1024,
    })
}

/// SmolLM2-135M: a Llama with 30 layers, d 576, 9 heads over 3 key/value heads, SwiGLU 1536,
/// vocabulary 49152, tied embeddings (as in `../shared/tools/torch_engine_bench.py`).
pub fn smollm2_135m() -> DecoderConfig {
    DecoderConfig {
        norm: NormKind::RmsNorm { eps: 1e-5 },
        positions: PositionKind::Rotary(RopeConfig::half(100000.0, 64)),
        tied_embeddings: true,
        ..DecoderConfig::llama(Dims {
            vocab_size: 49152,
            hidden: 576,
            n_layers: 30,
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
            ffn_hidden: 1536,
            max_positions: 8192,
        })
    }
}

/// A SmolLM2-shaped Llama (RMSNorm eps 1e-5, vocabulary 49152, tied embeddings, 8192 positions, head 64).
fn smollm2(theta: f32, hidden: usize, n_layers: usize, n_heads: usize, n_kv_heads: usize, ffn: usize) -> DecoderConfig {
    DecoderConfig {
        norm: NormKind::RmsNorm { eps: 1e-5 },
        positions: PositionKind::Rotary(RopeConfig::half(theta, 64)),
        tied_embeddings: true,
        ..DecoderConfig::llama(Dims {
            vocab_size: 49152,
            hidden,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim: 64,
            ffn_hidden: ffn,
            max_positions: 8192,
        })
    }
}

/// SmolLM2-360M: 32 layers, d 960, 15 heads over 5 key/value heads, SwiGLU 2560 (362M parameters).
pub fn smollm2_360m() -> DecoderConfig {
    smollm2(100000.0, 960, 32, 15, 5, 2560)
}

/// SmolLM2-1.7B: 24 layers, d 2048, 32 heads (no GQA), SwiGLU 8192 (1.71B parameters).
pub fn smollm2_1_7b() -> DecoderConfig {
    smollm2(130000.0, 2048, 24, 32, 32, 8192)
}

/// Llama-3-8B's shape: 32 layers, d 4096, 32 heads over 8 key/value heads of 128, SwiGLU 14336,
/// vocabulary 128256, untied head, rotary theta 500000 (plain rotary: Llama 3.1's frequency scaling
/// is not modelled), 8192 positions (8.03B parameters).
pub fn llama3_8b() -> DecoderConfig {
    DecoderConfig {
        norm: NormKind::RmsNorm { eps: 1e-5 },
        positions: PositionKind::Rotary(RopeConfig::half(500000.0, 128)),
        ..DecoderConfig::llama(Dims {
            vocab_size: 128256,
            hidden: 4096,
            n_layers: 32,
            n_heads: 32,
            n_kv_heads: 8,
            head_dim: 128,
            ffn_hidden: 14336,
            max_positions: 8192,
        })
    }
}

/// Sizes for tests: vocabulary 61, d 16, 2 layers, 4 heads of 4, MLP 24, 32 positions.
pub const TINY: Dims = Dims {
    vocab_size: 61,
    hidden: 16,
    n_layers: 2,
    n_heads: 4,
    n_kv_heads: 4,
    head_dim: 4,
    ffn_hidden: 24,
    max_positions: 32,
};

/// A tiny GPT-2 (`TINY` sizes) for tests.
pub fn tiny_gpt2() -> DecoderConfig {
    DecoderConfig::gpt2(TINY)
}

/// A tiny Llama (`TINY` sizes, two key/value heads: grouped-query attention) for tests.
pub fn tiny_llama() -> DecoderConfig {
    DecoderConfig::llama(Dims { n_kv_heads: 2, ..TINY })
}

/// A tiny GPT-NeoX (`TINY` sizes, heads of 8 so that the quarter that rotates is 2 wide) for tests.
pub fn tiny_neox() -> DecoderConfig {
    DecoderConfig::neox(Dims { n_heads: 2, n_kv_heads: 2, head_dim: 8, ..TINY })
}

/// A tiny GPT-J (`TINY` sizes): GPT-NeoX's block with interleaved partial rotary, tanh GELU and a tied
/// head, for tests.
pub fn tiny_gptj() -> DecoderConfig {
    let rope = RopeConfig { style: RopeStyle::Interleaved, ..RopeConfig::half(10000.0, 6) };
    DecoderConfig {
        mlp: MlpKind::GeluTanh,
        positions: PositionKind::Rotary(rope),
        tied_embeddings: true,
        ..DecoderConfig::neox(Dims { n_heads: 2, n_kv_heads: 1, head_dim: 8, ..TINY })
    }
}

/// A tiny Gemma 3 (`TINY` sizes, one key/value head, three layers): unit-offset RMSNorm, GeGLU, q/k
/// norms, norms after each branch, scaled embeddings, a tied head, and sliding-window layers 0 and 1
/// (window 3, theta 10000) around a full-attention layer 2 (theta 1e6), for tests.
pub fn tiny_gemma3() -> DecoderConfig {
    DecoderConfig {
        norm: NormKind::RmsNormUnitOffset { eps: 1e-6 },
        mlp: MlpKind::GeGluTanh,
        tied_embeddings: true,
        sliding_window: Some(3),
        qk_norm: true,
        scaled_embeddings: true,
        post_norms: true,
        global_layers: Some(GlobalLayers { layers: vec![2], rope: RopeConfig::half(1e6, TINY.head_dim) }),
        ..DecoderConfig::llama(Dims { n_layers: 3, n_kv_heads: 1, ..TINY })
    }
}

/// A named preset, for command-line flags.
pub fn by_name(name: &str) -> Option<DecoderConfig> {
    match name {
        "gpt2-small" | "gpt2" => Some(gpt2_small()),
        "smollm2-135m" | "llama" => Some(smollm2_135m()),
        "smollm2-360m" => Some(smollm2_360m()),
        "smollm2-1.7b" => Some(smollm2_1_7b()),
        "llama3-8b" => Some(llama3_8b()),
        _ => None,
    }
}

/// GPT-2-style initialisation: matrices and embeddings ~ N(0, std²), biases 0, norm scales 1 (a
/// unit-offset norm's stored weight 0).
pub fn init_random(cfg: &DecoderConfig, std: f32, seed: u64) -> Params {
    init_random_each(cfg, std, seed, |_, _| {})
}

/// [`init_random`], handing each tensor to `each` (name, tensor) as soon as it is drawn, in
/// [`Params::named`] order: a caller can store it another way and free it (e.g. quantise a frozen base
/// without ever holding all of it in f32; `Params::zeros`' untouched pages cost no memory).
pub fn init_random_each(cfg: &DecoderConfig, std: f32, seed: u64, mut each: impl FnMut(&str, &mut Tensor)) -> Params {
    let unit_scale = if matches!(cfg.norm, NormKind::RmsNormUnitOffset { .. }) { 0.0 } else { 1.0 };
    let mut p = Params::zeros(cfg);
    let mut rng = Rng::new(seed);
    for (name, t) in p.named_mut() {
        if name.ends_with("norm1.weight")
            || name.ends_with("norm2.weight")
            || name.ends_with("_norm.weight")
            || name == "norm_f.weight"
        {
            t.data.iter_mut().for_each(|x| *x = unit_scale);
        } else if t.shape.len() == 2 {
            t.data.iter_mut().for_each(|x| *x = (rng.normal() as f32) * std);
        }
        each(&name, t);
    }
    p
}

/// Matrix-multiply FLOPs of one forward pass: `2 * rows * in * out` for every projection, the
/// attention products for `n` tokens attending on average to `avg_keys` keys, and the LM head on
/// `targets` rows. Backward costs about twice this.
pub fn forward_flops(cfg: &DecoderConfig, n: usize, avg_keys: f64, targets: usize) -> f64 {
    let d = cfg.hidden as f64;
    let per_token_layer = 2.0
        * (d * cfg.qkv_dim() as f64
            + cfg.attn_dim() as f64 * d
            + d * cfg.mlp_in_dim() as f64
            + cfg.ffn_hidden as f64 * d)
        + 4.0 * cfg.attn_dim() as f64 * avg_keys;
    n as f64 * cfg.n_layers as f64 * per_token_layer + 2.0 * targets as f64 * d * cfg.vocab_size as f64
}
