//! The self-contained world of the built-in experiment, after section 6.1 of the DPO paper
//! (Rafailov et al. 2023, "controlled sentiment generation"): prompts are prefixes of movie reviews,
//! the ground-truth reward is a sentiment classifier, and each method's reward is plotted against
//! KL(pi || ref). Everything here is made in code or shipped in the repository, so the experiment runs
//! offline: a review generator instead of IMDb, a BPE tokenizer trained on it, VADER instead of a
//! learned sentiment classifier, and PNG charts with an embedded font.

use std::path::PathBuf;

pub mod corpus;
pub mod plot;
pub mod sentiment;
pub mod tokenizer;

/// What can go wrong while making the world: the tokenizer's training and the charts.
#[derive(Debug, thiserror::Error)]
pub enum WorldError {
    #[error("tokenizer vocabulary size {got} is below {min} (256 bytes and {eot})", eot = tokenizer::EOT)]
    VocabTooSmall { got: usize, min: usize },
    #[error("no text to train the tokenizer on")]
    NoText,
    #[error("tokenizer: {what}: {reason}")]
    Tokenizer { what: &'static str, reason: String },
    #[error("{path}: {reason}")]
    Chart { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}
