use std::path::{Path, PathBuf};

/// Why a training, evaluation or scoring run stopped. The messages state facts (files, steps, rows);
/// the command line adds what to do about them, in its own flags' words.
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
    #[error("{0} already holds a run (metrics.jsonl or checkpoints)")]
    OutputExists(PathBuf),
    #[error(
        "no checkpoint found in {}{detail}; the run cannot be continued from it",
        run.display()
    )]
    NoCheckpoint { run: PathBuf, detail: String },
    #[error(
        "{} is in use by another process ({}); a run directory takes one process at a time",
        run.display(),
        if holder.is_empty() { "lock file .lock".to_string() } else { format!("pid {holder}, lock file .lock") }
    )]
    Locked { run: PathBuf, holder: String },
    #[error(
        "{checkpoint} does not fit {model}: {detail}; a resumed run continues from the model it started with \
         (nothing was written)"
    )]
    ModelMismatch { checkpoint: String, model: String, detail: String },
    #[error(
        "{} cannot be resumed with other settings or inputs than it started with: {}; a resumed run continues \
         with its config.toml and inputs (nothing was written)",
        run.display(),
        changes.iter().map(|c| c.to_string()).collect::<Vec<_>>().join("; ")
    )]
    ResumeChanged { run: PathBuf, changes: Vec<super::resume::Change> },
    #[error("checkpoint {0} is unusable: {1}")]
    Checkpoint(PathBuf, String),
    #[error("{0}")]
    Invalid(String),
    #[error(
        "step {step}: the {what} is not finite (rows {rows}); the step was not applied and the run stopped. \
         {} holds the last good state",
        checkpoint.display()
    )]
    NonFinite { step: u64, what: &'static str, rows: String, checkpoint: PathBuf, output: PathBuf },
    #[error(
        "could not write the checkpoint of step {step}: {message}; nothing of it was left behind. {}",
        newest_fact(newest.as_deref())
    )]
    CheckpointWrite { step: u64, message: String, newest: Option<PathBuf>, output: PathBuf },
    #[error(
        "could not write the final model: {message}; checkpoint {} holds the trained weights",
        checkpoint.display()
    )]
    FinalWrite { message: String, checkpoint: PathBuf, output: PathBuf },
    #[error("{}: {msg}", path.display())]
    Output { path: PathBuf, msg: String },
    /// The run directory `path` would replace or overwrite one of the run's own inputs.
    #[error("{}: {msg}", path.display())]
    InputInRun { path: PathBuf, msg: String },
    #[error("{0}")]
    Memory(String),
    #[error(
        "{objective} scores every batch under a reference model (its KL pairs are formed per batch), and this run \
         has no reference model loaded"
    )]
    NeedsReferenceModel { objective: &'static str },
}

/// What a failed checkpoint write leaves to continue from.
fn newest_fact(newest: Option<&Path>) -> String {
    match newest {
        Some(p) => format!("The newest complete checkpoint is {}", p.display()),
        None => "No checkpoint was completed".to_string(),
    }
}

impl TrainError {
    /// What a failure to write the final model (or the merged one) becomes: the message, with the
    /// checkpoint the run can be resumed from and its output directory.
    pub(crate) fn final_write<'a>(
        checkpoint: &'a Path,
        output: &'a Path,
    ) -> impl Fn(hf::Error) -> TrainError + Copy + 'a {
        move |e| TrainError::FinalWrite {
            message: e.to_string(),
            checkpoint: checkpoint.to_path_buf(),
            output: output.to_path_buf(),
        }
    }

    pub fn io(path: &Path, source: std::io::Error) -> Self {
        TrainError::Io { path: path.to_path_buf(), source }
    }
}
