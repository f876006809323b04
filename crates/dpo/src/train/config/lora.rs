//! LoRA settings of a run: a new adapter (`lora_r`, `lora_alpha`, `lora_dropout`, `lora_targets`,
//! `use_rslora`), or one read from a PEFT adapter directory (`adapter`), whose `adapter_config.json`
//! decides r, alpha, dropout and targets (a `lora_*` setting that says otherwise is refused).
//!
//! Defaults follow TRL's `trl dpo --use_peft` (`ModelConfig`): alpha 32 (with its r of 16, scale 2),
//! targets PEFT's per-architecture default when none are named. Dropout defaults to PEFT's `LoraConfig`
//! (0, where TRL's command line says 0.05): a run without dropout is deterministic and its resume exact.

use std::fmt;
use std::str::FromStr;

use super::{invalid, ConfigError};

/// Scale numerator of a new adapter (TRL's `ModelConfig.lora_alpha`).
pub const DEFAULT_LORA_ALPHA: f64 = 32.0;
/// Dropout on the adapter's input (PEFT's `LoraConfig.lora_dropout`).
pub const DEFAULT_LORA_DROPOUT: f64 = 0.0;

/// Which linear layers get an adapter, by HF module name.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum LoraTargets {
    /// PEFT's default for the architecture (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`: q_proj and
    /// v_proj for Llama and Qwen, c_attn for GPT-2, query_key_value for GPT-NeoX).
    #[default]
    Default,
    /// Every linear layer of every block (PEFT's `all-linear`; never the LM head).
    AllLinear,
    /// These module names (`q_proj`, `v_proj`, `c_attn`, ...), matched against the end of each module's path.
    Modules(Vec<String>),
}

impl LoraTargets {
    /// The flag's spelling: `all-linear` or names joined by commas (`None` for the default).
    pub fn to_flag(&self) -> Option<String> {
        match self {
            LoraTargets::Default => None,
            LoraTargets::AllLinear => Some("all-linear".into()),
            LoraTargets::Modules(m) => Some(m.join(",")),
        }
    }
}

impl LoraTargets {
    /// PEFT's `target_modules` as this flag spells it (`None` for a regular expression, which it cannot).
    pub fn of(t: &hf::peft::TargetModules) -> Option<Self> {
        match t {
            hf::peft::TargetModules::AllLinear => Some(LoraTargets::AllLinear),
            hf::peft::TargetModules::Names(n) => Some(LoraTargets::Modules(n.clone())),
            hf::peft::TargetModules::Regex(_) => None,
        }
    }

    /// The list PEFT's `fresh_config` takes: empty for the architecture's default.
    pub fn names(&self) -> Vec<String> {
        match self {
            LoraTargets::Default => Vec::new(),
            LoraTargets::AllLinear => vec!["all-linear".into()],
            LoraTargets::Modules(m) => m.clone(),
        }
    }
}

impl FromStr for LoraTargets {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let names: Vec<String> = s.split(',').map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect();
        match names.as_slice() {
            [] => Err("names no module; give all-linear or module names such as q_proj,v_proj".into()),
            [one] if one == "all-linear" => Ok(LoraTargets::AllLinear),
            many if many.iter().any(|n| n == "all-linear") => {
                Err("all-linear cannot be combined with module names".into())
            }
            _ => Ok(LoraTargets::Modules(names)),
        }
    }
}

impl fmt::Display for LoraTargets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.to_flag().as_deref().unwrap_or("the architecture's PEFT default"))
    }
}

/// The `lora_*` settings as given (command line or config.toml); `None` where not given.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoraFlags {
    pub r: Option<usize>,
    pub alpha: Option<f64>,
    pub dropout: Option<f64>,
    pub targets: Option<LoraTargets>,
    pub use_rslora: Option<bool>,
}

impl LoraFlags {
    /// Whether any `lora_*` setting was given.
    pub fn any(&self) -> bool {
        self != &LoraFlags::default()
    }

    /// The first setting given here that differs from an adapter's own (`adapter_config.json`), as
    /// `(key, given, the adapter's)`; module lists are compared as sets.
    pub fn conflict_with(&self, adapter: &hf::peft::LoraConfig) -> Option<(&'static str, String, String)> {
        if let Some(r) = self.r.filter(|&r| r != adapter.r) {
            return Some(("lora_r", r.to_string(), adapter.r.to_string()));
        }
        if let Some(a) = self.alpha.filter(|&a| a != adapter.lora_alpha) {
            return Some(("lora_alpha", a.to_string(), adapter.lora_alpha.to_string()));
        }
        if let Some(d) = self.dropout.filter(|&d| d as f32 != adapter.lora_dropout) {
            return Some(("lora_dropout", d.to_string(), adapter.lora_dropout.to_string()));
        }
        if let Some(u) = self.use_rslora.filter(|&u| u != adapter.use_rslora) {
            return Some(("use_rslora", u.to_string(), adapter.use_rslora.to_string()));
        }
        let theirs = LoraTargets::of(&adapter.target_modules);
        let sorted = |t: &LoraTargets| match t {
            LoraTargets::Modules(m) => {
                let mut m = m.clone();
                m.sort();
                m.dedup();
                LoraTargets::Modules(m)
            }
            other => other.clone(),
        };
        match (&self.targets, &theirs) {
            (Some(mine), Some(t)) if sorted(mine) == sorted(t) => None,
            (Some(mine), t) => Some((
                "lora_targets",
                mine.to_string(),
                t.as_ref().map_or_else(|| format!("{:?}", adapter.target_modules), |t| t.to_string()),
            )),
            (None, _) => None,
        }
    }

    /// An adapter's own settings, every one given (what config.toml records for a run from an adapter, so
    /// that a resume checks the adapter against them).
    pub fn of_adapter(c: &hf::peft::LoraConfig) -> Self {
        LoraFlags {
            r: Some(c.r),
            alpha: Some(c.lora_alpha),
            dropout: Some(c.lora_dropout as f64),
            targets: LoraTargets::of(&c.target_modules),
            use_rslora: Some(c.use_rslora),
        }
    }

    /// Checks each given value; `from_adapter` says whether an adapter directory supplies `lora_r`.
    pub fn validate(&self, from_adapter: bool) -> Result<(), ConfigError> {
        if self.r == Some(0) {
            return Err(invalid("lora_r", "must be at least 1"));
        }
        if let Some(a) = self.alpha.filter(|a| !(a.is_finite() && *a > 0.0)) {
            return Err(invalid("lora_alpha", format!("{a} must be a finite number > 0")));
        }
        if let Some(d) = self.dropout.filter(|d| !(d.is_finite() && (0.0..1.0).contains(d))) {
            return Err(invalid("lora_dropout", format!("{d} must be in [0, 1)")));
        }
        if self.r.is_none() && !from_adapter && self.any() {
            let key = if self.alpha.is_some() {
                "lora_alpha"
            } else if self.dropout.is_some() {
                "lora_dropout"
            } else if self.targets.is_some() {
                "lora_targets"
            } else {
                "use_rslora"
            };
            return Err(invalid(
                key,
                "applies to a LoRA run: give lora_r (a new adapter) or adapter (an existing one)",
            ));
        }
        Ok(())
    }
}
