//! A Hugging Face model directory as a whole: loading config and weights together, and saving a trained
//! model so that `transformers.AutoModelForCausalLM.from_pretrained(out)` reads it back.

use std::path::{Path, PathBuf};

use engine::Params;
use serde_json::{json, Value};

use crate::config::{parse_config, ModelConfig};
use crate::error::{Error, Result};
use crate::safetensors::{write_f32_with, WriteDtype};
use crate::tokenizer::Tokenizer;
use crate::weights::{check_params, load_params, HfTensors};

/// A loaded model: its configuration, its weights, and where it came from.
#[derive(Clone, Debug)]
pub struct HfModel {
    pub config: ModelConfig,
    pub params: Params,
    pub dir: PathBuf,
}

/// Files copied verbatim from the source directory when saving, if it has them.
const COPIED: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
];

fn check_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Err(Error::dir(dir, "model directory does not exist"));
    }
    if !dir.is_dir() {
        return Err(Error::dir(dir, "is not a directory; pass the model directory (the one holding config.json)"));
    }
    Ok(())
}

/// Loads `dir/config.json` alone (what a run needs to know before it loads the weights).
pub fn load_config(dir: &Path) -> Result<ModelConfig> {
    check_dir(dir)?;
    let cfg_path = dir.join("config.json");
    if !cfg_path.is_file() {
        return Err(Error::dir(dir, "no config.json; this is not a Hugging Face model directory"));
    }
    parse_config(&cfg_path)
}

/// Loads `dir/config.json` and the safetensors weights beside it.
pub fn load_model(dir: &Path) -> Result<HfModel> {
    let config = load_config(dir)?;
    let params = load_params(dir, &config)?;
    Ok(HfModel { config, params, dir: dir.to_path_buf() })
}

/// Loads the tokenizer of a model (or tokenizer) directory.
pub fn load_tokenizer(dir: &Path) -> Result<Tokenizer> {
    check_dir(dir)?;
    Tokenizer::from_dir(dir)
}

/// The tokenizer of a model directory when it has one (`tokenizer.json`); `None` for a directory of
/// weights only, whose data must then be pre-tokenized.
pub fn load_tokenizer_if_present(dir: &Path) -> Result<Option<Tokenizer>> {
    if dir.join("tokenizer.json").is_file() {
        load_tokenizer(dir).map(Some)
    } else {
        Ok(None)
    }
}

/// Writes a complete model directory to `out`: `config.json` (the source JSON with the dtype set to
/// float32), `model.safetensors` (f32, HF names), `generation_config.json`, and the tokenizer files and
/// chat template copied from `source_dir` when present.
///
/// Everything is written to `out.tmp-<pid>` first and renamed onto `out`, so `out` is either the old
/// directory, the complete new one, or absent. An existing `out` is replaced only if it looks like a
/// model directory (holds `config.json`) or is empty.
pub fn save_model(out: &Path, config: &ModelConfig, params: &Params, source_dir: Option<&Path>) -> Result<()> {
    check_params(config, params)
        .map_err(|m| Error::dir(out, format!("parameters do not match the model config: {m}")))?;
    let hf = HfTensors::new(config, params);
    // One converted tensor at a time: a checkpoint written mid-run holds no second copy of the model.
    write_model_dir(out, config, source_dir, WriteDtype::F32, |path| {
        write_f32_with(path, &hf.shapes, |i| Ok(hf.values(i)))
    })
}

/// [`save_model`] with the weights file written by `weights` (given its path) in `dtype`, which
/// `config.json` names.
pub(crate) fn write_model_dir(
    out: &Path,
    config: &ModelConfig,
    source_dir: Option<&Path>,
    dtype: WriteDtype,
    weights: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    write_dir(out, "config.json", |tmp| write_all(tmp, config, source_dir, dtype, weights))
}

/// Writes a directory atomically: `fill` writes the files into `out.tmp-<pid>`, which is then renamed
/// onto `out` ([`crate::atomic::replace_dir`]), so `out` is either the old directory, the complete new one,
/// or absent. An existing `out` is replaced only if it is empty or holds `marker` (the file that says it is
/// a directory of this kind: `config.json`, `adapter_config.json`).
pub(crate) fn write_dir(out: &Path, marker: &str, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if out.exists() {
        if !out.is_dir() {
            return Err(Error::dir(out, "exists and is not a directory; choose another output path"));
        }
        let empty = std::fs::read_dir(out).map_err(|e| Error::io(out, e))?.next().is_none();
        if !empty && !out.join(marker).is_file() {
            return Err(Error::dir(
                out,
                format!("exists, is not empty and holds no {marker}; refusing to replace it (choose another path)"),
            ));
        }
    }
    let name = out.file_name().ok_or_else(|| Error::dir(out, "output path has no final component"))?;
    let tmp = out.with_file_name(format!("{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    if let Some(parent) = tmp.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    crate::atomic::replace_dir(&tmp, out).map_err(|e| {
        let _ = std::fs::remove_dir_all(&tmp);
        Error::io(out, e)
    })
}

fn write_all(
    tmp: &Path,
    config: &ModelConfig,
    source_dir: Option<&Path>,
    dtype: WriteDtype,
    weights: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let mut raw = config.raw.clone();
    if let Value::Object(obj) = &mut raw {
        let keys: Vec<&str> = ["dtype", "torch_dtype"].into_iter().filter(|k| obj.contains_key(*k)).collect();
        let keys = if keys.is_empty() { vec!["dtype", "torch_dtype"] } else { keys };
        for k in keys {
            obj.insert(k.to_string(), json!(dtype.torch_name()));
        }
    }
    write_json(&tmp.join("config.json"), &raw)?;
    weights(&tmp.join("model.safetensors"))?;
    if let Some(src) = source_dir {
        for f in COPIED {
            let from = src.join(f);
            if from.is_file() {
                let to = tmp.join(f);
                std::fs::copy(&from, &to).map_err(|e| Error::io(&from, e))?;
            }
        }
    }
    let gen = tmp.join("generation_config.json");
    if !gen.exists() {
        let eos = match config.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => json!(one),
            many => json!(many),
        };
        let g = json!({
            "_from_model_config": true,
            "bos_token_id": config.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": config.pad_token_id,
        });
        write_json(&gen, &g)?;
    }
    Ok(())
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(v).map_err(|e| Error::json(path, e))?;
    text.push('\n');
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}
