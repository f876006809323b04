//! Training and evaluation: configuration, the reference model, one micro-batch of pairs, checkpoints,
//! and the loop that ties them together.

pub mod checkpoint;
pub mod config;
mod error;
pub mod kto;
pub mod memory;
pub mod pairs;
pub mod reference;
pub mod trainer;
pub mod workload;

pub use config::{OnNonFinite, TrainConfig};
pub use error::TrainError;
pub use kto::KtoWorkload;
pub use pairs::{pair_batch, BatchOutcome, PairObjective, Workspace};
pub use reference::Reference;
pub use trainer::{evaluate, train, train_sft, RunOptions, TrainOutcome};
pub use workload::{PairWorkload, SftWorkload, Workload};
