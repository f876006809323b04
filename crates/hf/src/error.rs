//! One error type for the crate. Every variant names the file, tensor or JSON field at fault and, where
//! there is one, what to do about it.

use std::path::{Path, PathBuf};

/// Everything that can go wrong reading or writing a Hugging Face model directory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{}: invalid JSON: {source}", path.display())]
    Json { path: PathBuf, source: serde_json::Error },

    /// A `config.json` field is missing, has the wrong type, or holds a value this crate cannot map.
    #[error("{}: field `{field}`: {msg}", path.display())]
    ConfigField { path: PathBuf, field: String, msg: String },

    #[error(
        "{}: model_type `{model_type}` is not supported; supported: {}",
        path.display(),
        crate::config::supported_model_types().collect::<Vec<_>>().join(", ")
    )]
    UnsupportedModelType { path: PathBuf, model_type: String },

    #[error(
        "{}: rope type `{rope_type}` is not supported (supported: default, linear, llama3); \
         use a checkpoint without this rope scaling",
        path.display()
    )]
    UnsupportedRope { path: PathBuf, rope_type: String },

    /// A malformed or unsupported safetensors file; `tensor` names the entry when one is at fault.
    #[error("{}{}: {msg}", path.display(), tensor.as_ref().map(|t| format!(": tensor `{t}`")).unwrap_or_default())]
    Safetensors { path: PathBuf, tensor: Option<String>, msg: String },

    /// A sharded checkpoint's index names a shard that cannot be used.
    #[error("{}: shard `{shard}`: {msg}", index.display())]
    Shard { index: PathBuf, shard: String, msg: String },

    #[error(
        "{}: only pickle checkpoints (*.bin) found; pickle checkpoints are not loaded (they can run code). \
         Convert to safetensors with: python -c \"from transformers import AutoModelForCausalLM as M; \
         M.from_pretrained('{0}').save_pretrained('{0}-safetensors', safe_serialization=True)\"",
        dir.display()
    )]
    PickleOnly { dir: PathBuf },

    #[error(
        "{}: no model.safetensors or model.safetensors.index.json; point at a Hugging Face model directory \
         saved with safetensors",
        dir.display()
    )]
    NoWeights { dir: PathBuf },

    /// Every problem found matching checkpoint tensors to the model (missing, unexpected, wrong shape,
    /// non-finite), one per line.
    #[error("{}: the weights cannot be loaded ({} problem(s)):\n  {}", path.display(), problems.len(), problems.join("\n  "))]
    Weights { path: PathBuf, problems: Vec<String> },

    #[error("{}: {msg}", path.display())]
    Tokenizer { path: PathBuf, msg: String },

    #[error("chat template from {source_name} failed to render: {msg}")]
    ChatTemplate { source_name: String, msg: String },

    #[error("{}: no chat template (neither chat_template.jinja nor tokenizer_config.json's `chat_template`); \
             pass the prompt as plain text or add a template", dir.display())]
    NoChatTemplate { dir: PathBuf },

    /// A LoRA target (a `target_modules` entry, a `--lora-targets` name) that does not resolve to linear
    /// layers of the model. `origin` is the file and field, or the flag, it came from.
    #[error("{origin}: target `{target}`: {msg}")]
    LoraTarget { origin: String, target: String, msg: String },

    /// LoRA settings given on the command line that cannot make an adapter.
    #[error("LoRA {what}: {msg}")]
    InvalidLora { what: String, msg: String },

    /// A hub id (`org/name[@revision]`) that the local Hugging Face cache at `cache` cannot provide.
    #[error("`{spec}`: {msg} (Hugging Face cache searched: {})", cache.display())]
    Hub { spec: String, cache: PathBuf, msg: String },

    /// A model directory that is missing, not a directory, incomplete, or unsafe to overwrite.
    #[error("{}: {msg}", path.display())]
    ModelDir { path: PathBuf, msg: String },

    /// An output that is, lies inside or holds one of the command's own inputs (`relation` says which
    /// input, and how): writing it would destroy what the command reads ([`crate::output`]).
    #[error("{}: the output {relation}; nothing was written", output.display())]
    OutputIsInput { output: PathBuf, relation: String },

    /// An output that already holds a model or is an existing file: replaced only when the caller asks
    /// ([`crate::output`]).
    #[error("{}: {what}; nothing was written", path.display())]
    OutputExists { path: PathBuf, what: String },

    /// An output larger than the free space of the file system it goes to ([`crate::output::check_room`]).
    #[error(
        "{}: {what} needs {} but its file system has {} free; nothing was written",
        path.display(),
        size(*need),
        size(*free)
    )]
    NoRoom { path: PathBuf, what: String, need: u64, free: u64 },
}

/// Bytes as messages give a size: in the largest of KiB, MiB and GiB it is at least one of.
fn size(bytes: u64) -> String {
    let (unit, name) = [(1u64 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")]
        .into_iter()
        .find(|&(unit, _)| bytes >= unit)
        .unwrap_or((1, "bytes"));
    match unit {
        1 => format!("{bytes} bytes"),
        _ => format!("{:.2} {name}", bytes as f64 / unit as f64),
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io { path: path.to_path_buf(), source }
    }

    pub(crate) fn json(path: &Path, source: serde_json::Error) -> Self {
        Error::Json { path: path.to_path_buf(), source }
    }

    pub(crate) fn field(path: &Path, field: &str, msg: impl Into<String>) -> Self {
        Error::ConfigField { path: path.to_path_buf(), field: field.to_string(), msg: msg.into() }
    }

    pub(crate) fn st(path: &Path, tensor: Option<&str>, msg: impl Into<String>) -> Self {
        Error::Safetensors { path: path.to_path_buf(), tensor: tensor.map(str::to_string), msg: msg.into() }
    }

    pub(crate) fn dir(path: &Path, msg: impl Into<String>) -> Self {
        Error::ModelDir { path: path.to_path_buf(), msg: msg.into() }
    }
}

/// Reads and parses a JSON file, naming the file in either failure.
pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_slice(&text).map_err(|e| Error::json(path, e))
}
