//! Where a command's models come from: a local directory, or a hub id (`org/name[@revision]`) resolved
//! in the local Hugging Face cache. The one place model arguments are turned into directories: every
//! `--model`, `--ref-model`, `--reward-model` and `--adapter` parses through [`model_arg`], so what a
//! command (and a run's config.toml) sees is the snapshot directory.

use std::path::{Path, PathBuf};

/// Clap's value parser for a model (or adapter) argument.
pub fn model_arg(s: &str) -> Result<PathBuf, String> {
    hf::hub_cache::resolve_model(Path::new(s)).map_err(|e| e.to_string())
}

