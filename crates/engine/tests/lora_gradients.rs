//! The adapter's gradients against central finite differences of the whole model (`L = sum_t g_t logp_t`
//! for fixed random `g`), with the base frozen: every element of every pair's A and B, in llama-like
//! (GQA, gated MLP, pairs on part of a fused weight's rows), GPT-2-like (LayerNorm, biases, `c_attn` on all
//! q/k/v rows), GPT-NeoX-like (parallel residual) and Gemma-3-like (q/k norms, norms after each branch)
//! models, without and with dropout.

mod lora_common;

use dpo_engine::rng::Rng;
use dpo_engine::{Activations, Adapter, Batch, Decoder, EngineError, Grads, Model, ParamSet, Params};
use lora_common::{adapter, base, batch, families};

fn loss(m: &Decoder, model: Model, b: &Batch, g: &[f32], keep: bool) -> f64 {
    let out = m.logprobs(model, b, &mut Activations::default(), keep).unwrap();
    out.logp.iter().zip(g).map(|(l, g)| *l as f64 * *g as f64).sum()
}

/// The base with `a` on it, dropping out with `seed` in training passes.
fn view<'a>(p: &'a Params, a: &'a Adapter, seed: Option<u64>) -> Model<'a> {
    let v = Model::new(p, Some(a));
    seed.map_or(v, |s| v.with_dropout_seed(s))
}

/// Checks every element of every adapter tensor. With `seed`, the passes are training passes with the
/// adapter's dropout drawn from it (the same masks in every pass, so the loss is a smooth function).
fn check(name: &str, m: &Decoder, p: &Params, a: &Adapter, seed: Option<u64>) {
    let b = batch(&m.cfg);
    let mut r = Rng::new(5);
    let g: Vec<f32> = (0..b.targets.len()).map(|_| r.uniform() as f32 * 2.0 - 1.0).collect();
    let mut acts = Activations::default();
    m.logprobs(view(p, a, seed), &b, &mut acts, true).unwrap();
    let mut grads = a.zeros_like();
    m.backward_logprobs(view(p, a, seed), &b, &mut acts, &g, &mut grads).unwrap();

    // Small steps: attention in these random models is sharp enough that 1e-2 measures curvature.
    let eps = 3e-3f32;
    let keep = seed.is_some();
    for (tensor, an) in grads.named() {
        let (mut diff, mut norm) = (0.0f64, 0.0f64);
        for i in 0..an.data.len() {
            let mut q = a.clone();
            let at = |q: &mut Adapter, v: f32| {
                let mut named = q.named_mut();
                named.iter_mut().find(|(n, _)| *n == tensor).unwrap().1.data[i] = v;
            };
            let x = a.named().into_iter().find(|(n, _)| *n == tensor).unwrap().1.data[i];
            at(&mut q, x + eps);
            let up = loss(m, view(p, &q, seed), &b, &g, keep);
            at(&mut q, x - eps);
            let down = loss(m, view(p, &q, seed), &b, &g, keep);
            let fd = (up - down) / (2.0 * eps as f64);
            diff += (fd - an.data[i] as f64).powi(2);
            norm += fd * fd;
        }
        assert!(norm > 1e-8, "{name} {tensor}: the numerical gradient is zero, the check is vacuous");
        let rel = (diff / norm).sqrt();
        assert!(rel < 1e-2, "{name} {tensor}: analytic and numerical gradients differ by {rel:.2e} (relative)");
    }
}

#[test]
fn adapter_gradients_match_finite_differences() {
    for (name, cfg, modules) in families() {
        let m = Decoder::new(cfg.clone());
        check(name, &m, &base(&cfg), &adapter(&cfg, &modules, 0.0, 21), None);
    }
}

/// With the lowest layers unadapted, backward stops at the lowest adapted layer and skips its input
/// gradient: the adapter's gradients must not notice (sequential and parallel residual).
#[test]
fn adapter_gradients_on_upper_layers_only_match_finite_differences() {
    for (name, cfg, mut modules) in families() {
        modules[0].clear();
        let m = Decoder::new(cfg.clone());
        check(name, &m, &base(&cfg), &adapter(&cfg, &modules, 0.0, 23), None);
    }
}

#[test]
fn adapter_gradients_with_dropout_match_finite_differences() {
    for (name, cfg, modules) in families() {
        let m = Decoder::new(cfg.clone());
        check(name, &m, &base(&cfg), &adapter(&cfg, &modules, 0.3, 22), Some(99));
    }
}

#[test]
fn dropout_applies_to_training_passes_only() {
    let (name, cfg, modules) = families().remove(0);
    let (m, p, b) = (Decoder::new(cfg.clone()), base(&cfg), batch(&cfg));
    let a = adapter(&cfg, &modules, 0.3, 23);
    let logp = |model: Model, keep: bool| m.logprobs(model, &b, &mut Activations::default(), keep).unwrap().logp;
    let plain = logp(Model::new(&p, Some(&a)), false);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    // Scoring (no keep) ignores the seed; a training pass without a seed does not drop either.
    assert_eq!(bits(&logp(Model::new(&p, Some(&a)).with_dropout_seed(1), false)), bits(&plain), "{name}");
    assert_eq!(bits(&logp(Model::new(&p, Some(&a)), true)), bits(&plain), "{name}");
    // A training pass with a seed drops: reproducibly for one seed, differently for another.
    let s1 = logp(Model::new(&p, Some(&a)).with_dropout_seed(1), true);
    assert_ne!(bits(&s1), bits(&plain), "{name}: dropout changed nothing");
    assert_eq!(bits(&s1), bits(&logp(Model::new(&p, Some(&a)).with_dropout_seed(1), true)), "{name}");
    assert_ne!(bits(&s1), bits(&logp(Model::new(&p, Some(&a)).with_dropout_seed(2), true)), "{name}");
}

#[test]
fn frozen_base_is_untouched_and_full_gradients_are_refused_with_an_adapter() {
    for (name, cfg, modules) in families() {
        let (m, p, b) = (Decoder::new(cfg.clone()), base(&cfg), batch(&cfg));
        let a = adapter(&cfg, &modules, 0.0, 24);
        let before = (p.clone(), a.clone());
        let g = vec![0.5f32; b.targets.len()];
        let mut acts = Activations::default();
        let model = Model::new(&p, Some(&a));
        m.logprobs(model, &b, &mut acts, true).unwrap();
        let mut grads = a.zeros_like();
        m.backward_logprobs(model, &b, &mut acts, &g, Grads::Adapter(&mut grads)).unwrap();
        assert!(grads.named().iter().all(|(_, t)| t.data.iter().all(|v| v.is_finite())), "{name}");
        assert!(grads.named().iter().any(|(_, t)| t.data.iter().any(|&v| v != 0.0)), "{name}: no gradient");
        assert!(before == (p.clone(), a.clone()), "{name}: a weight moved");

        let mut full = Params::zeros(&cfg);
        let err = m.backward_logprobs(model, &b, &mut acts, &g, &mut full).unwrap_err();
        assert_eq!(err, EngineError::FullGradsWithAdapter, "{name}");
        assert!(full.named().iter().all(|(_, t)| t.data.iter().all(|&v| v == 0.0)), "{name}");
        // Adapter gradients of a pass without the adapter, or into a buffer of another layout.
        m.logprobs(&p, &b, &mut acts, true).unwrap();
        let err = m.backward_logprobs(&p, &b, &mut acts, &g, &mut a.zeros_like()).unwrap_err();
        assert!(matches!(err, EngineError::AdapterMismatch(_)), "{name}: {err:?}");
        let mut other = a.zeros_like();
        other.layers[0].pairs.pop();
        m.logprobs(model, &b, &mut acts, true).unwrap();
        let err = m.backward_logprobs(model, &b, &mut acts, &g, &mut other).unwrap_err();
        assert!(matches!(err, EngineError::AdapterMismatch(_)), "{name}: {err:?}");
        // The activations of a base-only forward cannot feed a backward through the adapter.
        m.logprobs(&p, &b, &mut acts, true).unwrap();
        let err = m.backward_logprobs(model, &b, &mut acts, &g, &mut a.zeros_like()).unwrap_err();
        assert!(matches!(err, EngineError::MalformedBatch(_)), "{name}: {err:?}");
    }
}

#[test]
fn an_adapter_that_does_not_fit_is_refused() {
    let (_, cfg, modules) = families().remove(0);
    let (m, p, b) = (Decoder::new(cfg.clone()), base(&cfg), batch(&cfg));
    let a = adapter(&cfg, &modules, 0.0, 25);
    let run = |a: &Adapter| m.logprobs(Model::new(&p, Some(a)), &b, &mut Activations::default(), false);
    let mut short = a.clone();
    short.layers.pop();
    let mut wide = a.clone();
    wide.layers[1].pairs[0].target.rows.end = cfg.qkv_dim() + 1;
    let mut rank = a.clone();
    rank.layers[0].pairs[0].target.r = 5;
    let mut dropout = a.clone();
    dropout.dropout = 1.0;
    for (what, bad) in [("layers", short), ("rows", wide), ("rank", rank), ("dropout", dropout)] {
        assert!(matches!(run(&bad), Err(EngineError::AdapterMismatch(_))), "{what}");
    }
    assert!(run(&a).is_ok());
}
