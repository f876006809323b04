//! The PPO loop and the state it resumes from.
//!
//! A PPO step draws its prompts from a seeded shuffle of the prompt list, samples with the same generator,
//! and shuffles the minibatches with it; everything a later step depends on is therefore [`PpoState`]:
//!
//! ```text
//! params, value_head           the policy and its value head                  model/, reward_head.safetensors
//! optimizer                    one AdamW over both (moments, step count)      optimizer.safetensors
//! rng, order, state.cursor     the generator and the place in the prompt order ppo_state.json, trainer_state.json
//! state.step, epoch, tokens    counters                                       trainer_state.json
//! ```
//! A rollout is collected and spent within its step, the KL coefficient is fixed and the advantages are
//! whitened per rollout, so no other statistic runs across steps. Checkpoints are written between steps
//! through the one checkpoint module (a temporary directory renamed into place), and a run resumed from
//! one ends bit-identical to an uninterrupted run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use engine::optim::{clip_grad_norm, Optimizer, OptimizerConfig};
use engine::rng::Rng;
use engine::{Activations, Decoder, ParamSet, Params, ScalarHead};
use serde::{Deserialize, Serialize};

use super::{
    check_inputs, collect_rollout, minibatch_loss, Grads, MinibatchLoss, PpoConfig, PpoError, PpoOutcome, PpoStepStats,
    RefModel, RewardFn,
};
pub use crate::fingerprint::{fingerprint, InputFingerprints};
use crate::train::checkpoint::{self, TrainerState};
use crate::train::run_dir::RunDir;
use crate::train::OnNonFinite;

/// The file of a PPO checkpoint that holds the generator, the prompt order and the settings.
pub const PPO_STATE_FILE: &str = "ppo_state.json";

/// Everything a PPO run carries from one step to the next.
#[derive(Clone, Debug)]
pub struct PpoState {
    pub params: Params,
    pub value_head: ScalarHead,
    /// One AdamW over the policy and the value head, as one parameter set (policy first).
    pub optimizer: Optimizer,
    /// Draws the prompt order, the samples and the minibatch order.
    pub rng: Rng,
    /// The prompt order of the current pass (empty before the first); `state.cursor` is the next place.
    pub order: Vec<usize>,
    /// Steps taken, passes over the prompts begun (`epoch`), completion tokens sampled, minibatch
    /// updates skipped as not finite.
    pub state: TrainerState,
}

/// What `ppo_state.json` holds.
#[derive(Serialize, Deserialize)]
struct SavedSampler {
    rng: [u64; 4],
    order: Vec<usize>,
    /// The settings of the run that wrote the checkpoint (a resume with other settings is refused).
    config: PpoConfig,
    /// Fingerprints of the run's inputs ([`fingerprint`]): a resume with other inputs is refused.
    #[serde(default)]
    inputs: BTreeMap<String, String>,
}

fn optimizer_config() -> OptimizerConfig {
    // Weight decay 0 (the default here): the value head's `w` is a matrix but is not decayed.
    OptimizerConfig::adamw()
}

impl PpoState {
    /// The starting policy with a zero value head, at step 0.
    pub fn fresh(start: Params, hidden: usize, cfg: &PpoConfig) -> Self {
        let mut params = start;
        let mut value_head = ScalarHead::zeros(hidden);
        let optimizer = Optimizer::new(optimizer_config(), &(&mut params, &mut value_head));
        let state = TrainerState { step: 0, epoch: 0, cursor: 0, num_tokens: 0, skipped_steps: 0 };
        PpoState { params, value_head, optimizer, rng: Rng::new(cfg.seed), order: Vec::new(), state }
    }

    /// The checkpoint `path` names (`checkpoints/step-N`, or a run directory: its newest), checked against
    /// the starting policy `model` (every tensor's shape; `model_dir` names it) and the run's settings
    /// `cfg` (all but `steps` must be those the checkpoint was written with) and `inputs` (each input the
    /// checkpoint recorded must have the same fingerprint). Returns the state and the checkpoint's directory.
    pub fn resume(
        path: &Path,
        cfg: &PpoConfig,
        inputs: &InputFingerprints,
        model: &Params,
        model_dir: &Path,
    ) -> Result<(Self, PathBuf), PpoError> {
        let (c, value_head) = checkpoint::load_with_head(path, optimizer_config(), &|_| true)?;
        crate::train::setup::check_shapes_fit(&c.dir, model_dir, &c.model.params, model)?;
        let file = c.dir.join(PPO_STATE_FILE);
        let bad = |msg: String| PpoError::Run(crate::train::TrainError::Checkpoint(file.clone(), msg));
        let text = std::fs::read_to_string(&file).map_err(|e| bad(format!("{e} (not a checkpoint of a PPO run?)")))?;
        let saved: SavedSampler = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let other: Vec<&str> = saved
            .inputs
            .iter()
            .filter(|(k, v)| inputs.get(*k).is_some_and(|now| now != *v))
            .map(|(k, _)| k.as_str())
            .collect();
        if !other.is_empty() {
            let detail = format!("by a run with another {}", other.join(", another "));
            return Err(PpoError::ResumeMismatch { checkpoint: c.dir, detail });
        }
        let differ = config_differences(&saved.config, cfg);
        if !differ.is_empty() {
            let detail = format!("with other settings than the run's config.toml now holds ({})", differ.join(", "));
            return Err(PpoError::ResumeMismatch { checkpoint: c.dir, detail });
        }
        let state = PpoState {
            params: c.model.params,
            value_head,
            optimizer: c.optimizer,
            rng: Rng::from_state(saved.rng),
            order: saved.order,
            state: c.state,
        };
        Ok((state, c.dir))
    }

    /// The next `n` prompts: a seeded shuffle per pass over the list, as a shuffling data loader.
    fn next_prompts(&mut self, prompts: &[Vec<u32>], n: usize) -> Vec<Vec<u32>> {
        (0..n)
            .map(|_| {
                if self.state.cursor == self.order.len() {
                    self.order = (0..prompts.len()).collect();
                    self.rng.shuffle(&mut self.order);
                    self.state.cursor = 0;
                    self.state.epoch += 1;
                }
                self.state.cursor += 1;
                prompts[self.order[self.state.cursor - 1]].clone()
            })
            .collect()
    }
}

/// `key: saved -> now` for each setting but `steps` that differs.
fn config_differences(saved: &PpoConfig, now: &PpoConfig) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(saved), serde_json::to_value(now))
    else {
        return vec!["the settings do not serialise".into()];
    };
    a.iter()
        .filter(|(k, v)| k.as_str() != "steps" && b.get(*k) != Some(*v))
        .map(|(k, v)| format!("{k} {v} in the checkpoint, {} now", b.get(k).cloned().unwrap_or_default()))
        .collect()
}

/// What PPO trains on, fixed for the run.
#[derive(Clone, Copy)]
pub struct PpoInputs<'a> {
    pub decoder: &'a Decoder,
    pub reference: RefModel<'a>,
    pub prompts: &'a [Vec<u32>],
    pub eos_ids: &'a [u32],
}

/// The run directory of a resumable PPO run: checkpoints every `save_every` steps, when `stop` is set
/// (polled between steps) and after the last step; `metrics.jsonl` one line per step.
pub struct PpoRun<'a> {
    pub dir: &'a mut RunDir,
    /// Describes the policy (written as `model/` of each checkpoint).
    pub model_cfg: &'a hf::ModelConfig,
    /// The starting model's directory (tokenizer files are copied from it).
    pub source: &'a Path,
    /// 0: only when stopped and at the end.
    pub save_every: u64,
    pub on_nonfinite: OnNonFinite,
    pub stop: &'a AtomicBool,
    /// Resumed from a checkpoint: the metrics lines after its step are written again.
    pub resumed: bool,
    /// Recorded in every checkpoint, compared by [`PpoState::resume`].
    pub inputs: &'a InputFingerprints,
    /// TensorBoard event files besides metrics.jsonl, under TRL's PPO tags ([`super::tensorboard_tag`]).
    pub report_to: crate::tensorboard::ReportTo,
    pub log: &'a mut dyn FnMut(&str),
}

impl PpoRun<'_> {
    fn save(&mut self, s: &PpoState, cfg: &PpoConfig) -> Result<PathBuf, PpoError> {
        let (rng, order, config, inputs) = (s.rng.state(), s.order.clone(), cfg.clone(), self.inputs.clone());
        let sampler = SavedSampler { rng, order, config, inputs };
        let sampler = serde_json::to_vec_pretty(&sampler).expect("the sampler state serialises");
        let output = self.dir.path().to_path_buf();
        let (p, h) = (&s.params, Some(&s.value_head));
        let extras: [(&str, &[u8]); 1] = [(PPO_STATE_FILE, &sampler)];
        let path = checkpoint::save_with_extras(
            &output,
            self.model_cfg,
            p,
            h,
            &extras,
            self.source,
            &s.optimizer,
            &s.state,
            cfg.steps,
        )?;
        checkpoint::prune(&output, 0);
        self.dir.started();
        Ok(path)
    }
}

/// The PPO loop from `s` to `cfg.steps` steps, or until `on_step` (called after every step with its stats
/// and the current weights) returns false. With a run (`run`): checkpoints, metrics, resume, stop on
/// signal and the non-finite policy, as `dpo train`'s loop; without one, a minibatch whose loss or
/// gradient is not finite ends the run with [`PpoError::NonFinite`].
pub fn run_ppo(
    mut s: PpoState,
    inputs: PpoInputs<'_>,
    reward: &mut dyn RewardFn,
    cfg: &PpoConfig,
    mut run: Option<PpoRun<'_>>,
    on_step: &mut dyn FnMut(&PpoStepStats, &Params) -> bool,
) -> Result<PpoOutcome, PpoError> {
    cfg.validate()?;
    let PpoInputs { decoder, reference, prompts, eos_ids } = inputs;
    check_inputs(decoder, &s.params, reference, prompts)?;
    if s.order.len() > prompts.len() || s.state.cursor > s.order.len() {
        return Err(PpoError::Invalid(format!(
            "the checkpoint's prompt order covers {} prompts; the run has {}",
            s.order.len(),
            prompts.len()
        )));
    }
    if s.value_head.w.data.len() != decoder.cfg.hidden {
        return Err(PpoError::Invalid("the value head does not fit the policy's hidden size".into()));
    }
    let mut metrics = match run.as_mut() {
        Some(r) => {
            if r.resumed {
                (r.log)(&format!("resuming at step {}", s.state.step));
                r.dir.abandon_after(s.state.step, r.log)?;
            }
            let resumed_at = r.resumed.then_some(s.state.step);
            Some(r.dir.metrics_tagged(resumed_at, r.report_to, super::tensorboard_tag)?)
        }
        None => None,
    };
    let mut grads = Params::zeros(&decoder.cfg);
    let mut head_grad = ScalarHead::zeros(decoder.cfg.hidden);
    let mut dhidden = Vec::new();
    let mut acts = Activations::default();
    let mut history = Vec::new();
    let mut newest = None;
    let keep_last_good = run.as_ref().is_some_and(|r| r.on_nonfinite == OnNonFinite::Stop);

    while s.state.step < cfg.steps {
        if let Some(r) = run.as_mut().filter(|r| r.stop.load(Ordering::SeqCst)) {
            let p = r.save(&s, cfg)?;
            return Ok(PpoOutcome::of(s, history, Some(p), true));
        }
        // The state this step starts from: what a stopped run's checkpoint holds when a later minibatch
        // is not finite (the rollout of this step is not kept, so the step is taken again on resume).
        let before = keep_last_good.then(|| s.clone());
        let step = s.state.step + 1;
        let t0 = Instant::now();
        let batch = s.next_prompts(prompts, cfg.rollout_prompts);
        let (params, head) = (&s.params, &s.value_head);
        let ro = collect_rollout(decoder, params, head, reference, batch, eos_ids, reward, cfg, &mut s.rng, &mut acts)?;

        let mut sums = MinibatchLoss::default();
        let mut grad_norm_sum = 0.0;
        let (mut updates, mut skipped_updates) = (0usize, 0u64);
        for _ in 0..cfg.ppo_epochs {
            let mut seqs: Vec<usize> = (0..ro.len()).collect();
            s.rng.shuffle(&mut seqs);
            for rows in seqs.chunks(cfg.minibatch) {
                grads.fill_zero();
                head_grad.fill_zero();
                let g = Grads { policy: &mut grads, head: &mut head_grad, dhidden: &mut dhidden };
                let m = minibatch_loss(decoder, &s.params, &s.value_head, &ro, rows, cfg, &mut acts, Some(g))?;
                let mut all_grads = (&mut grads, &mut head_grad);
                let norm = clip_grad_norm(&mut all_grads, cfg.max_grad_norm);
                if !m.loss.is_finite() || !norm.is_finite() {
                    let what = if m.loss.is_finite() { "gradient" } else { "loss" };
                    match (run.as_mut(), before.as_ref()) {
                        (Some(r), _) if r.on_nonfinite == OnNonFinite::Skip => {
                            (r.log)(&format!("step {step}: a minibatch's {what} is not finite; update skipped"));
                            s.state.skipped_steps += 1;
                            skipped_updates += 1;
                            continue;
                        }
                        (Some(r), Some(good)) => {
                            let p = r.save(good, cfg)?;
                            (r.log)(&format!("checkpoint of the last good state written to {}", p.display()));
                            return Err(PpoError::NonFinite { step });
                        }
                        _ => return Err(PpoError::NonFinite { step }),
                    }
                }
                s.optimizer.step(&mut (&mut s.params, &mut s.value_head), &all_grads, cfg.lr);
                sums.policy_loss += m.policy_loss;
                sums.value_loss += m.value_loss;
                sums.clip_frac += m.clip_frac;
                sums.value_clip_frac += m.value_clip_frac;
                sums.approx_kl += m.approx_kl;
                grad_norm_sum += norm;
                updates += 1;
            }
        }

        let n = ro.len() as f64;
        let u = updates.max(1) as f64;
        let mean = |x: &[f64]| x.iter().sum::<f64>() / n;
        let reward_mean = mean(&ro.scores);
        let non_score_reward = mean(&ro.non_score);
        let sampled: usize = ro.completions.iter().map(Vec::len).sum();
        let stats = PpoStepStats {
            step,
            reward: reward_mean,
            reward_std: (ro.scores.iter().map(|s| (s - reward_mean).powi(2)).sum::<f64>() / n).sqrt(),
            kl: mean(&ro.kl),
            non_score_reward,
            rlhf_reward: reward_mean + non_score_reward,
            entropy: ro.logp.iter().map(|l| -l.iter().map(|&v| v as f64).sum::<f64>()).sum::<f64>() / n,
            policy_loss: sums.policy_loss / u,
            value_loss: sums.value_loss / u,
            clip_frac: sums.clip_frac / u,
            value_clip_frac: sums.value_clip_frac / u,
            approx_kl: sums.approx_kl / u,
            grad_norm: grad_norm_sum / u,
            completion_len: sampled as f64 / n,
            seconds: t0.elapsed().as_secs_f64(),
            skipped_updates,
        };
        s.state.step = step;
        s.state.num_tokens += sampled as u64;
        if let Some(m) = metrics.as_mut() {
            m.append(&serde_json::to_value(&stats).expect("stats serialise"))?;
        }
        history.push(stats.clone());
        let go_on = on_step(&stats, &s.params);
        if let Some(r) = run.as_mut() {
            if step == cfg.steps || (r.save_every > 0 && step.is_multiple_of(r.save_every)) {
                newest = Some(r.save(&s, cfg)?);
            }
        }
        if !go_on {
            break;
        }
    }
    Ok(PpoOutcome::of(s, history, newest, false))
}
