//! `dpo reward-model`: train a Bradley-Terry reward model on preference pairs (the RLHF baseline's first
//! stage), or score rows with one.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use dpo::data::{load_pairs, load_sft, read_records, DataOptions, Example};
use dpo::rlhf::reward::{evaluate, run_reward_model, RewardModel, RewardModelError, RmRun, RmStart, RmTrainConfig};
use dpo::train::run_dir::{self, model_of, resume_target, RunDir, StartMode};
use dpo::train::OnNonFinite;
use serde::{Deserialize, Serialize};

use super::given::{resume_settings, Given};
use super::progress::{written, Progress};
use super::train::{run_outputs, with_hint};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Train a reward model (a scalar head on the last token's hidden state, trunk and head trained with
    /// the loss -log sigmoid(r_chosen - r_rejected)) and write it as a run directory (config.toml,
    /// metrics.jsonl, checkpoints/, final/ the reward model). Ctrl-C or SIGTERM writes a checkpoint;
    /// --resume continues the run bit-identically.
    Train(Box<TrainArgs>),
    /// Score the completions of every row with a reward model, one JSON line per row.
    Score(ScoreArgs),
}

#[derive(clap::Args, Debug)]
struct TrainArgs {
    /// The starting model (Hugging Face directory), usually the SFT model.
    #[arg(long, value_parser = super::source::model_arg, required_unless_present = "resume")]
    model: Option<PathBuf>,
    /// Preference rows (JSONL, JSON or Parquet).
    #[arg(long, required_unless_present = "resume")]
    data: Option<PathBuf>,
    /// Run directory: config.toml, metrics.jsonl, checkpoints/step-N and final/ (the reward model: an HF
    /// directory plus reward_head.safetensors).
    #[arg(long, required_unless_present = "resume")]
    output: Option<PathBuf>,
    /// Continue an interrupted or finished run: its directory (from its newest checkpoint) or one of its
    /// checkpoints/step-N. The settings come from the run's config.toml: --max-steps (or --epochs) may
    /// lengthen the run, --save-every, --eval-every, --on-nonfinite and --report-to may change, and another
    /// value of a flag that changes the numbers is refused by name.
    #[arg(long, conflicts_with_all = ["model", "data", "output", "overwrite", "eval_data", "eval_split", "split", "subset"])]
    resume: Option<PathBuf>,
    /// Write a resumable checkpoint every N steps (0: at the end and on interruption only).
    #[arg(long, default_value_t = 0)]
    save_every: u64,
    /// On a NaN or infinite loss or gradient: stop (the checkpoint of the last good state is written) or
    /// skip the step [default: stop].
    #[arg(long, value_parser = ["stop", "skip"])]
    on_nonfinite: Option<String>,
    /// Where metrics go: jsonl (metrics.jsonl, always written), tensorboard (event files under RUN/runs/
    /// with TRL's tags), or both comma-separated [default: jsonl; a resumed run: as it was].
    #[arg(long, value_name = "jsonl,tensorboard")]
    report_to: Option<String>,
    /// Replace a previous run in --output instead of refusing (it is replaced once the first checkpoint
    /// or the new model is written).
    #[arg(long)]
    overwrite: bool,
    /// Preference rows to report loss and accuracy on (after the last step, or every --eval-every steps).
    #[arg(long)]
    eval_data: Option<PathBuf>,
    #[command(flatten)]
    source: super::source::SplitFlags,
    /// With a dataset as --eval-data: its split [default: test].
    #[arg(long)]
    eval_split: Option<String>,
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
    /// (With --resume, a precision other than the run's is refused.)
    #[command(flatten)]
    precision: super::precision::PrecisionFlag,
}

#[derive(clap::Args, Debug)]
struct ScoreArgs {
    /// A reward model: the run directory written by `dpo reward-model train` (or its final/).
    #[arg(long, value_parser = super::source::model_arg)]
    model: PathBuf,
    /// Preference rows (scores `chosen_score`, `rejected_score`, `margin`) or `prompt`/`completion` rows
    /// (scores `score`), JSONL, JSON or Parquet.
    #[arg(long)]
    data: PathBuf,
    /// Longest prompt+completion in tokens (longer ones are truncated, keeping the start).
    #[arg(long)]
    max_length: Option<usize>,
    #[command(flatten)]
    source: super::source::SplitFlags,
    /// Write the JSON lines here (atomically) instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    precision: super::precision::PrecisionFlag,
}

impl Args {
    /// True for `reward-model train` (which runs data-parallel under `mpirun`).
    pub fn trains(&self) -> bool {
        matches!(self.command, Command::Train(_))
    }
}

pub fn run(a: Args, given: &Given) -> anyhow::Result<ExitCode> {
    match a.command {
        Command::Train(t) => train(*t, given),
        Command::Score(s) => score(s).map(|()| ExitCode::SUCCESS),
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

/// config.toml of a reward-model run (read back by --resume).
#[derive(Clone, Serialize, Deserialize)]
struct RmRunConfig {
    model: PathBuf,
    data: PathBuf,
    eval_data: Option<PathBuf>,
    max_length: Option<usize>,
    save_every: u64,
    on_nonfinite: OnNonFinite,
    /// `--report-to` (absent in runs written before it existed: jsonl).
    #[serde(default)]
    report_to: Option<String>,
    train: RmTrainConfig,
}

impl RmRunConfig {
    fn from_args(a: &TrainArgs) -> anyhow::Result<Self> {
        let (Some(model), Some(data)) = (&a.model, &a.data) else { bail!("--model and --data are required") };
        Ok(RmRunConfig {
            model: model.clone(),
            data: a.source.data(data)?,
            eval_data: a.eval_data.as_deref().map(|e| a.source.eval_data(e, a.eval_split.as_deref())).transpose()?,
            max_length: a.max_length,
            save_every: a.save_every,
            on_nonfinite: on_nonfinite(a).unwrap_or_default(),
            report_to: a.report_to.clone(),
            train: train_config(a),
        })
    }

    /// The config.toml of the run `--resume` names.
    fn of_run(run: &Path) -> anyhow::Result<Self> {
        let path = run.join("config.toml");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "--resume {}: no config.toml of a reward-model run there; pass the run directory that \
                 `dpo reward-model train --output` wrote, or one of its checkpoints/step-N",
                run.display()
            )
        })?;
        super::run_kind::check(run, &text, &[super::run_kind::RunKind::RewardModel])?;
        toml::from_str(&text)
            .with_context(|| format!("{}: not the configuration of a reward-model run", path.display()))
    }
}

const COMMAND: &str = "dpo reward-model train";

/// The training settings the flags give.
fn train_config(a: &TrainArgs) -> RmTrainConfig {
    RmTrainConfig {
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
        precision: a.precision.get(),
    }
}

fn on_nonfinite(a: &TrainArgs) -> Option<OnNonFinite> {
    a.on_nonfinite.as_deref().map(|v| if v == "skip" { OnNonFinite::Skip } else { OnNonFinite::Stop })
}

/// The run's errors with the flag hints `dpo train` gives.
fn hint(e: RewardModelError, output: &Path) -> anyhow::Error {
    match e {
        RewardModelError::Run(e) => with_hint(e, COMMAND),
        RewardModelError::NonFinite { .. } => anyhow::Error::from(e).context(format!(
            "`{COMMAND} --resume {} --on-nonfinite skip` continues from the last good checkpoint and skips such \
             steps",
            output.display()
        )),
        e => e.into(),
    }
}

fn train(a: TrainArgs, given: &Given) -> anyhow::Result<ExitCode> {
    if a.max_steps == Some(0) {
        bail!("--max-steps 0: a reward-model run takes at least 1 step");
    }
    let (c, output, mode) = match &a.resume {
        Some(resume) => {
            let run = resume_target(resume).run;
            let saved = RmRunConfig::of_run(&run)?;
            if let Some(p) = a.precision.given().filter(|&p| p != saved.train.precision) {
                bail!(
                    "--precision {p}: {} was trained with precision {}; a resumed run keeps the settings that change \
                     the numbers of its passes (continue it with --precision {} or without the flag)",
                    run.display(),
                    saved.train.precision,
                    saved.train.precision
                );
            }
            // The flags given take their place in the run's settings: those that change its numbers are
            // refused by name; --max-steps (or --epochs) may lengthen it.
            let flags = RmRunConfig {
                max_length: a.max_length,
                save_every: a.save_every,
                on_nonfinite: on_nonfinite(&a).unwrap_or_default(),
                report_to: a.report_to.clone(),
                train: train_config(&a),
                ..saved.clone()
            };
            let flag = |key: &str| given.has(if key == "shuffle" { "no_shuffle" } else { key });
            let c = resume_settings(&run, &saved, &flags, &flag, &[]).map_err(|e| with_hint(e, COMMAND))?;
            (c, run, StartMode::Resume)
        }
        None => {
            let mode = if a.overwrite { StartMode::Overwrite } else { StartMode::Fresh };
            let output = a.output.clone().context("--output is required")?;
            (RmRunConfig::from_args(&a)?, output, mode)
        }
    };
    let report_to = super::train::report_to_flag(c.report_to.as_deref())?;
    let mut progress = Progress::new().per_step(c.train.batch_size, "pairs");
    let log = &mut |l: &str| progress.line(l);
    // Data parallelism (`mpirun -np N`): rank 0 alone takes and writes the run directory.
    let root = dpo::dist::is_root();
    if root {
        run_dir::preflight(&output, mode).map_err(|e| with_hint(e, COMMAND))?;
        let mut inputs = vec![("--model", c.model.as_path()), ("--data", c.data.as_path())];
        inputs.extend(c.eval_data.as_deref().map(|p| ("--eval-data", p)));
        run_dir::refuse_inputs_inside(&output, mode, &inputs).map_err(|e| with_hint(e, COMMAND))?;
    }
    let rc = &c.train;
    // Settings before anything is loaded or written (the run directory was taken before they were checked).
    rc.validate().with_context(|| format!("training a reward model on {}", c.data.display()))?;
    let (start, config) = match &a.resume {
        Some(resume) => RmStart::resume(resume, rc).map_err(|e| hint(e, &output))?,
        None => {
            let hf::HfModel { config, params, .. } = hf::load_model(&c.model)?;
            (RmStart::fresh(&config.decoder, params, rc), config)
        }
    };
    let tok = hf::load_tokenizer_if_present(&c.model)?;
    let opts = DataOptions { max_length: c.max_length, ..Default::default() };
    let pairs = load(&c.data, tok.as_ref(), &opts)?;
    let eval = match &c.eval_data {
        Some(p) => load(p, tok.as_ref(), &opts)?,
        None => Vec::new(),
    };
    // Everything is loaded and checked: the run directory is taken (locked; a previous run is moved
    // aside and put back if this one fails before its first checkpoint or model is written).
    dpo::dist::barrier();
    let mut dir = root.then(|| RunDir::open(&output, mode, log)).transpose().map_err(|e| with_hint(e, COMMAND))?;
    if let Some(dir) = &dir {
        dir.write_config(&toml::to_string_pretty(&c).context("writing config.toml")?)?;
    }
    let stop = super::interrupt::stop_flag(Some(&output))?;
    let run = RmRun {
        dir: dir.as_mut(),
        model_cfg: &config,
        source: &c.model,
        save_every: c.save_every,
        on_nonfinite: c.on_nonfinite,
        stop: &stop,
        report_to,
    };
    let out = run_reward_model(start, &pairs, &eval, rc, Some(run), log)
        .map_err(|e| hint(e, &output))
        .with_context(|| format!("training a reward model on {}", c.data.display()));
    progress.finish();
    let out = out?;
    if out.interrupted {
        let ck = out.checkpoint.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        eprintln!(
            "interrupted after step {}/{}; checkpoint written to {ck}\nresume with: {COMMAND} --resume {}",
            out.steps,
            out.total_steps,
            output.display()
        );
        return Ok(ExitCode::from(130));
    }
    let rm = out.rm;
    let final_dir = output.join("final");
    if let Some(dir) = dir.as_mut() {
        rm.save(&final_dir, &config, Some(&c.model))?;
        dir.started();
    }

    // Accuracy of the final model over whole data sets (the step lines show one batch each).
    let (train_loss, train_accuracy) = evaluate(&rm, &pairs, rc.batch_size)?;
    let mut summary = serde_json::json!({
        "steps": out.steps,
        "train_loss": train_loss,
        "train_accuracy": train_accuracy,
        "output": final_dir,
        "metrics": output.join("metrics.jsonl"),
    });
    if report_to.tensorboard {
        summary["tensorboard"] = serde_json::json!(output.join(dpo::tensorboard::EVENTS_DIR));
    }
    if !eval.is_empty() {
        let (l, acc) = evaluate(&rm, &eval, rc.batch_size)?;
        summary["eval_loss"] = l.into();
        summary["eval_accuracy"] = acc.into();
    }
    println!("{summary}");
    if dir.is_some() {
        eprintln!("done: {} steps; reward model written to {}", out.steps, final_dir.display());
        written(&run_outputs(&output, report_to));
    }
    Ok(ExitCode::SUCCESS)
}

/// Whether a data file holds preference rows (judged by its first row).
fn holds_pairs(path: &Path) -> anyhow::Result<bool> {
    let records = read_records(path)?;
    let Some(first) = records.first() else { bail!("{}: no rows", path.display()) };
    Ok(["chosen", "rejected", "chosen_ids", "rejected_ids"].iter().any(|k| first.fields.contains_key(*k)))
}

fn score(mut a: ScoreArgs) -> anyhow::Result<()> {
    a.data = a.source.data(&a.data)?;
    let model = model_of(&a.model);
    let rm = RewardModel::load(&model)?.with_precision(a.precision.get());
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
