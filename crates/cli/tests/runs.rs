//! What a run promises about its directory (RELIABILITY.md), through the real binary: nothing of a
//! previous run is lost to a typo, a copy, a resume or a second process (issue 16).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn steps(run: &Path) -> Vec<u64> {
    checkpoints(run).into_iter().map(|(s, _)| s).collect()
}

/// The files of a run that must survive a refused or failed replacement, with their contents.
fn snapshot(run: &Path) -> Vec<(String, Vec<u8>)> {
    [
        "config.toml",
        "metrics.jsonl",
        "final/model.safetensors",
        "checkpoints/step-1/trainer_state.json",
        "checkpoints/step-2/model/model.safetensors",
    ]
    .iter()
    .map(|f| (f.to_string(), bytes(&run.join(f))))
    .collect()
}

/// Defect 1: `--overwrite` validates and loads everything before it touches the previous run.
#[test]
fn overwrite_with_a_bad_input_leaves_the_previous_run_intact() {
    let dir = scratch("runs-overwrite-bad");
    let run = dir.join("run");
    finished_run(&run, &prefs(), &[]);
    let before = snapshot(&run);
    let bad_row = jsonl(&dir.join("bad.jsonl"), &[serde_json::json!({"prompt_ids": [1, 2], "chosen_ids": "x"})]);
    let cases: Vec<(&str, Command)> = vec![
        ("typo in --data", train(&model("gpt2-policy"), &dir.join("prefs.jsonl-typo"), &run)),
        ("missing model", train(&dir.join("no-model"), &prefs(), &run)),
        ("bad row", train(&model("gpt2-policy"), &bad_row, &run)),
        ("bad setting", {
            let mut c = train(&model("gpt2-policy"), &prefs(), &run);
            c.args(["--beta", "0"]);
            c
        }),
        ("sft typo in --data", {
            let mut c = dpo();
            c.args(["sft", "--model"])
                .arg(model("gpt2-policy"))
                .arg("--data")
                .arg(dir.join("typo"))
                .arg("--output")
                .arg(&run);
            c
        }),
    ];
    for (what, mut cmd) in cases {
        let out = cmd.arg("--overwrite").output().unwrap();
        assert!(!out.status.success(), "{what}: succeeded");
        assert_eq!(snapshot(&run), before, "{what}: the previous run changed\n{}", stderr(&out));
        assert_eq!(steps(&run), [1, 2], "{what}");
    }
    // A valid replacement replaces it, and the moved-aside run is gone once the new one has a checkpoint.
    succeeds(train(&model("gpt2-policy"), &prefs(), &run).args(["--max-steps", "1", "--overwrite"]));
    assert_eq!(steps(&run), [1]);
    let left: Vec<String> =
        std::fs::read_dir(&run).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(!left.iter().any(|n| n.starts_with(".replaced-")), "{left:?}");
}

/// Defect 1: `--model RUN/final --output RUN --overwrite` would delete its own input: refused.
#[test]
fn overwrite_does_not_delete_its_own_input_model() {
    let dir = scratch("runs-overwrite-input");
    let run = dir.join("run");
    finished_run(&run, &prefs(), &[]);
    let before = snapshot(&run);
    fails(
        train(&run.join("final"), &prefs(), &run).arg("--overwrite"),
        &[
            "--overwrite would replace the run that holds the input",
            "final",
            "copy the input out of the run first, or choose another --output",
        ],
    );
    assert_eq!(snapshot(&run), before);
}

/// Defect 2: a copied run is resumed where it is; the original is not touched. Relative paths of a
/// `--config` file resolve against the file, not the working directory.
#[test]
fn resuming_a_copied_run_writes_into_the_copy() {
    let dir = scratch("runs-copy");
    let (a, b) = (dir.join("a"), dir.join("b"));
    finished_run(&a, &prefs(), &[]);
    let before = snapshot(&a);
    let ok = Command::new("cp").arg("-r").arg(&a).arg(&b).status().unwrap();
    assert!(ok.success());
    let err = succeeds(
        dpo().current_dir("/").args(["train", "--max-steps", "3", "--resume"]).arg(b.join("checkpoints/step-2")),
    );
    assert!(err.contains("resuming at step 2"), "{err}");
    assert_eq!(snapshot(&a), before, "the original run changed");
    assert_eq!(steps(&a), [1, 2]);
    assert_eq!(steps(&b), [1, 2, 3]);
    let cfg = std::fs::read_to_string(b.join("config.toml")).unwrap();
    assert!(cfg.contains(&format!("output = \"{}\"", b.display())), "{cfg}");

    // --config FILE with relative paths, run from another working directory.
    let conf_dir = dir.join("conf");
    copy_model("gpt2-policy", &conf_dir.join("m"));
    std::fs::copy(prefs(), conf_dir.join("d.jsonl")).unwrap();
    std::fs::write(conf_dir.join("run.toml"), "model = \"m\"\ndata = \"d.jsonl\"\noutput = \"out\"\nmax_steps = 1\n")
        .unwrap();
    succeeds(dpo().current_dir("/").args(["train", "--config"]).arg(conf_dir.join("run.toml")));
    assert!(conf_dir.join("out/final/model.safetensors").is_file());
}

/// Defect 3: a checkpoint that does not fit the model is refused before training, naming the tensor,
/// and config.toml is left as it was (so the run can still be resumed correctly). Another --model on the
/// command line is refused earlier, as a changed setting.
#[test]
fn resuming_with_another_model_is_refused_before_training() {
    let dir = scratch("runs-resume-model");
    let run = dir.join("run");
    finished_run(&run, &prefs(), &[]);
    let before = snapshot(&run);
    let msg = fails(
        dpo().args(["train", "--max-steps", "3", "--model"]).arg(model("llama-policy")).arg("--resume").arg(&run),
        &[
            "cannot be resumed",
            &format!("model: \"{}\" -> \"{}\"", model("gpt2-policy").display(), model("llama-policy").display()),
            "nothing was written",
        ],
    );
    assert!(!msg.contains("panicked"));
    assert_eq!(snapshot(&run), before);
    // The same with config.toml edited to name the other model.
    let cfg = std::fs::read_to_string(run.join("config.toml")).unwrap();
    let edited = cfg.replace(&model("gpt2-policy").display().to_string(), &model("llama-policy").display().to_string());
    assert_ne!(cfg, edited);
    std::fs::write(run.join("config.toml"), &edited).unwrap();
    fails(dpo().args(["train", "--max-steps", "3", "--resume"]).arg(&run), &["does not fit", "tensor"]);
    assert_eq!(std::fs::read_to_string(run.join("config.toml")).unwrap(), edited);
    std::fs::write(run.join("config.toml"), &cfg).unwrap();
    let err = succeeds(dpo().args(["train", "--max-steps", "3", "--resume"]).arg(&run));
    assert!(err.contains("resuming at step 2"), "{err}");
}

/// Kills the child when dropped, so that a failing test leaves no training process behind.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Defect 6: one process per run directory; a second one (new, --overwrite or --resume) is refused
/// clearly, and the lock of a killed process is not in the way.
#[test]
fn a_second_process_on_one_run_is_refused() {
    let dir = scratch("runs-lock");
    let run = dir.join("run");
    let mut first = KillOnDrop(
        train(&model("gpt2-policy"), &prefs(), &run)
            .args(["--batch-size", "4", "--max-steps", "100000", "--save-every", "5"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    while steps(&run).is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(120), "the first run did not get going");
        assert!(first.0.try_wait().unwrap().is_none(), "the first run ended");
        std::thread::sleep(Duration::from_millis(20));
    }
    let busy = ["is in use by another process", &format!("pid {}", first.0.id()), "one process at a time"];
    fails(train(&model("gpt2-policy"), &prefs(), &run).arg("--overwrite"), &busy);
    fails(dpo().args(["train", "--resume"]).arg(&run), &busy);
    let n = lines(&run.join("metrics.jsonl"));
    std::thread::sleep(Duration::from_millis(300));
    assert!(lines(&run.join("metrics.jsonl")) > n, "the first run stopped");
    drop(first);
    // The lock died with the process.
    let err = succeeds(dpo().args(["train", "--max-steps", "6", "--resume"]).arg(&run));
    assert!(err.contains("resuming at step"), "{err}");
}

/// Defect 10: a resume from an older checkpoint moves the newer ones (and final/) to abandoned/, so
/// `--save-total-limit` prunes only this trajectory and a later --resume does not continue the old one.
#[test]
fn resuming_from_an_older_checkpoint_abandons_the_newer_ones() {
    let dir = scratch("runs-older");
    let run = dir.join("run");
    succeeds(train(&model("gpt2-policy"), &prefs(), &run).args([
        "--batch-size",
        "4",
        "--max-steps",
        "4",
        "--save-every",
        "2",
    ]));
    assert_eq!(steps(&run), [2, 4]);
    let err = succeeds(
        dpo()
            .args(["train", "--max-steps", "3", "--save-total-limit", "1", "--resume"])
            .arg(run.join("checkpoints/step-2")),
    );
    assert!(err.contains("step-4, final of the later trajectory moved to"), "{err}");
    assert_eq!(steps(&run), [3]);
    assert!(run.join("abandoned/step-4/trainer_state.json").is_file());
    let err = succeeds(dpo().args(["train", "--max-steps", "4", "--resume"]).arg(&run));
    assert!(err.contains("resuming at step 3"), "{err}");
}

/// Defect 10: a checkpoint write cut short (a second Ctrl-C) leaves a temporary directory that hides
/// nothing, and when it is all there is, the refusal says how to go on.
#[test]
fn an_interrupted_checkpoint_write_hides_nothing() {
    let dir = scratch("runs-tmp-left");
    let run = dir.join("run");
    finished_run(&run, &prefs(), &[]);
    std::fs::create_dir_all(run.join("checkpoints/.step-3.tmp-99999/model")).unwrap();
    let err = succeeds(dpo().args(["train", "--max-steps", "3", "--resume"]).arg(&run));
    assert!(err.contains("resuming at step 2"), "{err}");

    let lone = dir.join("lone");
    std::fs::create_dir_all(lone.join("checkpoints/.step-1.tmp-99999/model")).unwrap();
    std::fs::copy(run.join("config.toml"), lone.join("config.toml")).unwrap();
    fails(
        dpo().args(["train", "--resume"]).arg(&lone),
        &["no checkpoint found in", ".step-1.tmp-99999", "interrupted", "--overwrite"],
    );
}

/// Defect 10: a resume that changes the number of steps says that the schedule changes.
#[test]
fn resuming_with_more_steps_says_the_schedule_changes() {
    let dir = scratch("runs-schedule");
    let run = dir.join("run");
    finished_run(&run, &prefs(), &[]);
    let err = succeeds(dpo().args(["train", "--max-steps", "4", "--resume"]).arg(&run));
    assert!(
        err.contains("the run was to take 2 steps and now takes 4: the linear learning-rate schedule changes"),
        "{err}"
    );
}

/// Defect 11: a start that fails leaves no run directory behind.
#[test]
fn a_failed_start_leaves_no_run_directory() {
    let dir = scratch("runs-failed-start");
    let run = dir.join("run");
    fails(&mut train(&dir.join("no-model"), &prefs(), &run), &["no-model"]);
    fails(train(&model("gpt2-policy"), &dir.join("no-data.jsonl"), &run).arg("--overwrite"), &["no-data.jsonl"]);
    assert!(!run.exists(), "a failed start created {}", run.display());
}

/// Defect 8: every setting is checked at start with torch's rules; `--lr -1` is read as a value.
#[test]
fn settings_are_checked_before_anything_happens() {
    let dir = scratch("runs-settings");
    let run = dir.join("run");
    for (flags, field) in [
        (&["--beta", "0"][..], "`beta`"),
        (&["--beta=-1"], "`beta`"),
        (&["--beta", "inf"], "`beta`"),
        (&["--adam-beta1", "2"], "`adam_beta1`"),
        (&["--adam-eps", "0"], "`adam_eps`"),
        (&["--loss-weights", "nan"], "`loss_weights`"),
        (&["--weight-decay", "-0.5"], "`weight_decay`"),
    ] {
        fails(train(&model("gpt2-policy"), &prefs(), &run).args(flags), &["invalid setting", field]);
        assert!(!run.exists(), "{flags:?}");
    }
    let mut c = dpo();
    c.args(["train", "--lr", "-1", "--model"]).arg(model("gpt2-policy")).arg("--data").arg(prefs());
    fails(c.arg("--output").arg(&run), &["invalid setting `lr`", "-1 must be >= 0"]);
    assert!(!run.exists());
}

/// Defect 11: the TOML keys are the flags' names, and `loss` may be an array.
#[test]
fn toml_keys_are_the_flags_names() {
    let dir = scratch("runs-toml-keys");
    let conf = dir.join("run.toml");
    std::fs::write(
        &conf,
        "loss = [\"sigmoid\", \"sft\"]\nloss_weights = [1.0, 0.5]\nf_alpha = 0.5\nno_prefix_sharing = true\nthreads = 1\nmax_steps = 1\n",
    )
    .unwrap();
    succeeds(train(&model("gpt2-policy"), &prefs(), &dir.join("run")).arg("--config").arg(&conf));
    let written = std::fs::read_to_string(dir.join("run/config.toml")).unwrap();
    for key in ["loss = [", "no_prefix_sharing = true", "f_alpha = 0.5", "threads = 1", "method = \"pairs\""] {
        assert!(written.contains(key), "{key}: {written}");
    }
}

/// Defect 11: an SFT run records that it is SFT, with SFT's learning rate, which `dpo sft --help` shows.
#[test]
fn sft_runs_say_they_are_sft() {
    let out = dpo().args(["sft", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("2e-5 for dpo sft"), "{help}");
    let dir = scratch("runs-sft");
    let run = dir.join("run");
    succeeds(&mut on_fixture(&["sft", "--max-steps", "1"], &run));
    let cfg = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(cfg.contains("method = \"sft\"") && cfg.contains("lr = 0.00002"), "{cfg}");
    // `dpo train --resume` of an SFT run continues it as SFT.
    let err = succeeds(dpo().args(["train", "--max-steps", "2", "--resume"]).arg(&run));
    assert!(err.contains("resuming at step 1"), "{err}");
    assert!(std::fs::read_to_string(run.join("config.toml")).unwrap().contains("method = \"sft\""));
}

/// Defect 11: the end of a run says how long it took, where its outputs are and how to evaluate it.
#[test]
fn the_end_of_a_run_says_where_everything_is() {
    let dir = scratch("runs-end");
    let run = dir.join("run");
    let err = succeeds(train(&model("gpt2-policy"), &prefs(), &run).args(["--max-steps", "1"]));
    for want in [
        "done: 1 steps in ".to_string(),
        format!("metrics:     {}", run.join("metrics.jsonl").display()),
        format!("checkpoints: {}", run.join("checkpoints").display()),
        format!("evaluate with: dpo eval --model {}", run.join("final").display()),
    ] {
        assert!(err.contains(&want), "{want}: {err}");
    }
}

/// The command the end of a run prints scores the rows as the run read them: a row longer than GPT-2's 256
/// positions, which training cut to its max length, is cut the same way (eval alone would refuse it), and a
/// bf16 run is evaluated in bf16.
#[test]
fn the_printed_eval_command_runs_with_the_runs_settings() {
    let dir = scratch("runs-eval-hint");
    let run = dir.join("run");
    let mut rows: Vec<serde_json::Value> =
        std::fs::read_to_string(prefs()).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let long = " and the kite flew on".repeat(80);
    rows.push(serde_json::json!({"prompt": "Tell me about a kite.", "chosen": long, "rejected": " It fell."}));
    let data = jsonl(&dir.join("long.jsonl"), &rows);
    let err = succeeds(train(&model("gpt2-policy"), &data, &run).args(["--max-steps", "1", "--precision", "bf16"]));
    let line = err.lines().find_map(|l| l.strip_prefix("evaluate with: ")).unwrap_or_else(|| panic!("{err}"));
    assert!(line.contains(" --max-length 256") && line.contains(" --precision bf16"), "{line}");
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words[0], "dpo", "{line}");
    let out = dpo().args(&words[1..]).output().unwrap();
    assert!(out.status.success(), "{line}: {}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["rows"], rows.len(), "{report}");
}

fn reward_model_train(run: &Path) -> Command {
    on_fixture(&["reward-model", "train", "--max-steps", "1", "--batch-size", "4"], run)
}

/// Defect 11 and one layout: `dpo reward-model train` and `dpo ppo` write their runs through the same
/// run directory (config.toml, metrics.jsonl, final/), and neither replaces a run without --overwrite.
#[test]
fn reward_model_and_ppo_runs_share_the_layout_and_refuse_to_replace() {
    let dir = scratch("runs-rlhf");
    let rm = dir.join("rm");
    succeeds(&mut reward_model_train(&rm));
    for f in ["config.toml", "metrics.jsonl", "final/reward_head.safetensors", "final/model.safetensors"] {
        assert!(rm.join(f).is_file(), "{f}");
    }
    let head = bytes(&rm.join("final/reward_head.safetensors"));
    fails(&mut reward_model_train(&rm), &["already holds a run", "--overwrite"]);
    assert_eq!(bytes(&rm.join("final/reward_head.safetensors")), head);
    succeeds(reward_model_train(&rm).arg("--overwrite"));
    // Scoring takes the run directory (or its final/).
    let out = dpo().args(["reward-model", "score", "--model"]).arg(&rm).arg("--data").arg(prefs()).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    let prompts = jsonl(&dir.join("prompts.jsonl"), &[serde_json::json!({"prompt": "Tell me about a kite."})]);
    // So does best-of-N's --reward-model.
    for reward_model in [rm.clone(), rm.join("final")] {
        let mut c = dpo();
        c.args(["best-of-n", "--n", "2", "--max-new-tokens", "4", "--model"]).arg(model("gpt2-policy"));
        let out = c.arg("--reward-model").arg(&reward_model).arg("--data").arg(&prompts).output().unwrap();
        assert!(out.status.success(), "{}: {}", reward_model.display(), stderr(&out));
        assert_eq!(String::from_utf8(out.stdout).unwrap().lines().count(), 1);
    }
    let ppo = |run: &Path| {
        let mut c = dpo();
        c.args(["ppo", "--steps", "1", "--rollout-prompts", "1", "--minibatch", "1", "--max-new-tokens", "4"])
            .arg("--model")
            .arg(model("gpt2-policy"))
            .arg("--reward-model")
            .arg(&rm)
            .arg("--prompts")
            .arg(&prompts)
            .arg("--output")
            .arg(run);
        c
    };
    let run = dir.join("ppo");
    succeeds(&mut ppo(&run));
    for f in ["config.toml", "metrics.jsonl", "final/model.safetensors"] {
        assert!(run.join(f).is_file(), "{f}");
    }
    fails(&mut ppo(&run), &["already holds a run", "--overwrite"]);
    succeeds(ppo(&run).arg("--overwrite"));
}
