//! `dpo best-of-n`: sample N completions of each prompt from a policy and keep the one a reward model
//! scores highest, one JSON line per prompt.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use dpo::rlhf::best_of_n::{best_of_n, best_of_n_kl};
use dpo::rlhf::reward_model::RewardModel;
use engine::generate::SamplingConfig;
use engine::rng::Rng;
use engine::Decoder;
use serde::Serialize;
use serde_json::Value;

use super::generate::{encode_text, read_prompts};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The policy to sample from (Hugging Face directory with its tokenizer).
    #[arg(long)]
    model: PathBuf,
    /// The reward model that picks the best sample (`dpo reward-model train` output); it must use the
    /// policy's tokenizer.
    #[arg(long)]
    reward_model: PathBuf,
    /// One prompt, as text.
    #[arg(long, conflicts_with = "data", required_unless_present = "data")]
    prompt: Option<String>,
    /// Prompts: JSONL (or a JSON list) of rows with `prompt` as text or as a list of chat messages.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Samples per prompt.
    #[arg(long, default_value_t = 16)]
    n: usize,
    /// Divides the logits before sampling; 0 is greedy decoding (then all N samples are the same).
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Sample only among the k most likely tokens (0: no limit).
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling: only among the most likely tokens whose probabilities add up to p (0 < p <= 1).
    #[arg(long)]
    top_p: Option<f32>,
    /// New tokens per sample at most (the EOS token counts).
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Seed of the sampler; the samples are those of `dpo generate --n N` with the same seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
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
    /// Write the JSON lines here (atomically) instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// One output line.
#[derive(Serialize)]
struct Line<'a> {
    /// The prompt as given: text, or the list of messages.
    prompt: &'a Value,
    /// The best sample.
    completion: String,
    /// Its reward.
    score: f64,
    /// The rewards of all N samples, in sampling order.
    scores: &'a [f64],
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if !(a.temperature >= 0.0 && a.temperature.is_finite()) {
        bail!("--temperature must be a finite number >= 0 (0 is greedy), got {}", a.temperature);
    }
    if let Some(p) = a.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
        bail!("--top-p must be in (0, 1], got {p}");
    }
    if a.n == 0 || a.max_new_tokens == 0 {
        bail!("--n and --max-new-tokens must be at least 1");
    }
    let model = hf::load_model(&a.model)?;
    let tok = hf::load_tokenizer(&a.model)?;
    let same_tokenizer = |dir: &std::path::Path| {
        std::fs::read(dir.join("tokenizer.json")).ok() == std::fs::read(a.model.join("tokenizer.json")).ok()
    };
    if !same_tokenizer(&a.reward_model) {
        bail!(
            "{} and {} have different tokenizers (tokenizer.json); the reward model must read the policy's token ids",
            a.reward_model.display(),
            a.model.display()
        );
    }
    let rm = RewardModel::load(&a.reward_model)?;
    let chat = match (a.chat, a.no_chat) {
        (true, _) if tok.chat_template().is_none() => {
            bail!("--chat: the tokenizer in {} has no chat template", a.model.display())
        }
        (true, _) => true,
        (_, true) => false,
        _ => tok.chat_template().is_some(),
    };
    let prompts = match (&a.prompt, &a.data) {
        (Some(text), _) => vec![encode_text(&tok, text, chat)?],
        (None, Some(path)) => read_prompts(path, &tok, chat)?,
        (None, None) => bail!("give --prompt TEXT or --data FILE"),
    };
    if let Some(i) = prompts.iter().position(|p| p.ids.is_empty()) {
        bail!("prompt {} tokenizes to no tokens; generation needs at least one", i + 1);
    }
    if matches!(model.config.decoder.positions, engine::PositionKind::Learned) {
        let max = model.config.decoder.max_positions;
        if let Some(i) = prompts.iter().position(|p| p.ids.len() + a.max_new_tokens > max) {
            bail!(
                "prompt {} has {} tokens; with --max-new-tokens {} the reward model reads {} positions, and the \
                 model has {max} learned positions (shorten the prompt or lower --max-new-tokens)",
                i + 1,
                prompts[i].ids.len(),
                a.max_new_tokens,
                prompts[i].ids.len() + a.max_new_tokens
            );
        }
    }
    let mut eos_ids = model.config.eos_token_ids.clone();
    eos_ids.extend(tok.eos_id());
    eos_ids.sort_unstable();
    eos_ids.dedup();
    let cfg = SamplingConfig {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        max_new_tokens: a.max_new_tokens,
        eos_ids,
    };
    let decoder = Decoder::new(model.config.decoder.clone());
    let mut rng = Rng::new(a.seed);
    let mut text = String::new();
    let mut stdout = std::io::stdout().lock();
    // Prompts go in chunks so that lines come out as they are done; every sample draws its random
    // stream from `rng` in order, so chunking does not change them.
    let chunk = (64 / a.n).max(1);
    for (c, part) in prompts.chunks(chunk).enumerate() {
        let ids: Vec<Vec<u32>> = part.iter().map(|p| p.ids.clone()).collect();
        let best = best_of_n(&decoder, &model.params, &ids, a.n, &cfg, &mut |pairs| rm.score(pairs), &mut rng)
            .with_context(|| format!("best-of-{} for prompts {}..{}", a.n, c * chunk + 1, c * chunk + part.len()))?;
        let mut lines = String::new();
        for (p, b) in part.iter().zip(&best) {
            let mut ids = &b.best.tokens[..];
            if b.best.finished && !a.keep_special_tokens {
                ids = &ids[..ids.len() - 1];
            }
            let completion = tok.decode(ids, !a.keep_special_tokens)?;
            let line = Line { prompt: &p.shown, completion, score: b.score, scores: &b.scores };
            lines += &serde_json::to_string(&line)?;
            lines.push('\n');
        }
        match a.out {
            Some(_) => text += &lines,
            None => {
                stdout.write_all(lines.as_bytes())?;
                stdout.flush()?;
            }
        }
    }
    if let Some(path) = &a.out {
        dpo::io::write_atomic(path, text.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    }
    eprintln!("{} prompts, best of {} (KL from the policy at most {:.3} nats)", prompts.len(), a.n, best_of_n_kl(a.n));
    Ok(())
}
