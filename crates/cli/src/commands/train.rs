//! `dpo train`: DPO (and its variants) on a preference file, from a checkpoint to an aligned checkpoint.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context};
use dpo::train::{train, OnNonFinite, RunOptions, TrainConfig};

use super::progress::Progress;

#[derive(clap::Args, Debug, Default)]
pub struct Args {
    #[command(flatten)]
    inputs: InputFlags,
    #[command(flatten)]
    objective: ObjectiveFlags,
    #[command(flatten)]
    reference: ReferenceFlags,
    #[command(flatten)]
    data: DataFlags,
    #[command(flatten)]
    optim: OptimFlags,
    #[command(flatten)]
    run: RunFlags,
}

#[derive(clap::Args, Debug, Default)]
#[command(next_help_heading = "Inputs and outputs")]
pub struct InputFlags {
    /// TOML file with any of the settings below (flags given on the command line win). The resolved
    /// configuration of every run is written to OUTPUT/config.toml.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Starting checkpoint: a Hugging Face model directory (safetensors).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Training data: JSONL, JSON or Parquet rows (see README: data formats).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Run directory: metrics.jsonl, config.toml, checkpoints/, final/.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Held-out data, evaluated every --eval-every steps and at the end (eval_* metrics).
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Continue a run: a run directory (its newest checkpoint and config.toml) or a checkpoints/step-N directory.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Replace a previous run in --output instead of refusing.
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(clap::Args, Debug, Default)]
#[command(next_help_heading = "Objective")]
pub struct ObjectiveFlags {
    /// Loss types, comma-separated: sigmoid (DPO), hinge, ipo, exo_pair, nca_pair, robust, bco_pair,
    /// sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm, cdpo, simpo, orpo.
    #[arg(long)]
    pub loss: Option<String>,
    /// One weight per loss type, comma-separated (default 1 each).
    #[arg(long)]
    pub loss_weights: Option<String>,
    /// Inverse temperature of the implicit reward beta*log(pi/ref) [default: 0.1].
    #[arg(long)]
    pub beta: Option<f64>,
    /// Label smoothing: the assumed probability that a preference is flipped (cdpo, robust, exo_pair).
    #[arg(long)]
    pub label_smoothing: Option<f64>,
    /// f-divergence of the DPO family: reverse_kl (default), forward_kl, js_divergence, alpha_divergence.
    #[arg(long)]
    pub f_divergence: Option<String>,
    /// Alpha of alpha_divergence [default: 0.5].
    #[arg(long)]
    pub f_alpha: Option<f64>,
    /// SimPO's target reward margin gamma [default: 0.5].
    #[arg(long)]
    pub simpo_gamma: Option<f64>,
    /// Treat every reference log-prob as 0 (DPO-family losses without a reference model).
    #[arg(long)]
    pub reference_free: bool,
}

#[derive(clap::Args, Debug, Default)]
#[command(next_help_heading = "Reference model")]
pub struct ReferenceFlags {
    /// Reference model directory [default: a frozen copy of the starting weights].
    #[arg(long)]
    ref_model: Option<PathBuf>,
    /// Score every row under the reference once before training, cache the result on disk (keyed by the
    /// reference weights and the token ids) and hold no reference model while training.
    #[arg(long)]
    precompute_ref: bool,
    /// Directory of the reference log-prob cache [default: $XDG_CACHE_HOME/dpo or ~/.cache/dpo].
    #[arg(long)]
    cache_dir: Option<PathBuf>,
}

#[derive(clap::Args, Debug, Default)]
#[command(next_help_heading = "Data")]
pub struct DataFlags {
    /// Longest prompt+completion sequence in tokens; longer ones are truncated [default: 1024].
    #[arg(long)]
    max_length: Option<usize>,
    /// Longest prompt in tokens; longer prompts keep their end.
    #[arg(long)]
    max_prompt_length: Option<usize>,
    /// Which end of an over-long sequence to keep: keep-start or keep-end.
    #[arg(long)]
    truncation: Option<String>,
    /// Skip (and count) malformed rows instead of stopping at the first one.
    #[arg(long)]
    skip_bad_rows: bool,
    /// Visit rows in file order instead of a seeded shuffle per epoch.
    #[arg(long)]
    no_shuffle: bool,
    /// Compute prompt+chosen and prompt+rejected separately, as TRL does (same numbers, more work).
    #[arg(long)]
    no_prefix_sharing: bool,
}

#[derive(clap::Args, Debug, Default)]
#[command(next_help_heading = "Optimization")]
pub struct OptimFlags {
    /// Peak learning rate [default: 1e-6, TRL's].
    #[arg(long)]
    lr: Option<f64>,
    /// Preference pairs per micro-batch [default: 8].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Micro-batches accumulated per optimizer step [default: 1].
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Pairs pushed through the model at once within a micro-batch, for losses that are a mean of
    /// per-pair terms (all but aot, aot_unpaired, sft, orpo): the same step with activation memory for
    /// this many pairs only; 0 = the whole micro-batch [default: 0].
    #[arg(long)]
    micro_pairs: Option<usize>,
    /// Optimizer steps to run (overrides --epochs).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Passes over the training data [default: 3].
    #[arg(long)]
    epochs: Option<f64>,
    /// adamw (PyTorch semantics, no decay on biases and norms), rmsprop (the paper's) or sgd [default: adamw].
    #[arg(long)]
    optimizer: Option<String>,
    /// Learning-rate schedule after warmup: constant, linear or cosine [default: linear].
    #[arg(long)]
    scheduler: Option<String>,
    /// Steps of linear warmup from 0 [default: 0].
    #[arg(long)]
    warmup_steps: Option<u64>,
    /// Decoupled (AdamW) or L2 (RMSprop, SGD) weight decay [default: 0].
    #[arg(long)]
    weight_decay: Option<f64>,
    /// AdamW beta1 [default: 0.9].
    #[arg(long)]
    adam_beta1: Option<f64>,
    /// AdamW beta2 [default: 0.999].
    #[arg(long)]
    adam_beta2: Option<f64>,
    /// AdamW epsilon [default: 1e-8].
    #[arg(long)]
    adam_eps: Option<f64>,
    /// Momentum of sgd and rmsprop [default: 0].
    #[arg(long)]
    momentum: Option<f64>,
    /// Clip the global gradient norm to this (0: no clipping) [default: 1.0].
    #[arg(long)]
    max_grad_norm: Option<f64>,
    /// Seed of the row shuffle [default: 42].
    #[arg(long)]
    seed: Option<u64>,
}

#[derive(clap::Args, Debug, Default)]
#[command(next_help_heading = "Evaluation, checkpoints, logging")]
pub struct RunFlags {
    /// Evaluate on --eval-data every N steps (0: at the end only).
    #[arg(long)]
    eval_every: Option<u64>,
    /// Write a resumable checkpoint every N steps (0: at the end and on interruption only) [default: 500].
    #[arg(long)]
    save_every: Option<u64>,
    /// Keep only the newest N checkpoints (0: all).
    #[arg(long)]
    save_total_limit: Option<usize>,
    /// Print a metrics line every N steps [default: 1].
    #[arg(long)]
    log_every: Option<u64>,
    /// On a NaN or infinite loss or gradient: stop (keep the last checkpoint) or skip the step.
    #[arg(long, value_parser = ["stop", "skip"])]
    on_nonfinite: Option<String>,
    /// Memory the run may use (e.g. 12GiB, 512M). The peak is estimated before training and a run above
    /// this (default: the machine's available memory) is refused.
    #[arg(long)]
    max_memory: Option<String>,
}

macro_rules! set {
    ($cfg:ident . $($field:ident).+ = $value:expr) => {
        if let Some(v) = $value {
            $cfg.$($field).+ = v.into();
        }
    };
}

impl ObjectiveFlags {
    pub fn apply(&self, o: &mut dpo::objectives::LossConfig) -> anyhow::Result<()> {
        set!(o.beta = self.beta);
        set!(o.label_smoothing = self.label_smoothing);
        set!(o.f_alpha_divergence_coef = self.f_alpha);
        set!(o.simpo_gamma = self.simpo_gamma);
        if let Some(f) = &self.f_divergence {
            o.f_divergence = serde_json::from_value(serde_json::Value::String(f.clone())).with_context(|| {
                format!("--f-divergence {f:?}: use reverse_kl, forward_kl, js_divergence or alpha_divergence")
            })?;
        }
        o.reference_free |= self.reference_free;
        Ok(())
    }
}

/// Defaults (`base`), then the TOML file (or the resumed run's config.toml), then flags.
#[allow(clippy::too_many_arguments)]
pub fn resolve(
    base_defaults: TrainConfig,
    a: &InputFlags,
    objective: Option<&ObjectiveFlags>,
    reference: Option<&ReferenceFlags>,
    d: &DataFlags,
    o: &OptimFlags,
    r: &RunFlags,
) -> anyhow::Result<TrainConfig> {
    let base = match (&a.config, &a.resume) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(run)) if run.join("config.toml").is_file() => Some(run.join("config.toml")),
        (None, Some(run)) => {
            run.parent().and_then(|p| p.parent()).map(|r| r.join("config.toml")).filter(|p| p.is_file())
        }
        _ => None,
    };
    let mut c = match base {
        Some(p) => TrainConfig::from_toml_file(&p)?,
        None => base_defaults,
    };
    set!(c.model = a.model.clone());
    set!(c.data = a.data.clone());
    set!(c.output = a.output.clone());
    if a.eval_data.is_some() {
        c.eval_data = a.eval_data.clone();
    }
    if let Some(obj) = objective {
        set!(c.loss = obj.loss.clone());
        if obj.loss_weights.is_some() {
            c.loss_weights = obj.loss_weights.clone();
        }
        obj.apply(&mut c.objective)?;
    }
    if let Some(rf) = reference {
        if rf.ref_model.is_some() {
            c.ref_model = rf.ref_model.clone();
        }
        c.precompute_ref |= rf.precompute_ref;
        if rf.cache_dir.is_some() {
            c.cache_dir = rf.cache_dir.clone();
        }
    }
    if d.max_length.is_some() {
        c.max_length = d.max_length;
    }
    if d.max_prompt_length.is_some() {
        c.max_prompt_length = d.max_prompt_length;
    }
    set!(c.truncation = d.truncation.clone());
    c.skip_bad_rows |= d.skip_bad_rows;
    c.no_shuffle |= d.no_shuffle;
    if d.no_prefix_sharing {
        c.prefix_sharing = false;
    }
    set!(c.lr = o.lr);
    set!(c.batch_size = o.batch_size);
    set!(c.grad_accum = o.grad_accum);
    set!(c.micro_pairs = o.micro_pairs);
    if o.max_steps.is_some() {
        c.max_steps = o.max_steps;
    }
    set!(c.epochs = o.epochs);
    set!(c.optimizer = o.optimizer.clone());
    set!(c.scheduler = o.scheduler.clone());
    set!(c.warmup_steps = o.warmup_steps);
    set!(c.weight_decay = o.weight_decay);
    set!(c.adam_beta1 = o.adam_beta1);
    set!(c.adam_beta2 = o.adam_beta2);
    set!(c.adam_eps = o.adam_eps);
    set!(c.momentum = o.momentum);
    set!(c.max_grad_norm = o.max_grad_norm);
    set!(c.seed = o.seed);
    set!(c.eval_every = r.eval_every);
    set!(c.save_every = r.save_every);
    set!(c.save_total_limit = r.save_total_limit);
    set!(c.log_every = r.log_every);
    if r.max_memory.is_some() {
        c.max_memory = r.max_memory.clone();
    }
    if let Some(s) = &r.on_nonfinite {
        c.on_nonfinite = if s == "skip" { OnNonFinite::Skip } else { OnNonFinite::Stop };
    }
    if let (Some(run), None) = (&a.resume, &a.output) {
        if run.join("config.toml").is_file() {
            c.output = run.clone();
        }
    }
    for (name, p) in [("--model", &c.model), ("--data", &c.data), ("--output", &c.output)] {
        if p.as_os_str().is_empty() {
            if let (Some(run), None) = (&a.resume, &a.config) {
                bail!(
                    "--resume {}: no config.toml of a run found there (nor two levels up); pass a run directory \
                     written by dpo train or one of its checkpoints/step-N, or give {name} and the other settings",
                    run.display()
                );
            }
            bail!("{name} is required (on the command line or in --config)");
        }
    }
    Ok(c)
}

/// SIGINT/SIGTERM set the flag the trainer polls between steps; a second signal exits at once.
pub fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone())?;
        signal_hook::flag::register(sig, flag.clone())?;
    }
    Ok(flag)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let cfg =
        resolve(TrainConfig::default(), &a.inputs, Some(&a.objective), Some(&a.reference), &a.data, &a.optim, &a.run)?;
    let opts = RunOptions { resume: a.inputs.resume.clone(), overwrite: a.inputs.overwrite };
    execute(&cfg, &opts, train)
}

type Trainer = fn(
    &TrainConfig,
    &RunOptions,
    &AtomicBool,
    &mut dyn FnMut(&str),
) -> Result<dpo::train::TrainOutcome, dpo::train::TrainError>;

/// Runs a trainer with signal handling and progress, and says how to resume an interrupted run.
pub fn execute(cfg: &TrainConfig, opts: &RunOptions, trainer: Trainer) -> anyhow::Result<()> {
    let stop = stop_flag()?;
    let mut progress = Progress::new();
    let out = trainer(cfg, opts, &stop, &mut |line| progress.line(line))?;
    progress.finish();
    if out.interrupted {
        let ck = out.checkpoint.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        eprintln!(
            "interrupted after step {}/{}; checkpoint written to {ck}\nresume with: dpo train --resume {}",
            out.steps,
            out.total_steps,
            cfg.output.display()
        );
        std::process::exit(130);
    }
    if let Some(f) = &out.final_dir {
        eprintln!("done: {} steps; model written to {}", out.steps, f.display());
    }
    if let Some(peak) = peak_rss() {
        eprintln!("peak memory (resident): {}", dpo::train::memory::human(peak));
    }
    Ok(())
}

/// Peak resident set size of this process (Linux `VmHWM`), in bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}
