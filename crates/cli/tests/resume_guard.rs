//! What a resume may change and what it may not, and interruptions that come before the first step or
//! during a checkpoint write, through the real binary:
//! - `--resume` with a setting that changes the run's numbers, or another model, reference, data or a data
//!   file edited in place, is refused by name (`key: saved -> now`) before anything is written;
//! - the length, the threads, where and how often it logs and saves may change;
//! - a second Ctrl-C says which checkpoint it abandoned and where a resume continues from.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The files a refused resume must leave as they were.
fn snapshot(run: &Path) -> Vec<Vec<u8>> {
    ["config.toml", "inputs.json", "metrics.jsonl", "final/model.safetensors"]
        .iter()
        .map(|f| std::fs::read(run.join(f)).unwrap_or_else(|e| panic!("{f}: {e}")))
        .collect()
}

fn resume(run: &Path, args: &[&str]) -> Command {
    let mut c = dpo();
    c.args(["train", "--resume"]).arg(run).args(args);
    c
}

#[test]
fn a_resume_that_changes_the_numbers_is_refused_by_name() {
    let dir = scratch("guard-settings");
    let data = dir.join("prefs.jsonl");
    std::fs::copy(prefs(), &data).unwrap();
    let run = dir.join("run");
    finished_run(&run, &data, &["--scheduler", "constant"]);
    let before = snapshot(&run);

    let msg = fails(
        &mut resume(&run, &["--max-steps", "3", "--lr", "0.5", "--beta", "5", "--loss", "ipo", "--seed", "7"]),
        &[
            "cannot be resumed",
            "lr: 0.005 -> 0.5",
            "beta: 0.1 -> 5.0",
            "seed: 42 -> 7",
            "loss: ",
            "nothing was written",
        ],
    );
    assert!(msg.contains("config.toml: ") && msg.contains("lr = 0.005"), "{msg}");
    assert!(!msg.contains("max_steps"), "{msg}");
    assert_eq!(snapshot(&run), before);

    // Other inputs: a copy of the data elsewhere, a reference of the same shape, another eval set.
    let other = dir.join("other.jsonl");
    std::fs::copy(prefs(), &other).unwrap();
    let o = other.display().to_string();
    fails(&mut resume(&run, &["--data", &o]), &[&format!("data: \"{}\" -> \"{o}\"", data.display())]);
    let r = model("gpt2-ref").display().to_string();
    fails(&mut resume(&run, &["--ref-model", &r]), &[&format!("ref_model: none -> \"{r}\"")]);
    fails(&mut resume(&run, &["--eval-data", &o]), &["eval_data: none -> "]);
    fails(&mut resume(&run, &["--precision", "bf16"]), &["precision: \"f32\" -> \"bf16\""]);
    // dpo sft on a DPO run: another command's run, named.
    fails(dpo().args(["sft", "--resume"]).arg(&run), &["a `dpo train` run", "continue it with `dpo train --resume"]);
    assert_eq!(snapshot(&run), before);

    // The data file edited in place between the interruption and the resume.
    let text = std::fs::read_to_string(&data).unwrap();
    let edited: String = text.lines().rev().map(|l| format!("{l}\n")).collect();
    std::fs::write(&data, &edited).unwrap();
    let msg = fails(&mut resume(&run, &[]), &[&format!("data: {} (content ", data.display()), "put back the files"]);
    assert!(!msg.contains("config.toml: "), "{msg}");
    assert_eq!(snapshot(&run), before);
    std::fs::write(&data, &text).unwrap();

    // What does not change the numbers, and the length, may change; a constant rate has no schedule to redo.
    let err = succeeds(&mut resume(
        &run,
        &["--max-steps", "3", "--threads", "1", "--log-every", "2", "--save-every", "5", "--report-to", "tensorboard"],
    ));
    assert!(err.contains("resuming at step 2"), "{err}");
    assert!(!err.contains("learning-rate schedule"), "{err}");
    assert_eq!(checkpoints(&run).last().map(|c| c.0), Some(3));
    let cfg = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(cfg.contains("lr = 0.005") && cfg.contains("max_steps = 3"), "{cfg}");
}

/// A run from before inputs.json existed resumes (nothing recorded, nothing compared), and records them.
#[test]
fn a_run_without_recorded_inputs_still_resumes() {
    let dir = scratch("guard-old-run");
    let run = dir.join("run");
    finished_run(&run, &prefs(), &["--scheduler", "constant"]);
    std::fs::remove_file(run.join("inputs.json")).unwrap();
    let err = succeeds(&mut resume(&run, &["--max-steps", "3"]));
    assert!(err.contains("resuming at step 2"), "{err}");
    assert!(run.join("inputs.json").is_file());
}

/// `dpo sft --resume` keeps its settings as `dpo train` does.
#[test]
fn an_sft_resume_is_guarded_the_same_way() {
    let dir = scratch("guard-sft");
    let run = dir.join("run");
    succeeds(&mut on_fixture(&["sft", "--batch-size", "4", "--max-steps", "2", "--save-every", "1"], &run));
    fails(dpo().args(["sft", "--lr", "0.5", "--resume"]).arg(&run), &["lr: 0.00002 -> 0.5"]);
    let err = succeeds(dpo().args(["sft", "--max-steps", "3", "--resume"]).arg(&run));
    assert!(err.contains("the linear learning-rate schedule changes from step 3 on"), "{err}");
}

/// `--resume` given another command's run names the command that continues it, before anything is
/// read or written; `dpo train` continues an SFT run (its config.toml records the method).
#[test]
fn a_resume_of_another_command_s_run_names_that_command() {
    let dir = scratch("guard-kind");
    let (dpo_run, sft_run) = (dir.join("dpo"), dir.join("sft"));
    finished_run(&dpo_run, &prefs(), &[]);
    succeeds(&mut on_fixture(&["sft", "--batch-size", "4", "--max-steps", "1"], &sft_run));
    let rm_run = trained_reward_model(&dir);
    let before = snapshot(&dpo_run);
    let cases: [(&[&str], &Path, &str); 5] = [
        (&["ppo"], &rm_run, "dpo reward-model train"),
        (&["train"], &rm_run, "dpo reward-model train"),
        (&["sft"], &dpo_run, "dpo train"),
        (&["reward-model", "train"], &dpo_run, "dpo train"),
        (&["reward-model", "train"], &sft_run, "dpo sft"),
    ];
    for (command, run, wrote) in cases {
        let r = run.display();
        fails(
            dpo().args(command).arg("--resume").arg(run),
            &[&format!("a `{wrote}` run"), &format!("continue it with `{wrote} --resume {r}`")],
        );
    }
    assert_eq!(snapshot(&dpo_run), before);
    succeeds(dpo().args(["train", "--max-steps", "2", "--resume"]).arg(&sft_run));
}

/// A second Ctrl-C exits at once with 130 and one line: what it abandoned and where a resume continues.
/// The second signal must come while the first is being acted on (the step finishing, the checkpoint
/// being written), a few milliseconds here: a try whose run stopped cleanly first is made again.
#[test]
fn a_second_interrupt_says_what_it_abandoned() {
    let dir = scratch("guard-second-signal");
    for attempt in 0..10 {
        let run = dir.join(format!("run-{attempt}"));
        let mut child = train(&model("gpt2-policy"), &prefs(), &run)
            .args(["--batch-size", "8", "--grad-accum", "3", "--max-steps", "100000", "--save-every", "1000"])
            .args(["--log-every", "1000"])
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while lines(&run.join("metrics.jsonl")) < 3 {
            assert!(t0.elapsed() < Duration::from_secs(120), "the run did not get going");
            assert!(child.try_wait().unwrap().is_none(), "the run ended");
            std::thread::sleep(Duration::from_millis(5));
        }
        // SIGINT every 200 us until it exits: the first asks it to stop, a later one (signals sent before
        // the first is handled merge into it) cuts the stop short.
        let pid = child.id() as libc::pid_t;
        while child.try_wait().unwrap().is_none() {
            assert!(t0.elapsed() < Duration::from_secs(180), "the run does not stop");
            // SAFETY: a signal to the child this test spawned and has not yet reaped.
            unsafe { libc::kill(pid, libc::SIGINT) };
            std::thread::sleep(Duration::from_micros(200));
        }
        let out = child.wait_with_output().unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(130), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        let Some(line) = err.lines().find(|l| l.contains("interrupted again, stopped at once")) else {
            assert!(err.contains("interrupted after step"), "{err}");
            continue;
        };
        // Whichever checkpoint was complete when it stopped (the one being written, if any, was not).
        let resume = match checkpoints(&run).pop() {
            Some((_, newest)) => format!("--resume {} continues from {}", run.display(), newest.display()),
            None => format!("{} holds no complete checkpoint to resume from", run.display()),
        };
        assert!(line.contains(&resume), "{line}");
        assert!(line.contains("was abandoned") || line.contains("no checkpoint was being written"), "{line}");
        println!("attempt {attempt}: {line}");
        return;
    }
    panic!("every run stopped cleanly before a second signal reached it");
}
