//! A frozen base whose block linears are stored (NF4, NF4 with double quantisation, bf16) against the
//! same base widened back to f32: an adapter's log-probs, its training gradients and greedy generation
//! must agree. The stored base is exactly the widened one (every stored value widens to one f32), so
//! the only differences allowed are f32 summation-order ones in the products (none on AVX-512 CPUs,
//! where both run the same kernel): log-probs within 1e-5 relative (of max(|x|, 1)), adapter gradients
//! within 1e-5 of each tensor's largest entry.

use dpo_engine::generate::{generate, SamplingConfig};
use dpo_engine::model::Model;
use dpo_engine::presets::init_random;
use dpo_engine::quant::{FrozenLayer, FrozenLinears, Storage};
use dpo_engine::rng::Rng;
use dpo_engine::{
    Activations, Adapter, Batch, Decoder, DecoderConfig, Dims, EngineError, LoraTarget, ParamSet, Params, Site,
};

/// A Llama-style model (SwiGLU, GQA, RMSNorm) with widths that are whole NF4 blocks, and a GPT-2 one
/// (LayerNorm, biases, GELU) whose 48-wide rows split NF4 blocks across rows.
fn configs() -> Vec<DecoderConfig> {
    let llama = Dims {
        vocab_size: 97,
        hidden: 128,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 32,
        ffn_hidden: 192,
        max_positions: 128,
    };
    let gpt2 = Dims { hidden: 48, n_heads: 4, n_kv_heads: 4, head_dim: 12, ffn_hidden: 80, ..llama };
    vec![DecoderConfig::llama(llama), DecoderConfig::gpt2(gpt2)]
}

fn batch(cfg: &DecoderConfig) -> Batch {
    let mut r = Rng::new(3);
    let mut b = Batch::default();
    for len in [41, 29] {
        let ids: Vec<u32> = (0..len).map(|_| r.below(cfg.vocab_size) as u32).collect();
        b.push_sequence(&ids, 1);
    }
    b
}

/// A rank-4 adapter on all four sites of every layer, with random A and B (B non-zero, so the adapter
/// changes the forward pass too).
fn adapter(cfg: &DecoderConfig) -> Adapter {
    let targets: Vec<Vec<LoraTarget>> = (0..cfg.n_layers)
        .map(|_| {
            Site::ALL
                .iter()
                .map(|&site| LoraTarget {
                    module: format!("{site:?}"),
                    site,
                    rows: 0..site.dims(cfg).1,
                    r: 4,
                    scale: 2.0,
                })
                .collect()
        })
        .collect();
    let mut a = Adapter::zeros(cfg, &targets, 0.0);
    let mut r = Rng::new(9);
    for (_, t) in a.named_mut() {
        t.data.iter_mut().for_each(|v| *v = 0.1 * r.normal() as f32);
    }
    a
}

/// The base with its linears stored, and the same base widened back to f32.
fn stored_and_widened(cfg: &DecoderConfig, storage: Storage) -> (Params, FrozenLinears, Params) {
    let mut base = init_random(cfg, 0.2, 5);
    let frozen = FrozenLinears::take_from(&mut base, storage).unwrap();
    assert!(base.layers.iter().all(|l| l.w_qkv.data.is_empty() && l.w_out.data.is_empty()), "f32 copies freed");
    let mut widened = base.clone();
    frozen.restore_into(&mut widened);
    (base, frozen, widened)
}

fn storages() -> [Storage; 3] {
    [Storage::Nf4 { double_quant: false }, Storage::Nf4 { double_quant: true }, Storage::Bf16]
}

#[test]
fn logprobs_and_adapter_gradients_match_the_widened_base() {
    for cfg in configs() {
        let m = Decoder::new(cfg.clone());
        let b = batch(&cfg);
        let a = adapter(&cfg);
        let mut r = Rng::new(4);
        let dlogp: Vec<f32> = (0..b.targets.len()).map(|_| r.uniform() as f32 * 2.0 - 1.0).collect();
        for storage in storages() {
            let (base, frozen, widened) = stored_and_widened(&cfg, storage);
            let what = format!("{:?} {storage:?}", cfg.mlp);
            let run = |model: Model| {
                let mut acts = Activations::default();
                let out = m.logprobs(model, &b, &mut acts, true).unwrap();
                let mut g = a.zeros_like();
                m.backward_logprobs(model, &b, &mut acts, &dlogp, &mut g).unwrap();
                (out.logp, g)
            };
            let (lp_q, g_q) = run(Model::new(&base, Some(&a)).with_frozen(&frozen));
            let (lp_f, g_f) = run(Model::new(&widened, Some(&a)));
            for (i, (&x, &y)) in lp_q.iter().zip(&lp_f).enumerate() {
                assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "{what}: logp[{i}] {x} vs {y}");
            }
            let (gq, gf) = (g_q.named(), g_f.named());
            assert_eq!(gq.len(), 2 * 4 * cfg.n_layers);
            for ((name, tq), (_, tf)) in gq.iter().zip(&gf) {
                let scale = tf.data.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                assert!(scale > 0.0, "{what}: {name} has a gradient");
                let worst = tq.data.iter().zip(&tf.data).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
                assert!(worst <= 1e-5 * scale, "{what}: {name} differs by {worst:e} (largest {scale:e})");
            }
            // Without the adapter too (the reference of a fresh adapter).
            let mut acts = Activations::default();
            let q = m.logprobs(Model::new(&base, None).with_frozen(&frozen), &b, &mut acts, false).unwrap();
            let f = m.logprobs(&widened, &b, &mut acts, false).unwrap();
            for (&x, &y) in q.logp.iter().zip(&f.logp) {
                assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "{what}: base logp {x} vs {y}");
            }
        }
    }
}

#[test]
fn greedy_generation_matches_the_widened_base() {
    let cfg = configs().remove(0);
    let m = Decoder::new(cfg.clone());
    let a = adapter(&cfg);
    let (base, frozen, widened) = stored_and_widened(&cfg, Storage::Nf4 { double_quant: true });
    let prompts = vec![vec![1, 2, 3, 4, 5], vec![7, 8]];
    let sampling = SamplingConfig::greedy(12);
    let q = generate(&m, Model::new(&base, Some(&a)).with_frozen(&frozen), &prompts, 1, &sampling, &mut Rng::new(1));
    let f = generate(&m, Model::new(&widened, Some(&a)), &prompts, 1, &sampling, &mut Rng::new(1));
    let (q, f) = (q.unwrap(), f.unwrap());
    for (gq, gf) in q.iter().zip(&f) {
        assert_eq!(gq.tokens, gf.tokens);
        for (&x, &y) in gq.logps.iter().zip(&gf.logps) {
            assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "{x} vs {y}");
        }
    }
}

#[test]
fn a_frozen_base_refuses_full_gradients_and_misfit_linears() {
    let cfg = configs().remove(0);
    let m = Decoder::new(cfg.clone());
    let b = batch(&cfg);
    let (base, frozen, _) = stored_and_widened(&cfg, Storage::Nf4 { double_quant: false });
    let model = Model::new(&base, None).with_frozen(&frozen);
    let mut acts = Activations::default();
    m.logprobs(model, &b, &mut acts, true).unwrap();
    let mut g = Params::zeros(&cfg);
    let dlogp = vec![1.0; b.targets.len()];
    let err = m.backward_logprobs(model, &b, &mut acts, &dlogp, &mut g).unwrap_err();
    assert_eq!(err, EngineError::FullGradsOfFrozenBase);

    // Linears of another model: refused before any kernel reads them, naming the tensor.
    let other = configs().remove(1);
    let (_, wrong, _) = stored_and_widened(&DecoderConfig { n_layers: cfg.n_layers, ..other }, Storage::Bf16);
    let err = m.logprobs(Model::new(&base, None).with_frozen(&wrong), &b, &mut acts, false).unwrap_err();
    assert!(matches!(&err, EngineError::FrozenMismatch(msg) if msg.contains("layers.0.w_qkv")), "{err}");
}

#[test]
fn stored_linears_cost_their_bytes() {
    let cfg = configs().remove(0);
    let (_, nf4, widened) = stored_and_widened(&cfg, Storage::Nf4 { double_quant: false });
    let linears: usize =
        widened.layers.iter().map(|l| Site::ALL.iter().map(|s| s.weight(l).data.len()).sum::<usize>()).sum();
    // 4 bits per weight plus one f32 absmax per 64 (every matrix here is whole blocks).
    assert_eq!(nf4.bytes(), linears / 2 + 4 * linears / 64);
    let (_, bf16, _) = stored_and_widened(&cfg, Storage::Bf16);
    assert_eq!(bf16.bytes(), 2 * linears);
    for storage in storages() {
        let (_, frozen, _) = stored_and_widened(&cfg, storage);
        assert_eq!(FrozenLinears::estimate_bytes(&cfg, storage), frozen.bytes(), "{storage:?}");
    }
}

#[test]
fn a_random_base_built_frozen_is_init_random_stored() {
    for cfg in configs() {
        let storage = Storage::Nf4 { double_quant: true };
        let (params, frozen) = FrozenLinears::init_random(&cfg, 0.2, 5, storage).unwrap();
        let (base, stored, _) = stored_and_widened(&cfg, storage);
        assert_eq!(params, base, "the f32 part");
        assert_eq!(frozen, stored, "the stored linears");
        // A loader's way: layer by layer from its matrices.
        let layers = stored
            .layers()
            .iter()
            .map(|l| {
                let [a, b, c, d] = Site::ALL.map(|s| l.get(s).clone());
                FrozenLayer::new(a, b, c, d)
            })
            .collect();
        assert_eq!(FrozenLinears::new(layers), stored);
    }
}

#[test]
fn scale_shapes_have_their_published_sizes() {
    use dpo_engine::presets::by_name;
    // Parameter counts of the Hugging Face checkpoints (SmolLM2-360M, SmolLM2-1.7B, Meta-Llama-3-8B).
    for (name, params) in
        [("smollm2-360m", 361_821_120u64), ("smollm2-1.7b", 1_711_376_384), ("llama3-8b", 8_030_261_248)]
    {
        let cfg = by_name(name).unwrap();
        assert_eq!(cfg.param_count(), params, "{name}");
    }
    // QLoRA's storage of Llama-3-8B's block linears: NF4 with double quantisation, about 3.4 GiB.
    let nf4 = FrozenLinears::estimate_bytes(&by_name("llama3-8b").unwrap(), Storage::Nf4 { double_quant: true });
    assert!((3.3..3.5).contains(&(nf4 as f64 / (1u64 << 30) as f64)), "{nf4}");
}

#[test]
fn checkpointing_on_a_frozen_base_gives_the_same_adapter_gradients() {
    use dpo_engine::Keep;
    let cfg = configs().remove(0);
    let m = Decoder::new(cfg.clone());
    let b = batch(&cfg);
    let a = adapter(&cfg);
    let (base, frozen, _) = stored_and_widened(&cfg, Storage::Nf4 { double_quant: true });
    let model = Model::new(&base, Some(&a)).with_frozen(&frozen);
    let dlogp = vec![0.5; b.targets.len()];
    let grads = |keep: Keep| {
        let mut acts = Activations::default();
        m.logprobs(model, &b, &mut acts, keep).unwrap();
        let mut g = a.zeros_like();
        m.backward_logprobs(model, &b, &mut acts, &dlogp, &mut g).unwrap();
        g
    };
    let (all, inputs) = (grads(Keep::All), grads(Keep::LayerInputs));
    for ((name, x), (_, y)) in all.named().iter().zip(&inputs.named()) {
        let same = x.data.iter().zip(&y.data).all(|(p, q)| p.to_bits() == q.to_bits());
        assert!(same, "{name}: bit-identical with recomputation");
    }
}
