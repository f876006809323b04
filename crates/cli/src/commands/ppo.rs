//! `dpo ppo`: RLHF with PPO against a learned reward model (the baseline of the DPO paper's reward-vs-KL
//! frontier). Samples from the policy, scores with the reward model, penalises the KL to a frozen
//! reference, and writes one metrics line per PPO step and the trained model.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{bail, Context};
use dpo::data::{check_generation_positions, read_prompts, stop_ids};
use dpo::rlhf::ppo::{train_ppo, PpoConfig, PpoStepStats, RefModel, RewardFn};
use dpo::rlhf::reward::{RewardModel, RewardModelError};
use dpo::train::run_dir::{self, model_of, RunDir, StartMode};
use dpo::train::Reference;
use engine::Decoder;
use serde::Serialize;

use super::progress::Progress;
use super::train::{stop_flag, with_hint};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The starting policy (Hugging Face directory), usually the SFT model.
    #[arg(long)]
    model: PathBuf,
    /// The reference of the KL penalty (default: a frozen copy of --model).
    #[arg(long)]
    ref_model: Option<PathBuf>,
    /// The reward model: the run directory `dpo reward-model train` wrote (or its final/, a model
    /// directory with reward_head.safetensors); it must share the policy's tokenizer.
    #[arg(long)]
    reward_model: PathBuf,
    /// Prompts: JSONL (or a JSON list) of rows with `prompt` as text or as a list of chat messages; text
    /// goes through the chat template when the tokenizer has one, as in `dpo generate`.
    #[arg(long)]
    prompts: PathBuf,
    /// Run directory: config.toml, metrics.jsonl, final/.
    #[arg(long)]
    output: PathBuf,
    /// Replace a previous run in --output.
    #[arg(long)]
    overwrite: bool,
    /// Coefficient of the per-token KL penalty -kl_coef * (log pi - log ref).
    #[arg(long, default_value_t = 0.05)]
    kl_coef: f64,
    /// AdamW learning rate (constant), policy and value head.
    #[arg(long, default_value_t = 1e-5)]
    lr: f64,
    /// PPO steps (each: one rollout, then --ppo-epochs passes over it).
    #[arg(long, default_value_t = 100)]
    steps: u64,
    /// Prompts sampled per rollout, one completion each.
    #[arg(long, default_value_t = 16)]
    rollout_prompts: usize,
    /// Sequences per optimizer step.
    #[arg(long, default_value_t = 8)]
    minibatch: usize,
    /// Passes over each rollout.
    #[arg(long, default_value_t = 4)]
    ppo_epochs: usize,
    /// New tokens per completion at most (the EOS token counts).
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sampling temperature of the rollouts (log-probs and the KL are always at temperature 1).
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Weight of the value loss.
    #[arg(long, default_value_t = 0.1)]
    vf_coef: f64,
    /// PPO's clip range of the probability ratio.
    #[arg(long, default_value_t = 0.2)]
    clip_range: f64,
    /// Clip the global gradient norm to this.
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Seeds prompt order, sampling and minibatch order.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Tokenize text prompts as they are, even when the tokenizer has a chat template.
    #[arg(long)]
    no_chat: bool,
}

/// The reward model as PPO's reward; an error is kept for the command to report (PPO sees NaN scores
/// and stops).
struct ModelReward {
    rm: RewardModel,
    error: Option<RewardModelError>,
}

impl RewardFn for ModelReward {
    fn rewards(&mut self, prompts: &[&[u32]], completions: &[&[u32]]) -> Vec<f64> {
        let seqs: Vec<(&[u32], &[u32])> = prompts.iter().copied().zip(completions.iter().copied()).collect();
        match self.rm.score(&seqs) {
            Ok(s) => s,
            Err(e) => {
                self.error = Some(e);
                vec![f64::NAN; seqs.len()]
            }
        }
    }
}

/// config.toml of a PPO run.
#[derive(Serialize)]
struct PpoRunConfig<'a> {
    model: &'a Path,
    ref_model: Option<&'a Path>,
    reward_model: &'a Path,
    prompts: &'a Path,
    chat: bool,
    eos_ids: &'a [u32],
    ppo: &'a PpoConfig,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let cfg = PpoConfig {
        kl_coef: a.kl_coef,
        lr: a.lr,
        rollout_prompts: a.rollout_prompts,
        minibatch: a.minibatch,
        ppo_epochs: a.ppo_epochs,
        clip_range: a.clip_range,
        vf_coef: a.vf_coef,
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        steps: a.steps,
        seed: a.seed,
        max_grad_norm: a.max_grad_norm,
        ..PpoConfig::default()
    };
    cfg.validate()?;
    let mode = if a.overwrite { StartMode::Overwrite } else { StartMode::Fresh };
    run_dir::preflight(&a.output, mode).map_err(|e| with_hint(e, "dpo ppo"))?;

    let model = hf::load_model(&a.model)?;
    let tok = hf::load_tokenizer(&a.model)?;
    let chat = !a.no_chat && tok.chat_template().is_some();
    let prompts = read_prompts(&a.prompts, &tok, chat)?;
    // Sampling reads the prompt and every new token but the last.
    let lens = prompts.iter().map(|p| (p.location.as_str(), p.ids.len()));
    if let Err((location, needed, max)) =
        check_generation_positions(lens, a.max_new_tokens.saturating_sub(1), &model.config.decoder)
    {
        bail!(
            "{}, {location}: the prompt has {} tokens, and with --max-new-tokens {} needs {needed} positions; the \
             model has {max} learned positions (shorten the prompt or lower --max-new-tokens)",
            a.prompts.display(),
            needed - a.max_new_tokens.saturating_sub(1),
            a.max_new_tokens,
        );
    }
    let prompts: Vec<Vec<u32>> = prompts.into_iter().map(|p| p.ids).collect();
    let decoder = Decoder::new(model.config.decoder.clone());
    let reference = match &a.ref_model {
        Some(dir) => Reference::load(dir, &model.config, Some(&tok))?,
        None => Reference::Model(Arc::new((Decoder::new(model.config.decoder.clone()), model.params.clone()))),
    };
    let Some((ref_decoder, ref_params)) = reference.model() else { bail!("the reference holds no model") };
    let rm = RewardModel::load(&model_of(&a.reward_model))
        .with_context(|| format!("loading the reward model {}", a.reward_model.display()))?;
    let vocab = rm.decoder.cfg.vocab_size;
    if vocab != decoder.cfg.vocab_size {
        bail!(
            "the reward model has a vocabulary of {vocab} tokens, the policy {}: they must share a tokenizer",
            decoder.cfg.vocab_size
        );
    }
    let eos_ids = stop_ids(&model.config, &tok);

    // Everything is loaded and checked: the run directory is taken (locked; a previous run is moved
    // aside and put back if this one fails before its final model is written).
    let mut dir = RunDir::open(&a.output, mode, &mut |l| eprintln!("{l}")).map_err(|e| with_hint(e, "dpo ppo"))?;
    let final_dir = a.output.join("final");
    let config = PpoRunConfig {
        model: &a.model,
        ref_model: a.ref_model.as_deref(),
        reward_model: &a.reward_model,
        prompts: &a.prompts,
        chat,
        eos_ids: &eos_ids,
        ppo: &cfg,
    };
    dir.write_config(&toml::to_string_pretty(&config).context("writing config.toml")?)?;
    let mut metrics = dir.metrics(None)?;

    let stop = stop_flag()?;
    let mut progress = Progress::new();
    progress.line(&format!(
        "{} prompts; {} PPO steps of {} rollouts, {} epochs of minibatches of {}",
        prompts.len(),
        cfg.steps,
        cfg.rollout_prompts,
        cfg.ppo_epochs,
        cfg.minibatch
    ));
    let mut reward = ModelReward { rm, error: None };
    let mut write_error = None;
    let mut on_step = |s: &PpoStepStats, _: &engine::Params| {
        let line = serde_json::to_value(s).expect("stats serialise");
        if let Err(e) = metrics.append(&line) {
            write_error = Some(e);
            return false;
        }
        progress.line(&step_line(s, cfg.steps));
        !stop.load(Ordering::SeqCst)
    };
    let outcome = train_ppo(
        &decoder,
        &model.params,
        RefModel { decoder: ref_decoder, params: ref_params },
        &prompts,
        &eos_ids,
        &mut reward,
        &cfg,
        &mut on_step,
    );
    progress.finish();
    if let Some(e) = reward.error {
        return Err(e).context("scoring completions with the reward model");
    }
    if let Some(e) = write_error {
        return Err(e.into());
    }
    let outcome = outcome?;
    hf::save_model(&final_dir, &model.config, &outcome.params, Some(&a.model))?;
    dir.started();
    let steps = outcome.history.len();
    let how = if (steps as u64) < cfg.steps { "stopped" } else { "done" };
    eprintln!("{how}: {steps} PPO steps; model written to {}", final_dir.display());
    Ok(())
}

/// `step N/M  reward R  kl K ...`: the reward-vs-KL trade-off as it moves.
fn step_line(s: &PpoStepStats, total: u64) -> String {
    format!(
        "step {}/{total}  reward {:+.4}  kl {:.4}  non-score {:+.4}  policy {:+.4}  value {:.4}  clip {:.3}  len {:.1}  {:.1} s",
        s.step, s.reward, s.kl, s.non_score_reward, s.policy_loss, s.value_loss, s.clip_frac, s.completion_len, s.seconds
    )
}
