//! `dpo plot RUN`: a run's training curves from its `metrics.jsonl`, one PNG: loss, reward margin, reward
//! accuracy, chosen and rejected rewards, the DPO gradient weight and log-probs, with the evaluation
//! curves (`eval_*`) drawn over the training ones; a reward model's accuracy and margin; a PPO run's
//! reward, KL, losses and completion length, and its reward against its KL (the paper's frontier, one
//! point a step). Panels whose metrics the run did not log are left out.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use dpo_demo::world::plot::{panels_png, Panel, Series, Style};
use serde_json::Value;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The run directory (holding metrics.jsonl), or a metrics.jsonl file.
    run: PathBuf,
    /// The PNG to write [default: RUN/curves.png].
    #[arg(long, value_name = "FILE.png")]
    out: Option<PathBuf>,
}

/// (title, y-axis label, [(metrics key, legend name)]).
type PanelSpec = (&'static str, &'static str, &'static [(&'static str, &'static str)]);

const PANELS: &[PanelSpec] = &[
    ("Loss", "loss", &[("loss", "train")]),
    ("Reward margin", "r(chosen) − r(rejected)", &[("rewards/margins", "train")]),
    ("Reward accuracy", "fraction r(chosen) > r(rejected)", &[("rewards/accuracies", "train")]),
    (
        "Chosen and rejected rewards",
        "β log(π/π_ref)",
        &[("rewards/chosen", "chosen"), ("rewards/rejected", "rejected")],
    ),
    ("DPO gradient weight", "mean weight per pair", &[("dpo/gradient_weight", "train")]),
    ("Log-probs", "summed log-prob", &[("logps/chosen", "chosen"), ("logps/rejected", "rejected")]),
    // `dpo reward-model train`
    ("Reward model accuracy", "fraction r(chosen) > r(rejected)", &[("accuracy", "train")]),
    ("Reward model margin", "r(chosen) − r(rejected)", &[("margin", "train")]),
    // `dpo ppo`
    ("PPO reward", "mean per completion", &[("reward", "score"), ("rlhf_reward", "score − β KL")]),
    ("KL to the reference", "Σ_t log π/π_ref", &[("kl", "train")]),
    ("PPO losses", "loss", &[("policy_loss", "policy"), ("value_loss", "value")]),
    ("Completion length", "tokens", &[("completion_len", "train")]),
];

/// The panels `lines` have data for: each key's training curve and, when logged, its `eval_` curve.
fn panels(lines: &[Value]) -> Vec<Panel> {
    let curve = |key: &str| -> Vec<(f64, f64)> {
        lines.iter().filter_map(|l| Some((l["step"].as_f64()?, l.get(key)?.as_f64()?))).collect()
    };
    let mut out = Vec::new();
    for (title, y_label, keys) in PANELS {
        let mut series = Vec::new();
        for (key, name) in *keys {
            let train = curve(key);
            if !train.is_empty() {
                series.push(Series::new(*name, train, Style::Line));
            }
            let eval = curve(&format!("eval_{key}"));
            if !eval.is_empty() {
                let name = if *name == "train" { "eval".to_string() } else { format!("{name} (eval)") };
                series.push(Series::new(name, eval, Style::LineAndPoints));
            }
        }
        if drawable(&series) {
            out.push(Panel { title: title.to_string(), x_label: "step".into(), y_label: y_label.to_string(), series });
        }
    }
    // A PPO run's reward against its KL, a point a step: how much reward each nat of KL bought.
    let frontier: Vec<(f64, f64)> =
        lines.iter().filter_map(|l| Some((l.get("kl")?.as_f64()?, l.get("reward")?.as_f64()?))).collect();
    let series = vec![Series::new("step", frontier, Style::Points)];
    if drawable(&series) {
        let (x_label, y_label) = ("KL to the reference".into(), "reward (score)".into());
        out.push(Panel { title: "Reward against KL".into(), x_label, y_label, series });
    }
    out
}

/// Whether any series has a finite point.
fn drawable(series: &[Series]) -> bool {
    series.iter().any(|s| s.points.iter().any(|(x, y)| x.is_finite() && y.is_finite()))
}

fn read_lines(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let v: Value = serde_json::from_str(l).with_context(|| format!("{} line {}", path.display(), i + 1))?;
            if v["step"].as_f64().is_none() {
                bail!("{} line {}: no numeric `step`", path.display(), i + 1);
            }
            Ok(v)
        })
        .collect()
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let (metrics, dir) = if a.run.is_dir() {
        (a.run.join("metrics.jsonl"), a.run.clone())
    } else {
        (a.run.clone(), a.run.parent().map(Path::to_path_buf).unwrap_or_default())
    };
    if !metrics.is_file() {
        bail!(
            "{}: no metrics.jsonl; pass a run directory of dpo train / sft / reward-model train / ppo",
            a.run.display()
        );
    }
    let lines = read_lines(&metrics)?;
    let panels = panels(&lines);
    if panels.is_empty() {
        bail!("{}: no step has loss or reward metrics to plot", metrics.display());
    }
    let out = a.out.unwrap_or_else(|| dir.join("curves.png"));
    panels_png(&out, &panels, 3).with_context(|| format!("drawing {}", out.display()))?;
    let names: Vec<&str> = panels.iter().map(|p| p.title.as_str()).collect();
    eprintln!("wrote {}: {} steps; {}", out.display(), lines.len(), names.join(", "));
    Ok(())
}
