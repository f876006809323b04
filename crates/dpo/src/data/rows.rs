//! Records to rows, in every layout TRL accepts:
//!
//! | fields | layout |
//! | --- | --- |
//! | `prompt_ids`, `chosen_ids`, `rejected_ids` | pre-tokenized pair |
//! | `prompt`, `chosen`, `rejected` (strings) | pair, explicit prompt |
//! | `chosen`, `rejected` (strings) | pair, implicit prompt: their longest common prefix (Anthropic HH) |
//! | `prompt`, `completion`, `label` (bool) | unpaired (KTO); `prompt_ids`, `completion_ids` pre-tokenized |
//! | `prompt`, `completion` | SFT; `prompt_ids`, `completion_ids` pre-tokenized |
//! | any of the above with lists of `{"role", "content"}` messages | conversational (chat template) |
//!
//! A message's `content` is a string or a list of parts (`[{"type": "text", "text": ..}]`); text parts are
//! joined, other parts refused (see [`text_parts`]).
//!
//! Like TRL's KTO trainer, the unpaired reader also takes pairs, as two rows (chosen: label true,
//! rejected: label false); the SFT reader takes pairs' chosen side (the DPO paper's "preferred-FT").

use std::path::Path;

use serde_json::Value;

use super::read::{kind, Record};
use super::DataError;

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A prompt or completion as the file gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Text {
    Plain(String),
    Messages(Vec<Message>),
    Ids(Vec<u32>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreferenceRow {
    pub location: String,
    pub prompt: Text,
    pub chosen: Text,
    pub rejected: Text,
}

/// One completion judged on its own (KTO): `label` is true for a desirable completion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnpairedRow {
    pub location: String,
    pub prompt: Text,
    pub completion: Text,
    pub label: bool,
}

/// One prompt and the completion to imitate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SftRow {
    pub location: String,
    pub prompt: Text,
    pub completion: Text,
}

/// A record's typed getters; every error names the file, the record and the field.
struct Fields<'a> {
    path: &'a Path,
    rec: &'a Record,
}

impl Fields<'_> {
    fn err(&self, field: &str, message: String) -> DataError {
        DataError::Field {
            path: self.path.to_path_buf(),
            location: self.rec.location.clone(),
            field: field.to_string(),
            message,
        }
    }

    fn has(&self, field: &str) -> bool {
        self.rec.fields.contains_key(field)
    }

    fn get(&self, field: &str) -> Result<&Value, DataError> {
        self.rec.fields.get(field).ok_or_else(|| self.err(field, "missing".into()))
    }

    /// Token ids. A completion needs at least one: with none there is nothing to score, and the row
    /// would only turn into a zero-length log-prob later.
    fn ids(&self, field: &str, completion: bool) -> Result<Text, DataError> {
        let v = self.get(field)?;
        let Value::Array(items) = v else {
            return Err(self.err(field, format!("expected an array of token ids, found {}", kind(v))));
        };
        if completion && items.is_empty() {
            return Err(self.err(field, "no completion tokens".into()));
        }
        items
            .iter()
            .map(|x| {
                x.as_u64()
                    .filter(|&t| t <= u32::MAX as u64)
                    .map(|t| t as u32)
                    .ok_or_else(|| self.err(field, format!("token ids are non-negative integers, found {x}")))
            })
            .collect::<Result<Vec<u32>, _>>()
            .map(Text::Ids)
    }

    fn text(&self, field: &str) -> Result<Text, DataError> {
        match self.get(field)? {
            Value::String(s) => Ok(Text::Plain(s.clone())),
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, m)| message(m).map_err(|e| self.err(field, format!("message {}: {e}", i + 1))))
                .collect::<Result<Vec<_>, _>>()
                .map(Text::Messages),
            other => Err(self.err(field, format!("expected a string or a list of messages, found {}", kind(other)))),
        }
    }

    fn label(&self, field: &str) -> Result<bool, DataError> {
        match self.get(field)? {
            Value::Bool(b) => Ok(*b),
            other => Err(self.err(field, format!("expected true or false, found {}", kind(other)))),
        }
    }

    /// Prompt and completions are all strings or all message lists: a template cannot render a mix.
    fn same_form(&self, field: &str, a: &Text, like: &str, b: &Text) -> Result<(), DataError> {
        if std::mem::discriminant(a) == std::mem::discriminant(b) {
            return Ok(());
        }
        Err(self.err(field, format!("must have the same form as `{like}` (both strings or both message lists)")))
    }
}

/// Reads one pair from a record; errors name the file, the record and the field.
pub fn parse_preference_row(path: &Path, r: &Record) -> Result<PreferenceRow, DataError> {
    let f = Fields { path, rec: r };
    let row = |prompt, chosen, rejected| PreferenceRow { location: r.location.clone(), prompt, chosen, rejected };

    if f.has("chosen_ids") || f.has("prompt_ids") {
        return Ok(row(f.ids("prompt_ids", false)?, f.ids("chosen_ids", true)?, f.ids("rejected_ids", true)?));
    }
    let chosen = f.text("chosen")?;
    let rejected = f.text("rejected")?;
    f.same_form("rejected", &rejected, "chosen", &chosen)?;
    if f.has("prompt") {
        let prompt = f.text("prompt")?;
        f.same_form("prompt", &prompt, "chosen", &chosen)?;
        return Ok(row(prompt, chosen, rejected));
    }
    let (prompt, chosen, rejected) = extract_prompt(chosen, rejected);
    Ok(row(prompt, chosen, rejected))
}

/// Reads a generation prompt: `prompt` (text or messages) or `prompt_ids`.
pub fn parse_prompt(path: &Path, r: &Record) -> Result<Text, DataError> {
    let f = Fields { path, rec: r };
    if f.has("prompt_ids") && !f.has("prompt") {
        return f.ids("prompt_ids", false);
    }
    f.text("prompt")
}

/// Whether a record is a pair rather than a single completion.
fn is_pair(f: &Fields) -> bool {
    f.has("chosen") || f.has("chosen_ids") || f.has("rejected") || f.has("rejected_ids")
}

/// A prompt and one completion, text or ids; shared by the unpaired and SFT readers.
fn prompt_completion(f: &Fields) -> Result<(Text, Text), DataError> {
    if f.has("completion_ids") || f.has("prompt_ids") {
        return Ok((f.ids("prompt_ids", false)?, f.ids("completion_ids", true)?));
    }
    let completion = f.text("completion")?;
    let prompt = f.text("prompt")?;
    f.same_form("prompt", &prompt, "completion", &completion)?;
    Ok((prompt, completion))
}

/// Reads one unpaired row, or two from a pair (chosen first, labelled true; then rejected, false).
/// TRL unpairs in blocks of 1000 rows (all chosen, then all rejected); the trainer shuffles either way.
pub fn parse_unpaired_rows(path: &Path, r: &Record) -> Result<Vec<UnpairedRow>, DataError> {
    let f = Fields { path, rec: r };
    let location = || r.location.clone();
    if is_pair(&f) {
        let p = parse_preference_row(path, r)?;
        return Ok(vec![
            UnpairedRow { location: location(), prompt: p.prompt.clone(), completion: p.chosen, label: true },
            UnpairedRow { location: location(), prompt: p.prompt, completion: p.rejected, label: false },
        ]);
    }
    let (prompt, completion) = prompt_completion(&f)?;
    Ok(vec![UnpairedRow { location: location(), prompt, completion, label: f.label("label")? }])
}

/// Reads one SFT row: `prompt`/`completion`, or a pair's prompt and chosen completion.
pub fn parse_sft_row(path: &Path, r: &Record) -> Result<SftRow, DataError> {
    let f = Fields { path, rec: r };
    if is_pair(&f) {
        let p = parse_preference_row(path, r)?;
        return Ok(SftRow { location: p.location, prompt: p.prompt, completion: p.chosen });
    }
    let (prompt, completion) = prompt_completion(&f)?;
    Ok(SftRow { location: r.location.clone(), prompt, completion })
}

fn message(v: &Value) -> Result<Message, String> {
    let Value::Object(m) = v else {
        return Err(format!("expected an object with `role` and `content`, found {}", kind(v)));
    };
    let role = match m.get("role") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => return Err(format!("`role` must be a string, found {}", kind(other))),
        None => return Err("`role` is missing".into()),
    };
    let content = match m.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => text_parts(parts)?,
        Some(other) => {
            return Err(format!("`content` must be a string, found {} (or a list of text parts)", kind(other)))
        }
        None => return Err("`content` is missing".into()),
    };
    Ok(Message { role, content })
}

/// A content list (`[{"type": "text", "text": ..}, ..]`, the OpenAI and multimodal-dataset form) as one
/// string: its text parts concatenated. transformers hands the list to the template as it is; the
/// templates that accept lists (Llama 3.2, Qwen2-VL, Gemma 3) write the text parts one after the other,
/// and text-only templates (SmolLM2, Llama 3) expect a string, which this gives them. Parts of any other
/// type (images, audio) are refused: this trainer reads text only.
fn text_parts(parts: &[Value]) -> Result<String, String> {
    let mut text = String::new();
    for (i, part) in parts.iter().enumerate() {
        let at = || format!("`content` part {}", i + 1);
        let Value::Object(p) = part else {
            return Err(format!("{}: expected an object with `type` and `text`, found {}", at(), kind(part)));
        };
        match (p.get("type"), p.get("text")) {
            (Some(Value::String(t)), Some(Value::String(s))) if t == "text" => text.push_str(s),
            (Some(Value::String(t)), _) if t == "text" => return Err(format!("{}: `text` must be a string", at())),
            (Some(Value::String(t)), _) => {
                return Err(format!(
                    "{}: a part of type {t:?}; only text parts can be read (no image or audio input)",
                    at()
                ))
            }
            _ => return Err(format!("{}: `type` is missing or not a string", at())),
        }
    }
    Ok(text)
}

/// TRL's `extract_prompt`: the prompt is the longest common prefix of the two completions (messages for
/// conversations, characters for strings, dropping a space just before the divergence so that it stays
/// with the completions). Like TRL, when one completion is a prefix of the other the prompt stops one
/// element short of the shorter one.
fn extract_prompt(chosen: Text, rejected: Text) -> (Text, Text, Text) {
    fn split<T: PartialEq + Clone>(c: &[T], r: &[T], is_space: impl Fn(&T) -> bool) -> usize {
        let n = c.len().min(r.len());
        let mut idx = n.saturating_sub(1);
        for i in 0..n {
            if c[i] != r[i] {
                idx = i;
                if i > 0 && is_space(&c[i - 1]) {
                    idx -= 1;
                }
                break;
            }
        }
        idx
    }
    match (chosen, rejected) {
        (Text::Plain(c), Text::Plain(r)) => {
            let (cc, rc): (Vec<char>, Vec<char>) = (c.chars().collect(), r.chars().collect());
            let k = split(&cc, &rc, |ch| *ch == ' ');
            let s = |v: &[char]| v.iter().collect::<String>();
            (Text::Plain(s(&cc[..k])), Text::Plain(s(&cc[k..])), Text::Plain(s(&rc[k..])))
        }
        (Text::Messages(c), Text::Messages(r)) => {
            let k = split(&c, &r, |_| false);
            (Text::Messages(c[..k].to_vec()), Text::Messages(c[k..].to_vec()), Text::Messages(r[k..].to_vec()))
        }
        (c, r) => (Text::Plain(String::new()), c, r),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(json: &str) -> Record {
        let Value::Object(fields) = serde_json::from_str(json).unwrap() else { panic!() };
        Record { location: "line 7".into(), fields }
    }

    #[test]
    fn implicit_prompt_is_the_common_prefix() {
        let r = rec(r#"{"chosen": "Human: hi Assistant: hello there", "rejected": "Human: hi Assistant: go away"}"#);
        let row = parse_preference_row(Path::new("f.jsonl"), &r).unwrap();
        assert_eq!(row.prompt, Text::Plain("Human: hi Assistant:".into()));
        assert_eq!(row.chosen, Text::Plain(" hello there".into()));
        assert_eq!(row.rejected, Text::Plain(" go away".into()));
    }

    #[test]
    fn implicit_conversational_prompt() {
        let r = rec(r#"{"chosen": [{"role":"user","content":"q"},{"role":"assistant","content":"a"}],
                "rejected": [{"role":"user","content":"q"},{"role":"assistant","content":"b"}]}"#);
        let row = parse_preference_row(Path::new("f.jsonl"), &r).unwrap();
        let Text::Messages(p) = row.prompt else { panic!() };
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].content, "q");
    }

    #[test]
    fn errors_name_line_and_field() {
        let r = rec(r#"{"prompt": "p", "chosen": 3, "rejected": "x"}"#);
        let e = parse_preference_row(Path::new("d.jsonl"), &r).unwrap_err().to_string();
        assert!(e.contains("d.jsonl") && e.contains("line 7") && e.contains("`chosen`"), "{e}");
        let r = rec(r#"{"prompt_ids": [1, -2], "chosen_ids": [3], "rejected_ids": [4]}"#);
        let e = parse_preference_row(Path::new("d.jsonl"), &r).unwrap_err().to_string();
        assert!(e.contains("`prompt_ids`") && e.contains("-2"), "{e}");
        let r = rec(r#"{"prompt": "p", "chosen": "c"}"#);
        let e = parse_preference_row(Path::new("d.jsonl"), &r).unwrap_err().to_string();
        assert!(e.contains("`rejected`") && e.contains("missing"), "{e}");
    }
    #[test]
    fn unpaired_rows_and_pairs_unpaired() {
        let p = Path::new("k.jsonl");
        let r = rec(r#"{"prompt": "p", "completion": " c", "label": false}"#);
        let rows = parse_unpaired_rows(p, &r).unwrap();
        assert_eq!(
            rows,
            vec![UnpairedRow {
                location: "line 7".into(),
                prompt: Text::Plain("p".into()),
                completion: Text::Plain(" c".into()),
                label: false,
            }]
        );
        let r = rec(r#"{"prompt_ids": [1], "completion_ids": [2, 3], "label": true}"#);
        assert_eq!(parse_unpaired_rows(p, &r).unwrap()[0].completion, Text::Ids(vec![2, 3]));
        let r = rec(r#"{"prompt": "p", "chosen": "a", "rejected": "b"}"#);
        let rows = parse_unpaired_rows(p, &r).unwrap();
        let got: Vec<_> = rows.iter().map(|r| (r.completion.clone(), r.label)).collect();
        assert_eq!(got, vec![(Text::Plain("a".into()), true), (Text::Plain("b".into()), false)]);

        let e = parse_unpaired_rows(p, &rec(r#"{"prompt": "p", "completion": "c", "label": 1}"#)).unwrap_err();
        assert_eq!(e.to_string(), "k.jsonl, line 7, field `label`: expected true or false, found a number");
        let e = parse_unpaired_rows(p, &rec(r#"{"prompt": "p", "completion": "c"}"#)).unwrap_err();
        assert_eq!(e.to_string(), "k.jsonl, line 7, field `label`: missing");
        let r = rec(r#"{"prompt": "p", "completion": [{"role": "assistant", "content": "c"}], "label": true}"#);
        let e = parse_unpaired_rows(p, &r).unwrap_err().to_string();
        assert!(e.contains("field `prompt`: must have the same form as `completion`"), "{e}");
    }

    #[test]
    fn sft_rows_and_the_chosen_side_of_pairs() {
        let p = Path::new("s.json");
        let r = rec(
            r#"{"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]}"#,
        );
        let row = parse_sft_row(p, &r).unwrap();
        assert!(
            matches!((&row.prompt, &row.completion), (Text::Messages(a), Text::Messages(b)) if a.len() == 1 && b[0].content == "a")
        );
        let r = rec(r#"{"chosen": "Q: x A: yes", "rejected": "Q: x A: no"}"#);
        let row = parse_sft_row(p, &r).unwrap();
        assert_eq!((row.prompt, row.completion), (Text::Plain("Q: x A:".into()), Text::Plain(" yes".into())));
        let e = parse_sft_row(p, &rec(r#"{"prompt": "q"}"#)).unwrap_err().to_string();
        assert_eq!(e, "s.json, line 7, field `completion`: missing");
    }

    #[test]
    fn content_lists_of_text_parts_are_read_as_their_text() {
        let p = Path::new("parts.jsonl");
        let r = rec(
            r#"{"prompt": [{"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]}],
                "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "4"}]}],
                "rejected": [{"role": "assistant", "content": "5"}]}"#,
        );
        let row = parse_preference_row(p, &r).unwrap();
        let one =
            |role: &str, content: &str| Text::Messages(vec![Message { role: role.into(), content: content.into() }]);
        assert_eq!(
            (row.prompt, row.chosen, row.rejected),
            (one("user", "What is 2+2?"), one("assistant", "4"), one("assistant", "5"))
        );

        let r = rec(
            r#"{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
                "chosen": [{"role": "assistant", "content": "A cat."}], "rejected": [{"role": "assistant", "content": "A dog."}]}"#,
        );
        let e = parse_preference_row(p, &r).unwrap_err().to_string();
        assert_eq!(
            e,
            "parts.jsonl, line 7, field `prompt`: message 1: `content` part 1: a part of type \"image\"; only text \
             parts can be read (no image or audio input)"
        );
        let r = rec(
            r#"{"chosen": [{"role": "assistant", "content": [{"text": "x"}]}], "rejected": [{"role": "assistant", "content": 3}]}"#,
        );
        let e = parse_preference_row(p, &r).unwrap_err().to_string();
        assert!(e.contains("field `chosen`: message 1: `content` part 1: `type` is missing"), "{e}");
    }

    #[test]
    fn empty_token_id_completions_are_bad_rows() {
        let p = Path::new("t.jsonl");
        let r = rec(r#"{"prompt_ids": [], "chosen_ids": [], "rejected_ids": [4]}"#);
        let e = parse_preference_row(p, &r).unwrap_err().to_string();
        assert_eq!(e, "t.jsonl, line 7, field `chosen_ids`: no completion tokens");
        let r = rec(r#"{"prompt_ids": [1], "completion_ids": [], "label": true}"#);
        let e = parse_unpaired_rows(p, &r).unwrap_err().to_string();
        assert_eq!(e, "t.jsonl, line 7, field `completion_ids`: no completion tokens");
        // An empty prompt is allowed, as in TRL.
        let r = rec(r#"{"prompt_ids": [], "chosen_ids": [3], "rejected_ids": [4]}"#);
        assert_eq!(parse_preference_row(p, &r).unwrap().prompt, Text::Ids(vec![]));
    }
}
