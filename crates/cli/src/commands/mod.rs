//! One file per command.

mod adapter;
mod bench;
mod bench_engine;
mod best_of_n;
mod demo;
mod eval;
mod export;
mod generate;
mod given;
mod hints;
mod interrupt;
mod iterate;
mod logps;
mod merge;
mod next_steps;
mod online;
mod plot;
mod ppo;
mod precision;
mod progress;
mod reward;
mod reward_model;
mod run_kind;
mod sft;
mod source;
mod train;
mod version;
mod win_rate;

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

pub use source::input_error;

/// Direct Preference Optimization for Hugging Face decoder models, on the CPU, without Python.
#[derive(Parser, Debug)]
#[command(name = "dpo", version = version::text(), about, long_about = None)]
pub struct Cli {
    /// Worker threads for the math (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
    /// The flags the command line gave (a resumed run compares them with its settings).
    #[arg(skip)]
    given: given::Given,
}

impl Cli {
    /// Parses the command line as `Cli::try_parse` does, keeping which flags it gave.
    pub fn try_parse_given() -> Result<Self, clap::Error> {
        let mut cmd = <Self as clap::CommandFactory>::command();
        let mut matches = cmd.try_get_matches_from_mut(std::env::args_os())?;
        let given = given::Given::of(&matches);
        let mut cli =
            <Self as clap::FromArgMatches>::from_arg_matches_mut(&mut matches).map_err(|e| e.format(&mut cmd))?;
        cli.given = given;
        Ok(cli)
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a policy on preference pairs (DPO and its variants).
    Train(Box<train::Args>),
    /// Supervised fine-tuning on prompt/completion rows or the chosen side of preference rows.
    Sft(Box<sft::Args>),
    /// Loss and reward metrics of a model on a preference file.
    Eval(Box<eval::Args>),
    /// The implicit reward beta*log(pi/ref) of each row's completions.
    Reward(reward::Args),
    /// Sample completions from a model (KV cache, temperature, top-k, top-p), one JSON line each.
    Generate(generate::Args),
    /// Train a Bradley-Terry reward model on preference pairs, or score rows with one.
    RewardModel(reward_model::Args),
    /// Sample N completions per prompt and keep the one a reward model scores highest.
    BestOfN(best_of_n::Args),
    /// RLHF with PPO against a reward model.
    Ppo(Box<ppo::Args>),
    /// Summed log-probs of the chosen and rejected completions of every preference row.
    Logps(logps::Args),
    /// Merge a PEFT LoRA adapter into its base model and write a Hugging Face model directory.
    Merge(merge::Args),
    /// Write a model (and merged LoRA adapter) as a GGUF file for llama.cpp, with its tokenizer.
    Export(export::Args),
    /// A run's training curves (loss, rewards, accuracy, eval) from metrics.jsonl, as one PNG.
    Plot(plot::Args),
    /// DPO training throughput and peak memory on a model shape with random weights (compare with TRL).
    Bench(bench::Args),
    /// Forward and forward+backward throughput of the engine on a model shape with random weights.
    BenchEngine(bench_engine::Args),
    /// The DPO paper's sentiment experiment, built in: reward vs KL of DPO, PPO, Best-of-N and baselines.
    Demo(demo::Args),
    /// Win rate of a model against another (or a file's chosen completions) by a judge, per temperature.
    WinRate(Box<win_rate::Args>),
    /// Iterative DPO: rounds of sampling pairs from the policy, labelling them with a reward model, DPO.
    Iterate(Box<iterate::Args>),
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    dpo::train::memory::fix_allocator_threshold();
    let threads = cli.threads;
    // The trainers read `threads` from their configuration too, so they start the pool themselves.
    let other = |f: Box<dyn FnOnce() -> anyhow::Result<()>>| {
        init_threads(threads);
        f().map(|()| ExitCode::SUCCESS)
    };
    refuse_ranks(&cli.command)?;
    match cli.command {
        Command::Train(a) => train::run(*a, threads),
        Command::Sft(a) => sft::run(*a, threads),
        Command::Eval(a) => other(Box::new(move || eval::run(*a))),
        Command::Reward(a) => other(Box::new(move || reward::run(a))),
        Command::Generate(a) => other(Box::new(move || generate::run(a))),
        Command::RewardModel(a) => {
            init_threads(threads);
            reward_model::run(a, &cli.given)
        }
        Command::BestOfN(a) => other(Box::new(move || best_of_n::run(a))),
        Command::Ppo(a) => {
            init_threads(threads);
            ppo::run(*a, &cli.given)
        }
        Command::Logps(a) => other(Box::new(move || logps::run(a))),
        Command::Merge(a) => other(Box::new(move || merge::run(a))),
        Command::Export(a) => other(Box::new(move || export::run(a))),
        Command::Plot(a) => other(Box::new(move || plot::run(a))),
        Command::Bench(a) => other(Box::new(move || bench::run(a))),
        Command::BenchEngine(a) => other(Box::new(move || bench_engine::run(a))),
        Command::Demo(a) => other(Box::new(move || demo::run(a))),
        Command::WinRate(a) => other(Box::new(move || win_rate::run(*a))),
        Command::Iterate(a) => other(Box::new(move || iterate::run(*a))),
    }
}

/// Under `mpirun -np N` (N > 1), the commands that split their work across the ranks run; the others
/// would run N times over the same files, and are refused.
fn refuse_ranks(command: &Command) -> anyhow::Result<()> {
    let ranks = dpo::dist::world().size();
    let parallel = matches!(
        command,
        Command::Train(_) | Command::Sft(_) | Command::Eval(_) | Command::Logps(_) | Command::Bench(_)
    ) || matches!(command, Command::RewardModel(a) if a.trains());
    if ranks > 1 && !parallel {
        anyhow::bail!(
            "this command does not run data-parallel ({ranks} processes were started); run it as one process \
             (data parallelism: train, sft, reward-model train, eval, logps, bench)"
        );
    }
    Ok(())
}

/// Starts the thread pool of the math: `threads`, or all cores.
fn init_threads(threads: Option<usize>) {
    engine::kernels::init_threads(threads.unwrap_or_else(default_threads));
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Writes a command's output to `out` atomically (and says where), or to standard output.
fn emit(out: Option<&Path>, text: &str) -> anyhow::Result<()> {
    // A data-parallel launch: every rank holds the result, rank 0 writes it.
    if !dpo::dist::is_root() {
        return Ok(());
    }
    match out {
        Some(path) => {
            dpo::io::write_atomic(path, text.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
            progress::written(&[("output", progress::at(path))]);
            Ok(())
        }
        None => Ok(std::io::stdout().lock().write_all(text.as_bytes())?),
    }
}

/// A count that must be at least 1 (`--batch-size`): clap refuses 0 naming the flag.
fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// Refuses an output file whose directory does not exist (or is not a directory), naming the flag: a
/// command that writes its results at the end checks this before its work, not after.
fn check_output_dir(flag: &str, file: &std::path::Path) -> anyhow::Result<()> {
    let dir = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    if !dir.is_dir() {
        anyhow::bail!("{flag} {}: the directory {} does not exist", file.display(), dir.display());
    }
    if file.is_dir() {
        anyhow::bail!("{flag} {}: is a directory; name a file", file.display());
    }
    Ok(())
}
