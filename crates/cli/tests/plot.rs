//! `dpo plot RUN`: the training curves of a run as one PNG, panels for what the run logged.

mod common;

use std::path::Path;

use common::{dpo, fails, model, ppo, prefs, scratch, stderr, train, trained_reward_model};

/// Width and height from a PNG's IHDR.
fn png_size(path: &Path) -> (u32, u32) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "{} is not a PNG", path.display());
    (u32::from_be_bytes(b[16..20].try_into().unwrap()), u32::from_be_bytes(b[20..24].try_into().unwrap()))
}

#[test]
fn plot_draws_every_logged_curve_in_one_picture() {
    let dir = scratch("plot-dpo");
    let run = dir.join("run");
    let o = train(&model("llama-policy"), &prefs(), &run)
        .args(["--max-steps", "6", "--eval-every", "3", "--eval-data"])
        .arg(prefs())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains(&format!("dpo plot {}", run.display())), "the summary points at dpo plot");
    let o = dpo().arg("plot").arg(&run).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    for panel in
        ["Loss", "Reward margin", "Reward accuracy", "Chosen and rejected rewards", "DPO gradient weight", "Log-probs"]
    {
        assert!(err.contains(panel), "no {panel} panel: {err}");
    }
    assert!(err.contains("6 steps"), "{err}");
    // Six 1200 x 800 panels, three a row.
    assert_eq!(png_size(&run.join("curves.png")), (3600, 1600));

    // --out, and a metrics file given directly.
    let out = dir.join("elsewhere.png");
    let o = dpo().arg("plot").arg(run.join("metrics.jsonl")).arg("--out").arg(&out).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(png_size(&out), (3600, 1600));
}

#[test]
fn plot_of_an_sft_run_has_its_loss_only_and_bad_input_is_one_message() {
    let dir = scratch("plot-sft");
    let run = dir.join("run");
    let o = dpo()
        .args(["sft", "--lr", "5e-3", "--max-steps", "3", "--model"])
        .arg(model("llama-policy"))
        .arg("--data")
        .arg(prefs())
        .arg("--output")
        .arg(&run)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let o = dpo().arg("plot").arg(&run).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).ends_with("3 steps; Loss\n"), "{}", stderr(&o));
    assert_eq!(png_size(&run.join("curves.png")), (1200, 800));

    fails(dpo().arg("plot").arg(&dir), &["no metrics.jsonl"]);
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, "{\"step\": 1, \"loss\": 0.5}\nnot json\n").unwrap();
    fails(dpo().arg("plot").arg(&bad), &["bad.jsonl line 2"]);
    std::fs::write(&bad, "{\"step\": 1, \"grad_norm\": 0.5}\n").unwrap();
    fails(dpo().arg("plot").arg(&bad), &["no step has loss or reward metrics"]);
}

/// A reward model's run plots its loss, accuracy and margin; a PPO run its reward, KL, losses,
/// completion length and its reward against its KL.
#[test]
fn plot_of_reward_model_and_ppo_runs() {
    let dir = scratch("plot-rlhf");
    let rm = trained_reward_model(&dir);
    let o = dpo().arg("plot").arg(&rm).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).ends_with("2 steps; Loss, Reward model accuracy, Reward model margin\n"), "{}", stderr(&o));
    assert_eq!(png_size(&rm.join("curves.png")), (3600, 800));

    let prompts = dir.join("prompts.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"Tell me about a kite.\"}\n").unwrap();
    let run = dir.join("ppo");
    let o = ppo(&rm, &prompts).args(["--steps", "3", "--output"]).arg(&run).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let o = dpo().arg("plot").arg(&run).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let want = "3 steps; PPO reward, KL to the reference, PPO losses, Completion length, Reward against KL\n";
    assert!(stderr(&o).ends_with(want), "{}", stderr(&o));
    assert_eq!(png_size(&run.join("curves.png")), (3600, 1600));
}
