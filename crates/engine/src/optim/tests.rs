use super::test_util::fill;
use super::*;
use crate::config::{DecoderConfig, Dims, NormKind};
use crate::params::Params;
use crate::ScalarHead;

/// A GPT-2-like decoder (LayerNorm, biases, learned positions) small enough for tests, whose `wte`
/// spans several chunks so that steps run in parallel.
fn gpt2_tiny() -> DecoderConfig {
    DecoderConfig::gpt2(Dims {
        vocab_size: 700,
        hidden: 64,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 4,
        head_dim: 16,
        ffn_hidden: 256,
        max_positions: 32,
    })
}

fn random_params(cfg: &DecoderConfig, seed: u64, scale: f32) -> Params {
    let mut p = Params::zeros(cfg);
    for (k, (_, t)) in p.named_mut().into_iter().enumerate() {
        fill(&mut t.data, seed * 1000 + k as u64, scale);
    }
    p
}

fn configs() -> Vec<OptimizerConfig> {
    vec![
        OptimizerConfig::adamw().with_weight_decay(0.1),
        OptimizerConfig::rmsprop(),
        OptimizerConfig::RmsProp { alpha: 0.99, eps: 1e-8, weight_decay: 0.01, momentum: 0.9 },
        OptimizerConfig::sgd(),
        OptimizerConfig::Sgd { momentum: 0.9, weight_decay: 0.01 },
    ]
}

/// `steps` steps from `opt`, gradient `t` drawn from seed `t`.
fn run(opt: &mut Optimizer, p: &mut Params, cfg: &DecoderConfig, steps: std::ops::Range<u64>) {
    for t in steps {
        let g = random_params(cfg, 100 + t, 0.05);
        opt.step(p, &g, 1e-3 * (1.0 + t as f64));
    }
}

#[test]
fn weight_decay_skips_biases_and_norm_weights_by_name() {
    // HF Trainer decays no parameter named like a bias or a norm; in canonical names those are the norms
    // (`norm1`, `norm2`, `norm_f`) and the biases (`.bias`, `b_*`), and exactly the 1-D tensors.
    let hf_rule = |name: &str| {
        let last = name.rsplit('.').next().unwrap_or(name);
        !(name.contains("norm") || last == "bias" || last.starts_with("b_"))
    };
    let llama = DecoderConfig { norm: NormKind::RmsNorm { eps: 1e-5 }, tied_embeddings: false, ..gpt2_tiny() };
    for cfg in [gpt2_tiny(), llama] {
        let p = Params::zeros(&cfg);
        for (name, t) in p.named() {
            assert_eq!(applies_weight_decay(&t.shape), hf_rule(&name), "{name} {:?}", t.shape);
        }
        let decayed: Vec<String> =
            p.named().into_iter().filter(|(_, t)| applies_weight_decay(&t.shape)).map(|(n, _)| n).collect();
        assert!(decayed.iter().any(|n| n == "wte") && decayed.iter().any(|n| n == "layers.1.w_out"));
    }
    let names: Vec<String> = Params::zeros(&gpt2_tiny()).named().into_iter().map(|(n, _)| n).collect();
    for n in ["wpe", "layers.0.b_qkv", "layers.0.norm1.weight", "norm_f.bias"] {
        assert!(names.iter().any(|x| x == n), "fixture lacks {n}");
    }
}

#[test]
fn frozen_tensors_are_untouched_and_hold_no_state() {
    let cfg = gpt2_tiny();
    let p0 = random_params(&cfg, 1, 0.5);
    for ocfg in configs() {
        let mut p = p0.clone();
        let mut opt = Optimizer::with_trainable(ocfg.clone(), &p, |n| n.starts_with("layers.1."));
        run(&mut opt, &mut p, &cfg, 0..2);
        for ((name, before), (_, after)) in p0.named().into_iter().zip(p.named()) {
            assert_eq!(before == after, !name.starts_with("layers.1."), "{} {name}", ocfg.name());
        }
        assert!(opt.trained().all(|n| n.starts_with("layers.1.")));
        assert!(opt.state().buffers.iter().all(|(n, _)| n.contains(".layers.1.")));
    }
}

#[test]
fn restored_state_continues_bit_for_bit() {
    let cfg = gpt2_tiny();
    let p0 = random_params(&cfg, 2, 0.5);
    for ocfg in configs() {
        let mut p_straight = p0.clone();
        let mut straight = Optimizer::new(ocfg.clone(), &p_straight);
        run(&mut straight, &mut p_straight, &cfg, 0..5);

        let mut p = p0.clone();
        let mut first = Optimizer::new(ocfg.clone(), &p);
        run(&mut first, &mut p, &cfg, 0..3);
        let state = first.state();
        assert_eq!(state.steps, 3);
        drop(first);
        let mut resumed = Optimizer::restore(ocfg.clone(), &p, state).expect("restore");
        assert_eq!(resumed.steps_taken(), 3);
        run(&mut resumed, &mut p, &cfg, 3..5);

        assert!(p == p_straight, "{ocfg:?}: resumed parameters differ");
        assert!(resumed.state() == straight.state(), "{ocfg:?}: resumed state differs");
    }
}

#[test]
fn state_names_follow_torch() {
    let p = test_util::tiny_params();
    let names = |cfg| -> Vec<String> { Optimizer::new(cfg, &p).state().buffers.into_iter().map(|(n, _)| n).collect() };
    assert_eq!(
        names(OptimizerConfig::adamw()),
        [
            "exp_avg.wte",
            "exp_avg.norm_f.weight",
            "exp_avg.norm_f.bias",
            "exp_avg_sq.wte",
            "exp_avg_sq.norm_f.weight",
            "exp_avg_sq.norm_f.bias"
        ]
    );
    let rms_momentum = OptimizerConfig::RmsProp { alpha: 0.99, eps: 1e-8, weight_decay: 0.0, momentum: 0.5 };
    assert_eq!(names(rms_momentum).len(), 6);
    assert_eq!(names(OptimizerConfig::rmsprop())[0], "square_avg.wte");
    assert!(names(OptimizerConfig::sgd()).is_empty());
    assert_eq!(names(OptimizerConfig::Sgd { momentum: 0.9, weight_decay: 0.0 })[2], "momentum_buffer.norm_f.bias");
}

#[test]
fn restore_names_every_mismatch() {
    let p = test_util::tiny_params();
    let cfg = OptimizerConfig::adamw();
    let good = Optimizer::new(cfg.clone(), &p).state();
    let restore = |f: &dyn Fn(&mut OptimizerState)| {
        let mut s = good.clone();
        f(&mut s);
        Optimizer::restore(cfg.clone(), &p, s).err()
    };
    assert_eq!(restore(&|_| {}), None);

    let err = restore(&|s| s.buffers.retain(|(n, _)| n != "exp_avg_sq.norm_f.weight")).unwrap();
    assert_eq!(err, OptimError::Missing("exp_avg_sq.norm_f.weight".into()));

    let err = restore(&|s| s.buffers[0].1 = Tensor::zeros(&[3, 2])).unwrap();
    assert_eq!(err, OptimError::Shape { name: "exp_avg.wte".into(), got: vec![3, 2], want: vec![2, 3] });
    assert!(err.to_string().contains("`exp_avg.wte`"), "{err}");

    let err = restore(&|s| {
        s.buffers[1].1.data.pop();
    })
    .unwrap();
    assert!(matches!(err, OptimError::Length { ref name, len: 2, .. } if name == "exp_avg.norm_f.weight"));

    let err = restore(&|s| s.buffers.push(("exp_avg.lm_head".into(), Tensor::zeros(&[2, 3])))).unwrap();
    assert_eq!(err, OptimError::Unexpected("exp_avg.lm_head".into(), "adamw"));

    let err = restore(&|s| {
        let dup = s.buffers[2].clone();
        s.buffers.push(dup)
    })
    .unwrap();
    assert_eq!(err, OptimError::Duplicate("exp_avg.norm_f.bias".into()));

    // A state of all tensors does not fit an optimizer that trains some of them, and vice versa.
    let only_wte = |n: &str| n == "wte";
    let err = Optimizer::restore_with_trainable(cfg.clone(), &p, only_wte, good.clone()).err().unwrap();
    assert!(matches!(err, OptimError::Unexpected(..)), "{err}");
    let partial = Optimizer::with_trainable(cfg.clone(), &p, only_wte).state();
    let err = Optimizer::restore(cfg.clone(), &p, partial.clone()).err().unwrap();
    assert_eq!(err, OptimError::Missing("exp_avg.norm_f.weight".into()));
    assert!(Optimizer::restore_with_trainable(cfg, &p, only_wte, partial).is_ok());
}

fn random_head(d: usize, seed: u64, scale: f32) -> ScalarHead {
    let mut h = ScalarHead::zeros(d);
    fill(&mut h.w.data, seed, scale);
    fill(&mut h.b.data, seed + 1, scale);
    h
}

#[test]
fn a_pair_of_sets_steps_as_its_parts() {
    // Updates are per tensor, so one optimizer over (decoder, head) moves every tensor exactly as two
    // optimizers over the parts do; the head's state is named after its tensors.
    let cfg = gpt2_tiny();
    let (p0, h0) = (random_params(&cfg, 4, 0.5), random_head(cfg.hidden, 5, 0.5));
    for ocfg in configs() {
        let (mut p, mut h) = (p0.clone(), h0.clone());
        let mut joint = Optimizer::new(ocfg.clone(), &(&mut p, &mut h));
        let (mut p_alone, mut h_alone) = (p0.clone(), h0.clone());
        let mut opt_p = Optimizer::new(ocfg.clone(), &p_alone);
        let mut opt_h = Optimizer::new(ocfg.clone(), &h_alone);
        for t in 0..3u64 {
            let (mut g, mut hg) = (random_params(&cfg, 100 + t, 0.05), random_head(cfg.hidden, 200 + t, 0.05));
            let lr = 1e-3 * (1.0 + t as f64);
            joint.step(&mut (&mut p, &mut h), &(&mut g, &mut hg), lr);
            opt_p.step(&mut p_alone, &g, lr);
            opt_h.step(&mut h_alone, &hg, lr);
        }
        assert!(p == p_alone && h == h_alone, "{ocfg:?}: the pair moved differently from its parts");
        let names: Vec<String> = joint.state().buffers.into_iter().map(|(n, _)| n).collect();
        if matches!(ocfg, OptimizerConfig::AdamW { .. }) {
            assert!(names.iter().any(|n| n == "exp_avg.score.weight") && names.contains(&"exp_avg_sq.wte".into()));
        }
        assert_eq!(names.len(), ocfg.buffers() * (Params::zeros(&cfg).named().len() + 2));
    }
}

#[test]
fn a_pair_of_sets_is_clipped_and_checked_as_one() {
    let cfg = gpt2_tiny();
    let (g0, hg0) = (random_params(&cfg, 6, 0.5), random_head(cfg.hidden, 7, 3.0));
    let (a, b) = (global_grad_norm(&g0), global_grad_norm(&hg0));
    let (mut g, mut hg) = (g0.clone(), hg0.clone());
    let norm = clip_grad_norm(&mut (&mut g, &mut hg), 1.0);
    assert!((norm - (a * a + b * b).sqrt()).abs() <= 1e-12 * norm, "{norm} vs {a} and {b}");
    let coef = (1.0f32 / (norm as f32 + 1e-6f32)) * 1.0f32;
    let scaled = |x: &[f32]| x.iter().map(|v| v * coef).collect::<Vec<f32>>();
    assert_eq!(g.wte.data, scaled(&g0.wte.data));
    assert_eq!(hg.w.data, scaled(&hg0.w.data));
    assert_eq!(hg.b.data, scaled(&hg0.b.data));

    // A NaN in the head makes the norm and, as in torch, every gradient NaN.
    assert!(grads_finite(&(&mut g, &mut hg)));
    hg.b.data[0] = f32::NAN;
    assert!(!grads_finite(&(&mut g, &mut hg)));
    assert!(clip_grad_norm(&mut (&mut g, &mut hg), 1.0).is_nan());
    assert!(g.wte.data.iter().chain(&hg.w.data).all(|x| x.is_nan()));
}

#[test]
#[should_panic(expected = "names `score.weight` twice")]
fn a_set_with_a_name_twice_is_refused() {
    let (mut a, mut b) = (ScalarHead::zeros(2), ScalarHead::zeros(2));
    Optimizer::new(OptimizerConfig::adamw(), &(&mut a, &mut b));
}

#[test]
fn buffers_per_parameter() {
    assert_eq!(OptimizerConfig::adamw().buffers(), 2);
    assert_eq!(OptimizerConfig::rmsprop().buffers(), 1);
    assert_eq!(OptimizerConfig::RmsProp { alpha: 0.99, eps: 1e-8, weight_decay: 0.0, momentum: 0.9 }.buffers(), 2);
    assert_eq!(OptimizerConfig::sgd().buffers(), 0);
    assert_eq!(OptimizerConfig::Sgd { momentum: 0.9, weight_decay: 0.0 }.buffers(), 1);
}

#[test]
fn steps_are_identical_on_one_and_two_threads() {
    let cfg = gpt2_tiny();
    assert!(Params::zeros(&cfg).wte.numel() > 2 * CHUNK, "wte must span several chunks");
    let p0 = random_params(&cfg, 3, 0.5);
    for ocfg in configs() {
        let on = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
            pool.install(|| {
                let mut p = p0.clone();
                let mut opt = Optimizer::new(ocfg.clone(), &p);
                run(&mut opt, &mut p, &cfg, 0..3);
                let mut g = random_params(&cfg, 7, 3.0);
                let norm = clip_grad_norm(&mut g, 1.0);
                (p, opt.state(), norm, g)
            })
        };
        let (one, two) = (on(1), on(2));
        assert!(one.0 == two.0 && one.1 == two.1, "{ocfg:?}: params or state depend on the thread count");
        assert_eq!(one.2.to_bits(), two.2.to_bits(), "grad norm depends on the thread count");
        assert!(one.3 == two.3, "clipped grads depend on the thread count");
    }
}

/// Clipping, stepping and zeroing in one pass give the bits of the three passes one after the other, for
/// every optimizer, with and without a clip, over a wte that spans several chunks (its length not a
/// multiple of the chunk) and with a tensor the optimizer does not train.
#[test]
fn step_and_clear_is_clip_step_zero() {
    let cfg = gpt2_tiny();
    for ocfg in configs() {
        for max_norm in [1e-3, 1e6] {
            let only_blocks = |name: &str| name != "wpe";
            let p0 = random_params(&cfg, 1, 0.1);
            let (mut a, mut b) = (p0.clone(), p0.clone());
            let mut oa = Optimizer::with_trainable(ocfg.clone(), &p0, only_blocks);
            let mut ob = oa.clone();
            for t in 0..3 {
                let g = random_params(&cfg, 200 + t, 0.5);
                let (mut ga, mut gb) = (g.clone(), g);
                let norm_a = clip_grad_norm(&mut ga, max_norm);
                oa.step(&mut a, &ga, 1e-2);
                ga.fill_zero();
                let (norm_b, coef) = clip_coefficient(&gb, max_norm);
                assert_eq!(coef.is_some(), max_norm < 1.0, "{ocfg:?}");
                ob.step_and_clear(&mut b, &mut gb, 1e-2, coef);
                assert_eq!(norm_a.to_bits(), norm_b.to_bits(), "{ocfg:?}");
                assert!(a == b, "{ocfg:?} max_norm {max_norm} step {t}: parameters differ");
                assert!(ga == gb, "{ocfg:?} max_norm {max_norm} step {t}: gradients not all zero");
                assert!(oa.state() == ob.state(), "{ocfg:?} max_norm {max_norm} step {t}: state differs");
            }
        }
    }
}
