//! The gradients of the family switches against central finite differences of the whole model:
//! `L = sum_t g_t logp_t` for fixed random `g`, every parameter a switch adds checked element by element
//! and a sample of the projections around it.

use dpo_engine::presets::{init_random, tiny_gemma3, tiny_gptj, tiny_llama};
use dpo_engine::rng::Rng;
use dpo_engine::{Activations, Batch, Decoder, DecoderConfig, GlobalLayers, MlpKind, NormKind, Params, RopeConfig};

/// Two sequences (one short enough to leave positions unused) with targets after the first token.
fn batch(cfg: &DecoderConfig) -> Batch {
    let mut r = Rng::new(7);
    let mut b = Batch::default();
    for len in [9, 6] {
        let ids: Vec<u32> = (0..len).map(|_| r.below(cfg.vocab_size) as u32).collect();
        b.push_sequence(&ids, 1);
    }
    b
}

/// Random weights, with every 1-D tensor (norm scales, biases) drawn around 1 so that none is trivial
/// (a unit-offset norm's stored weight around 0: its scale `1 + w` around 1).
fn params(cfg: &DecoderConfig) -> Params {
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

fn loss(m: &Decoder, p: &Params, b: &Batch, g: &[f32]) -> f64 {
    let out = m.logprobs(p, b, &mut Activations::default(), false).unwrap();
    out.logp.iter().zip(g).map(|(l, g)| *l as f64 * *g as f64).sum()
}

/// Checks the analytic gradient of every element of the tensors named in `whole`, and of every 7th element
/// of the others, against central differences; the error is taken over each tensor's checked entries.
fn check(cfg: DecoderConfig, whole: &[&str]) {
    let m = Decoder::new(cfg.clone());
    let p = params(&cfg);
    let b = batch(&cfg);
    let mut r = Rng::new(5);
    let g: Vec<f32> = (0..b.targets.len()).map(|_| r.uniform() as f32 * 2.0 - 1.0).collect();
    let mut acts = Activations::default();
    m.logprobs(&p, &b, &mut acts, true).unwrap();
    let mut grads = Params::zeros(&cfg);
    m.backward_logprobs(&p, &b, &mut acts, &g, &mut grads).unwrap();

    let eps = 1e-2f32;
    let analytic = grads.named();
    let names: Vec<String> = analytic.iter().map(|(n, _)| n.clone()).collect();
    for (name, an) in names.iter().zip(&analytic) {
        let every = if whole.iter().any(|w| name.contains(w)) { 1 } else { 7 };
        let (mut diff, mut norm) = (0.0f64, 0.0f64);
        for i in (0..an.1.data.len()).step_by(every) {
            let mut q = p.clone();
            let at = |q: &mut Params, v: f32| {
                let mut named = q.named_mut();
                let t = &mut named.iter_mut().find(|(n, _)| n == name).unwrap().1;
                t.data[i] = v;
            };
            let x = p.named().into_iter().find(|(n, _)| n == name).unwrap().1.data[i];
            at(&mut q, x + eps);
            let up = loss(&m, &q, &b, &g);
            at(&mut q, x - eps);
            let down = loss(&m, &q, &b, &g);
            let fd = (up - down) / (2.0 * eps as f64);
            diff += (fd - an.1.data[i] as f64).powi(2);
            norm += fd * fd;
        }
        let rel = (diff / norm.max(1e-12)).sqrt();
        assert!(rel < 2e-2, "{name}: analytic and numerical gradients differ by {rel:.2e} (relative)");
    }
}

#[test]
fn qk_norm_gradient() {
    check(DecoderConfig { qk_norm: true, ..tiny_llama() }, &["q_norm", "k_norm", "w_qkv"]);
}

#[test]
fn layers_without_rope_gradient() {
    let cfg = DecoderConfig { layers_without_rope: vec![1], ..tiny_llama() };
    check(cfg, &["layers.1.w_qkv", "layers.0.w_qkv"]);
}

#[test]
fn shared_norm_and_head_bias_gradient() {
    let cfg = DecoderConfig {
        shared_norm: true,
        head_bias: true,
        qkv_bias: false,
        attn_out_bias: false,
        tied_embeddings: false,
        ..tiny_gptj()
    };
    check(cfg, &["norm1", "b_head", "norm_f"]);
}

#[test]
fn unit_offset_norm_gradient() {
    let cfg = DecoderConfig { norm: NormKind::RmsNormUnitOffset { eps: 1e-6 }, qk_norm: true, ..tiny_llama() };
    check(cfg, &["norm1", "norm2", "norm_f", "q_norm", "k_norm"]);
}

#[test]
fn geglu_gradient() {
    check(DecoderConfig { mlp: MlpKind::GeGluTanh, ..tiny_llama() }, &["w_in", "w_out"]);
}

#[test]
fn post_norms_gradient() {
    check(DecoderConfig { post_norms: true, ..tiny_llama() }, &["post_attn_norm", "post_mlp_norm", "w_o", "w_out"]);
}

#[test]
fn scaled_embeddings_gradient() {
    check(DecoderConfig { scaled_embeddings: true, tied_embeddings: true, ..tiny_llama() }, &["wte"]);
}

#[test]
fn gemma3_gradient() {
    check(tiny_gemma3(), &["norm", "wte", "layers.2.w_qkv", "layers.0.w_qkv"]);
}

/// Full logps of the batch under `cfg`, on the same weights for every config of these shapes.
fn logps(cfg: DecoderConfig) -> Vec<f32> {
    let p = params(&cfg);
    Decoder::new(cfg.clone()).logprobs(&p, &batch(&cfg), &mut Activations::default(), false).unwrap().logp
}

#[test]
fn global_layers_attend_fully_with_their_own_base() {
    // Every layer global with the ordinary base is the model without a window, bit for bit.
    let all_global = GlobalLayers { layers: vec![0, 1, 2], rope: RopeConfig::half(10000.0, 4) };
    let windowed = DecoderConfig { global_layers: Some(all_global), ..tiny_gemma3() };
    let unwindowed = DecoderConfig { sliding_window: None, global_layers: None, ..tiny_gemma3() };
    assert_eq!(logps(windowed), logps(unwindowed));
    // The window of the local layers and the global base each change the result (sequences of 9 > 3).
    let gemma = logps(tiny_gemma3());
    let no_window = logps(DecoderConfig { sliding_window: None, ..tiny_gemma3() });
    let same_base = GlobalLayers { layers: vec![2], rope: RopeConfig::half(10000.0, 4) };
    let one_base = logps(DecoderConfig { global_layers: Some(same_base), ..tiny_gemma3() });
    assert_ne!(gemma, no_window);
    assert_ne!(gemma, one_base);
}
