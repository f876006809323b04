//! A Bradley-Terry reward model: the first stage of the RLHF pipeline DPO replaces (Ouyang et al. 2022;
//! Rafailov et al. 2023, section 3), and the scorer of Best-of-N and PPO.
//!
//! A decoder trunk (usually the SFT checkpoint) with an [`engine::ScalarHead`] on the final hidden state of
//! the last token of `prompt ++ completion`:
//! ```text
//! r(x, y) = w · h_last(x ++ y) + b                       w: [1, d], b: [1]
//! loss    = mean over pairs of -log sigmoid(r(x, y_w) - r(x, y_l))
//! ```
//! as TRL's `RewardTrainer` (an `AutoModelForSequenceClassification` with one label, read at the last
//! token). The gradient flows into the head and, through [`engine::Decoder::backward`] with a hidden-state
//! gradient that is nonzero only at the last-token rows, into the whole trunk. The loss depends on
//! reward differences only, so `b` receives exactly zero gradient (as does the final LayerNorm's shift,
//! which moves every reward alike): `b` is kept, at its initial value 0, so that a head trained elsewhere
//! with a bias loads unchanged.
//!
//! On disk a reward model is a Hugging Face directory of the trunk (`hf::save_model`, loadable by
//! `transformers` as the causal LM it came from) plus `reward_head.safetensors` with `score.weight`
//! `[1, d]` and `score.bias` `[1]`, written together and renamed into place.
//!
//! The last token is the last token of the sequence as tokenized: with TRL's tokenization that is the EOS
//! token appended to text completions. (transformers reads the last non-pad token, which differs only
//! when the pad token is the EOS token.)
//!
//! [`model`] scores, saves and loads; [`train`] trains on preference pairs.

pub mod model;
mod shard;
pub mod train;

use std::path::{Path, PathBuf};

pub use model::{RewardModel, HEAD_FILE};
pub use train::{
    accuracy, evaluate, run_reward_model, train_reward_model, RmOutcome, RmRun, RmStart, RmStepStats, RmTrainConfig,
};

/// Why building, training, scoring, saving or loading a reward model failed.
#[derive(Debug, thiserror::Error)]
pub enum RewardModelError {
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
    #[error(transparent)]
    Model(#[from] hf::Error),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// The head file is missing, malformed or does not fit the trunk.
    #[error("{}: {msg}", path.display())]
    Head { path: PathBuf, msg: String },
    #[error("{0}")]
    Invalid(String),
    /// Checkpoints, the run directory, metrics.
    #[error(transparent)]
    Run(#[from] crate::train::TrainError),
    #[error(
        "reward-model step {step}: the {what} is not finite (rows {rows}); lower the learning rate or check these rows"
    )]
    NonFinite { step: u64, what: &'static str, rows: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RewardModelError + '_ {
    move |source| RewardModelError::Io { path: path.to_path_buf(), source }
}

#[cfg(test)]
mod tests;
