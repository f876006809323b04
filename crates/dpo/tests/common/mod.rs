//! Helpers shared by the parity test files: the fixture sets (`tests/fixtures/parity`, `tests/fixtures/more`),
//! transformers' expected log-probs, scoring a model directory, and a 6-step run compared with TRL's.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use dpo::data::{load_pairs, DataOptions, Example, Packing};
use dpo::objectives::{LossConfig, LossType};
use dpo::scoring::{score_pairs, PairScore};
use dpo::train::{train, Objective, PairObjective, RunOptions, TrainConfig};
use engine::optim::ScheduleKind;
use engine::{Decoder, Params};

/// A fixture set: `models/<arch>-{policy,ref}`, `data/`, `expected/<arch>/`.
#[derive(Clone, Copy)]
pub struct Fixtures(pub &'static str);

/// The first four families (`tests/fixtures/parity`).
pub const PARITY: Fixtures = Fixtures("parity");
/// The five families added with the naming table (`tests/fixtures/more`).
pub const MORE: Fixtures = Fixtures("more");

impl Fixtures {
    pub fn root(self) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(self.0)
    }

    pub fn path(self, rel: &str) -> PathBuf {
        self.root().join(rel)
    }

    pub fn model(self, arch: &str, variant: &str) -> PathBuf {
        self.path(&format!("models/{arch}-{variant}"))
    }

    /// The rows of `data/<file>`, tokenized with the tokenizer of `model_dir`.
    pub fn examples(self, file: &str, model_dir: &Path) -> Vec<Example> {
        let tok = hf::load_tokenizer(model_dir).unwrap();
        let loaded = load_pairs(&self.path("data").join(file), Some(&tok), &DataOptions::default()).unwrap();
        assert_eq!(loaded.stats.prompt_not_prefix, 0);
        loaded.examples
    }

    pub fn expected_logps(self, arch: &str) -> Vec<Expected> {
        jsonl(&self.path(&format!("expected/{arch}/logps.jsonl")))
            .iter()
            .map(|v| {
                let f = |k: &str| v[k].as_f64().unwrap();
                Expected {
                    policy_chosen: f("policy_chosen_logps"),
                    policy_rejected: f("policy_rejected_logps"),
                    ref_chosen: f("ref_chosen_logps"),
                    ref_rejected: f("ref_rejected_logps"),
                    chosen_len: v["chosen_len"].as_u64().unwrap() as usize,
                    rejected_len: v["rejected_len"].as_u64().unwrap() as usize,
                }
            })
            .collect()
    }
}

/// transformers' summed completion log-probs of one row.
pub struct Expected {
    pub policy_chosen: f64,
    pub policy_rejected: f64,
    pub ref_chosen: f64,
    pub ref_rejected: f64,
    pub chosen_len: usize,
    pub rejected_len: usize,
}

pub fn load(dir: &Path) -> (Decoder, Params, hf::HfModel) {
    let m = hf::load_model(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    (Decoder::new(m.config.decoder.clone()), m.params.clone(), m)
}

pub fn score(dir: &Path, ex: &[Example], packing: Packing) -> Vec<PairScore> {
    let (model, params, _) = load(dir);
    score_pairs(&model, &params, ex, packing, 5, |_| {}).unwrap()
}

/// Largest absolute difference between the engine's and transformers' sequence log-probs.
pub fn max_logp_error(got: &[PairScore], want: &[Expected], policy: bool) -> f64 {
    assert_eq!(got.len(), want.len());
    let mut worst = 0.0f64;
    for (g, w) in got.iter().zip(want) {
        let (c, r) = if policy { (w.policy_chosen, w.policy_rejected) } else { (w.ref_chosen, w.ref_rejected) };
        assert_eq!((g.chosen_len, g.rejected_len), (w.chosen_len, w.rejected_len));
        worst = worst.max((g.chosen_logps - c).abs()).max((g.rejected_logps - r).abs());
    }
    worst
}

pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dpo-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// The settings of MANIFEST.json's TRL run: sigmoid loss, 6 steps of 4 rows in file order, AdamW lr 5e-3
/// constant, max_grad_norm 1, beta 0.1, no truncation.
pub fn trl_settings(fx: Fixtures, arch: &str, output: PathBuf) -> TrainConfig {
    TrainConfig {
        model: fx.model(arch, "policy"),
        ref_model: Some(fx.model(arch, "ref")),
        data: fx.path("data/prefs.jsonl"),
        output,
        objective: Objective::Pairs(PairObjective {
            losses: vec![(LossType::Sigmoid, 1.0)],
            cfg: LossConfig { beta: 0.1, ..Default::default() },
        }),
        lr: 5e-3,
        batch_size: 4,
        grad_accum: 1,
        max_steps: Some(6),
        no_shuffle: true,
        scheduler: ScheduleKind::Constant,
        warmup_steps: 0,
        max_grad_norm: 1.0,
        weight_decay: 0.0,
        max_length: None,
        save_every: 0,
        log_every: 0,
        ..Default::default()
    }
}

pub fn run(cfg: &TrainConfig) {
    train(cfg, &RunOptions::default(), &AtomicBool::new(false), &mut |_| {}).unwrap();
}

pub fn jsonl(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

pub fn params_of(dir: &Path) -> Params {
    hf::load_model(dir).unwrap().params
}

pub fn flat(p: &Params) -> Vec<f64> {
    p.named().into_iter().flat_map(|(_, t)| t.data.iter().map(|&x| x as f64).collect::<Vec<_>>()).collect()
}

/// The metrics TRL logs per step, compared within 1e-3 of max(|TRL's value|, 1).
pub const TRL_METRICS: [&str; 8] = [
    "loss",
    "grad_norm",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
];

/// How far a finished run (`out`) is from TRL's (`expected/<arch>/`): the worst per-step metric error
/// (relative to max(|x|, 1), with where it occurred) and the relative error of the weight change over all
/// tensors together. Asserts the step count and token counts, which must match exactly.
pub fn trl_errors(fx: Fixtures, arch: &str, out: &Path) -> ((f64, String), f64) {
    let ours = jsonl(&out.join("metrics.jsonl"));
    let theirs = jsonl(&fx.path(&format!("expected/{arch}/train.jsonl")));
    assert_eq!(ours.len(), theirs.len(), "{arch}: steps");
    let mut worst = (0.0f64, String::new());
    for (o, t) in ours.iter().zip(&theirs) {
        for key in TRL_METRICS {
            let (a, b) = (o[key].as_f64().unwrap(), t[key].as_f64().unwrap());
            let err = (a - b).abs() / b.abs().max(1.0);
            let err = if err.is_nan() { f64::INFINITY } else { err };
            if err > worst.0 || worst.1.is_empty() {
                worst = (err, format!("step {} {key}: ours {a}, TRL {b}", t["step"]));
            }
        }
        assert_eq!(o["num_tokens"].as_f64(), t["num_tokens"].as_f64(), "{arch} num_tokens");
    }
    let start = flat(&params_of(&fx.model(arch, "policy")));
    let mine = flat(&params_of(&out.join("final")));
    let trl = flat(&params_of(&fx.path(&format!("expected/{arch}/trained"))));
    let (mut diff, mut norm) = (0.0, 0.0);
    for i in 0..start.len() {
        let (dm, dt) = (mine[i] - start[i], trl[i] - start[i]);
        diff += (dm - dt) * (dm - dt);
        norm += dt * dt;
    }
    (worst, (diff / norm).sqrt())
}

pub fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}
