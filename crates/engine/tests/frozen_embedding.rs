//! An adapter trained on a base whose token embedding and LM head are a `FrozenEmbedding` (the head in
//! bf16, the data's lookup rows in f32) against the same base with its f32 tables, in a bf16 pass: the
//! head's products round the f32 weight to bf16 anyway and the lookups read the same f32 rows, so the
//! log-probs and the adapter's gradients are those of the f32 tables. Only f32 summation-order
//! differences between the stored and the f32 product paths are allowed (none where both run the same
//! AVX-512 kernel): log-probs within 1e-5 of max(|x|, 1), gradients within 1e-5 of each tensor's
//! largest entry. Tied and untied heads, with and without gradient checkpointing; full gradients and
//! generation through it are refused.

mod lora_common;

use std::collections::BTreeSet;

use dpo_engine::generate::{generate, SamplingConfig};
use dpo_engine::kernels::Precision;
use dpo_engine::presets::init_random;
use dpo_engine::quant::{FrozenEmbedding, FrozenLinears};
use dpo_engine::rng::Rng;
use dpo_engine::{Activations, Adapter, Batch, Decoder, EngineError, Keep, Model, ParamSet, Params};
use lora_common::{adapter, base, batch, families};

/// Log-probs and adapter gradients of one training pass (`L = sum_t g_t logp_t`).
fn pass(m: &Decoder, model: Model, b: &Batch, g: &[f32], keep: Keep) -> (Vec<f32>, Adapter) {
    let mut acts = Activations::default();
    let out = m.logprobs(model, b, &mut acts, keep).unwrap();
    let mut grads = model.adapter.unwrap().zeros_like();
    m.backward_logprobs(model, b, &mut acts, g, &mut grads).unwrap();
    (out.logp, grads)
}

/// `base` with its embedding and head moved into a [`FrozenEmbedding`] keeping the rows of `b`'s tokens.
fn frozen(base: &Params, b: &Batch) -> (Params, FrozenEmbedding) {
    let mut p = base.clone();
    let c = (p.wte.shape[0], p.wte.shape[1]);
    let head = p.lm_head.as_mut().map(|t| std::mem::take(&mut t.data));
    let tokens: BTreeSet<u32> = b.tokens.iter().copied().collect();
    let e = FrozenEmbedding::new(std::mem::take(&mut p.wte.data), head, c.0, c.1, &tokens).unwrap();
    (p, e)
}

fn assert_close(what: &str, got: &[f32], want: &[f32], scale: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-5 * scale, "{what}[{i}]: {g} against {w} (scale {scale})");
    }
}

#[test]
fn an_adapter_on_a_frozen_embedding_trains_as_on_the_f32_tables() {
    for (name, mut cfg, modules) in families() {
        for tied in [true, false] {
            cfg.tied_embeddings = tied;
            let m = Decoder::new(cfg.clone());
            let (p, a, b) = (base(&cfg), adapter(&cfg, &modules, 0.0, 31), batch(&cfg));
            assert_eq!(p.lm_head.is_none(), tied, "{name}: the untied model has a head of its own");
            let mut r = Rng::new(8);
            let g: Vec<f32> = (0..b.targets.len()).map(|_| r.uniform() as f32 * 2.0 - 1.0).collect();
            let (fp, e) = frozen(&p, &b);
            for keep in [Keep::All, Keep::LayerInputs] {
                let what = format!("{name} tied {tied} {keep:?}");
                let plain = Model::new(&p, Some(&a)).with_precision(Precision::Bf16);
                let stored = Model::new(&fp, Some(&a)).with_embedding(&e).with_precision(Precision::Bf16);
                let (lp_want, g_want) = pass(&m, plain, &b, &g, keep);
                let (lp, grads) = pass(&m, stored, &b, &g, keep);
                let scale = lp_want.iter().fold(1.0f32, |s, v| s.max(v.abs()));
                assert_close(&format!("{what} logp"), &lp, &lp_want, scale);
                for ((tensor, got), (_, want)) in grads.named().into_iter().zip(g_want.named()) {
                    let scale = want.data.iter().fold(0.0f32, |s, v| s.max(v.abs()));
                    assert!(scale > 0.0, "{what} {tensor}: a zero gradient makes the check vacuous");
                    assert_close(&format!("{what} {tensor}"), &got.data, &want.data, scale);
                }
            }
        }
    }
}

#[test]
fn a_frozen_embedding_has_no_full_gradients_and_does_not_generate() {
    let (_, cfg, _) = families().remove(0);
    let m = Decoder::new(cfg.clone());
    let b = batch(&cfg);
    let (fp, e) = frozen(&base(&cfg), &b);
    let model = Model::new(&fp, None).with_embedding(&e);
    let mut acts = Activations::default();
    m.logprobs(model, &b, &mut acts, true).unwrap();
    let mut full = Params::zeros(&cfg);
    let dlogp = vec![1.0; b.targets.len()];
    let err = m.backward_logprobs(model, &b, &mut acts, &dlogp, &mut full).unwrap_err();
    assert!(matches!(err, EngineError::FullGradsOfFrozenBase), "{err}");
    let prompts = vec![b.tokens[..3].to_vec()];
    let err = generate(&m, model, &prompts, 1, &SamplingConfig::default(), &mut Rng::new(1)).unwrap_err();
    assert!(err.to_string().contains("generation through a frozen embedding"), "{err}");
}

/// A random base's tables made as they are drawn (`FrozenLinears::init_random_with_tables`, what `dpo
/// bench` holds) are those made from the whole f32 tables, tied or not.
#[test]
fn tables_made_as_drawn_are_those_of_the_whole_tables() {
    for (name, mut cfg, _) in families() {
        for tied in [true, false] {
            cfg.tied_embeddings = tied;
            let tokens = BTreeSet::from([0, 3, 7, 1_000_000]);
            let s = dpo_engine::quant::Storage::Bf16;
            let drawn = FrozenLinears::init_random_with_tables(&cfg, 0.02, 3, s, Some(&tokens)).unwrap();
            let (p, linears, e) = (drawn.0, drawn.1, drawn.2.unwrap());
            assert!(p.wte.data.is_empty() && p.lm_head.as_ref().is_none_or(|h| h.data.is_empty()), "{name}");
            let whole = init_random(&cfg, 0.02, 3);
            let want = FrozenEmbedding::new(
                whole.wte.data.clone(),
                whole.lm_head.as_ref().map(|h| h.data.clone()),
                cfg.vocab_size,
                cfg.hidden,
                &tokens,
            )
            .unwrap();
            assert!(e.head().to_f32() == want.head().to_f32() && e.kept() == 3, "{name} tied {tied}");
            assert!(tokens.iter().all(|&t| e.row(t) == want.row(t)), "{name} tied {tied}");
            let (_, plain) = FrozenLinears::init_random(&cfg, 0.02, 3, s).unwrap();
            assert!(
                linears.layers()[0].get(dpo_engine::Site::MlpIn).to_f32()
                    == plain.layers()[0].get(dpo_engine::Site::MlpIn).to_f32()
            );
        }
    }
}
