//! `dpo train --online` end to end on a fixture checkpoint: the run directory, TRL's online metrics,
//! and the refusals.

mod common;

use common::*;

/// A reward model trained for 2 steps in `dir/rm` (the judge) and two prompts in `dir/prompts.jsonl`.
fn judge_and_prompts(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let rm = trained_reward_model(dir);
    let prompts = dir.join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"Tell me about a kite.\"}\n{\"prompt\": \"Tell me about my grandmother.\"}\n",
    )
    .unwrap();
    (rm, prompts)
}

/// `dpo train --online` on the GPT-2 fixture with this judge and these prompts, writing `out`; callers add
/// the step flags.
fn online_cmd(rm: &std::path::Path, prompts: &std::path::Path, out: &std::path::Path) -> std::process::Command {
    let mut c = dpo();
    c.args(["train", "--online", "--model"])
        .arg(model("gpt2-policy"))
        .arg("--judge-reward-model")
        .arg(rm)
        .arg("--prompts")
        .arg(prompts)
        .arg("--output")
        .arg(out);
    c
}

#[test]
fn online_dpo_writes_a_run_with_its_sampled_pairs_metrics() {
    let dir = scratch("online-dpo");
    let (rm, prompts) = judge_and_prompts(&dir);
    let run = dir.join("run");
    let online = || {
        let mut c = online_cmd(&rm, &prompts, &run);
        c.args(["--max-steps", "2", "--batch-size", "2", "--online-max-new-tokens", "6"])
            .args(["--missing-eos-penalty", "1.0"]);
        c
    };
    succeeds(&mut online());
    assert!(run.join("final/model.safetensors").is_file() && run.join("config.toml").is_file());
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    // The first step is at the reference: DPO's loss is ln 2.
    assert!((lines[0]["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-6, "{}", lines[0]);
    for l in &lines {
        assert!(l["objective/scores"].as_f64().unwrap().is_finite(), "{l}");
        let eos = l["val/contain_eos_token"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&eos), "{l}");
    }
    fails(&mut online(), &["already holds a run", "--overwrite"]);
    let mut c = dpo();
    c.args(["train", "--online", "--model"]).arg(model("gpt2-policy")).arg("--prompts").arg(&prompts);
    let out = c.arg("--output").arg(dir.join("x")).output().unwrap();
    assert!(!out.status.success() && stderr(&out).contains("--judge-reward-model"), "{}", stderr(&out));
    succeeds(online().args(["--overwrite", "--online-samples", "3"]));
    fails(online().args(["--overwrite", "--online-samples", "1"]), &["--online-samples must be at least 2"]);
}

#[test]
fn iterate_runs_rounds_and_a_rerun_skips_the_finished_ones() {
    let dir = scratch("iterate");
    let (rm, prompts) = judge_and_prompts(&dir);
    let out = dir.join("rounds");
    let iterate = |rounds: &str| {
        let mut c = dpo();
        c.args(["iterate", "--rounds", rounds, "--max-new-tokens", "6", "--steps-per-round", "1", "--batch-size", "2"])
            .args(["--lr", "1e-3", "--move-reference", "--model"])
            .arg(model("gpt2-policy"))
            .arg("--judge-reward-model")
            .arg(&rm)
            .arg("--prompts")
            .arg(&prompts)
            .arg("--output")
            .arg(&out);
        c
    };
    succeeds(&mut iterate("2"));
    for r in [1, 2] {
        assert!(out.join(format!("round-{r}/run/final/model.safetensors")).is_file(), "round {r}");
        let pairs = std::fs::read_to_string(out.join(format!("round-{r}/pairs.jsonl"))).unwrap();
        assert_eq!(pairs.lines().count(), 2);
    }
    let round2 = std::fs::read(out.join("round-2/run/final/model.safetensors")).unwrap();
    let err = succeeds(&mut iterate("2"));
    assert!(err.contains("round 1/2: done") && err.contains("round 2/2: done"), "{err}");
    assert_eq!(std::fs::read(out.join("round-2/run/final/model.safetensors")).unwrap(), round2);
    fails(&mut iterate("0"), &["--rounds"]);
}

/// `dpo train --online --resume`: a run resumed from its step-2 checkpoint ends with the weights, the
/// optimizer state and the metrics of the run that was never stopped (a step's samples depend only on the
/// seed, the step and the weights); a resume that changes the sampling is refused, naming the change.
#[test]
fn online_dpo_resumed_matches_an_uninterrupted_run() {
    resumed_matches_uninterrupted("online-resume", &[], "final/model.safetensors");
}

/// The same with a LoRA adapter (`--lora-r`): the run trains and saves the adapter (PEFT), samples from the
/// base with the adapter on it, and resumes exactly.
#[test]
fn online_dpo_with_lora_trains_an_adapter_and_resumes_exactly() {
    let run = resumed_matches_uninterrupted(
        "online-lora-resume",
        &["--lora-r", "4", "--lora-alpha", "8"],
        "final/adapter_model.safetensors",
    );
    assert!(run.join("final/adapter_config.json").is_file() && !run.join("final/model.safetensors").exists());
    // The adapter moved: the step's update reached the weights the samples come from.
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    assert!(last["grad_norm"].as_f64().unwrap() > 0.0, "{last}");
}

/// Runs online DPO for 4 steps twice, the second resumed from its step-2 checkpoint, and checks both end
/// alike (`final_file`, the step-4 optimizer and trainer state, the metrics); returns the resumed run.
fn resumed_matches_uninterrupted(name: &str, flags: &[&str], final_file: &str) -> std::path::PathBuf {
    let dir = scratch(name);
    let (rm, prompts) = judge_and_prompts(&dir);
    let online = |out: &std::path::Path| {
        let mut c = online_cmd(&rm, &prompts, out);
        c.args(["--max-steps", "4", "--save-every", "2", "--batch-size", "1"]).args(flags).args([
            "--lr",
            "1e-3",
            "--online-max-new-tokens",
            "6",
        ]);
        c
    };
    let whole = dir.join("whole");
    succeeds(&mut online(&whole));
    assert!(whole.join("online.json").is_file());
    // The resumed run: the same run, taken back to its step-2 checkpoint (the later ones are set aside).
    let run = dir.join("run");
    succeeds(&mut online(&run));
    let resume = |extra: &[&str]| {
        let mut c = online(&run);
        c.args(extra).arg("--resume").arg(run.join("checkpoints/step-2"));
        c
    };
    let before = std::fs::read_to_string(run.join("online.json")).unwrap();
    fails(&mut resume(&["--online-samples", "3"]), &["samples: was 2, now 3", "same --online flags"]);
    assert_eq!(std::fs::read_to_string(run.join("online.json")).unwrap(), before);
    let err = succeeds(&mut resume(&[]));
    assert!(err.contains("resuming at step 2"), "{err}");
    for f in [final_file, "checkpoints/step-4/optimizer.safetensors", "checkpoints/step-4/trainer_state.json"] {
        let (a, b) = (std::fs::read(run.join(f)).unwrap(), std::fs::read(whole.join(f)).unwrap());
        assert!(a == b, "{f}: the resumed run differs from the uninterrupted one");
    }
    let metrics = |r: &std::path::Path| -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(r.join("metrics.jsonl")).unwrap();
        text.lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v.as_object_mut().unwrap().retain(|k, _| !k.contains("per_s") && k != "seconds");
                v
            })
            .collect()
    };
    assert_eq!(metrics(&run).len(), 4);
    assert_eq!(metrics(&run), metrics(&whole));
    // The first run of the resumed directory went to abandoned/ from step 4 on.
    assert!(run.join("abandoned").is_dir());
    run
}

/// `dpo train --online --resume --max-steps N` extends a finished run, as `dpo train --resume` does: the
/// run's length does not decide its samples (a record written before it was left out, with its
/// `max_steps`, resumes too); a change of the sampling is still refused.
#[test]
fn a_finished_online_run_is_extended_by_max_steps() {
    let dir = scratch("online-extend");
    let (rm, prompts) = judge_and_prompts(&dir);
    let run = dir.join("run");
    let online = |steps: &str| {
        let mut c = online_cmd(&rm, &prompts, &run);
        c.args(["--max-steps", steps, "--batch-size", "1", "--lr", "1e-3", "--online-max-new-tokens", "6"]);
        c
    };
    succeeds(&mut online("1"));
    let record = run.join("online.json");
    let mut saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap();
    assert!(saved.get("max_steps").is_none(), "{saved}");
    // As older runs recorded it.
    saved["max_steps"] = serde_json::json!(1);
    std::fs::write(&record, serde_json::to_string_pretty(&saved).unwrap()).unwrap();

    fails(
        online("2").args(["--online-samples", "3", "--resume"]).arg(&run),
        &["samples: was 2, now 3", "same --online flags"],
    );
    let err = succeeds(online("2").arg("--resume").arg(&run));
    assert!(err.contains("resuming at step 1"), "{err}");
    assert_eq!(lines(&run.join("metrics.jsonl")), 2);
    assert!(run.join("checkpoints/step-2").is_dir());
}

/// Settings online and iterative DPO cannot honour are refused before anything is sampled or written: a
/// missing-EOS penalty that is not finite (every unfinished sample scored NaN), held-out data online DPO
/// does not evaluate, and a learning rate `dpo iterate` would refuse only after sampling its first round.
#[test]
fn online_and_iterative_settings_are_checked_before_sampling() {
    let dir = scratch("online-checks");
    let (rm, prompts) = judge_and_prompts(&dir);
    let run = dir.join("run");
    let online = |extra: &[&str]| {
        let mut c = dpo();
        c.args(["train", "--online", "--max-steps", "1", "--batch-size", "2", "--model"]).arg(model("gpt2-policy"));
        c.arg("--judge-reward-model").arg(&rm).arg("--prompts").arg(&prompts).arg("--output").arg(&run);
        c.args(extra);
        c
    };
    fails(&mut online(&["--missing-eos-penalty", "inf"]), &["missing_eos_penalty inf is not a finite number"]);
    fails(online(&["--eval-data"]).arg(prefs()), &["does not evaluate held-out data"]);
    assert!(!run.exists());
    let rounds = dir.join("rounds");
    let iterate = |extra: &[&str]| {
        let mut c = dpo();
        c.args(["iterate", "--rounds", "1", "--max-new-tokens", "4", "--steps-per-round", "1", "--batch-size", "2"]);
        c.arg("--model").arg(model("gpt2-policy")).arg("--judge-reward-model").arg(&rm);
        c.arg("--prompts").arg(&prompts).arg("--output").arg(&rounds).args(extra);
        c
    };
    fails(&mut iterate(&["--lr", "nan"]), &["lr"]);
    fails(&mut iterate(&["--missing-eos-penalty", "nan"]), &["missing_eos_penalty NaN is not a finite number"]);
    assert!(!rounds.join("round-1").exists(), "a round was sampled before the settings were checked");
    // With the settings put right, the same command runs.
    succeeds(&mut iterate(&[]));
}
