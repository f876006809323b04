//! `dpo win-rate`: how often a judge prefers model A's completion of a prompt to model B's (or to a
//! preference file's chosen completion), at each of several sampling temperatures, as in the DPO paper's
//! summarization experiment (win rate against temperature, figure 2 right). One JSON line per
//! temperature and a PNG chart with the 95% intervals; the arithmetic is [`dpo::winrate`].

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use dpo::data::prompts::{read_prompts, stop_ids};
use dpo::data::{load_pairs, DataOptions};
use dpo::rlhf::reward::RewardModel;
use dpo::scoring::score_sequences;
use dpo::train::run_dir::model_of;
use dpo::winrate::Tally;
use dpo_demo::world::plot::{interval_chart_png, Series, Style};
use engine::generate::{generate_batched, SamplingConfig, DEFAULT_MAX_BATCH};
use engine::kernels::Precision;
use engine::model::Model;
use engine::rng::Rng;
use engine::Decoder;
use serde::Serialize;

use super::adapter::SampledModel;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model A, the one whose win rate is measured (Hugging Face directory with its tokenizer).
    #[arg(long, value_parser = super::source::model_arg)]
    model: PathBuf,
    #[command(flatten)]
    adapter: super::adapter::AdapterFlag,
    #[command(flatten)]
    stored_base: super::adapter::StoredBaseFlags,
    /// Model B, sampled like A on the same prompts. --model's own directory, with A's --adapter applied
    /// beside the base (--quantize, --base-dtype), is that base with the adapter off, held once: a QLoRA
    /// run's reference as the run held it.
    #[arg(long, conflicts_with = "against_data", required_unless_present = "against_data")]
    against: Option<PathBuf>,
    /// Preference rows: A is judged against each row's chosen completion, on the row's prompt.
    #[arg(long, value_name = "FILE")]
    against_data: Option<PathBuf>,
    /// The judge: a Bradley-Terry reward model (`dpo reward-model train`'s run directory or its final/).
    #[arg(long, value_name = "RM", conflicts_with = "judge_implicit", required_unless_present = "judge_implicit")]
    judge_reward_model: Option<PathBuf>,
    /// The judge: a DPO policy's implicit reward log(pi/ref) (the ranking does not depend on beta), as
    /// `POLICY,REF` directories.
    #[arg(long, value_name = "POLICY,REF")]
    judge_implicit: Option<String>,
    /// Prompts (rows with `prompt` or `prompt_ids`, as `dpo generate --data` reads them) [required with
    /// --against; with --against-data the rows' prompts are used].
    #[arg(long, value_name = "FILE", conflicts_with = "against_data")]
    prompts: Option<PathBuf>,
    /// Sampling temperatures, comma-separated; 0 is greedy decoding.
    #[arg(long, value_delimiter = ',', default_value = "0,0.25,0.5,0.75,1")]
    temperatures: Vec<f32>,
    /// Completions per prompt and temperature (each one comparison).
    #[arg(long, default_value_t = 1)]
    n: usize,
    /// New tokens per completion at most (the EOS token counts).
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Seed of the samplers (A and B draw from different streams of it).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The chart of win rate against temperature (PNG).
    #[arg(long, default_value = "win_rate.png")]
    chart: PathBuf,
    /// Write the JSON lines here (atomically) instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    precision: super::precision::PrecisionFlag,
}

/// One output line.
#[derive(Serialize)]
struct Line {
    temperature: f32,
    #[serde(flatten)]
    rate: dpo::winrate::WinRate,
}

/// What scores a completion.
enum Judge {
    RewardModel(Box<RewardModel>),
    /// log pi(y|x) - log ref(y|x): the implicit reward over beta.
    Implicit {
        policy: Box<SampledModel>,
        reference: Box<SampledModel>,
        precision: Precision,
    },
}

impl Judge {
    fn load(a: &Args, precision: Precision) -> anyhow::Result<(Judge, PathBuf)> {
        if let Some(rm) = &a.judge_reward_model {
            let dir = model_of(rm);
            let judge = RewardModel::load(&dir)?.with_precision(precision);
            return Ok((Judge::RewardModel(Box::new(judge)), dir));
        }
        let spec = a.judge_implicit.as_deref().unwrap_or_default();
        let Some((p, r)) = spec.split_once(',') else {
            bail!("--judge-implicit takes POLICY,REF (two model directories), got {spec:?}");
        };
        let (policy, reference) = (SampledModel::load_alone(Path::new(p))?, SampledModel::load_alone(Path::new(r))?);
        if policy.model.config.decoder.vocab_size != reference.model.config.decoder.vocab_size {
            bail!("--judge-implicit: {p} and {r} have different vocabularies; they must read the same token ids");
        }
        same_tokenizer(Path::new(p), Path::new(r), "--judge-implicit's reference")?;
        Ok((Judge::Implicit { policy: Box::new(policy), reference: Box::new(reference), precision }, PathBuf::from(p)))
    }

    /// The judge's models (for the prompt + completion positions check).
    fn decoder_cfgs(&self) -> Vec<&engine::DecoderConfig> {
        match self {
            Judge::RewardModel(rm) => vec![&rm.decoder.cfg],
            Judge::Implicit { policy, reference, .. } => {
                vec![&policy.model.config.decoder, &reference.model.config.decoder]
            }
        }
    }

    fn score(&self, seqs: &[(&[u32], &[u32])]) -> anyhow::Result<Vec<f64>> {
        match self {
            Judge::RewardModel(rm) => Ok(rm.score(seqs)?),
            Judge::Implicit { policy, reference, precision } => {
                let logps = |m: &SampledModel| {
                    score_sequences(&Decoder::new(m.model.config.decoder.clone()), m.view(*precision), seqs, 32)
                };
                let (p, r) = (logps(policy)?, logps(reference)?);
                Ok(p.iter().zip(&r).map(|(p, r)| p - r).collect())
            }
        }
    }
}

/// Model B of a comparison against a model (`--against`).
enum Against {
    Model(Box<SampledModel>),
    /// `--model`'s own base, its adapter off ([`super::adapter::SampledModel::base_view`]).
    Base,
}

/// Whether two paths name one directory.
fn same_dir(a: &Path, b: &Path) -> bool {
    hf::output::resolve(a) == hf::output::resolve(b)
}

/// Refuses a model whose tokenizer is not A's: the judge and B must read A's token ids.
fn same_tokenizer(a: &Path, other: &Path, what: &str) -> anyhow::Result<()> {
    if std::fs::read(other.join("tokenizer.json")).ok() != std::fs::read(a.join("tokenizer.json")).ok() {
        bail!(
            "{what} {} and --model {} have different tokenizers (tokenizer.json); it must read the model's token ids",
            other.display(),
            a.display()
        );
    }
    Ok(())
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.n == 0 {
        bail!("--n must be at least 1");
    }
    if a.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    if a.temperatures.is_empty() {
        bail!("--temperatures needs at least one temperature");
    }
    if let Some(t) = a.temperatures.iter().find(|t| !(t.is_finite() && **t >= 0.0)) {
        bail!("--temperatures: {t} is not a finite number >= 0");
    }
    // Where the results go is checked before any sampling, not after it.
    super::check_output_dir("--chart", &a.chart)?;
    if let Some(out) = &a.out {
        super::check_output_dir("--out", out)?;
    }
    let precision = a.precision.get();
    // With --quantize or --base-dtype, A samples on the base as its QLoRA run held it, the adapter beside it.
    let sampled = SampledModel::load(&a.model, &a.adapter, &a.stored_base)?;
    let model = &sampled.model;
    let tok = hf::load_tokenizer(&a.model)?;
    let (judge, judge_dir) = Judge::load(&a, precision)?;
    same_tokenizer(&a.model, &judge_dir, "the judge")?;
    // B: another model, loaded; or --model's own base where A's adapter is applied beside it (with
    // --quantize or --base-dtype: the QLoRA run's reference, the stored base with the adapter off), held once.
    let against = match &a.against {
        Some(dir) if same_dir(dir, &a.model) && sampled.base_view(precision).is_some() => Some(Against::Base),
        Some(dir) => {
            same_tokenizer(&a.model, dir, "--against")?;
            let b = SampledModel::load_alone(dir)?;
            if b.model.config.decoder.vocab_size != model.config.decoder.vocab_size {
                bail!("--against {}: its vocabulary differs from --model's", dir.display());
            }
            Some(Against::Model(Box::new(b)))
        }
        None => None,
    };

    // Prompts, and with --against-data each prompt's chosen completion.
    let (prompts, chosen): (Vec<Vec<u32>>, Option<Vec<Vec<u32>>>) = match (&a.against_data, &a.prompts) {
        (Some(path), _) => {
            let loaded = load_pairs(path, Some(&tok), &DataOptions::default())?;
            dpo::data::check_vocab(path, &loaded.examples, model.config.decoder.vocab_size)?;
            let p = loaded.examples.iter().map(|e| e.chosen_prompt().to_vec()).collect();
            let c = loaded.examples.iter().map(|e| e.chosen_ids.clone()).collect();
            (p, Some(c))
        }
        (None, Some(path)) => {
            let chat = tok.chat_template().is_some();
            (read_prompts(path, &tok, chat)?.into_iter().map(|p| p.ids).collect(), None)
        }
        (None, None) => bail!("--against needs --prompts FILE (the prompts both models complete)"),
    };
    if prompts.is_empty() {
        bail!("no prompts to compare on");
    }
    // The judge reads prompt + completion; a chosen completion may be longer than --max-new-tokens.
    let longest_chosen = chosen.iter().flatten().map(Vec::len).max().unwrap_or(0);
    let new_tokens = a.max_new_tokens.max(longest_chosen);
    for cfg in std::iter::once(&model.config.decoder).chain(judge.decoder_cfgs()) {
        let lens: Vec<(String, usize)> =
            prompts.iter().enumerate().map(|(i, p)| (format!("prompt {}", i + 1), p.len())).collect();
        if let Err((at, needed, max)) =
            dpo::data::check_generation_positions(lens.iter().map(|(s, n)| (s.as_str(), *n)), new_tokens, cfg)
        {
            bail!(
                "{at}: with {new_tokens} new tokens the judge reads {needed} positions, and a model has {max} \
                 (lower --max-new-tokens or shorten the prompt)"
            );
        }
    }

    let eos_ids = stop_ids(&model.config, &tok);
    let mut lines = String::new();
    let mut points = Vec::new();
    let mut progress = super::progress::Progress::new().per_step(1, "prompts");
    for (ti, &temperature) in a.temperatures.iter().enumerate() {
        let cfg = SamplingConfig {
            temperature,
            max_new_tokens: a.max_new_tokens,
            eos_ids: eos_ids.clone(),
            ..Default::default()
        };
        let stream = a.seed ^ (ti as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let sample = |m: &hf::HfModel, view: Model<'_>, seed: u64| {
            let d = Decoder::new(m.config.decoder.clone());
            generate_batched(&d, view, &prompts, a.n, &cfg, &mut Rng::new(seed), DEFAULT_MAX_BATCH)
                .with_context(|| format!("sampling at temperature {temperature}"))
        };
        let ours = sample(model, sampled.view(precision), stream)?;
        let theirs: Vec<Vec<u32>> = match (&against, &chosen) {
            (Some(b), _) => {
                let (m, v) = match b {
                    Against::Model(b) => (&b.model, b.view(precision)),
                    Against::Base => (model, sampled.base_view(precision).context("no base view")?),
                };
                sample(m, v, stream ^ 0xB)?.into_iter().map(|g| g.tokens).collect()
            }
            (None, Some(c)) => ours.iter().map(|g| c[g.prompt_index].clone()).collect(),
            (None, None) => unreachable!("checked above: --against or --against-data"),
        };
        let a_items: Vec<(&[u32], &[u32])> =
            ours.iter().map(|g| (&prompts[g.prompt_index][..], &g.tokens[..])).collect();
        let b_items: Vec<(&[u32], &[u32])> =
            ours.iter().zip(&theirs).map(|(g, t)| (&prompts[g.prompt_index][..], &t[..])).collect();
        let sa = judge.score(&a_items).context("judging model A's completions")?;
        let sb = judge.score(&b_items).context("judging the other side's completions")?;
        let identical: Vec<bool> = a_items.iter().zip(&b_items).map(|(x, y)| x.1 == y.1).collect();
        let rate = Tally::from_scores(&sa, &sb, &identical).summary();
        points.push((temperature as f64, rate));
        let line = serde_json::to_string(&Line { temperature, rate })? + "\n";
        if a.out.is_none() {
            // Each temperature's line as soon as it is measured.
            print!("{line}");
        }
        lines += &line;
        progress.count((ti + 1) * prompts.len(), a.temperatures.len() * prompts.len());
    }
    progress.finish();
    if let Some(path) = &a.out {
        super::emit(Some(path), &lines)?;
    }
    let name = match (&a.against, &a.against_data) {
        (Some(b), _) => format!("A vs {}", b.file_name().unwrap_or_default().to_string_lossy()),
        _ => "A vs chosen".to_string(),
    };
    let series = Series::new(name, points.iter().map(|(t, r)| (*t, r.win_rate)).collect(), Style::LineAndPoints)
        .with_intervals(points.iter().map(|(_, r)| (r.ci_low, r.ci_high)).collect());
    interval_chart_png(
        &a.chart,
        &[series],
        Some(0.5),
        "Win rate against temperature",
        "sampling temperature",
        "win rate (ties half), 95% Wilson interval",
    )
    .with_context(|| format!("writing the chart {}", a.chart.display()))?;
    eprintln!("{} prompts x {} samples per temperature; chart written to {}", prompts.len(), a.n, a.chart.display());
    Ok(())
}
