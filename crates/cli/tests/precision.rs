//! `--precision bf16` through the real binary: scores close to f32 but not equal to them (the flag reaches
//! the passes), a training run that records it, compares its policy with a bf16 reference bit for bit,
//! keeps it on resume and keys its reference cache by it, and a bad value refused by name.

mod common;

use std::path::Path;

use common::*;

/// The fixture models of every decoder family.
const MODELS: [&str; 4] = ["gpt2-policy", "llama-policy", "llama3-policy", "neox-policy"];

/// Largest |bf16 - f32| of a row's summed log-prob, per scored token. Summed log-probs of the fixture rows
/// (about 36 completion tokens) differ by up to 0.28 nats, 0.019 per token (llama3; gpt2 0.008, neox
/// 0.005): autocast's 8-bit mantissa rounds every product's operands by up to 2^-9 relative. 0.05 per
/// token leaves 2.5x room over the worst family and is still far below what would signal a wrong pass
/// (a missing layer or a wrong weight moves a token's log-prob by whole nats).
const BF16_NATS_PER_TOKEN: f64 = 0.05;

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
    let lines = text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap());
    lines.filter(|m| m["step"].as_u64() == Some(step)).last().unwrap()
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
        &["precision = \"bf16\"", "precision = \"f32\"", "--precision bf16"],
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
