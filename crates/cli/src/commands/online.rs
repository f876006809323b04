//! `dpo train --online`: online DPO ([`dpo::train::online`]): every step samples completions of its
//! prompts from the current policy, a reward model labels each prompt's best and worst, and the step is
//! the DPO objective's on those pairs (TRL's `OnlineDPOTrainer`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use dpo::data::prompts::{read_prompts, stop_ids};
use dpo::rlhf::reward::RewardModel;
use dpo::train::online::{train_online, OnlineJudge, OnlineSampling};
use dpo::train::run_dir::model_of;
use dpo::train::{RunOptions, TrainConfig};

use super::progress::{written, Progress};

#[derive(clap::Args, Debug, Default, Clone)]
#[command(next_help_heading = "Online DPO (--online)")]
pub struct OnlineFlags {
    /// Online DPO: sample pairs from the policy at every step and label them with --judge-reward-model,
    /// instead of reading preference pairs (--prompts replaces --data).
    #[arg(long, requires_all = ["judge_reward_model", "prompts"])]
    pub online: bool,
    /// The judge of the sampled completions: `dpo reward-model train`'s run directory (or its final/).
    #[arg(long, value_name = "RM", requires = "online")]
    pub judge_reward_model: Option<PathBuf>,
    /// Prompts (rows with `prompt` or `prompt_ids`); --batch-size of them per micro-batch.
    #[arg(long, value_name = "FILE", requires = "online", conflicts_with = "data")]
    pub prompts: Option<PathBuf>,
    /// Completions sampled per prompt; the best and the worst by the judge form its pair.
    #[arg(long, default_value_t = 2, requires = "online")]
    pub online_samples: usize,
    /// New tokens per sampled completion at most.
    #[arg(long, default_value_t = 64, requires = "online")]
    pub online_max_new_tokens: usize,
    /// Sampling temperature of the completions.
    #[arg(long, default_value_t = 1.0, requires = "online")]
    pub online_temperature: f32,
    /// Subtracted from the judge's score of a completion that ends without EOS (TRL's missing_eos_penalty).
    #[arg(long, requires = "online")]
    pub missing_eos_penalty: Option<f64>,
}

/// Trains; an interrupted run exits with 130 and says how to resume it (with the same online flags).
pub fn run(f: &OnlineFlags, cfg: &TrainConfig, opts: &RunOptions) -> anyhow::Result<ExitCode> {
    if f.online_samples < 2 {
        bail!("--online-samples must be at least 2 (a pair)");
    }
    if f.online_max_new_tokens == 0 || !(f.online_temperature > 0.0 && f.online_temperature.is_finite()) {
        bail!("--online-max-new-tokens must be at least 1 and --online-temperature a finite number > 0");
    }
    let (Some(rm_dir), Some(prompts_path)) = (&f.judge_reward_model, &f.prompts) else {
        bail!("--online needs --judge-reward-model RM and --prompts FILE");
    };
    let model = hf::load_model(&cfg.model)?;
    let tok = hf::load_tokenizer(&cfg.model)?;
    let rm_dir = model_of(rm_dir);
    if std::fs::read(rm_dir.join("tokenizer.json")).ok() != std::fs::read(cfg.model.join("tokenizer.json")).ok() {
        bail!("--judge-reward-model {} and --model have different tokenizers", rm_dir.display());
    }
    let rm = RewardModel::load(&rm_dir)?.with_precision(cfg.precision);
    let prompts: Vec<Vec<u32>> =
        read_prompts(prompts_path, &tok, tok.chat_template().is_some())?.into_iter().map(|p| p.ids).collect();
    let sampling = OnlineSampling {
        samples: f.online_samples,
        max_new_tokens: f.online_max_new_tokens,
        temperature: f.online_temperature,
        eos_ids: stop_ids(&model.config, &tok),
        missing_eos_penalty: f.missing_eos_penalty,
    };
    let score = |items: &[(&[u32], &[u32])]| rm.score(items).map_err(|e| e.to_string());
    // The judge by its absolute directory: a resume from elsewhere names the same one.
    let name = std::path::absolute(&rm_dir).unwrap_or(rm_dir.clone()).display().to_string();
    let judge = OnlineJudge { name: format!("reward model {name}"), score: &score };
    let stop = super::interrupt::stop_flag(Some(&cfg.output))?;
    let mut progress = Progress::new().per_step(cfg.batch_size * cfg.grad_accum, "prompts");
    let out = train_online(cfg, &sampling, &prompts, &judge, opts, &stop, &mut |l| progress.line(l));
    progress.finish();
    let out = out.map_err(|e| super::train::with_hint(e, "dpo train --online"))?;
    match out.final_dir {
        Some(d) => {
            eprintln!("done: {} online steps; model written to {}", out.steps, d.display());
            written(&super::train::run_outputs(&cfg.output, cfg.report_to));
            Ok(ExitCode::SUCCESS)
        }
        None => {
            let ck = out.checkpoint.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
            eprintln!(
                "interrupted after step {}/{}; checkpoint written to {ck}\nresume with: dpo train --online \
                 --judge-reward-model {} --prompts {} (and the same --online-* flags) --resume {}",
                out.steps,
                out.total_steps,
                rm_dir.display(),
                prompts_path.display(),
                cfg.output.display()
            );
            Ok(ExitCode::from(130))
        }
    }
}
