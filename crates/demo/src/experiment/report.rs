//! Step 5: `report.md`, `report.json` and the charts, and a verdict computed from the numbers.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use super::evaluate::Point;
use super::methods::MethodRun;
use super::online_methods::{EqualKl, Frontier};
use super::plan::Plan;
use super::seeds::{AcrossSeeds, SeedResult};
use super::winrates::{VsChosen, VsTemperature};
use super::DemoError;
use crate::world::plot::{frontier_png, interval_chart_png, line_chart_png, Series, Style};

#[derive(Clone, Debug, Serialize)]
pub struct PairStats {
    pub train_pairs: usize,
    pub heldout_pairs: usize,
    pub ties_skipped: usize,
    /// Mean ground-truth reward of the SFT samples the pairs were drawn from.
    pub sample_reward: f64,
}

/// "Your language model is secretly a reward model": ranking accuracy on held-out pairs.
#[derive(Clone, Debug, Serialize)]
pub struct RewardAccuracy {
    /// "reward model" or "DPO beta=0.1 (implicit)".
    pub scorer: String,
    pub accuracy: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub plan: Plan,
    /// What ran the bf16 products (`engine::kernels::Bf16Kernel::describe`), in a bf16 run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bf16_kernel: Option<String>,
    /// The model every method starts from (a directory, relative to the output when built here).
    pub sft_model: String,
    /// The SFT model measured like every method (KL 0).
    pub sft: Point,
    pub pairs: PairStats,
    pub runs: Vec<MethodRun>,
    pub reward_accuracy: Vec<RewardAccuracy>,
    /// `dpo/gradient_weight` per step of each DPO run: (setting, [(step, weight)]).
    pub gradient_weight: Vec<(String, Vec<(f64, f64)>)>,
    /// Win rate against the preferred completion of each held-out pair prompt, judged by the ground
    /// truth, by sampling temperature: `{method: [{temperature, win_rate, ci_low, ci_high, n, ..}]}`.
    pub win_rate_vs_temperature: VsTemperature,
    /// The same at temperature 1 for every method: `{method: {setting, win_rate, ci_low, ci_high, n, ..}}`.
    pub win_rate_vs_chosen: VsChosen,
    /// What the win rates say about the paper's claims.
    pub win_rate_verdict: String,
    /// Reward (the learned reward model's, standardised) against KL of offline DPO (per beta, every
    /// checkpoint) and online and iterative DPO: `{method: [points]}`.
    pub frontier: Frontier,
    /// Online and iterative DPO against offline DPO at equal KL, one sentence per point and judge.
    pub online_vs_offline: Vec<String>,
    /// The same comparisons as numbers.
    pub equal_kl: Vec<EqualKl>,
    /// Acceptance checks, as sentences with their numbers.
    pub checks: Vec<String>,
    pub verdict: String,
    /// Methods that could not run, and why.
    pub gaps: Vec<String>,
    pub seconds: Vec<(String, f64)>,
    pub total_s: f64,
    /// CPU time (user + system, every thread of the process) of the same parts.
    pub cpu_seconds: Vec<(String, f64)>,
    pub total_cpu_s: f64,
    /// `--seeds N` (N > 1): every seed's summary, this report's seed first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seeds: Option<Vec<SeedResult>>,
    /// `--seeds N`: means and intervals across seeds, and the orderings they support.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub across_seeds: Option<AcrossSeeds>,
}

fn points_of<'a>(runs: &'a [MethodRun], method: &str) -> Vec<&'a Point> {
    runs.iter().filter(|r| r.method == method).flat_map(|r| r.points.iter()).collect()
}

/// Whether some point of `by` has no more KL and at least as much reward as `p`.
fn dominated(p: &Point, by: &[&Point]) -> bool {
    by.iter().any(|d| d.kl <= p.kl && d.reward >= p.reward)
}

/// The highest-reward point with KL at most `kl`.
fn best_within<'a>(points: &[&'a Point], kl: f64) -> Option<&'a Point> {
    points.iter().copied().filter(|p| p.kl <= kl).max_by(|a, b| a.reward.total_cmp(&b.reward))
}

/// A sentence on whether DPO's reward/KL frontier dominates PPO's, with the figures behind it.
pub fn verdict(runs: &[MethodRun]) -> String {
    let dpo = points_of(runs, "DPO");
    if dpo.is_empty() {
        return "No DPO point was measured, so there is no comparison.".into();
    }
    let mut parts = Vec::new();
    for method in ["PPO", "PPO-GT"] {
        let ppo = points_of(runs, method);
        if ppo.is_empty() {
            continue;
        }
        let dominated_ppo = ppo.iter().filter(|p| dominated(p, &dpo)).count();
        let dominated_dpo = dpo.iter().filter(|p| dominated(p, &ppo)).count();
        let max_kl = ppo.iter().map(|p| p.kl).fold(f64::NEG_INFINITY, f64::max);
        let (bd, bp) = (best_within(&dpo, max_kl), best_within(&ppo, max_kl));
        let within = match (bd, bp) {
            (Some(d), Some(p)) => {
                let diff = d.reward - p.reward;
                let se2 = 2.0 * (d.reward_se.powi(2) + p.reward_se.powi(2)).sqrt();
                let noise = if diff.abs() > se2 { "more than" } else { "within" };
                format!(
                    "; at KL <= {max_kl:.2} the best DPO reward is {:.3} (KL {:.2}) against {method}'s {:.3} (KL {:.2}), \
                     a difference of {diff:+.3}, {noise} two standard errors ({se2:.3})",
                    d.reward, d.kl, p.reward, p.kl
                )
            }
            (None, Some(p)) => format!("; no DPO point has KL <= {max_kl:.2} ({method}'s best there: {:.3})", p.reward),
            _ => String::new(),
        };
        let head = if dominated_ppo == ppo.len() {
            format!("DPO's frontier dominates {method}'s here: every one of the {} {method} points has a DPO point with no more KL and at least as much reward", ppo.len())
        } else if dominated_ppo == 0 {
            format!("DPO's frontier does not dominate {method}'s here: none of the {} {method} points has a DPO point with no more KL and at least as much reward", ppo.len())
        } else {
            format!("DPO's frontier only partly dominates {method}'s here: {dominated_ppo} of the {} {method} points have a DPO point with no more KL and at least as much reward", ppo.len())
        };
        parts.push(format!(
            "{head} ({dominated_dpo} of {} DPO points are dominated by {method} points){within}.",
            dpo.len()
        ));
    }
    if parts.is_empty() {
        return "No PPO run was measured, so whether DPO's frontier dominates PPO's cannot be said from this run."
            .into();
    }
    parts.join(" ")
}

/// Acceptance checks: DPO raises the reward well above the SFT model's; PPO's reward rises over its run.
pub fn checks(sft: &Point, runs: &[MethodRun]) -> Vec<String> {
    let mut out = Vec::new();
    let best = runs
        .iter()
        .filter(|r| r.method == "DPO")
        .filter_map(|r| r.last().map(|p| (r, p)))
        .max_by(|a, b| a.1.reward.total_cmp(&b.1.reward));
    if let Some((r, p)) = best {
        let gain = p.reward - sft.reward;
        let se = (p.reward_se.powi(2) + sft.reward_se.powi(2)).sqrt();
        let ok = gain > 3.0 * se && gain > 0.1;
        out.push(format!(
            "{} DPO raises the ground-truth reward: best final DPO ({}) {:.3} against SFT {:.3} ({:+.3}, {:.1} standard errors) at KL {:.2}",
            if ok { "PASS" } else { "FAIL" },
            r.setting,
            p.reward,
            sft.reward,
            gain,
            gain / se.max(1e-12),
            p.kl
        ));
    }
    for r in runs.iter().filter(|r| r.method.starts_with("PPO")) {
        if let Some(last) = r.points.last() {
            // Every run starts from the SFT model, measured as step 0.
            let base = sft;
            let gain = last.reward - base.reward;
            let se = (last.reward_se.powi(2) + base.reward_se.powi(2)).sqrt();
            let ok = gain > 2.0 * se && gain > 0.05;
            out.push(format!(
                "{} {} {} learns: reward {:.3} (SFT, step {}) -> {:.3} (step {}), {:+.3} ({:.1} standard errors), KL {:.2}; along the run: {}",
                if ok { "PASS" } else { "FAIL" },
                r.method,
                r.setting,
                base.reward,
                base.step,
                last.reward,
                last.step,
                gain,
                gain / se.max(1e-12),
                last.kl,
                r.points.iter().map(|p| format!("{:.3}", p.reward)).collect::<Vec<_>>().join(", ")
            ));
        }
    }
    out
}

impl Report {
    /// The results table (markdown): the last point of every run.
    pub fn table(&self) -> String {
        let mut s = String::new();
        s += "| method | setting | step / N | KL(pi||ref) | reward | train s | eval s |\n";
        s += "| --- | --- | ---: | ---: | ---: | ---: | ---: |\n";
        let _ = writeln!(
            s,
            "| SFT | reference | 0 | {:.3} | {:.3} ± {:.3} | | |",
            self.sft.kl, self.sft.reward, self.sft.reward_se
        );
        for r in &self.runs {
            if r.method == "Best-of-N" {
                for p in &r.points {
                    let _ = writeln!(
                        s,
                        "| Best-of-N | {} | {} | {:.3} | {:.3} ± {:.3} | | |",
                        r.setting, p.step, p.kl, p.reward, p.reward_se
                    );
                }
                let _ = writeln!(s, "| Best-of-N | total | | | | {:.1} | {:.1} |", r.train_s, r.eval_s);
                continue;
            }
            if let Some(p) = r.last() {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {:.3} | {:.3} ± {:.3} | {:.1} | {:.1} |",
                    r.method, r.setting, p.step, p.kl, p.reward, p.reward_se, r.train_s, r.eval_s
                );
            }
        }
        s
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let p = &self.plan;
        s += "# DPO demo: controlled sentiment generation\n\n";
        let _ = writeln!(
            s,
            "A reproduction of section 6.1 and figure 2 (left) of Rafailov et al. 2023 on a generated review world \
             (plan `{}`, seed {}): prompts are neutral review openings, the ground-truth reward is VADER's compound \
             sentiment of prompt + completion (in [-1, 1]), and every method starts from the SFT model `{}`. \
             Each point: {} held-out prompts x {} samples at temperature 1 (at most {} new tokens); KL is the \
             sequence-level KL(pi||ref), the mean over samples of the summed per-token log-ratio.\n",
            p.name, p.seed, self.sft_model, p.eval_prompts, p.eval_samples, p.max_new_tokens
        );
        if let Some(kernel) = &self.bf16_kernel {
            let _ = writeln!(
                s,
                "Every model pass ran in {} (autocast's semantics: bf16 operands, f32 sums), its products run as: \
                 {kernel}.\n",
                p.precision
            );
        }
        let _ = writeln!(
            s,
            "Pairs: {} training and {} held-out, from {} samples per prompt of the SFT model (every two with different \
             rewards; {} ties skipped; mean sample reward {:.3}).\n",
            self.pairs.train_pairs,
            self.pairs.heldout_pairs,
            p.samples_per_prompt,
            self.pairs.ties_skipped,
            self.pairs.sample_reward
        );
        s += "## Reward against KL\n\n![frontier](frontier.png)\n\n";
        s += &self.table();
        s += "\nEvery point of every run is in `report.json`; the table shows each run's last one.\n\n";
        s += "## Verdict\n\n";
        s += &self.verdict;
        s += "\n\n";
        for c in &self.checks {
            let _ = writeln!(s, "- {c}");
        }
        s += &self.kl_drift_markdown();
        s += &self.online_markdown();
        s += &self.win_rate_markdown();
        s += "\n## Your language model is secretly a reward model\n\n";
        s += "Ranking accuracy on held-out pairs ranked by the ground truth (ties excluded):\n\n";
        s += "| scorer | accuracy |\n| --- | ---: |\n";
        for a in &self.reward_accuracy {
            let _ = writeln!(s, "| {} | {:.3} |", a.scorer, a.accuracy);
        }
        s += "\nDPO's implicit reward is `beta * log(pi/ref)` of the trained policy; the reward model is a \
              Bradley-Terry model trained on the same pairs.\n\n";
        s += "![gradient weight](gradient_weight.png)\n\n";
        s += "Mean weight `sigma(r_l - r_w)` DPO's gradient puts on a training pair, per step: high while the \
              implicit reward ranks pairs wrongly, falling as it learns them.\n\n";
        if let (Some(results), Some(across)) = (&self.seeds, &self.across_seeds) {
            s += &super::seeds::markdown(results, across);
            s += "\n";
        }
        if !self.gaps.is_empty() {
            s += "## Gaps\n\n";
            for g in &self.gaps {
                let _ = writeln!(s, "- {g}");
            }
            s += "\n";
        }
        s += "## Time\n\nWall-clock and CPU seconds (user + system, all threads of this process) of each part; on a \
              machine others share, the CPU time says where the work goes.\n\n| part | wall s | CPU s |\n\
              | --- | ---: | ---: |\n";
        for (k, v) in &self.seconds {
            let cpu = self.cpu_seconds.iter().find(|(c, _)| c == k).map(|(_, c)| format!("{c:.1}")).unwrap_or_default();
            let _ = writeln!(s, "| {k} | {v:.1} | {cpu} |");
        }
        let _ = writeln!(s, "| total | {:.1} | {:.1} |", self.total_s, self.total_cpu_s);
        s +=
            "\nHow each method is tuned: every method gets the plan's fixed budget (`plan` in report.json: its steps, \
              batch and learning rate; DPO one run per beta, PPO one per KL coefficient, Best-of-N every N from one \
              draw), the same for every seed; no method is tuned on the evaluation prompts. Shared work is done \
              once: the reference log-probs of the training pairs (all DPO betas), a checkpoint's evaluation samples \
              and KL (judged again by the learned reward model for its frontier).\n";
        s
    }

    /// Why a small beta drifts to a high KL: each DPO run's KL, reward and completion length along its run
    /// and the weight its gradient still puts on a pair at the end.
    fn kl_drift_markdown(&self) -> String {
        let dpo: Vec<&MethodRun> = self.runs.iter().filter(|r| r.method == "DPO").collect();
        if dpo.len() < 2 {
            return String::new();
        }
        let mut s = String::from("\n## Why a small beta drifts to a high KL\n\n");
        s += "| run | KL along the run | reward along the run | length (SFT: ";
        let _ = write!(s, "{:.1}", self.sft.length);
        s += " tokens) | final mean sigma(r_l - r_w) |\n| --- | --- | --- | --- | ---: |\n";
        for r in dpo {
            let kl: Vec<String> = r.points.iter().map(|p| format!("{:.2}", p.kl)).collect();
            let rw: Vec<String> = r.points.iter().map(|p| format!("{:.3}", p.reward)).collect();
            let len: Vec<String> = r.points.iter().map(|p| format!("{:.1}", p.length)).collect();
            let gw = self
                .gradient_weight
                .iter()
                .find(|(k, _)| *k == r.setting)
                .and_then(|(_, v)| v.last().map(|&(_, w)| format!("{w:.3}")))
                .unwrap_or_default();
            let _ =
                writeln!(s, "| {} | {} | {} | {} | {gw} |", r.setting, kl.join(" → "), rw.join(" → "), len.join(" → "));
        }
        s += "\nEvery beta trains at the same learning rate under AdamW, which divides each gradient by its running scale: \
              beta scales DPO's gradient (beta sigma(-beta m) grad m) but not the size of the step. What beta does set \
              is when the loss saturates: the weight sigma(-beta m) of a pair falls only once its log-ratio margin m \
              is several times 1/beta. With a small beta that takes tens of nats, so the weight stays high (the last \
              column) and the policy keeps moving at the optimizer's pace: KL grows with every step instead of levelling \
              off, and since the margin is mostly won by lowering both completions' likelihoods (see logps/chosen and \
              logps/rejected in each run's metrics.jsonl), the mass goes to other, longer completions that the \
              temperature-1 evaluation samples, with no gain in reward. A lower learning rate (fewer nats per step), \
              fewer steps, or a larger beta bound the KL; the pair set, one pass over it, is not what is overfitted.\n";
        s
    }

    /// The win-rate section: against temperature and against the chosen completions, with intervals.
    fn win_rate_markdown(&self) -> String {
        let mut s = String::new();
        if self.win_rate_vs_temperature.is_empty() && self.win_rate_vs_chosen.is_empty() {
            return s;
        }
        let p = &self.plan;
        s += "\n## Win rates against the preferred completions\n\n";
        let _ = writeln!(
            s,
            "The paper's summarization and dialogue measurements in miniature: on each of the {} held-out pair \
             prompts, a policy's sample against the prompt's preferred completion (the highest-reward of its {} \
             SFT samples), judged by the ground truth; ties count half. {} sample(s) per prompt above temperature \
             0, one at 0 (greedy samples repeat). Brackets: 95% Wilson score intervals (`dpo::winrate`). Each \
             method is its run with the highest final reward on the evaluation prompts (a different prompt set).\n",
            p.heldout_pair_prompts, p.samples_per_prompt, p.win_rate_samples
        );
        if !self.win_rate_vs_temperature.is_empty() {
            s += "![win rate against temperature](win_rate_temperature.png)\n\n";
            let temps: Vec<f64> = p.win_rate_temperatures.clone();
            s += "| method |";
            for t in &temps {
                let _ = write!(s, " T={t} |");
            }
            s += "\n| --- |";
            s += &" ---: |".repeat(temps.len());
            s += "\n";
            for (m, curve) in &self.win_rate_vs_temperature {
                let _ = write!(s, "| {m} |");
                for pt in curve {
                    let _ = write!(
                        s,
                        " {:.3} [{:.3}, {:.3}] (n={}) |",
                        pt.rate.win_rate, pt.rate.ci_low, pt.rate.ci_high, pt.rate.n
                    );
                }
                s += "\n";
            }
            s += "\n";
        }
        if !self.win_rate_vs_chosen.is_empty() {
            s += "At temperature 1, every method:\n\n| method | run | win rate | 95% interval | wins / ties / losses |\n";
            s += "| --- | --- | ---: | --- | --- |\n";
            let mut rows: Vec<_> = self.win_rate_vs_chosen.iter().collect();
            rows.sort_by(|a, b| b.1.rate.win_rate.total_cmp(&a.1.rate.win_rate));
            for (m, w) in rows {
                let r = &w.rate;
                let _ = writeln!(
                    s,
                    "| {m} | {} | {:.3} | [{:.3}, {:.3}] | {} / {} / {} |",
                    w.setting, r.win_rate, r.ci_low, r.ci_high, r.wins, r.ties, r.losses
                );
            }
            s += "\n";
        }
        let _ = writeln!(s, "{}\n", self.win_rate_verdict);
        s
    }

    /// Writes `report.md`, `report.json`, `frontier.png` and `gradient_weight.png` into `out`.
    pub fn write(&self, out: &Path) -> Result<(), DemoError> {
        let json = serde_json::to_string_pretty(self)?;
        let write = |name: &str, bytes: &[u8]| {
            let p = out.join(name);
            dpo::io::write_atomic(&p, bytes).map_err(|e| DemoError::io(&p, e))
        };
        write("report.json", json.as_bytes())?;
        write("report.md", self.markdown().as_bytes())?;

        let mut series = vec![Series::new("SFT", vec![(self.sft.kl, self.sft.reward)], Style::Points)];
        for method in
            ["DPO", "PPO", "PPO-GT", "Preferred-FT", "Unlikelihood", "Best-of-N", "Online DPO", "Iterative DPO"]
        {
            let pts: Vec<(f64, f64)> = points_of(&self.runs, method).into_iter().map(|p| (p.kl, p.reward)).collect();
            if !pts.is_empty() {
                let style = if method == "Best-of-N" { Style::LineAndPoints } else { Style::Points };
                series.push(Series::new(method, pts, style));
            }
        }
        frontier_png(
            &out.join("frontier.png"),
            &series,
            "Sentiment: reward vs KL",
            "KL(pi || ref), nats per sequence",
            "ground-truth reward (VADER)",
        )?;

        if !self.frontier.is_empty() {
            let series: Vec<Series> = self
                .frontier
                .iter()
                .map(|(m, pts)| {
                    Series::new(m.clone(), pts.iter().map(|p| (p.kl, p.reward)).collect(), Style::LineAndPoints)
                })
                .collect();
            frontier_png(
                &out.join("frontier_learned.png"),
                &series,
                "Offline, online and iterative DPO: learned reward vs KL",
                "KL(pi || ref), nats per sequence",
                "learned reward model (standardised)",
            )?;
        }
        if !self.win_rate_vs_temperature.is_empty() {
            // Methods side by side at each temperature (a small offset each), so the bars do not overlap.
            let k = self.win_rate_vs_temperature.len() as f64;
            let series: Vec<Series> = self
                .win_rate_vs_temperature
                .iter()
                .enumerate()
                .map(|(i, (m, c))| {
                    let dx = (i as f64 - (k - 1.0) / 2.0) * 0.012;
                    Series::new(
                        m.clone(),
                        c.iter().map(|p| (p.temperature + dx, p.rate.win_rate)).collect(),
                        Style::LineAndPoints,
                    )
                    .with_intervals(c.iter().map(|p| (p.rate.ci_low, p.rate.ci_high)).collect())
                })
                .collect();
            interval_chart_png(
                &out.join("win_rate_temperature.png"),
                &series,
                Some(0.5),
                "Win rate against the preferred completion",
                "sampling temperature",
                "win rate (ground truth judge), 95% interval",
            )?;
        }

        let curves: Vec<Series> = self
            .gradient_weight
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(name, v)| Series::new(format!("DPO {name}"), v.clone(), Style::Line))
            .collect();
        if !curves.is_empty() {
            line_chart_png(
                &out.join("gradient_weight.png"),
                &curves,
                "DPO gradient weight per pair",
                "training step",
                "mean sigma(r_l - r_w)",
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(method: &str, pts: &[(f64, f64)]) -> MethodRun {
        MethodRun {
            method: method.into(),
            setting: "s".into(),
            points: pts
                .iter()
                .enumerate()
                .map(|(i, &(kl, reward))| Point { step: i as u64 + 1, kl, reward, reward_se: 0.01, length: 20.0 })
                .collect(),
            train_s: 1.0,
            eval_s: 1.0,
            dir: None,
        }
    }

    #[test]
    fn verdict_follows_the_numbers() {
        let dpo = run("DPO", &[(1.0, 0.6), (3.0, 0.8)]);
        let ppo = run("PPO", &[(2.0, 0.5), (4.0, 0.7)]);
        let v = verdict(&[dpo.clone(), ppo]);
        assert!(v.starts_with("DPO's frontier dominates PPO's here: every one of the 2 PPO points"), "{v}");
        assert!(v.contains("more than two standard errors"), "{v}");

        let strong_ppo = run("PPO", &[(0.5, 0.9)]);
        let v = verdict(&[dpo.clone(), strong_ppo]);
        assert!(v.starts_with("DPO's frontier does not dominate PPO's"), "{v}");
        assert!(v.contains("2 of 2 DPO points are dominated"), "{v}");

        let mixed = run("PPO-GT", &[(2.0, 0.5), (5.0, 0.95)]);
        assert!(verdict(&[dpo.clone(), mixed]).contains("only partly dominates PPO-GT's"));
        assert!(verdict(&[dpo]).starts_with("No PPO run"));
    }

    #[test]
    fn checks_pass_and_fail_on_the_numbers() {
        let sft = Point { step: 0, kl: 0.0, reward: 0.0, reward_se: 0.02, length: 20.0 };
        let c = checks(&sft, &[run("DPO", &[(2.0, 0.7)]), run("PPO", &[(1.0, 0.01), (2.0, 0.02)])]);
        assert!(c[0].starts_with("PASS DPO"), "{c:?}");
        assert!(c[1].starts_with("FAIL PPO"), "{c:?}");
    }
}
