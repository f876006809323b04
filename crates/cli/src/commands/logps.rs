//! `dpo logps`: the engine's log-probs on a preference file, one JSON line per row.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use dpo::data::{check_positions, load_pairs, DataError, DataOptions, Example, Packing, Truncation};
use dpo::scoring::score_pairs;
use dpo::train::reference::pair_tokens;
use engine::{Decoder, DecoderConfig};

use super::progress::Progress;

/// Length limits of the rows, shared by `dpo logps`, `dpo eval` and `dpo reward`.
#[derive(clap::Args, Debug)]
pub(super) struct TruncationFlags {
    /// Longest prompt+completion in tokens; longer sequences are truncated as --truncation says. Default:
    /// none, every row scored whole, and a row longer than a model with learned positions (GPT-2) can read
    /// is refused before scoring, naming its file and line.
    #[arg(long)]
    max_length: Option<usize>,
    /// Longest prompt in tokens (keeping its end, the tokens nearest the completion).
    #[arg(long)]
    max_prompt_length: Option<usize>,
    /// Which part of a sequence longer than --max-length is kept: keep-start (TRL's default) or keep-end.
    #[arg(long, default_value = "keep-start")]
    truncation: Truncation,
    #[command(flatten)]
    source: super::source::SplitFlags,
}

impl TruncationFlags {
    /// Resolves `data` (`--split`, `--subset`), then reads, tokenizes and truncates its pairs for the models `models` (the policy first, then
    /// any reference): refuses token ids outside the policy's vocabulary and rows longer than any model's
    /// learned positions, and warns about dropped rows and prompts that are not a prefix, naming them.
    pub(super) fn load_pairs(
        &self,
        data: &Path,
        tok: Option<&hf::Tokenizer>,
        models: &[&DecoderConfig],
    ) -> anyhow::Result<Vec<Example>> {
        let opts = DataOptions {
            max_length: self.max_length,
            max_prompt_length: self.max_prompt_length,
            truncation: self.truncation,
            skip_bad_rows: false,
        };
        let data = &self.source.data(data)?;
        let loaded = load_pairs(data, tok, &opts)?;
        for w in loaded.stats.warnings() {
            eprintln!("warning: {}: {w}", data.display());
        }
        dpo::data::check_vocab(data, &loaded.examples, models[0].vocab_size)?;
        check_positions(data, &loaded.examples, models).map_err(|e| match e {
            DataError::TooLong { max, .. } => {
                anyhow!("{e}: pass --max-length {max} (with --truncation keep-end to keep the ends)")
            }
            e => e.into(),
        })?;
        Ok(loaded.examples)
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Hugging Face model directory (config.json, model.safetensors, tokenizer.json), or a hub id
    /// org/name[@revision] in the local Hugging Face cache.
    #[arg(long, value_parser = super::source::model_arg)]
    model: PathBuf,
    #[command(flatten)]
    adapter: super::adapter::AdapterFlag,
    #[command(flatten)]
    stored_base: super::adapter::StoredBaseFlags,
    /// Preference rows: JSONL, JSON, Parquet or Arrow with `prompt`/`chosen`/`rejected` (text or chat
    /// messages) or `prompt_ids`/`chosen_ids`/`rejected_ids`; or a dataset (hub id, save_to_disk directory).
    #[arg(long)]
    data: PathBuf,
    /// Write the JSON lines here (atomically) instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Pairs per forward pass.
    #[arg(long, default_value_t = 8, value_parser = super::at_least_one)]
    batch_size: usize,
    #[command(flatten)]
    truncation: TruncationFlags,
    /// Score prompt+chosen and prompt+rejected as separate sequences instead of sharing the prompt
    /// (same numbers, more work; for checking).
    #[arg(long)]
    no_prefix_sharing: bool,
    #[command(flatten)]
    precision: super::precision::PrecisionFlag,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let base = a.stored_base.prepare(&a.model, &a.adapter, a.precision.get())?;
    let adapter = a.adapter.load(&base.config, &a.model)?;
    let tok = hf::load_tokenizer_if_present(&a.model)?;
    let examples = a.truncation.load_pairs(&a.data, tok.as_ref(), &[&base.config.decoder])?;
    let base = base.read(|| pair_tokens(examples.iter()))?;
    let decoder = Decoder::new(base.model.config.decoder.clone());
    let packing = if a.no_prefix_sharing { Packing::Separate } else { Packing::SharedPrompt };
    let policy = base.view(adapter.as_ref());
    let mut progress = Progress::new().per_step(1, "pairs");
    let scores =
        score_pairs(&decoder, policy, &examples, packing, a.batch_size, |done| progress.count(done, examples.len()));
    progress.finish();
    let scores = scores.with_context(|| format!("scoring {}", a.data.display()))?;
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
    super::emit(a.out.as_deref(), &text)
}
