//! Training and evaluation: configuration, the reference model, one micro-batch of pairs, checkpoints,
//! and the loop that ties them together.

pub mod checkpoint;
pub mod config;
mod error;
pub mod pairs;
pub mod reference;
pub mod trainer;

pub use config::{OnNonFinite, TrainConfig};
pub use error::TrainError;
pub use pairs::{pair_batch, PairObjective, Workspace};
pub use reference::Reference;
pub use trainer::{evaluate, train, RunOptions, TrainOutcome};
