//! `dpo demo --seeds 2` repeats the experiment and writes the across-seed aggregates. On the quick plan
//! cut down further (a few steps per method, few prompts), since only the aggregation is under test
//! here: about 30 s of CPU.

use std::process::Command;

#[test]
fn two_seeds_write_the_aggregates() {
    let out = std::env::temp_dir().join(format!("dpo-demo-seeds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let sets = [
        "sft.steps=40",
        "corpus_size=3000",
        "dpo.steps=8",
        "dpo_betas=[0.5]",
        "ppo.steps=4",
        "reward_model.steps=10",
        "online.steps.steps=4",
        "online.ablations=true",
        "iterative.steps.steps=2",
        "iterative.prompts=16",
        "train_prompts=48",
        "heldout_pair_prompts=16",
        "eval_prompts=16",
        "bon_ns=[1,4]",
        "win_rate_temperatures=[0,1]",
    ];
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dpo"));
    cmd.args(["demo", "--quick", "--seeds", "2", "--methods", "dpo,ppo,ppo-gt,bon,online,iterative,win-rate"]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let run = cmd.arg("--output").arg(&out).output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "dpo demo --seeds 2 failed:\n{}\n{stdout}", String::from_utf8_lossy(&run.stderr));
    assert!(stdout.contains("across 2 seeds:"), "{stdout}");

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    // The first seed's report keeps its keys; the second seed's experiment is in its own directory.
    assert_eq!(report["plan"]["seed"], 1);
    assert!(report["runs"].as_array().unwrap().iter().any(|r| r["method"] == "DPO"));
    assert!(out.join("seeds/seed-2/report.json").is_file());
    let seeds = report["seeds"].as_array().unwrap();
    assert_eq!(seeds.iter().map(|s| s["seed"].as_u64().unwrap()).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(seeds[1]["dir"], "seeds/seed-2");

    let across = &report["across_seeds"];
    assert_eq!(across["seeds"], serde_json::json!([1, 2]));
    // Each aggregate is the mean of the per-seed values, inside its interval.
    for (method, metric) in [("DPO", "best_reward"), ("PPO", "win_rate_vs_chosen"), ("SFT", "best_reward")] {
        let a = &across["metrics"][method][metric];
        let values: Vec<f64> = a["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(values.len(), 2, "{method} {metric}: {a}");
        let per_seed: Vec<f64> = seeds.iter().map(|s| s["metrics"][method][metric].as_f64().unwrap()).collect();
        assert_eq!(values, per_seed);
        let mean = a["mean"].as_f64().unwrap();
        assert!((mean - (values[0] + values[1]) / 2.0).abs() < 1e-12, "{a}");
        assert!(a["ci_low"].as_f64().unwrap() <= mean && mean <= a["ci_high"].as_f64().unwrap(), "{a}");
    }
    // The orderings the report states, each with its verdict.
    let orderings = across["orderings"].as_array().unwrap();
    for (a, b) in
        [("DPO", "PPO"), ("DPO", "Best-of-4"), ("Online DPO", "offline DPO"), ("Iterative DPO", "offline DPO")]
    {
        let o = orderings.iter().find(|o| o["a"] == a && o["b"] == b).unwrap_or_else(|| panic!("{a} vs {b}"));
        assert_eq!(o["difference"]["values"].as_array().unwrap().len(), 2, "{o}");
        assert!(!o["beyond_interval"].as_str().unwrap().is_empty() && !o["sentence"].as_str().unwrap().is_empty());
    }
    // The online DPO ablations ran, each against offline DPO and against the variant it changes one thing of.
    for (a, b) in [
        ("Online DPO (GT labels)", "offline DPO"),
        ("Online DPO (GT labels, offline budget)", "offline DPO"),
        ("Online DPO (GT labels)", "Online DPO"),
        ("Online DPO (offline budget)", "Online DPO"),
    ] {
        let o = orderings.iter().find(|o| o["a"] == a && o["b"] == b).unwrap_or_else(|| panic!("{a} vs {b}"));
        let per_seed = |m: &str| -> Vec<f64> {
            let k = "final_minus_offline_at_equal_kl (ground truth)";
            seeds.iter().map(|s| s["metrics"][m][k].as_f64().unwrap_or(0.0)).collect()
        };
        if o["metric"] == "final_minus_offline_at_equal_kl (ground truth)" && b != "offline DPO" {
            let want: Vec<f64> = per_seed(a).iter().zip(per_seed(b)).map(|(x, y)| x - y).collect();
            let got: Vec<f64> =
                o["difference"]["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            assert_eq!(got, want, "{o}");
        }
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("### Why online DPO is where it is: ablations"), "{md}");
    assert!(md.contains("## Across seeds") && md.contains("Hold beyond the 95% interval across seeds"), "{md}");
    let _ = std::fs::remove_dir_all(&out);
}
