//! Data-parallel runs through the real binary under OpenMPI's `mpirun` (cargo feature `mpi`; `.ci/run`
//! installs OpenMPI and runs these with `cargo test --release -p dpo-cli --features mpi --test
//! distributed`). Every target compares N ranks of one thread with one process of one thread:
//! - every step's metrics and the final weights agree within 1e-5 (2 ranks; 3 ranks on a batch of 5
//!   that does not divide evenly; SFT);
//! - a run stopped after 3 steps on 2 ranks and resumed on one process to 6 steps ends where an
//!   uninterrupted 6-step run ends;
//! - `dpo eval` and `dpo logps` sharded across ranks print what one process prints; `--precompute-ref`
//!   sharded writes the same cache; `dpo reward-model train` on 3 ranks trains as one process;
//! - SIGTERM to `mpirun` stops every rank after one consistent checkpoint; a rank killed outright ends
//!   the others within a bounded time.
//!
//! What "agree within 1e-5" means here. The ranks' gradients are summed in rank order, one process
//! sums the same terms in one chain: the two differ by f32 reassociation (about 1e-7 of the terms),
//! then the trajectories carry that on. So:
//! - a metric is compared relative to its own magnitude, except where it is a small difference or
//!   mean of larger terms: the `rewards/*` (beta times a policy-minus-reference log-prob) relative to
//!   beta times the log-probs, the `logits/*` (means of logits of both signs) relative to 1;
//! - weights are compared tensor by tensor, as the norm of the difference over the tensor's norm.
//!   AdamW divides each gradient element by its running RMS, so an element whose gradient is rounding
//!   noise (GPT-2's attention key bias has an exactly zero gradient: the softmax ignores a shift common
//!   to all keys) moves by up to the learning rate whatever the noise: such elements differ by that
//!   much between any two summation orders. The AdamW runs therefore train the Llama fixture (no
//!   biases); the GPT-2 run trains with SGD and its every weight is compared at its tensor's scale.
#![cfg(feature = "mpi")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Relative agreement of N ranks with one process (f32 reassociation of the gradient sum).
const TOL: f64 = 1e-5;

/// `mpirun -np n dpo --threads 1` (as root too, more ranks than cores allowed).
fn mpirun(n: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--oversubscribe", "--bind-to", "none", "-np", &n.to_string()]);
    // On SIGTERM mpirun forwards it to every rank and kills them 1 s later unless told to wait longer
    // (the README says so): the ranks finish their step and rank 0 writes a checkpoint first. The same
    // wait bounds how long ranks blocked in a sum outlive a failed rank.
    c.args(["--mca", "odls_base_sigkill_timeout", "10"]);
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    c.arg(env!("CARGO_BIN_EXE_dpo")).args(["--threads", "1"]);
    c
}

fn single() -> Command {
    let mut c = dpo();
    c.args(["--threads", "1"]);
    c
}

/// The training run the comparisons repeat: a fixture, a seeded shuffle, the constant schedule (AdamW at
/// [`ADAMW`]'s rate, which moves the weights, unless the caller adds other optimizer flags).
fn train_args<'a>(
    c: &'a mut Command,
    sub: &str,
    fixture: &str,
    output: &Path,
    batch: usize,
    steps: u64,
) -> &'a mut Command {
    c.args([sub, "--scheduler", "constant", "--save-every", "1000000"])
        .arg("--model")
        .arg(model(fixture))
        .arg("--data")
        .arg(prefs())
        .arg("--output")
        .arg(output)
        .args(["--batch-size", &batch.to_string(), "--max-steps", &steps.to_string()])
}

fn metrics(run: &Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap().as_object().unwrap().clone()).collect()
}

/// Every step's metrics agree (all but the timing; see the module's note on the scales); returns the
/// largest difference relative to its scale.
fn same_metrics(a: &Path, b: &Path) -> f64 {
    let (ma, mb) = (metrics(a), metrics(b));
    assert_eq!(ma.len(), mb.len(), "steps logged");
    let mut worst = 0.0f64;
    for (step, (x, y)) in ma.iter().zip(&mb).enumerate() {
        let keys: Vec<_> = x.keys().filter(|k| k.as_str() != "tokens_per_s").collect();
        assert_eq!(keys, y.keys().filter(|k| k.as_str() != "tokens_per_s").collect::<Vec<_>>());
        let logps = ["logps/chosen", "logps/rejected"].map(|k| x.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0));
        for k in keys {
            let (p, q) = match (x[k].as_f64(), y[k].as_f64()) {
                (Some(p), Some(q)) => (p, q),
                _ => {
                    assert_eq!(x[k], y[k], "step {}: {k}", step + 1);
                    continue;
                }
            };
            let scale = match k.as_str() {
                k if k.starts_with("rewards/") => BETA * logps[0].abs().max(logps[1].abs()),
                k if k.starts_with("logits/") => 1.0,
                _ => 0.0,
            };
            let r = if p == q { 0.0 } else { (p - q).abs() / p.abs().max(q.abs()).max(scale) };
            assert!(r <= TOL, "step {}: {k} {p} vs {q} ({r:e} of its scale)", step + 1);
            worst = worst.max(r);
        }
    }
    worst
}

/// The optimizer of most runs here.
const ADAMW: [&str; 2] = ["--lr", "5e-3"];

/// DPO's default beta, which the runs here use.
const BETA: f64 = 0.1;

/// The f32 tensors of a safetensors file, by name.
fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut out: Vec<(String, Vec<f32>)> = header
        .iter()
        .filter(|(k, v)| k.as_str() != "__metadata__" && v["dtype"] == "F32")
        .map(|(k, _)| {
            let r = tensor_range(&header, k);
            (k.clone(), data[r].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// How final weights are compared, tensor by tensor.
#[derive(Clone, Copy, Debug)]
enum Weights {
    /// |a - b| / |a| (Euclidean norms of the tensor).
    Norm,
    /// max |a_i - b_i| / max |a_i|: every element at its tensor's scale.
    Max,
}

/// The final weights agree by `how` within [`TOL`]. Returns the worst tensor's figure, the worst element
/// at its tensor's scale, and the fraction of values bit-identical.
fn same_weights(a: &Path, b: &Path, how: Weights) -> (f64, f64, f64) {
    // A LoRA run's final/ is a PEFT adapter directory.
    let file = |run: &Path| match run.join("final/adapter_model.safetensors") {
        f if f.is_file() => f,
        _ => run.join("final/model.safetensors"),
    };
    let (ta, tb) = (tensors(&file(a)), tensors(&file(b)));
    assert_eq!(ta.len(), tb.len());
    let (mut worst, mut worst_elem, mut same, mut total) = (0.0f64, 0.0f64, 0usize, 0usize);
    for ((name, x), (_, y)) in ta.iter().zip(&tb) {
        let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|v| v * v).sum::<f64>().sqrt();
        let max = |v: &mut dyn Iterator<Item = f64>| v.fold(0.0f64, |m, v| m.max(v.abs()));
        let diff = || x.iter().zip(y).map(|(p, q)| *p as f64 - *q as f64);
        let elem = max(&mut diff()) / max(&mut x.iter().map(|&v| v as f64));
        let r = match how {
            Weights::Norm => norm(&mut diff()) / norm(&mut x.iter().map(|&v| v as f64)),
            Weights::Max => elem,
        };
        let r = if r.is_nan() { 0.0 } else { r };
        assert!(r <= TOL, "{name}: the weights differ by {r:e} ({how:?})");
        worst = worst.max(r);
        worst_elem = worst_elem.max(if elem.is_nan() { 0.0 } else { elem });
        same += x.iter().zip(y).filter(|(p, q)| p.to_bits() == q.to_bits()).count();
        total += x.len();
    }
    (worst, worst_elem, same as f64 / total as f64)
}

/// The relative difference of step 1's gradient norm: the same weights on both sides, so this is the
/// gradient sum's reassociation alone.
fn first_grad_norm(a: &Path, b: &Path) -> f64 {
    let g = |p: &Path| metrics(p)[0]["grad_norm"].as_f64().unwrap();
    (g(a) - g(b)).abs() / g(a)
}

/// `sub` (train or sft) with `extra` flags for 6 steps on one process and on `ranks` ranks: every
/// step's metrics and the final weights agree.
fn ranks_match_one_process(
    name: &str,
    sub: &str,
    fixture: &str,
    extra: &[&str],
    ranks: usize,
    batch: usize,
    how: Weights,
) {
    let dir = scratch(name);
    let (one, many) = (dir.join("one"), dir.join("many"));
    succeeds(train_args(&mut single(), sub, fixture, &one, batch, 6).args(extra));
    let err = succeeds(train_args(&mut mpirun(ranks), sub, fixture, &many, batch, 6).args(extra));
    assert_eq!(err.matches("done: 6 steps").count(), 1, "rank 0 alone reports:\n{err}");
    let m = same_metrics(&one, &many);
    let (w, elem, bits) = same_weights(&one, &many, how);
    println!(
        "{sub} {fixture} {extra:?}, {ranks} ranks, batch {batch}: step-1 gradient norm within {:.1e}; metrics \
         within {m:.1e}; weights within {w:.1e} ({how:?}), worst element {elem:.1e} of its tensor's scale, \
         {:.1}% bit-identical",
        first_grad_norm(&one, &many),
        bits * 100.0
    );
}

#[test]
fn two_ranks_train_as_one_process() {
    ranks_match_one_process("dp2", "train", "llama-policy", &ADAMW, 2, 4, Weights::Norm);
}

#[test]
fn three_ranks_on_an_uneven_batch_train_as_one_process() {
    ranks_match_one_process("dp3", "train", "llama-policy", &ADAMW, 3, 5, Weights::Norm);
}

#[test]
fn two_ranks_with_sgd_match_every_weight() {
    ranks_match_one_process(
        "dp2-sgd",
        "train",
        "gpt2-policy",
        &["--optimizer", "sgd", "--lr", "0.1"],
        2,
        5,
        Weights::Max,
    );
}

#[test]
fn two_ranks_train_a_lora_adapter_as_one_process() {
    let flags = ["--lr", "5e-3", "--lora-r", "4", "--lora-targets", "all-linear"];
    ranks_match_one_process("dp2-lora", "train", "llama-policy", &flags, 2, 4, Weights::Norm);
}

#[test]
fn two_ranks_sft_as_one_process() {
    ranks_match_one_process("dp2-sft", "sft", "llama-policy", &ADAMW, 2, 5, Weights::Norm);
}

/// `--precompute-ref` with an empty cache: the ranks score their shares of the rows, every rank gets all
/// the scores, and the run trains as one process does with its own cache.
#[test]
fn three_ranks_precompute_the_reference_together() {
    let dir = scratch("dp-precompute");
    let (one, many) = (dir.join("one"), dir.join("many"));
    let flags = |cache: &Path| {
        let mut f: Vec<String> = ADAMW.iter().map(|s| s.to_string()).collect();
        f.extend(["--precompute-ref".into(), "--cache-dir".into(), cache.to_string_lossy().into_owned()]);
        f
    };
    succeeds(train_args(&mut single(), "train", "llama-policy", &one, 5, 6).args(flags(&dir.join("cache-one"))));
    succeeds(train_args(&mut mpirun(3), "train", "llama-policy", &many, 5, 6).args(flags(&dir.join("cache-many"))));
    let cache = |d: &str| {
        let e = std::fs::read_dir(dir.join(d)).unwrap().next().expect("a cache file").unwrap();
        let scores: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(e.path()).unwrap()).unwrap();
        scores
    };
    assert_eq!(cache("cache-one"), cache("cache-many"), "the reference log-probs");
    let m = same_metrics(&one, &many);
    let (w, _, _) = same_weights(&one, &many, Weights::Norm);
    println!("--precompute-ref on 3 ranks: the same cache; metrics within {m:.1e}, weights {w:.1e}");
}

#[test]
fn stopped_on_two_ranks_resumed_on_one_ends_as_an_uninterrupted_run() {
    let dir = scratch("dp-resume");
    let (whole, run) = (dir.join("whole"), dir.join("run"));
    succeeds(train_args(&mut single(), "train", "llama-policy", &whole, 4, 6).args(ADAMW));
    succeeds(train_args(&mut mpirun(2), "train", "llama-policy", &run, 4, 3).args(ADAMW));
    assert_checkpoint_loads(&run.join("checkpoints/step-3"));
    let err = succeeds(single().args(["train", "--resume"]).arg(&run).args(["--max-steps", "6"]));
    assert!(err.contains("resuming at step 3"), "{err}");
    let m = same_metrics(&whole, &run);
    let (w, elem, _) = same_weights(&whole, &run, Weights::Norm);
    println!("2 ranks x 3 steps, then 1 process to step 6: metrics within {m:.1e}, weights {w:.1e} (worst element {elem:.1e})");
}

/// Standard output of `cmd`, which must succeed.
fn stdout(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{:?}\n{}", out.status, stderr(&out));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn eval_and_logps_sharded_print_what_one_process_prints() {
    let args = |c: &mut Command, sub: &str| {
        c.arg(sub).arg("--model").arg(model("gpt2-policy")).arg("--data").arg(prefs());
        if sub == "eval" {
            c.arg("--ref-model").arg(model("gpt2-ref")).args(["--batch-size", "5"]);
        }
    };
    for sub in ["eval", "logps"] {
        let mut one = single();
        args(&mut one, sub);
        let mut three = mpirun(3);
        args(&mut three, sub);
        let (a, b) = (stdout(&mut one), stdout(&mut three));
        assert_eq!(a.lines().count(), b.lines().count(), "{sub}: rank 0 alone prints:\n{b}");
        for (x, y) in a.lines().zip(b.lines()) {
            let (x, y): (serde_json::Value, serde_json::Value) =
                (serde_json::from_str(x).unwrap(), serde_json::from_str(y).unwrap());
            for (k, v) in x.as_object().unwrap() {
                match (v.as_f64(), y[k].as_f64()) {
                    (Some(p), Some(q)) => assert!((p - q).abs() <= 1e-12 * p.abs(), "{sub} {k}: {p} vs {q}"),
                    _ => assert_eq!(v, &y[k], "{sub} {k}"),
                }
            }
        }
    }
}

/// Starts a long 2-rank run and waits until it has logged `steps` steps.
fn long_run(run: &Path, steps: usize) -> std::process::Child {
    let mut c = mpirun(2);
    // No step lines: nothing reads the pipe until the run ends, and a full pipe would stall rank 0.
    train_args(&mut c, "train", "gpt2-policy", run, 4, 100_000).args(ADAMW).args(["--log-every", "0"]);
    let mut child = c.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let t0 = Instant::now();
    while lines(&run.join("metrics.jsonl")) < steps {
        assert!(t0.elapsed() < Duration::from_secs(120), "the run did not get going");
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

#[test]
fn sigterm_to_mpirun_stops_every_rank_after_one_checkpoint() {
    let dir = scratch("dp-sigterm");
    let run = dir.join("run");
    let child = long_run(&run, 5);
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    let at = err.find("interrupted after step ").unwrap_or_else(|| panic!("no interruption message:\n{err}"));
    let step: u64 = err[at + 23..].split('/').next().unwrap().parse().unwrap();
    assert_eq!(checkpoints(&run).into_iter().map(|(s, _)| s).collect::<Vec<_>>(), [step], "{err}");
    assert_checkpoint_loads(&run.join(format!("checkpoints/step-{step}")));
    assert_eq!(lines(&run.join("metrics.jsonl")) as u64, step);
    println!("SIGTERM to mpirun: every rank stopped after step {step}");
}

/// The process ids of the ranks writing `run` (every process naming it but `mpirun`).
fn ranks_of(run: &Path, mpirun: u32) -> Vec<u32> {
    let out = Command::new("pgrep").arg("-f").arg(run.to_str().unwrap()).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .filter(|&p| p != mpirun)
        .collect()
}

#[test]
fn a_killed_rank_ends_the_run_in_bounded_time() {
    let dir = scratch("dp-kill");
    let run = dir.join("run");
    let mut child = long_run(&run, 3);
    let ranks = ranks_of(&run, child.id());
    assert!(ranks.len() >= 2, "ranks found: {ranks:?}");
    let victim = *ranks.iter().max().unwrap();
    assert!(Command::new("kill").args(["-KILL", &victim.to_string()]).status().unwrap().success());
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "the other rank still runs 60 s after one was killed");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    use std::io::Read;
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(!status.success());
    assert!(err.contains("signal 9") || err.contains("Killed"), "mpirun does not say what happened:\n{err}");
    let left: Vec<PathBuf> = checkpoints(&run).into_iter().map(|(_, p)| p).collect();
    left.iter().for_each(|p| assert_checkpoint_loads(p));
    println!("a rank killed: the run ended after {:.1} s ({:?})", t0.elapsed().as_secs_f64(), status);
}

#[test]
fn a_command_that_does_not_split_its_work_is_refused_on_several_ranks() {
    let dir = scratch("dp-refused");
    let mut c = mpirun(2);
    c.args(["reward-model", "score", "--model"]).arg(model("gpt2-policy")).arg("--data").arg(prefs());
    let out = c.arg("--out").arg(dir.join("scores.jsonl")).output().unwrap();
    let err = stderr(&out);
    assert!(!out.status.success());
    // Every rank reports (the lines of the two may interleave).
    assert!(err.contains("this command does not run data-parallel (2 processes were started)"), "{err}");
    assert!(!dir.join("scores.jsonl").exists(), "nothing is written");
}

/// `dpo reward-model train` (its own loop): 3 ranks on batches of 5 against one process, with evaluation.
#[test]
fn three_ranks_train_a_reward_model_as_one_process() {
    let dir = scratch("dp-rm");
    let (one, many) = (dir.join("one"), dir.join("many"));
    let args = |c: &mut Command, out: &Path| {
        c.args(["reward-model", "train", "--model"]).arg(model("llama-policy")).arg("--data").arg(prefs());
        c.arg("--eval-data").arg(prefs()).args(["--eval-every", "3", "--batch-size", "5", "--max-steps", "6"]);
        c.args(["--lr", "1e-3"]).arg("--output").arg(out);
    };
    let mut c = single();
    args(&mut c, &one);
    let a = stdout(&mut c);
    let mut c = mpirun(3);
    args(&mut c, &many);
    let b = stdout(&mut c);
    assert_eq!(b.lines().count(), 1, "rank 0 alone prints the summary:\n{b}");
    let m = same_metrics(&one, &many);
    let (w, elem, _) = same_weights(&one, &many, Weights::Norm);
    let summary = |t: &str| serde_json::from_str::<serde_json::Value>(t).unwrap()["eval_loss"].as_f64().unwrap();
    let (x, y) = (summary(&a), summary(&b));
    assert!((x - y).abs() <= TOL * x, "final eval loss {x} vs {y}");
    println!("reward model, 3 ranks: metrics within {m:.1e}, trunk within {w:.1e} (worst element {elem:.1e})");
}
