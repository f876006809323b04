//! `dpo logps`: the engine's log-probs on a preference file, one JSON line per row.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use dpo::data::{load_pairs, DataOptions, Packing};
use dpo::scoring::score_pairs;
use engine::Decoder;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Hugging Face model directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Preference rows: JSONL or JSON with `prompt`/`chosen`/`rejected` (text or chat messages) or
    /// `prompt_ids`/`chosen_ids`/`rejected_ids`.
    #[arg(long)]
    data: PathBuf,
    /// Write the JSON lines here (atomically) instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Pairs per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Score prompt+chosen and prompt+rejected as separate sequences instead of sharing the prompt
    /// (same numbers, more work; for checking).
    #[arg(long)]
    no_prefix_sharing: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let model = hf::load_model(&a.model)?;
    let tok = hf::load_tokenizer_if_present(&a.model)?;
    let loaded = load_pairs(&a.data, tok.as_ref(), &DataOptions::default())?;
    dpo::data::check_vocab(&a.data, &loaded.examples, model.config.decoder.vocab_size)?;
    let (examples, stats) = (loaded.examples, loaded.stats);
    if stats.prompt_not_prefix > 0 {
        eprintln!(
            "warning: in {} of {} rows the tokenized prompt is not a prefix of prompt+completion; \
             their completions start where the token lists diverge",
            stats.prompt_not_prefix,
            examples.len()
        );
    }
    let decoder = Decoder::new(model.config.decoder.clone());
    let packing = if a.no_prefix_sharing { Packing::Separate } else { Packing::SharedPrompt };
    let scores = score_pairs(&decoder, &model.params, &examples, packing, a.batch_size, |_| {})
        .with_context(|| format!("scoring {}", a.data.display()))?;
    let bad: Vec<&str> = scores
        .iter()
        .zip(&examples)
        .filter(|(s, _)| !(s.chosen_logps.is_finite() && s.rejected_logps.is_finite()))
        .map(|(_, e)| e.location.as_str())
        .collect();
    if !bad.is_empty() {
        eprintln!(
            "warning: {} of {} rows have a log-prob that is not finite (written as null): {}; the model's \
             weights overflow on them",
            bad.len(),
            examples.len(),
            bad.join(", ")
        );
    }
    let mut text = String::new();
    for s in &scores {
        text.push_str(&serde_json::to_string(s)?);
        text.push('\n');
    }
    match &a.out {
        Some(path) => {
            dpo::io::write_atomic(path, text.as_bytes()).with_context(|| format!("writing {}", path.display()))?
        }
        None => std::io::stdout().lock().write_all(text.as_bytes())?,
    }
    Ok(())
}
