//! The resolved configuration of a training run: defaults (TRL's `DPOConfig` and HF `TrainingArguments`,
//! where not stated otherwise), overridden by a TOML file, overridden by command-line flags. The
//! resolved result is written to `OUTPUT/config.toml`, so a run can be repeated with `--config` alone.
//!
//! The TOML keys are the command-line flags' names with `_` for `-` (`loss_weights`, `f_alpha`,
//! `no_prefix_sharing`, `threads`); `loss` and `loss_weights` are an array or a comma-separated string.
//! The file is read once into [`RawConfig`] (serde, unknown keys refused) and resolved into the typed
//! [`TrainConfig`], whose every setting is checked there ([`TrainConfig::validate`]), before anything
//! else happens. Relative paths in a file resolve against the file's directory.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use engine::kernels::Precision;
use engine::optim::{OptimizerConfig, ScheduleKind};
use engine::quant::Storage;
use serde::{Deserialize, Serialize};

use super::pairs::PairObjective;
use crate::data::Truncation;
use crate::objectives::unlikelihood::UnlikelihoodConfig;
use crate::objectives::{KtoConfig, LossConfig, LossType, ObjectiveError};

/// What to do when a step's loss or gradient is NaN or infinite.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OnNonFinite {
    /// Discard the step's gradient, keep the weights, go on with the next batch.
    Skip,
    /// Stop the run; the last checkpoint stays the newest good state.
    #[default]
    Stop,
}

/// What a run trains.
#[derive(Clone, Debug)]
pub enum Objective {
    /// Preference pairs under weighted losses of the DPO family.
    Pairs(PairObjective),
    /// KTO on unpaired rows (preference rows are split into a desirable and an undesirable row).
    Kto(KtoConfig),
    /// Supervised fine-tuning on prompt/completion rows or the chosen side of preference rows.
    Sft,
    /// Unlikelihood training on preference pairs (`objectives::unlikelihood`).
    Unlikelihood(UnlikelihoodConfig),
}

impl PartialEq for Objective {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Objective::Pairs(a), Objective::Pairs(b)) => a.losses == b.losses && a.cfg == b.cfg,
            (Objective::Kto(a), Objective::Kto(b)) => a == b,
            (Objective::Sft, Objective::Sft) => true,
            (Objective::Unlikelihood(a), Objective::Unlikelihood(b)) => a == b,
            _ => false,
        }
    }
}

impl Objective {
    /// The `method` key of config.toml.
    pub fn method(&self) -> Method {
        match self {
            Objective::Pairs(_) => Method::Pairs,
            Objective::Kto(_) => Method::Kto,
            Objective::Sft => Method::Sft,
            Objective::Unlikelihood(_) => Method::Unlikelihood,
        }
    }

    /// Inverse temperature of the implicit reward, where the objective has one.
    pub fn beta(&self) -> Option<f64> {
        match self {
            Objective::Pairs(p) => Some(p.cfg.beta),
            Objective::Kto(k) => Some(k.beta),
            Objective::Sft | Objective::Unlikelihood(_) => None,
        }
    }

    /// The DPO-family objective with one loss at weight 1 and default settings.
    pub fn pairs(loss: LossType) -> Self {
        Objective::Pairs(PairObjective { losses: vec![(loss, 1.0)], cfg: LossConfig::default() })
    }
}

/// The kind of objective, as config.toml records it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Preference pairs (`dpo train` with a loss of the DPO family).
    #[default]
    Pairs,
    /// Unpaired rows (`dpo train --loss kto` or `apo_zero_unpaired`).
    Kto,
    /// Supervised fine-tuning (`dpo sft`).
    Sft,
    /// Unlikelihood training on preference pairs (`dpo train --loss unlikelihood`).
    Unlikelihood,
}

/// The optimizer, with PyTorch's semantics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OptimizerKind {
    /// `torch.optim.AdamW`; no decay on biases and norms.
    #[default]
    AdamW,
    /// `torch.optim.RMSprop` (the DPO paper's), alpha 0.99, eps 1e-8.
    RmsProp,
    /// `torch.optim.SGD`.
    Sgd,
}

impl OptimizerKind {
    pub const NAMES: [&'static str; 3] = ["adamw", "rmsprop", "sgd"];

    pub fn name(self) -> &'static str {
        match self {
            OptimizerKind::AdamW => "adamw",
            OptimizerKind::RmsProp => "rmsprop",
            OptimizerKind::Sgd => "sgd",
        }
    }
}

impl FromStr for OptimizerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "adamw" => Ok(OptimizerKind::AdamW),
            "rmsprop" => Ok(OptimizerKind::RmsProp),
            "sgd" => Ok(OptimizerKind::Sgd),
            t => Err(format!("unknown optimizer `{t}`; use adamw, rmsprop or sgd")),
        }
    }
}

/// The names of the learning-rate schedules, as the flags and config.toml spell them.
pub const SCHEDULE_NAMES: [&str; 3] = ["constant", "linear", "cosine"];

pub fn schedule_name(s: ScheduleKind) -> &'static str {
    match s {
        ScheduleKind::Constant => "constant",
        ScheduleKind::Linear => "linear",
        ScheduleKind::Cosine => "cosine",
    }
}

pub(super) fn truncation_name(t: Truncation) -> &'static str {
    match t {
        Truncation::KeepStart => "keep-start",
        Truncation::KeepEnd => "keep-end",
    }
}

/// A number of bytes, written as `8GiB`, `512M` or a plain count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        super::memory::parse_size(s).map(ByteSize)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// `max_length` when none is given (TRL's `DPOConfig` and `SFTConfig`), lowered at setup to the
/// positions the models read.
pub const DEFAULT_MAX_LENGTH: usize = 1024;
/// Learning rate of a DPO-family or KTO run (TRL's `DPOConfig`).
pub const DEFAULT_LR: f64 = 1e-6;
/// Learning rate of an SFT run (TRL's `SFTConfig`).
pub const DEFAULT_SFT_LR: f64 = 2e-5;

#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    /// Starting checkpoint (HF directory).
    pub model: PathBuf,
    /// Training data file.
    pub data: PathBuf,
    /// Run directory: metrics.jsonl, config.toml, checkpoints, final/.
    pub output: PathBuf,
    /// Reference model directory; default: a frozen copy of the starting weights.
    pub ref_model: Option<PathBuf>,
    /// Held-out data evaluated every `eval_every` steps and at the end.
    pub eval_data: Option<PathBuf>,

    /// What is trained: pairs under weighted losses, KTO, or SFT.
    pub objective: Objective,
    /// Compute reference log-probs once before training and cache them on disk.
    pub precompute_ref: bool,
    /// Directory of the reference log-prob cache (default: `$XDG_CACHE_HOME/dpo` or `~/.cache/dpo`).
    pub cache_dir: Option<PathBuf>,

    /// Longest prompt+completion sequence in tokens. `None` until setup resolves it: [`DEFAULT_MAX_LENGTH`]
    /// lowered to the positions of the models that read the rows (`data::resolve_max_length`); the run
    /// directory's config.toml holds the resolved value, so a resumed run truncates as before.
    pub max_length: Option<usize>,
    pub max_prompt_length: Option<usize>,
    pub truncation: Truncation,
    pub skip_bad_rows: bool,
    /// Visit rows in file order instead of a seeded shuffle per epoch.
    pub no_shuffle: bool,
    /// Compute each prompt once for both completions (same numbers, less work).
    pub prefix_sharing: bool,

    pub lr: f64,
    /// Pairs per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Pairs of a micro-batch pushed through forward and backward at once when the loss is a mean of
    /// per-pair terms (0: the whole micro-batch). Same step, activations for this many pairs only.
    pub micro_pairs: usize,
    /// Keep only each layer's input in the forward pass and recompute the layer in backward
    /// (`engine::Keep::LayerInputs`): about one extra forward per step for the activation memory of one
    /// layer; the gradients are the same bit for bit.
    pub gradient_checkpointing: bool,
    /// Stop after this many optimizer steps (overrides `epochs`).
    pub max_steps: Option<u64>,
    pub epochs: f64,
    pub optimizer: OptimizerKind,
    pub scheduler: ScheduleKind,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    /// Momentum for `sgd` and `rmsprop`.
    pub momentum: f64,
    /// Clip the global gradient norm to this; 0 disables clipping.
    pub max_grad_norm: f64,
    pub seed: u64,
    /// Worker threads for the math (default: all cores); the command line's `--threads` wins.
    pub threads: Option<usize>,
    /// The arithmetic of every pass's block linears and LM head (policy, reference, evaluation):
    /// [`Precision::Bf16`] is autocast's bf16 (operands rounded, f32 sums); the rest of the step, the
    /// master weights and the optimizer stay f32. A resumed run keeps its precision.
    pub precision: Precision,

    /// Evaluate on `eval_data` every this many steps (0: only at the end).
    pub eval_every: u64,
    /// Write a resumable checkpoint every this many steps (0: only at the end and on interruption).
    pub save_every: u64,
    /// Keep at most this many checkpoints (oldest removed first; 0 keeps all).
    pub save_total_limit: usize,
    /// Print a metrics line every this many steps.
    pub log_every: u64,
    pub on_nonfinite: OnNonFinite,
    /// Where the metrics go besides `metrics.jsonl`: TensorBoard event files under `RUN/runs/`.
    pub report_to: crate::tensorboard::ReportTo,
    /// Memory the run may use; default: the machine's available memory (`MemAvailable`). A run whose
    /// estimated peak exceeds it is refused before training.
    pub max_memory: Option<ByteSize>,

    /// LoRA settings as given (`lora_r` starts a new adapter; see [`LoraFlags`]).
    pub lora: LoraFlags,
    /// Start from this PEFT adapter directory (a LoRA run whose r, alpha, dropout and targets are the
    /// adapter's); the base is `model`.
    pub adapter: Option<PathBuf>,
    /// Also write `OUTPUT/final-merged`, the adapter merged into the base (an HF model directory).
    pub merge: bool,
    /// The merged model's dtype; `None`: the one the base is stored in ([`hf::stored_dtype`]).
    pub merge_dtype: Option<hf::safetensors::WriteDtype>,
    /// How a LoRA run holds the frozen base's block linears (`quantize = "nf4"`, `double_quant`,
    /// `base_dtype = "bf16"`): QLoRA. The rest of the base and the adapter stay f32; a merge reads the f32
    /// base fresh from `model`. A bf16 run stores a LoRA base in bf16 unless these keys say otherwise:
    /// its products round the weights to bf16 anyway, so that costs nothing and halves the base.
    pub base_storage: Storage,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: PathBuf::new(),
            data: PathBuf::new(),
            output: PathBuf::new(),
            ref_model: None,
            eval_data: None,
            objective: Objective::pairs(LossType::Sigmoid),
            precompute_ref: false,
            cache_dir: None,
            max_length: None,
            max_prompt_length: None,
            truncation: Truncation::KeepStart,
            skip_bad_rows: false,
            no_shuffle: false,
            prefix_sharing: true,
            lr: DEFAULT_LR,
            batch_size: 8,
            micro_pairs: 0,
            gradient_checkpointing: false,
            grad_accum: 1,
            max_steps: None,
            epochs: 3.0,
            optimizer: OptimizerKind::AdamW,
            scheduler: ScheduleKind::Linear,
            warmup_steps: 0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            momentum: 0.0,
            max_grad_norm: 1.0,
            seed: 42,
            threads: None,
            precision: Precision::F32,
            eval_every: 0,
            save_every: 500,
            save_total_limit: 0,
            log_every: 1,
            on_nonfinite: OnNonFinite::Stop,
            report_to: Default::default(),
            max_memory: None,
            lora: LoraFlags::default(),
            adapter: None,
            merge: false,
            merge_dtype: None,
            base_storage: Storage::F32,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Toml { path: PathBuf, message: String },
    #[error("invalid setting `{field}`: {message}")]
    Invalid { field: &'static str, message: String },
}

pub(super) fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field, message: message.into() }
}

impl TrainConfig {
    /// Reads a TOML file; unknown keys are errors that name the key.
    pub fn from_toml_file(path: &Path) -> Result<Self, ConfigError> {
        Self::from_layers(Some(path), toml::Table::new(), Method::Pairs)
    }

    /// `method`'s defaults, then the file (relative paths against its directory), then `overrides` (a
    /// table keyed like the file, e.g. the command line's flags): parsed once, then checked.
    pub fn from_layers(file: Option<&Path>, overrides: toml::Table, method: Method) -> Result<Self, ConfigError> {
        let mut table = match file {
            Some(p) => read_toml_table(p)?,
            None => toml::Table::new(),
        };
        table.extend(overrides);
        let what = file.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("settings"));
        let raw: RawConfig = toml::Value::Table(table).try_into().map_err(|e| toml_error(&what, e))?;
        let cfg = TrainConfig::resolve(raw, method)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The pair objective's loss names, comma-separated (for messages).
    fn loss_names(&self, p: &PairObjective) -> String {
        p.losses.iter().map(|(k, _)| k.name()).collect::<Vec<_>>().join(", ")
    }

    /// Whether the run trains a LoRA adapter (new, or from `adapter`) on a frozen base.
    pub fn is_lora(&self) -> bool {
        self.lora.r.is_some() || self.adapter.is_some()
    }

    /// The settings as TOML. Total for a validated config (`validate` keeps the seed within TOML's i64).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(&self.to_raw()).expect("a validated TrainConfig always serialises")
    }

    /// The optimizer with this run's settings.
    pub fn optimizer_config(&self) -> OptimizerConfig {
        let (weight_decay, momentum) = (self.weight_decay, self.momentum);
        match self.optimizer {
            OptimizerKind::AdamW => OptimizerConfig::AdamW {
                beta1: self.adam_beta1,
                beta2: self.adam_beta2,
                eps: self.adam_eps,
                weight_decay,
            },
            OptimizerKind::RmsProp => OptimizerConfig::RmsProp { alpha: 0.99, eps: 1e-8, weight_decay, momentum },
            OptimizerKind::Sgd => OptimizerConfig::Sgd { momentum, weight_decay },
        }
    }

    /// Checks every setting, with torch's rules where torch has them (`torch.optim.AdamW`, `SGD`,
    /// `RMSprop`, `clip_grad_norm_`), so that nothing fails deep inside a run.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let finite = |field, v: f64| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(invalid(field, format!("{v} is not a finite number")))
            }
        };
        let at_least = |field, v: f64, lo: f64| {
            finite(field, v)?;
            if v >= lo {
                Ok(())
            } else {
                Err(invalid(field, format!("{v} must be >= {lo}")))
            }
        };
        // The seed is written to the run's config.toml, and TOML integers are signed 64-bit.
        if self.seed > i64::MAX as u64 {
            return Err(invalid(
                "seed",
                format!("{} must be at most {} (TOML integers are signed 64-bit)", self.seed, i64::MAX),
            ));
        }
        if self.batch_size == 0 {
            return Err(invalid("batch_size", "must be at least 1"));
        }
        if self.grad_accum == 0 {
            return Err(invalid("grad_accum", "must be at least 1"));
        }
        at_least("lr", self.lr, 0.0)?;
        if self.max_steps.is_none() && !(self.epochs.is_finite() && self.epochs > 0.0) {
            return Err(invalid("epochs", format!("{} must be positive (or give max_steps)", self.epochs)));
        }
        if self.max_grad_norm.is_nan() || self.max_grad_norm < 0.0 {
            return Err(invalid("max_grad_norm", format!("{} must be >= 0 (0 disables clipping)", self.max_grad_norm)));
        }
        if self.max_length == Some(0) {
            return Err(invalid("max_length", "must be at least 1"));
        }
        if self.max_prompt_length == Some(0) {
            return Err(invalid("max_prompt_length", "must be at least 1"));
        }
        if let (Some(prompt), Some(total)) = (self.max_prompt_length, self.max_length) {
            if prompt >= total {
                return Err(invalid(
                    "max_prompt_length",
                    format!("{prompt} leaves no room for a completion within max_length {total}"),
                ));
            }
        }
        if self.eval_every > 0 && self.eval_data.is_none() {
            return Err(invalid("eval_every", "evaluates eval_data, and none is given"));
        }
        if self.threads == Some(0) {
            return Err(invalid("threads", "must be at least 1"));
        }
        at_least("weight_decay", self.weight_decay, 0.0)?;
        at_least("momentum", self.momentum, 0.0)?;
        for (field, b) in [("adam_beta1", self.adam_beta1), ("adam_beta2", self.adam_beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(invalid(field, format!("{b} must be in [0, 1)")));
            }
        }
        if !(self.adam_eps.is_finite() && self.adam_eps > 0.0) {
            return Err(invalid("adam_eps", format!("{} must be a finite number > 0", self.adam_eps)));
        }
        let positive_beta = |beta: f64| {
            if beta.is_finite() && beta > 0.0 {
                Ok(())
            } else {
                Err(invalid(
                    "beta",
                    format!("{beta} must be a finite number > 0 (0 trains nothing, < 0 inverts the objective)"),
                ))
            }
        };
        match &self.objective {
            Objective::Pairs(p) => {
                positive_beta(p.cfg.beta)?;
                if p.reference_free() {
                    let why = match p.cfg.reference_free {
                        true => "reference_free treats the reference log-probs as 0".to_string(),
                        false => format!("{} compare with no reference", self.loss_names(p)),
                    };
                    if self.ref_model.is_some() {
                        return Err(invalid("ref_model", format!("would not be read: {why}")));
                    }
                    if self.precompute_ref {
                        return Err(invalid("precompute_ref", format!("has nothing to compute: {why}")));
                    }
                }
                for (kind, w) in &p.losses {
                    if !w.is_finite() {
                        return Err(invalid(
                            "loss_weights",
                            format!("the weight of {} is {w}, not a finite number", kind.name()),
                        ));
                    }
                }
                let c = &p.cfg;
                if !(c.label_smoothing.is_finite() && (0.0..1.0).contains(&c.label_smoothing)) {
                    return Err(invalid("label_smoothing", format!("{} must be in [0, 1)", c.label_smoothing)));
                }
                crate::objectives::check_settings(&p.losses, c).map_err(|e| {
                    let field = match e {
                        ObjectiveError::FDivergenceUnsupported { .. } => "f_divergence",
                        ObjectiveError::LabelSmoothingUnused { .. } => "label_smoothing",
                        _ => "loss",
                    };
                    invalid(field, e.to_string())
                })?;
                finite("f_alpha", c.f_alpha_divergence_coef)?;
                finite("simpo_gamma", c.simpo_gamma)?;
                finite("discopop_tau", c.discopop_tau)?;
                finite("alphapo_alpha", c.alphapo_alpha)?;
            }
            Objective::Kto(k) => {
                positive_beta(k.beta)?;
                at_least("desirable_weight", k.desirable_weight, 0.0)?;
                at_least("undesirable_weight", k.undesirable_weight, 0.0)?;
                if self.precompute_ref {
                    return Err(invalid("precompute_ref", "does not apply to KTO: its KL pairs are formed per batch"));
                }
            }
            Objective::Sft => {}
            Objective::Unlikelihood(u) => at_least("unlikelihood_alpha", u.alpha, 0.0)?,
        }
        self.lora.validate(self.adapter.is_some())?;
        if self.base_storage != Storage::F32 && !self.is_lora() {
            let key = if self.base_storage == Storage::Bf16 { "base_dtype" } else { "quantize" };
            return Err(invalid(key, "stores a frozen base: it applies to a LoRA run (give lora_r or adapter)"));
        }
        if self.merge_dtype.is_some() && !self.merge {
            return Err(invalid("merge_dtype", "applies with merge (the merged model's dtype)"));
        }
        if self.merge && !self.is_lora() {
            return Err(invalid(
                "merge",
                "applies to a LoRA run (give lora_r or adapter); final/ of a full run is a whole model already",
            ));
        }
        Ok(())
    }
}

mod lora;
mod raw;
#[cfg(test)]
mod tests;

pub use lora::{LoraFlags, LoraTargets, DEFAULT_LORA_ALPHA, DEFAULT_LORA_DROPOUT};

use raw::toml_error;
pub use raw::{read_toml_table, ListOrString, RawConfig, PATH_KEYS};
