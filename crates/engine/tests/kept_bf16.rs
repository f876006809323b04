//! A bf16 pass keeps its blocks' products (qkv, attention output, MLP pre-activation, the post-norm
//! inputs) in bf16 for backward, as autocast does. The forward computes from the f32 values, so the
//! log-probs are those of a pass that keeps f32, bit for bit; the backward reads the rounded values, so
//! the gradients move by about what autocast's bf16 activations cost, well inside the distance of the
//! bf16 pass itself from f32. Gradient checkpointing recomputes the same rounded values: its gradients
//! equal the kept pass's bit for bit.

use dpo_engine::kernels::Precision;
use dpo_engine::presets::{tiny_gemma3, tiny_gpt2, tiny_gptj, tiny_llama, tiny_neox};
use dpo_engine::rng::Rng;
use dpo_engine::{
    Activations, Adapter, Batch, Decoder, DecoderConfig, Keep, LoraTarget, Model, ParamSet, Params, Site,
};

mod random_model;
use random_model::{batch, params};

/// Every model of the family's switches, and one deep enough that keeping bf16 saves memory.
fn configs() -> Vec<DecoderConfig> {
    vec![
        tiny_gpt2(),
        tiny_llama(),
        tiny_gemma3(),
        tiny_neox(),
        tiny_gptj(),
        DecoderConfig { n_layers: 5, ..tiny_llama() },
    ]
}

fn dlogp(b: &Batch) -> Vec<f32> {
    let mut r = Rng::new(5);
    (0..b.targets.len()).map(|_| r.uniform() as f32 * 2.0 - 1.0).collect()
}

/// Per-target log-probs and every parameter's gradient of `L = sum_t g_t logp_t`, through a forward in
/// `precision` that keeps `keep` (in `acts`) and its backward.
fn logps_and_grads(
    m: &Decoder,
    p: &Params,
    precision: Precision,
    keep: Keep,
    acts: &mut Activations,
) -> (Vec<f32>, Params) {
    let b = batch(&m.cfg);
    let model = Model::new(p, None).with_precision(precision);
    let out = m.logprobs(model, &b, acts, keep).unwrap();
    let mut grads = Params::zeros(&m.cfg);
    m.backward_logprobs(model, &b, acts, &dlogp(&b), &mut grads).unwrap();
    (out.logp, grads)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// `|got - want| / |want|` (Euclidean norms) of one tensor.
fn relative_error(got: &[f32], want: &[f32]) -> f64 {
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        diff += (g as f64 - w as f64).powi(2);
        norm += (w as f64).powi(2);
    }
    (diff / norm).sqrt()
}

/// The largest [`relative_error`] over the tensors of `got` against `want`, with its tensor's name.
fn worst(got: &Params, want: &Params) -> (f64, String) {
    let mut worst = (0.0, String::new());
    for ((name, g), (_, w)) in got.named().iter().zip(want.named()) {
        assert!(w.data.iter().any(|&x| x != 0.0), "gradient {name} is all zero");
        let e = relative_error(&g.data, &w.data);
        if e > worst.0 {
            worst = (e, name.clone());
        }
    }
    worst
}

#[test]
fn keeping_bf16_changes_no_log_prob() {
    for cfg in configs() {
        let (m, p) = (Decoder::new(cfg.clone()), params(&cfg));
        let b = batch(&cfg);
        let model = Model::new(&p, None).with_precision(Precision::Bf16);
        let scored = m.logprobs(model, &b, &mut Activations::default(), Keep::None).unwrap();
        let kept_f32 = m.logprobs(model, &b, &mut Activations::default().keeping_f32(), Keep::All).unwrap();
        for keep in [Keep::All, Keep::LayerInputs] {
            let kept = m.logprobs(model, &b, &mut Activations::default(), keep).unwrap();
            assert_eq!(bits(&kept.logp), bits(&scored.logp), "{cfg:?} {keep:?}");
            assert_eq!(bits(&kept.logp), bits(&kept_f32.logp), "{cfg:?} {keep:?}");
        }
    }
}

#[test]
fn bf16_kept_gradients_stay_close_to_f32_kept_ones() {
    for cfg in configs() {
        let (m, p) = (Decoder::new(cfg.clone()), params(&cfg));
        let (_, f32_pass) = logps_and_grads(&m, &p, Precision::F32, Keep::All, &mut Activations::default());
        let mut f32_kept = Activations::default().keeping_f32();
        let (_, bf16_pass) = logps_and_grads(&m, &p, Precision::Bf16, Keep::All, &mut f32_kept);
        let (_, bf16_kept) = logps_and_grads(&m, &p, Precision::Bf16, Keep::All, &mut Activations::default());
        // Measured on these models (worst tensor): keeping bf16 0.9-2.3e-2 (most of it from qkv: the
        // recomputed attention probabilities meet the log-sum-exp of the unrounded scores), the bf16
        // pass itself 1.4e-2 to 2.0e-1 from f32, at least 1.3 times the former in every model.
        let (storage, storage_at) = worst(&bf16_kept, &bf16_pass);
        let (pass, pass_at) = worst(&bf16_pass, &f32_pass);
        let report = format!("{cfg:?}: keeping bf16 {storage:.2e} ({storage_at}), bf16 pass {pass:.2e} ({pass_at})");
        assert!(storage > 0.0, "{report}: keeping bf16 changed no gradient (were the products rounded?)");
        assert!(storage <= 3e-2 && storage <= pass, "{report}");
    }
}

#[test]
fn checkpointed_bf16_gradients_equal_kept_ones_bit_for_bit() {
    for cfg in configs() {
        let (m, p) = (Decoder::new(cfg.clone()), params(&cfg));
        let bf16 = Precision::Bf16;
        let (logp_all, all) = logps_and_grads(&m, &p, bf16, Keep::All, &mut Activations::default());
        // One set of buffers through a checkpointed bf16 pass, after an f32 one and a bf16 one that kept
        // every layer: nothing stale of either is read.
        let mut acts = Activations::default();
        logps_and_grads(&m, &p, Precision::F32, Keep::LayerInputs, &mut acts);
        logps_and_grads(&m, &p, bf16, Keep::All, &mut acts);
        let (logp_gc, gc) = logps_and_grads(&m, &p, bf16, Keep::LayerInputs, &mut acts);
        assert_eq!(bits(&logp_all), bits(&logp_gc), "{cfg:?}: log-probs differ with checkpointing");
        for ((name, a), (_, c)) in all.named().iter().zip(gc.named()) {
            assert!(a.data.iter().any(|&x| x != 0.0), "{cfg:?}: gradient {name} is all zero");
            assert_eq!(bits(&a.data), bits(&c.data), "{cfg:?}: gradient {name} differs with checkpointing");
        }
        // And a bf16 pass keeping every layer after the checkpointed one.
        let (_, again) = logps_and_grads(&m, &p, bf16, Keep::All, &mut acts);
        for ((name, a), (_, c)) in all.named().iter().zip(again.named()) {
            assert_eq!(bits(&a.data), bits(&c.data), "{cfg:?}: gradient {name} differs on reused buffers");
        }
    }
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

/// Through an adapter on a frozen base, with dropout, in bf16: checkpointing gives the adapter's
/// gradients bit for bit, and keeping bf16 moves them no more than the products' rounding does.
#[test]
fn bf16_adapter_gradients_checkpointed_and_kept_in_bf16() {
    for cfg in [tiny_gpt2(), tiny_llama(), tiny_gemma3()] {
        let (m, p, b) = (Decoder::new(cfg.clone()), params(&cfg), batch(&cfg));
        let lora = adapter(&cfg);
        let g = dlogp(&b);
        let run = |keep: Keep, acts: &mut Activations| {
            let model = Model::new(&p, Some(&lora)).with_precision(Precision::Bf16);
            let out = m.logprobs(model.with_dropout_seed(99), &b, acts, keep).unwrap();
            let mut grads = lora.zeros_like();
            m.backward_logprobs(model, &b, acts, &g, &mut grads).unwrap();
            (out.logp, grads)
        };
        let (logp_all, all) = run(Keep::All, &mut Activations::default());
        let (logp_gc, gc) = run(Keep::LayerInputs, &mut Activations::default());
        let (logp_f32, f32_kept) = run(Keep::All, &mut Activations::default().keeping_f32());
        assert_eq!(bits(&logp_all), bits(&logp_gc), "{cfg:?}");
        assert_eq!(bits(&logp_all), bits(&logp_f32), "{cfg:?}");
        for (((name, a), (_, c)), (_, f)) in all.named().iter().zip(gc.named()).zip(f32_kept.named()) {
            assert!(a.data.iter().any(|&x| x != 0.0), "{cfg:?}: adapter gradient {name} is all zero");
            assert_eq!(bits(&a.data), bits(&c.data), "{cfg:?}: adapter gradient {name} differs with checkpointing");
            // Measured: at most 1.5e-2 (the q rows' pairs, behind the rounded qkv).
            let e = relative_error(&a.data, &f.data);
            assert!(e <= 3e-2, "{cfg:?}: adapter gradient {name} moved by {e:.2e} from keeping bf16");
        }
    }
}
