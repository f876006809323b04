//! Preference rows to token ids, by TRL 1.x's rules (see `tests/fixtures/parity/README.md`):
//! a plain-text completion gets the EOS token appended unless it already ends with it; the prompt and
//! prompt+completion are tokenized separately (the tokenizer's own special tokens included, as
//! `tokenizer(text)` does); the completion starts where the two token lists diverge. Conversations are
//! rendered with the chat template (the prompt with the generation prompt added) and tokenized without
//! adding special tokens again, as `apply_chat_template(tokenize=True)` does.

use hf::{ChatMessage, Tokenizer};

use super::rows::{Message, PreferenceRow, Text};

/// One tokenized preference pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    pub location: String,
    pub prompt_ids: Vec<u32>,
    pub chosen_ids: Vec<u32>,
    pub rejected_ids: Vec<u32>,
}

/// Counts of what tokenization noticed, reported once at the end rather than per row.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenizeStats {
    /// Rows whose tokenized prompt was not a prefix of the tokenized prompt+completion (the tokenizer
    /// merged across the boundary); their completion starts at the first differing token.
    pub prompt_not_prefix: usize,
}

/// Tokenizes one row. Errors are plain messages; the caller adds file and location.
/// `tok` may be `None` for pre-tokenized rows only.
pub fn tokenize_row(
    row: &PreferenceRow,
    tok: Option<&Tokenizer>,
    stats: &mut TokenizeStats,
) -> Result<Example, String> {
    let need_tok = || tok.ok_or_else(|| "text rows need the model's tokenizer (tokenizer.json)".to_string());
    let (p, pc, pr) = match (&row.prompt, &row.chosen, &row.rejected) {
        (Text::Ids(p), Text::Ids(c), Text::Ids(r)) => {
            return Ok(Example {
                location: row.location.clone(),
                prompt_ids: p.clone(),
                chosen_ids: c.clone(),
                rejected_ids: r.clone(),
            })
        }
        (Text::Plain(p), Text::Plain(c), Text::Plain(r)) => {
            let tok = need_tok()?;
            let eos = tok.eos_token().ok_or("the tokenizer defines no EOS token, which TRL appends to completions")?;
            let with_eos = |s: &str| if s.ends_with(eos) { s.to_string() } else { format!("{s}{eos}") };
            let enc = |s: &str| tok.encode(s, true).map_err(|e| e.to_string());
            (enc(p)?, enc(&format!("{p}{}", with_eos(c)))?, enc(&format!("{p}{}", with_eos(r)))?)
        }
        (Text::Messages(p), Text::Messages(c), Text::Messages(r)) => {
            let tok = need_tok()?;
            let render = |msgs: Vec<&Message>, gen: bool| -> Result<Vec<u32>, String> {
                let msgs: Vec<ChatMessage> = msgs
                    .into_iter()
                    .map(|m| ChatMessage { role: m.role.clone(), content: m.content.clone() })
                    .collect();
                let text = tok.apply_chat_template(&msgs, gen).map_err(|e| e.to_string())?;
                tok.encode(&text, false).map_err(|e| e.to_string())
            };
            let pc = p.iter().chain(c.iter()).collect();
            let pr = p.iter().chain(r.iter()).collect();
            (render(p.iter().collect(), true)?, render(pc, false)?, render(pr, false)?)
        }
        _ => return Err("prompt, chosen and rejected must all be text, all messages, or all token ids".into()),
    };
    let k = common_prefix(&p, &pc).min(common_prefix(&p, &pr));
    if k < p.len() {
        stats.prompt_not_prefix += 1;
    }
    Ok(Example {
        location: row.location.clone(),
        prompt_ids: p[..k].to_vec(),
        chosen_ids: pc[k..].to_vec(),
        rejected_ids: pr[k..].to_vec(),
    })
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
