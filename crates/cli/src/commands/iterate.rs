//! `dpo iterate`: iterative DPO ([`dpo::train::iterative`]): rounds of sampling pairs from the current
//! policy, labelling them with a reward model, and a DPO run on them; rerun the same command to resume.

use std::path::PathBuf;

use anyhow::bail;
use dpo::data::prompts::{read_prompts, stop_ids};
use dpo::objectives::{LossConfig, LossType};
use dpo::rlhf::reward::RewardModel;
use dpo::train::iterative::{iterate, IterativeConfig};
use dpo::train::online::OnlineSampling;
use dpo::train::run_dir::model_of;
use dpo::train::{Objective, PairObjective, TrainConfig};

use super::progress::{written, Progress};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The starting policy (Hugging Face directory with its tokenizer); also the reference, unless --ref-model.
    #[arg(long, value_parser = super::source::model_arg)]
    model: PathBuf,
    /// The fixed reference (default: --model); with --move-reference only round 1's.
    #[arg(long, value_parser = super::source::model_arg)]
    ref_model: Option<PathBuf>,
    /// Each round's reference is the policy the round starts from (the last round's), not the starting one.
    #[arg(long)]
    move_reference: bool,
    /// The judge: `dpo reward-model train`'s run directory (or its final/).
    #[arg(long, value_name = "RM")]
    judge_reward_model: PathBuf,
    /// Prompts (rows with `prompt` or `prompt_ids`) sampled in every round.
    #[arg(long, value_name = "FILE")]
    prompts: PathBuf,
    /// Rounds of sample, label, train; a finished round is skipped when the command is run again.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Directory of the rounds: round-K/pairs.jsonl and round-K/run/.
    #[arg(long)]
    output: PathBuf,
    /// Completions sampled per prompt; the best and the worst by the judge form its pair.
    #[arg(long, default_value_t = 2)]
    samples: usize,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Subtracted from the judge's score of a completion that ends without EOS.
    #[arg(long)]
    missing_eos_penalty: Option<f64>,
    /// DPO's beta in every round.
    #[arg(long, default_value_t = 0.1)]
    beta: f64,
    #[arg(long, default_value_t = dpo::train::config::DEFAULT_LR)]
    lr: f64,
    /// Pairs per optimizer step.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Optimizer steps per round (default: one pass over the round's pairs).
    #[arg(long)]
    steps_per_round: Option<u64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where each round's metrics go: jsonl (round-K/run/metrics.jsonl, always written), tensorboard (event
    /// files under round-K/run/runs/ with TRL's tags), or both [default: jsonl].
    #[arg(long, value_name = "jsonl,tensorboard")]
    report_to: Option<String>,
    #[command(flatten)]
    precision: super::precision::PrecisionFlag,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.samples < 2 || a.rounds == 0 || a.max_new_tokens == 0 || a.batch_size == 0 {
        bail!("--samples must be at least 2, and --rounds, --max-new-tokens and --batch-size at least 1");
    }
    if a.steps_per_round == Some(0) {
        bail!("--steps-per-round 0: a round takes at least 1 step (leave the flag out for one pass over the pairs)");
    }
    if !(a.temperature > 0.0 && a.temperature.is_finite()) {
        bail!("--temperature must be a finite number > 0");
    }
    super::eval::check_beta(a.beta)?;
    let model = hf::load_model(&a.model)?;
    let tok = hf::load_tokenizer(&a.model)?;
    let rm_dir = model_of(&a.judge_reward_model);
    if std::fs::read(rm_dir.join("tokenizer.json")).ok() != std::fs::read(a.model.join("tokenizer.json")).ok() {
        bail!("--judge-reward-model {} and --model have different tokenizers", rm_dir.display());
    }
    let precision = a.precision.get();
    let report_to = super::train::report_to_flag(a.report_to.as_deref())?;
    let rm = RewardModel::load(&rm_dir)?.with_precision(precision);
    let prompts: Vec<Vec<u32>> =
        read_prompts(&a.prompts, &tok, tok.chat_template().is_some())?.into_iter().map(|p| p.ids).collect();
    let base = TrainConfig {
        model: a.model.clone(),
        ref_model: a.ref_model.clone(),
        output: a.output.clone(),
        objective: Objective::Pairs(PairObjective {
            losses: vec![(LossType::Sigmoid, 1.0)],
            cfg: LossConfig { beta: a.beta, ..Default::default() },
        }),
        lr: a.lr,
        batch_size: a.batch_size,
        max_steps: a.steps_per_round,
        epochs: 1.0,
        seed: a.seed,
        precision,
        report_to,
        ..Default::default()
    };
    let it = IterativeConfig {
        rounds: a.rounds,
        move_reference: a.move_reference,
        sampling: OnlineSampling {
            samples: a.samples,
            max_new_tokens: a.max_new_tokens,
            temperature: a.temperature,
            eos_ids: stop_ids(&model.config, &tok),
            missing_eos_penalty: a.missing_eos_penalty,
        },
        judge: format!("reward model {}", rm_dir.display()),
    };
    let judge = |items: &[(&[u32], &[u32])]| rm.score(items).map_err(|e| e.to_string());
    let stop = super::interrupt::stop_flag(None)?;
    // One bar per round's DPO run (a round's step 1 starts the next bar).
    let mut progress = Progress::new().per_step(a.batch_size, "pairs");
    let out = iterate(&base, &it, &prompts, &judge, &stop, &mut |l| progress.line(l));
    progress.finish();
    let out = out.map_err(|e| super::train::with_hint(e, "dpo iterate"))?;
    if out.interrupted {
        eprintln!("interrupted after {} rounds; run the same command again to resume", out.finals.len());
    } else if let Some(last) = out.finals.last() {
        eprintln!("done: {} rounds; the last round's model is {}", out.finals.len(), last.display());
        let mut items = vec![("rounds", format!("{} (round-K/pairs.jsonl, round-K/run/)", a.output.display()))];
        items.extend(last.parent().map(|run| super::train::run_outputs(run, report_to)).unwrap_or_default());
        written(&items);
    }
    Ok(())
}
