//! The RLHF baselines (`dpo::rlhf`): a Bradley-Terry reward model trained on the same pairs as DPO,
//! PPO against it and against the ground truth ("PPO-GT" in the paper), and Best-of-N sampling of the
//! SFT model scored by the reward model.
//!
//! The learned reward is standardised (mean 0, standard deviation 1 over the SFT samples the pairs came
//! from), as Stiennon et al. normalise theirs, so one KL coefficient means about the same against the
//! reward model as against VADER, whose scores have a spread of the same order.

use std::time::Instant;

use engine::rng::Rng;
use engine::Params;

use super::evaluate::{mean, std_err, Point, World};
use super::methods::{Ctx, MethodRun};
use super::report::RewardAccuracy;
use super::DemoError;
use dpo::data::Example;
use dpo::rlhf::best_of_n::{best_of_n, best_of_n_kl};
use dpo::rlhf::ppo::{train_ppo, PpoConfig, RefModel, RewardFn};
use dpo::rlhf::reward::{accuracy, train_reward_model, RewardModel, RmTrainConfig};

fn method_err(method: &str, e: impl std::fmt::Display) -> DemoError {
    DemoError::Method { method: method.to_string(), reason: e.to_string() }
}

fn rm_err(e: impl std::fmt::Display) -> DemoError {
    method_err("reward model", e)
}

/// The trained reward model and its standardisation, kept for the later judges (Best-of-N on the
/// win-rate prompts, online DPO's labels).
pub struct LearnedRm {
    pub rm: RewardModel,
    pub shift: f64,
    pub scale: f64,
}

impl LearnedRm {
    pub fn scorer(&self) -> Learned<'_> {
        Learned { rm: &self.rm, shift: self.shift, scale: self.scale, error: None }
    }

    /// Standardised rewards of `(prompt, completion)` items.
    pub fn rewards(&self, items: &[(&[u32], &[u32])]) -> Result<Vec<f64>, DemoError> {
        let mut s = self.scorer();
        let r = s.score(items);
        match s.error {
            Some(e) => Err(rm_err(e)),
            None => Ok(r),
        }
    }

    /// Best-of-`n` of `params` on `prompts` under this reward (temperature 1): the kept completion of
    /// each prompt.
    pub fn best_of_n(
        &self,
        world: &World,
        params: &Params,
        prompts: &[Vec<u32>],
        n: usize,
        sampling: &engine::generate::SamplingConfig,
        seed: u64,
    ) -> Result<Vec<Vec<u32>>, DemoError> {
        let mut learned = self.scorer();
        let mut score = |items: &[(&[u32], &[u32])]| -> Result<Vec<f64>, String> { Ok(learned.score(items)) };
        let mut rng = Rng::new(seed);
        let best = best_of_n(&world.decoder, world.view(params), prompts, n, sampling, &mut score, &mut rng)
            .map_err(|e| method_err("Best-of-N", e))?;
        if let Some(e) = learned.error {
            return Err(rm_err(e));
        }
        Ok(best.into_iter().map(|b| b.best.tokens).collect())
    }
}

/// The reward model's score, standardised.
pub struct Learned<'a> {
    rm: &'a RewardModel,
    shift: f64,
    scale: f64,
    error: Option<String>,
}

impl Learned<'_> {
    fn score(&mut self, items: &[(&[u32], &[u32])]) -> Vec<f64> {
        match self.rm.score(items) {
            Ok(v) => v.into_iter().map(|r| (r - self.shift) / self.scale).collect(),
            Err(e) => {
                self.error.get_or_insert(e.to_string());
                vec![0.0; items.len()]
            }
        }
    }
}

impl RewardFn for Learned<'_> {
    fn rewards(&mut self, prompts: &[&[u32]], completions: &[&[u32]]) -> Vec<f64> {
        let items: Vec<(&[u32], &[u32])> = prompts.iter().copied().zip(completions.iter().copied()).collect();
        self.score(&items)
    }
}

/// VADER on the decoded text: the ground truth.
struct Truth<'a> {
    world: &'a World,
    error: Option<String>,
}

impl RewardFn for Truth<'_> {
    fn rewards(&mut self, prompts: &[&[u32]], completions: &[&[u32]]) -> Vec<f64> {
        let items: Vec<(&[u32], &[u32])> = prompts.iter().copied().zip(completions.iter().copied()).collect();
        match self.world.ground_truth_all(&items) {
            Ok(v) => v,
            Err(e) => {
                self.error.get_or_insert(e.to_string());
                vec![0.0; items.len()]
            }
        }
    }
}

/// Runs PPO against the ground truth, trains the reward model, then runs PPO against it and Best-of-N; appends their runs and the
/// reward model's held-out accuracy. Returns the reward model when one was trained.
pub fn run_all(
    ctx: &Ctx,
    sft: &Params,
    heldout: &[Example],
    runs: &mut Vec<MethodRun>,
    accuracies: &mut Vec<RewardAccuracy>,
    log: &mut dyn FnMut(&str),
) -> Result<Option<LearnedRm>, DemoError> {
    let plan = ctx.plan;
    // The reward model also labels online and iterative DPO's pairs.
    let needs_rm = !plan.ppo.kl_coefs_learned.is_empty()
        || !plan.bon_ns.is_empty()
        || plan.online.steps.steps > 0
        || plan.iterative.rounds > 0;
    let mut truth = Truth { world: ctx.world, error: None };
    let prompts: Vec<Vec<u32>> = ctx.pairs.iter().map(|e| e.prompt_ids.clone()).fold(Vec::new(), |mut v, p| {
        if v.last() != Some(&p) {
            v.push(p);
        }
        v
    });
    for &kl_coef in &plan.ppo.kl_coefs_true {
        let r = ppo(ctx, sft, &prompts, &mut truth, "PPO-GT", kl_coef, log)?;
        if let Some(e) = truth.error.take() {
            return Err(method_err("PPO-GT reward", e));
        }
        runs.push(r);
    }
    if !needs_rm {
        return Ok(None);
    }
    log("[4/5] reward model (Bradley-Terry, from the SFT model)");
    let t = Instant::now();
    let rc = RmTrainConfig {
        lr: plan.reward_model.lr,
        batch_size: plan.reward_model.batch,
        max_steps: Some(plan.reward_model.steps),
        seed: plan.seed,
        precision: plan.precision,
        ..Default::default()
    };
    let mut every = 0u64;
    let log_every = (plan.reward_model.steps / 4).max(1);
    let mut rm_log = |line: &str| {
        // One line per step from the trainer; keep a few.
        if line.starts_with("step ") || line.starts_with("reward model step ") {
            every += 1;
            if !every.is_multiple_of(log_every) {
                return;
            }
        }
        log(line)
    };
    let (rm, _stats) = train_reward_model(&ctx.world.decoder.cfg, sft.clone(), ctx.pairs, heldout, &rc, &mut rm_log)
        .map_err(rm_err)?;
    let rm_dir = ctx.out.join("runs").join("reward-model");
    rm.save(&rm_dir, ctx.model_cfg, Some(ctx.sft_dir)).map_err(rm_err)?;
    let rm_acc = accuracy(&rm, heldout).map_err(rm_err)?;
    let rm_s = t.elapsed().as_secs_f64();
    log(&format!("      reward model: held-out accuracy {rm_acc:.3} ({rm_s:.0}s)"));
    accuracies.insert(0, RewardAccuracy { scorer: "Bradley-Terry reward model".into(), accuracy: rm_acc });

    // Standardise over the SFT samples the pairs came from.
    let seqs: Vec<(&[u32], &[u32])> = ctx
        .pairs
        .iter()
        .flat_map(|e| [(&e.prompt_ids[..], &e.chosen_ids[..]), (&e.prompt_ids[..], &e.rejected_ids[..])])
        .collect();
    let raw = rm.score(&seqs).map_err(rm_err)?;
    let shift = mean(&raw);
    let scale = (std_err(&raw) * (raw.len() as f64).sqrt()).max(1e-6);
    let mut learned = Learned { rm: &rm, shift, scale, error: None };

    // PPO against the learned reward.
    for &kl_coef in &plan.ppo.kl_coefs_learned {
        let r = ppo(ctx, sft, &prompts, &mut learned, "PPO", kl_coef, log)?;
        if let Some(e) = learned.error.take() {
            return Err(rm_err(e));
        }
        runs.push(r);
    }
    // Best-of-N of the SFT model under the learned reward.
    if let Some(&max_n) = plan.bon_ns.iter().max() {
        log(&format!("[4/5] Best-of-N, N in {:?} (learned reward)", plan.bon_ns));
        let r = bon(ctx, sft, &mut learned, max_n)?;
        if let Some(e) = learned.error.take() {
            return Err(rm_err(e));
        }
        runs.push(r);
    }
    Ok(Some(LearnedRm { rm, shift, scale }))
}

/// One PPO run, measured at evenly spaced steps; each measured policy is saved as a checkpoint.
fn ppo(
    ctx: &Ctx,
    sft: &Params,
    prompts: &[Vec<u32>],
    reward: &mut dyn RewardFn,
    method: &str,
    kl_coef: f64,
    log: &mut dyn FnMut(&str),
) -> Result<MethodRun, DemoError> {
    let p = &ctx.plan.ppo;
    log(&format!("[4/5] {method} kl_coef={kl_coef}"));
    let cfg = PpoConfig {
        kl_coef,
        lr: p.lr,
        rollout_prompts: p.rollout_prompts,
        minibatch: p.minibatch,
        ppo_epochs: p.ppo_epochs,
        max_new_tokens: ctx.plan.max_new_tokens,
        steps: p.steps as u64,
        seed: ctx.plan.seed,
        precision: ctx.plan.precision,
        ..Default::default()
    };
    let name = format!("{}-kl{kl_coef}", method.to_lowercase());
    let dir = ctx.out.join("runs").join(&name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| DemoError::io(&dir, e))?;
    let every = (p.steps / p.evals.max(1)).max(1) as u64;
    let mut points: Vec<Point> = Vec::new();
    let mut failure: Option<DemoError> = None;
    let mut eval_s = 0.0;
    let mut metrics = String::new();
    let t = Instant::now();
    let reference = RefModel { decoder: &ctx.world.decoder, params: &ctx.world.reference, linears: None };
    let mut on_step = |s: &dpo::rlhf::ppo::PpoStepStats, params: &Params| -> bool {
        metrics += &serde_json::to_string(s).unwrap_or_default();
        metrics.push('\n');
        if s.step.is_multiple_of((every.max(4) / 2).max(1)) || s.step == cfg.steps {
            log(&format!(
                "step {}/{}  reward {:.3}  kl {:.2}  policy loss {:.4}  value loss {:.4}  {:.1}s/step",
                s.step, cfg.steps, s.reward, s.kl, s.policy_loss, s.value_loss, s.seconds
            ));
        }
        if s.step.is_multiple_of(every) || s.step == cfg.steps {
            let te = Instant::now();
            let result = ctx.evaluator.evaluate(ctx.world, params, s.step).and_then(|pt| {
                let ck = dir.join("checkpoints").join(format!("step-{}", s.step)).join("model");
                hf::save_model(&ck, ctx.model_cfg, params, Some(ctx.sft_dir))?;
                Ok(pt)
            });
            eval_s += te.elapsed().as_secs_f64();
            match result {
                Ok(pt) => points.push(pt),
                Err(e) => {
                    failure = Some(e);
                    return false;
                }
            }
        }
        !ctx.stop.load(std::sync::atomic::Ordering::SeqCst)
    };
    let outcome =
        train_ppo(&ctx.world.decoder, sft, reference, prompts, &ctx.world.eos_ids, reward, &cfg, &mut on_step)
            .map_err(|e| method_err(method, e))?;
    if let Some(e) = failure {
        return Err(e);
    }
    if ctx.stop.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(DemoError::Interrupted);
    }
    let mpath = dir.join("metrics.jsonl");
    dpo::io::write_atomic(&mpath, metrics.as_bytes()).map_err(|e| DemoError::io(&mpath, e))?;
    hf::save_model(&dir.join("final"), ctx.model_cfg, &outcome.params, Some(ctx.sft_dir))?;
    Ok(MethodRun {
        method: method.into(),
        setting: format!("kl_coef={kl_coef}"),
        points,
        train_s: t.elapsed().as_secs_f64() - eval_s,
        eval_s,
        dir: Some(format!("runs/{name}")),
    })
}

/// Best-of-N for every N of the plan from one draw of `max_n` samples per evaluation prompt: for each
/// N the samples are cut into `max_n / N` disjoint blocks, each block keeps its highest-scoring sample
/// (by the learned reward), and the point is the mean ground-truth reward of the kept samples. KL is
/// the analytic `log N - (N - 1) / N`.
fn bon(ctx: &Ctx, sft: &Params, learned: &mut Learned, max_n: usize) -> Result<MethodRun, DemoError> {
    let t = Instant::now();
    let world = ctx.world;
    let prompts = &ctx.evaluator.prompts;
    // The scorer sees every sample; keep the learned and the true reward of each.
    let mut all: Vec<(f64, f64)> = Vec::new();
    let mut gt_error = None;
    let mut score = |items: &[(&[u32], &[u32])]| -> Result<Vec<f64>, String> {
        let r = learned.score(items);
        let gt = match world.ground_truth_all(items) {
            Ok(v) => v,
            Err(e) => {
                gt_error = Some(e.to_string());
                vec![0.0; items.len()]
            }
        };
        all = r.iter().copied().zip(gt).collect();
        Ok(r)
    };
    let mut rng = Rng::new(ctx.evaluator.seed ^ 0xB0B0);
    best_of_n(&world.decoder, world.view(sft), prompts, max_n, &ctx.evaluator.sampling, &mut score, &mut rng)
        .map_err(|e| method_err("Best-of-N", e))?;
    if let Some(e) = gt_error {
        return Err(method_err("Best-of-N reward", e));
    }
    let mut ns = ctx.plan.bon_ns.clone();
    ns.sort_unstable();
    ns.dedup();
    let mut points = Vec::new();
    for &n in &ns {
        let mut kept = Vec::new();
        for per_prompt in all.chunks_exact(max_n) {
            for block in per_prompt.chunks_exact(n) {
                let best = (1..block.len()).fold(0, |b, i| if block[i].0 > block[b].0 { i } else { b });
                kept.push(block[best].1);
            }
        }
        points.push(Point {
            step: n as u64,
            kl: best_of_n_kl(n),
            reward: mean(&kept),
            reward_se: std_err(&kept),
            length: f64::NAN,
        });
    }
    Ok(MethodRun {
        method: "Best-of-N".into(),
        setting: format!("{} prompts x {max_n} samples", prompts.len()),
        points,
        train_s: t.elapsed().as_secs_f64(),
        eval_s: 0.0,
        dir: None,
    })
}
