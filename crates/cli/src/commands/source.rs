//! Where a command's models come from: a local directory, or a hub id (`org/name[@revision]`) resolved
//! in the local Hugging Face cache. The one place model arguments are turned into directories: every
//! `--model`, `--ref-model`, `--reward-model` and `--adapter` parses through [`model_arg`], so what a
//! command (and a run's config.toml) sees is the snapshot directory.

use std::path::{Path, PathBuf};

/// Clap's value parser for a model (or adapter) argument.
pub fn model_arg(s: &str) -> Result<PathBuf, String> {
    hf::hub_cache::resolve_model(Path::new(s)).map_err(|e| e.to_string())
}

/// Which rows of a dataset `--data` reads when it names a dataset rather than a file: a hub id
/// (`org/name[@revision]`) in the local Hugging Face cache, a repository directory laid out as the hub
/// lays it out, or a `datasets` save_to_disk directory. Every `--data` goes through [`SplitFlags::data`],
/// the one resolver (`dpo::data::resolve_data`).
#[derive(clap::Args, Debug, Default, Clone)]
pub struct SplitFlags {
    /// With a dataset (hub id, repository directory, DatasetDict directory): the split to read [default:
    /// train; test for --eval-data].
    #[arg(long)]
    pub split: Option<String>,
    /// With a dataset repository: the subset (configuration) whose files to read.
    #[arg(long)]
    pub subset: Option<String>,
}

impl SplitFlags {
    /// What `--data` reads (a file, a saved dataset directory, or a pattern over a split's shards).
    pub fn data(&self, spec: &Path) -> anyhow::Result<PathBuf> {
        Ok(dpo::data::resolve_data(spec, self.split.as_deref(), self.subset.as_deref())?)
    }

    /// What `--eval-data` reads: its split is `test` unless `--eval-split` says otherwise.
    pub fn eval_data(&self, spec: &Path, eval_split: Option<&str>) -> anyhow::Result<PathBuf> {
        Ok(dpo::data::resolve_data(spec, Some(eval_split.unwrap_or("test")), self.subset.as_deref())?)
    }
}
