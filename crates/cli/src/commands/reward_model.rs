//! `dpo reward-model`: train a Bradley-Terry reward model on preference pairs (the RLHF baseline's first
//! stage), or score rows with one.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use dpo::data::{load_pairs, load_sft, read_records, DataOptions, Example};
use dpo::rlhf::reward::{evaluate, train_reward_model, RewardModel, RmTrainConfig};
use dpo::train::run_dir::{self, model_of, RunDir, StartMode};
use serde::Serialize;

use super::train::with_hint;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Train a reward model (a scalar head on the last token's hidden state, trunk and head trained with
    /// the loss -log sigmoid(r_chosen - r_rejected)) and write it as a run directory (config.toml,
    /// metrics.jsonl, final/ the reward model).
    Train(TrainArgs),
    /// Score the completions of every row with a reward model, one JSON line per row.
    Score(ScoreArgs),
}

#[derive(clap::Args, Debug)]
struct TrainArgs {
    /// The starting model (Hugging Face directory), usually the SFT model.
    #[arg(long)]
    model: PathBuf,
    /// Preference rows (JSONL, JSON or Parquet).
    #[arg(long)]
    data: PathBuf,
    /// Run directory: config.toml, metrics.jsonl and final/ (the reward model: an HF directory plus
    /// reward_head.safetensors).
    #[arg(long)]
    output: PathBuf,
    /// Replace a previous run in --output instead of refusing (it is replaced once the new model is written).
    #[arg(long)]
    overwrite: bool,
    /// Preference rows to report loss and accuracy on (after the last step, or every --eval-every steps).
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Peak learning rate (AdamW, linear decay to 0).
    #[arg(long, default_value_t = 1e-5)]
    lr: f64,
    /// Pairs per optimizer step.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Passes over the data (ignored with --max-steps).
    #[arg(long, default_value_t = 1.0)]
    epochs: f64,
    /// Optimizer steps (overrides --epochs).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Seed of the head initialisation and of the per-epoch shuffle.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// AdamW weight decay (matrices only).
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Standard deviation of the new head's weights (transformers' initializer_range; 0: zeros).
    #[arg(long, default_value_t = 0.02)]
    head_init_std: f64,
    /// Evaluate every this many steps (0: after the last step only).
    #[arg(long, default_value_t = 0)]
    eval_every: u64,
    /// Rows in file order instead of a seeded shuffle per epoch.
    #[arg(long)]
    no_shuffle: bool,
    /// Longest prompt+completion in tokens (longer ones are truncated, keeping the start).
    #[arg(long)]
    max_length: Option<usize>,
}

#[derive(clap::Args, Debug)]
struct ScoreArgs {
    /// A reward model: the run directory written by `dpo reward-model train` (or its final/).
    #[arg(long)]
    model: PathBuf,
    /// Preference rows (scores `chosen_score`, `rejected_score`, `margin`) or `prompt`/`completion` rows
    /// (scores `score`), JSONL, JSON or Parquet.
    #[arg(long)]
    data: PathBuf,
    /// Longest prompt+completion in tokens (longer ones are truncated, keeping the start).
    #[arg(long)]
    max_length: Option<usize>,
    /// Write the JSON lines here (atomically) instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    match a.command {
        Command::Train(t) => train(t),
        Command::Score(s) => score(s),
    }
}

fn load(path: &Path, tok: Option<&hf::Tokenizer>, opts: &DataOptions) -> anyhow::Result<Vec<Example>> {
    let loaded = load_pairs(path, tok, opts)?;
    eprintln!("{}: {}", path.display(), loaded.stats.summary());
    if loaded.examples.is_empty() {
        bail!("{}: no usable rows left", path.display());
    }
    Ok(loaded.examples)
}

/// config.toml of a reward-model run.
#[derive(Serialize)]
struct RmRunConfig<'a> {
    model: &'a Path,
    data: &'a Path,
    eval_data: Option<&'a Path>,
    max_length: Option<usize>,
    train: &'a RmTrainConfig,
}

fn train(a: TrainArgs) -> anyhow::Result<()> {
    let mode = if a.overwrite { StartMode::Overwrite } else { StartMode::Fresh };
    run_dir::preflight(&a.output, mode).map_err(|e| with_hint(e, "dpo reward-model train"))?;
    let hf::HfModel { config, params, .. } = hf::load_model(&a.model)?;
    let tok = hf::load_tokenizer_if_present(&a.model)?;
    let opts = DataOptions { max_length: a.max_length, ..Default::default() };
    let pairs = load(&a.data, tok.as_ref(), &opts)?;
    let eval = match &a.eval_data {
        Some(p) => load(p, tok.as_ref(), &opts)?,
        None => Vec::new(),
    };
    let rc = RmTrainConfig {
        lr: a.lr,
        batch_size: a.batch_size,
        epochs: a.epochs,
        max_steps: a.max_steps,
        weight_decay: a.weight_decay,
        max_grad_norm: a.max_grad_norm,
        seed: a.seed,
        shuffle: !a.no_shuffle,
        head_init_std: a.head_init_std,
        eval_every: a.eval_every,
    };
    // Everything is loaded and checked: the run directory is taken (locked; a previous run is moved
    // aside and put back if this one fails before its model is written).
    let mut dir =
        RunDir::open(&a.output, mode, &mut |l| eprintln!("{l}")).map_err(|e| with_hint(e, "dpo reward-model train"))?;
    let resolved = RmRunConfig {
        model: &a.model,
        data: &a.data,
        eval_data: a.eval_data.as_deref(),
        max_length: a.max_length,
        train: &rc,
    };
    dir.write_config(&toml::to_string_pretty(&resolved).context("writing config.toml")?)?;
    let (rm, stats) = train_reward_model(&config.decoder, params, &pairs, &eval, &rc, &mut |l| eprintln!("{l}"))
        .with_context(|| format!("training a reward model on {}", a.data.display()))?;
    let mut metrics = dir.metrics(None)?;
    for s in &stats {
        metrics.append(&serde_json::to_value(s)?)?;
    }
    let final_dir = a.output.join("final");
    rm.save(&final_dir, &config, Some(&a.model))?;
    dir.started();

    // Accuracy of the final model over whole data sets (the step lines show one batch each).
    let (train_loss, train_accuracy) = evaluate(&rm, &pairs, a.batch_size)?;
    let mut summary = serde_json::json!({
        "steps": stats.len(),
        "train_loss": train_loss,
        "train_accuracy": train_accuracy,
        "output": final_dir,
    });
    if !eval.is_empty() {
        let (l, acc) = evaluate(&rm, &eval, a.batch_size)?;
        summary["eval_loss"] = l.into();
        summary["eval_accuracy"] = acc.into();
    }
    println!("{summary}");
    Ok(())
}

/// Whether a data file holds preference rows (judged by its first row).
fn holds_pairs(path: &Path) -> anyhow::Result<bool> {
    let records = read_records(path)?;
    let Some(first) = records.first() else { bail!("{}: no rows", path.display()) };
    Ok(["chosen", "rejected", "chosen_ids", "rejected_ids"].iter().any(|k| first.fields.contains_key(*k)))
}

fn score(a: ScoreArgs) -> anyhow::Result<()> {
    let model = model_of(&a.model);
    let rm = RewardModel::load(&model)?;
    let tok = hf::load_tokenizer_if_present(&model)?;
    let opts = DataOptions { max_length: a.max_length, ..Default::default() };
    let context = || format!("scoring {} with {}", a.data.display(), a.model.display());
    let mut text = String::new();
    if holds_pairs(&a.data)? {
        let pairs = load_pairs(&a.data, tok.as_ref(), &opts)?.examples;
        for (c, r) in rm.score_pairs(&pairs).with_context(context)? {
            let line = serde_json::json!({
                "chosen_score": c,
                "rejected_score": r,
                "margin": c - r,
                "chosen_preferred": c > r,
            });
            text += &format!("{line}\n");
        }
    } else {
        let rows = load_sft(&a.data, tok.as_ref(), &opts)?.examples;
        let seqs: Vec<(&[u32], &[u32])> = rows.iter().map(|r| r.parts()).collect();
        for s in rm.score(&seqs).with_context(context)? {
            text += &format!("{}\n", serde_json::json!({ "score": s }));
        }
    }
    super::emit(a.out.as_deref(), &text)
}
