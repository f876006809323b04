//! Shared by the `lora_*` tests: tiny models of three families, adapters on HF modules of each, a batch.

#![allow(dead_code)] // each test binary uses part of it

use std::ops::Range;

use dpo_engine::presets::{init_random, tiny_gemma3, tiny_gpt2, tiny_llama, tiny_neox};
use dpo_engine::rng::Rng;
use dpo_engine::{Adapter, Batch, DecoderConfig, LoraTarget, NormKind, Params, Site};

/// A module of one layer: `(HF name, site, rows of the site's output)`.
pub type Module = (&'static str, Site, Range<usize>);

/// Llama (GQA, SwiGLU): every linear of HF's Llama in layer 1; layer 0 only `q_proj` and `up_proj`,
/// which cover part of their fused weights' rows.
pub fn llama() -> (DecoderConfig, Vec<Vec<Module>>) {
    let c = tiny_llama();
    let (q, kv, ff) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.ffn_hidden);
    let partial = vec![("self_attn.q_proj", Site::Qkv, 0..q), ("mlp.up_proj", Site::MlpIn, ff..2 * ff)];
    let all = vec![
        ("self_attn.q_proj", Site::Qkv, 0..q),
        ("self_attn.k_proj", Site::Qkv, q..q + kv),
        ("self_attn.v_proj", Site::Qkv, q + kv..q + 2 * kv),
        ("self_attn.o_proj", Site::AttnOut, 0..c.hidden),
        ("mlp.gate_proj", Site::MlpIn, 0..ff),
        ("mlp.up_proj", Site::MlpIn, ff..2 * ff),
        ("mlp.down_proj", Site::MlpOut, 0..c.hidden),
    ];
    (c, vec![partial, all])
}

/// GPT-2 (LayerNorm, biases, Conv1D): `c_attn` covers every q/k/v row, in both layers with every linear.
pub fn gpt2() -> (DecoderConfig, Vec<Vec<Module>>) {
    let c = tiny_gpt2();
    let all = vec![
        ("attn.c_attn", Site::Qkv, 0..c.qkv_dim()),
        ("attn.c_proj", Site::AttnOut, 0..c.hidden),
        ("mlp.c_fc", Site::MlpIn, 0..c.ffn_hidden),
        ("mlp.c_proj", Site::MlpOut, 0..c.hidden),
    ];
    (c, vec![all.clone(), all])
}

/// GPT-NeoX (parallel residual, partial rotary): every linear in layer 0, `query_key_value` alone in
/// layer 1.
pub fn neox() -> (DecoderConfig, Vec<Vec<Module>>) {
    let c = tiny_neox();
    let qkv = ("attention.query_key_value", Site::Qkv, 0..c.qkv_dim());
    let all = vec![
        qkv.clone(),
        ("attention.dense", Site::AttnOut, 0..c.hidden),
        ("mlp.dense_h_to_4h", Site::MlpIn, 0..c.ffn_hidden),
        ("mlp.dense_4h_to_h", Site::MlpOut, 0..c.hidden),
    ];
    (c, vec![all, vec![qkv]])
}

/// Gemma 3 (q/k norms, norms after each branch, unit-offset RMSNorm, sliding windows): every linear in
/// each of its three layers, so the frozen norms' input gradients are all on the path.
pub fn gemma3() -> (DecoderConfig, Vec<Vec<Module>>) {
    let c = tiny_gemma3();
    let (q, kv, ff) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.ffn_hidden);
    let all = vec![
        ("self_attn.q_proj", Site::Qkv, 0..q),
        ("self_attn.k_proj", Site::Qkv, q..q + kv),
        ("self_attn.v_proj", Site::Qkv, q + kv..q + 2 * kv),
        ("self_attn.o_proj", Site::AttnOut, 0..c.hidden),
        ("mlp.gate_proj", Site::MlpIn, 0..ff),
        ("mlp.up_proj", Site::MlpIn, ff..2 * ff),
        ("mlp.down_proj", Site::MlpOut, 0..c.hidden),
    ];
    (c, vec![all.clone(), all.clone(), all])
}

pub fn families() -> Vec<(&'static str, DecoderConfig, Vec<Vec<Module>>)> {
    let named = |name, (c, m)| (name, c, m);
    vec![named("llama", llama()), named("gpt2", gpt2()), named("neox", neox()), named("gemma3", gemma3())]
}

/// An adapter on `modules` (ranks 2 and 3 alternately, alpha 6) with A and B drawn from `seed`, so that
/// no gradient is trivially zero (PEFT starts B at zero).
pub fn adapter(cfg: &DecoderConfig, modules: &[Vec<Module>], dropout: f32, seed: u64) -> Adapter {
    let targets: Vec<Vec<LoraTarget>> = modules
        .iter()
        .map(|layer| {
            layer
                .iter()
                .enumerate()
                .map(|(i, (name, site, rows))| {
                    let r = 2 + i % 2;
                    LoraTarget { module: name.to_string(), site: *site, rows: rows.clone(), r, scale: 6.0 / r as f32 }
                })
                .collect()
        })
        .collect();
    let mut a = Adapter::zeros(cfg, &targets, dropout);
    let mut rng = Rng::new(seed);
    for pair in a.layers.iter_mut().flat_map(|l| l.pairs.iter_mut()) {
        pair.a.data.iter_mut().for_each(|v| *v = 0.2 * rng.normal() as f32);
        pair.b.data.iter_mut().for_each(|v| *v = 0.2 * rng.normal() as f32);
    }
    a
}

/// Random base weights with every 1-D tensor (norm scales, biases) drawn around 1, none trivial (a
/// unit-offset norm's stored weight around 0: its scale `1 + w` around 1).
pub fn base(cfg: &DecoderConfig) -> Params {
    let mut p = init_random(cfg, 0.4, 3);
    let mut r = Rng::new(11);
    let unit_offset = matches!(cfg.norm, NormKind::RmsNormUnitOffset { .. });
    for (name, t) in p.named_mut() {
        if t.shape.len() == 1 {
            let centre = if unit_offset && name.contains("norm") { 0.0 } else { 1.0 };
            t.data.iter_mut().for_each(|x| *x = centre + 0.3 * r.normal() as f32);
        }
    }
    p
}

/// Two sequences (one short) with targets after the first token.
pub fn batch(cfg: &DecoderConfig) -> Batch {
    let mut r = Rng::new(7);
    let mut b = Batch::default();
    for len in [9, 6] {
        let ids: Vec<u32> = (0..len).map(|_| r.below(cfg.vocab_size) as u32).collect();
        b.push_sequence(&ids, 1);
    }
    b
}
