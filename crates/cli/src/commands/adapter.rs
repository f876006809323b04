//! `--adapter DIR` of the commands that read a model: a PEFT LoRA adapter on `--model`, used as it is
//! (no merged copy on disk).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::Context;
use engine::kernels::Precision;
use engine::model::Model;
use engine::quant::{FrozenEmbedding, FrozenLinears, Storage};
use engine::Adapter;

#[derive(clap::Args, Debug, Default)]
pub(super) struct AdapterFlag {
    /// A PEFT LoRA adapter on --model: a directory with adapter_config.json and adapter_model.safetensors
    /// (e.g. RUN/final of `dpo train --lora-r`, or the run directory itself); read, never modified.
    #[arg(long, value_parser = super::source::model_arg, value_name = "DIR")]
    pub(super) adapter: Option<PathBuf>,
}

impl AdapterFlag {
    /// The adapter directory: DIR, or DIR/final when DIR is a run directory.
    pub(super) fn dir(&self) -> Option<PathBuf> {
        let dir = self.adapter.as_ref()?;
        let fin = dir.join("final");
        let is_adapter = |d: &Path| d.join(hf::peft::CONFIG_FILE).is_file();
        Some(if !is_adapter(dir) && is_adapter(&fin) { fin } else { dir.clone() })
    }

    /// The adapter, read and checked against the model of `config` in `model_dir`.
    pub(super) fn load(&self, config: &hf::ModelConfig, model_dir: &Path) -> anyhow::Result<Option<Adapter>> {
        let Some(dir) = self.dir() else { return Ok(None) };
        let read = hf::peft::load_adapter(&dir, config)
            .with_context(|| format!("--adapter {} on --model {}", dir.display(), model_dir.display()))?;
        Ok(Some(read.adapter))
    }

    /// `model` with the adapter merged into its weights (what generation reads: no adapter work per token).
    pub(super) fn merged_into(&self, mut model: hf::HfModel) -> anyhow::Result<hf::HfModel> {
        if let Some(adapter) = self.load(&model.config, &model.dir)? {
            hf::peft::merge_in_place(&mut model.params, &adapter, &model.config)?;
        }
        Ok(model)
    }
}

/// `--quantize nf4 [--double-quant]` / `--base-dtype` of the commands that score or generate with an
/// `--adapter`: read --model as a QLoRA run holds its frozen base (block linears stored as they are read).
#[derive(clap::Args, Debug, Default)]
pub(super) struct StoredBaseFlags {
    /// With --adapter: store --model's block linears in 4-bit NF4 as they are read, as `dpo train
    /// --quantize nf4` held its base (scores and completions then match the QLoRA run's, not the f32
    /// base's; the adapter is applied beside the stored weights, never merged into them).
    #[arg(long, value_parser = ["nf4"], requires = "adapter")]
    quantize: Option<String>,
    /// With --quantize nf4: quantise the absmax scales too (bitsandbytes' double quantisation).
    #[arg(long, requires = "quantize")]
    double_quant: bool,
    /// With --adapter: store --model's block linears in this dtype [default: f32; when scoring (logps,
    /// eval, reward) with --precision bf16, bf16, whose products round them to bf16 anyway; when sampling
    /// (generate, best-of-n, win-rate), the checkpoint's own: a bf16 checkpoint's linears stay bf16 with
    /// the adapter beside them, and an adapter on an f32 base is merged into it].
    #[arg(long, value_parser = ["f32", "bf16"], value_name = "DTYPE", requires = "adapter", conflicts_with = "quantize")]
    base_dtype: Option<String>,
}

impl StoredBaseFlags {
    /// How the base's block linears are held for passes in `precision`. Under an adapter, a bf16 pass
    /// rounds them to bf16 anyway, so they are stored so unless the flags say otherwise, as `dpo train`
    /// holds a LoRA base (`TrainConfig::base_storage`).
    fn storage(&self, with_adapter: bool, precision: Precision) -> Storage {
        match (self.quantize.is_some(), self.base_dtype.as_deref()) {
            (true, _) => Storage::Nf4 { double_quant: self.double_quant },
            (false, Some("bf16")) => Storage::Bf16,
            (false, Some(_)) => Storage::F32,
            (false, None) if with_adapter && precision == Precision::Bf16 => Storage::Bf16,
            (false, None) => Storage::F32,
        }
    }

    /// The storage the flags name themselves (`--quantize nf4`, `--base-dtype`), with no default from the
    /// precision: `dpo generate` keeps its f32 base (and merges the adapter into it) unless told.
    pub(super) fn explicit_storage(&self) -> Option<Storage> {
        (self.quantize.is_some() || self.base_dtype.is_some()).then(|| self.storage(true, Precision::F32))
    }

    /// `dir`'s configuration, to be read as the flags say for passes in `precision` with `adapter` on
    /// it ([`BaseToRead::read`], once the data it scores is known).
    pub(super) fn prepare(
        &self,
        dir: &Path,
        adapter: &AdapterFlag,
        precision: Precision,
    ) -> anyhow::Result<BaseToRead> {
        let with_adapter = adapter.adapter.is_some();
        Ok(BaseToRead {
            config: hf::load_config(dir)?,
            dir: dir.to_path_buf(),
            storage: self.storage(with_adapter, precision),
            // Under an adapter a bf16 pass reads the embedding's rows in f32 and the head in bf16.
            frozen_tables: with_adapter && precision == Precision::Bf16,
            precision,
        })
    }
}

/// The base a scoring command reads, its configuration read and its weights not yet: the command reads
/// its data first (checking it against the configuration), then the weights, held as `dpo train` holds a
/// LoRA base: the block linears stored ([`StoredBaseFlags`]) and, in a bf16 pass under an adapter, the
/// embedding and head as a [`FrozenEmbedding`] for the data's tokens, each made as the file is read.
pub(super) struct BaseToRead {
    pub(super) config: hf::ModelConfig,
    pub(super) dir: PathBuf,
    storage: Storage,
    frozen_tables: bool,
    precision: Precision,
}

impl BaseToRead {
    /// Reads the weights; `tokens` (the data's) are the embedding rows kept where the tables are frozen.
    pub(super) fn read(self, tokens: impl FnOnce() -> BTreeSet<u32>) -> anyhow::Result<ScoredBase> {
        let (model, linears, tables) = match (self.storage, self.frozen_tables) {
            (Storage::F32, false) => (hf::load_model(&self.dir)?, None, None),
            (Storage::F32, true) => {
                let (model, tables) = hf::load_with_frozen_tables(&self.dir, &tokens())?;
                (model, None, Some(tables))
            }
            (s, false) => {
                let (model, linears) = hf::load_model_stored(&self.dir, s)?;
                (model, Some(linears), None)
            }
            (s, true) => {
                let (model, linears, tables) = hf::load_frozen_base(&self.dir, s, &tokens())?;
                (model, Some(linears), Some(tables))
            }
        };
        Ok(ScoredBase { model, linears, tables, precision: self.precision })
    }
}

/// The base a scoring command reads ([`BaseToRead::read`]).
pub(super) struct ScoredBase {
    pub(super) model: hf::HfModel,
    linears: Option<FrozenLinears>,
    tables: Option<FrozenEmbedding>,
    precision: Precision,
}

impl ScoredBase {
    /// The base with `adapter` on it, as the passes read it.
    pub(super) fn view<'a>(&'a self, adapter: Option<&'a Adapter>) -> Model<'a> {
        let m = dpo::train::setup::base_model(&self.model, self.linears.as_ref(), adapter, self.precision);
        match &self.tables {
            Some(e) => m.with_embedding(e),
            None => m,
        }
    }
}

/// A model to sample from (`dpo generate`, `dpo best-of-n`, `dpo win-rate`, whose judge scores with it
/// too). A checkpoint stored in bf16
/// is held in bf16 (block linears, embedding and head: their values widen to f32 exactly, so the tokens
/// are those of its f32 copy, in half the memory, and decoding reads half the bytes); with `--quantize`
/// or `--base-dtype`, the block linears are stored as the QLoRA run held them. An adapter is applied
/// beside stored linears (a stored weight cannot be merged into) and merged into f32 ones.
pub(super) struct SampledModel {
    pub(super) model: hf::HfModel,
    linears: Option<FrozenLinears>,
    /// A bf16 checkpoint's embedding and head, whole.
    tables: Option<FrozenEmbedding>,
    adapter: Option<Adapter>,
    /// An adapter is merged into `model`'s weights.
    merged: bool,
}

impl SampledModel {
    pub(super) fn load(dir: &Path, adapter: &AdapterFlag, stored: &StoredBaseFlags) -> anyhow::Result<Self> {
        let bf16 = hf::stored_dtype(dir)? == hf::safetensors::WriteDtype::Bf16;
        let (model, linears, tables) = match (stored.explicit_storage(), bf16) {
            (storage, true) => {
                let (model, linears, tables) = hf::load_with_bf16_tables(dir, storage.unwrap_or(Storage::Bf16))?;
                (model, linears, Some(tables))
            }
            (Some(storage), false) => {
                let (model, linears) = hf::load_model_stored(dir, storage)?;
                (model, linears, None)
            }
            (None, false) => {
                let model = adapter.merged_into(hf::load_model(dir)?)?;
                let merged = adapter.adapter.is_some();
                return Ok(SampledModel { model, linears: None, tables: None, adapter: None, merged });
            }
        };
        let adapter = adapter.load(&model.config, dir)?;
        Ok(SampledModel { model, linears: Some(linears), tables, adapter, merged: false })
    }

    /// `dir` without an adapter or storage flags: a bf16 checkpoint in bf16, another in f32 (`win-rate`'s
    /// `--against` model and `--judge-implicit` pair).
    pub(super) fn load_alone(dir: &Path) -> anyhow::Result<Self> {
        Self::load(dir, &AdapterFlag::default(), &StoredBaseFlags::default())
    }

    /// The model as the passes read it, the products in `precision`.
    pub(super) fn view(&self, precision: Precision) -> Model<'_> {
        self.with_tables(dpo::train::setup::base_model(
            &self.model,
            self.linears.as_ref(),
            self.adapter.as_ref(),
            precision,
        ))
    }

    /// The base alone as the passes read it (a QLoRA run's reference: the stored base, its adapter off),
    /// where the adapter is applied beside it or there is none; `None` where it is merged into the weights.
    pub(super) fn base_view(&self, precision: Precision) -> Option<Model<'_>> {
        (!self.merged).then(|| {
            self.with_tables(dpo::train::setup::base_model(&self.model, self.linears.as_ref(), None, precision))
        })
    }

    fn with_tables<'a>(&'a self, m: Model<'a>) -> Model<'a> {
        match &self.tables {
            Some(e) => m.with_embedding(e),
            None => m,
        }
    }
}
