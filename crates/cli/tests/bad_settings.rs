//! Settings a command cannot honour or would not read, through the real binary: each is refused by name
//! before anything is loaded, sampled or written (a flag that changes nothing is a mistake to report, not
//! to ignore).

mod common;

use common::*;

/// Flags the run would not read are refused by name before anything is loaded, not ignored: label smoothing
/// for a loss that has none, a reference model for a reference-free objective, evaluation steps without
/// evaluation data, a prompt length that leaves no completion; and a generation batch of 0.
#[test]
fn settings_that_would_change_nothing_are_refused() {
    let dir = scratch("unread-settings");
    let run = dir.join("run");
    let m = model("gpt2-policy");
    for (flags, wants) in [
        (&["--label-smoothing", "0.3"][..], &["label_smoothing", "sigmoid", "cdpo"][..]),
        (&["--reference-free", "--ref-model", m.to_str().unwrap()], &["ref_model", "would not be read"]),
        (&["--loss", "simpo", "--precompute-ref"], &["precompute_ref", "simpo compare with no reference"]),
        (&["--eval-every", "1"], &["eval_every", "eval_data"]),
        (&["--max-length", "10", "--max-prompt-length", "1000"], &["max_prompt_length", "no room"]),
    ] {
        fails(train(&m, &prefs(), &run).args(["--max-steps", "1"]).args(flags), wants);
        assert!(!run.exists(), "{flags:?}");
    }
    fails(
        dpo().args(["eval", "--loss", "ipo", "--label-smoothing", "0.3", "--model"]).arg(&m).arg("--data").arg(prefs()),
        &["label_smoothing", "ipo"],
    );
    fails(dpo().args(["generate", "--prompt", "Hi", "--batch-size", "0", "--model"]).arg(&m), &["--batch-size"]);
}

/// The scoring commands refuse a batch of 0 by the flag's name (it ran as 1 before), and `dpo win-rate`
/// checks where its chart goes before it samples anything (it failed at the end, its work lost).
#[test]
fn zero_batches_and_missing_output_directories_are_refused_first() {
    let (m, data) = (model("gpt2-policy"), prefs());
    for cmd in ["logps", "eval", "reward"] {
        // A usage error, as clap reports them: exit status 2.
        let out = dpo().args([cmd, "--batch-size", "0", "--model"]).arg(&m).arg("--data").arg(&data).output().unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {err}");
        assert!(err.contains("'--batch-size <BATCH_SIZE>': must be at least 1"), "{cmd}: {err}");
    }
    let mut c = dpo();
    c.args(["win-rate", "--temperatures", "0", "--chart", "/nonexistent-dir/x.png", "--model"]).arg(&m);
    c.arg("--against-data").arg(&data).arg("--judge-implicit").arg(format!("{},{}", m.display(), m.display()));
    let started = std::time::Instant::now();
    fails(&mut c, &["--chart", "/nonexistent-dir", "does not exist"]);
    assert!(started.elapsed().as_secs() < 20, "refused only after sampling");
}

/// `dpo reward-model train` checks its settings before it takes its run directory: a bad one left `.lock`
/// and `config.toml` behind.
#[test]
fn reward_model_settings_are_checked_before_the_run_directory_is_taken() {
    let run = scratch("rm-settings").join("rm");
    for flags in [&["--lr", "nan"][..], &["--head-init-std=-1"]] {
        let mut c = dpo();
        c.args(["reward-model", "train", "--max-steps", "1", "--model"]).arg(model("gpt2-policy"));
        c.arg("--data").arg(prefs()).arg("--output").arg(&run).args(flags);
        fails(&mut c, &["training a reward model on"]);
        assert!(!run.exists(), "{flags:?} left {}", run.display());
    }
}
