//! `dpo sft`: supervised fine-tuning — how the paper builds the reference model, and its preferred-FT
//! baseline (fine-tuning on the chosen completions). Same trainer, outputs and flags as `dpo train`.

use dpo::train::{train_sft, RunOptions, TrainConfig};

use super::train::{execute, resolve, DataFlags, InputFlags, OptimFlags, RunFlags};

#[derive(clap::Args, Debug, Default)]
pub struct Args {
    #[command(flatten)]
    inputs: InputFlags,
    #[command(flatten)]
    data: DataFlags,
    #[command(flatten)]
    optim: OptimFlags,
    #[command(flatten)]
    run: RunFlags,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    // TRL's SFTConfig learning rate; everything else as for DPO.
    let defaults = TrainConfig { lr: 2e-5, ..Default::default() };
    let cfg = resolve(defaults, &a.inputs, None, None, &a.data, &a.optim, &a.run)?;
    let opts = RunOptions { resume: a.inputs.resume.clone(), overwrite: a.inputs.overwrite };
    execute(&cfg, &opts, train_sft)
}
