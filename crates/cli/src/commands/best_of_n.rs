//! `dpo best-of-n`: sample N completions of each prompt from a policy and keep the one a reward model
//! scores highest, one JSON line per prompt.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use dpo::rlhf::best_of_n::{best_of_n, best_of_n_kl};
use dpo::rlhf::reward::RewardModel;
use dpo::train::run_dir::model_of;
use engine::rng::Rng;
use engine::Decoder;
use serde::Serialize;
use serde_json::Value;

use super::generate::SamplingFlags;
use super::progress::Progress;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The policy to sample from (Hugging Face directory with its tokenizer).
    #[arg(long, value_parser = super::source::model_arg)]
    model: PathBuf,
    #[command(flatten)]
    adapter: super::adapter::AdapterFlag,
    /// The reward model that picks the best sample: the run directory `dpo reward-model train` wrote
    /// (or its final/); it must use the policy's tokenizer.
    #[arg(long, value_parser = super::source::model_arg)]
    reward_model: PathBuf,
    #[command(flatten)]
    sampling: SamplingFlags,
    /// Samples per prompt; with the same --seed they are those of `dpo generate --n N`.
    #[arg(long, default_value_t = 16)]
    n: usize,
    /// Write the JSON lines here (atomically) instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    precision: super::precision::PrecisionFlag,
    #[command(flatten)]
    stored_base: super::adapter::StoredBaseFlags,
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
    a.sampling.check()?;
    if a.n == 0 {
        bail!("--n must be at least 1");
    }
    let precision = a.precision.get();
    let sampled = super::adapter::SampledModel::load(&a.model, &a.adapter, &a.stored_base)?;
    let model = &sampled.model;
    let tok = hf::load_tokenizer(&a.model)?;
    let reward_model = model_of(&a.reward_model);
    let same_tokenizer = |dir: &std::path::Path| {
        std::fs::read(dir.join("tokenizer.json")).ok() == std::fs::read(a.model.join("tokenizer.json")).ok()
    };
    if !same_tokenizer(&reward_model) {
        bail!(
            "{} and {} have different tokenizers (tokenizer.json); the reward model must read the policy's token ids",
            reward_model.display(),
            a.model.display()
        );
    }
    let rm = RewardModel::load(&reward_model)?.with_precision(precision);
    let prompts = a.sampling.prompts(&tok, &a.model)?;
    // The reward model reads every new token, the last one included.
    a.sampling.check_positions(&prompts, a.sampling.max_new_tokens, model, "the reward model reads")?;
    let cfg = a.sampling.config(model, &tok);
    let decoder = Decoder::new(model.config.decoder.clone());
    // The policy's prefill and the reward model's passes in the flag's precision; decode steps stay f32.
    let policy = sampled.view(precision);
    let mut rng = Rng::new(a.sampling.seed);
    let mut text = String::new();
    let mut stdout = std::io::stdout().lock();
    // Prompts go in chunks so that lines come out as they are done; every sample draws its random
    // stream from `rng` in order, so chunking does not change them.
    let chunk = (64 / a.n).max(1);
    let mut progress = Progress::new().per_step(1, "prompts");
    for (c, part) in prompts.chunks(chunk).enumerate() {
        let ids: Vec<Vec<u32>> = part.iter().map(|p| p.ids.clone()).collect();
        let best = best_of_n(&decoder, policy, &ids, a.n, &cfg, &mut |pairs| rm.score(pairs), &mut rng)
            .with_context(|| format!("best-of-{} for prompts {}..{}", a.n, c * chunk + 1, c * chunk + part.len()))?;
        let mut lines = String::new();
        for (p, b) in part.iter().zip(&best) {
            let completion = a.sampling.completion_text(&tok, &b.best)?;
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
        progress.count(c * chunk + part.len(), prompts.len());
    }
    progress.finish();
    if a.out.is_some() {
        super::emit(a.out.as_deref(), &text)?;
    }
    eprintln!("{} prompts, best of {} (KL from the policy at most {:.3} nats)", prompts.len(), a.n, best_of_n_kl(a.n));
    Ok(())
}
