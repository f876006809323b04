//! Where a command's models come from: a local directory, or a hub id (`org/name[@revision]`) resolved
//! in the local Hugging Face cache. The one place model arguments are turned into directories: every
//! `--model`, `--ref-model`, `--reward-model` and `--adapter` parses through [`model_arg`], so what a
//! command (and a run's config.toml) sees is the snapshot directory.

use std::path::{Path, PathBuf};

/// Clap's value parser for a model (or adapter) argument. Its error stays typed for [`input_error`].
pub fn model_arg(s: &str) -> Result<PathBuf, hf::Error> {
    hf::hub_cache::resolve_model(Path::new(s))
}

/// A model argument that does not resolve (a hub id missing from the cache, a malformed one) is input
/// that fails, not a usage mistake: the message the binary prints once, with status 1, in place of clap's
/// usage error (status 2). `None` for every other parse error, which clap reports itself.
pub fn input_error(e: &clap::Error) -> Option<String> {
    let hub = std::error::Error::source(e)?.downcast_ref::<hf::Error>()?;
    let flag = match e.get(clap::error::ContextKind::InvalidArg) {
        Some(clap::error::ContextValue::String(arg)) => arg.split_whitespace().next().unwrap_or(arg).to_string(),
        _ => "the model argument".into(),
    };
    Some(format!("{flag}: {hub}"))
}

/// Which rows of a dataset `--data` reads when it names a dataset rather than a file: a hub id
/// (`org/name[@revision]`) in the local Hugging Face cache, a repository directory laid out as the hub
/// lays it out, or a `datasets` save_to_disk directory. Every `--data` goes through [`SplitFlags::data`],
/// the one resolver (`dpo::data::resolve_data`).
#[derive(clap::Args, Debug, Default, Clone)]
pub struct SplitFlags {
    /// With a dataset (hub id, repository directory, DatasetDict directory): the split to read [default:
    /// train; test for the --eval-data of a command that takes one].
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
