//! One file per command.

mod bench_engine;
mod logps;

use clap::{Parser, Subcommand};

/// Direct Preference Optimization for Hugging Face decoder models, on the CPU, without Python.
#[derive(Parser, Debug)]
#[command(name = "dpo", version, about, long_about = None)]
pub struct Cli {
    /// Worker threads for the math (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Summed log-probs of the chosen and rejected completions of every preference row.
    Logps(logps::Args),
    /// Forward and forward+backward throughput of the engine on a model shape with random weights.
    BenchEngine(bench_engine::Args),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    engine::kernels::init_threads(cli.threads.unwrap_or_else(default_threads));
    match cli.command {
        Command::Logps(a) => logps::run(a),
        Command::BenchEngine(a) => bench_engine::run(a),
    }
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}
