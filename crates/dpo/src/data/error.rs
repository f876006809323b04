use std::path::PathBuf;

/// Everything that can be wrong with a data file, each naming the file and, where there is one, the
/// line (JSONL), element (JSON array) or row (Parquet) and the field.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "{path} is a directory; pass a data file (.jsonl, .json, .parquet, .arrow), a datasets save_to_disk \
         directory or a dataset repository with --split"
    )]
    IsDirectory { path: PathBuf },
    #[error("{path} holds no rows")]
    Empty { path: PathBuf },
    #[error("{path}: unsupported file type {ext:?}; use .jsonl, .json, .parquet or .arrow")]
    UnsupportedFormat { path: PathBuf, ext: String },
    #[error("{path}, {location}: {message}")]
    Parse { path: PathBuf, location: String, message: String },
    #[error("{path}, {location}, field `{field}`: {message}")]
    Field { path: PathBuf, location: String, field: String, message: String },
    #[error("{path}, {location}: {message}")]
    Tokenize { path: PathBuf, location: String, message: String },
    /// Every row was skipped or dropped: training on nothing is never what was meant.
    #[error("{path}: no usable rows ({summary})")]
    NoExamples { path: PathBuf, summary: String },
    /// A row longer than a model with learned positions can read.
    #[error(
        "{path}, {location}: the row's longest sequence has {tokens} tokens, more than the {max} positions the \
         model has (learned positions; truncate rows to at most {max} tokens)"
    )]
    TooLong { path: PathBuf, location: String, tokens: usize, max: usize },
    /// A dataset directory, repository or pattern that does not give the rows asked for.
    #[error("{path}: {message}")]
    Dataset { path: PathBuf, message: String },
    /// A dataset hub id the local Hugging Face cache cannot provide.
    #[error(transparent)]
    Hub(#[from] hf::Error),
    #[error("invalid data option: {0}")]
    Options(String),
}
