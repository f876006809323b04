//! PPO against a reward (RLHF): the baseline the DPO paper compares with on the reward-vs-KL frontier.
//!
//! The classic recipe of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences"),
//! Stiennon et al. 2020 and TRL's `PPOTrainer`, small and on the CPU. Each PPO step:
//!
//! ```text
//! rollout   rollout_prompts prompts x 1 completion from the current policy (temperature, EOS, max_new_tokens)
//!           score = RewardFn(prompt, completion)
//!           r_t = -kl_coef (logp_t - ref_logp_t), plus score on the last token      (k1 KL penalty)
//!           A = GAE(r, V; gamma, lam), whitened over the rollout; R = A (unwhitened) + V
//! optimise  ppo_epochs passes over the rollout in shuffled minibatches; per minibatch one AdamW step on
//!           mean_t max(-A r, -A clip(r, 1-eps, 1+eps)) + vf_coef * 0.5 mean_t max((V-R)^2, (V_clip-R)^2)
//!           with r = exp(logp - logp_old), the global gradient norm clipped to max_grad_norm
//! ```
//! The value head is one linear unit on the policy's final hidden states (an [`engine::ScalarHead`]; the
//! trunk is shared with the policy, as in TRL's `AutoModelForCausalLMWithValueHead`), read at the hidden
//! state that predicts each completion token; its gradient joins the LM head's on the hidden states before
//! the trunk's backward ([`update`]). It starts at zero: the first rollouts' values are 0 and their
//! advantages the discounted rewards-to-go (whitened). TRL initialises `nn.Linear(d, 1)` randomly; a zero
//! start makes the value loss's gradient reach the trunk only as `w` is learnt, so it cannot disturb the
//! policy's first steps. Policy and value head are one parameter set for one AdamW (as TRL optimises both
//! in one optimizer) and one gradient clip, without weight decay.
//!
//! Where this differs from TRL's defaults, and why: the KL coefficient is fixed (TRL's classic trainer
//! adapts it towards a target KL by default; the DPO paper sweeps a fixed coefficient to trace the
//! frontier); log-probs, ratios and the KL are always those of the policy's own distribution (temperature
//! 1), so sampling at another temperature makes rollouts slightly off-policy, as in TRL's classic trainer.

pub mod gae;
pub mod loss;
pub mod rollout;
pub mod run;
pub mod update;

use std::path::PathBuf;

use engine::kernels::Precision;
use engine::model::Model;
use engine::quant::FrozenLinears;
use engine::{Decoder, EngineError, Params, ScalarHead};
use serde::{Deserialize, Serialize};
// The tests build rollouts by hand.
#[cfg(test)]
use engine::{rng::Rng, Activations};

pub use rollout::{collect_rollout, Rollout};
pub use run::{fingerprint, run_ppo, InputFingerprints, PpoInputs, PpoRun, PpoState, PPO_STATE_FILE};
pub use update::{minibatch_loss, Grads, MinibatchLoss};

/// The reward: a learned reward model, or a ground-truth scorer (the built-in experiment's sentiment
/// classifier on the decoded text).
pub trait RewardFn {
    /// One score per `(prompt, completion)`. Completions are the sampled tokens, the EOS token included
    /// when one was produced. Must return `prompts.len()` finite scores.
    fn rewards(&mut self, prompts: &[&[u32]], completions: &[&[u32]]) -> Vec<f64>;
}

/// The frozen reference model: its decoder (its own configuration; the vocabulary must be the policy's)
/// and weights.
#[derive(Clone, Copy)]
pub struct RefModel<'a> {
    pub decoder: &'a Decoder,
    /// Its weights; with `linears`, all but the block linears (those tensors are then empty).
    pub params: &'a Params,
    /// The block linears stored in bf16 (`crate::train::reference::ReferenceModel` in a bf16 run): the
    /// same log-probs in a bf16 pass, half the memory.
    pub linears: Option<&'a FrozenLinears>,
}

impl<'a> RefModel<'a> {
    /// The reference as a pass in `precision` reads it.
    pub fn view(&self, precision: Precision) -> Model<'a> {
        let m = Model::new(self.params, None).with_precision(precision);
        match self.linears {
            Some(f) => m.with_frozen(f),
            None => m,
        }
    }
}

/// PPO's settings; defaults follow TRL's classic `PPOConfig` except where the module doc says otherwise.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PpoConfig {
    /// Coefficient of the per-token KL penalty `-kl_coef (logp - ref_logp)`.
    pub kl_coef: f64,
    /// AdamW learning rate (constant), for the policy and the value head (no weight decay).
    pub lr: f64,
    /// Prompts sampled per rollout, one completion each.
    pub rollout_prompts: usize,
    /// Sequences per optimizer step.
    pub minibatch: usize,
    /// Passes over each rollout.
    pub ppo_epochs: usize,
    /// `eps` of the clipped surrogate.
    pub clip_range: f64,
    /// How far a value may move from the rollout's before its loss is clipped.
    pub clip_range_value: f64,
    /// Weight of the value loss.
    pub vf_coef: f64,
    /// Discount.
    pub gamma: f64,
    /// GAE's lambda.
    pub lam: f64,
    /// New tokens per completion at most (the EOS token counts).
    pub max_new_tokens: usize,
    /// Sampling temperature of the rollouts.
    pub temperature: f32,
    /// PPO steps (rollout + optimisation).
    pub steps: u64,
    /// Seeds prompt order, sampling and minibatch order.
    pub seed: u64,
    /// Clip the global gradient norm (policy and value head together) to this.
    pub max_grad_norm: f64,
    /// The precision of every pass: the rollouts' prefill and scoring, the reference's, the updates
    /// (decode steps stay f32). A resumed run keeps it, as every setting here.
    #[serde(with = "crate::precision::by_name", default)]
    pub precision: Precision,
}

impl Default for PpoConfig {
    fn default() -> Self {
        PpoConfig {
            kl_coef: 0.05,
            lr: 1e-5,
            rollout_prompts: 16,
            minibatch: 8,
            ppo_epochs: 4,
            clip_range: 0.2,
            clip_range_value: 0.2,
            vf_coef: 0.1,
            gamma: 1.0,
            lam: 0.95,
            max_new_tokens: 64,
            temperature: 1.0,
            steps: 100,
            seed: 42,
            max_grad_norm: 1.0,
            precision: Precision::F32,
        }
    }
}

impl PpoConfig {
    pub fn validate(&self) -> Result<(), PpoError> {
        let bad = |what: String| Err(PpoError::Invalid(what));
        let finite_nonneg = |x: f64| x.is_finite() && x >= 0.0;
        let unit = |x: f64| (0.0..=1.0).contains(&x);
        let positive = |x: f64| x > 0.0 && x.is_finite();
        let open_unit = |x: f64| x > 0.0 && x < 1.0;
        if self.steps == 0
            || self.rollout_prompts == 0
            || self.minibatch == 0
            || self.ppo_epochs == 0
            || self.max_new_tokens == 0
        {
            return bad("steps, rollout_prompts, minibatch, ppo_epochs and max_new_tokens must be at least 1".into());
        }
        if !finite_nonneg(self.kl_coef) || !finite_nonneg(self.lr) || !finite_nonneg(self.vf_coef) {
            return bad(format!(
                "kl_coef ({}), lr ({}) and vf_coef ({}) must be finite and >= 0",
                self.kl_coef, self.lr, self.vf_coef
            ));
        }
        if !open_unit(self.clip_range) || !positive(self.clip_range_value) {
            return bad(format!(
                "clip_range must be in (0, 1) and clip_range_value > 0 (got {} and {})",
                self.clip_range, self.clip_range_value
            ));
        }
        if !unit(self.gamma) || !unit(self.lam) {
            return bad(format!("gamma ({}) and lam ({}) must be in [0, 1]", self.gamma, self.lam));
        }
        if !positive(self.temperature as f64) {
            return bad(format!("temperature must be finite and > 0, got {}", self.temperature));
        }
        if !positive(self.max_grad_norm) {
            return bad(format!("max_grad_norm must be > 0, got {}", self.max_grad_norm));
        }
        Ok(())
    }
}

/// What one PPO step did (TRL's names in the field docs); one line of `metrics.jsonl`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PpoStepStats {
    /// From 1.
    pub step: u64,
    /// Mean score of the rollout, KL penalty excluded (`env/reward_mean`).
    pub reward: f64,
    /// Standard deviation of the scores (`env/reward_std`).
    pub reward_std: f64,
    /// Mean over sequences of `sum_t (logp - ref_logp)` (`objective/kl`).
    pub kl: f64,
    /// Mean over sequences of `sum_t -kl_coef (logp - ref_logp)` (`objective/non_score_reward`).
    pub non_score_reward: f64,
    /// `reward + non_score_reward`: the mean KL-penalised reward PPO maximises (`objective/rlhf_reward`).
    pub rlhf_reward: f64,
    /// Mean over sequences of `-sum_t logp`, a one-sample estimate of the sequence entropy
    /// (`objective/entropy`).
    pub entropy: f64,
    /// Clipped surrogate, mean over minibatch updates (`ppo/loss/policy`).
    pub policy_loss: f64,
    /// Clipped value loss, mean over minibatch updates (`ppo/loss/value`).
    pub value_loss: f64,
    /// `ppo/policy/clipfrac`, mean over minibatch updates.
    pub clip_frac: f64,
    /// `ppo/val/clipfrac`, mean over minibatch updates.
    pub value_clip_frac: f64,
    /// `0.5 mean (logp - logp_old)^2`, mean over minibatch updates (`ppo/policy/approxkl`).
    pub approx_kl: f64,
    /// Global gradient norm before clipping, mean over minibatch updates.
    pub grad_norm: f64,
    /// Mean completion length in tokens, EOS included (`tokens/responses_len_mean`).
    pub completion_len: f64,
    /// Wall-clock seconds of the step (`time/ppo/total`).
    pub seconds: f64,
    /// Minibatch updates skipped as not finite (`--on-nonfinite skip`); the means above leave them out.
    #[serde(skip_serializing_if = "is_zero")]
    pub skipped_updates: u64,
}

/// The TensorBoard tag of a [`PpoStepStats`] key: TRL's `PPOTrainer` name (its docs' "PPO Logging") under
/// `train/`, as its `TensorBoardCallback` writes it; keys TRL has no name for keep theirs under `train/`.
pub fn tensorboard_tag(key: &str) -> Option<String> {
    let trl = match key {
        "reward" => "objective/scores",
        "kl" => "objective/kl",
        "non_score_reward" => "objective/non_score_reward",
        "rlhf_reward" => "objective/rlhf_reward",
        "entropy" => "objective/entropy",
        "policy_loss" => "loss/policy_avg",
        "value_loss" => "loss/value_avg",
        "clip_frac" => "policy/clipfrac_avg",
        "value_clip_frac" => "val/clipfrac_avg",
        "approx_kl" => "policy/approxkl_avg",
        other => return crate::tensorboard::trl_tag(other),
    };
    Some(format!("train/{trl}"))
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The trained policy, its value head, and one record per step taken.
#[derive(Clone, Debug)]
pub struct PpoOutcome {
    pub params: Params,
    pub value_head: ScalarHead,
    /// The steps this call took (a resumed run's earlier steps are in its metrics.jsonl).
    pub history: Vec<PpoStepStats>,
    /// Steps completed in all, a resumed run's earlier ones included.
    pub steps: u64,
    /// Newest checkpoint this call wrote.
    pub checkpoint: Option<PathBuf>,
    /// Stopped by the run's stop flag (a checkpoint was written).
    pub interrupted: bool,
}

impl PpoOutcome {
    fn of(s: PpoState, history: Vec<PpoStepStats>, checkpoint: Option<PathBuf>, interrupted: bool) -> Self {
        let steps = s.state.step;
        PpoOutcome { params: s.params, value_head: s.value_head, history, steps, checkpoint, interrupted }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PpoError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("invalid PPO configuration: {0}")]
    Invalid(String),
    #[error("reward function: {0}")]
    Reward(String),
    #[error("PPO step {step}: the loss or its gradient is not finite (try a lower learning rate)")]
    NonFinite { step: u64 },
    /// A checkpoint resumed with other settings or inputs than it was written with.
    #[error("{} was written {detail}; a resumed run continues as it started (nothing was written)", checkpoint.display())]
    ResumeMismatch { checkpoint: PathBuf, detail: String },
    /// Checkpoints, the run directory, metrics.
    #[error(transparent)]
    Run(#[from] crate::train::TrainError),
}

/// Trains `start` with PPO against `reward`, penalised by the KL to `reference`, for `cfg.steps` steps
/// or until `on_step` (called after every step with its stats and the current weights) returns false.
/// Without a run directory; [`run_ppo`] has checkpoints and resume.
#[allow(clippy::too_many_arguments)]
pub fn train_ppo(
    decoder: &Decoder,
    start: &Params,
    reference: RefModel<'_>,
    prompts: &[Vec<u32>],
    eos_ids: &[u32],
    reward: &mut dyn RewardFn,
    cfg: &PpoConfig,
    on_step: &mut dyn FnMut(&PpoStepStats, &Params) -> bool,
) -> Result<PpoOutcome, PpoError> {
    cfg.validate()?;
    check_inputs(decoder, start, reference, prompts)?;
    let state = PpoState::fresh(start.clone(), decoder.cfg.hidden, cfg);
    let inputs = PpoInputs { decoder, reference, prompts, eos_ids };
    run_ppo(state, inputs, reward, cfg, None, on_step)
}

/// Refuses what would otherwise fail deep inside a step (or silently score the wrong tokens).
fn check_inputs(
    decoder: &Decoder,
    start: &Params,
    reference: RefModel<'_>,
    prompts: &[Vec<u32>],
) -> Result<(), PpoError> {
    let shapes = |p: &Params| p.named().into_iter().map(|(n, t)| (n, t.shape.clone())).collect::<Vec<_>>();
    if shapes(start) != shapes(&Params::zeros(&decoder.cfg)) {
        return Err(PpoError::Invalid("the policy's weights do not match its decoder configuration".into()));
    }
    if shapes(reference.params) != shapes(&Params::zeros(&reference.decoder.cfg)) {
        return Err(PpoError::Invalid("the reference's weights do not match its decoder configuration".into()));
    }
    if reference.decoder.cfg.vocab_size != decoder.cfg.vocab_size {
        return Err(PpoError::Invalid(format!(
            "the reference has a vocabulary of {} tokens, the policy {}",
            reference.decoder.cfg.vocab_size, decoder.cfg.vocab_size
        )));
    }
    if prompts.is_empty() {
        return Err(PpoError::Invalid("no prompts".into()));
    }
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(PpoError::Invalid(format!("prompt {i} has no tokens; sampling needs at least one")));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
