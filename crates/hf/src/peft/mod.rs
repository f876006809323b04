//! PEFT LoRA adapter directories (`adapter_config.json` + `adapter_model.safetensors`) ↔ the engine's
//! [`Adapter`], and merged models.
//!
//! - [`config`]: the configuration file: what is read, what is refused, what is written.
//! - [`targets`]: PEFT's rules for which modules a configuration selects, resolved on the model's naming
//!   row into [`engine::LoraTarget`]s (fused weight, rows, rank, scale); a new adapter's configuration
//!   from command-line input.
//! - [`tensors`]: the weights file, PEFT's tensor names and layouts.
//!
//! What is saved loads with `PeftModel.from_pretrained(base, dir)` (PEFT 0.21), and an adapter read and
//! saved again has the same tensor names and bits.

use std::path::{Path, PathBuf};

use engine::quant::FrozenLinears;
use engine::{Adapter, Params, Site};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model_dir::{load_config, write_dir, write_model_dir, HfModel};
use crate::naming::Entry;
use crate::safetensors::Checkpoint;
use crate::safetensors::{write_f32, WriteDtype};
use crate::weights::{check_names, check_params, read_entry, read_part, write_weights_with, EngineTensors};

pub mod config;
pub mod targets;
pub mod tensors;

pub use config::{LoraConfig, LoraInit, TargetModules, CONFIG_FILE, WEIGHTS_FILE};
pub use targets::{fresh_config, resolve_targets};

/// A PEFT adapter as read: its configuration and its weights.
#[derive(Clone, Debug)]
pub struct PeftAdapter {
    pub config: LoraConfig,
    pub adapter: Adapter,
}

/// Reads the PEFT LoRA adapter in `dir` for `model`: the configuration is checked, its targets resolved
/// on the model, and the weights file must hold exactly their pairs at their shapes.
pub fn load_adapter(dir: &Path, model: &ModelConfig) -> Result<PeftAdapter> {
    if !dir.is_dir() {
        return Err(Error::dir(dir, "is not a directory; pass a PEFT adapter directory (holding adapter_config.json)"));
    }
    let config_path = dir.join(CONFIG_FILE);
    if !config_path.is_file() {
        return Err(Error::dir(dir, "no adapter_config.json; this is not a PEFT adapter directory"));
    }
    let config = LoraConfig::read(&config_path)?;
    let weights = dir.join(WEIGHTS_FILE);
    if !weights.is_file() {
        let msg = if dir.join("adapter_model.bin").is_file() {
            "only adapter_model.bin (pickle) found; pickle files are not loaded (they can run code). Save the \
             adapter with safe_serialization=True"
        } else {
            "no adapter_model.safetensors"
        };
        return Err(Error::dir(dir, msg));
    }
    let targets = resolve_targets(&config, model)?;
    let adapter = tensors::adapter_from_file(&weights, &targets, model, config.lora_dropout)?;
    Ok(PeftAdapter { config, adapter })
}

/// Writes `adapter` as a PEFT adapter directory `dir` (atomically: the complete new directory or the old
/// one). `config` must select exactly the adapter's modules, ranks and scales on `model` (it does for a
/// configuration the adapter was loaded or built from); its `lora_dropout` is written as the adapter's.
pub fn save_adapter(dir: &Path, config: &LoraConfig, adapter: &Adapter, model: &ModelConfig) -> Result<()> {
    tensors::check_adapter(adapter, model)
        .map_err(|p| Error::dir(dir, format!("the adapter does not fit the model: {}", p.join("; "))))?;
    let selected = resolve_targets(config, model)?;
    for (layer, (want, la)) in selected.iter().zip(&adapter.layers).enumerate() {
        let same = want.len() == la.pairs.len() && want.iter().all(|t| la.pairs.iter().any(|p| &p.target == t));
        if !same {
            let have: Vec<String> = la
                .pairs
                .iter()
                .map(|p| format!("{} (r {}, scale {})", p.target.module, p.target.r, p.target.scale))
                .collect();
            let want: Vec<String> =
                want.iter().map(|t| format!("{} (r {}, scale {})", t.module, t.r, t.scale)).collect();
            return Err(Error::dir(
                dir,
                format!(
                    "layer {layer}: the adapter has [{}] but its configuration selects [{}]; PEFT would not load it",
                    have.join(", "),
                    want.join(", ")
                ),
            ));
        }
    }
    let json = config.to_json_text(adapter.dropout);
    let tensors = tensors::adapter_tensors(adapter, model);
    write_dir(dir, CONFIG_FILE, |tmp| {
        let path = tmp.join(CONFIG_FILE);
        std::fs::write(&path, json).map_err(|e| Error::io(&path, e))?;
        write_f32(&tmp.join(WEIGHTS_FILE), &tensors)
    })
}

/// The base weights with `adapter` merged in (PEFT's `merge_and_unload`).
pub fn merged_params(base: &Params, adapter: &Adapter, model: &ModelConfig) -> Result<Params> {
    let mut merged = base.clone();
    merge_in_place(&mut merged, adapter, model)?;
    Ok(merged)
}

/// [`merged_params`] written over `params` itself: a model loaded only to be merged (and generated with,
/// or exported) is never held twice.
pub fn merge_in_place(params: &mut Params, adapter: &Adapter, model: &ModelConfig) -> Result<()> {
    check_fits(adapter, model)?;
    adapter.merge_into(params);
    Ok(())
}

/// The base a merged model is written from ([`save_merged`]).
#[derive(Clone, Copy)]
pub enum MergeBase<'a> {
    /// Held in f32 already (a full-precision LoRA run's base).
    Loaded(&'a HfModel),
    /// The model directory, read a block at a time (`dpo merge`, a run whose base is stored below f32).
    Dir(&'a Path),
}

/// A base with an adapter merged in (or none), as writing or exporting a merged model reads it
/// ([`EngineTensors`]): a tensor whose layout is the engine's a block of rows at a time (read from the
/// base's file, or borrowed from the base in memory, the adapter's rows added to a copy of the block), a
/// converted one whole. Neither the base nor the merged model is ever held whole beyond what `base`
/// already holds (`crate::merge_transient_bytes`: a few blocks of the file for Llama-like models).
pub struct MergedModel<'a> {
    pub config: ModelConfig,
    /// The base's directory (its tokenizer files and chat template go with the merged model).
    pub dir: PathBuf,
    base: Source<'a>,
    adapter: Option<&'a Adapter>,
}

enum Source<'a> {
    Loaded(&'a Params),
    File(Checkpoint),
}

/// Values a merged block holds at most (whole rows of a tensor in memory are copied this many at a time).
const MERGE_BLOCK: usize = 1 << 20;

impl<'a> MergedModel<'a> {
    /// `base` with `adapter` merged in; the adapter must fit the base, and a base read from its directory
    /// must hold every tensor at its shape (checked from the header, before anything is written).
    pub fn new(base: MergeBase<'a>, adapter: Option<&'a Adapter>) -> Result<Self> {
        let (config, dir, base) = match base {
            MergeBase::Loaded(model) => {
                check_params(&model.config, &model.params).map_err(|m| {
                    Error::dir(&model.dir, format!("internal: parameters do not match the model config: {m}"))
                })?;
                (model.config.clone(), model.dir.clone(), Source::Loaded(&model.params))
            }
            MergeBase::Dir(dir) => {
                let config = load_config(dir)?;
                let ckpt = Checkpoint::open_dir(dir)?;
                check_names(&ckpt, &config)?;
                (config, dir.to_path_buf(), Source::File(ckpt))
            }
        };
        if let Some(adapter) = adapter {
            check_fits(adapter, &config)?;
        }
        Ok(MergedModel { config, dir, base, adapter })
    }

    /// The base's engine tensor of `entry`, in memory.
    fn loaded<'p>(&self, params: &'p Params, entry: &Entry) -> Result<&'p [f32]> {
        let named = params.named();
        let t = named.iter().find(|(n, _)| *n == entry.engine).map(|(_, t)| &t.data[..]);
        t.ok_or_else(|| Error::dir(&self.dir, format!("internal: no engine tensor `{}`", entry.engine)))
    }

    /// The adapter's linear of `entry`, if the adapter changes it.
    fn merged_site(&self, entry: &Entry) -> Option<(&'a Adapter, usize, Site)> {
        let adapter = self.adapter?;
        let (layer, site) = FrozenLinears::linear_of(&entry.engine)?;
        adapter.touches(layer, site).then_some((adapter, layer, site))
    }
}

impl EngineTensors for MergedModel<'_> {
    fn whole(&self, entry: &Entry) -> Result<Vec<f32>> {
        let mut values = match &self.base {
            Source::Loaded(params) => self.loaded(params, entry)?.to_vec(),
            Source::File(ckpt) => read_entry(ckpt, &self.config, entry)?,
        };
        if let Some((adapter, layer, site)) = self.merged_site(entry) {
            adapter.merge_site(layer, site, &mut values);
        }
        Ok(values)
    }

    fn blocks(
        &self,
        entry: &Entry,
        part: usize,
        first: usize,
        out: &mut dyn FnMut(&[f32]) -> Result<()>,
    ) -> Result<()> {
        let shape = &entry.hf[part].1;
        let row: usize = shape.iter().skip(1).product();
        let merge = self.merged_site(entry);
        // A block of whole rows starting at row `at` of the part, with the adapter's rows added.
        let mut at = 0;
        let mut merged = Vec::new();
        let mut put = |block: &[f32]| -> Result<()> {
            let rows = block.len() / row.max(1);
            let result = match merge {
                Some((adapter, layer, site)) => {
                    merged.clear();
                    merged.extend_from_slice(block);
                    adapter.merge_site_rows(layer, site, first + at, &mut merged);
                    out(&merged)
                }
                None => out(block),
            };
            at += rows;
            result
        };
        match &self.base {
            Source::Loaded(params) => {
                let start = first * row;
                let data = &self.loaded(params, entry)?[start..start + shape.iter().product::<usize>()];
                let rows_at_once = (MERGE_BLOCK / row.max(1)).max(1);
                data.chunks(rows_at_once * row.max(1)).try_for_each(&mut put)
            }
            Source::File(ckpt) => read_part(ckpt, &self.config, entry, part, put),
        }
    }
}

/// Writes `base` with `adapter` merged in as a model directory `out` (config, weights, tokenizer files
/// from the base's directory) that transformers loads without PEFT, its weights in `dtype`: in f32 the
/// bytes [`crate::save_model`] writes for [`merged_params`]; made a block at a time ([`MergedModel`]).
/// Refused before anything is written when `out`'s file system has too little room for the weights.
pub fn save_merged(out: &Path, base: MergeBase<'_>, adapter: &Adapter, dtype: WriteDtype) -> Result<()> {
    let model = MergedModel::new(base, Some(adapter))?;
    crate::output::check_room(out, "the merged model", crate::weights_bytes(&model.config, dtype))?;
    write_model_dir(out, &model.config, Some(&model.dir), dtype, |path| {
        write_weights_with(path, &model.config, dtype, &model)
    })
}

fn check_fits(adapter: &Adapter, model: &ModelConfig) -> Result<()> {
    tensors::check_adapter(adapter, model)
        .map_err(|p| Error::dir(&model.path, format!("the adapter does not fit this model: {}", p.join("; "))))
}
