//! `dpo merge`: a PEFT LoRA adapter merged into its base, written as a Hugging Face model directory that
//! loads without PEFT (PEFT's `merge_and_unload` + `save_pretrained`).

use std::path::PathBuf;

use anyhow::{bail, Context};

use super::adapter::AdapterFlag;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The base model the adapter was trained on (Hugging Face directory), read in f32: an adapter trained
    /// with --quantize nf4 or --base-dtype bf16 is merged into these f32 weights, not into dequantised ones.
    #[arg(long, value_parser = super::source::model_arg)]
    model: PathBuf,
    #[command(flatten)]
    adapter: AdapterFlag,
    /// Where to write the merged model; written completely under a temporary name, then renamed into place.
    #[arg(long)]
    output: PathBuf,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.adapter.adapter.is_none() {
        bail!("--adapter DIR is required: the PEFT adapter to merge into --model");
    }
    let base = hf::load_model(&a.model)?;
    let Some(adapter) = a.adapter.load(&base)? else { bail!("--adapter DIR is required") };
    hf::peft::save_merged(&a.output, &base, &adapter).with_context(|| format!("writing {}", a.output.display()))?;
    let pairs: usize = adapter.layers.iter().map(|l| l.pairs.len()).sum();
    eprintln!("merged {pairs} adapter pairs into {}; written to {}", a.model.display(), a.output.display());
    Ok(())
}
