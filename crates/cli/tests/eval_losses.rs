//! `dpo eval` reproduces TRL's loss for every loss type on the parity fixtures (`expected/<arch>/losses.json`:
//! policy against reference over all 24 rows, beta 0.1, label smoothing 0.1). The loss types that do not read
//! label smoothing (TRL 1.16's ignore it) are run without `--label-smoothing`, which dpo refuses for them.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parity")
}

#[test]
fn every_trl_loss_type_matches() {
    for arch in ["gpt2", "llama", "llama3", "neox"] {
        let want: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join(format!("expected/{arch}/losses.json"))).unwrap(),
        )
        .unwrap();
        let mut worst = 0.0f64;
        for (loss, value) in want.as_object().unwrap().iter().filter(|(k, _)| !k.starts_with('_')) {
            let smoothing = loss.parse::<dpo::objectives::LossType>().unwrap().reads_label_smoothing();
            let out = Command::new(env!("CARGO_BIN_EXE_dpo"))
                .args(["eval", "--batch-size", "24", "--beta", "0.1", "--loss", loss])
                .args(if smoothing { &["--label-smoothing", "0.1"][..] } else { &[] })
                .arg("--model")
                .arg(fixtures().join(format!("models/{arch}-policy")))
                .arg("--ref-model")
                .arg(fixtures().join(format!("models/{arch}-ref")))
                .arg("--data")
                .arg(fixtures().join("data/prefs.jsonl"))
                .output()
                .unwrap();
            assert!(out.status.success(), "{arch} {loss}: {}", String::from_utf8_lossy(&out.stderr));
            let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let (g, w) = (got["loss"].as_f64().unwrap(), value.as_f64().unwrap());
            let rel = (g - w).abs() / w.abs().max(1e-12);
            worst = worst.max(rel);
            assert!(rel < 1e-4, "{arch} {loss}: dpo eval {g}, TRL {w} (relative error {rel:.2e})");
            if loss == "sigmoid" {
                for (k, v) in want["_metrics"].as_object().unwrap() {
                    let (g, w) = (got[k].as_f64().unwrap(), v.as_f64().unwrap());
                    assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "{arch} {k}: {g} vs {w}");
                }
            }
        }
        println!(
            "{arch}: worst relative loss error {worst:.2e} over {} loss types",
            want.as_object().unwrap().len() - 2
        );
    }
}
