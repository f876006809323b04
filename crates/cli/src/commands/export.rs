//! `dpo export`: a model (with a LoRA adapter merged in, if given) as a GGUF file for llama.cpp / Ollama,
//! with its tokenizer and chat template in the metadata.

use std::path::PathBuf;

use anyhow::Context;
use hf::gguf::GgufDtype;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The Hugging Face model directory (Llama, Mistral, SmolLM2, Qwen2 or GPT-2), read in f32.
    #[arg(long, value_parser = super::source::model_arg)]
    model: PathBuf,
    #[command(flatten)]
    adapter: super::adapter::AdapterFlag,
    /// The GGUF file to write (atomically: the complete file or none). Never one of --model's or
    /// --adapter's own files (config, weights, tokenizer); a new file beside them is fine.
    #[arg(long, value_name = "OUT.gguf")]
    gguf: PathBuf,
    /// Replace --gguf when the file already exists; without it an existing file is refused and left as it is.
    #[arg(long)]
    overwrite: bool,
    /// Type of the 2-D weights; norms and biases stay f32. q8_0 falls back to f16 for rows whose length is
    /// not a multiple of 32.
    #[arg(long, default_value = "f16", value_parser = ["f32", "f16", "bf16", "q8_0"])]
    dtype: String,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let dtype = match a.dtype.as_str() {
        "f32" => GgufDtype::F32,
        "bf16" => GgufDtype::Bf16,
        "q8_0" => GgufDtype::Q8_0,
        _ => GgufDtype::F16,
    };
    // Checked before anything is read: no file of the model or the adapter is written over.
    let adapter_dir = a.adapter.dir();
    let mut inputs = vec![("--model", a.model.as_path())];
    inputs.extend(adapter_dir.as_deref().map(|d| ("--adapter", d)));
    hf::output::check_file(&a.gguf, &inputs, a.overwrite).map_err(|e| super::hints::output_hint(e, "--gguf"))?;
    if a.model.join(dpo::rlhf::reward::HEAD_FILE).is_file() {
        eprintln!(
            "note: {} is a reward model; GGUF holds its language model alone, without the reward head ({})",
            a.model.display(),
            dpo::rlhf::reward::HEAD_FILE
        );
    }
    // The base is read a block at a time as the file is written (the adapter merged into each), never
    // whole.
    let config = hf::load_config(&a.model)?;
    let adapter = a.adapter.load(&config, &a.model)?;
    let model = hf::peft::MergedModel::new(hf::peft::MergeBase::Dir(&a.model), adapter.as_ref())?;
    let tok = hf::load_tokenizer(&a.model)?;
    let done = hf::gguf::export_gguf(&a.gguf, &model, &tok, dtype)
        .map_err(|e| super::hints::room_hint(e, "choose another --gguf (or a smaller --dtype)"))
        .with_context(|| format!("exporting {} to {}", a.model.display(), a.gguf.display()))?;
    let merged = a.adapter.adapter.as_ref().map(|d| format!(" with {} merged", d.display())).unwrap_or_default();
    eprintln!(
        "wrote {} ({} MB): llama.cpp architecture `{}`, {} tensors ({}), {} metadata keys; from {}{merged}",
        a.gguf.display(),
        done.bytes / 1_000_000,
        done.architecture,
        done.tensors,
        a.dtype,
        done.metadata,
        a.model.display()
    );
    Ok(())
}
