//! Iterative DPO (Xu et al. 2023 "Some things are more CRINGE than others"; Llama 3's rounds; Snorkel):
//! rounds of sample, label, train. Round `k` samples `samples` completions of every prompt from the
//! policy round `k - 1` ended with (round 1: the starting model), labels each prompt's best and worst by
//! the judge ([`label_pairs`], as online DPO does), writes them as a preference file, and trains an
//! ordinary DPO run ([`train`], the one loop) on it. The reference stays the starting model, or moves to
//! each round's starting policy (`move_reference`).
//!
//! ```text
//! OUTPUT/round-1/pairs.jsonl   the round's labelled samples (prompt_ids, chosen_ids, rejected_ids, scores)
//! OUTPUT/round-1/run/          the round's DPO run (config.toml, metrics.jsonl, checkpoints/, final/)
//! OUTPUT/round-2/...
//! ```
//!
//! Resuming: a round whose run has `final/` is done and skipped; a round with its pairs but no final
//! model continues its run from its newest checkpoint (or starts it again when it has none). Every
//! round's samples draw from the seed and the round number only, so a resumed or extended run matches an
//! uninterrupted one. `OUTPUT/iterate.json` records the settings every round shares (the DPO run's, the
//! sampling's, the judge's name and a hash of the prompts; not the number of rounds): a resume or an
//! extension with other settings is refused, since its rounds would belong to neither run.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use engine::generate::{generate, SamplingConfig};
use engine::model::Model;
use engine::rng::Rng;
use engine::Decoder;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::online::{label_pairs, JudgeFn, OnlineSampling};
use super::{checkpoint, train, RunOptions, TrainConfig, TrainError};

/// What the rounds do beyond each round's DPO run (`base`'s settings).
#[derive(Clone, Debug)]
pub struct IterativeConfig {
    pub rounds: usize,
    /// The reference of round `k` is the policy round `k` starts from, instead of the starting model.
    pub move_reference: bool,
    pub sampling: OnlineSampling,
    /// What labels the pairs (a reward model's directory, say), recorded in `iterate.json`: a resume
    /// with another judge is refused.
    pub judge: String,
}

/// The final model of every round, in order.
#[derive(Clone, Debug, Default)]
pub struct IterativeOutcome {
    pub finals: Vec<PathBuf>,
    pub interrupted: bool,
}

pub fn round_dir(output: &Path, round: usize) -> PathBuf {
    output.join(format!("round-{round}"))
}

/// Runs (or resumes) `it.rounds` rounds into `base.output`, each a DPO run with `base`'s settings.
pub fn iterate(
    base: &TrainConfig,
    it: &IterativeConfig,
    prompts: &[Vec<u32>],
    judge: &JudgeFn,
    stop: &AtomicBool,
    log: &mut dyn FnMut(&str),
) -> Result<IterativeOutcome, TrainError> {
    if it.sampling.samples < 2 {
        return Err(TrainError::Invalid(format!(
            "iterative DPO needs at least 2 samples per prompt, got {}",
            it.sampling.samples
        )));
    }
    if prompts.is_empty() {
        return Err(TrainError::Invalid("iterative DPO needs at least one prompt".into()));
    }
    // Every round's settings are checked before the first round samples or writes anything.
    it.sampling.check()?;
    base.validate()?;
    let io = |path: &Path, e: std::io::Error| TrainError::Output { path: path.to_path_buf(), msg: e.to_string() };
    check_settings(&base.output, &settings(base, it, prompts))?;
    let start_ref = base.ref_model.clone().unwrap_or_else(|| base.model.clone());
    let mut policy = base.model.clone();
    let mut out = IterativeOutcome::default();
    for round in 1..=it.rounds {
        let dir = round_dir(&base.output, round);
        let run = dir.join("run");
        let final_dir = run.join("final");
        let cfg = TrainConfig {
            model: policy.clone(),
            ref_model: Some(if it.move_reference { policy.clone() } else { start_ref.clone() }),
            data: dir.join("pairs.jsonl"),
            output: run.clone(),
            // Kept below 2^63: config.toml stores the seed as a TOML integer (an i64).
            seed: base.seed.wrapping_add(7919 * round as u64) & (i64::MAX as u64),
            ..base.clone()
        };
        if final_dir.join("config.json").is_file() {
            log(&format!("round {round}/{}: done ({}), skipped", it.rounds, final_dir.display()));
        } else {
            if !cfg.data.is_file() {
                std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
                let text = sample_round(&policy, it, prompts, judge, cfg.seed, cfg.precision)?;
                crate::io::write_atomic(&cfg.data, text.as_bytes()).map_err(|e| io(&cfg.data, e))?;
                log(&format!("round {round}/{}: {} pairs sampled from {}", it.rounds, prompts.len(), policy.display()));
            }
            let resume = checkpoint::list(&run).pop().map(|_| run.clone());
            let opts = RunOptions { overwrite: resume.is_none(), resume };
            let o = train(&cfg, &opts, stop, log)?;
            if o.interrupted {
                out.interrupted = true;
                return Ok(out);
            }
        }
        out.finals.push(final_dir.clone());
        policy = final_dir;
    }
    Ok(out)
}

/// What every round of a run shares, as `iterate.json` holds it: one flat object.
fn settings(base: &TrainConfig, it: &IterativeConfig, prompts: &[Vec<u32>]) -> Value {
    let mut v = sampled_run_settings(base, &it.sampling, &it.judge, prompts);
    if let Some(o) = v.as_object_mut() {
        o.insert("move_reference".into(), json!(it.move_reference));
    }
    v
}

/// The settings that decide the numbers of a run that samples its pairs (online or iterative DPO): the
/// training configuration's (less where it writes and how often it logs), the sampling, the judge and a
/// hash of the prompts; one flat object.
pub(super) fn sampled_run_settings(
    base: &TrainConfig,
    s: &super::online::OnlineSampling,
    judge: &str,
    prompts: &[Vec<u32>],
) -> Value {
    let mut v = serde_json::to_value(base.to_raw()).expect("the configuration serialises");
    let o = v.as_object_mut().expect("a table");
    // The data is the round's own; the rest that does not change the numbers as a resume leaves it out.
    o.retain(|k, val| k != "data" && !super::resume::TRAJECTORY_FREE.contains(&k.as_str()) && !val.is_null());
    let mut h = Sha256::new();
    for p in prompts {
        h.update((p.len() as u64).to_le_bytes());
        p.iter().for_each(|t| h.update(t.to_le_bytes()));
    }
    let hash: String = h.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect();
    for (k, val) in [
        ("samples", json!(s.samples)),
        ("max_new_tokens", json!(s.max_new_tokens)),
        ("temperature", json!(s.temperature)),
        ("eos_ids", json!(s.eos_ids)),
        ("missing_eos_penalty", json!(s.missing_eos_penalty)),
        ("judge", json!(judge)),
        ("prompts", json!(format!("{} prompts, sha256 {hash}", prompts.len()))),
    ] {
        o.insert(k.into(), val);
    }
    v
}

/// Refuses `now` when `OUTPUT/iterate.json` holds other settings, naming each that changed; writes it
/// when absent (a run from before the file existed is not checked, only recorded).
fn check_settings(output: &Path, now: &Value) -> Result<(), TrainError> {
    check_recorded(
        &output.join("iterate.json"),
        now,
        "its rounds were run with other settings",
        "resume or extend it with the same settings (only --rounds may change)",
        &[],
    )
}

/// Refuses `now` when `file` records other settings, naming each that changed (`what`, then `how` to go
/// on), but the keys `free` (which records written before they were left out may hold); writes `file`
/// when absent.
pub(super) fn check_recorded(file: &Path, now: &Value, what: &str, how: &str, free: &[&str]) -> Result<(), TrainError> {
    let output = file.parent().unwrap_or(Path::new("."));
    let out_err = |msg: String| TrainError::Output { path: file.to_path_buf(), msg };
    let Ok(text) = std::fs::read_to_string(file) else {
        std::fs::create_dir_all(output).map_err(|e| out_err(e.to_string()))?;
        let text = serde_json::to_string_pretty(now).expect("settings serialise");
        return crate::io::write_atomic(file, text.as_bytes()).map_err(|e| out_err(e.to_string()));
    };
    let saved: Value = serde_json::from_str(&text).map_err(|e| out_err(format!("unreadable ({e})")))?;
    let (Some(was), Some(is)) = (saved.as_object(), now.as_object()) else {
        return Err(out_err("not a JSON object".into()));
    };
    let mut keys: Vec<&String> = was.keys().chain(is.keys()).collect();
    keys.sort();
    keys.dedup();
    let show = |v: Option<&Value>| v.map(|v| v.to_string()).unwrap_or_else(|| "unset".into());
    let changed: Vec<String> = keys
        .into_iter()
        .filter(|k| !free.contains(&k.as_str()) && was.get(*k) != is.get(*k))
        .map(|k| format!("{k}: was {}, now {}", show(was.get(k)), show(is.get(k))))
        .collect();
    if changed.is_empty() {
        return Ok(());
    }
    Err(TrainError::Invalid(format!(
        "{}: {what} ({}); {how}, or write the new run to another output",
        output.display(),
        changed.join("; ")
    )))
}

/// Samples the round's completions from `policy`, labels them, and returns the preference file's text.
fn sample_round(
    policy: &Path,
    it: &IterativeConfig,
    prompts: &[Vec<u32>],
    judge: &JudgeFn,
    seed: u64,
    precision: engine::kernels::Precision,
) -> Result<String, TrainError> {
    let model = hf::load_model(policy)?;
    let decoder = Decoder::new(model.config.decoder.clone());
    let s = &it.sampling;
    let cfg = SamplingConfig {
        temperature: s.temperature,
        max_new_tokens: s.max_new_tokens,
        eos_ids: s.eos_ids.clone(),
        ..Default::default()
    };
    let view = Model::new(&model.params, None).with_precision(precision);
    let gens = generate(&decoder, view, prompts, s.samples, &cfg, &mut Rng::new(seed ^ 0x17E4))?;
    let items: Vec<(&[u32], &[u32])> = gens.iter().map(|g| (&prompts[g.prompt_index][..], &g.tokens[..])).collect();
    let judged = judge(&items).map_err(|e| TrainError::Invalid(format!("the judge: {e}")))?;
    if judged.len() != items.len() || judged.iter().any(|v| v.is_nan()) {
        return Err(TrainError::Invalid(format!(
            "the judge returned {} scores for {} completions (or NaN)",
            judged.len(),
            items.len()
        )));
    }
    let refs: Vec<&[u32]> = prompts.iter().map(|p| &p[..]).collect();
    let (pairs, scores) = label_pairs(&refs, &gens, &judged, s.samples, s.missing_eos_penalty);
    let mut text = String::new();
    for (p, group) in pairs.iter().zip(scores.chunks_exact(s.samples)) {
        let row = json!({
            "prompt_ids": p.prompt_ids,
            "chosen_ids": p.chosen_ids,
            "rejected_ids": p.rejected_ids,
            "scores": group,
        });
        text += &row.to_string();
        text.push('\n');
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::objectives::{LossConfig, LossType};
    use crate::train::{Objective, PairObjective};

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parity/models").join(name)
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dpo-iterative-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn weights(dir: &Path) -> Vec<u8> {
        std::fs::read(dir.join("model.safetensors")).unwrap()
    }

    fn judge(items: &[(&[u32], &[u32])]) -> Result<Vec<f64>, String> {
        Ok(items.iter().map(|(_, c)| c.iter().map(|&t| (t % 7) as f64).sum()).collect())
    }

    fn base(out: &Path) -> TrainConfig {
        TrainConfig {
            model: fixture("gpt2-policy"),
            output: out.to_path_buf(),
            lr: 1e-3,
            batch_size: 2,
            max_steps: Some(2),
            save_every: 1,
            log_every: 0,
            objective: Objective::Pairs(PairObjective {
                losses: vec![(LossType::Sigmoid, 1.0)],
                cfg: LossConfig { beta: 0.1, ..Default::default() },
            }),
            ..Default::default()
        }
    }

    fn it(rounds: usize) -> IterativeConfig {
        IterativeConfig {
            rounds,
            move_reference: true,
            sampling: OnlineSampling {
                samples: 2,
                max_new_tokens: 5,
                temperature: 1.0,
                eos_ids: vec![0],
                missing_eos_penalty: None,
            },
            judge: "token ids mod 7".into(),
        }
    }

    fn prompts() -> Vec<Vec<u32>> {
        vec![vec![10, 11, 12], vec![20, 21], vec![30, 31, 32, 33]]
    }

    /// A finished round is not run again with other settings: another beta, sample count, judge or prompt
    /// set is refused with each change named; the same settings with more rounds extend the run.
    #[test]
    fn resume_refuses_changed_settings() {
        let stop = AtomicBool::new(false);
        let out = scratch("changed");
        iterate(&base(&out), &it(1), &prompts(), &judge, &stop, &mut |_| {}).unwrap();
        let recorded = std::fs::read_to_string(out.join("iterate.json")).unwrap();
        assert!(
            recorded.contains("\"beta\": 0.1") && recorded.contains("\"judge\": \"token ids mod 7\""),
            "{recorded}"
        );

        let mut beta = base(&out);
        if let Objective::Pairs(p) = &mut beta.objective {
            p.cfg.beta = 0.2;
        }
        let e = iterate(&beta, &it(2), &prompts(), &judge, &stop, &mut |_| {}).unwrap_err().to_string();
        assert!(e.contains("its rounds were run with other settings (beta: was 0.1, now 0.2)"), "{e}");
        let mut three = it(2);
        three.sampling.samples = 3;
        three.judge = "another".into();
        let e = iterate(&base(&out), &three, &prompts(), &judge, &stop, &mut |_| {}).unwrap_err().to_string();
        assert!(e.contains("judge: was \"token ids mod 7\", now \"another\"; samples: was 2, now 3"), "{e}");
        let e = iterate(&base(&out), &it(2), &prompts()[..2], &judge, &stop, &mut |_| {}).unwrap_err().to_string();
        assert!(e.contains("prompts: was \"3 prompts, sha256"), "{e}");
        // Where it logs does not matter.
        let o = iterate(&TrainConfig { log_every: 1, ..base(&out) }, &it(2), &prompts(), &judge, &stop, &mut |_| {})
            .unwrap();
        assert_eq!(o.finals.len(), 2);
        let _ = std::fs::remove_dir_all(out);
    }

    /// Two rounds in one go, and the same two rounds as one round then an extension to two (round 1
    /// skipped, its pairs untouched), and with round 2's final model lost after a checkpoint (resumed
    /// from it): the same weights, bit for bit.
    #[test]
    fn rounds_resume() {
        let prompts = prompts();
        let stop = AtomicBool::new(false);
        let lines = std::cell::RefCell::new(Vec::<String>::new());
        let mut log = |l: &str| lines.borrow_mut().push(l.to_string());

        let whole = scratch("whole");
        let o = iterate(&base(&whole), &it(2), &prompts, &judge, &stop, &mut log).unwrap();
        assert_eq!(o.finals.len(), 2);
        let want = weights(&o.finals[1]);

        let ext = scratch("extended");
        iterate(&base(&ext), &it(1), &prompts, &judge, &stop, &mut log).unwrap();
        let pairs1 = std::fs::read(round_dir(&ext, 1).join("pairs.jsonl")).unwrap();
        let o = iterate(&base(&ext), &it(2), &prompts, &judge, &stop, &mut log).unwrap();
        assert!(lines.borrow().iter().any(|l| l.starts_with("round 1/2: done")), "{lines:?}");
        assert_eq!(std::fs::read(round_dir(&ext, 1).join("pairs.jsonl")).unwrap(), pairs1);
        assert_eq!(weights(&o.finals[1]), want, "extending one round to two changed round 2");

        // Round 2 interrupted after its first step: its final model and last checkpoint gone.
        let run2 = round_dir(&ext, 2).join("run");
        std::fs::remove_dir_all(run2.join("final")).unwrap();
        let newest = checkpoint::list(&run2).pop().unwrap().1;
        std::fs::remove_dir_all(&newest).unwrap();
        assert!(!checkpoint::list(&run2).is_empty(), "a checkpoint of step 1 remains");
        let o = iterate(&base(&ext), &it(2), &prompts, &judge, &stop, &mut log).unwrap();
        assert_eq!(weights(&o.finals[1]), want, "resuming round 2 from its checkpoint changed it");
        // The rounds' pairs are labelled best over worst.
        let text = std::fs::read_to_string(round_dir(&whole, 2).join("pairs.jsonl")).unwrap();
        for row in text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()) {
            let s: Vec<f64> = row["scores"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            let chosen: Vec<u32> = serde_json::from_value(row["chosen_ids"].clone()).unwrap();
            let c: f64 = chosen.iter().map(|&t| (t % 7) as f64).sum();
            assert_eq!(c, s.iter().copied().fold(f64::NEG_INFINITY, f64::max));
        }
        for d in [whole, ext] {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}
