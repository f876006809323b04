//! `dpo win-rate` end to end on the tiny fixture checkpoints: the self-match invariant (a model against
//! itself at temperature 0 ties every prompt: 0.5), both judges, the file of chosen completions, the
//! chart, and the refusals.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

fn lines(stdout: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn prompts(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("prompts.jsonl");
    let rows = ["Tell me about a kite.", "Tell me about my grandmother.", "Question: What is frozen water called?"];
    let text: String = rows.iter().map(|r| serde_json::json!({ "prompt": r }).to_string() + "\n").collect();
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn a_model_against_itself_at_temperature_0_ties_every_prompt() {
    let dir = scratch("win-rate-self");
    let rm = trained_reward_model(&dir);
    let chart = dir.join("wr.png");
    let mut c = dpo();
    c.args(["win-rate", "--temperatures", "0,1", "--n", "3", "--max-new-tokens", "6", "--model"])
        .arg(model("gpt2-policy"))
        .arg("--against")
        .arg(model("gpt2-policy"))
        .arg("--judge-reward-model")
        .arg(&rm)
        .arg("--prompts")
        .arg(prompts(&dir))
        .arg("--chart")
        .arg(&chart);
    let out = c.output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let rows = lines(&out.stdout);
    assert_eq!(rows.len(), 2);
    let t0 = &rows[0];
    assert_eq!(t0["temperature"], 0.0);
    assert_eq!((t0["win_rate"].as_f64(), t0["ties"].as_u64(), t0["n"].as_u64()), (Some(0.5), Some(9), Some(9)));
    assert!(t0["ci_low"].as_f64().unwrap() < 0.5 && t0["ci_high"].as_f64().unwrap() > 0.5);
    // At temperature 1 the two sides draw different samples: every comparison is counted once.
    let t1 = &rows[1];
    let sum: u64 = ["wins", "ties", "losses"].iter().map(|k| t1[k].as_u64().unwrap()).sum();
    assert_eq!(sum, 9);
    let rate = t1["win_rate"].as_f64().unwrap();
    assert!(t1["ci_low"].as_f64().unwrap() <= rate && rate <= t1["ci_high"].as_f64().unwrap());
    assert_eq!(&std::fs::read(&chart).unwrap()[..8], b"\x89PNG\r\n\x1a\n");

    // The same with the implicit-reward judge, written to a file.
    let out_file = dir.join("wr.jsonl");
    let mut c = dpo();
    c.args(["win-rate", "--temperatures", "0", "--max-new-tokens", "6", "--model"])
        .arg(model("gpt2-policy"))
        .arg("--against")
        .arg(model("gpt2-policy"))
        .arg("--judge-implicit")
        .arg(format!("{},{}", model("gpt2-policy").display(), model("gpt2-ref").display()))
        .arg("--prompts")
        .arg(prompts(&dir))
        .arg("--chart")
        .arg(&chart)
        .arg("--out")
        .arg(&out_file);
    succeeds(&mut c);
    let rows = lines(&std::fs::read(&out_file).unwrap());
    assert_eq!((rows[0]["win_rate"].as_f64(), rows[0]["ties"].as_u64()), (Some(0.5), Some(3)));
}

#[test]
fn against_the_chosen_completions_of_a_file() {
    let dir = scratch("win-rate-data");
    let rm = trained_reward_model(&dir);
    let mut c = dpo();
    c.args(["win-rate", "--temperatures", "0,0.5", "--max-new-tokens", "6", "--model"])
        .arg(model("gpt2-policy"))
        .arg("--against-data")
        .arg(prefs())
        .arg("--judge-reward-model")
        .arg(&rm)
        .arg("--chart")
        .arg(dir.join("wr.png"));
    let out = c.output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let rows = lines(&out.stdout);
    let n_rows = std::fs::read_to_string(prefs()).unwrap().lines().count() as u64;
    for r in &rows {
        assert_eq!(r["n"].as_u64(), Some(n_rows));
        let (w, t, n) = (r["wins"].as_f64().unwrap(), r["ties"].as_f64().unwrap(), r["n"].as_f64().unwrap());
        assert!((r["win_rate"].as_f64().unwrap() - (w + t / 2.0) / n).abs() < 1e-12);
    }
}

#[test]
fn refusals_name_the_flag() {
    let dir = scratch("win-rate-bad");
    let base = || {
        let mut c = dpo();
        c.args(["win-rate", "--model"]).arg(model("gpt2-policy")).arg("--chart").arg(dir.join("x.png"));
        c
    };
    fails(
        base().arg("--against").arg(model("gpt2-policy")).arg("--judge-implicit").arg("only-one"),
        &["--judge-implicit takes POLICY,REF"],
    );
    let judge = format!("{},{}", model("gpt2-policy").display(), model("gpt2-ref").display());
    fails(
        base().arg("--against").arg(model("gpt2-policy")).arg("--judge-implicit").arg(&judge),
        &["--against needs --prompts"],
    );
    fails(
        base().args(["--n", "0"]).arg("--against-data").arg(prefs()).arg("--judge-implicit").arg(&judge),
        &["--n must be at least 1"],
    );
    fails(
        base().args(["--temperatures", "0,-1"]).arg("--against-data").arg(prefs()).arg("--judge-implicit").arg(&judge),
        &["--temperatures: -1"],
    );
}
