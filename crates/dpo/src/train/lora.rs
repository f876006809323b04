//! A LoRA run's adapter: where it comes from (new, as PEFT initialises one, or a PEFT adapter directory)
//! and what the reference reads, decided before any base weight is loaded.
//!
//! ```text
//! --lora-r R ...      PEFT LoraConfig from the flags -> targets on the model -> A Kaiming-uniform, B zero
//!                     reference: the base with the adapter off
//! --adapter DIR       adapter_config.json (a --lora-* flag that says otherwise is refused) + its weights
//!                     reference: the base with a frozen copy of that adapter (TRL's `ref` adapter)
//! ```

use engine::quant::Storage;
use engine::rng::Rng;
use engine::{Adapter, Decoder, Keep, ParamSet};

use super::config::{invalid, LoraFlags, TrainConfig, DEFAULT_LORA_ALPHA, DEFAULT_LORA_DROPOUT};
use super::memory::AdapterPlan;
use super::TrainError;

/// The adapter of a LoRA run, as configured.
#[derive(Clone, Debug)]
pub struct LoraRun {
    /// PEFT's configuration of the adapter (written to every checkpoint and to `final/`).
    pub config: hf::peft::LoraConfig,
    /// The adapter read from `--adapter`: where training starts, and what the reference keeps frozen.
    /// `None` for a new adapter (the reference is then the base alone).
    pub start: Option<Adapter>,
}

impl LoraRun {
    /// The run's adapter settings, or `None` for a run that trains every weight. With `--adapter`, the
    /// adapter is read (its weights too: they are small) and `cfg.lora` is filled with its settings so that
    /// config.toml records them; a `lora_*` setting that differs from the adapter's is refused.
    pub fn prepare(cfg: &mut TrainConfig, model: &hf::ModelConfig) -> Result<Option<Self>, TrainError> {
        if let Some(dir) = &cfg.adapter {
            let read = hf::peft::load_adapter(dir, model)?;
            if let Some((key, given, theirs)) = cfg.lora.conflict_with(&read.config) {
                let message = format!(
                    "{given} differs from the adapter's {theirs} ({}); a run from an adapter keeps its r, alpha, \
                     dropout and targets",
                    dir.join(hf::peft::CONFIG_FILE).display()
                );
                return Err(invalid(key, message).into());
            }
            cfg.lora = LoraFlags::of_adapter(&read.config);
            return Ok(Some(LoraRun { config: read.config, start: Some(read.adapter) }));
        }
        let Some(r) = cfg.lora.r else { return Ok(None) };
        let l = &cfg.lora;
        let config = hf::peft::fresh_config(
            r,
            l.alpha.unwrap_or(DEFAULT_LORA_ALPHA),
            l.dropout.unwrap_or(DEFAULT_LORA_DROPOUT) as f32,
            l.use_rslora.unwrap_or(false),
            &l.targets.clone().unwrap_or_default().names(),
            model,
        )?;
        Ok(Some(LoraRun { config, start: None }))
    }

    /// Where training starts: the adapter read, or a new one initialised as PEFT does (A Kaiming-uniform
    /// from the run's seed, B zero: the policy starts equal to the base).
    pub fn initial(&self, model: &hf::ModelConfig, seed: u64) -> Result<Adapter, TrainError> {
        if let Some(a) = &self.start {
            return Ok(a.clone());
        }
        let targets = hf::peft::resolve_targets(&self.config, model)?;
        let mut adapter = Adapter::zeros(&model.decoder, &targets, self.config.lora_dropout);
        adapter.init_peft(&mut Rng::new(seed));
        Ok(adapter)
    }

    /// The adapter's size and activations, for the memory estimate. `lookups`: in a bf16 run, the data's
    /// distinct tokens, whose embeddings alone the base keeps (its head in bf16).
    pub fn plan(
        &self,
        model: &hf::ModelConfig,
        cfg: &TrainConfig,
        lookups: Option<u64>,
    ) -> Result<AdapterPlan, TrainError> {
        let targets = hf::peft::resolve_targets(&self.config, model)?;
        let shape = Adapter::zeros(&model.decoder, &targets, self.config.lora_dropout);
        let decoder = Decoder::new(model.decoder.clone());
        let keep = Keep::for_backward(cfg.gradient_checkpointing);
        let mut kept = decoder.adapter_activation_floats_per_token(&shape, keep);
        // The reference's pass through the frozen starting adapter.
        if self.start.is_some() && cfg.ref_model.is_none() {
            kept += decoder.adapter_activation_floats_per_token(&shape, Keep::None);
        }
        let params = ParamSet::numel(&shape) as u64;
        let stored = cfg.base_storage != Storage::F32 || lookups.is_some();
        Ok(AdapterPlan {
            params,
            kept_per_token: kept,
            frozen_copy: self.start.is_some() && cfg.ref_model.is_none(),
            merge: cfg.merge.then(|| hf::merge_transient_bytes(model)),
            reference_model: cfg.ref_model.is_some(),
            base_bytes: stored.then(|| super::memory::frozen_model_bytes(&model.decoder, cfg.base_storage, lookups)),
            load_bytes: stored.then(|| {
                let transient = hf::load_transient_bytes(model);
                super::memory::load_bytes(&model.decoder, cfg.base_storage, lookups, transient)
            }),
        })
    }
}
