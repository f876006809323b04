//! Step 3: the methods of the paper's figure 2, each trained from the SFT model on the same pairs and
//! measured at several points of its run: DPO (the trainer's `sigmoid` loss) for several betas,
//! Preferred-FT (`train_sft` on the chosen completions), Unlikelihood (the trainer's `unlikelihood` loss).
//! PPO and Best-of-N live in `rlhf_methods.rs`.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use engine::Params;
use serde::Serialize;

use super::evaluate::{Evaluator, Point, World};
use super::plan::{Plan, Steps};
use super::DemoError;
use dpo::data::{Example, Packing};
use dpo::objectives::unlikelihood::UnlikelihoodConfig;
use dpo::objectives::{LossConfig, LossType};
use dpo::scoring::score_pairs;
use dpo::train::{checkpoint, train, Objective, PairObjective, RunOptions, TrainConfig};

/// One run of one method (or, for Best-of-N, one sweep over N) and its measured points.
#[derive(Clone, Debug, Serialize)]
pub struct MethodRun {
    /// "DPO", "PPO", "PPO-GT", "Preferred-FT", "Unlikelihood", "Best-of-N", "SFT".
    pub method: String,
    /// The run's setting ("beta=0.1", "kl_coef=0.05", "N=16").
    pub setting: String,
    /// In order of the run (step, or N).
    pub points: Vec<Point>,
    /// Seconds spent training (or sampling, for Best-of-N).
    pub train_s: f64,
    /// Seconds spent measuring the points.
    pub eval_s: f64,
    /// The run directory, relative to the output directory.
    pub dir: Option<String>,
}

impl MethodRun {
    /// The last point of the run: what the table reports.
    pub fn last(&self) -> Option<&Point> {
        self.points.last()
    }
}

/// What every method run shares.
pub struct Ctx<'a> {
    pub plan: &'a Plan,
    pub out: &'a Path,
    pub world: &'a World,
    pub evaluator: &'a Evaluator,
    pub model_cfg: &'a hf::ModelConfig,
    /// The SFT model directory: start and reference of every method.
    pub sft_dir: &'a Path,
    pub pairs_path: &'a Path,
    pub pairs: &'a [Example],
    pub stop: &'a AtomicBool,
}

impl Ctx<'_> {
    pub(super) fn run_dir(&self, name: &str) -> PathBuf {
        self.out.join("runs").join(name)
    }

    pub(super) fn rel(&self, p: &Path) -> String {
        p.strip_prefix(self.out).unwrap_or(p).display().to_string()
    }

    /// The trainer's configuration for a run from the SFT model on the pairs.
    pub(super) fn train_config(&self, name: &str, s: &Steps) -> TrainConfig {
        TrainConfig {
            model: self.sft_dir.to_path_buf(),
            data: self.pairs_path.to_path_buf(),
            output: self.run_dir(name),
            lr: s.lr,
            batch_size: s.batch,
            max_steps: Some(s.steps),
            save_every: s.save_every(),
            log_every: (s.steps / 4).max(1),
            seed: self.plan.seed,
            no_shuffle: false,
            precision: self.plan.precision,
            ..Default::default()
        }
    }

    /// Measures every checkpoint a trainer run wrote, oldest first, and drops their optimizer states.
    pub(super) fn evaluate_checkpoints(&self, run: &Path) -> Result<Vec<Point>, DemoError> {
        let mut points = Vec::new();
        for (step, dir) in checkpoint::list(run) {
            let m = hf::load_model(&dir.join("model"))?;
            points.push(self.evaluator.evaluate(self.world, &m.params, step)?);
        }
        drop_optimizer_states(run);
        Ok(points)
    }
}

/// Deletes the optimizer state of every checkpoint of `run`: the demo reads a checkpoint's model (to
/// evaluate it, and again for the learned reward model's frontier) but never resumes a run, and with a
/// real checkpoint (`--model`) the AdamW moments are twice the model's size (1 GB a checkpoint for a
/// 135M model). Best effort: a file that cannot be removed only costs disk space.
pub(super) fn drop_optimizer_states(run: &Path) {
    for (_, dir) in checkpoint::list(run) {
        let _ = std::fs::remove_file(dir.join("optimizer.safetensors"));
    }
}

fn overwrite() -> RunOptions {
    RunOptions { overwrite: true, ..Default::default() }
}

pub fn beta_name(beta: f64) -> String {
    format!("beta={beta}")
}

/// DPO with the given beta; returns the run and its final weights.
///
/// The reference's log-probs of the pairs are computed once, by the first beta's run, and read from
/// `OUTPUT/cache` by the others (the trainer's `precompute_ref`, keyed by the reference weights and the
/// token ids): the same numbers every run's reference pass would compute, without the pass.
pub fn dpo(ctx: &Ctx, beta: f64, log: &mut dyn FnMut(&str)) -> Result<(MethodRun, Params), DemoError> {
    let name = format!("dpo-beta{beta}");
    let cfg = TrainConfig {
        objective: Objective::Pairs(PairObjective {
            losses: vec![(LossType::Sigmoid, 1.0)],
            cfg: LossConfig { beta, ..Default::default() },
        }),
        precompute_ref: true,
        cache_dir: Some(ctx.out.join("cache")),
        ..ctx.train_config(&name, &ctx.plan.dpo)
    };
    let (run, final_dir) = train_and_evaluate(ctx, &cfg, "DPO", beta_name(beta), log)?;
    let final_dir = final_dir.ok_or(DemoError::NoFinalModel { run: "DPO" })?;
    let params = hf::load_model(&final_dir)?.params;
    Ok((run, params))
}

/// Preferred-FT: supervised fine-tuning on the chosen completion of every pair.
pub fn preferred_ft(ctx: &Ctx, log: &mut dyn FnMut(&str)) -> Result<MethodRun, DemoError> {
    let cfg = TrainConfig { objective: Objective::Sft, ..ctx.train_config("preferred-ft", &ctx.plan.preferred_ft) };
    let setting = format!("lr={}", cfg.lr);
    Ok(train_and_evaluate(ctx, &cfg, "Preferred-FT", setting, log)?.0)
}

/// Unlikelihood: likelihood of the chosen completions, unlikelihood of the rejected ones (the trainer's
/// `unlikelihood` loss).
pub fn unlikelihood(ctx: &Ctx, log: &mut dyn FnMut(&str)) -> Result<MethodRun, DemoError> {
    let alpha = ctx.plan.unlikelihood_alpha;
    let cfg = TrainConfig {
        objective: Objective::Unlikelihood(UnlikelihoodConfig { alpha }),
        ..ctx.train_config("unlikelihood", &ctx.plan.unlikelihood)
    };
    Ok(train_and_evaluate(ctx, &cfg, "Unlikelihood", format!("alpha={alpha}"), log)?.0)
}

/// Trains `cfg` (a fresh run, replacing an old one) and evaluates its checkpoints: the method's run and
/// its final model's directory.
fn train_and_evaluate(
    ctx: &Ctx,
    cfg: &TrainConfig,
    method: &str,
    setting: String,
    log: &mut dyn FnMut(&str),
) -> Result<(MethodRun, Option<PathBuf>), DemoError> {
    let t = Instant::now();
    let outcome = train(cfg, &overwrite(), ctx.stop, log)?;
    if outcome.interrupted {
        return Err(DemoError::Interrupted);
    }
    let train_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let points = ctx.evaluate_checkpoints(&cfg.output)?;
    let run = MethodRun {
        method: method.into(),
        setting,
        points,
        train_s,
        eval_s: t.elapsed().as_secs_f64(),
        dir: Some(ctx.rel(&cfg.output)),
    };
    Ok((run, outcome.final_dir))
}

/// How often an implicit reward `beta * log(pi/ref)` ranks a held-out pair as the ground truth does.
/// The sign of the margin does not depend on beta, so neither does the accuracy.
pub fn implicit_reward_accuracy(
    world: &World,
    policy: &Params,
    ref_scores: &[dpo::scoring::PairScore],
    pairs: &[Example],
) -> Result<f64, DemoError> {
    let scores = score_pairs(&world.decoder, world.view(policy), pairs, Packing::SharedPrompt, 64, |_| {})?;
    let correct = scores
        .iter()
        .zip(ref_scores)
        .filter(|(p, r)| (p.chosen_logps - r.chosen_logps) - (p.rejected_logps - r.rejected_logps) > 0.0)
        .count();
    Ok(correct as f64 / pairs.len().max(1) as f64)
}

/// The `dpo/gradient_weight` curve of a trainer run: (step, mean sigma(r_l - r_w)).
pub fn gradient_weights(run_dir: &Path) -> Vec<(f64, f64)> {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["step"].as_f64()?, v["dpo/gradient_weight"].as_f64()?)))
        .collect()
}
