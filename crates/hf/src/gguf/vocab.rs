//! The tokenizer as llama.cpp's GGUF metadata holds it (`tokenizer.ggml.*`, `tokenizer.chat_template`),
//! from a byte-level BPE `tokenizer.json` (GPT-2, Llama 3, Qwen2, SmolLM2): tokens in id order in their
//! byte-level spelling (`Ġthe`), the merges as `"a b"`, each token's type, the special ids, and the
//! pre-tokenizer's llama.cpp name (`tokenizer.ggml.pre`), which picks llama.cpp's splitting regexes.

use std::path::Path;

use serde_json::Value as Json;

use super::format::Value;
use crate::error::{read_json, Error, Result};
use crate::tokenizer::Tokenizer;

/// llama.cpp's `llama_token_type`.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// The regex of a `Split` pre-tokenizer → llama.cpp's name for that splitting. Llama 3 groups digits
/// by up to three, Qwen2 splits every digit.
const SPLIT_PATTERNS: &[(&str, &str)] = &[
    (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        "llama-bpe",
    ),
    (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        "qwen2",
    ),
];

/// `tokenizer.ggml.*` and `tokenizer.chat_template` entries for a model of `vocab_size` rows.
pub fn metadata(dir: &Path, tok: &Tokenizer, vocab_size: usize) -> Result<Vec<(String, Value)>> {
    let path = dir.join("tokenizer.json");
    let json = read_json(&path)?;
    let model = json.get("model").ok_or_else(|| Error::field(&path, "model", "missing"))?;
    if model.get("type").and_then(Json::as_str) != Some("BPE") {
        return Err(Error::field(&path, "model.type", "only byte-level BPE tokenizers are exported to GGUF"));
    }
    let pre = pre_tokenizer_name(&path, json.get("pre_tokenizer").unwrap_or(&Json::Null))?;

    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![NORMAL; vocab_size];
    let mut place = |id: u64, text: &str, ty: i32, field: &str| -> Result<()> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| {
            Error::field(&path, field, format!("token {text:?} has id {id}, past the model's vocab_size {vocab_size}"))
        })?;
        *slot = Some(text.to_string());
        types[id as usize] = ty;
        Ok(())
    };
    let vocab = model
        .get("vocab")
        .and_then(Json::as_object)
        .ok_or_else(|| Error::field(&path, "model.vocab", "expected an object"))?;
    for (text, id) in vocab {
        let id =
            id.as_u64().ok_or_else(|| Error::field(&path, "model.vocab", format!("{text:?}: id is not a number")))?;
        place(id, text, NORMAL, "model.vocab")?;
    }
    for added in json.get("added_tokens").and_then(Json::as_array).into_iter().flatten() {
        let (Some(id), Some(text)) =
            (added.get("id").and_then(Json::as_u64), added.get("content").and_then(Json::as_str))
        else {
            return Err(Error::field(&path, "added_tokens", "an entry lacks `id` or `content`"));
        };
        let special = added.get("special").and_then(Json::as_bool).unwrap_or(false);
        place(id, text, if special { CONTROL } else { USER_DEFINED }, "added_tokens")?;
    }
    // Rows of the embedding no token uses (a vocab padded to a multiple of 64) get placeholder names, as
    // llama.cpp's converter writes them.
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.unwrap_or_else(|| {
                types[i] = UNUSED;
                format!("[PAD{i}]")
            })
        })
        .collect();

    let merges = model
        .get("merges")
        .and_then(Json::as_array)
        .ok_or_else(|| Error::field(&path, "model.merges", "expected a list"))?;
    let merges = merges
        .iter()
        .map(|m| match m {
            Json::String(s) => Some(s.clone()),
            Json::Array(p) if p.len() == 2 => Some(format!("{} {}", p[0].as_str()?, p[1].as_str()?)),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| Error::field(&path, "model.merges", "expected \"a b\" strings or [a, b] pairs"))?;

    let mut md = vec![
        ("tokenizer.ggml.model".to_string(), Value::Str("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), Value::Str(pre.into())),
        ("tokenizer.ggml.tokens".to_string(), Value::strings(tokens)),
        ("tokenizer.ggml.token_type".to_string(), Value::i32s(types)),
        ("tokenizer.ggml.merges".to_string(), Value::strings(merges)),
    ];
    let ids = [
        ("tokenizer.ggml.bos_token_id", tok.bos_id()),
        ("tokenizer.ggml.eos_token_id", tok.eos_id()),
        ("tokenizer.ggml.padding_token_id", tok.pad_id()),
    ];
    md.extend(ids.into_iter().filter_map(|(k, id)| Some((k.to_string(), Value::U32(id?)))));
    // Whether encoding puts BOS in front, seen by encoding (the post-processor decides, not a flag).
    let with = tok.encode("a", true)?;
    let without = tok.encode("a", false)?;
    let adds_bos = with.len() == without.len() + 1 && tok.bos_id().is_some_and(|b| with.first() == Some(&b));
    md.push(("tokenizer.ggml.add_bos_token".to_string(), Value::Bool(adds_bos)));
    if let Some(t) = tok.chat_template() {
        md.push(("tokenizer.chat_template".to_string(), Value::Str(t.to_string())));
    }
    Ok(md)
}

/// llama.cpp's name for the splitting `tokenizer.json`'s pre-tokenizer does; a splitting llama.cpp would
/// not reproduce is refused rather than exported to tokenize differently.
fn pre_tokenizer_name(path: &Path, pre: &Json) -> Result<&'static str> {
    let ty = |v: &Json| v.get("type").and_then(Json::as_str).map(str::to_string);
    let byte_level_regex =
        |v: &Json| ty(v).as_deref() == Some("ByteLevel") && v.get("use_regex") != Some(&Json::Bool(false));
    let steps: Vec<&Json> = match ty(pre).as_deref() {
        Some("Sequence") => {
            pre.get("pretokenizers").and_then(Json::as_array).map(|a| a.iter().collect()).unwrap_or_default()
        }
        _ => vec![pre],
    };
    let name = match steps.as_slice() {
        [b] if byte_level_regex(b) => Some("gpt-2"),
        [d, b]
            if ty(d).as_deref() == Some("Digits")
                && d.get("individual_digits") == Some(&Json::Bool(true))
                && byte_level_regex(b) =>
        {
            Some("smollm")
        }
        [s, b] if ty(s).as_deref() == Some("Split") && ty(b).as_deref() == Some("ByteLevel") => {
            let pattern = s.get("pattern").and_then(|p| p.get("Regex")).and_then(Json::as_str);
            SPLIT_PATTERNS.iter().find(|(p, _)| Some(*p) == pattern).map(|(_, n)| *n)
        }
        _ => None,
    };
    name.ok_or_else(|| {
        Error::field(
            path,
            "pre_tokenizer",
            "this pre-tokenizer is not one llama.cpp reproduces (known: GPT-2 byte-level, SmolLM digits + \
             byte-level, the Llama 3 and Qwen2 split regexes); llama.cpp would tokenize text differently",
        )
    })
}
