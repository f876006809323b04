//! The resolved configuration of a training run: defaults (TRL's `DPOConfig` and HF `TrainingArguments`,
//! where not stated otherwise), overridden by a TOML file, overridden by command-line flags. The
//! resolved result is written to `OUTPUT/config.toml`, so a run can be repeated with `--config` alone.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::objectives::LossConfig;

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

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
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

    /// Loss types, comma-separated (`sigmoid`, `ipo`, `sigmoid,sft`, ...).
    pub loss: String,
    /// One weight per loss type; default 1 each.
    pub loss_weights: Option<String>,
    /// Objective settings (beta, label smoothing, f-divergence, SimPO gamma, ...).
    pub objective: LossConfig,
    /// Compute reference log-probs once before training and cache them on disk.
    pub precompute_ref: bool,
    /// Directory of the reference log-prob cache (default: `$XDG_CACHE_HOME/dpo` or `~/.cache/dpo`).
    pub cache_dir: Option<PathBuf>,

    pub max_length: Option<usize>,
    pub max_prompt_length: Option<usize>,
    /// `keep-start` or `keep-end`.
    pub truncation: String,
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
    /// Stop after this many optimizer steps (overrides `epochs`).
    pub max_steps: Option<u64>,
    pub epochs: f64,
    /// `adamw`, `rmsprop` or `sgd`.
    pub optimizer: String,
    /// `constant`, `linear` or `cosine`.
    pub scheduler: String,
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

    /// Evaluate on `eval_data` every this many steps (0: only at the end).
    pub eval_every: u64,
    /// Write a resumable checkpoint every this many steps (0: only at the end and on interruption).
    pub save_every: u64,
    /// Keep at most this many checkpoints (oldest removed first; 0 keeps all).
    pub save_total_limit: usize,
    /// Print a metrics line every this many steps.
    pub log_every: u64,
    pub on_nonfinite: OnNonFinite,
    /// Memory the run may use (`8GiB`, `512M`); default: the machine's available memory
    /// (`MemAvailable`). A run whose estimated peak exceeds it is refused before training.
    pub max_memory: Option<String>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: PathBuf::new(),
            data: PathBuf::new(),
            output: PathBuf::new(),
            ref_model: None,
            eval_data: None,
            loss: "sigmoid".into(),
            loss_weights: None,
            objective: LossConfig::default(),
            precompute_ref: false,
            cache_dir: None,
            max_length: Some(1024),
            max_prompt_length: None,
            truncation: "keep-start".into(),
            skip_bad_rows: false,
            no_shuffle: false,
            prefix_sharing: true,
            lr: 1e-6,
            batch_size: 8,
            micro_pairs: 0,
            grad_accum: 1,
            max_steps: None,
            epochs: 3.0,
            optimizer: "adamw".into(),
            scheduler: "linear".into(),
            warmup_steps: 0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            momentum: 0.0,
            max_grad_norm: 1.0,
            seed: 42,
            eval_every: 0,
            save_every: 500,
            save_total_limit: 0,
            log_every: 1,
            on_nonfinite: OnNonFinite::Stop,
            max_memory: None,
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

impl TrainConfig {
    /// Reads a TOML file; unknown keys are errors that name the key.
    pub fn from_toml_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.into(), source })?;
        toml::from_str(&text).map_err(|e| ConfigError::Toml { path: path.into(), message: e.to_string() })
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a TrainConfig always serialises")
    }

    /// Checks ranges that would otherwise fail deep inside a run.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, message: &str| Err(ConfigError::Invalid { field, message: message.into() });
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1");
        }
        if self.grad_accum == 0 {
            return bad("grad_accum", "must be at least 1");
        }
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad("lr", "must be a non-negative number");
        }
        if self.max_steps.is_none() && !(self.epochs.is_finite() && self.epochs > 0.0) {
            return bad("epochs", "must be positive (or give max_steps)");
        }
        if self.max_grad_norm < 0.0 {
            return bad("max_grad_norm", "must be >= 0 (0 disables clipping)");
        }
        if self.truncation.parse::<crate::data::Truncation>().is_err() {
            return bad("truncation", "must be keep-start or keep-end");
        }
        if self.max_length == Some(0) {
            return bad("max_length", "must be at least 1");
        }
        if let Some(m) = &self.max_memory {
            super::memory::parse_size(m).map_err(|message| ConfigError::Invalid { field: "max_memory", message })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_round_trip_and_unknown_keys() {
        let c = TrainConfig { lr: 5e-3, loss: "sigmoid,sft".into(), ..Default::default() };
        let back: TrainConfig = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back, c);
        let e = toml::from_str::<TrainConfig>("lrr = 1.0\n").unwrap_err().to_string();
        assert!(e.contains("lrr"), "{e}");
        let nested: TrainConfig = toml::from_str("lr = 0.5\n[objective]\nbeta = 0.25\n").unwrap();
        assert_eq!((nested.lr, nested.objective.beta, nested.batch_size), (0.5, 0.25, 8));
    }
}
