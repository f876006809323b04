//! Generation prompts (`dpo generate`, `dpo best-of-n`, `dpo ppo`): the `prompt` of every row of a JSONL,
//! JSON or Parquet file, as text, chat messages or token ids, or one text given directly; and the token
//! ids that end a generation.

use std::path::Path;

use hf::{ChatMessage, ModelConfig, Tokenizer};
use serde_json::Value;

use super::read::{map_records, Record};
use super::rows::{parse_prompt, Message, Text};
use super::DataError;

/// A prompt as given (echoed in outputs) and its token ids.
#[derive(Clone, Debug, PartialEq)]
pub struct Prompt {
    /// "line 3" (or "element 3", "row 3"; "prompt" for one given directly).
    pub location: String,
    pub shown: Value,
    pub ids: Vec<u32>,
}

/// A text prompt: through the chat template as one user message (`chat`), or tokenized as it is with the
/// tokenizer's own special tokens, as TRL tokenizes plain-text prompts.
pub fn encode_text(tok: &Tokenizer, text: &str, chat: bool) -> hf::Result<Vec<u32>> {
    if chat {
        encode_messages(tok, &[ChatMessage::new("user", text)])
    } else {
        tok.encode(text, true)
    }
}

/// Messages through the chat template with the generation prompt; the template writes every special
/// token it wants, so none are added.
fn encode_messages(tok: &Tokenizer, messages: &[ChatMessage]) -> hf::Result<Vec<u32>> {
    let text = tok.apply_chat_template(messages, true)?;
    tok.encode(&text, false)
}

/// Reads the `prompt` (or `prompt_ids`) of every row of `path`. Text prompts go through the chat template
/// when `chat`; message lists always do (a tokenizer without a template is an error). Every error names
/// the file and row; a prompt of no tokens is one (generation needs at least one).
pub fn read_prompts(path: &Path, tok: &Tokenizer, chat: bool) -> Result<Vec<Prompt>, DataError> {
    let prompts = map_records(path, |rec| rec.and_then(|r| prompt(path, &r, tok, chat)))?;
    prompts.into_iter().collect()
}

fn prompt(path: &Path, rec: &Record, tok: &Tokenizer, chat: bool) -> Result<Prompt, DataError> {
    let err =
        |message: String| DataError::Tokenize { path: path.to_path_buf(), location: rec.location.clone(), message };
    let text = parse_prompt(path, rec)?;
    let ids = match &text {
        Text::Ids(ids) => ids.clone(),
        Text::Plain(s) => encode_text(tok, s, chat).map_err(|e| err(e.to_string()))?,
        Text::Messages(_) if tok.chat_template().is_none() => {
            return Err(err("a conversational prompt needs a chat template, and the tokenizer has none".into()))
        }
        Text::Messages(m) => {
            let messages: Vec<ChatMessage> =
                m.iter().map(|Message { role, content }| ChatMessage::new(role, content)).collect();
            encode_messages(tok, &messages).map_err(|e| err(e.to_string()))?
        }
    };
    if ids.is_empty() {
        return Err(err("the prompt tokenizes to no tokens; generation needs at least one".into()));
    }
    let shown = rec.fields.get("prompt").or_else(|| rec.fields.get("prompt_ids")).cloned().unwrap_or(Value::Null);
    Ok(Prompt { location: rec.location.clone(), shown, ids })
}

/// The token ids that end a generation: every EOS id of the model's configuration (`eos_token_id` may be
/// a list) and the tokenizer's EOS token, sorted, without repeats.
pub fn stop_ids(config: &ModelConfig, tok: &Tokenizer) -> Vec<u32> {
    let mut ids = config.eos_token_ids.clone();
    ids.extend(tok.eos_id());
    ids.sort_unstable();
    ids.dedup();
    ids
}

#[cfg(test)]
mod tests {
    use parquet::basic::Compression;
    use serde_json::json;

    use super::super::parquet::tests::{write_parquet, Col};
    use super::super::testutil::{chat_tokenizer, enc, scratch, tokenizer, write};
    use super::*;

    #[test]
    fn prompts_from_jsonl_json_and_parquet_like_every_reader() {
        let tok = chat_tokenizer("prompts-chat");
        let dir = scratch("prompts");
        let rows = [
            json!({"prompt": "Say hi.", "other": 1}),
            json!({"prompt": [{"role": "user", "content": [{"type": "text", "text": "Say hi."}]}]}),
            json!({"prompt_ids": [5, 6]}),
        ];
        let text: String = rows.iter().map(|r| r.to_string() + "\n").collect();
        let got = read_prompts(&write(&dir, "p.jsonl", &text), &tok, true).unwrap();
        let chat_ids = encode_text(&tok, "Say hi.", true).unwrap();
        assert_eq!(got[0], Prompt { location: "line 1".into(), shown: json!("Say hi."), ids: chat_ids.clone() });
        assert_eq!((got[1].location.as_str(), &got[1].ids), ("line 2", &chat_ids));
        assert_eq!((got[2].shown.clone(), got[2].ids.clone()), (json!([5, 6]), vec![5, 6]));
        let plain = read_prompts(&write(&dir, "p.json", serde_json::to_string(&rows).unwrap()), &tok, false).unwrap();
        assert_eq!((plain[0].location.as_str(), &plain[0].ids), ("element 1", &enc(&tok, "Say hi.")));
        // Parquet, which the reader in the CLI this replaces could not read.
        let parquet = dir.join("p.parquet");
        let col = Col::Str("prompt", vec![Some("Say hi.".into()), Some("Bye.".into())]);
        write_parquet(&parquet, &[col], Compression::SNAPPY);
        let got = read_prompts(&parquet, &tok, false).unwrap();
        assert_eq!((got[1].location.as_str(), &got[1].ids), ("row 2", &enc(&tok, "Bye.")));
    }

    #[test]
    fn prompt_errors_name_file_and_row() {
        let tok = tokenizer();
        let dir = scratch("prompts-errors");
        let cases = [
            ("a.jsonl", "{\"prompt\": \"x\"}\n{\"text\": \"x\"}\n", "a.jsonl, line 2, field `prompt`: missing"),
            (
                "b.jsonl",
                "{\"prompt\": 3}\n",
                "b.jsonl, line 1, field `prompt`: expected a string or a list of messages",
            ),
            (
                "c.jsonl",
                "{\"prompt\": [{\"role\": \"user\", \"content\": \"x\"}]}\n",
                "c.jsonl, line 1: a conversational prompt needs a chat template",
            ),
            ("d.jsonl", "{\"prompt_ids\": []}\n", "d.jsonl, line 1: the prompt tokenizes to no tokens"),
        ];
        for (name, text, want) in cases {
            let e = read_prompts(&write(&dir, name, text), &tok, false).unwrap_err().to_string();
            assert!(e.contains(want), "{name}: {e}");
        }
    }
}
