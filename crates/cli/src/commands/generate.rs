//! `dpo generate`: sample completions from a model, one JSON line per completion.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use dpo::data::prompts::{encode_text, read_prompts, stop_ids, Prompt};
use engine::generate::{generate_batched, Generation, SamplingConfig};
use engine::rng::Rng;
use engine::Decoder;
use hf::Tokenizer;
use serde::Serialize;
use serde_json::Value;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Hugging Face model directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long, value_parser = super::source::model_arg)]
    model: PathBuf,
    #[command(flatten)]
    adapter: super::adapter::AdapterFlag,
    #[command(flatten)]
    sampling: SamplingFlags,
    /// Completions per prompt.
    #[arg(long, default_value_t = 1)]
    n: usize,
    /// Sequences decoded together (more is faster per token, up to the point where the step is
    /// compute-bound; memory grows with it).
    #[arg(long, default_value_t = engine::generate::DEFAULT_MAX_BATCH)]
    batch_size: usize,
    /// Write the JSON lines here (atomically) instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    precision: super::precision::PrecisionFlag,
    #[command(flatten)]
    stored_base: super::adapter::StoredBaseFlags,
}

/// Prompts and sampling, shared by `dpo generate` and `dpo best-of-n`.
#[derive(clap::Args, Debug)]
pub(super) struct SamplingFlags {
    /// One prompt, as text.
    #[arg(long, conflicts_with = "data", required_unless_present = "data")]
    prompt: Option<String>,
    /// Prompts: a JSONL, JSON or Parquet file of rows with `prompt` as text or as a list of chat messages
    /// (`{"role": .., "content": ..}`), or `prompt_ids`; other fields are ignored.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Divides the logits before sampling; 0 is greedy decoding.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    temperature: f32,
    /// Sample only among the k most likely tokens (0: no limit).
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling: only among the most likely tokens whose probabilities add up to p (0 < p <= 1).
    #[arg(long)]
    top_p: Option<f32>,
    /// New tokens per completion at most (the EOS token counts).
    #[arg(long, default_value_t = 64)]
    pub(super) max_new_tokens: usize,
    /// Seed of the sampler; the same seed gives the same completions whatever the batch size and --threads.
    #[arg(long, default_value_t = 0)]
    pub(super) seed: u64,
    /// Wrap text prompts as one user message through the tokenizer's chat template (the default when
    /// it has one).
    #[arg(long, overrides_with = "no_chat")]
    chat: bool,
    /// Tokenize text prompts as they are, even when the tokenizer has a chat template.
    #[arg(long, overrides_with = "chat")]
    no_chat: bool,
    /// Keep special tokens (EOS, chat markers) in the completion text.
    #[arg(long)]
    keep_special_tokens: bool,
}

impl SamplingFlags {
    /// Refuses settings the sampler cannot honour, naming the flag.
    pub(super) fn check(&self) -> anyhow::Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            bail!("--temperature must be a finite number >= 0 (0 is greedy), got {}", self.temperature);
        }
        if let Some(p) = self.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
            bail!("--top-p must be in (0, 1], got {p}");
        }
        if self.max_new_tokens == 0 {
            bail!("--max-new-tokens must be at least 1");
        }
        Ok(())
    }

    /// The prompts, through the chat template when asked for (or by default when the tokenizer has one).
    pub(super) fn prompts(&self, tok: &Tokenizer, model_dir: &Path) -> anyhow::Result<Vec<Prompt>> {
        let chat = match (self.chat, self.no_chat) {
            (true, _) if tok.chat_template().is_none() => {
                bail!("--chat: the tokenizer in {} has no chat template", model_dir.display())
            }
            (true, _) => true,
            (_, true) => false,
            _ => tok.chat_template().is_some(),
        };
        match (&self.prompt, &self.data) {
            (Some(text), _) => {
                let ids = encode_text(tok, text, chat)?;
                if ids.is_empty() {
                    bail!("--prompt tokenizes to no tokens; generation needs at least one");
                }
                Ok(vec![Prompt { location: "--prompt".into(), shown: Value::String(text.clone()), ids }])
            }
            (None, Some(path)) => Ok(read_prompts(path, tok, chat)?),
            (None, None) => bail!("give --prompt TEXT or --data FILE"),
        }
    }

    /// Refuses a prompt that, with `new_tokens` more tokens read after it, does not fit the model's learned
    /// positions (the engine refuses these too, but cannot name the prompt or the flags).
    pub(super) fn check_positions(
        &self,
        prompts: &[Prompt],
        new_tokens: usize,
        model: &hf::HfModel,
        what: &str,
    ) -> anyhow::Result<()> {
        let lens = prompts.iter().map(|p| (p.location.as_str(), p.ids.len()));
        if let Err((location, needed, max)) =
            dpo::data::check_generation_positions(lens, new_tokens, &model.config.decoder)
        {
            let source = match &self.data {
                Some(path) => format!("{}, {location}", path.display()),
                None => location,
            };
            bail!(
                "{source}: the prompt has {} tokens, and with --max-new-tokens {} {what} {needed} positions; the \
                 model has {max} learned positions (shorten the prompt or lower --max-new-tokens)",
                needed - new_tokens,
                self.max_new_tokens,
            );
        }
        Ok(())
    }

    /// The sampler's settings; generation stops at any EOS id of the config or the tokenizer.
    pub(super) fn config(&self, model: &hf::HfModel, tok: &Tokenizer) -> SamplingConfig {
        let eos_ids = stop_ids(&model.config, tok);
        SamplingConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            max_new_tokens: self.max_new_tokens,
            eos_ids,
        }
    }

    /// A completion's text, without its final EOS token unless special tokens are kept.
    pub(super) fn completion_text(&self, tok: &Tokenizer, g: &Generation) -> anyhow::Result<String> {
        let mut ids = &g.tokens[..];
        if g.finished && !self.keep_special_tokens {
            ids = &ids[..ids.len() - 1];
        }
        Ok(tok.decode(ids, !self.keep_special_tokens)?)
    }
}

/// One output line.
#[derive(Serialize)]
struct Line<'a> {
    /// The prompt as given: text, or the list of messages.
    prompt: &'a Value,
    completion: String,
    /// New tokens, EOS included.
    tokens: usize,
    /// Ended with an EOS token rather than at --max-new-tokens.
    finished: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    a.sampling.check()?;
    if a.n == 0 {
        bail!("--n must be at least 1");
    }
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let sampled = super::adapter::SampledModel::load(&a.model, &a.adapter, &a.stored_base)?;
    let model = &sampled.model;
    let tok = hf::load_tokenizer(&a.model)?;
    let prompts = a.sampling.prompts(&tok, &a.model)?;
    // The last new token is not read back, so a prompt needs max_new_tokens - 1 more positions.
    a.sampling.check_positions(&prompts, a.sampling.max_new_tokens - 1, model, "needs")?;
    let cfg = a.sampling.config(model, &tok);
    let decoder = Decoder::new(model.config.decoder.clone());
    // The prompt's prefill in the flag's precision; decode steps stay f32 (on the stored weights, widened).
    let policy = sampled.view(a.precision.get());
    let mut rng = Rng::new(a.sampling.seed);
    let started = Instant::now();
    let (mut text, mut new_tokens, mut count) = (String::new(), 0usize, 0usize);
    let mut stdout = std::io::stdout().lock();
    // Prompts go in chunks so that lines reach standard output as they are done; every sequence draws
    // its random stream from `rng` in order, so chunking does not change the completions.
    let chunk = a.batch_size.div_ceil(a.n.max(1)).max(1) * 4;
    let mut progress = super::progress::Progress::new().per_step(1, "prompts");
    for (c, part) in prompts.chunks(chunk).enumerate() {
        let ids: Vec<Vec<u32>> = part.iter().map(|p| p.ids.clone()).collect();
        let gens = generate_batched(&decoder, policy, &ids, a.n, &cfg, &mut rng, a.batch_size)
            .with_context(|| format!("generating from prompts {}..{}", c * chunk, c * chunk + part.len()))?;
        let mut lines = String::new();
        for g in &gens {
            let completion = a.sampling.completion_text(&tok, g)?;
            let line =
                Line { prompt: &part[g.prompt_index].shown, completion, tokens: g.tokens.len(), finished: g.finished };
            lines.push_str(&serde_json::to_string(&line)?);
            lines.push('\n');
            new_tokens += g.tokens.len();
            count += 1;
        }
        match a.out {
            Some(_) => text.push_str(&lines),
            None => {
                stdout.write_all(lines.as_bytes())?;
                stdout.flush()?;
            }
        }
        progress.count(c * chunk + part.len(), prompts.len());
    }
    progress.finish();
    if a.out.is_some() {
        super::emit(a.out.as_deref(), &text)?;
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{count} completions, {new_tokens} new tokens in {secs:.1} s ({:.1} tokens/s)",
        new_tokens as f64 / secs.max(1e-9)
    );
    Ok(())
}
