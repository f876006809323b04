//! Records to preference rows, in every layout TRL accepts for pairs:
//!
//! | fields | layout |
//! | --- | --- |
//! | `prompt_ids`, `chosen_ids`, `rejected_ids` | pre-tokenized |
//! | `prompt`, `chosen`, `rejected` (strings) | explicit prompt |
//! | `chosen`, `rejected` (strings) | implicit prompt: their longest common prefix (Anthropic HH) |
//! | the same with lists of `{"role", "content"}` messages | conversational (chat template) |

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

/// Reads one pair from a record; errors name the file, the record and the field.
pub fn parse_preference_row(path: &Path, r: &Record) -> Result<PreferenceRow, DataError> {
    let field_err = |field: &str, message: String| DataError::Field {
        path: path.to_path_buf(),
        location: r.location.clone(),
        field: field.to_string(),
        message,
    };
    let get = |field: &str| -> Result<&Value, DataError> {
        r.fields.get(field).ok_or_else(|| field_err(field, "missing".into()))
    };
    let row = |prompt, chosen, rejected| PreferenceRow { location: r.location.clone(), prompt, chosen, rejected };

    if r.fields.contains_key("chosen_ids") || r.fields.contains_key("prompt_ids") {
        let ids = |field: &str| -> Result<Text, DataError> {
            let v = get(field)?;
            let Value::Array(items) = v else {
                return Err(field_err(field, format!("expected an array of token ids, found {}", kind(v))));
            };
            items
                .iter()
                .map(|x| {
                    x.as_u64()
                        .filter(|&t| t <= u32::MAX as u64)
                        .map(|t| t as u32)
                        .ok_or_else(|| field_err(field, format!("token ids are non-negative integers, found {x}")))
                })
                .collect::<Result<Vec<u32>, _>>()
                .map(Text::Ids)
        };
        return Ok(row(ids("prompt_ids")?, ids("chosen_ids")?, ids("rejected_ids")?));
    }

    let text = |field: &str| -> Result<Text, DataError> {
        let v = get(field)?;
        match v {
            Value::String(s) => Ok(Text::Plain(s.clone())),
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, m)| message(m).map_err(|e| field_err(field, format!("message {}: {e}", i + 1))))
                .collect::<Result<Vec<_>, _>>()
                .map(Text::Messages),
            other => Err(field_err(field, format!("expected a string or a list of messages, found {}", kind(other)))),
        }
    };
    let chosen = text("chosen")?;
    let rejected = text("rejected")?;
    let same_kind = |a: &Text, b: &Text| std::mem::discriminant(a) == std::mem::discriminant(b);
    if !same_kind(&chosen, &rejected) {
        return Err(field_err(
            "rejected",
            "must have the same form as `chosen` (both strings or both message lists)".into(),
        ));
    }
    if r.fields.contains_key("prompt") {
        let prompt = text("prompt")?;
        if !same_kind(&prompt, &chosen) {
            return Err(field_err("prompt", "must have the same form as `chosen` (string or message list)".into()));
        }
        return Ok(row(prompt, chosen, rejected));
    }
    let (prompt, chosen, rejected) = extract_prompt(chosen, rejected);
    Ok(row(prompt, chosen, rejected))
}

fn message(v: &Value) -> Result<Message, String> {
    let Value::Object(m) = v else {
        return Err(format!("expected an object with `role` and `content`, found {}", kind(v)));
    };
    let s = |k: &str| match m.get(k) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("`{k}` must be a string, found {}", kind(other))),
        None => Err(format!("`{k}` is missing")),
    };
    Ok(Message { role: s("role")?, content: s("content")? })
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
}
