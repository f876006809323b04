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
    Reference(#[from] super::reference::ReferenceError),
    #[error(transparent)]
    Objective(#[from] crate::objectives::ObjectiveError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0} already holds a run (metrics.jsonl or checkpoints); pass --overwrite to replace it or --resume {0} to continue it")]
    OutputExists(PathBuf),
    #[error(
        "no checkpoint found in {}{detail}; the run cannot be continued: start it again with --overwrite (or \
         pass a run directory with checkpoints/step-N, or such a checkpoint directory, to --resume)",
        run.display()
    )]
    NoCheckpoint { run: PathBuf, detail: String },
    #[error(
        "{} is in use by another process ({}); a run directory takes one process at a time: wait for it to \
         end, or choose another --output",
        run.display(),
        if holder.is_empty() { "lock file .lock".to_string() } else { format!("pid {holder}, lock file .lock") }
    )]
    Locked { run: PathBuf, holder: String },
    #[error(
        "{checkpoint} does not fit {model}: {detail}; a resumed run continues from the model it started with \
         (nothing was written)"
    )]
    ModelMismatch { checkpoint: String, model: String, detail: String },
    #[error("checkpoint {0} is unusable: {1}")]
    Checkpoint(PathBuf, String),
    #[error("{0}")]
    Invalid(String),
    #[error(
        "step {step}: the {what} is not finite (rows {rows}); the step was not applied and the run stopped. \
         {} holds the last good state: `dpo train --resume {} --on-nonfinite skip` continues and skips such \
         steps (or lower --lr or --beta, or look at those rows)",
        checkpoint.display(),
        output.display()
    )]
    NonFinite { step: u64, what: &'static str, rows: String, checkpoint: PathBuf, output: PathBuf },
    #[error(
        "could not write the checkpoint of step {step}: {message}; nothing of it was left behind. {}",
        resume_hint(newest.as_deref(), output)
    )]
    CheckpointWrite { step: u64, message: String, newest: Option<PathBuf>, output: PathBuf },
    #[error(
        "could not write the final model: {message}; checkpoint {} holds the trained weights: free disk \
         space, then `dpo train --resume {}` writes final/ again",
        checkpoint.display(),
        output.display()
    )]
    FinalWrite { message: String, checkpoint: PathBuf, output: PathBuf },
    #[error("{}: {msg}; choose another --output", path.display())]
    Output { path: PathBuf, msg: String },
    #[error("{0}")]
    Memory(String),
}

fn resume_hint(newest: Option<&Path>, output: &Path) -> String {
    match newest {
        Some(p) => format!(
            "The newest complete checkpoint is {}: free disk space, then continue with `dpo train --resume {}`",
            p.display(),
            output.display()
        ),
        None => "No checkpoint was completed: free disk space, then start again with --overwrite".to_string(),
    }
}

impl TrainError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        TrainError::Io { path: path.to_path_buf(), source }
    }
}
