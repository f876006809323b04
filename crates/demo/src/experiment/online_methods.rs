//! Online and iterative DPO in the demo, labelled by the learned reward model (as Guo et al. 2024 and
//! Llama 3 label with a judge, not with the ground truth), and the reward-KL frontier judged by that
//! reward model: offline DPO's checkpoints against the online methods', on the same evaluation samples.
//!
//! Budgets: online DPO takes `online.steps` steps of `online.batch` prompts, two samples each (one pair
//! per prompt); iterative DPO `iterative.rounds` rounds of `iterative.steps` steps on pairs sampled from
//! `iterative.prompts` prompts. Both at the offline runs' learning rate, and at `beta`, one of the
//! offline betas, so the comparison at equal KL is between the same objective fed differently.
//!
//! The ablations (`online.ablations`) isolate the two ways online DPO is fed differently from offline
//! DPO here: its labels (the learned reward model's, where offline DPO's pairs are ranked by the ground
//! truth) and its budget (`online.steps` steps of `online.steps.batch` sampled pairs, where offline DPO
//! takes `dpo.steps` steps of `dpo.batch` pairs). [`VARIANTS`] crosses the two: each variant is online
//! DPO with the same beta and learning rate, only its judge and its steps changed.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

use super::evaluate::Point;
use super::methods::{Ctx, MethodRun};
use super::plan::Steps;
use super::rlhf_methods::LearnedRm;
use super::DemoError;
use dpo::objectives::{LossConfig, LossType};
use dpo::train::iterative::{iterate, IterativeConfig};
use dpo::train::online::{train_online, OnlineJudge, OnlineSampling};
use dpo::train::{checkpoint, Objective, PairObjective, RunOptions, TrainConfig};

/// `{method: [points]}`, the reward the learned reward model's (standardised).
pub type Frontier = BTreeMap<String, Vec<Point>>;

/// One online-vs-offline comparison at equal KL.
#[derive(Clone, Debug, Serialize)]
pub struct EqualKl {
    pub method: String,
    /// "learned reward model" or "ground truth".
    pub judge: String,
    pub kl: f64,
    pub reward: f64,
    /// The best offline DPO point with no more KL, and the difference.
    pub offline_kl: Option<f64>,
    pub offline_reward: Option<f64>,
    pub difference: Option<f64>,
    /// Two standard errors of the difference.
    pub two_se: Option<f64>,
    /// Offline DPO's upper concave envelope at this KL, and the difference: the best reward a mixture of
    /// two offline policies reaches with no more KL (reward is linear in the mixture, KL convex), so a
    /// comparison that does not depend on where offline DPO's checkpoints happen to fall. None past
    /// offline DPO's largest KL.
    pub offline_envelope: Option<f64>,
    pub envelope_difference: Option<f64>,
}

fn err(method: &str, e: impl std::fmt::Display) -> DemoError {
    DemoError::Method { method: method.into(), reason: e.to_string() }
}

fn dpo_config(ctx: &Ctx, name: &str, steps: &Steps, beta: f64) -> TrainConfig {
    TrainConfig {
        objective: Objective::Pairs(PairObjective {
            losses: vec![(LossType::Sigmoid, 1.0)],
            cfg: LossConfig { beta, ..Default::default() },
        }),
        ..ctx.train_config(name, steps)
    }
}

/// A variant of online DPO: who labels its pairs and whose budget it trains for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Variant {
    /// The method's name in the report.
    pub method: &'static str,
    /// Its run directory under `runs/`.
    pub dir: &'static str,
    /// Labels by the ground truth (the offline pairs' ranking) instead of the learned reward model.
    pub ground_truth: bool,
    /// `dpo.steps` steps of `dpo.batch` prompts (one sampled pair each), the offline DPO runs' pair-steps,
    /// instead of the online plan's steps.
    pub offline_budget: bool,
}

/// Online DPO as the plan runs it, then the ablations (run when `online.ablations` is set).
pub const VARIANTS: [Variant; 4] = [
    Variant { method: "Online DPO", dir: "online-dpo", ground_truth: false, offline_budget: false },
    Variant {
        method: "Online DPO (GT labels)",
        dir: "online-dpo-gt-labels",
        ground_truth: true,
        offline_budget: false,
    },
    Variant {
        method: "Online DPO (offline budget)",
        dir: "online-dpo-offline-budget",
        ground_truth: false,
        offline_budget: true,
    },
    Variant {
        method: "Online DPO (GT labels, offline budget)",
        dir: "online-dpo-gt-labels-offline-budget",
        ground_truth: true,
        offline_budget: true,
    },
];

/// Every online method's name: the online DPO variants, then iterative DPO.
pub fn online_method_names() -> Vec<&'static str> {
    VARIANTS.iter().map(|v| v.method).chain(["Iterative DPO"]).collect()
}

/// Whether `method` is one of the online methods (compared with offline DPO at equal KL).
pub fn is_online(method: &str) -> bool {
    online_method_names().contains(&method)
}

impl Variant {
    /// The variant's steps: the online plan's, or offline DPO's count and batch at the online learning rate
    /// (the same as offline DPO's in every plan) with offline DPO's evaluation points.
    pub fn steps(&self, plan: &super::plan::Plan) -> Steps {
        let o = &plan.online.steps;
        if self.offline_budget {
            Steps { steps: plan.dpo.steps, batch: plan.dpo.batch, evals: plan.dpo.evals, lr: o.lr }
        } else {
            o.clone()
        }
    }
}

/// The judge as the run records it.
fn judge_name(ground_truth: bool) -> &'static str {
    if ground_truth {
        "the demo's ground truth (VADER)"
    } else {
        "the demo's learned reward model"
    }
}

fn sampling(ctx: &Ctx, samples: usize) -> OnlineSampling {
    OnlineSampling {
        samples,
        max_new_tokens: ctx.plan.max_new_tokens,
        temperature: 1.0,
        eos_ids: ctx.world.eos_ids.clone(),
        missing_eos_penalty: None,
    }
}

/// Online DPO (one [`Variant`]) from the SFT model on the training prompts, measured at its checkpoints.
pub fn online_dpo(
    ctx: &Ctx,
    rm: &LearnedRm,
    variant: &Variant,
    prompts: &[Vec<u32>],
    log: &mut dyn FnMut(&str),
) -> Result<MethodRun, DemoError> {
    let p = &ctx.plan.online;
    let steps = variant.steps(ctx.plan);
    let cfg = dpo_config(ctx, variant.dir, &steps, p.beta);
    let judge = |items: &[(&[u32], &[u32])]| {
        let scores = if variant.ground_truth { ctx.world.ground_truth_all(items) } else { rm.rewards(items) };
        scores.map_err(|e| e.to_string())
    };
    let t = Instant::now();
    let judge = OnlineJudge { name: judge_name(variant.ground_truth).into(), score: &judge };
    let opts = RunOptions { overwrite: true, resume: None };
    let o = train_online(&cfg, &sampling(ctx, p.samples), prompts, &judge, &opts, ctx.stop, log)?;
    if o.interrupted {
        return Err(DemoError::Interrupted);
    }
    let train_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let points = ctx.evaluate_checkpoints(&cfg.output)?;
    let labels = if variant.ground_truth { "ground truth" } else { "learned reward model" };
    Ok(MethodRun {
        method: variant.method.into(),
        setting: format!("beta={}, {} steps of {}, labels: {labels}", p.beta, steps.steps, steps.batch),
        points,
        train_s,
        eval_s: t.elapsed().as_secs_f64(),
        dir: Some(ctx.rel(&cfg.output)),
    })
}

/// Iterative DPO from the SFT model, the reference fixed or moved, measured at every round's end.
pub fn iterative_dpo(
    ctx: &Ctx,
    rm: &LearnedRm,
    prompts: &[Vec<u32>],
    log: &mut dyn FnMut(&str),
) -> Result<MethodRun, DemoError> {
    let p = &ctx.plan.iterative;
    let out = ctx.run_dir("iterative-dpo");
    let _ = std::fs::remove_dir_all(&out);
    let base = TrainConfig { output: out.clone(), save_every: 0, ..dpo_config(ctx, "iterative-dpo", &p.steps, p.beta) };
    let it = IterativeConfig {
        rounds: p.rounds,
        move_reference: p.move_reference,
        sampling: sampling(ctx, p.samples),
        judge: judge_name(false).into(),
    };
    let judge = |items: &[(&[u32], &[u32])]| rm.rewards(items).map_err(|e| e.to_string());
    let prompts = &prompts[..p.prompts.min(prompts.len())];
    let t = Instant::now();
    let o = iterate(&base, &it, prompts, &judge, ctx.stop, log)?;
    if o.interrupted {
        return Err(DemoError::Interrupted);
    }
    let train_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut points = Vec::new();
    for (round, dir) in o.finals.iter().enumerate() {
        super::methods::drop_optimizer_states(&dpo::train::iterative::round_dir(&out, round + 1).join("run"));
        let m = hf::load_model(dir)?;
        points.push(ctx.evaluator.evaluate(ctx.world, &m.params, (round + 1) as u64 * p.steps.steps)?);
    }
    let reference = if p.move_reference { "moved each round" } else { "fixed" };
    Ok(MethodRun {
        method: "Iterative DPO".into(),
        setting: format!("beta={}, {} rounds, reference {reference}", p.beta, p.rounds),
        points,
        train_s,
        eval_s: t.elapsed().as_secs_f64(),
        dir: Some(ctx.rel(&out)),
    })
}

/// The reward-KL points of the SFT model, offline DPO (every beta, every checkpoint) and the online methods, the
/// reward the learned reward model's, on the evaluator's samples.
pub fn frontier(ctx: &Ctx, rm: &LearnedRm, runs: &[MethodRun]) -> Result<Frontier, DemoError> {
    let mut f = Frontier::new();
    let score = |items: &[(&[u32], &[u32])]| rm.rewards(items);
    // Every run's start, KL 0.
    f.insert("SFT".into(), vec![ctx.evaluator.evaluate_by(ctx.world, &ctx.world.reference, 0, &score)?]);
    for r in runs.iter().filter(|r| r.method == "DPO" || is_online(&r.method)) {
        let Some(dir) = &r.dir else { continue };
        let dir = ctx.out.join(dir);
        let mut models: Vec<(u64, std::path::PathBuf)> =
            checkpoint::list(&dir).into_iter().map(|(s, d)| (s, d.join("model"))).collect();
        if r.method == "Iterative DPO" {
            models =
                r.points.iter().zip(1..).map(|(p, k)| (p.step, dir.join(format!("round-{k}/run/final")))).collect();
        }
        let key = if r.method == "DPO" { format!("DPO {}", r.setting) } else { r.method.clone() };
        for (step, m) in models {
            let params = hf::load_model(&m).map_err(|e| err(&key, e))?.params;
            f.entry(key.clone()).or_default().push(ctx.evaluator.evaluate_by(ctx.world, &params, step, &score)?);
        }
    }
    Ok(f)
}

/// Each online-method point against the best offline DPO point with no more KL, under one judge.
pub fn equal_kl(judge: &str, online: &[(&str, &[Point])], offline: &[&Point]) -> Vec<EqualKl> {
    let mut out = Vec::new();
    for (method, points) in online {
        for p in *points {
            let best = offline.iter().filter(|o| o.kl <= p.kl).max_by(|a, b| a.reward.total_cmp(&b.reward));
            let envelope = concave_envelope_at(offline, p.kl);
            out.push(EqualKl {
                method: method.to_string(),
                judge: judge.into(),
                kl: p.kl,
                reward: p.reward,
                offline_kl: best.map(|b| b.kl),
                offline_reward: best.map(|b| b.reward),
                difference: best.map(|b| p.reward - b.reward),
                two_se: best.map(|b| 2.0 * (p.reward_se.powi(2) + b.reward_se.powi(2)).sqrt()),
                offline_envelope: envelope,
                envelope_difference: envelope.map(|e| p.reward - e),
            });
        }
    }
    out
}

/// The upper concave envelope of `points` (KL, reward) at `kl`: the highest reward on a chord between
/// two points whose KLs bracket `kl` (a point at `kl` itself included). None outside their KL range.
pub fn concave_envelope_at(points: &[&Point], kl: f64) -> Option<f64> {
    let mut best: Option<f64> = None;
    for a in points.iter().filter(|a| a.kl <= kl) {
        for b in points.iter().filter(|b| b.kl >= kl) {
            let r = if b.kl == a.kl {
                a.reward.max(b.reward)
            } else {
                a.reward + (b.reward - a.reward) * (kl - a.kl) / (b.kl - a.kl)
            };
            best = Some(best.map_or(r, |m: f64| m.max(r)));
        }
    }
    best
}

/// A sentence per comparison: ahead, behind or level beyond two standard errors.
pub fn equal_kl_sentences(rows: &[EqualKl]) -> Vec<String> {
    rows.iter().map(|r| equal_kl_sentence(r) + &envelope_clause(r)).collect()
}

fn envelope_clause(r: &EqualKl) -> String {
    match (r.offline_envelope, r.envelope_difference) {
        (Some(e), Some(d)) => format!(" Against offline DPO's concave envelope at this KL ({e:.3}): {d:+.3}."),
        _ => String::new(),
    }
}

fn equal_kl_sentence(r: &EqualKl) -> String {
    match (r.offline_kl, r.offline_reward, r.difference, r.two_se) {
        (Some(ok), Some(or), Some(d), Some(se)) => {
            format!(
                "{} at KL {:.2}: reward {:.3} ({}) against offline DPO's best with no more KL, {:.3} at KL {ok:.2}: \
                 {d:+.3}, {} two standard errors ({se:.3}){}.",
                r.method,
                r.kl,
                r.reward,
                r.judge,
                or,
                if d.abs() > se { "more than" } else { "within" },
                if d > se {
                    ", online ahead"
                } else if d < -se {
                    ", offline ahead"
                } else {
                    ""
                }
            )
        }
        _ => format!(
            "{} at KL {:.2}: reward {:.3} ({}); no offline DPO point has that little KL.",
            r.method, r.kl, r.reward, r.judge
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pt(kl: f64, reward: f64) -> Point {
        Point { step: 1, kl, reward, reward_se: 0.01, length: 10.0 }
    }

    /// The ablations change only the judge and the steps: the offline budget is offline DPO's steps and
    /// batch (and evaluation points), at online DPO's learning rate.
    #[test]
    fn variants_change_one_thing_each() {
        let plan = super::super::plan::Plan::full();
        let [base, gt, budget, both] = VARIANTS;
        assert_eq!(base.steps(&plan).steps, plan.online.steps.steps);
        assert_eq!(gt.steps(&plan).steps, plan.online.steps.steps);
        assert!(gt.ground_truth && !base.ground_truth && !budget.ground_truth && both.ground_truth);
        for v in [budget, both] {
            let s = v.steps(&plan);
            assert_eq!(
                (s.steps, s.batch, s.evals, s.lr),
                (plan.dpo.steps, plan.dpo.batch, plan.dpo.evals, plan.online.steps.lr)
            );
        }
        assert!(is_online("Online DPO (GT labels, offline budget)") && is_online("Iterative DPO") && !is_online("DPO"));
    }

    #[test]
    fn concave_envelope_takes_the_highest_chord() {
        // (1, 0.5) lies below the chord from (0, 0) to (2, 1.2): the envelope at 1 is 0.6, at 2 the point.
        let pts = [pt(0.0, 0.0), pt(1.0, 0.5), pt(2.0, 1.2), pt(4.0, 1.0)];
        let refs: Vec<&Point> = pts.iter().collect();
        assert!((concave_envelope_at(&refs, 1.0).unwrap() - 0.6).abs() < 1e-12);
        assert!((concave_envelope_at(&refs, 2.0).unwrap() - 1.2).abs() < 1e-12);
        assert!((concave_envelope_at(&refs, 3.0).unwrap() - 1.1).abs() < 1e-12);
        assert_eq!(concave_envelope_at(&refs, 4.5), None);
        assert_eq!(concave_envelope_at(&refs, -0.1), None);
    }

    #[test]
    fn equal_kl_takes_the_best_offline_point_with_no_more_kl() {
        let offline = [pt(1.0, 0.3), pt(2.0, 0.5), pt(5.0, 0.9)];
        let refs: Vec<&Point> = offline.iter().collect();
        let online = [pt(2.5, 0.6), pt(0.5, 0.2)];
        let rows = equal_kl("ground truth", &[("Online DPO", &online)], &refs);
        assert_eq!((rows[0].offline_kl, rows[0].offline_reward), (Some(2.0), Some(0.5)));
        assert!((rows[0].difference.unwrap() - 0.1).abs() < 1e-12);
        assert_eq!(rows[1].offline_kl, None);
        // The envelope at KL 2.5: the chord from (2, 0.5) to (5, 0.9) gives 0.5 + 0.4 / 6 (above the chord
        // from (1, 0.3)); at KL 0.5 there is no offline point to the left.
        let e = rows[0].offline_envelope.unwrap();
        assert!((e - (0.5 + 0.4 / 6.0)).abs() < 1e-12, "{e}");
        assert!((rows[0].envelope_difference.unwrap() - (0.6 - e)).abs() < 1e-12);
        assert_eq!(rows[1].offline_envelope, None);
        let s = equal_kl_sentences(&rows);
        assert!(s[0].contains("more than two standard errors") && s[0].contains("online ahead"), "{}", s[0]);
        assert!(s[1].contains("no offline DPO point"), "{}", s[1]);
    }
}
