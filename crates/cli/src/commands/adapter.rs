//! `--adapter DIR` of the commands that read a model: a PEFT LoRA adapter on `--model`, used as it is
//! (no merged copy on disk).

use std::path::{Path, PathBuf};

use anyhow::Context;
use engine::Adapter;

#[derive(clap::Args, Debug, Default)]
pub(super) struct AdapterFlag {
    /// A PEFT LoRA adapter on --model (a directory with adapter_config.json and adapter_model.safetensors,
    /// e.g. RUN/final of `dpo train --lora-r`, or the run directory itself), used without merging.
    #[arg(long, value_name = "DIR")]
    pub(super) adapter: Option<PathBuf>,
}

impl AdapterFlag {
    /// The adapter directory: DIR, or DIR/final when DIR is a run directory.
    fn dir(&self) -> Option<PathBuf> {
        let dir = self.adapter.as_ref()?;
        let fin = dir.join("final");
        let is_adapter = |d: &Path| d.join(hf::peft::CONFIG_FILE).is_file();
        Some(if !is_adapter(dir) && is_adapter(&fin) { fin } else { dir.clone() })
    }

    /// The adapter, read and checked against `model`.
    pub(super) fn load(&self, model: &hf::HfModel) -> anyhow::Result<Option<Adapter>> {
        let Some(dir) = self.dir() else { return Ok(None) };
        let read = hf::peft::load_adapter(&dir, &model.config)
            .with_context(|| format!("--adapter {} on --model {}", dir.display(), model.dir.display()))?;
        Ok(Some(read.adapter))
    }

    /// `model` with the adapter merged into its weights (what generation reads: no adapter work per token).
    pub(super) fn merged_into(&self, mut model: hf::HfModel) -> anyhow::Result<hf::HfModel> {
        if let Some(adapter) = self.load(&model)? {
            model.params = hf::peft::merged_params(&model.params, &adapter, &model.config)?;
        }
        Ok(model)
    }
}
