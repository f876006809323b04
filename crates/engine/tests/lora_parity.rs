//! A pass through an adapter against the base it modifies: bit-identical with `B = 0` (a fresh PEFT
//! adapter), equal to the base with the adapter merged in (`Adapter::merge_into`) for scoring and greedy
//! generation.

mod lora_common;

use dpo_engine::generate::{generate, generate_batched, SamplingConfig};
use dpo_engine::rng::Rng;
use dpo_engine::{Activations, Decoder, HeadOutput, Model, Params};
use lora_common::{adapter, base, batch, families};

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn a_fresh_adapter_leaves_log_probs_bit_identical() {
    for (name, cfg, modules) in families() {
        let (m, p, b) = (Decoder::new(cfg.clone()), base(&cfg), batch(&cfg));
        let mut a = adapter(&cfg, &modules, 0.0, 31);
        a.init_peft(&mut Rng::new(4)); // A random, B = 0
        for keep in [false, true] {
            let run = |model: Model| m.logprobs(model, &b, &mut Activations::default(), keep).unwrap();
            let (plain, adapted): (HeadOutput, HeadOutput) = (run((&p).into()), run(Model::new(&p, Some(&a))));
            assert_eq!(bits(&adapted.logp), bits(&plain.logp), "{name} keep={keep}");
            assert_eq!(bits(&adapted.logit_sum), bits(&plain.logit_sum), "{name} keep={keep}");
        }
    }
}

#[test]
fn log_probs_through_an_adapter_equal_the_merged_base() {
    for (name, cfg, modules) in families() {
        let (m, p, b) = (Decoder::new(cfg.clone()), base(&cfg), batch(&cfg));
        let a = adapter(&cfg, &modules, 0.0, 32);
        let mut merged = p.clone();
        a.merge_into(&mut merged);
        let logp = |model: Model| m.logprobs(model, &b, &mut Activations::default(), false).unwrap().logp;
        let (adapted, want, plain) = (logp(Model::new(&p, Some(&a))), logp((&merged).into()), logp((&p).into()));
        let worst = adapted.iter().zip(&want).map(|(x, y)| (x - y).abs() / y.abs().max(1.0)).fold(0.0, f32::max);
        assert!(worst < 1e-5, "{name}: log-probs differ from the merged base's by {worst:.2e}");
        let moved = plain.iter().zip(&want).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        assert!(moved > 1e-2, "{name}: the adapter barely changes the model ({moved:.2e}): the check is vacuous");
    }
}

#[test]
fn greedy_generation_through_an_adapter_equals_the_merged_base() {
    for (name, cfg, modules) in families() {
        let (m, p) = (Decoder::new(cfg.clone()), base(&cfg));
        let a = adapter(&cfg, &modules, 0.0, 33);
        let mut merged = p.clone();
        a.merge_into(&mut merged);
        let mut r = Rng::new(8);
        let prompts: Vec<Vec<u32>> =
            [3, 5, 1].iter().map(|&n| (0..n).map(|_| r.below(cfg.vocab_size) as u32).collect()).collect();
        let greedy = SamplingConfig::greedy(10);
        let gen = |model: Model| generate(&m, model, &prompts, 1, &greedy, &mut Rng::new(0)).unwrap();
        let (adapted, want, plain) = (gen(Model::new(&p, Some(&a))), gen((&merged).into()), gen((&p).into()));
        for (x, y) in adapted.iter().zip(&want) {
            assert_eq!(x.tokens, y.tokens, "{name}");
            let worst = x.logps.iter().zip(&y.logps).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(worst < 1e-4, "{name}: generation log-probs differ by {worst:.2e}");
        }
        assert!(adapted.iter().zip(&plain).any(|(x, y)| x.tokens != y.tokens), "{name}: adapter changed nothing");
    }
}

#[test]
fn generation_through_an_adapter_does_not_depend_on_the_batch() {
    // Decode steps run the adapter through the row-independent kernels, as the base.
    for (name, cfg, modules) in families() {
        let (m, p) = (Decoder::new(cfg.clone()), base(&cfg));
        let a = adapter(&cfg, &modules, 0.0, 34);
        let prompts: Vec<Vec<u32>> = vec![vec![1, 2, 3], vec![4], vec![5, 6]];
        let sampling = SamplingConfig { temperature: 1.0, ..SamplingConfig::greedy(8) };
        let model = Model::new(&p, Some(&a)).with_dropout_seed(5); // generation never drops
        let run = |batch: usize| generate_batched(&m, model, &prompts, 2, &sampling, &mut Rng::new(9), batch).unwrap();
        let (one, many) = (run(1), run(16));
        for (x, y) in one.iter().zip(&many) {
            assert_eq!((&x.tokens, bits(&x.logps)), (&y.tokens, bits(&y.logps)), "{name}");
        }
        let no_seed = generate_batched(&m, Model::new(&p, Some(&a)), &prompts, 2, &sampling, &mut Rng::new(9), 16);
        assert_eq!(no_seed.unwrap(), many, "{name}");
    }
}

/// The same adapter on the base through `&Params` conversions: a `Model` built from a base reads it alone.
#[test]
fn a_base_converts_to_a_model_without_adapter() {
    let (_, cfg, _) = families().remove(0);
    let p: Params = base(&cfg);
    let model: Model = (&p).into();
    assert!(model.adapter.is_none() && model.dropout_seed.is_none() && std::ptr::eq(model.base, &p));
}
