//! Where a command's rows come from: one resolver for every `--data` (and `--eval-data`), turning what the
//! user named into a path [`super::read::map_records`] reads:
//!
//! ```text
//! a data file (.jsonl .json .parquet .arrow)               as it is
//! a Dataset.save_to_disk directory (state.json, *.arrow)   as it is
//! a DatasetDict.save_to_disk directory (dataset_dict.json) its split's subdirectory
//! a dataset repository: org/name[@rev] in the Hugging Face  the split's files, chosen by name as the hub
//!   cache, or a local directory laid out the same way      lays them out (below), one file or a pattern
//! ```
//!
//! In a repository the split's files are looked for under `<subset>/` (with `--subset`), else `data/`,
//! else the top level, as `<split>-*.<ext>` (the hub's shards, `train-00000-of-00002.parquet`),
//! `<split>.<ext>` or `<split>/*.<ext>`, for `ext` in parquet, jsonl, json, arrow. Several shards
//! resolve to a pattern (`data/train-*.parquet`) that the reader expands, so the resolved path is one
//! path: it is what a run's config.toml records, and a resumed run reads the same files.

use std::path::{Path, PathBuf};

use hf::hub_cache::{resolve_arg, RepoKind};

use super::DataError;

/// File types a dataset's files may have, in the order they are looked for.
const EXTENSIONS: [&str; 4] = ["parquet", "jsonl", "json", "arrow"];

/// Resolves `spec` (a file, a saved dataset, a repository directory or a hub id) to what the reader
/// reads. `split` defaults to `train`; `subset` names a configuration of a repository.
pub fn resolve_data(spec: &Path, split: Option<&str>, subset: Option<&str>) -> Result<PathBuf, DataError> {
    let split_name = split.unwrap_or("train");
    if spec.is_dir() {
        if spec.join("dataset_dict.json").is_file() {
            return dict_split(spec, split_name);
        }
        // A saved dataset, or a directory holding no data files at all (which the reader refuses, saying
        // that it is a directory).
        let empty = || splits_in(&[spec.join("data"), spec.to_path_buf()]).is_empty() && subsets_in(spec).is_empty();
        if spec.join("state.json").is_file() || empty() {
            return Ok(spec.to_path_buf());
        }
        return split_files(spec, split_name, subset);
    }
    if spec.exists() || has_pattern(spec) {
        return Ok(spec.to_path_buf());
    }
    let resolved = resolve_arg(RepoKind::Dataset, spec)?;
    if resolved == spec {
        return Ok(resolved);
    }
    split_files(&resolved, split_name, subset)
}

/// `dir/<split>` of a `DatasetDict.save_to_disk` directory, or an error listing its splits.
fn dict_split(dir: &Path, split: &str) -> Result<PathBuf, DataError> {
    let sub = dir.join(split);
    if sub.join("state.json").is_file() {
        return Ok(sub);
    }
    let index = dir.join("dataset_dict.json");
    let splits: Vec<String> = std::fs::read(&index)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.get("splits")?.as_array().cloned())
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    Err(DataError::Dataset {
        path: dir.to_path_buf(),
        message: format!(
            "a DatasetDict without a split `{split}`; its splits: {}; pick one with --split",
            list(&splits)
        ),
    })
}

/// The files of `split` in the repository at `root`: one file, or a pattern over its shards.
fn split_files(root: &Path, split: &str, subset: Option<&str>) -> Result<PathBuf, DataError> {
    let bases = match subset {
        Some(s) => vec![root.join(s), root.join("data").join(s)],
        None => vec![root.join("data"), root.to_path_buf()],
    };
    for base in bases.iter().filter(|b| b.is_dir()) {
        for ext in EXTENSIONS {
            let shards = matching(base, &format!("{split}-"), &format!(".{ext}"));
            match shards.as_slice() {
                [] => {}
                [one] => return Ok(one.clone()),
                _ => return Ok(base.join(format!("{split}-*.{ext}"))),
            }
            let single = base.join(format!("{split}.{ext}"));
            if single.is_file() {
                return Ok(single);
            }
            let dir = base.join(split);
            match matching(&dir, "", &format!(".{ext}")).as_slice() {
                [] => {}
                [one] => return Ok(one.clone()),
                _ => return Ok(dir.join(format!("*.{ext}"))),
            }
        }
    }
    let looked = bases.iter().map(|b| b.display().to_string()).collect::<Vec<_>>().join(", ");
    let mut message = format!(
        "no files of split `{split}` (looked for {split}-*.ext, {split}.ext and {split}/*.ext with ext one of \
         {} in {looked}); splits found: {}",
        EXTENSIONS.join(", "),
        list(&splits_in(&bases))
    );
    if subset.is_none() {
        message += &format!("; subsets (--subset) found: {}", list(&subsets_in(root)));
    }
    Err(DataError::Dataset { path: root.to_path_buf(), message })
}

fn list(names: &[String]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

fn is_data_file(name: &str) -> bool {
    EXTENSIONS.iter().any(|e| name.strip_suffix(e).is_some_and(|s| s.ends_with('.')))
}

/// Split names the data files under `bases` suggest: `train` of `train-00000-of-00001.parquet`,
/// `train.jsonl` or `train/0000.parquet`.
fn splits_in(bases: &[PathBuf]) -> Vec<String> {
    let mut out = Vec::new();
    for base in bases {
        for e in std::fs::read_dir(base).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let split = if e.path().is_dir() {
                // A split directory holds numbered files (`train/0000.parquet`); a subset directory holds
                // split-named ones (`conv/train-00000-of-00001.parquet`) and is listed as a subset.
                let mut files = std::fs::read_dir(e.path()).into_iter().flatten().flatten();
                let numbered = |n: &str| is_data_file(n) && n.starts_with(|c: char| c.is_ascii_digit());
                files.any(|f| numbered(&f.file_name().to_string_lossy())).then_some(name)
            } else if is_data_file(&name) {
                name.split(['-', '.']).next().map(str::to_string)
            } else {
                None
            };
            out.extend(split.filter(|s| !s.is_empty()));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Directories of `root` (other than `data`) that hold split files: a repository's subsets.
fn subsets_in(root: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "data" && !n.starts_with('.') && !splits_in(&[root.join(n)]).is_empty())
        .collect();
    out.sort();
    out
}

/// Files in `dir` named `prefix*suffix`, sorted.
fn matching(dir: &Path, prefix: &str, suffix: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.len() >= prefix.len() + suffix.len() && n.starts_with(prefix) && n.ends_with(suffix) && e.path().is_file()
        })
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

/// Whether the final component of `path` is a pattern (`train-*.parquet`): one `*`.
pub(crate) fn has_pattern(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n.to_string_lossy().contains('*'))
}

/// The files a pattern names (sorted), or an error when none match.
pub(crate) fn expand_pattern(path: &Path) -> Result<Vec<PathBuf>, DataError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let dir = path.parent().unwrap_or(Path::new("."));
    let files = match name.split_once('*') {
        Some((prefix, suffix)) if !suffix.contains('*') => matching(dir, prefix, suffix),
        _ => {
            let message = "a pattern holds one `*`, in its file name (data/train-*.parquet)".into();
            return Err(DataError::Dataset { path: path.to_path_buf(), message });
        }
    };
    if files.is_empty() {
        return Err(DataError::Dataset { path: path.to_path_buf(), message: "no file matches this pattern".into() });
    }
    Ok(files)
}

/// The Arrow files of a `Dataset.save_to_disk` directory, in order: `state.json`'s `_data_files`.
pub(crate) fn saved_dataset_files(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let state = dir.join("state.json");
    let bytes = std::fs::read(&state).map_err(|source| DataError::Io { path: state.clone(), source })?;
    let bad = |message: String| DataError::Dataset { path: state.clone(), message };
    let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let files = v.get("_data_files").and_then(|f| f.as_array()).ok_or_else(|| bad("no `_data_files` list".into()))?;
    let mut out = Vec::new();
    for f in files {
        let name = f.get("filename").and_then(|n| n.as_str()).unwrap_or("");
        let rel = Path::new(name);
        if name.is_empty() || !rel.components().all(|c| matches!(c, std::path::Component::Normal(_))) {
            return Err(bad(format!("`_data_files` entry {f} is not a file name inside the dataset directory")));
        }
        out.push(dir.join(rel));
    }
    if out.is_empty() {
        return Err(bad("`_data_files` is empty".into()));
    }
    Ok(out)
}
