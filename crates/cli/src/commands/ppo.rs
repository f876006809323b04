//! `dpo ppo`: RLHF with PPO against a learned reward model (the baseline of the DPO paper's reward-vs-KL
//! frontier). Samples from the policy, scores with the reward model, penalises the KL to a frozen
//! reference, and writes one metrics line per PPO step, resumable checkpoints and the trained model.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use dpo::data::{check_generation_positions, read_prompts, stop_ids};
use dpo::rlhf::ppo::{
    fingerprint, run_ppo, InputFingerprints, PpoConfig, PpoError, PpoInputs, PpoRun, PpoState, PpoStepStats, RefModel,
    RewardFn,
};
use dpo::rlhf::reward::{RewardModel, RewardModelError};
use dpo::train::reference::{check_fits, ReferenceModel};
use dpo::train::run_dir::{self, model_of, resume_target, RunDir, StartMode};
use dpo::train::OnNonFinite;
use engine::{Decoder, ParamSet};
use serde::{Deserialize, Serialize};

use super::given::{resume_settings, Given};
use super::progress::{written, Progress};
use super::train::{run_outputs, with_hint};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The starting policy (Hugging Face directory), usually the SFT model.
    #[arg(long, value_parser = super::source::model_arg, required_unless_present = "resume")]
    model: Option<PathBuf>,
    /// The reference of the KL penalty (default: a frozen copy of --model).
    #[arg(long, value_parser = super::source::model_arg)]
    ref_model: Option<PathBuf>,
    /// The reward model: the run directory `dpo reward-model train` wrote (or its final/, a model
    /// directory with reward_head.safetensors); it must share the policy's tokenizer.
    #[arg(long, value_parser = super::source::model_arg, required_unless_present = "resume")]
    reward_model: Option<PathBuf>,
    /// Prompts: JSONL (or a JSON list) of rows with `prompt` as text or as a list of chat messages; text
    /// goes through the chat template when the tokenizer has one, as in `dpo generate`.
    #[arg(long, required_unless_present = "resume")]
    prompts: Option<PathBuf>,
    /// Run directory: config.toml, metrics.jsonl, checkpoints/step-N (policy, value head, optimizer and
    /// sampler state), final/ the trained policy.
    #[arg(long, required_unless_present = "resume")]
    output: Option<PathBuf>,
    /// Replace a previous run in --output (it is replaced once the first checkpoint or the new model is
    /// written).
    #[arg(long)]
    overwrite: bool,
    /// Continue an interrupted or finished run: its directory (from its newest checkpoint) or one of its
    /// checkpoints/step-N. The settings come from the run's config.toml: --steps may lengthen the run,
    /// --save-every, --on-nonfinite and --report-to may change, and another value of a flag that changes
    /// the numbers is refused by name.
    #[arg(long, conflicts_with_all = ["model", "ref_model", "reward_model", "prompts", "output", "overwrite", "no_chat"])]
    resume: Option<PathBuf>,
    /// Write a resumable checkpoint every N PPO steps (0: at the end and on interruption only) [default: 0].
    #[arg(long)]
    save_every: Option<u64>,
    /// On a NaN or infinite loss or gradient: stop (the checkpoint of the state before the PPO step is
    /// written) or skip the minibatch update [default: stop].
    #[arg(long, value_parser = ["stop", "skip"])]
    on_nonfinite: Option<String>,
    /// Coefficient of the per-token KL penalty -kl_coef * (log pi - log ref).
    #[arg(long, default_value_t = 0.05)]
    kl_coef: f64,
    /// AdamW learning rate (constant), policy and value head.
    #[arg(long, default_value_t = 1e-5)]
    lr: f64,
    /// PPO steps (each: one rollout, then --ppo-epochs passes over it).
    #[arg(long, default_value_t = 100, visible_alias = "max-steps")]
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
    /// Where metrics go: jsonl (metrics.jsonl, always written), tensorboard (event files under RUN/runs/
    /// with TRL's PPO tags: train/objective/kl, train/objective/scores, ...), or both [default: jsonl].
    #[arg(long, value_name = "jsonl,tensorboard")]
    report_to: Option<String>,
    /// (With --resume, a precision other than the run's is refused by name.)
    #[command(flatten)]
    precision: super::precision::PrecisionFlag,
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

/// config.toml of a PPO run (read back by --resume).
#[derive(Clone, Serialize, Deserialize)]
struct PpoRunConfig {
    model: PathBuf,
    ref_model: Option<PathBuf>,
    reward_model: PathBuf,
    prompts: PathBuf,
    chat: bool,
    eos_ids: Vec<u32>,
    #[serde(default)]
    save_every: u64,
    #[serde(default)]
    on_nonfinite: OnNonFinite,
    /// `--report-to` (absent in runs written before it existed: jsonl).
    #[serde(default)]
    report_to: Option<String>,
    ppo: PpoConfig,
}

impl PpoRunConfig {
    /// The settings of a new run; paths made absolute, so that `--resume` finds them from anywhere.
    fn from_args(a: &Args, cfg: PpoConfig) -> anyhow::Result<Self> {
        let (Some(model), Some(reward_model), Some(prompts)) = (&a.model, &a.reward_model, &a.prompts) else {
            bail!("--model, --reward-model and --prompts are required")
        };
        Ok(PpoRunConfig {
            model: std::path::absolute(model)?,
            ref_model: a.ref_model.as_ref().map(std::path::absolute).transpose()?,
            reward_model: std::path::absolute(reward_model)?,
            prompts: std::path::absolute(prompts)?,
            chat: !a.no_chat,
            eos_ids: Vec::new(),
            save_every: a.save_every.unwrap_or(0),
            on_nonfinite: on_nonfinite(a).unwrap_or_default(),
            report_to: a.report_to.clone(),
            ppo: cfg,
        })
    }

    /// The config.toml of the run `--resume` names.
    fn of_run(run: &Path) -> anyhow::Result<Self> {
        let path = run.join("config.toml");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "--resume {}: no config.toml of a PPO run there; pass the run directory that `dpo ppo --output` \
                 wrote, or one of its checkpoints/step-N",
                run.display()
            )
        })?;
        super::run_kind::check(run, &text, &[super::run_kind::RunKind::Ppo])?;
        toml::from_str(&text).with_context(|| format!("{}: not the configuration of a PPO run", path.display()))
    }
}

const COMMAND: &str = "dpo ppo";

fn on_nonfinite(a: &Args) -> Option<OnNonFinite> {
    a.on_nonfinite.as_deref().map(|v| if v == "skip" { OnNonFinite::Skip } else { OnNonFinite::Stop })
}

/// The run's errors with the flag hints `dpo train` gives.
fn hint(e: PpoError, output: &Path) -> anyhow::Error {
    match e {
        PpoError::Run(e) => with_hint(e, COMMAND),
        PpoError::NonFinite { .. } => anyhow::Error::from(e).context(format!(
            "`{COMMAND} --resume {} --on-nonfinite skip` continues from the last good checkpoint and skips such \
             updates",
            output.display()
        )),
        e => e.into(),
    }
}

pub fn run(a: Args, given: &Given) -> anyhow::Result<ExitCode> {
    if a.steps == 0 {
        bail!("--steps 0: a PPO run takes at least 1 step");
    }
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
        precision: a.precision.get(),
        ..PpoConfig::default()
    };
    let (mut c, output, mode) = match &a.resume {
        Some(resume) => {
            let run = resume_target(resume).run;
            let saved = PpoRunConfig::of_run(&run)?;
            // The flags given take their place in the run's settings: those that change its numbers are
            // refused by name; --steps may lengthen it.
            let flags = PpoRunConfig {
                save_every: a.save_every.unwrap_or(0),
                on_nonfinite: on_nonfinite(&a).unwrap_or_default(),
                report_to: a.report_to.clone(),
                ppo: cfg,
                ..saved.clone()
            };
            // Another precision is left to the comparison with the checkpoint's settings below, which
            // refuses it by name.
            let c = resume_settings(&run, &saved, &flags, &|k| given.has(k), &["steps", "precision"])
                .map_err(|e| with_hint(e, COMMAND))?;
            (c, run, StartMode::Resume)
        }
        None => {
            let mode = if a.overwrite { StartMode::Overwrite } else { StartMode::Fresh };
            let output = a.output.clone().context("--output is required")?;
            (PpoRunConfig::from_args(&a, cfg)?, output, mode)
        }
    };
    let cfg = c.ppo.clone();
    cfg.validate()?;
    let report_to = super::train::report_to_flag(c.report_to.as_deref())?;
    run_dir::preflight(&output, mode).map_err(|e| with_hint(e, COMMAND))?;
    // The reward model is read from its run's final/ when --reward-model names the run.
    let rm_dir = model_of(&c.reward_model);
    let mut inputs = vec![("--model", c.model.as_path()), ("--reward-model", rm_dir.as_path())];
    inputs.extend(c.ref_model.as_deref().map(|p| ("--ref-model", p)));
    inputs.push(("--prompts", c.prompts.as_path()));
    run_dir::refuse_inputs_inside(&output, mode, &inputs).map_err(|e| with_hint(e, COMMAND))?;

    let model = hf::load_model(&c.model)?;
    let tok = hf::load_tokenizer(&c.model)?;
    let chat = c.chat && tok.chat_template().is_some();
    let prompts = read_prompts(&c.prompts, &tok, chat)?;
    // Sampling reads the prompt and every new token but the last.
    let lens = prompts.iter().map(|p| (p.location.as_str(), p.ids.len()));
    let max_new = cfg.max_new_tokens;
    if let Err((location, needed, max)) =
        check_generation_positions(lens, max_new.saturating_sub(1), &model.config.decoder)
    {
        bail!(
            "{}, {location}: the prompt has {} tokens, and with --max-new-tokens {max_new} needs {needed} positions; \
             the model has {max} learned positions (shorten the prompt or lower --max-new-tokens)",
            c.prompts.display(),
            needed - max_new.saturating_sub(1),
        );
    }
    let prompts: Vec<Vec<u32>> = prompts.into_iter().map(|p| p.ids).collect();
    let decoder = Decoder::new(model.config.decoder.clone());
    // The reference: --ref-model (checked to read the policy's token ids) or a copy of --model,
    // fingerprinted as read, then held for passes in the run's precision (block linears in bf16 in a bf16
    // run: the same log-probs, half the memory).
    let (ref_config, ref_params) = match &c.ref_model {
        Some(dir) => {
            let config = hf::load_config(dir)?;
            check_fits(dir, &config, &model.config, Some(&tok))?;
            let m = hf::load_model(dir)?;
            (m.config.decoder, m.params)
        }
        None => (model.config.decoder.clone(), model.params.clone()),
    };
    let ref_fingerprint = c.ref_model.as_ref().map(|_| fingerprint(ref_params.named(), &[]));
    let reference = ReferenceModel::new(Decoder::new(ref_config), ref_params, cfg.precision)?;
    let rm = RewardModel::load(&model_of(&c.reward_model))
        .with_context(|| format!("loading the reward model {}", c.reward_model.display()))?
        .with_precision(cfg.precision);
    let vocab = rm.decoder.cfg.vocab_size;
    if vocab != decoder.cfg.vocab_size {
        bail!(
            "the reward model has a vocabulary of {vocab} tokens, the policy {}: they must share a tokenizer",
            decoder.cfg.vocab_size
        );
    }
    if a.resume.is_none() {
        c.chat = chat;
        c.eos_ids = stop_ids(&model.config, &tok);
    }
    let mut inputs = InputFingerprints::new();
    inputs.insert("starting policy".into(), fingerprint(model.params.named(), &[]));
    if let Some(f) = ref_fingerprint {
        inputs.insert("reference".into(), f);
    }
    let rm_tensors = rm.params.named().into_iter().chain(rm.head.named());
    inputs.insert("reward model".into(), fingerprint(rm_tensors, &[]));
    inputs.insert("prompt set".into(), fingerprint([], &prompts));
    let start = match &a.resume {
        // Checked against the starting policy, its inputs and settings before anything is written.
        Some(resume) => {
            let (s, _) =
                PpoState::resume(resume, &cfg, &inputs, &model.params, &c.model).map_err(|e| hint(e, &output))?;
            s
        }
        None => PpoState::fresh(model.params.clone(), decoder.cfg.hidden, &cfg),
    };

    // Everything is loaded and checked: the run directory is taken (locked; a previous run is moved
    // aside and put back if this one fails before its first checkpoint or model is written).
    let progress = &RefCell::new(Progress::new().per_step(cfg.rollout_prompts, "prompts"));
    let log = &mut |l: &str| progress.borrow_mut().line(l);
    let mut dir = RunDir::open(&output, mode, log).map_err(|e| with_hint(e, COMMAND))?;
    dir.write_config(&toml::to_string_pretty(&c).context("writing config.toml")?)?;

    let stop = super::interrupt::stop_flag(Some(&output))?;
    progress.borrow_mut().line(&format!(
        "{} prompts; {} PPO steps of {} rollouts, {} epochs of minibatches of {}",
        prompts.len(),
        cfg.steps,
        cfg.rollout_prompts,
        cfg.ppo_epochs,
        cfg.minibatch
    ));
    let mut reward = ModelReward { rm, error: None };
    let mut on_step = |s: &PpoStepStats, _: &engine::Params| {
        progress.borrow_mut().line(&step_line(s, cfg.steps));
        true
    };
    let run = PpoRun {
        dir: &mut dir,
        model_cfg: &model.config,
        source: &c.model,
        save_every: c.save_every,
        on_nonfinite: c.on_nonfinite,
        stop: &stop,
        resumed: a.resume.is_some(),
        inputs: &inputs,
        report_to,
        log,
    };
    let inputs = PpoInputs {
        decoder: &decoder,
        reference: RefModel {
            decoder: &reference.decoder,
            params: &reference.params,
            linears: reference.linears.as_ref(),
        },
        prompts: &prompts,
        eos_ids: &c.eos_ids,
    };
    let outcome = run_ppo(start, inputs, &mut reward, &cfg, Some(run), &mut on_step);
    progress.borrow_mut().finish();
    if let Some(e) = reward.error {
        return Err(e).context("scoring completions with the reward model");
    }
    let outcome = outcome.map_err(|e| hint(e, &output))?;
    if outcome.interrupted {
        let ck = outcome.checkpoint.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        eprintln!(
            "interrupted after step {}/{}; checkpoint written to {ck}\nresume with: {COMMAND} --resume {}",
            outcome.steps,
            cfg.steps,
            output.display()
        );
        return Ok(ExitCode::from(130));
    }
    let final_dir = output.join("final");
    hf::save_model(&final_dir, &model.config, &outcome.params, Some(&c.model))?;
    dir.started();
    eprintln!("done: {} PPO steps; model written to {}", outcome.steps, final_dir.display());
    written(&run_outputs(&output, report_to));
    Ok(ExitCode::SUCCESS)
}

/// `step N/M  reward R  kl K ...`: the reward-vs-KL trade-off as it moves.
fn step_line(s: &PpoStepStats, total: u64) -> String {
    format!(
        "step {}/{total}  reward {:+.4}  kl {:.4}  non-score {:+.4}  policy {:+.4}  value {:.4}  clip {:.3}  len {:.1}  {:.1} s",
        s.step, s.reward, s.kl, s.non_score_reward, s.policy_loss, s.value_loss, s.clip_frac, s.completion_len, s.seconds
    )
}
