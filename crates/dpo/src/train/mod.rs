//! Training and evaluation: configuration, the reference model, one micro-batch of pairs, checkpoints,
//! the run directory, and the loop that ties them together.
//!
//! ```text
//! config.rs   TrainConfig: typed settings, parsed once, validated
//! lora.rs     a LoRA run's adapter: new or from a PEFT directory, and what its reference reads
//! policy.rs   Trained: every weight, or an adapter (the optimizer's and the gradient's parameter set)
//! setup.rs    validate and load everything (model, data, reference, checkpoint) before the disk is touched
//! run_dir.rs  RunDir: lock, create or replace, config.toml, metrics.jsonl, abandoned checkpoints
//! resume.rs   what a resume must keep: the settings that change the numbers, the inputs' contents
//! loop.rs     Trainer::step (one optimizer step of any Workload) and run (order, evaluation,
//!             checkpoints, signals, non-finite steps)
//! ```

pub mod checkpoint;
pub mod config;
mod error;
mod frozen_base;
pub mod iterative;
pub mod kto;
pub mod lora;
pub mod memory;
pub mod online;
pub mod pairs;
pub mod policy;
pub mod reference;
pub mod resume;
pub mod run_dir;
pub mod setup;
#[path = "loop.rs"]
pub mod train_loop;
pub mod unlikelihood;
pub mod workload;

pub use config::{ByteSize, Method, Objective, OnNonFinite, OptimizerKind, TrainConfig};
pub use error::TrainError;
pub use kto::KtoWorkload;
pub use lora::LoraRun;
pub use pairs::{pair_batch, BatchOutcome, PairObjective, Workspace};
pub use policy::Trained;
pub use reference::Reference;
pub use run_dir::{RunDir, StartMode};
pub use setup::{setup, RunOptions, Setup, Start};
pub use train_loop::{
    epoch_order, evaluate, evaluate_counting, run, total_steps, train, train_sft, StepOutcome, TrainOutcome, Trainer,
    MERGED_DIR,
};
pub use unlikelihood::UnlikelihoodWorkload;
pub use workload::{PairWorkload, SftWorkload, Workload};
