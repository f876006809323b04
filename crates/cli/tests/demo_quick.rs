//! `dpo demo --quick` runs the whole built-in experiment end to end (pretraining, pairs, every method,
//! report) and writes its report files.

use std::process::Command;

#[test]
fn quick_demo_writes_the_report() {
    let out = std::env::temp_dir().join(format!("dpo-demo-quick-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let run = Command::new(env!("CARGO_BIN_EXE_dpo")).args(["demo", "--quick", "--output"]).arg(&out).output().unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "dpo demo --quick failed:\n{stderr}\n{stdout}");
    assert!(stdout.contains("| DPO |"), "no results table on stdout:\n{stdout}");

    for f in [
        "report.md",
        "report.json",
        "frontier.png",
        "gradient_weight.png",
        "win_rate_temperature.png",
        "data/pairs.jsonl",
    ] {
        let p = out.join(f);
        assert!(p.is_file() && std::fs::metadata(&p).unwrap().len() > 0, "{} missing or empty", p.display());
    }
    let png = std::fs::read(out.join("frontier.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let runs = report["runs"].as_array().unwrap();
    for method in ["DPO", "PPO", "PPO-GT", "Preferred-FT", "Unlikelihood", "Best-of-N"] {
        let r: Vec<_> = runs.iter().filter(|r| r["method"] == method).collect();
        assert!(!r.is_empty(), "report.json has no {method} run");
        for run in r {
            let points = run["points"].as_array().unwrap();
            assert!(!points.is_empty(), "{method}: no measured point");
            for p in points {
                assert!(p["kl"].as_f64().unwrap().is_finite() && p["reward"].as_f64().unwrap().abs() <= 1.0, "{p}");
            }
        }
    }
    assert!(report["sft"]["kl"].as_f64().unwrap().abs() < 1e-9, "the SFT model's KL to itself is 0");
    let accuracies = report["reward_accuracy"].as_array().unwrap();
    assert!(accuracies.iter().any(|a| a["scorer"].as_str().unwrap().contains("reward model")));
    assert!(accuracies.iter().any(|a| a["scorer"].as_str().unwrap().contains("DPO")));
    assert!(!report["verdict"].as_str().unwrap().is_empty());
    // Win rates against the preferred completions: a curve over at least 4 temperatures in [0, 1] for
    // DPO, PPO, Preferred-FT and SFT, and every method (Best-of-N included) at temperature 1, each with
    // its interval around it.
    let in_interval = |w: &serde_json::Value| {
        let (r, lo, hi) =
            (w["win_rate"].as_f64().unwrap(), w["ci_low"].as_f64().unwrap(), w["ci_high"].as_f64().unwrap());
        assert!((0.0..=1.0).contains(&r) && lo <= r && r <= hi && w["n"].as_u64().unwrap() > 0, "{w}");
    };
    for method in ["DPO", "PPO", "Preferred-FT", "SFT"] {
        let curve = report["win_rate_vs_temperature"][method].as_array().unwrap();
        assert!(curve.len() >= 4, "{method}: {curve:?}");
        assert_eq!(curve[0]["temperature"].as_f64(), Some(0.0));
        assert_eq!(curve.last().unwrap()["temperature"].as_f64(), Some(1.0));
        curve.iter().for_each(in_interval);
    }
    let vs_chosen = report["win_rate_vs_chosen"].as_object().unwrap();
    for method in ["DPO", "PPO", "Preferred-FT", "SFT", "Best-of-16", "Online DPO", "Iterative DPO"] {
        in_interval(&vs_chosen[method]);
    }
    // Online and iterative DPO on the reward-KL frontier judged by the learned reward model, beside
    // offline DPO and the SFT model, and compared at equal KL.
    let frontier = report["frontier"].as_object().unwrap();
    for method in ["SFT", "Online DPO", "Iterative DPO", "DPO beta=0.1"] {
        let pts = frontier[method].as_array().unwrap();
        assert!(!pts.is_empty() && pts.iter().all(|p| p["kl"].as_f64().unwrap().is_finite()), "{method}");
    }
    assert!(runs.iter().any(|r| r["method"] == "Online DPO") && runs.iter().any(|r| r["method"] == "Iterative DPO"));
    assert!(!report["online_vs_offline"].as_array().unwrap().is_empty());
    assert!(out.join("frontier_learned.png").is_file());
    assert!(std::fs::read_to_string(out.join("report.md")).unwrap().contains("## Win rates against the preferred"));
    // The checkpoints every point was measured at are kept.
    assert!(out.join("runs/sft/final/config.json").is_file());
    assert!(std::fs::read_dir(out.join("runs")).unwrap().count() >= 6);
    let _ = std::fs::remove_dir_all(&out);
}
