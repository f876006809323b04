//! Interrupted and crashed training runs, through the real binary:
//! - SIGTERM: the trainer finishes its step, writes a checkpoint, says how to resume and exits with 130;
//!   resuming ends with the same weights, bit for bit, as a run that was never interrupted.
//! - SIGKILL at seeded random moments (during steps, checkpoint writes, the final save, start-up): every
//!   `step-N` directory left behind loads, and resuming from the newest ends bit-identical to an
//!   uninterrupted run.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The run every test here repeats: the GPT-2 fixture, batches of 4 in a seeded shuffle, AdamW.
fn run_args(c: &mut Command, steps: u64, save_every: u64) -> &mut Command {
    c.args(["--batch-size", "4", "--max-steps", &steps.to_string(), "--save-every", &save_every.to_string()])
}

fn final_weights(run: &Path) -> Vec<u8> {
    std::fs::read(run.join("final/model.safetensors")).unwrap()
}

#[test]
fn sigterm_writes_a_checkpoint_and_resume_matches_an_uninterrupted_run() {
    let dir = scratch("sigterm");
    let (m, steps) = (model("gpt2-policy"), 300);
    let whole = dir.join("whole");
    succeeds(run_args(&mut train(&m, &prefs(), &whole), steps, 1000));

    let run = dir.join("run");
    let mut child = run_args(&mut train(&m, &prefs(), &run), steps, 1000)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while lines(&run.join("metrics.jsonl")) < 20 {
        assert!(t0.elapsed() < Duration::from_secs(60), "the run did not get going");
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be interrupted");
        std::thread::sleep(Duration::from_millis(5));
    }
    let kill = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let at = err.find("interrupted after step ").unwrap_or_else(|| panic!("no interruption message:\n{err}"));
    let step: u64 = err[at + 23..].split('/').next().unwrap().parse().unwrap();
    assert!((20..steps).contains(&step), "{err}");
    let ckpt = run.join(format!("checkpoints/step-{step}"));
    assert!(err.contains(&format!("checkpoint written to {}", ckpt.display())), "{err}");
    assert!(err.contains(&format!("resume with: dpo train --resume {}", run.display())), "{err}");
    assert_eq!(checkpoints(&run).into_iter().map(|(s, _)| s).collect::<Vec<_>>(), [step]);
    assert_checkpoint_loads(&ckpt);
    println!("SIGTERM after step {step}/{steps}");

    let err = succeeds(dpo().args(["train", "--resume"]).arg(&run));
    assert!(err.contains(&format!("resuming at step {step}")), "{err}");
    assert!(final_weights(&run) == final_weights(&whole), "resumed weights differ from the uninterrupted run");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count() as u64, steps);
}

/// xorshift64: seeded kill times.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

#[test]
fn sigkill_at_random_moments_never_leaves_a_checkpoint_that_does_not_load() {
    let dir = scratch("sigkill");
    let (m, steps) = (model("gpt2-policy"), 24);
    let whole = dir.join("whole");
    let t0 = Instant::now();
    succeeds(run_args(&mut train(&m, &prefs(), &whole), steps, 1));
    // The length of a whole run (start-up included), with some margin.
    let span = (t0.elapsed().as_millis() as u64 * 5 / 4).max(20);
    let want = final_weights(&whole);

    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let (target, kills_per_chain) = (24, 4);
    let (mut kills, mut finished_early, mut checked, mut chains, mut mid_write) = (0, 0, 0, 0, 0);
    let started = Instant::now();
    while kills < target {
        assert!(chains < 40, "kills do not land: {kills} in {chains} chains");
        let run = dir.join(format!("run-{chains}"));
        chains += 1;
        for _ in 0..kills_per_chain {
            // Continue the run: from its newest checkpoint, or from the start when there is none yet. The
            // kill time is drawn over the time the rest of the run takes.
            let newest = checkpoints(&run).last().map(|(s, _)| *s).unwrap_or(0);
            let window = (span * (steps - newest + 1) / steps).max(10);
            let mut cmd = if checkpoints(&run).is_empty() {
                let mut c = train(&m, &prefs(), &run);
                run_args(&mut c, steps, 1).arg("--overwrite");
                c
            } else {
                let mut c = dpo();
                c.args(["train", "--resume"]).arg(&run);
                c
            };
            let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
            std::thread::sleep(Duration::from_millis(rng.below(window)));
            let done = child.try_wait().unwrap().is_some();
            if !done {
                child.kill().unwrap();
                kills += 1;
            }
            child.wait().unwrap();
            // A kill in the middle of a checkpoint write leaves its temporary directory (removed by the
            // next save), never a `step-N`.
            let tmp = |e: &std::fs::DirEntry| e.file_name().to_string_lossy().starts_with(".step-");
            if std::fs::read_dir(run.join("checkpoints")).into_iter().flatten().flatten().any(|e| tmp(&e)) {
                mid_write += 1;
            }
            for (_, ckpt) in checkpoints(&run) {
                assert_checkpoint_loads(&ckpt);
                checked += 1;
            }
            if done {
                finished_early += 1;
                break;
            }
        }
        // Finish the run without interruption and compare.
        if checkpoints(&run).is_empty() {
            // No checkpoint yet: --resume says so, and the run starts over.
            if run.join("config.toml").is_file() {
                fails(dpo().args(["train", "--resume"]).arg(&run), &["no checkpoint found in"]);
            }
            succeeds(run_args(&mut train(&m, &prefs(), &run), steps, 1).arg("--overwrite"));
        } else {
            succeeds(dpo().args(["train", "--resume"]).arg(&run));
        }
        assert!(final_weights(&run) == want, "chain {chains}: weights differ from the uninterrupted run");
        for (_, ckpt) in checkpoints(&run) {
            assert_checkpoint_loads(&ckpt);
        }
    }
    println!(
        "SIGKILL: {kills} kills ({mid_write} in the middle of a checkpoint write; {finished_early} runs finished \
         before their kill time), {checked} checkpoint directories loaded, {chains} resumed runs bit-identical \
         to the uninterrupted one, in {:.1} s (kill times 0..{span} ms)",
        started.elapsed().as_secs_f64()
    );
}

/// `dpo reward-model train` on the GPT-2 fixture, batches of 4 in a seeded shuffle.
fn reward_model_train(data: &Path, run: &Path, steps: u64) -> Command {
    let mut c = dpo();
    c.args(["reward-model", "train", "--lr", "5e-3", "--batch-size", "4", "--max-steps", &steps.to_string()])
        .arg("--model")
        .arg(model("gpt2-policy"))
        .arg("--data")
        .arg(data)
        .arg("--output")
        .arg(run);
    c
}

#[test]
fn reward_model_sigterm_writes_a_checkpoint_and_resume_matches_an_uninterrupted_run() {
    let dir = scratch("rm-sigterm");
    let steps = 300;
    let whole = dir.join("whole");
    succeeds(&mut reward_model_train(&prefs(), &whole, steps));

    let run = dir.join("run");
    let mut child = reward_model_train(&prefs(), &run, steps)
        .args(["--save-every", "7"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while lines(&run.join("metrics.jsonl")) < 20 {
        assert!(t0.elapsed() < Duration::from_secs(60), "the run did not get going");
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be interrupted");
        std::thread::sleep(Duration::from_millis(5));
    }
    let kill = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let at = err.find("interrupted after step ").unwrap_or_else(|| panic!("no interruption message:\n{err}"));
    let step: u64 = err[at + 23..].split('/').next().unwrap().parse().unwrap();
    assert!((20..steps).contains(&step), "{err}");
    let ckpt = run.join(format!("checkpoints/step-{step}"));
    assert!(err.contains(&format!("checkpoint written to {}", ckpt.display())), "{err}");
    assert!(err.contains(&format!("resume with: dpo reward-model train --resume {}", run.display())), "{err}");
    assert_eq!(checkpoints(&run).last().map(|(s, _)| *s), Some(step));
    assert!(checkpoints(&run).iter().all(|(s, _)| *s == step || s % 7 == 0));
    assert_checkpoint_loads(&ckpt);
    assert!(ckpt.join("reward_head.safetensors").is_file());
    assert!(!run.join("final").exists());
    println!("SIGTERM after step {step}/{steps}");

    let err = succeeds(dpo().args(["reward-model", "train", "--resume"]).arg(&run));
    assert!(err.contains(&format!("resuming at step {step}")), "{err}");
    for f in ["final/model.safetensors", "final/reward_head.safetensors"] {
        let (a, b) = (std::fs::read(run.join(f)).unwrap(), std::fs::read(whole.join(f)).unwrap());
        assert!(a == b, "{f}: the resumed run differs from the uninterrupted one");
    }
    let metrics = |r: &Path| std::fs::read_to_string(r.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics(&run).lines().count() as u64, steps);
    assert_eq!(metrics(&run), metrics(&whole), "metrics.jsonl of the resumed run");
}

/// `dpo ppo` on the GPT-2 fixture against `rm`: two rollouts of four tokens per step, one update each.
fn ppo(rm: &Path, prompts: &Path, run: &Path, steps: u64) -> Command {
    let mut c = dpo();
    c.args(["ppo", "--lr", "1e-3", "--rollout-prompts", "2", "--minibatch", "1", "--ppo-epochs", "1"])
        .args(["--max-new-tokens", "4", "--steps", &steps.to_string()])
        .arg("--model")
        .arg(model("gpt2-policy"))
        .arg("--reward-model")
        .arg(rm)
        .arg("--prompts")
        .arg(prompts)
        .arg("--output")
        .arg(run);
    c
}

/// metrics.jsonl without the entry that times each step (`time`: `seconds`, `tokens_per_s`).
fn metrics_without(run: &Path, time: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let mut lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for l in &mut lines {
        assert!(l.as_object_mut().unwrap().remove(time).is_some(), "{l}");
    }
    lines
}

/// Sends SIGTERM once `run` has `after` metrics lines; returns the step the interrupted run reports.
fn interrupt(mut cmd: Command, run: &Path, after: usize, steps: u64, resume_with: &str) -> u64 {
    let mut child = cmd.stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    let t0 = Instant::now();
    while lines(&run.join("metrics.jsonl")) < after {
        assert!(t0.elapsed() < Duration::from_secs(60), "the run did not get going");
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be interrupted");
        std::thread::sleep(Duration::from_millis(2));
    }
    let kill = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let at = err.find("interrupted after step ").unwrap_or_else(|| panic!("no interruption message:\n{err}"));
    let step: u64 = err[at + 23..].split('/').next().unwrap().parse().unwrap();
    assert!((after as u64..steps).contains(&step), "{err}");
    let ckpt = run.join(format!("checkpoints/step-{step}"));
    assert!(err.contains(&format!("checkpoint written to {}", ckpt.display())), "{err}");
    assert!(err.contains(&format!("resume with: {resume_with} --resume {}", run.display())), "{err}");
    assert_checkpoint_loads(&ckpt);
    assert!(!run.join("final").exists());
    step
}

#[test]
fn ppo_sigterm_writes_a_checkpoint_and_resume_matches_an_uninterrupted_run() {
    let dir = scratch("ppo-sigterm");
    let rm = dir.join("rm");
    succeeds(&mut reward_model_train(&prefs(), &rm, 2));
    let rows =
        ["Tell me about a kite.", "Why is the sky blue?", "Name a fruit."].map(|p| serde_json::json!({"prompt": p}));
    let prompts = jsonl(&dir.join("prompts.jsonl"), &rows);
    let steps = 300;
    let whole = dir.join("whole");
    succeeds(&mut ppo(&rm, &prompts, &whole, steps));

    let run = dir.join("run");
    let mut cmd = ppo(&rm, &prompts, &run, steps);
    cmd.args(["--save-every", "7"]);
    let step = interrupt(cmd, &run, 20, steps, "dpo ppo");
    assert_eq!(checkpoints(&run).last().map(|(s, _)| *s), Some(step));
    assert!(checkpoints(&run).iter().all(|(s, _)| *s == step || s % 7 == 0));
    let ckpt = run.join(format!("checkpoints/step-{step}"));
    for f in ["reward_head.safetensors", "ppo_state.json"] {
        assert!(ckpt.join(f).is_file(), "{f}");
    }
    println!("SIGTERM after PPO step {step}/{steps}");

    // Resuming with other settings or another input is refused, naming what differs, and writes nothing.
    let copy = dir.join("copy");
    std::fs::create_dir_all(&copy).unwrap();
    for f in ["config.toml", "metrics.jsonl"] {
        std::fs::copy(run.join(f), copy.join(f)).unwrap();
    }
    let to = copy.join(format!("checkpoints/step-{step}"));
    std::fs::create_dir_all(to.join("model")).unwrap();
    for e in std::fs::read_dir(&ckpt).unwrap().chain(std::fs::read_dir(ckpt.join("model")).unwrap()) {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, to.join(p.strip_prefix(&ckpt).unwrap())).unwrap();
        }
    }
    let config = std::fs::read_to_string(copy.join("config.toml")).unwrap();
    std::fs::write(copy.join("config.toml"), config.replace("kl_coef = 0.05", "kl_coef = 0.1")).unwrap();
    fails(dpo().args(["ppo", "--resume"]).arg(&copy), &["kl_coef 0.05 in the checkpoint, 0.1 now"]);
    let other_rm = dir.join("other-rm");
    succeeds(&mut reward_model_train(&prefs(), &other_rm, 3));
    let moved = config.replace(&format!("{}\"", rm.display()), &format!("{}\"", other_rm.display()));
    assert_ne!(moved, config);
    std::fs::write(copy.join("config.toml"), &moved).unwrap();
    fails(dpo().args(["ppo", "--resume"]).arg(&copy), &["written by a run with another reward model"]);
    assert_eq!(std::fs::read_to_string(copy.join("config.toml")).unwrap(), moved);

    let err = succeeds(dpo().args(["ppo", "--resume"]).arg(&run));
    assert!(err.contains(&format!("resuming at step {step}")), "{err}");
    let last = format!("checkpoints/step-{steps}");
    for f in ["final/model.safetensors", &format!("{last}/reward_head.safetensors"), &format!("{last}/ppo_state.json")]
    {
        let (a, b) = (std::fs::read(run.join(f)).unwrap(), std::fs::read(whole.join(f)).unwrap());
        assert!(a == b, "{f}: the resumed run differs from the uninterrupted one");
    }
    for f in ["optimizer.safetensors", "trainer_state.json"] {
        let (a, b) =
            (std::fs::read(run.join(&last).join(f)).unwrap(), std::fs::read(whole.join(&last).join(f)).unwrap());
        assert!(a == b, "{last}/{f}: the resumed run differs from the uninterrupted one");
    }
    let metrics = metrics_without(&run, "seconds");
    assert_eq!(metrics.len() as u64, steps);
    assert!(metrics == metrics_without(&whole, "seconds"), "metrics.jsonl of the resumed run");
}

/// Unlikelihood is a loss of the one training loop (`dpo train --loss unlikelihood`): interrupted and
/// resumed, it ends with the weights and metrics of an uninterrupted run.
#[test]
fn unlikelihood_sigterm_writes_a_checkpoint_and_resume_matches_an_uninterrupted_run() {
    let dir = scratch("unlikelihood-sigterm");
    let (m, steps) = (model("gpt2-policy"), 300);
    let unlikelihood = |run: &Path| {
        let mut c = train(&m, &prefs(), run);
        run_args(&mut c, steps, 7).args(["--loss", "unlikelihood", "--unlikelihood-alpha", "0.5"]);
        c
    };
    let whole = dir.join("whole");
    succeeds(&mut unlikelihood(&whole));

    let run = dir.join("run");
    let step = interrupt(unlikelihood(&run), &run, 20, steps, "dpo train");
    assert_eq!(checkpoints(&run).last().map(|(s, _)| *s), Some(step));
    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(config.contains("method = \"unlikelihood\"") && config.contains("unlikelihood_alpha = 0.5"), "{config}");
    println!("SIGTERM after unlikelihood step {step}/{steps}");

    let err = succeeds(dpo().args(["train", "--resume"]).arg(&run));
    assert!(err.contains(&format!("resuming at step {step}")), "{err}");
    assert!(final_weights(&run) == final_weights(&whole), "resumed weights differ from the uninterrupted run");
    let metrics = metrics_without(&run, "tokens_per_s");
    assert_eq!(metrics.len() as u64, steps);
    assert!(metrics[0]["logps/rejected"].is_f64(), "{}", metrics[0]);
    assert!(metrics == metrics_without(&whole, "tokens_per_s"), "metrics.jsonl of the resumed run");
}

/// A PPO minibatch whose loss is not finite (a learning rate that blows the weights up): by default the run
/// stops, writes the checkpoint of the state before that PPO step and says how to go on; resumed with
/// `--on-nonfinite skip` it drops such updates, counts them in metrics.jsonl and ends without a panic.
#[test]
fn ppo_nonfinite_stops_at_the_last_good_state_and_skip_goes_on() {
    let dir = scratch("ppo-nonfinite");
    let rm = dir.join("rm");
    succeeds(&mut reward_model_train(&prefs(), &rm, 2));
    let prompts = jsonl(&dir.join("prompts.jsonl"), &[serde_json::json!({"prompt": "Name a fruit."})]);
    let run = dir.join("run");
    let mut c = dpo();
    c.args(["ppo", "--lr", "1e30", "--max-grad-norm", "1e30", "--rollout-prompts", "2", "--minibatch", "1"])
        .args(["--max-new-tokens", "4", "--steps", "4", "--model"])
        .arg(model("gpt2-policy"))
        .arg("--reward-model")
        .arg(&rm)
        .arg("--prompts")
        .arg(&prompts)
        .arg("--output")
        .arg(&run);
    let out = c.output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("error: ") && !err.contains("panicked"), "{err}");
    for want in ["PPO step 1: the loss or its gradient is not finite", "--on-nonfinite skip"] {
        assert!(err.contains(want), "{want}: {err}");
    }
    assert!(err.contains(&format!("last good state written to {}", run.join("checkpoints/step-0").display())), "{err}");
    assert_checkpoint_loads(&run.join("checkpoints/step-0"));
    let err = succeeds(dpo().args(["ppo", "--resume"]).arg(&run).args(["--on-nonfinite", "skip"]));
    assert!(err.contains("update skipped") && !err.contains("panicked"), "{err}");
    let metrics = metrics_without(&run, "seconds");
    assert_eq!(metrics.len(), 4);
    assert!(metrics.iter().any(|m| m["skipped_updates"].as_u64() > Some(0)), "{metrics:?}");
    assert!(run.join("final/model.safetensors").is_file());
}
