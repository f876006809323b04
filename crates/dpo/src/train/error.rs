use std::path::{Path, PathBuf};

/// Why a training, evaluation or scoring run stopped.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Config(#[from] super::config::ConfigError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Model(#[from] hf::Error),
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
    #[error(transparent)]
    Objective(#[from] crate::objectives::ObjectiveError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0} already holds a run (metrics.jsonl or checkpoints); pass --overwrite to replace it or --resume {0} to continue it")]
    OutputExists(PathBuf),
    #[error("no checkpoint found in {0}; pass a run directory with checkpoints/ or a checkpoints/step-N directory")]
    NoCheckpoint(PathBuf),
    #[error("checkpoint {0} is unusable: {1}")]
    Checkpoint(PathBuf, String),
    #[error("{0}")]
    Invalid(String),
    #[error("step {step}: the {what} is not finite (rows {rows}); stopped, the newest checkpoint holds the last good state (use --on-nonfinite skip to drop such steps instead)")]
    NonFinite { step: u64, what: &'static str, rows: String },
}

impl TrainError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        TrainError::Io { path: path.to_path_buf(), source }
    }
}
