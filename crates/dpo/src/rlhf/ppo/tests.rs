//! PPO on a tiny random model: the KL estimate at the reference, the minibatch gradient through both heads
//! and the trunk, and a reward that the policy learns to collect.

use engine::presets::init_random;
use engine::{DecoderConfig, Dims, ScalarHead};

use super::*;

fn tiny() -> DecoderConfig {
    DecoderConfig::gpt2(Dims {
        vocab_size: 16,
        hidden: 32,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 4,
        head_dim: 8,
        ffn_hidden: 64,
        max_positions: 32,
    })
}

fn prompts(n: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| (0..1 + rng.below(4)).map(|_| 1 + rng.below(15) as u32).collect()).collect()
}

/// Pays +1 for every emission of `token`.
struct CountToken(u32);

impl RewardFn for CountToken {
    fn rewards(&mut self, _prompts: &[&[u32]], completions: &[&[u32]]) -> Vec<f64> {
        completions.iter().map(|c| c.iter().filter(|&&t| t == self.0).count() as f64).collect()
    }
}

#[test]
fn kl_is_zero_when_the_policy_is_the_reference() {
    let decoder = Decoder::new(tiny());
    let params = init_random(&decoder.cfg, 0.3, 1);
    let cfg = PpoConfig { max_new_tokens: 8, ..PpoConfig::default() };
    let reference = RefModel { decoder: &decoder, params: &params, linears: None };
    let (mut rng, mut acts) = (Rng::new(3), Activations::default());
    let head = ScalarHead::zeros(decoder.cfg.hidden);
    let ro = collect_rollout(
        &decoder,
        &params,
        &head,
        reference,
        prompts(16, 2),
        &[0],
        &mut CountToken(5),
        &cfg,
        &mut rng,
        &mut acts,
    )
    .unwrap();
    assert!(ro.finished.iter().any(|&f| f) && ro.finished.iter().any(|&f| !f), "EOS ends some completions only");
    assert!(ro.kl.iter().all(|&k| k == 0.0) && ro.non_score.iter().all(|&k| k == 0.0), "{:?}", ro.kl);
    assert!(ro.logp.iter().zip(&ro.ref_logp).all(|(a, b)| a == b));
    // The recomputed log-probs are those the sampler drew with (same model, same distribution).
    let mut rng = Rng::new(3);
    let sampling = engine::generate::SamplingConfig { max_new_tokens: 8, eos_ids: vec![0], ..Default::default() };
    let gens = engine::generate::generate(&decoder, &params, &ro.prompts, 1, &sampling, &mut rng).unwrap();
    for (g, l) in gens.iter().zip(&ro.logp) {
        assert!(g.logps.iter().zip(l).all(|(a, b)| (a - b).abs() < 1e-4), "{:?} vs {l:?}", g.logps);
    }

    // A whole step with a frozen policy: KL 0, ratio 1 throughout, nothing clipped.
    let cfg = PpoConfig { lr: 0.0, steps: 1, rollout_prompts: 8, minibatch: 4, max_new_tokens: 6, ..cfg };
    let out = train_ppo(&decoder, &params, reference, &prompts(8, 4), &[0], &mut CountToken(5), &cfg, &mut |_, _| true)
        .unwrap();
    let s = &out.history[0];
    assert_eq!((s.kl, s.non_score_reward, s.clip_frac), (0.0, 0.0, 0.0), "{s:?}");
    assert_eq!(s.rlhf_reward, s.reward, "{s:?}");
    assert!(s.approx_kl < 1e-12, "{s:?}");
    assert!(out.params == params);
}

/// The analytic gradient of a minibatch's PPO loss (LM head + value head + trunk) against central
/// differences of the loss in the weights, on entries of the value head, the LM head/embedding, an
/// attention projection and the final norm.
#[test]
fn minibatch_gradient_matches_finite_differences() {
    let decoder = Decoder::new(tiny());
    let params = init_random(&decoder.cfg, 0.3, 7);
    let d = decoder.cfg.hidden;
    let mut head = ScalarHead::zeros(d);
    let mut r = Rng::new(11);
    head.w.data.iter_mut().for_each(|w| *w = (r.normal() * 0.3) as f32);
    head.b.data[0] = 0.1;
    let cfg = PpoConfig { max_new_tokens: 6, ..PpoConfig::default() };
    let reference = RefModel { decoder: &decoder, params: &init_random(&decoder.cfg, 0.3, 8), linears: None };
    let (mut rng, mut acts) = (Rng::new(5), Activations::default());
    let ro = collect_rollout(
        &decoder,
        &params,
        &head,
        reference,
        prompts(4, 9),
        &[],
        &mut CountToken(5),
        &cfg,
        &mut rng,
        &mut acts,
    )
    .unwrap();
    // Move the weights off the rollout's so that ratios differ from 1 (within the clip range).
    let mut moved = params.clone();
    for (_, t) in moved.named_mut() {
        t.data.iter_mut().for_each(|x| *x += (r.normal() * 0.002) as f32);
    }
    head.b.data[0] += 0.05;
    let rows = [2, 0, 3];

    let mut grads = Params::zeros(&decoder.cfg);
    let mut head_grad = ScalarHead::zeros(d);
    let mut dhidden = Vec::new();
    let g = Grads { policy: &mut grads, head: &mut head_grad, dhidden: &mut dhidden };
    let m = minibatch_loss(&decoder, &moved, &head, &ro, &rows, &cfg, &mut acts, Some(g)).unwrap();
    assert!(m.approx_kl > 0.0 && m.clip_frac == 0.0, "{m:?}");
    let mut loss_at = |p: &Params, h: &ScalarHead| -> f64 {
        minibatch_loss(&decoder, p, h, &ro, &rows, &cfg, &mut acts, None).unwrap().loss
    };

    let eps = 1e-2f32;
    let (mut analytic, mut numeric) = (Vec::new(), Vec::new());
    for i in [0, 5, 17, 31] {
        let (mut up, mut down) = (head.clone(), head.clone());
        up.w.data[i] += eps;
        down.w.data[i] -= eps;
        numeric.push((loss_at(&moved, &up) - loss_at(&moved, &down)) / (2.0 * eps as f64));
        analytic.push(head_grad.w.data[i] as f64);
    }
    let (mut up, mut down) = (head.clone(), head.clone());
    up.b.data[0] += eps;
    down.b.data[0] -= eps;
    numeric.push((loss_at(&moved, &up) - loss_at(&moved, &down)) / (2.0 * eps as f64));
    analytic.push(head_grad.bias() as f64);
    let picks = [("wte", 3), ("wte", 5 * 32 + 4), ("layers.0.w_qkv", 100), ("layers.1.w_in", 77), ("norm_f.weight", 9)];
    for (name, i) in picks {
        let nudge = |delta: f32| {
            let mut p = moved.clone();
            p.named_mut().into_iter().find(|(n, _)| n == name).unwrap().1.data[i] += delta;
            p
        };
        numeric.push((loss_at(&nudge(eps), &head) - loss_at(&nudge(-eps), &head)) / (2.0 * eps as f64));
        analytic.push(grads.named().into_iter().find(|(n, _)| n == name).unwrap().1.data[i] as f64);
    }
    let diff: f64 = analytic.iter().zip(&numeric).map(|(a, n)| (a - n).powi(2)).sum::<f64>().sqrt();
    let scale: f64 = numeric.iter().map(|n| n * n).sum::<f64>().sqrt();
    assert!(scale > 1e-3, "the gradient is not trivially zero: {numeric:?}");
    assert!(diff <= 1e-3 * scale, "analytic {analytic:?}\nnumeric  {numeric:?}\nrelative error {}", diff / scale);
}

/// A reward of +1 per emission of token 5 in 8 sampled tokens: over 30 PPO steps the mean reward rises
/// from what the initial, near-uniform policy collects (8/16) to nearly all 8.
#[test]
fn ppo_learns_to_collect_a_token_reward() {
    let decoder = Decoder::new(tiny());
    let params = init_random(&decoder.cfg, 0.02, 3);
    let cfg = PpoConfig {
        lr: 3e-3,
        max_new_tokens: 8,
        steps: 30,
        rollout_prompts: 16,
        minibatch: 8,
        seed: 1,
        ..PpoConfig::default()
    };
    let reference = RefModel { decoder: &decoder, params: &params, linears: None };
    let mut last = None;
    let out = train_ppo(&decoder, &params, reference, &prompts(32, 6), &[], &mut CountToken(5), &cfg, &mut |s, _| {
        last = Some(s.step);
        true
    })
    .unwrap();
    assert_eq!((out.history.len(), last), (30, Some(30)));
    let mean = |s: &[PpoStepStats]| s.iter().map(|s| s.reward).sum::<f64>() / s.len() as f64;
    // Seed 1 gives 0.31 0.31 0.56 ... 7.94 8.00 8.00 8.00 (the most 8 tokens can earn).
    let (first, last) = (mean(&out.history[..3]), mean(&out.history[25..]));
    let curve: Vec<String> = out.history.iter().map(|s| format!("{:.2}", s.reward)).collect();
    assert!(first < 1.0, "a near-uniform policy emits token 5 about 8/16 times in 8 tokens: {curve:?}");
    assert!(last > 6.0, "mean reward of steps 1-3 {first:.3}, of steps 26-30 {last:.3}: {curve:?}");
    let end = out.history.last().unwrap();
    assert!(end.kl > 0.0);
    // TRL's objective/rlhf_reward: the score less the KL penalty, which a drifted policy pays.
    assert!(end.non_score_reward < 0.0 && end.rlhf_reward == end.reward + end.non_score_reward, "{end:?}");
}

#[test]
fn on_step_stops_and_bad_inputs_are_refused() {
    let decoder = Decoder::new(tiny());
    let params = init_random(&decoder.cfg, 0.02, 3);
    let reference = RefModel { decoder: &decoder, params: &params, linears: None };
    let cfg = PpoConfig {
        max_new_tokens: 4,
        rollout_prompts: 4,
        minibatch: 2,
        ppo_epochs: 1,
        steps: 5,
        ..PpoConfig::default()
    };
    let ps = prompts(4, 1);
    let out =
        train_ppo(&decoder, &params, reference, &ps, &[], &mut CountToken(5), &cfg, &mut |s, _| s.step < 2).unwrap();
    assert_eq!(out.history.len(), 2);

    let run = |cfg: &PpoConfig, prompts: &[Vec<u32>], reward: &mut dyn RewardFn| {
        train_ppo(&decoder, &params, reference, prompts, &[], reward, cfg, &mut |_, _| true).unwrap_err().to_string()
    };
    let e = run(&PpoConfig { clip_range: 0.0, ..cfg.clone() }, &ps, &mut CountToken(5));
    assert!(e.contains("clip_range"), "{e}");
    let e = run(&cfg, &[vec![1], vec![]], &mut CountToken(5));
    assert!(e.contains("prompt 1 has no tokens"), "{e}");
    struct Short;
    impl RewardFn for Short {
        fn rewards(&mut self, _: &[&[u32]], _: &[&[u32]]) -> Vec<f64> {
            vec![1.0]
        }
    }
    let e = run(&cfg, &ps, &mut Short);
    assert!(e.contains("1 scores for 4 completions"), "{e}");
}

/// Stopped after step 3 of 7 (inside the second pass over 5 prompts, with checkpoints every 2 steps) and
/// resumed from the checkpoint: the policy, the value head and every step's stats are those of a run never
/// stopped. A resume under other settings or with another input is refused, naming them.
#[test]
fn an_interrupted_run_resumes_bit_identical_to_an_uninterrupted_one() {
    use crate::train::{OnNonFinite, RunDir, StartMode};
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, Ordering};

    const GPT2: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/parity/models/gpt2-policy");
    /// Pays the completion's token ids (scaled): every sample earns something different.
    struct TokenSum;
    impl RewardFn for TokenSum {
        fn rewards(&mut self, _: &[&[u32]], completions: &[&[u32]]) -> Vec<f64> {
            completions.iter().map(|c| c.iter().map(|&t| t as f64).sum::<f64>() / 100.0).collect()
        }
    }
    let model = hf::load_model(Path::new(GPT2)).unwrap();
    let decoder = Decoder::new(model.config.decoder.clone());
    let reference = RefModel { decoder: &decoder, params: &model.params, linears: None };
    let ps: Vec<Vec<u32>> = prompts(5, 12).into_iter().map(|p| p.into_iter().map(|t| t * 7).collect()).collect();
    let inputs = PpoInputs { decoder: &decoder, reference, prompts: &ps, eos_ids: &[] };
    let cfg =
        PpoConfig { lr: 1e-3, steps: 7, rollout_prompts: 3, minibatch: 2, max_new_tokens: 4, ..Default::default() };
    let fingerprints = InputFingerprints::from([("prompt set".to_string(), fingerprint([], &ps))]);
    let root = std::env::temp_dir().join(format!("dpo-ppo-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let go = |path: &Path, mode: StartMode, start: PpoState, stop_after: Option<u64>| {
        let stop = AtomicBool::new(false);
        let mut dir = RunDir::open(path, mode, &mut |_| {}).unwrap();
        let run = PpoRun {
            dir: &mut dir,
            model_cfg: &model.config,
            source: Path::new(GPT2),
            save_every: 2,
            on_nonfinite: OnNonFinite::Stop,
            stop: &stop,
            resumed: mode == StartMode::Resume,
            inputs: &fingerprints,
            report_to: Default::default(),
            log: &mut |_| {},
        };
        let mut on_step = |s: &PpoStepStats, _: &Params| {
            if Some(s.step) == stop_after {
                stop.store(true, Ordering::SeqCst);
            }
            true
        };
        run_ppo(start, inputs, &mut TokenSum, &cfg, Some(run), &mut on_step).unwrap()
    };
    let fresh = || PpoState::fresh(model.params.clone(), decoder.cfg.hidden, &cfg);

    let whole = go(&root.join("whole"), StartMode::Fresh, fresh(), None);
    assert_eq!((whole.steps, whole.history.len(), whole.interrupted), (7, 7, false));
    let run_dir = root.join("run");
    let first = go(&run_dir, StartMode::Fresh, fresh(), Some(3));
    assert_eq!((first.steps, first.history.len(), first.interrupted), (3, 3, true));
    assert!(run_dir.join("checkpoints/step-2").is_dir() && run_dir.join("checkpoints/step-3").is_dir());

    let (start, _) = PpoState::resume(&run_dir, &cfg, &fingerprints, &model.params, Path::new(GPT2)).unwrap();
    assert_eq!((start.state.step, start.state.epoch, start.state.cursor), (3, 2, 4));
    let other = PpoConfig { clip_range: 0.3, ..cfg.clone() };
    let e = PpoState::resume(&run_dir, &other, &fingerprints, &model.params, Path::new(GPT2)).unwrap_err();
    assert!(e.to_string().contains("clip_range 0.2 in the checkpoint, 0.3 now"), "{e}");
    let bf16 = PpoConfig { precision: engine::kernels::Precision::Bf16, ..cfg.clone() };
    let e = PpoState::resume(&run_dir, &bf16, &fingerprints, &model.params, Path::new(GPT2)).unwrap_err();
    assert!(e.to_string().contains(r#"precision "f32" in the checkpoint, "bf16" now"#), "{e}");
    let moved = InputFingerprints::from([("prompt set".to_string(), fingerprint([], &ps[1..]))]);
    let e = PpoState::resume(&run_dir, &cfg, &moved, &model.params, Path::new(GPT2)).unwrap_err();
    assert!(e.to_string().contains("another prompt set"), "{e}");

    let second = go(&run_dir, StartMode::Resume, start, None);
    assert_eq!((second.steps, second.history.len(), second.interrupted), (7, 4, false));
    assert!(second.params == whole.params && second.value_head == whole.value_head);
    assert_ne!(whole.value_head, ScalarHead::zeros(decoder.cfg.hidden));
    assert!(whole.params != model.params);
    let untimed = |h: &[PpoStepStats]| h.iter().map(|s| PpoStepStats { seconds: 0.0, ..s.clone() }).collect::<Vec<_>>();
    let resumed: Vec<PpoStepStats> = first.history.iter().chain(&second.history).cloned().collect();
    assert_eq!(untimed(&resumed), untimed(&whole.history));
    let _ = std::fs::remove_dir_all(&root);
}
