//! `dpo sft`: supervised fine-tuning — how the paper builds the reference model, and its preferred-FT
//! baseline (fine-tuning on the chosen completions). Same trainer, outputs and flags as `dpo train`;
//! the run's config.toml records `method = "sft"`.

use std::process::ExitCode;

use dpo::train::config::Method;
use dpo::train::RunOptions;
use serde::Serialize;

use super::train::{execute, resolve, DataFlags, InputFlags, LoraFlags, OptimFlags, RunFlags};

#[derive(clap::Args, Debug, Default, Serialize)]
pub struct Args {
    #[command(flatten)]
    #[serde(flatten)]
    inputs: InputFlags,
    #[command(flatten)]
    #[serde(flatten)]
    lora: LoraFlags,
    #[command(flatten)]
    #[serde(flatten)]
    data: DataFlags,
    #[command(flatten)]
    #[serde(flatten)]
    optim: OptimFlags,
    #[command(flatten)]
    #[serde(flatten)]
    run: RunFlags,
    #[command(flatten)]
    #[serde(flatten)]
    precision: super::precision::PrecisionFlag,
}

pub fn run(a: Args, threads: Option<usize>) -> anyhow::Result<ExitCode> {
    let cfg = resolve(&a.inputs, &a, Some(Method::Sft))?;
    super::init_threads(threads.or(cfg.threads));
    let opts = RunOptions { resume: a.inputs.resume.clone(), overwrite: a.inputs.overwrite };
    execute(&cfg, &opts)
}
