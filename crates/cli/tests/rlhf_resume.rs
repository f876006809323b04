//! `dpo ppo --resume` and `dpo reward-model train --resume` follow `dpo train --resume`'s rule: a flag
//! given with --resume that changes the run's numbers is refused by name (`key: saved -> now`) before
//! anything is written; the run's length may grow; and a run of zero steps is refused by its flag.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// The files a refused resume must leave as they were.
fn snapshot(run: &Path) -> Vec<Vec<u8>> {
    ["config.toml", "metrics.jsonl", "final/model.safetensors"]
        .iter()
        .map(|f| std::fs::read(run.join(f)).unwrap_or_else(|e| panic!("{f}: {e}")))
        .collect()
}

fn prompts(dir: &Path) -> PathBuf {
    jsonl(&dir.join("prompts.jsonl"), &[serde_json::json!({"prompt": "Tell me about a kite."})])
}

fn ppo_resume(run: &Path, args: &[&str]) -> std::process::Command {
    let mut c = dpo();
    c.args(["ppo", "--resume"]).arg(run).args(args);
    c
}

#[test]
fn ppo_resume_refuses_changed_settings_by_name_and_extends_its_steps() {
    let dir = scratch("rlhf-resume-ppo");
    let rm = trained_reward_model(&dir);
    let prompts = prompts(&dir);
    let run = dir.join("ppo");
    succeeds(ppo(&rm, &prompts).args(["--steps", "2", "--save-every", "1", "--output"]).arg(&run));
    let before = snapshot(&run);

    let msg = fails(
        &mut ppo_resume(&run, &["--kl-coef", "0.5", "--lr", "1", "--steps", "10", "--seed", "7"]),
        &["cannot be resumed", "kl_coef: 0.05 -> 0.5", "lr: ", "-> 1.0", "seed: 42 -> 7", "nothing was written"],
    );
    // The length is not a change of the numbers.
    assert!(!msg.contains("steps:"), "{msg}");
    fails(&mut ppo_resume(&run, &["--precision", "bf16"]), &[r#"precision "f32" in the checkpoint, "bf16" now"#]);
    assert_eq!(snapshot(&run), before, "a refused resume wrote into the run");

    // The same values as the run's, a longer run and the settings that change nothing are taken.
    let err = succeeds(&mut ppo_resume(&run, &["--kl-coef", "0.05", "--steps", "3", "--save-every", "1"]));
    assert!(err.contains("resuming at step 2") && err.contains("done: 3 PPO steps"), "{err}");
    assert_eq!(lines(&run.join("metrics.jsonl")), 3);
    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(config.contains("steps = 3"), "{config}");
}

#[test]
fn reward_model_resume_refuses_changed_settings_by_name_and_extends_its_steps() {
    let dir = scratch("rlhf-resume-rm");
    let run = dir.join("rm");
    succeeds(&mut on_fixture(
        &["reward-model", "train", "--max-steps", "2", "--batch-size", "4", "--save-every", "1"],
        &run,
    ));
    let before = snapshot(&run);
    let resume = |args: &[&str]| {
        let mut c = dpo();
        c.args(["reward-model", "train", "--resume"]).arg(&run).args(args);
        c
    };

    let msg = fails(
        &mut resume(&["--max-steps", "6", "--lr", "0.5", "--no-shuffle", "--batch-size", "2"]),
        &[
            "cannot be resumed",
            "lr: 0.00001 -> 0.5",
            "shuffle: true -> false",
            "batch_size: 4 -> 2",
            "nothing was written",
        ],
    );
    assert!(!msg.contains("max_steps"), "{msg}");
    fails(&mut resume(&["--precision", "bf16"]), &["--precision bf16", "precision f32"]);
    assert_eq!(snapshot(&run), before, "a refused resume wrote into the run");

    let out = resume(&["--max-steps", "3", "--batch-size", "4", "--eval-every", "1"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("resuming at step 2") && err.contains("done: 3 steps"), "{err}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["steps"], 3);
    assert_eq!(lines(&run.join("metrics.jsonl")), 3);
}

#[test]
fn zero_step_runs_are_refused_by_their_flag() {
    let dir = scratch("rlhf-zero-steps");
    let prompts = prompts(&dir);
    let fixture = model("gpt2-policy");
    let run = dir.join("run");
    let mut c = ppo(&fixture, &prompts);
    fails(c.args(["--steps", "0", "--output"]).arg(&run), &["--steps"]);
    let mut c = dpo();
    c.args(["reward-model", "train", "--max-steps", "0", "--model"]).arg(&fixture).arg("--data").arg(prefs());
    fails(c.arg("--output").arg(&run), &["--max-steps"]);
    let mut c = dpo();
    c.args(["iterate", "--steps-per-round", "0", "--model"]).arg(&fixture).arg("--judge-reward-model").arg(&fixture);
    fails(c.arg("--prompts").arg(&prompts).arg("--output").arg(&run), &["--steps-per-round"]);
    assert!(!run.exists(), "a refused run wrote {}", run.display());
}
