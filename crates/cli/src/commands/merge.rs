//! `dpo merge`: a PEFT LoRA adapter merged into its base, written as a Hugging Face model directory that
//! loads without PEFT (PEFT's `merge_and_unload` + `save_pretrained`).

use std::path::PathBuf;

use anyhow::{bail, Context};

use super::adapter::AdapterFlag;
use super::hints::{output_hint, room_hint};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The base model the adapter was trained on (Hugging Face directory), read in f32: an adapter trained
    /// with --quantize nf4 or --base-dtype bf16 is merged into these f32 weights, not into dequantised ones.
    #[arg(long, value_parser = super::source::model_arg)]
    model: PathBuf,
    #[command(flatten)]
    adapter: AdapterFlag,
    /// Where to write the merged model; written completely under a temporary name, then renamed into place.
    /// Never --model's or --adapter's directory, nor one inside or holding them.
    #[arg(long)]
    output: PathBuf,
    /// Replace --output when it already holds a model (config.json or *.safetensors); without it such a
    /// directory is refused and left as it is.
    #[arg(long)]
    overwrite: bool,
    /// The merged weights' dtype: f32, bf16 or f16 (each value rounded to the nearest, ties to even, as
    /// PyTorch's `.to()`); config.json names it. Default: the one --model is stored in, as PEFT's
    /// `merge_and_unload` keeps it (bf16 for most published checkpoints: an 8B model takes 16 GB, not 32).
    #[arg(long, value_parser = ["f32", "bf16", "f16"])]
    dtype: Option<String>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.adapter.adapter.is_none() {
        bail!("--adapter DIR is required: the PEFT adapter to merge into --model");
    }
    // Checked before anything is read: the base and the adapter are never written over.
    let adapter_dir = a.adapter.dir().unwrap_or_default();
    let inputs = [("--model", a.model.as_path()), ("--adapter", adapter_dir.as_path())];
    hf::output::check_dir(&a.output, &inputs, a.overwrite).map_err(|e| output_hint(e, "--output"))?;
    let config = hf::load_config(&a.model)?;
    let Some(adapter) = a.adapter.load(&config, &a.model)? else { bail!("--adapter DIR is required") };
    // The base is read a block of the file at a time as the merged file is written, never whole.
    let base = hf::peft::MergeBase::Dir(&a.model);
    let dtype = match a.dtype.as_deref().and_then(hf::safetensors::WriteDtype::parse) {
        Some(dtype) => dtype,
        None => hf::stored_dtype(&a.model)?,
    };
    hf::peft::save_merged(&a.output, base, &adapter, dtype)
        .map_err(|e| room_hint(e, "choose another --output (or a smaller --dtype)"))
        .with_context(|| format!("writing {}", a.output.display()))?;
    let pairs: usize = adapter.layers.iter().map(|l| l.pairs.len()).sum();
    eprintln!(
        "merged {pairs} adapter pairs with base {} (left as it is); written to {} in {}",
        a.model.display(),
        a.output.display(),
        dtype.name()
    );
    Ok(())
}
