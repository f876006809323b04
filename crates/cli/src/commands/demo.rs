//! `dpo demo`: the DPO paper's controlled sentiment experiment (section 6.1, figure 2 left), built in:
//! a small GPT pretrained on generated reviews, preference pairs ranked by a sentiment scorer, and DPO
//! against PPO, Preferred-FT, Unlikelihood and Best-of-N on the reward / KL plane.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use dpo_demo::experiment::{run as run_demo, DemoOptions};

use super::progress::Progress;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Directory for everything the experiment writes: report.md, report.json, frontier.png,
    /// gradient_weight.png, data/, runs/ (models and checkpoints). Its previous demo outputs are replaced.
    #[arg(long, default_value = "runs/demo")]
    pub output: PathBuf,
    /// A smaller world and fewer settings and steps (about a minute instead of about six, on 2 cores).
    #[arg(long)]
    pub quick: bool,
    /// Run the experiment on this Hugging Face checkpoint instead of pretraining the built-in model:
    /// pairs are sampled from it on the built-in review prompts, and it is the start and the reference
    /// of every method (fewer settings and steps).
    #[arg(long, value_parser = super::source::model_arg)]
    pub model: Option<PathBuf>,
    /// Run only these methods (comma-separated): dpo, preferred-ft, unlikelihood, ppo, ppo-gt, bon, online,
    /// iterative, win-rate (the win rates of the methods that ran).
    #[arg(long, value_delimiter = ',')]
    pub methods: Vec<String>,
    /// Change a setting of the experiment's plan (repeatable), by its path in report.json's `plan`:
    /// `--set dpo.lr=1e-4 --set 'dpo_betas=[0.1,1]'`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Repeat the whole experiment with this many seeds (the plan's seed, then the next ones; the first in
    /// OUTPUT, seed s in OUTPUT/seeds/seed-s) and report means with 95% intervals across seeds, and which
    /// orderings hold beyond them, in report.md ("Across seeds") and report.json (`seeds`, `across_seeds`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100))]
    pub seeds: u64,
    #[command(flatten)]
    precision: super::precision::PrecisionFlag,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let stop = super::interrupt::stop_flag(None)?;
    let opts = DemoOptions {
        output: a.output.clone(),
        quick: a.quick,
        model: a.model.clone(),
        methods: a.methods.clone(),
        set: a.set.clone(),
        precision: a.precision.given(),
        seeds: a.seeds as usize,
    };
    let t = Instant::now();
    let mut progress = Progress::new();
    let report = run_demo(&opts, &stop, &mut |line| progress.line(line))
        .with_context(|| format!("dpo demo (output {})", a.output.display()))?;
    progress.finish();
    println!("{}", report.table());
    println!("{}", report.verdict);
    for c in &report.checks {
        println!("- {c}");
    }
    for r in &report.reward_accuracy {
        println!("ranking accuracy on held-out pairs, {}: {:.3}", r.scorer, r.accuracy);
    }
    if let Some(across) = &report.across_seeds {
        println!("across {} seeds:", across.seeds.len());
        for o in &across.orderings {
            println!("- {}", o.sentence);
        }
    }
    for g in &report.gaps {
        println!("gap: {g}");
    }
    println!("done in {:.0} s; report: {}", t.elapsed().as_secs_f64(), a.output.join("report.md").display());
    Ok(())
}
