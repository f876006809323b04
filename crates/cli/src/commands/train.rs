//! `dpo train`: DPO (and its variants) on a preference file, from a checkpoint to an aligned checkpoint.
//!
//! The flags are the configuration's keys: each group below serialises (only the flags given) into a
//! TOML table with the flags' names, laid over the `--config` file or the resumed run's config.toml,
//! and `dpo::train::TrainConfig` parses and checks the result once.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::builder::PossibleValuesParser;
use dpo::train::config::{Method, OptimizerKind, SCHEDULE_NAMES};
use dpo::train::run_dir::resume_target;
use dpo::train::{train, Objective, RunOptions, TrainConfig};
use serde::Serialize;

pub use super::hints::with_hint;
use super::progress::{at, written, Progress};
use super::run_kind::RunKind;

/// `--loss`'s long help: every loss the objectives' registry holds.
fn loss_help() -> String {
    let mut s = String::from(
        "Loss types, comma-separated, weighted by --loss-weights [default: sigmoid]. Training only: kto or \
         apo_zero_unpaired (alone) train on unpaired rows (prompt, completion, label); unlikelihood (alone) \
         trains without a reference: likelihood of the chosen tokens, unlikelihood (weight \
         --unlikelihood-alpha) of the rejected ones after the tokens both completions share (Welleck et al. \
         2019, the DPO paper's baseline). dpo eval scores the pair loss types below.\n",
    );
    for (name, help) in dpo::objectives::LossType::names_and_help() {
        s += &format!("\n  {name}: {help}");
    }
    s
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(clap::Args, Debug, Default, Serialize)]
pub struct Args {
    #[command(flatten)]
    #[serde(flatten)]
    inputs: InputFlags,
    #[command(flatten)]
    #[serde(flatten)]
    objective: ObjectiveFlags,
    #[command(flatten)]
    #[serde(flatten)]
    reference: ReferenceFlags,
    #[command(flatten)]
    #[serde(flatten)]
    lora: LoraFlags,
    #[command(flatten)]
    #[serde(flatten)]
    data: DataFlags,
    #[command(flatten)]
    #[serde(flatten)]
    optim: OptimFlags,
    #[command(flatten)]
    #[serde(flatten)]
    run: RunFlags,
    #[command(flatten)]
    #[serde(flatten)]
    precision: super::precision::PrecisionFlag,
    #[command(flatten)]
    #[serde(skip)]
    online: super::online::OnlineFlags,
}

#[derive(clap::Args, Debug, Default, Serialize)]
#[command(next_help_heading = "Inputs and outputs")]
pub struct InputFlags {
    /// TOML file with any of the settings below (flags given on the command line win). The resolved
    /// configuration of every run is written to OUTPUT/config.toml.
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Starting checkpoint: a Hugging Face model directory (safetensors), or a hub id org/name[@revision]
    /// read from the local Hugging Face cache (nothing is downloaded).
    #[arg(long, value_parser = super::source::model_arg)]
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<PathBuf>,
    /// Training data: JSONL, JSON, Parquet or Arrow rows (see README: data formats), or a dataset: a hub id
    /// org/name in the local Hugging Face cache, a repository directory, a datasets save_to_disk directory.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<PathBuf>,
    /// Run directory: metrics.jsonl, config.toml, checkpoints/, final/.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    output: Option<PathBuf>,
    /// Held-out data, evaluated every --eval-every steps and at the end (eval_* metrics).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    eval_data: Option<PathBuf>,
    /// Continue a run: a run directory (its newest checkpoint and config.toml) or a checkpoints/step-N directory.
    #[arg(long)]
    #[serde(skip)]
    pub resume: Option<PathBuf>,
    /// Replace a previous run in --output instead of refusing.
    #[arg(long)]
    #[serde(skip)]
    pub overwrite: bool,
    #[command(flatten)]
    #[serde(skip)]
    pub source: super::source::SplitFlags,
    /// With a dataset as --eval-data: its split [default: test].
    #[arg(long)]
    #[serde(skip)]
    pub eval_split: Option<String>,
}

#[derive(clap::Args, Debug, Default, Serialize)]
#[command(next_help_heading = "Objective")]
pub struct ObjectiveFlags {
    /// Loss types, comma-separated (sigmoid = DPO; `--help` lists them all); kto or apo_zero_unpaired
    /// train on unpaired rows [default: sigmoid].
    #[arg(long, long_help = loss_help())]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<String>,
    /// One weight per loss type, comma-separated (default 1 each).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_weights: Option<String>,
    /// Inverse temperature of the implicit reward beta*log(pi/ref) [default: 0.1].
    #[arg(long, allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta: Option<f64>,
    /// Label smoothing: the assumed probability that a preference is flipped, for the losses that read it
    /// (cdpo, robust, exo_pair, aot, aot_unpaired, simpo) [default: 0].
    #[arg(long, allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label_smoothing: Option<f64>,
    /// f-divergence of the DPO family: reverse_kl (default), forward_kl, js_divergence, alpha_divergence.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub f_divergence: Option<String>,
    /// Alpha of alpha_divergence [default: 0.5].
    #[arg(long, allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub f_alpha: Option<f64>,
    /// SimPO's target reward margin gamma [default: 0.5].
    #[arg(long, allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub simpo_gamma: Option<f64>,
    /// AlphaPO's reward shape for simpo (TRL's CPOConfig.alpha); 0 is SimPO's log-prob reward [default: 0].
    #[arg(long, allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alphapo_alpha: Option<f64>,
    /// Temperature of discopop's mixing (TRL's discopop_tau) [default: 0.05].
    #[arg(long, allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discopop_tau: Option<f64>,
    /// KTO: weight of the desirable rows' losses [default: 1].
    #[arg(long, allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub desirable_weight: Option<f64>,
    /// KTO: weight of the undesirable rows' losses [default: 1].
    #[arg(long, allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub undesirable_weight: Option<f64>,
    /// Unlikelihood: weight of the unlikelihood term on the rejected tokens [default: 1].
    #[arg(long, allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unlikelihood_alpha: Option<f64>,
    /// Treat every reference log-prob as 0 (DPO-family losses without a reference model).
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    pub reference_free: bool,
}

#[derive(clap::Args, Debug, Default, Serialize)]
#[command(next_help_heading = "Reference model")]
pub struct ReferenceFlags {
    /// Reference model directory [default: a frozen copy of the starting weights].
    #[arg(long, value_parser = super::source::model_arg)]
    #[serde(skip_serializing_if = "Option::is_none")]
    ref_model: Option<PathBuf>,
    /// Score every row under the reference once before training, cache the result on disk (keyed by the
    /// reference weights and the token ids) and hold no reference model while training.
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    precompute_ref: bool,
    /// Directory of the reference log-prob cache [default: $XDG_CACHE_HOME/dpo or ~/.cache/dpo].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_dir: Option<PathBuf>,
}

/// LoRA: train a low-rank adapter on the frozen model instead of every weight, in PEFT's format.
#[derive(clap::Args, Debug, Default, Serialize)]
#[command(next_help_heading = "LoRA (train an adapter on the frozen model)")]
pub struct LoraFlags {
    /// Train a new LoRA adapter of rank R on the frozen --model instead of every weight (TRL's `trl dpo
    /// --use_peft` uses 16). The reference is then the base with the adapter off; final/ is a PEFT adapter
    /// directory.
    #[arg(long, value_name = "R")]
    #[serde(skip_serializing_if = "Option::is_none")]
    lora_r: Option<usize>,
    /// Scale numerator: the update is alpha/r * B A [default: 32, TRL's].
    #[arg(long, value_name = "ALPHA", allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    lora_alpha: Option<f64>,
    /// Dropout on the adapter's input while training [default: 0, PEFT's; TRL's command line uses 0.05].
    #[arg(long, value_name = "P", allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    lora_dropout: Option<f64>,
    /// Linear layers that get an adapter: all-linear, or HF module names, comma-separated (q_proj,v_proj;
    /// c_attn,c_fc for GPT-2; query_key_value for GPT-NeoX) [default: PEFT's for the architecture, e.g.
    /// q_proj,v_proj for Llama and Qwen, c_attn for GPT-2].
    #[arg(long, value_name = "MODULES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    lora_targets: Option<String>,
    /// Rank-stabilised LoRA: scale alpha/sqrt(r) instead of alpha/r.
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    use_rslora: bool,
    /// Start from this PEFT adapter directory (adapter_config.json, adapter_model.safetensors), e.g. an SFT
    /// adapter or a previous run's final/: r, alpha, dropout and targets are its own (a --lora-* flag that
    /// says otherwise is refused) and the reference is a frozen copy of it on --model, as TRL keeps.
    #[arg(long, value_parser = super::source::model_arg, value_name = "DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    adapter: Option<PathBuf>,
    /// Also write OUTPUT/final-merged: the trained adapter merged into --model, a Hugging Face model directory.
    /// With --quantize or --base-dtype bf16 the merge is into the f32 --model read fresh from disk, never into
    /// the stored weights.
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    merge: bool,
    /// The dtype of --merge's model: f32, bf16 or f16 (each value rounded to the nearest, ties to even, as
    /// PyTorch's `.to()`). Default: the one --model is stored in (bf16 for most published checkpoints: an
    /// 8B model takes 16 GB, not 32). With --merge, or on a resume of a run that merges.
    #[arg(long, value_parser = ["f32", "bf16", "f16"])]
    #[serde(skip_serializing_if = "Option::is_none")]
    merge_dtype: Option<String>,
    /// QLoRA: store the frozen base's block linears in 4-bit NF4 as they are read (bitsandbytes' code book,
    /// blocks of 64, dequantised on the fly; the adapter, embeddings, norms and head stay f32). With
    /// --lora-r or --adapter only.
    #[arg(long, value_parser = ["nf4"])]
    #[serde(skip_serializing_if = "Option::is_none")]
    quantize: Option<String>,
    /// With --quantize nf4: quantise the absmax scales too (bitsandbytes' double quantisation).
    #[arg(long, requires = "quantize")]
    #[serde(skip_serializing_if = "is_false")]
    double_quant: bool,
    /// Store the frozen base's block linears in this dtype [default: f32]; bf16 halves them. With --lora-r or
    /// --adapter only.
    #[arg(long, value_parser = ["f32", "bf16"], value_name = "DTYPE", conflicts_with = "quantize")]
    #[serde(skip_serializing_if = "Option::is_none")]
    base_dtype: Option<String>,
}

#[derive(clap::Args, Debug, Default, Serialize)]
#[command(next_help_heading = "Data")]
pub struct DataFlags {
    /// Longest prompt+completion sequence in tokens; longer ones are truncated [default: 1024, lowered to
    /// the model's positions].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_length: Option<usize>,
    /// Longest prompt in tokens; longer prompts keep their end [default: none: only --max-length cuts].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_prompt_length: Option<usize>,
    /// Which end of an over-long sequence to keep [default: keep-start].
    #[arg(long, value_parser = PossibleValuesParser::new(["keep-start", "keep-end"]))]
    #[serde(skip_serializing_if = "Option::is_none")]
    truncation: Option<String>,
    /// Skip (and count) malformed rows instead of stopping at the first one.
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    skip_bad_rows: bool,
    /// Visit rows in file order instead of a seeded shuffle per epoch.
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    no_shuffle: bool,
    /// Compute prompt+chosen and prompt+rejected separately, as TRL does (same numbers, more work).
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    no_prefix_sharing: bool,
}

#[derive(clap::Args, Debug, Default, Serialize)]
#[command(next_help_heading = "Optimization")]
pub struct OptimFlags {
    /// Peak learning rate [default: 1e-6 for dpo train (TRL's DPOConfig), 2e-5 for dpo sft (TRL's
    /// SFTConfig)].
    #[arg(long, allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    lr: Option<f64>,
    /// Preference pairs per micro-batch [default: 8].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    batch_size: Option<usize>,
    /// Micro-batches accumulated per optimizer step [default: 1].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    grad_accum: Option<usize>,
    /// Pairs pushed through the model at once within a micro-batch, for losses that are a mean of
    /// per-pair terms (all but aot, aot_unpaired, sft, orpo): the same step with activation memory for
    /// this many pairs only; 0 = the whole micro-batch [default: 0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    micro_pairs: Option<usize>,
    /// Gradient checkpointing: keep only each layer's input in the forward pass and recompute the layer
    /// in backward. About one extra forward per step (roughly a third more compute) for the activation
    /// memory of one layer instead of all of them; the gradients are the same bit for bit.
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    gradient_checkpointing: bool,
    /// Optimizer steps to run (overrides --epochs).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_steps: Option<u64>,
    /// Passes over the training data [default: 3].
    #[arg(long, allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    epochs: Option<f64>,
    /// adamw (PyTorch semantics, no decay on biases and norms), rmsprop (the paper's) or sgd [default: adamw].
    #[arg(long, value_parser = PossibleValuesParser::new(OptimizerKind::NAMES))]
    #[serde(skip_serializing_if = "Option::is_none")]
    optimizer: Option<String>,
    /// Learning-rate schedule after warmup [default: linear].
    #[arg(long, value_parser = PossibleValuesParser::new(SCHEDULE_NAMES))]
    #[serde(skip_serializing_if = "Option::is_none")]
    scheduler: Option<String>,
    /// Steps of linear warmup from 0 [default: 0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    warmup_steps: Option<u64>,
    /// Decoupled (AdamW) or L2 (RMSprop, SGD) weight decay [default: 0].
    #[arg(long, allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    weight_decay: Option<f64>,
    /// AdamW beta1 [default: 0.9].
    #[arg(long, allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    adam_beta1: Option<f64>,
    /// AdamW beta2 [default: 0.999].
    #[arg(long, allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    adam_beta2: Option<f64>,
    /// AdamW epsilon [default: 1e-8].
    #[arg(long, allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    adam_eps: Option<f64>,
    /// Momentum of sgd and rmsprop [default: 0].
    #[arg(long, allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    momentum: Option<f64>,
    /// Clip the global gradient norm to this (0: no clipping) [default: 1.0].
    #[arg(long, allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_grad_norm: Option<f64>,
    /// Seed of the row shuffle [default: 42].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
}

#[derive(clap::Args, Debug, Default, Serialize)]
#[command(next_help_heading = "Evaluation, checkpoints, logging")]
pub struct RunFlags {
    /// Evaluate on --eval-data every N steps (0: at the end only) [default: 0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    eval_every: Option<u64>,
    /// Write a resumable checkpoint every N steps (0: at the end and on interruption only) [default: 500].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    save_every: Option<u64>,
    /// Keep only the newest N checkpoints (0: all) [default: 0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    save_total_limit: Option<usize>,
    /// Print a metrics line every N steps [default: 1].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    log_every: Option<u64>,
    /// On a NaN or infinite loss or gradient: stop (keep the last checkpoint) or skip the step [default:
    /// stop].
    #[arg(long, value_parser = ["stop", "skip"])]
    #[serde(skip_serializing_if = "Option::is_none")]
    on_nonfinite: Option<String>,
    /// Where metrics go: jsonl (metrics.jsonl, always written), tensorboard (event files under RUN/runs/
    /// with TRL's tags), or both comma-separated [default: jsonl].
    #[arg(long, value_name = "jsonl,tensorboard")]
    #[serde(skip_serializing_if = "Option::is_none")]
    report_to: Option<String>,
    /// Memory the run may use (e.g. 12GiB, 512M). The peak is estimated before training and a run above
    /// this (default: the machine's available memory) is refused.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_memory: Option<String>,
}

impl ObjectiveFlags {
    /// The objective settings these flags give, over the defaults (for commands that evaluate).
    pub fn apply(&self, o: &mut dpo::objectives::LossConfig) -> anyhow::Result<()> {
        // Typed here, checked by the command (eval and reward state their own rules for beta).
        let raw: dpo::train::config::RawConfig = toml::Value::try_from(self)?.try_into()?;
        let cfg = TrainConfig::resolve(raw, Method::Pairs)?;
        if let Objective::Pairs(p) = cfg.objective {
            *o = p.cfg;
        }
        Ok(())
    }
}

/// Where a run's settings come from: `--config FILE`, or the config.toml of the run `--resume` names
/// (refused when another command wrote that run: `method` is the one the command forces, if any).
fn settings_file(inputs: &InputFlags, method: Option<Method>) -> anyhow::Result<Option<PathBuf>> {
    if let Some(p) = &inputs.config {
        return Ok(Some(p.clone()));
    }
    let Some(resume) = &inputs.resume else { return Ok(None) };
    let run = resume_target(resume).run;
    let file = run.join("config.toml");
    if file.is_file() {
        // `dpo train` continues an SFT run too (its config.toml records the method); `dpo sft` only those.
        let expected: &[RunKind] = match method {
            Some(Method::Sft) => &[RunKind::Sft],
            _ => &[RunKind::Train, RunKind::Sft],
        };
        let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        super::run_kind::check(&run, &text, expected)?;
        return Ok(Some(file));
    }
    bail!(
        "--resume {}: no config.toml of a run found there (nor two levels up); pass a run directory written by \
         dpo train or one of its checkpoints/step-N, or give --config and the other settings",
        resume.display()
    )
}

/// Defaults (for `method`), then the TOML file (or the resumed run's config.toml), then the flags given
/// (`flags` serialises to a table keyed by the flags' names). Relative paths on the command line resolve
/// against the working directory, those in a file against the file's directory; a resumed run's
/// directory is where its checkpoint lives, wherever the run was copied.
pub fn resolve(inputs: &InputFlags, flags: &impl Serialize, method: Option<Method>) -> anyhow::Result<TrainConfig> {
    let file = settings_file(inputs, method)?;
    let mut table = toml::Table::try_from(flags).context("reading the flags")?;
    for key in dpo::train::config::PATH_KEYS {
        if let Some(toml::Value::String(p)) = table.get_mut(key) {
            // A dataset hub id is resolved below, with the file's; a local path of that spelling wins.
            let dataset = matches!(key, "data" | "eval_data");
            if dataset && !Path::new(p.as_str()).exists() && hf::hub_cache::HubId::parse(p).is_some() {
                continue;
            }
            *p = std::path::absolute(Path::new(p.as_str()))?.to_string_lossy().into_owned();
        }
    }
    if let Some(m) = method {
        table.insert("method".into(), toml::Value::try_from(m)?);
    }
    if let Some(resume) = &inputs.resume {
        let run = std::path::absolute(resume_target(resume).run)?;
        if let Some(out) = &inputs.output {
            if std::path::absolute(out)? != run {
                bail!(
                    "--resume continues the run in {} and --output names another directory ({}); to start a new \
                     run from a checkpoint's weights, pass --model CHECKPOINT/model",
                    run.display(),
                    out.display()
                );
            }
        }
        table.insert("output".into(), run.to_string_lossy().into_owned().into());
    }
    let mut c = TrainConfig::from_layers(file.as_deref(), table, method.unwrap_or_default())?;
    // Flags came through `source::model_arg`; a --config file's hub ids resolve here, the same way.
    c.model = hf::hub_cache::resolve_model(&c.model)?;
    for p in [&mut c.ref_model, &mut c.adapter].into_iter().flatten() {
        *p = hf::hub_cache::resolve_model(p)?;
    }
    // Datasets (hub ids, repositories, save_to_disk directories) to what the reader reads; config.toml
    // records the result, so a resumed run reads the same files.
    if !c.data.as_os_str().is_empty() {
        c.data = inputs.source.data(&c.data)?;
    }
    if let Some(e) = &c.eval_data {
        c.eval_data = Some(inputs.source.eval_data(e, inputs.eval_split.as_deref())?);
    }
    for (name, p) in [("--model", &c.model), ("--data", &c.data), ("--output", &c.output)] {
        if p.as_os_str().is_empty() {
            bail!("{name} is required (on the command line or in --config)");
        }
    }
    Ok(c)
}

/// A `--report-to` flag of the commands that take it outside the training configuration (jsonl when absent).
pub fn report_to_flag(flag: Option<&str>) -> anyhow::Result<dpo::tensorboard::ReportTo> {
    dpo::tensorboard::ReportTo::parse(flag.unwrap_or("jsonl")).map_err(|m| anyhow::anyhow!("--report-to: {m}"))
}

pub fn run(mut a: Args, threads: Option<usize>) -> anyhow::Result<ExitCode> {
    a.inputs.data = a.inputs.data.or(a.online.prompts.clone()); // --online: the prompts are the data
    let cfg = resolve(&a.inputs, &a, None)?;
    super::init_threads(threads.or(cfg.threads));
    let opts = RunOptions { resume: a.inputs.resume.clone(), overwrite: a.inputs.overwrite };
    if a.online.online {
        return super::online::run(&a.online, &cfg, &opts);
    }
    execute(&cfg, &opts)
}

/// The command that continues or repeats a run of this objective.
fn command_of(cfg: &TrainConfig) -> &'static str {
    match cfg.objective {
        Objective::Sft => "dpo sft",
        _ => "dpo train",
    }
}

/// Trains with signal handling and progress; says how to resume an interrupted run, and where a
/// finished one put its outputs and how to evaluate them.
pub fn execute(cfg: &TrainConfig, opts: &RunOptions) -> anyhow::Result<ExitCode> {
    let stop = super::interrupt::stop_flag(Some(&cfg.output))?;
    let mut progress = Progress::new().per_step(cfg.batch_size * cfg.grad_accum, "pairs");
    let t0 = Instant::now();
    let out = train(cfg, opts, &stop, &mut |line| progress.line(line)).map_err(|e| with_hint(e, command_of(cfg)))?;
    progress.finish();
    let run = cfg.output.display();
    if out.interrupted {
        let (command, total) = (command_of(cfg), out.total_steps);
        match (&out.checkpoint, &opts.resume) {
            (Some(ck), _) => eprintln!(
                "interrupted after step {}/{total}; checkpoint written to {}\nresume with: {command} --resume {run}",
                out.steps,
                ck.display()
            ),
            (None, None) => eprintln!(
                "interrupted before the first step; no checkpoint was written and nothing is left in {run}: the \
                 same command starts the run again"
            ),
            (None, Some(_)) => eprintln!(
                "interrupted before the first step after step {}/{total}; no checkpoint was written\nresume with: \
                 {command} --resume {run}",
                out.steps
            ),
        }
        return Ok(ExitCode::from(130));
    }
    let elapsed = t0.elapsed().as_secs_f64();
    if let Some(f) = &out.final_dir {
        let what = if cfg.is_lora() { "adapter (PEFT)" } else { "model" };
        eprintln!("done: {} steps in {}; {what} written to {}", out.steps, human_duration(elapsed), f.display());
        let mut items = run_outputs(&cfg.output, cfg.report_to);
        items.push(("curves", format!("dpo plot {run}")));
        if cfg.merge {
            items.push(("merged", at(&cfg.output.join(dpo::train::MERGED_DIR))));
        }
        written(&items);
        if let Some((what, command)) = super::next_steps::next_command(cfg, f) {
            eprintln!("{what}: {command}");
        }
    }
    if let Some(peak) = peak_rss() {
        eprintln!("peak memory (resident): {}", dpo::train::memory::human(peak));
    }
    Ok(ExitCode::SUCCESS)
}

/// What every run directory holds, for the closing summary: metrics, checkpoints and the event files.
pub fn run_outputs(run: &Path, report_to: dpo::tensorboard::ReportTo) -> Vec<(&'static str, String)> {
    let mut items = vec![("metrics", at(&run.join("metrics.jsonl"))), ("checkpoints", at(&run.join("checkpoints")))];
    if report_to.tensorboard {
        let events = run.join(dpo::tensorboard::EVENTS_DIR);
        items.push(("tensorboard", format!("{} (tensorboard --logdir {})", events.display(), events.display())));
    }
    items
}

fn human_duration(secs: f64) -> String {
    match secs {
        s if s < 60.0 => format!("{s:.1} s"),
        s if s < 3600.0 => format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64),
        s => format!("{}h{:02}m", (s / 3600.0) as u64, ((s % 3600.0) / 60.0) as u64),
    }
}

/// Peak resident set size of this process (Linux `VmHWM`), in bytes.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}
