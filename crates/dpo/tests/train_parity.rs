//! `dpo train` against TRL's DPOTrainer on the parity fixtures (`expected/<arch>/train.jsonl` and
//! `trained/`), and the trainer's invariants: accumulation, a frozen reference, exact resumption.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use dpo::data::{load_pairs, DataOptions, Packing};
use dpo::objectives::KtoConfig;
use dpo::train::reference::ReferenceModel;
use dpo::train::{pair_batch, train, Objective, PairObjective, Reference, RunOptions, TrainConfig, Workspace};
use engine::kernels::Precision;
use engine::optim::{Optimizer, OptimizerConfig};
use engine::{Decoder, Params};

use common::{flat, jsonl, params_of, run, scratch, trl_errors, PARITY};

const ARCHS: [&str; 4] = ["gpt2", "llama", "llama3", "neox"];

fn fixtures() -> std::path::PathBuf {
    PARITY.root()
}

fn trl_settings(arch: &str, output: std::path::PathBuf) -> TrainConfig {
    common::trl_settings(PARITY, arch, output)
}

/// Every speed technique on (prefix sharing is the default; `micro_pairs = 1` pushes the step's pairs
/// through the model one at a time) and off: both runs match TRL.
#[test]
fn six_steps_match_trl() {
    for (arch, micro_pairs) in ARCHS.iter().flat_map(|&a| [(a, 0), (a, 1)]) {
        let out = scratch(&format!("trl-{arch}-{micro_pairs}"));
        let mut cfg = trl_settings(arch, out.clone());
        cfg.micro_pairs = micro_pairs;
        run(&cfg);
        let (worst, rel) = trl_errors(PARITY, arch, &out);
        assert!(worst.0 < 1e-3, "{arch}: {}", worst.1);
        println!(
            "{arch} (micro_pairs {micro_pairs}): worst metric error {:.2e} ({}); weight change relative error {rel:.2e}",
            worst.0, worst.1
        );
        assert!(rel < 1e-2, "{arch}: weight change differs from TRL's by {rel}");
        std::fs::remove_dir_all(&out).unwrap();
    }
}

/// One step of 8 pairs equals one step of 8 accumulated micro-batches of 1 pair, and one step of 8 pairs
/// pushed through the model 3 at a time (`micro_pairs`).
#[test]
fn accumulation_is_invariant() {
    let mut ca = trl_settings("llama", scratch("accum-a"));
    ca.batch_size = 8;
    ca.max_steps = Some(1);
    let mut cb = ca.clone();
    cb.output = scratch("accum-b");
    cb.batch_size = 1;
    cb.grad_accum = 8;
    let mut cc = ca.clone();
    cc.output = scratch("accum-c");
    cc.micro_pairs = 3;
    same_step(&ca, &cb);
    same_step(&ca, &cc);
}

fn same_step(ca: &TrainConfig, cb: &TrainConfig) {
    let (a, b) = (ca.output.clone(), cb.output.clone());
    run(ca);
    run(cb);
    let (ma, mb) = (jsonl(&a.join("metrics.jsonl")), jsonl(&b.join("metrics.jsonl")));
    for key in ["loss", "grad_norm", "rewards/margins"] {
        let (x, y) = (ma[0][key].as_f64().unwrap(), mb[0][key].as_f64().unwrap());
        assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "{key}: {x} vs {y}");
    }
    let start = flat(&params_of(&fixtures().join("models/llama-policy")));
    let (pa, pb) = (flat(&params_of(&a.join("final"))), flat(&params_of(&b.join("final"))));
    let (mut diff, mut norm) = (0.0, 0.0);
    for i in 0..start.len() {
        diff += ((pa[i] - start[i]) - (pb[i] - start[i])).powi(2);
        norm += (pa[i] - start[i]).powi(2);
    }
    assert!((diff / norm).sqrt() < 1e-4, "weight updates differ: {}", (diff / norm).sqrt());
    for d in [a, b] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

/// Pushing a batch's pairs through the model one or three at a time (`micro_pairs`) accumulates the same
/// gradient bits as the whole batch at once, on every architecture: every reduction over tokens in the
/// engine is one chain in token order (on CPUs with AVX-512, where the engine's own GEMM runs; the
/// fallback GEMM is held to 1e-6).
#[test]
fn micro_pairs_change_no_bit_of_the_gradient() {
    let exact =
        std::arch::is_x86_feature_detected!("avx512f") && std::env::var("DPO_GEMM").map_or(true, |v| v != "portable");
    for arch in ARCHS {
        let dir = fixtures().join(format!("models/{arch}-policy"));
        let m = hf::load_model(&dir).unwrap();
        let tok = hf::load_tokenizer(&dir).unwrap();
        let ex =
            load_pairs(&fixtures().join("data/prefs.jsonl"), Some(&tok), &DataOptions::default()).unwrap().examples;
        let decoder = Decoder::new(m.config.decoder.clone());
        let reference = Reference::Model(Arc::new(
            ReferenceModel::new(Decoder::new(m.config.decoder.clone()), m.params.clone(), Precision::F32).unwrap(),
        ));
        let objective = PairObjective { losses: vec![("sigmoid".parse().unwrap(), 1.0)], cfg: Default::default() };
        let rows: Vec<usize> = (0..8).collect();
        let grads = |micro_pairs: usize| {
            let mut g = Params::zeros(&decoder.cfg);
            let mut ws = Workspace::default();
            let out = pair_batch(
                &decoder,
                &m.params,
                Some((&mut g, 1.0)),
                &reference,
                &objective,
                &ex,
                &rows,
                Packing::SharedPrompt,
                micro_pairs,
                &mut ws,
            )
            .unwrap();
            (g, out.metrics)
        };
        let (whole, metrics) = grads(0);
        for micro_pairs in [1, 3] {
            let (g, mt) = grads(micro_pairs);
            assert_eq!(mt, metrics, "{arch}: metrics with micro_pairs {micro_pairs}");
            for ((name, a), (_, b)) in whole.named().into_iter().zip(g.named()) {
                let worst =
                    a.data.iter().zip(&b.data).map(|(x, y)| (x - y).abs() / x.abs().max(1e-3)).fold(0.0, f32::max);
                if exact {
                    assert!(a.data == b.data, "{arch} {name}: micro_pairs {micro_pairs} differs by {worst:e}");
                } else {
                    assert!(worst < 1e-6, "{arch} {name}: micro_pairs {micro_pairs} differs by {worst:e}");
                }
            }
        }
    }
}

/// The default reference (a copy of the starting weights) is bit-identical after the policy trained.
#[test]
fn reference_stays_frozen() {
    let dir = fixtures().join("models/gpt2-policy");
    let m = hf::load_model(&dir).unwrap();
    let tok = hf::load_tokenizer(&dir).unwrap();
    let ex = load_pairs(&fixtures().join("data/prefs.jsonl"), Some(&tok), &DataOptions::default()).unwrap().examples;
    let decoder = Decoder::new(m.config.decoder.clone());
    let pristine = m.params.clone();
    let reference = Reference::Model(Arc::new(
        ReferenceModel::new(Decoder::new(m.config.decoder.clone()), m.params.clone(), Precision::F32).unwrap(),
    ));
    let objective = PairObjective { losses: vec![("sigmoid".parse().unwrap(), 1.0)], cfg: Default::default() };
    let mut params = m.params.clone();
    let mut opt =
        Optimizer::new(OptimizerConfig::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }, &params);
    let mut ws = Workspace::default();
    for step in 0..3 {
        let mut grads = Params::zeros(&decoder.cfg);
        let rows: Vec<usize> = (step * 4..step * 4 + 4).collect();
        pair_batch(
            &decoder,
            &params,
            Some((&mut grads, 1.0)),
            &reference,
            &objective,
            &ex,
            &rows,
            Packing::SharedPrompt,
            0,
            &mut ws,
        )
        .unwrap();
        opt.step(&mut params, &grads, 1e-2);
    }
    assert_ne!(params, pristine, "the policy trained");
    let Reference::Model(r) = &reference else { unreachable!() };
    assert!(r.params == pristine, "the reference changed");
}

/// A run interrupted after a checkpoint and resumed ends bit-identical to an uninterrupted run.
#[test]
fn resume_is_exact() {
    let (a, b) = (scratch("resume-a"), scratch("resume-b"));
    let mut ca = trl_settings("neox", a.clone());
    ca.no_shuffle = false; // the shuffled order must survive the interruption too
    ca.batch_size = 3;
    ca.grad_accum = 2;
    ca.max_steps = Some(6);
    ca.save_every = 2;
    ca.ref_model = None;
    run(&ca);

    let mut cb = ca.clone();
    cb.output = b.clone();
    cb.log_every = 1; // the step lines are what the interruption below listens for
    let stop = AtomicBool::new(false);
    let first = train(&cb, &RunOptions::default(), &stop, &mut |line| {
        if line.starts_with("step 3/") {
            stop.store(true, Ordering::SeqCst);
        }
    })
    .unwrap();
    assert!(first.interrupted && first.steps == 3, "{first:?}");
    let resumed =
        train(&cb, &RunOptions { resume: Some(b.clone()), overwrite: false }, &AtomicBool::new(false), &mut |_| {})
            .unwrap();
    assert_eq!(resumed.steps, 6);
    assert!(params_of(&a.join("final")) == params_of(&b.join("final")), "resumed weights differ");
    let (ma, mb) = (jsonl(&a.join("metrics.jsonl")), jsonl(&b.join("metrics.jsonl")));
    assert_eq!(ma.len(), mb.len());
    for (x, y) in ma.iter().zip(&mb) {
        assert_eq!(x["loss"], y["loss"]);
    }
    for d in [a, b] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

fn losses(out: &Path) -> Vec<f64> {
    jsonl(&out.join("metrics.jsonl")).iter().map(|m| m["loss"].as_f64().unwrap()).collect()
}

/// KTO trains on unpaired rows (here the fixture's pairs split into desirable and undesirable rows):
/// the loss falls and the KL reference point is reported.
#[test]
fn kto_trains_on_unpaired_rows() {
    let out = scratch("kto");
    let mut c = trl_settings("llama", out.clone());
    c.objective = Objective::Kto(KtoConfig { beta: 0.1, ..Default::default() });
    c.ref_model = None;
    c.max_steps = Some(12);
    run(&c);
    let l = losses(&out);
    assert!(l.iter().all(|x| x.is_finite()));
    assert!(l[l.len() - 1] < 0.6 * l[0], "KTO loss did not fall: {l:?}");
    assert!(jsonl(&out.join("metrics.jsonl"))[0]["kl"].is_number());
    std::fs::remove_dir_all(&out).unwrap();
}

/// SFT on the chosen side of preference rows (preferred-FT) lowers the completion NLL.
#[test]
fn sft_lowers_the_completion_nll() {
    let out = scratch("sft");
    let mut c = trl_settings("gpt2", out.clone());
    c.ref_model = None;
    c.lr = 1e-2;
    c.max_steps = Some(12);
    dpo::train::train_sft(&c, &RunOptions::default(), &AtomicBool::new(false), &mut |_| {}).unwrap();
    let l = losses(&out);
    assert!(l[l.len() - 1] < 0.7 * l[0], "SFT loss did not fall: {l:?}");
    assert!(out.join("final/model.safetensors").is_file());
    std::fs::remove_dir_all(&out).unwrap();
}

/// `--precompute-ref` gives the same run as a reference model in memory, and a second run reads the cache.
#[test]
fn precomputed_reference_matches_and_is_cached() {
    let (a, b, cache) = (scratch("preref-a"), scratch("preref-b"), scratch("preref-cache"));
    let ca = trl_settings("gpt2", a.clone());
    let mut cb = ca.clone();
    cb.output = b.clone();
    cb.precompute_ref = true;
    cb.cache_dir = Some(cache.clone());
    run(&ca);
    let mut lines = Vec::new();
    train(&cb, &RunOptions::default(), &AtomicBool::new(false), &mut |l| lines.push(l.to_string())).unwrap();
    assert!(lines.iter().any(|l| l.contains("computed and cached")), "{lines:?}");
    let (ma, mb) = (jsonl(&a.join("metrics.jsonl")), jsonl(&b.join("metrics.jsonl")));
    for (x, y) in ma.iter().zip(&mb) {
        for key in ["loss", "rewards/margins", "grad_norm"] {
            let (p, q) = (x[key].as_f64().unwrap(), y[key].as_f64().unwrap());
            assert!((p - q).abs() <= 1e-5 * p.abs().max(1.0), "{key}: {p} vs {q}");
        }
    }
    let mut again = Vec::new();
    train(&cb, &RunOptions { resume: None, overwrite: true }, &AtomicBool::new(false), &mut |l| {
        again.push(l.to_string())
    })
    .unwrap();
    assert!(again.iter().any(|l| l.contains("read from cache")), "{again:?}");
    for d in [a, b, cache] {
        std::fs::remove_dir_all(d).unwrap();
    }
}
