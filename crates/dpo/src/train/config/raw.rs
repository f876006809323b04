//! config.toml as written and read: [`RawConfig`], every key a flag's name, and its resolution into
//! the typed [`TrainConfig`].

use std::fmt;
use std::path::{Path, PathBuf};

use engine::kernels::Precision;
use engine::quant::Storage;
use serde::{Deserialize, Serialize};

use super::{
    invalid, schedule_name, truncation_name, ByteSize, ConfigError, LoraFlags, LoraTargets, Method, Objective,
    OnNonFinite, TrainConfig, DEFAULT_LR, DEFAULT_SFT_LR,
};
use crate::data::Truncation;
use crate::objectives::unlikelihood::{UnlikelihoodConfig, UNLIKELIHOOD};
use crate::objectives::{FDivergence, KtoConfig, KtoLossType, LossConfig, LossType};
use crate::train::pairs::PairObjective;

/// A list given as a TOML array or a comma-separated string (the flag's form).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ListOrString<T> {
    List(Vec<T>),
    Text(String),
}

/// config.toml as written: every key a flag's name. Options are settings not given.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<Method>,
    pub model: Option<PathBuf>,
    pub data: Option<PathBuf>,
    pub output: Option<PathBuf>,
    pub ref_model: Option<PathBuf>,
    pub eval_data: Option<PathBuf>,
    pub loss: Option<ListOrString<String>>,
    pub loss_weights: Option<ListOrString<f64>>,
    pub beta: Option<f64>,
    pub label_smoothing: Option<f64>,
    pub f_divergence: Option<FDivergence>,
    pub f_alpha: Option<f64>,
    pub simpo_gamma: Option<f64>,
    pub discopop_tau: Option<f64>,
    pub alphapo_alpha: Option<f64>,
    pub reference_free: Option<bool>,
    pub desirable_weight: Option<f64>,
    pub undesirable_weight: Option<f64>,
    pub unlikelihood_alpha: Option<f64>,
    /// The `[objective]` table of config.toml files written before the keys were the flags' names.
    #[serde(skip_serializing)]
    pub objective: Option<LossConfig>,
    pub precompute_ref: Option<bool>,
    pub cache_dir: Option<PathBuf>,
    pub max_length: Option<usize>,
    pub max_prompt_length: Option<usize>,
    pub truncation: Option<String>,
    pub skip_bad_rows: Option<bool>,
    pub no_shuffle: Option<bool>,
    pub no_prefix_sharing: Option<bool>,
    /// The key of config.toml files written before the keys were the flags' names.
    #[serde(skip_serializing)]
    pub prefix_sharing: Option<bool>,
    pub lr: Option<f64>,
    pub batch_size: Option<usize>,
    pub grad_accum: Option<usize>,
    pub micro_pairs: Option<usize>,
    pub gradient_checkpointing: Option<bool>,
    pub max_steps: Option<u64>,
    pub epochs: Option<f64>,
    pub optimizer: Option<String>,
    pub scheduler: Option<String>,
    pub warmup_steps: Option<u64>,
    pub weight_decay: Option<f64>,
    pub adam_beta1: Option<f64>,
    pub adam_beta2: Option<f64>,
    pub adam_eps: Option<f64>,
    pub momentum: Option<f64>,
    pub max_grad_norm: Option<f64>,
    pub seed: Option<u64>,
    pub threads: Option<usize>,
    pub precision: Option<String>,
    pub eval_every: Option<u64>,
    pub save_every: Option<u64>,
    pub save_total_limit: Option<usize>,
    pub log_every: Option<u64>,
    pub on_nonfinite: Option<OnNonFinite>,
    pub report_to: Option<String>,
    pub max_memory: Option<String>,
    pub lora_r: Option<usize>,
    pub lora_alpha: Option<f64>,
    pub lora_dropout: Option<f64>,
    pub lora_targets: Option<ListOrString<String>>,
    pub use_rslora: Option<bool>,
    pub adapter: Option<PathBuf>,
    pub merge: Option<bool>,
    pub merge_dtype: Option<String>,
    pub quantize: Option<String>,
    pub double_quant: Option<bool>,
    pub base_dtype: Option<String>,
}

/// The keys that hold paths: relative ones resolve against the directory of the file that names them.
pub const PATH_KEYS: [&str; 7] = ["model", "data", "output", "ref_model", "eval_data", "cache_dir", "adapter"];

/// The frozen base's storage from `quantize` (nf4), `double_quant` and `base_dtype` (f32, bf16).
fn base_storage(
    quantize: Option<&str>,
    double_quant: Option<bool>,
    dtype: Option<&str>,
) -> Result<Storage, ConfigError> {
    let double_quant = double_quant.unwrap_or(false);
    let dtype = match dtype {
        None | Some("f32") => Storage::F32,
        Some("bf16") => Storage::Bf16,
        Some(t) => return Err(invalid("base_dtype", format!("{t:?}: use f32 or bf16"))),
    };
    match quantize {
        Some("nf4") if dtype == Storage::F32 => Ok(Storage::Nf4 { double_quant }),
        Some("nf4") => Err(invalid("quantize", "nf4 and base_dtype bf16 both store the base; give one")),
        Some(t) => Err(invalid("quantize", format!("{t:?}: the one quantisation is nf4"))),
        None if double_quant => Err(invalid("double_quant", "applies to quantize = \"nf4\"")),
        None => Ok(dtype),
    }
}

pub(super) fn toml_error(path: &Path, e: impl fmt::Display) -> ConfigError {
    ConfigError::Toml { path: path.into(), message: e.to_string() }
}

/// Reads a TOML file into a table whose relative paths are made relative to the file's directory.
pub fn read_toml_table(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.into(), source })?;
    // Parsed as `RawConfig` first, so that an unknown key or a wrong type is reported with its line.
    toml::from_str::<RawConfig>(&text).map_err(|e| toml_error(path, e))?;
    let mut table: toml::Table = toml::from_str(&text).map_err(|e| toml_error(path, e))?;
    let base = path.parent().unwrap_or(Path::new(""));
    for key in PATH_KEYS {
        if let Some(toml::Value::String(p)) = table.get_mut(key) {
            // A hub id (`org/name`, the org required here) of a model or dataset stays as it is unless the
            // file's directory holds that path.
            let hub_key = matches!(key, "model" | "ref_model" | "adapter" | "data" | "eval_data");
            let hub_id = hub_key && p.contains('/') && hf::hub_cache::HubId::parse(p).is_some();
            let hub_id = hub_id && !base.join(&*p).exists();
            if Path::new(p.as_str()).is_relative() && !hub_id {
                *p = base.join(&*p).to_string_lossy().into_owned();
            }
        }
    }
    Ok(table)
}

impl TrainConfig {
    /// Turns the raw settings into typed ones; `method` applies where the settings do not name one.
    pub fn resolve(raw: RawConfig, method: Method) -> Result<Self, ConfigError> {
        let d = TrainConfig::default();
        let legacy = raw.objective.clone().unwrap_or_default();
        let method = raw.method.unwrap_or(method);
        let losses: Option<Vec<String>> = match raw.loss.clone() {
            None => None,
            Some(ListOrString::List(v)) => Some(v),
            Some(ListOrString::Text(t)) => Some(t.split(',').map(|s| s.trim().to_string()).collect()),
        };
        let losses: Vec<String> = losses.unwrap_or_default().into_iter().filter(|s| !s.is_empty()).collect();
        let kto = match losses.as_slice() {
            [one] => one.parse::<KtoLossType>().ok(),
            _ => None,
        };
        let beta = raw.beta.unwrap_or(legacy.beta);
        let unlikelihood = losses.iter().any(|l| l == UNLIKELIHOOD);
        if unlikelihood && losses.len() > 1 {
            return Err(invalid("loss", "unlikelihood is trained alone, not weighted with other losses"));
        }
        let method = if unlikelihood && method == Method::Pairs { Method::Unlikelihood } else { method };
        let objective = match (method, kto) {
            (Method::Unlikelihood, _) if !losses.is_empty() && !unlikelihood => {
                return Err(invalid("loss", "an unlikelihood run takes the loss unlikelihood"))
            }
            (Method::Unlikelihood, _) => Objective::Unlikelihood(UnlikelihoodConfig {
                alpha: raw.unlikelihood_alpha.unwrap_or(UnlikelihoodConfig::default().alpha),
            }),
            (Method::Sft, _) if !losses.is_empty() => {
                return Err(invalid("loss", "an SFT run has no loss types (its loss is the completion NLL)"))
            }
            (Method::Sft, _) => Objective::Sft,
            (_, Some(loss_type)) => {
                let k = KtoConfig::default();
                Objective::Kto(KtoConfig {
                    loss_type,
                    beta,
                    desirable_weight: raw.desirable_weight.unwrap_or(k.desirable_weight),
                    undesirable_weight: raw.undesirable_weight.unwrap_or(k.undesirable_weight),
                })
            }
            (Method::Kto, None) if losses.is_empty() => Objective::Kto(KtoConfig { beta, ..Default::default() }),
            (Method::Kto, None) => return Err(invalid("loss", "a KTO run takes kto or apo_zero_unpaired")),
            (Method::Pairs, None) => {
                let kinds = if losses.is_empty() { vec!["sigmoid".to_string()] } else { losses };
                let kinds = kinds
                    .iter()
                    .map(|s| s.parse::<LossType>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| invalid("loss", e.to_string()))?;
                let weights = match raw.loss_weights.clone() {
                    None => vec![1.0; kinds.len()],
                    Some(ListOrString::List(w)) => w,
                    Some(ListOrString::Text(t)) => t
                        .split(',')
                        .map(|s| {
                            s.trim()
                                .parse::<f64>()
                                .map_err(|_| invalid("loss_weights", format!("{s:?} is not a number")))
                        })
                        .collect::<Result<_, _>>()?,
                };
                if weights.len() != kinds.len() {
                    let m = format!("{} loss types but {} loss weights", kinds.len(), weights.len());
                    return Err(invalid("loss_weights", m));
                }
                let cfg = LossConfig {
                    beta,
                    label_smoothing: raw.label_smoothing.unwrap_or(legacy.label_smoothing),
                    f_divergence: raw.f_divergence.unwrap_or(legacy.f_divergence),
                    f_alpha_divergence_coef: raw.f_alpha.unwrap_or(legacy.f_alpha_divergence_coef),
                    discopop_tau: raw.discopop_tau.unwrap_or(legacy.discopop_tau),
                    reference_free: raw.reference_free.unwrap_or(legacy.reference_free),
                    simpo_gamma: raw.simpo_gamma.unwrap_or(legacy.simpo_gamma),
                    alphapo_alpha: raw.alphapo_alpha.unwrap_or(legacy.alphapo_alpha),
                };
                Objective::Pairs(PairObjective { losses: kinds.into_iter().zip(weights).collect(), cfg })
            }
        };
        let default_lr = if method == Method::Sft { DEFAULT_SFT_LR } else { DEFAULT_LR };
        let truncation = match raw.truncation {
            Some(t) => t
                .parse::<Truncation>()
                .map_err(|_| invalid("truncation", format!("{t:?}: use keep-start or keep-end")))?,
            None => d.truncation,
        };
        let optimizer = match raw.optimizer {
            Some(t) => t.parse().map_err(|m| invalid("optimizer", m))?,
            None => d.optimizer,
        };
        let scheduler = match raw.scheduler {
            Some(t) => t.parse().map_err(|e: engine::optim::UnknownSchedule| invalid("scheduler", e.to_string()))?,
            None => d.scheduler,
        };
        let max_memory = match raw.max_memory {
            Some(t) => Some(t.parse::<ByteSize>().map_err(|m| invalid("max_memory", m))?),
            None => None,
        };
        let lora_targets = match raw.lora_targets {
            None => None,
            Some(ListOrString::List(v)) => Some(v.join(",")),
            Some(ListOrString::Text(t)) => Some(t),
        };
        let lora = LoraFlags {
            r: raw.lora_r,
            alpha: raw.lora_alpha,
            dropout: raw.lora_dropout,
            targets: match lora_targets {
                Some(t) => Some(t.parse::<LoraTargets>().map_err(|m| invalid("lora_targets", format!("{t:?} {m}")))?),
                None => None,
            },
            use_rslora: raw.use_rslora,
        };
        let precision = match raw.precision {
            Some(p) => p.parse::<Precision>().map_err(|e| invalid("precision", e.to_string()))?,
            None => d.precision,
        };
        let mut stored_base = base_storage(raw.quantize.as_deref(), raw.double_quant, raw.base_dtype.as_deref())?;
        // A bf16 pass rounds every block linear's weight to bf16 anyway: a frozen LoRA base stored so gives
        // the same numbers in half the memory (unless the settings name the base's storage themselves).
        let lora_run = raw.lora_r.is_some() || raw.adapter.is_some();
        if precision == Precision::Bf16 && lora_run && raw.quantize.is_none() && raw.base_dtype.is_none() {
            stored_base = Storage::Bf16;
        }
        let prefix_sharing = match (raw.no_prefix_sharing, raw.prefix_sharing) {
            (Some(no), _) => !no,
            (None, Some(yes)) => yes,
            (None, None) => d.prefix_sharing,
        };
        Ok(TrainConfig {
            model: raw.model.unwrap_or_default(),
            data: raw.data.unwrap_or_default(),
            output: raw.output.unwrap_or_default(),
            ref_model: raw.ref_model,
            eval_data: raw.eval_data,
            objective,
            precompute_ref: raw.precompute_ref.unwrap_or(d.precompute_ref),
            cache_dir: raw.cache_dir,
            max_length: raw.max_length,
            max_prompt_length: raw.max_prompt_length,
            truncation,
            skip_bad_rows: raw.skip_bad_rows.unwrap_or(d.skip_bad_rows),
            no_shuffle: raw.no_shuffle.unwrap_or(d.no_shuffle),
            prefix_sharing,
            lr: raw.lr.unwrap_or(default_lr),
            batch_size: raw.batch_size.unwrap_or(d.batch_size),
            grad_accum: raw.grad_accum.unwrap_or(d.grad_accum),
            micro_pairs: raw.micro_pairs.unwrap_or(d.micro_pairs),
            gradient_checkpointing: raw.gradient_checkpointing.unwrap_or(d.gradient_checkpointing),
            max_steps: raw.max_steps,
            epochs: raw.epochs.unwrap_or(d.epochs),
            optimizer,
            scheduler,
            warmup_steps: raw.warmup_steps.unwrap_or(d.warmup_steps),
            weight_decay: raw.weight_decay.unwrap_or(d.weight_decay),
            adam_beta1: raw.adam_beta1.unwrap_or(d.adam_beta1),
            adam_beta2: raw.adam_beta2.unwrap_or(d.adam_beta2),
            adam_eps: raw.adam_eps.unwrap_or(d.adam_eps),
            momentum: raw.momentum.unwrap_or(d.momentum),
            max_grad_norm: raw.max_grad_norm.unwrap_or(d.max_grad_norm),
            seed: raw.seed.unwrap_or(d.seed),
            threads: raw.threads,
            precision,
            eval_every: raw.eval_every.unwrap_or(d.eval_every),
            save_every: raw.save_every.unwrap_or(d.save_every),
            save_total_limit: raw.save_total_limit.unwrap_or(d.save_total_limit),
            log_every: raw.log_every.unwrap_or(d.log_every),
            on_nonfinite: raw.on_nonfinite.unwrap_or(d.on_nonfinite),
            report_to: match &raw.report_to {
                Some(s) => crate::tensorboard::ReportTo::parse(s).map_err(|m| invalid("report_to", m))?,
                None => d.report_to,
            },
            max_memory,
            lora,
            adapter: raw.adapter,
            merge: raw.merge.unwrap_or(d.merge),
            merge_dtype: match raw.merge_dtype.as_deref() {
                Some(name) => Some(
                    hf::safetensors::WriteDtype::parse(name)
                        .ok_or_else(|| invalid("merge_dtype", format!("{name:?}: use f32, bf16 or f16")))?,
                ),
                None => d.merge_dtype,
            },
            base_storage: stored_base,
        })
    }

    /// The settings as config.toml holds them (every key a flag's name).
    pub fn to_raw(&self) -> RawConfig {
        let mut raw = RawConfig {
            method: Some(self.objective.method()),
            model: Some(self.model.clone()),
            data: Some(self.data.clone()),
            output: Some(self.output.clone()),
            ref_model: self.ref_model.clone(),
            eval_data: self.eval_data.clone(),
            precompute_ref: Some(self.precompute_ref),
            cache_dir: self.cache_dir.clone(),
            max_length: self.max_length,
            max_prompt_length: self.max_prompt_length,
            truncation: Some(truncation_name(self.truncation).into()),
            skip_bad_rows: Some(self.skip_bad_rows),
            no_shuffle: Some(self.no_shuffle),
            no_prefix_sharing: Some(!self.prefix_sharing),
            lr: Some(self.lr),
            batch_size: Some(self.batch_size),
            grad_accum: Some(self.grad_accum),
            micro_pairs: Some(self.micro_pairs),
            gradient_checkpointing: Some(self.gradient_checkpointing),
            max_steps: self.max_steps,
            epochs: Some(self.epochs),
            optimizer: Some(self.optimizer.name().into()),
            scheduler: Some(schedule_name(self.scheduler).into()),
            warmup_steps: Some(self.warmup_steps),
            weight_decay: Some(self.weight_decay),
            adam_beta1: Some(self.adam_beta1),
            adam_beta2: Some(self.adam_beta2),
            adam_eps: Some(self.adam_eps),
            momentum: Some(self.momentum),
            max_grad_norm: Some(self.max_grad_norm),
            seed: Some(self.seed),
            threads: self.threads,
            precision: Some(self.precision.name().into()),
            eval_every: Some(self.eval_every),
            save_every: Some(self.save_every),
            save_total_limit: Some(self.save_total_limit),
            log_every: Some(self.log_every),
            on_nonfinite: Some(self.on_nonfinite),
            report_to: Some(self.report_to.name().into()),
            max_memory: self.max_memory.map(|b| b.to_string()),
            lora_r: self.lora.r,
            lora_alpha: self.lora.alpha,
            lora_dropout: self.lora.dropout,
            lora_targets: self.lora.targets.as_ref().and_then(|t| t.to_flag()).map(ListOrString::Text),
            use_rslora: self.lora.use_rslora,
            adapter: self.adapter.clone(),
            merge: Some(self.merge).filter(|&m| m),
            merge_dtype: self.merge_dtype.map(|d| d.name().into()),
            quantize: matches!(self.base_storage, Storage::Nf4 { .. }).then(|| "nf4".into()),
            double_quant: Some(true).filter(|_| self.base_storage == Storage::Nf4 { double_quant: true }),
            // A LoRA run records an f32 base too: a bf16 run's base would otherwise read back as bf16.
            base_dtype: match self.base_storage {
                Storage::Bf16 => Some("bf16".into()),
                Storage::F32 if self.is_lora() => Some("f32".into()),
                _ => None,
            },
            ..Default::default()
        };
        match &self.objective {
            Objective::Pairs(p) => {
                raw.loss = Some(ListOrString::List(p.losses.iter().map(|(k, _)| k.name().to_string()).collect()));
                raw.loss_weights = Some(ListOrString::List(p.losses.iter().map(|(_, w)| *w).collect()));
                let c = &p.cfg;
                raw.beta = Some(c.beta);
                raw.label_smoothing = Some(c.label_smoothing);
                raw.f_divergence = Some(c.f_divergence);
                raw.f_alpha = Some(c.f_alpha_divergence_coef);
                raw.simpo_gamma = Some(c.simpo_gamma);
                raw.discopop_tau = Some(c.discopop_tau);
                raw.alphapo_alpha = Some(c.alphapo_alpha);
                raw.reference_free = Some(c.reference_free);
            }
            Objective::Kto(k) => {
                raw.loss = Some(ListOrString::List(vec![k.loss_type.name().to_string()]));
                raw.beta = Some(k.beta);
                raw.desirable_weight = Some(k.desirable_weight);
                raw.undesirable_weight = Some(k.undesirable_weight);
            }
            Objective::Sft => {}
            Objective::Unlikelihood(u) => {
                raw.loss = Some(ListOrString::List(vec![UNLIKELIHOOD.to_string()]));
                raw.unlikelihood_alpha = Some(u.alpha);
            }
        }
        raw
    }
}
