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

#[test]
fn online_dpo_writes_a_run_with_its_sampled_pairs_metrics() {
    let dir = scratch("online-dpo");
    let (rm, prompts) = judge_and_prompts(&dir);
    let run = dir.join("run");
    let online = || {
        let mut c = dpo();
        c.args(["train", "--online", "--max-steps", "2", "--batch-size", "2", "--online-max-new-tokens", "6"])
            .args(["--missing-eos-penalty", "1.0", "--model"])
            .arg(model("gpt2-policy"))
            .arg("--judge-reward-model")
            .arg(&rm)
            .arg("--prompts")
            .arg(&prompts)
            .arg("--output")
            .arg(&run);
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
