//! The reward model's loss and gradient against finite differences and its scores, training on a
//! separable preference, reproducibility, batching and the round trip through disk.

use std::path::Path;

use engine::presets::init_random;
use engine::rng::Rng;
use engine::{Activations, Decoder, DecoderConfig, Dims, Params, ScalarHead};

use super::train::{pair_batch, Grads};
use super::*;
use crate::data::Example;

fn llama_tiny() -> DecoderConfig {
    DecoderConfig {
        qkv_bias: true,
        ..DecoderConfig::llama(Dims {
            vocab_size: 16,
            hidden: 8,
            n_layers: 2,
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 4,
            ffn_hidden: 12,
            max_positions: 32,
        })
    }
}

fn gpt2_tiny() -> DecoderConfig {
    DecoderConfig::gpt2(Dims {
        vocab_size: 16,
        hidden: 8,
        n_layers: 2,
        n_heads: 2,
        n_kv_heads: 2,
        head_dim: 4,
        ffn_hidden: 16,
        max_positions: 32,
    })
}

/// Random parameters with every tensor (biases and norms too) away from its special values, so that
/// each one's gradient is exercised.
fn random_params(cfg: &DecoderConfig, seed: u64) -> Params {
    let mut p = init_random(cfg, 0.4, seed);
    let mut r = Rng::new(seed + 1);
    for (_, t) in p.named_mut() {
        if t.shape.len() == 1 {
            t.data.iter_mut().for_each(|x| *x += 0.2 * r.normal() as f32);
        }
    }
    p
}

fn pairs_for_gradients() -> Vec<Example> {
    let mut tail = Example::new("line 3", vec![1, 2, 3], vec![4, 5], vec![6, 7, 8]);
    tail.rejected_prompt_skip = 1; // a per-side prompt cut: packed as two sequences
    vec![
        Example::new("line 1", vec![1, 2, 3], vec![4, 5], vec![6]),
        Example::new("line 2", vec![9], vec![10, 11, 12], vec![13, 14]),
        tail,
        Example::new("line 4", vec![], vec![3, 3], vec![15]),
    ]
}

/// The loss of [`pair_batch`] as a function of all trainable values, in f64.
fn loss_of(cfg: &DecoderConfig, p: &Params, head: &[f32], bias: f32, pairs: &[&Example]) -> f64 {
    let mut acts = Activations::default();
    let head = ScalarHead::new(head.to_vec(), bias);
    pair_batch(&Decoder::new(cfg.clone()), p.into(), &head, pairs, &mut acts, None).unwrap().loss
}

#[test]
fn loss_and_gradient_match_finite_differences() {
    for (name, cfg) in [("llama", llama_tiny()), ("gpt2", gpt2_tiny())] {
        let params = random_params(&cfg, 3);
        let mut r = Rng::new(5);
        let head: Vec<f32> = (0..cfg.hidden).map(|_| r.normal() as f32).collect();
        let bias = 0.3f32;
        let examples = pairs_for_gradients();
        let pairs: Vec<&Example> = examples.iter().collect();
        let decoder = Decoder::new(cfg.clone());

        let mut grads = Params::zeros(&cfg);
        let mut dhead = ScalarHead::zeros(cfg.hidden);
        let mut acts = Activations::default();
        let g = Grads { trunk: &mut grads, head: &mut dhead };
        let scalar_head = ScalarHead::new(head.clone(), bias);
        let out = pair_batch(&decoder, (&params).into(), &scalar_head, &pairs, &mut acts, Some(g)).unwrap();

        // The loss from the rewards of `score`, sequence by sequence.
        let rm = RewardModel::new(&cfg, params.clone(), 0.0, 0);
        let rm = RewardModel { head: scalar_head.clone(), ..rm };
        let scored = rm.score_pairs(&examples).unwrap();
        let want: f64 = scored.iter().map(|(w, l)| (1.0 + (-(w - l)).exp()).ln()).sum::<f64>() / 4.0;
        assert!((out.loss - want).abs() < 1e-6, "{name}: loss {} from scores {want}", out.loss);
        for (i, (w, l)) in scored.iter().enumerate() {
            assert!((out.chosen[i] - w).abs() < 1e-5 && (out.rejected[i] - l).abs() < 1e-5, "{name}: pair {i}");
        }

        let h = 1e-2f32;
        let check = |what: &str, an: f64, plus: f64, minus: f64| {
            let fd = (plus - minus) / (2.0 * h as f64);
            assert!((fd - an).abs() <= 2e-4 + 1e-2 * an.abs(), "{name} {what}: analytic {an:.6e}, numeric {fd:.6e}");
        };
        // Head: every weight; the bias gets exactly zero.
        for j in 0..cfg.hidden {
            let (mut hp, mut hm) = (head.clone(), head.clone());
            hp[j] += h;
            hm[j] -= h;
            let lp = loss_of(&cfg, &params, &hp, bias, &pairs);
            let lm = loss_of(&cfg, &params, &hm, bias, &pairs);
            check(&format!("head[{j}]"), dhead.w.data[j] as f64, lp, lm);
        }
        let lp = loss_of(&cfg, &params, &head, bias + h, &pairs);
        let lm = loss_of(&cfg, &params, &head, bias - h, &pairs);
        assert!(((lp - lm) / (2.0 * h as f64)).abs() < 1e-4, "{name}: bias gradient is zero");

        // Trunk: in every tensor, its largest-gradient element and two random ones.
        let mut checked = 0;
        for (k, (tname, gt)) in grads.named().into_iter().enumerate() {
            let mut idx: Vec<usize> =
                vec![(0..gt.numel()).max_by(|&a, &b| gt.data[a].abs().total_cmp(&gt.data[b].abs())).unwrap()];
            idx.push(r.below(gt.numel()));
            idx.push(r.below(gt.numel()));
            for i in idx {
                let perturbed = |delta: f32| {
                    let mut p = params.clone();
                    p.named_mut()[k].1.data[i] += delta;
                    loss_of(&cfg, &p, &head, bias, &pairs)
                };
                check(&format!("{tname}[{i}]"), gt.data[i] as f64, perturbed(h), perturbed(-h));
                checked += 1;
            }
            if tname == "lm_head" {
                assert!(gt.data.iter().all(|&x| x == 0.0), "{name}: the LM head takes no gradient");
            }
        }
        assert!(checked > 30);
        // Everything but the unused LM head and the final norm's shift (which, like `b`, moves every
        // reward alike and cancels in r_w - r_l) takes a gradient.
        for (tname, t) in grads.named() {
            let zero = t.data.iter().all(|&x| x == 0.0);
            assert_eq!(zero, tname == "lm_head" || tname == "norm_f.bias", "{name}: {tname}");
        }
    }
}

/// Pairs whose chosen completion contains token 5 and whose rejected one never does.
fn separable(n: usize, seed: u64) -> Vec<Example> {
    let mut r = Rng::new(seed);
    let tok = |r: &mut Rng| 6 + r.below(10) as u32;
    (0..n)
        .map(|i| {
            let prompt: Vec<u32> = (0..1 + r.below(3)).map(|_| tok(&mut r)).collect();
            let len = 2 + r.below(3);
            let mut chosen: Vec<u32> = (0..len).map(|_| tok(&mut r)).collect();
            let at = r.below(len);
            chosen[at] = 5;
            let rejected: Vec<u32> = (0..2 + r.below(3)).map(|_| tok(&mut r)).collect();
            Example::new(format!("line {}", i + 1), prompt, chosen, rejected)
        })
        .collect()
}

#[test]
fn learns_a_separable_preference() {
    let cfg = llama_tiny();
    let train = separable(64, 1);
    let held_out = separable(32, 2);
    let rc = RmTrainConfig { lr: 1e-2, batch_size: 8, epochs: 8.0, head_init_std: 0.0, ..Default::default() };
    let mut lines = 0;
    let (rm, stats) =
        train_reward_model(&cfg, init_random(&cfg, 0.1, 7), &train, &held_out, &rc, &mut |_| lines += 1).unwrap();
    assert_eq!(stats.len(), 64);
    assert_eq!(lines, 64);
    assert!((stats[0].loss - std::f64::consts::LN_2).abs() < 1e-9, "a zero head starts at log 2");
    let (loss, acc) = evaluate(&rm, &train, 8).unwrap();
    assert_eq!(acc, 1.0, "training accuracy (loss {loss})");
    assert!(loss < 0.2, "training loss {loss}");
    let last = stats.last().unwrap();
    assert_eq!(last.eval_accuracy, Some(1.0), "held-out accuracy");
    assert!(last.eval_loss.unwrap() < 0.3);
    assert_eq!(accuracy(&rm, &held_out).unwrap(), 1.0);
    assert!(last.learning_rate < rc.lr / 10.0, "linear decay");
}

#[test]
fn training_is_reproducible_and_respects_max_steps() {
    let cfg = gpt2_tiny();
    let data = separable(10, 3);
    let rc = RmTrainConfig { lr: 1e-3, batch_size: 4, max_steps: Some(5), ..Default::default() };
    let run = || train_reward_model(&cfg, init_random(&cfg, 0.1, 1), &data, &[], &rc, &mut |_| {}).unwrap();
    let (a, sa) = run();
    let (b, sb) = run();
    assert_eq!(sa.len(), 5);
    assert!(sa.iter().zip(&sb).all(|(x, y)| x.loss.to_bits() == y.loss.to_bits()));
    assert!(a.params == b.params && a.head == b.head);
    // epochs: 10 rows, batches of 4 -> 3 steps per epoch.
    let rc = RmTrainConfig { max_steps: None, epochs: 2.0, ..rc };
    assert_eq!(rc.total_steps(data.len()), 6);
    assert!(train_reward_model(&cfg, init_random(&cfg, 0.1, 1), &[], &[], &rc, &mut |_| {}).is_err());
}

#[test]
fn scores_do_not_depend_on_batching() {
    let cfg = llama_tiny();
    let mut r = Rng::new(4);
    let rm = RewardModel::new(&cfg, random_params(&cfg, 2), 1.0, 0);
    let seqs: Vec<(Vec<u32>, Vec<u32>)> = (0..40)
        .map(|_| {
            (
                (0..r.below(3)).map(|_| r.below(16) as u32).collect(),
                (0..1 + r.below(4)).map(|_| r.below(16) as u32).collect(),
            )
        })
        .collect();
    let refs: Vec<(&[u32], &[u32])> = seqs.iter().map(|(p, c)| (&p[..], &c[..])).collect();
    let all = rm.score(&refs).unwrap();
    for (i, s) in refs.iter().enumerate() {
        let one = rm.score(std::slice::from_ref(s)).unwrap()[0];
        assert!((one - all[i]).abs() < 1e-5, "sequence {i}: {one} alone, {} in a batch", all[i]);
    }
    assert!(rm.score(&[(&[][..], &[][..])]).is_err());
    assert!(rm.score(&[(&[1][..], &[99][..])]).is_err(), "a token outside the vocabulary");
}

const GPT2: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/parity/models/gpt2-policy");

#[test]
fn save_then_load_gives_identical_scores() {
    let model = hf::load_model(Path::new(GPT2)).unwrap();
    let mut rm = RewardModel::new(&model.config.decoder, model.params.clone(), 0.5, 9);
    rm.head.b.data[0] = -0.25;
    let dir = std::env::temp_dir().join(format!("dpo-rm-test-{}", std::process::id())).join("rm");
    rm.save(&dir, &model.config, Some(Path::new(GPT2))).unwrap();
    assert!(dir.join(HEAD_FILE).is_file() && dir.join("tokenizer.json").is_file());
    let back = RewardModel::load(&dir).unwrap();
    assert_eq!(back.head, rm.head);
    let seqs: Vec<(&[u32], &[u32])> = vec![(&[1, 2, 3], &[4, 5]), (&[7], &[8, 9, 10, 0]), (&[], &[11, 12])];
    let (a, b) = (rm.score(&seqs).unwrap(), back.score(&seqs).unwrap());
    assert_eq!(a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), b.iter().map(|x| x.to_bits()).collect::<Vec<_>>());

    // Saving again replaces it; a plain model directory is not a reward model; foreign directories
    // are not overwritten.
    rm.head.b.data[0] = 1.0;
    rm.save(&dir, &model.config, None).unwrap();
    assert_eq!(RewardModel::load(&dir).unwrap().head.bias(), 1.0);
    let err = RewardModel::load(Path::new(GPT2)).err().unwrap();
    assert!(err.to_string().contains(HEAD_FILE), "{err}");
    let foreign = dir.with_file_name("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "keep").unwrap();
    assert!(rm.save(&foreign, &model.config, None).is_err());
    assert!(foreign.join("notes.txt").is_file());
    let _ = std::fs::remove_dir_all(dir.parent().unwrap());
}

/// Named tensors of a reward model as bits, trunk then head.
fn bits(rm: &RewardModel) -> Vec<(String, Vec<u32>)> {
    use engine::ParamSet;
    let mut out: Vec<(String, Vec<u32>)> =
        rm.params.named().into_iter().map(|(n, t)| (n, t.data.iter().map(|x| x.to_bits()).collect())).collect();
    out.extend(rm.head.named().into_iter().map(|(n, t)| (n, t.data.iter().map(|x| x.to_bits()).collect())));
    out
}

#[test]
fn an_interrupted_run_resumes_bit_identical_to_an_uninterrupted_one() {
    use crate::train::{OnNonFinite, RunDir, StartMode};
    use std::sync::atomic::{AtomicBool, Ordering};

    let model = hf::load_model(Path::new(GPT2)).unwrap();
    let data = separable(10, 5);
    // 10 rows in batches of 4, shuffled: the stop after step 5 falls inside the second epoch.
    let rc = RmTrainConfig { lr: 1e-3, batch_size: 4, max_steps: Some(8), ..Default::default() };
    let root = std::env::temp_dir().join(format!("dpo-rm-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let source = Path::new(GPT2);
    let go = |path: &Path, mode: StartMode, start: RmStart, stop: &AtomicBool, stop_after: Option<u64>| {
        let mut dir = RunDir::open(path, mode, &mut |_| {}).unwrap();
        let run = RmRun {
            dir: Some(&mut dir),
            model_cfg: &model.config,
            source,
            save_every: 3,
            on_nonfinite: OnNonFinite::Stop,
            stop,
            report_to: Default::default(),
        };
        let mut taken = 0;
        run_reward_model(start, &data, &[], &rc, Some(run), &mut |_| {
            taken += 1;
            if Some(taken) == stop_after {
                stop.store(true, Ordering::SeqCst);
            }
        })
        .unwrap()
    };
    let fresh = || RmStart::fresh(&model.config.decoder, model.params.clone(), &rc);

    let whole_dir = root.join("whole");
    let whole = go(&whole_dir, StartMode::Fresh, fresh(), &AtomicBool::new(false), None);
    assert!(!whole.interrupted);
    assert_eq!((whole.steps, whole.stats.len()), (8, 8));

    let run_dir = root.join("run");
    let first = go(&run_dir, StartMode::Fresh, fresh(), &AtomicBool::new(false), Some(5));
    assert!(first.interrupted);
    assert_eq!((first.steps, first.stats.len()), (5, 5));
    let ckpt = run_dir.join("checkpoints/step-5");
    assert_eq!(first.checkpoint.as_deref(), Some(ckpt.as_path()));
    assert!(ckpt.join(crate::train::checkpoint::HEAD_FILE).is_file());
    assert!(run_dir.join("checkpoints/step-3").is_dir(), "--save-every 3");

    let (start, _) = RmStart::resume(&run_dir, &rc).unwrap();
    assert_eq!(start.state.step, 5);
    assert_eq!((start.state.epoch, start.state.cursor), (1, 8));
    let second = go(&run_dir, StartMode::Resume, start, &AtomicBool::new(false), None);
    assert!(!second.interrupted);
    assert_eq!((second.steps, second.stats.len()), (8, 3));

    assert!(bits(&second.rm) == bits(&whole.rm), "resumed weights or head differ from the uninterrupted run");
    assert_ne!(whole.rm.head, RewardModel::new(&model.config.decoder, model.params.clone(), 0.02, 42).head);
    let losses = |s: &[RmStepStats]| s.iter().map(|x| x.loss.to_bits()).collect::<Vec<_>>();
    let resumed: Vec<RmStepStats> = first.stats.iter().chain(&second.stats).cloned().collect();
    assert_eq!(losses(&resumed), losses(&whole.stats));
    let metrics = |d: &Path| std::fs::read_to_string(d.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics(&run_dir), metrics(&whole_dir), "metrics.jsonl of the resumed run");
    let _ = std::fs::remove_dir_all(&root);
}
