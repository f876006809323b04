//! What backward recomputes instead of keeping gives the gradients of keeping it, bit for bit: gradient
//! checkpointing (`Keep::LayerInputs`: each block from its kept input) against `Keep::All`, and an f32
//! `Keep::All` pass (each layer's attention half from its input and q, k, v) against one that keeps
//! every layer's attention outputs (`Activations::keeping_attention`).

use dpo_engine::kernels::Precision;
use dpo_engine::model::Model;
use dpo_engine::presets::{tiny_gemma3, tiny_gpt2, tiny_gptj, tiny_llama, tiny_neox};
use dpo_engine::rng::Rng;
use dpo_engine::{
    Activations, Adapter, Batch, Decoder, DecoderConfig, Keep, LoraTarget, ParamSet, Params, PendingEmbeddingGrads,
    Site,
};

mod random_model;
use random_model::{batch, params};

/// Per-target log-probs and every parameter's gradient of `L = sum_t g_t logp_t`, through a forward that
/// keeps `keep` and its backward, on reused activation buffers `acts`.
fn logps_and_grads(
    m: &Decoder,
    p: &Params,
    b: &Batch,
    g: &[f32],
    keep: Keep,
    acts: &mut Activations,
) -> (Vec<f32>, Params) {
    let out = m.logprobs(p, b, acts, keep).unwrap();
    let mut grads = Params::zeros(&m.cfg);
    m.backward_logprobs(p, b, acts, g, &mut grads).unwrap();
    (out.logp, grads)
}

/// An adapter on every site of every layer (on Qkv, the rows of q alone), A and B random, with dropout.
fn adapter(cfg: &DecoderConfig) -> Adapter {
    let targets: Vec<Vec<LoraTarget>> = (0..cfg.n_layers)
        .map(|_| {
            Site::ALL
                .iter()
                .map(|&site| {
                    let out = if site == Site::Qkv { cfg.n_heads * cfg.head_dim } else { site.dims(cfg).1 };
                    LoraTarget { module: format!("{site:?}"), site, rows: 0..out, r: 3, scale: 2.0 }
                })
                .collect()
        })
        .collect();
    let mut a = Adapter::zeros(cfg, &targets, 0.25);
    let mut r = Rng::new(13);
    for (_, t) in a.named_mut() {
        t.data.iter_mut().for_each(|x| *x = 0.2 * r.normal() as f32);
    }
    a
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn assert_same_bits(cfg: &DecoderConfig, want: &Params, got: &Params) {
    for ((name, a), (_, c)) in want.named().iter().zip(got.named()) {
        assert!(a.data.iter().any(|&x| x != 0.0), "{cfg:?}: gradient {name} is all zero");
        assert_eq!(bits(&a.data), bits(&c.data), "{cfg:?}: gradient {name} differs with checkpointing");
    }
}

#[test]
fn checkpointed_gradients_equal_kept_gradients_bit_for_bit() {
    for cfg in [tiny_gpt2(), tiny_llama(), tiny_gemma3(), tiny_neox(), tiny_gptj()] {
        let (m, p, b) = (Decoder::new(cfg.clone()), params(&cfg), batch(&cfg));
        let mut r = Rng::new(5);
        let g: Vec<f32> = (0..b.targets.len()).map(|_| r.uniform() as f32 * 2.0 - 1.0).collect();

        let (logp_all, grads_all) = logps_and_grads(&m, &p, &b, &g, Keep::All, &mut Activations::default());
        let mut acts = Activations::default();
        let (logp_gc, grads_gc) = logps_and_grads(&m, &p, &b, &g, Keep::LayerInputs, &mut acts);
        assert_eq!(bits(&logp_all), bits(&logp_gc), "{cfg:?}: log-probs differ with checkpointing");
        assert_same_bits(&cfg, &grads_all, &grads_gc);

        // The same buffers again, after a pass of another mode: a reused slot recomputes nothing stale.
        m.logprobs(&p, &b, &mut acts, Keep::None).unwrap();
        let (logp_again, grads_again) = logps_and_grads(&m, &p, &b, &g, Keep::LayerInputs, &mut acts);
        assert_eq!(bits(&logp_all), bits(&logp_again), "{cfg:?}");
        assert_same_bits(&cfg, &grads_all, &grads_again);
        // A second backward on the same forward is refused: backward hands the activations back.
        let mut twice = Params::zeros(&cfg);
        let err = m.backward_logprobs(&p, &b, &mut acts, &g, &mut twice).unwrap_err();
        assert!(err.to_string().contains("each such forward serves one backward"), "{err}");
    }
}

#[test]
fn checkpointed_deferred_embedding_gradients_match() {
    let cfg = tiny_gemma3();
    let (m, p, b) = (Decoder::new(cfg.clone()), params(&cfg), batch(&cfg));
    let g: Vec<f32> = (0..b.targets.len()).map(|i| (i as f32 * 0.37).sin()).collect();
    let run = |keep: Keep| {
        let mut acts = Activations::default();
        let mut pending = PendingEmbeddingGrads::default();
        m.logprobs(&p, &b, &mut acts, keep).unwrap();
        let mut grads = Params::zeros(&cfg);
        m.backward_logprobs_deferred(&p, &b, &mut acts, &g, &mut grads, &mut pending).unwrap();
        pending.apply(&mut grads);
        grads
    };
    assert_same_bits(&cfg, &run(Keep::All), &run(Keep::LayerInputs));
}

#[test]
fn backward_after_a_forward_that_kept_nothing_is_refused() {
    let cfg = tiny_llama();
    let (m, p, b) = (Decoder::new(cfg.clone()), params(&cfg), batch(&cfg));
    let mut acts = Activations::default();
    let out = m.logprobs(&p, &b, &mut acts, Keep::None).unwrap();
    let mut grads = Params::zeros(&cfg);
    assert!(m.backward_logprobs(&p, &b, &mut acts, &vec![1.0; out.logp.len()], &mut grads).is_err());
}

/// Through an adapter on a frozen base, with dropout: the recomputed blocks run the adapter too and draw
/// the same dropout masks, so the adapter's gradients match bit for bit.
#[test]
fn checkpointed_adapter_gradients_equal_kept_ones_bit_for_bit() {
    for cfg in [tiny_gpt2(), tiny_llama(), tiny_gemma3()] {
        let (m, p, b) = (Decoder::new(cfg.clone()), params(&cfg), batch(&cfg));
        let lora = adapter(&cfg);
        let g: Vec<f32> = (0..b.targets.len()).map(|i| (i as f32 * 0.61).cos()).collect();
        let run = |keep: Keep| {
            let model = Model::new(&p, Some(&lora));
            let mut acts = Activations::default();
            let out = m.logprobs(model.with_dropout_seed(99), &b, &mut acts, keep).unwrap();
            let mut grads = lora.zeros_like();
            // Backward is not given the seed: the forward recorded it.
            m.backward_logprobs(model, &b, &mut acts, &g, &mut grads).unwrap();
            (out.logp, grads)
        };
        let ((logp_all, all), (logp_gc, gc)) = (run(Keep::All), run(Keep::LayerInputs));
        assert_eq!(bits(&logp_all), bits(&logp_gc), "{cfg:?}: log-probs differ with checkpointing");
        for ((name, a), (_, c)) in all.named().iter().zip(gc.named()) {
            assert!(a.data.iter().any(|&x| x != 0.0), "{cfg:?}: adapter gradient {name} is all zero");
            assert_eq!(bits(&a.data), bits(&c.data), "{cfg:?}: adapter gradient {name} differs with checkpointing");
        }
        // Dropout was on: a pass without it gives other log-probs (else the masks were never tested).
        let plain = m.logprobs(Model::new(&p, Some(&lora)), &b, &mut Activations::default(), Keep::All).unwrap();
        assert_ne!(bits(&plain.logp), bits(&logp_all), "{cfg:?}: dropout had no effect");
    }
}

/// An f32 pass recomputes each layer's attention half (attention, its projection, the residual after it)
/// before the layer's backward: the log-probs and every gradient, of a full model and of an adapter with
/// dropout, are those of a pass that kept them. Also on the f32-keeping buffers of a bf16 pass.
#[test]
fn recomputed_attention_outputs_give_the_kept_gradients_bit_for_bit() {
    for cfg in [tiny_gpt2(), tiny_llama(), tiny_gemma3(), tiny_neox(), tiny_gptj()] {
        let (m, p, b) = (Decoder::new(cfg.clone()), params(&cfg), batch(&cfg));
        let lora = adapter(&cfg);
        let g: Vec<f32> = (0..b.targets.len()).map(|i| (i as f32 * 0.43).sin()).collect();
        for precision in Precision::ALL {
            let fresh = |keep_attention: bool| {
                let acts = Activations::default();
                let acts = if precision == Precision::Bf16 { acts.keeping_f32() } else { acts };
                if keep_attention {
                    acts.keeping_attention()
                } else {
                    acts
                }
            };
            let full = |keep_attention: bool| {
                let model = Model::new(&p, None).with_precision(precision);
                let mut acts = fresh(keep_attention);
                let out = m.logprobs(model, &b, &mut acts, Keep::All).unwrap();
                let mut grads = Params::zeros(&cfg);
                m.backward_logprobs(model, &b, &mut acts, &g, &mut grads).unwrap();
                (out.logp, grads)
            };
            let ((logp_kept, kept), (logp, recomputed)) = (full(true), full(false));
            assert_eq!(bits(&logp_kept), bits(&logp), "{cfg:?} {precision}");
            assert_same_bits(&cfg, &kept, &recomputed);

            let adapted = |keep_attention: bool| {
                let model = Model::new(&p, Some(&lora)).with_precision(precision);
                let mut acts = fresh(keep_attention);
                let out = m.logprobs(model.with_dropout_seed(7), &b, &mut acts, Keep::All).unwrap();
                let mut grads = lora.zeros_like();
                m.backward_logprobs(model, &b, &mut acts, &g, &mut grads).unwrap();
                (out.logp, grads)
            };
            let ((logp_kept, kept), (logp, recomputed)) = (adapted(true), adapted(false));
            assert_eq!(bits(&logp_kept), bits(&logp), "{cfg:?} {precision}: adapter");
            for ((name, a), (_, c)) in kept.named().iter().zip(recomputed.named()) {
                assert!(a.data.iter().any(|&x| x != 0.0), "{cfg:?}: adapter gradient {name} is all zero");
                assert_eq!(bits(&a.data), bits(&c.data), "{cfg:?} {precision}: adapter gradient {name} differs");
            }
        }
    }
}
