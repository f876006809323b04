//! `--precision bf16` through the real binary: scores close to f32 but not equal to them (the flag reaches
//! the passes), a training run that records it, compares its policy with a bf16 reference bit for bit,
//! keeps it on resume and keys its reference cache by it, and a bad value refused by name.

mod common;

use std::path::Path;

use common::*;

/// The fixture models of every decoder family.
const MODELS: [&str; 4] = ["gpt2-policy", "llama-policy", "llama3-policy", "neox-policy"];

/// Largest |bf16 - f32| of a row's summed log-prob, per scored token. Summed log-probs of the fixture rows
/// (about 36 completion tokens) differ by up to 0.37 nats, 0.034 per token (llama3; llama 0.019, gpt2 0.009,
/// neox 0.003; measured with the vdpbf16ps kernel and q/k/v rounded before attention, as autocast does):
/// every product's operands are rounded to bf16's 8-bit mantissa, up to 2^-9 relative. 0.1 per token leaves
/// 3x room over the worst family and is still far below what a wrong pass would do (a missing layer or a
/// wrong weight moves a token's log-prob by whole nats). The accuracy against PyTorch's autocast is held by
/// crates/dpo/tests/bf16_accuracy.rs.
const BF16_NATS_PER_TOKEN: f64 = 0.1;

fn logps(model: &Path, precision: &str) -> Vec<serde_json::Value> {
    let out =
        dpo().args(["logps", "--precision", precision]).arg("--model").arg(model).arg("--data").arg(prefs()).output();
    let out = out.unwrap();
    assert!(out.status.success(), "dpo logps --precision {precision} failed:\n{}", stderr(&out));
    String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn bf16_logps_are_close_to_f32_and_not_equal() {
    for name in MODELS {
        let (f32_rows, bf16_rows) = (logps(&model(name), "f32"), logps(&model(name), "bf16"));
        assert_eq!(f32_rows.len(), bf16_rows.len());
        let mut differing = 0;
        for (a, b) in f32_rows.iter().zip(&bf16_rows) {
            for side in ["chosen", "rejected"] {
                let (x, y) =
                    (a[format!("{side}_logps")].as_f64().unwrap(), b[format!("{side}_logps")].as_f64().unwrap());
                let tokens = a[format!("{side}_len")].as_f64().unwrap();
                assert!(
                    (x - y).abs() <= BF16_NATS_PER_TOKEN * tokens,
                    "{name} {side}: f32 {x}, bf16 {y} ({tokens} tokens)"
                );
                differing += (x != y) as usize;
            }
        }
        // Every row goes through bf16 products: none may come out bit-identical to f32.
        assert_eq!(differing, 2 * f32_rows.len(), "{name}: some bf16 log-probs equal the f32 ones");
    }
}

/// The metrics line of `step` of a run.
fn metrics_at(run: &Path, step: u64) -> serde_json::Value {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let mut lines = text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap());
    lines.rfind(|m| m["step"].as_u64() == Some(step)).unwrap()
}

#[test]
fn a_bf16_run_records_its_precision_keeps_it_on_resume_and_its_reference_matches_bit_for_bit() {
    let dir = scratch("precision-train");
    let cache = dir.join("cache");
    let run = |name: &str, flags: &[&str]| {
        let out = dir.join(name);
        let mut c = train(&model("llama-policy"), &prefs(), &out);
        c.args(["--batch-size", "4", "--max-steps", "2", "--save-every", "1"]).args(flags);
        let err = succeeds(&mut c);
        (out, err)
    };
    let (f32_run, _) = run("f32", &[]);
    let (bf16_run, _) = run("bf16", &["--precision", "bf16"]);
    let config = std::fs::read_to_string(bf16_run.join("config.toml")).unwrap();
    assert!(config.contains("precision = \"bf16\""), "{config}");
    assert!(std::fs::read_to_string(f32_run.join("config.toml")).unwrap().contains("precision = \"f32\""));

    // Step 1: the policy is the starting weights, the reference a copy whose block linears are stored in
    // bf16. Its bf16 log-probs must equal the policy's bit for bit (every reward exactly 0), and differ
    // from the f32 run's.
    let (a, b) = (metrics_at(&f32_run, 1), metrics_at(&bf16_run, 1));
    for key in ["rewards/chosen", "rewards/rejected"] {
        assert_eq!(b[key].as_f64(), Some(0.0), "bf16 {key}: the reference pass differs from the policy's: {b}");
    }
    for key in ["logps/chosen", "logps/rejected"] {
        let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
        assert!(x != y && (x - y).abs() < 0.05 * x.abs(), "{key}: f32 {x}, bf16 {y}");
    }

    // A resume with another precision is refused by name, before anything is written; without the flag it
    // continues in bf16.
    let before = std::fs::read_to_string(bf16_run.join("metrics.jsonl")).unwrap();
    fails(
        dpo().args(["train", "--precision", "f32", "--resume"]).arg(&bf16_run),
        &["precision: \"bf16\" -> \"f32\"", "config.toml: precision = \"bf16\""],
    );
    assert_eq!(std::fs::read_to_string(bf16_run.join("metrics.jsonl")).unwrap(), before);
    succeeds(dpo().args(["train", "--max-steps", "3", "--resume"]).arg(&bf16_run));
    assert_eq!(metrics_at(&bf16_run, 3)["step"].as_u64(), Some(3));
    assert!(std::fs::read_to_string(bf16_run.join("config.toml")).unwrap().contains("precision = \"bf16\""));

    // Precomputed reference log-probs of each precision are cached apart: the bf16 run computes its own.
    let cache_flags = |p: &'static str| ["--precompute-ref", "--cache-dir", cache.to_str().unwrap(), "--precision", p];
    let (_, err) = run("cached-f32", &cache_flags("f32"));
    assert!(err.contains("computed and cached"), "{err}");
    let (_, err) = run("cached-bf16", &cache_flags("bf16"));
    assert!(err.contains("computed and cached") && !err.contains("read from cache"), "{err}");
    let (_, err) = run("cached-bf16-again", &cache_flags("bf16"));
    assert!(err.contains("read from cache"), "{err}");
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 2, "one cache file per precision");
}

#[test]
fn a_bad_precision_is_refused_by_name() {
    let out = dpo()
        .args(["logps", "--precision", "fp16"])
        .arg("--model")
        .arg(model("gpt2-policy"))
        .arg("--data")
        .arg(prefs())
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--precision") && err.contains("fp16") && err.contains("bf16"), "{err}");

    let dir = scratch("precision-bad");
    let config = dir.join("run.toml");
    std::fs::write(&config, "precision = \"fp16\"\n").unwrap();
    let mut c = train(&model("gpt2-policy"), &prefs(), &dir.join("run"));
    fails(c.arg("--config").arg(&config), &["precision", "fp16"]);
}

/// Runs `cmd` with `--precision p` (and the arguments after it) and returns its standard output.
fn output_with(cmd: &[&str], p: &str, args: impl FnOnce(&mut std::process::Command)) -> String {
    let mut c = dpo();
    c.args(cmd).args(["--precision", p]);
    args(&mut c);
    let out = c.output().unwrap();
    assert!(out.status.success(), "dpo {} --precision {p} failed:\n{}", cmd.join(" "), stderr(&out));
    String::from_utf8(out.stdout).unwrap()
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text.lines().next().unwrap()).unwrap()
}

/// The commands beside `train` and `logps`: each reads the flag, and its passes (policy, reference,
/// reward model) come out in bf16, not f32; the RLHF runs record it and refuse to resume in another.
#[test]
fn every_command_that_runs_the_model_takes_the_precision() {
    let dir = scratch("precision-commands");
    let (policy, reference) = (model("gpt2-policy"), model("gpt2-ref"));
    let pair_args = |c: &mut std::process::Command| {
        c.arg("--model").arg(&policy).arg("--ref-model").arg(&reference).arg("--data").arg(prefs());
    };
    // eval and reward: the policy's and the reference's passes.
    let (a, b) = (json(&output_with(&["eval"], "f32", pair_args)), json(&output_with(&["eval"], "bf16", pair_args)));
    for key in ["logps/chosen", "rewards/chosen"] {
        assert!(a[key] != b[key], "eval {key}: {a} / {b}");
    }
    let (a, b) =
        (json(&output_with(&["reward"], "f32", pair_args)), json(&output_with(&["reward"], "bf16", pair_args)));
    for key in ["chosen_logps", "ref_chosen_logps"] {
        assert!(a[key] != b[key] && (a[key].as_f64().unwrap() - b[key].as_f64().unwrap()).abs() < 2.0, "reward {key}");
    }
    // generate: the prompt's prefill in bf16, decode steps in f32.
    let greedy = |c: &mut std::process::Command| {
        c.args(["--prompt", "hello", "--temperature", "0", "--max-new-tokens", "6", "--model"]).arg(&policy);
    };
    assert!(json(&output_with(&["generate"], "bf16", greedy))["tokens"].as_u64().unwrap() > 0);

    // sft records it like train.
    let sft = dir.join("sft");
    output_with(&["sft"], "bf16", |c| {
        c.args(["--max-steps", "1", "--batch-size", "4", "--model"]).arg(&policy);
        c.arg("--data").arg(prefs()).arg("--output").arg(&sft);
    });
    assert!(std::fs::read_to_string(sft.join("config.toml")).unwrap().contains("precision = \"bf16\""));

    // reward-model train / score, best-of-n and ppo on the bf16 reward model.
    let rm = dir.join("rm");
    output_with(&["reward-model", "train"], "bf16", |c| {
        c.args(["--lr", "5e-3", "--batch-size", "4", "--max-steps", "2", "--model"]).arg(&policy);
        c.arg("--data").arg(prefs()).arg("--output").arg(&rm);
    });
    assert!(std::fs::read_to_string(rm.join("config.toml")).unwrap().contains("precision = \"bf16\""));
    fails(
        dpo().args(["reward-model", "train", "--precision", "f32", "--resume"]).arg(&rm),
        &["--precision f32", "bf16"],
    );
    let score = |p| {
        json(&output_with(&["reward-model", "score"], p, |c| {
            c.arg("--model").arg(&rm).arg("--data").arg(prefs());
        }))
    };
    assert!(score("f32")["chosen_score"] != score("bf16")["chosen_score"]);
    let prompts = jsonl(&dir.join("prompts.jsonl"), &[serde_json::json!({"prompt": "Name a fruit."})]);
    let best = output_with(&["best-of-n"], "bf16", |c| {
        c.args(["--n", "2", "--max-new-tokens", "4", "--model"]).arg(&policy);
        c.arg("--reward-model").arg(&rm).arg("--data").arg(&prompts);
    });
    assert!(json(&best)["score"].is_number(), "{best}");
    let ppo = dir.join("ppo");
    output_with(&["ppo"], "bf16", |c| {
        c.args(["--rollout-prompts", "2", "--minibatch", "1", "--ppo-epochs", "1", "--max-new-tokens", "4"]);
        c.args(["--steps", "1", "--model"]).arg(&policy).arg("--reward-model").arg(&rm);
        c.arg("--prompts").arg(&prompts).arg("--output").arg(&ppo);
    });
    assert!(std::fs::read_to_string(ppo.join("config.toml")).unwrap().contains("precision = \"bf16\""));
    // The first rollout's KL compares the policy with its bf16-stored reference copy: exactly 0.
    assert_eq!(metrics_at(&ppo, 1)["kl"].as_f64(), Some(0.0), "{}", metrics_at(&ppo, 1));
    fails(
        dpo().args(["ppo", "--precision", "f32", "--resume"]).arg(&ppo),
        &[r#"precision "bf16" in the checkpoint, "f32" now"#],
    );
}

/// `dpo bench` and `dpo bench-engine` say which precision they measured and what ran its products; a
/// bf16 LoRA bench stores its base in bf16 as `dpo train` does.
#[test]
fn the_benchmarks_report_their_precision_and_kernel() {
    let engine = json(&output_with(&["bench-engine"], "bf16", |c| {
        c.args(["--arch", "gpt2-small", "--batch", "1", "--seq", "8", "--iters", "1"]);
    }));
    assert_eq!(engine["precision"], "bf16", "{engine}");
    assert!(engine["bf16_kernel"].as_str().is_some_and(|k| !k.is_empty()), "{engine}");
    let bench = json(&output_with(&["bench"], "bf16", |c| {
        c.args([
            "--arch",
            "llama",
            "--lora-r",
            "1",
            "--pairs",
            "1",
            "--prompt",
            "4",
            "--completion",
            "4",
            "--steps",
            "2",
        ]);
    }));
    assert_eq!((&bench["precision"], &bench["base_storage"]), (&"bf16".into(), &"Bf16".into()), "{bench}");
    assert!(bench["bf16_kernel"].as_str().is_some_and(|k| !k.is_empty()), "{bench}");
}
