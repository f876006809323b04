//! Rows to token ids, by TRL 1.x's rules (see `tests/fixtures/parity/README.md`):
//! a plain-text completion gets the EOS token appended unless it already ends with it; the prompt and
//! prompt+completion are tokenized separately (the tokenizer's own special tokens included, as
//! `tokenizer(text)` does); the completion starts where the two token lists diverge. Conversations are
//! rendered with the chat template (the prompt with the generation prompt added) and tokenized without
//! adding special tokens again, as `apply_chat_template(tokenize=True)` does.

use hf::{ChatMessage, Tokenizer};

use super::rows::{Message, PreferenceRow, SftRow, Text, UnpairedRow};

/// One tokenized preference pair. The chosen sequence is `prompt_ids[chosen_prompt_skip..]` followed by
/// `chosen_ids`, and likewise for rejected. The skips are zero unless `keep_end` truncation cut more of
/// the prompt from one sequence than from the other; then the prompt is no longer shared and the pair is
/// packed as two sequences. A completion token at the very start of its sequence (nothing of the prompt
/// left before it) has no predecessor and, as in TRL, is not scored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    pub location: String,
    pub prompt_ids: Vec<u32>,
    pub chosen_ids: Vec<u32>,
    pub rejected_ids: Vec<u32>,
    pub chosen_prompt_skip: usize,
    pub rejected_prompt_skip: usize,
}

impl Example {
    /// A pair whose sequences share the whole prompt (no per-side cut).
    pub fn new(
        location: impl Into<String>,
        prompt_ids: Vec<u32>,
        chosen_ids: Vec<u32>,
        rejected_ids: Vec<u32>,
    ) -> Self {
        Example {
            location: location.into(),
            prompt_ids,
            chosen_ids,
            rejected_ids,
            chosen_prompt_skip: 0,
            rejected_prompt_skip: 0,
        }
    }

    /// The prompt tokens in the chosen sequence.
    pub fn chosen_prompt(&self) -> &[u32] {
        &self.prompt_ids[self.chosen_prompt_skip.min(self.prompt_ids.len())..]
    }

    /// The prompt tokens in the rejected sequence.
    pub fn rejected_prompt(&self) -> &[u32] {
        &self.prompt_ids[self.rejected_prompt_skip.min(self.prompt_ids.len())..]
    }

    /// Whether both sequences start with the same non-empty prompt, so it can be computed once.
    pub fn shares_prompt(&self) -> bool {
        self.chosen_prompt_skip == 0 && self.rejected_prompt_skip == 0 && !self.prompt_ids.is_empty()
    }

    /// Chosen completion tokens that are scored (have a predecessor).
    pub fn chosen_len(&self) -> usize {
        scored_tokens(self.chosen_prompt().len(), self.chosen_ids.len())
    }

    /// Rejected completion tokens that are scored.
    pub fn rejected_len(&self) -> usize {
        scored_tokens(self.rejected_prompt().len(), self.rejected_ids.len())
    }
}

/// One tokenized completion judged on its own (KTO). The sequence is `prompt_ids` then `completion_ids`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnpairedExample {
    pub location: String,
    pub prompt_ids: Vec<u32>,
    pub completion_ids: Vec<u32>,
    pub label: bool,
}

impl UnpairedExample {
    /// Completion tokens that are scored.
    pub fn completion_len(&self) -> usize {
        scored_tokens(self.prompt_ids.len(), self.completion_ids.len())
    }

    /// `(prompt, completion)`, as [`super::pack::pack_sequences`] takes them.
    pub fn parts(&self) -> (&[u32], &[u32]) {
        (&self.prompt_ids, &self.completion_ids)
    }
}

/// One tokenized prompt and the completion to imitate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SftExample {
    pub location: String,
    pub prompt_ids: Vec<u32>,
    pub completion_ids: Vec<u32>,
}

impl SftExample {
    /// Completion tokens that are scored.
    pub fn completion_len(&self) -> usize {
        scored_tokens(self.prompt_ids.len(), self.completion_ids.len())
    }

    /// `(prompt, completion)`, as [`super::pack::pack_sequences`] takes them.
    pub fn parts(&self) -> (&[u32], &[u32]) {
        (&self.prompt_ids, &self.completion_ids)
    }
}

/// Scored completion tokens of a sequence `prompt (prompt_len tokens) ++ completion`: all of them, except
/// the first when no prompt token precedes it (the logits at position i predict token i + 1).
pub fn scored_tokens(prompt_len: usize, completion_len: usize) -> usize {
    if prompt_len == 0 {
        completion_len.saturating_sub(1)
    } else {
        completion_len
    }
}

/// A tokenized row and what tokenization noticed about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokenized<T> {
    pub example: T,
    /// The tokenized prompt was not a prefix of the tokenized prompt+completion (the tokenizer merged
    /// across the boundary, or the template renders the prompt differently); the completion starts at
    /// the first differing token, as in TRL.
    pub prompt_not_prefix: bool,
}

/// Why a row could not be tokenized.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenizeError {
    /// No row of its kind can be: no tokenizer, no EOS token, no chat template. Reported even when bad
    /// rows are skipped, since skipping would drop every row for a reason that is not the rows'.
    Setup(String),
    /// This row only (a chat template that rejects its messages, ...).
    Row(String),
}

impl std::fmt::Display for TokenizeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenizeError::Setup(m) | TokenizeError::Row(m) => f.write_str(m),
        }
    }
}

/// Tokenizes one pair. `tok` may be `None` for pre-tokenized rows only.
pub fn tokenize_row(row: &PreferenceRow, tok: Option<&Tokenizer>) -> Result<Tokenized<Example>, TokenizeError> {
    let Encoded { prompt, mut completions, prompt_not_prefix } =
        encode(&row.prompt, &[&row.chosen, &row.rejected], tok)?;
    let rejected = completions.pop().unwrap_or_default();
    let chosen = completions.pop().unwrap_or_default();
    Ok(Tokenized { example: Example::new(row.location.clone(), prompt, chosen, rejected), prompt_not_prefix })
}

/// Tokenizes one unpaired row.
pub fn tokenize_unpaired(
    row: &UnpairedRow,
    tok: Option<&Tokenizer>,
) -> Result<Tokenized<UnpairedExample>, TokenizeError> {
    let Encoded { prompt, mut completions, prompt_not_prefix } = encode(&row.prompt, &[&row.completion], tok)?;
    let example = UnpairedExample {
        location: row.location.clone(),
        prompt_ids: prompt,
        completion_ids: completions.pop().unwrap_or_default(),
        label: row.label,
    };
    Ok(Tokenized { example, prompt_not_prefix })
}

/// Tokenizes one SFT row.
pub fn tokenize_sft(row: &SftRow, tok: Option<&Tokenizer>) -> Result<Tokenized<SftExample>, TokenizeError> {
    let Encoded { prompt, mut completions, prompt_not_prefix } = encode(&row.prompt, &[&row.completion], tok)?;
    let completion_ids = completions.pop().unwrap_or_default();
    let example = SftExample { location: row.location.clone(), prompt_ids: prompt, completion_ids };
    Ok(Tokenized { example, prompt_not_prefix })
}

/// A prompt and the completions that follow it, as token ids.
struct Encoded {
    prompt: Vec<u32>,
    completions: Vec<Vec<u32>>,
    prompt_not_prefix: bool,
}

/// Tokenizes a prompt and the completions that follow it by TRL's rules. With several completions the
/// prompt ends where the first of them diverges, so that all share it.
fn encode(prompt: &Text, completions: &[&Text], tok: Option<&Tokenizer>) -> Result<Encoded, TokenizeError> {
    let setup = |m: &str| TokenizeError::Setup(m.to_string());
    let row_err = |e: hf::Error| TokenizeError::Row(e.to_string());
    let need_tok = || {
        tok.ok_or_else(|| {
            setup(
                "text rows need the model's tokenizer, and the model directory has no tokenizer.json; copy the \
             model's tokenizer.json there, or give pre-tokenized rows (prompt_ids, chosen_ids, rejected_ids)",
            )
        })
    };
    let (p, full): (Vec<u32>, Vec<Vec<u32>>) = match prompt {
        Text::Ids(p) => {
            let ids = completions.iter().map(|c| match c {
                Text::Ids(c) => Ok(c.clone()),
                _ => Err(mixed()),
            });
            let completions = ids.collect::<Result<_, _>>()?;
            return Ok(Encoded { prompt: p.clone(), completions, prompt_not_prefix: false });
        }
        Text::Plain(p) => {
            let tok = need_tok()?;
            let eos = tok.eos_token().ok_or_else(|| {
                setup("the tokenizer defines no EOS token, which TRL appends to plain-text completions")
            })?;
            let enc = |s: &str| tok.encode(s, true).map_err(row_err);
            let full = completions.iter().map(|c| match c {
                // TRL appends EOS to the text, before tokenizing, unless it is already there.
                Text::Plain(c) if c.ends_with(eos) => enc(&format!("{p}{c}")),
                Text::Plain(c) => enc(&format!("{p}{c}{eos}")),
                _ => Err(mixed()),
            });
            (enc(p)?, full.collect::<Result<_, _>>()?)
        }
        Text::Messages(p) => {
            let tok = need_tok()?;
            if tok.chat_template().is_none() {
                return Err(setup(
                    "conversational rows need a chat template (chat_template.jinja or tokenizer_config.json's \
                     `chat_template`), and the tokenizer has none",
                ));
            }
            let render = |msgs: &mut dyn Iterator<Item = &Message>, gen: bool| -> Result<Vec<u32>, TokenizeError> {
                let msgs: Vec<ChatMessage> =
                    msgs.map(|m| ChatMessage::new(m.role.clone(), m.content.clone())).collect();
                let text = tok.apply_chat_template(&msgs, gen).map_err(row_err)?;
                // The template already wrote every special token it wants.
                tok.encode(&text, false).map_err(row_err)
            };
            let full = completions.iter().map(|c| match c {
                Text::Messages(c) => render(&mut p.iter().chain(c.iter()), false),
                _ => Err(mixed()),
            });
            (render(&mut p.iter(), true)?, full.collect::<Result<_, _>>()?)
        }
    };
    let k = full.iter().map(|f| common_prefix(&p, f)).min().unwrap_or(p.len());
    let completions = full.into_iter().map(|mut f| f.split_off(k)).collect();
    let mut prompt = p;
    let prompt_not_prefix = k < prompt.len();
    prompt.truncate(k);
    Ok(Encoded { prompt, completions, prompt_not_prefix })
}

fn mixed() -> TokenizeError {
    TokenizeError::Row("prompt and completions must all be text, all messages, or all token ids".into())
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::super::rows::Message;
    use super::super::testutil::{chat_tokenizer, enc, fixtures, tokenizer};
    use super::*;

    fn plain(s: &str) -> Text {
        Text::Plain(s.into())
    }

    fn pair(p: Text, c: Text, r: Text) -> PreferenceRow {
        PreferenceRow { location: "line 1".into(), prompt: p, chosen: c, rejected: r }
    }

    fn msgs(v: &[(&str, &str)]) -> Text {
        Text::Messages(v.iter().map(|(r, c)| Message { role: r.to_string(), content: c.to_string() }).collect())
    }

    #[test]
    fn plain_text_matches_trl_exactly() {
        // Row 1 of the fixtures, tokenized by TRL 1.16 into prefs.tokenized.jsonl.
        let text = std::fs::read_to_string(fixtures().join("data/prefs.jsonl")).unwrap();
        let ids = std::fs::read_to_string(fixtures().join("data/prefs.tokenized.jsonl")).unwrap();
        let row: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        let want: serde_json::Value = serde_json::from_str(ids.lines().next().unwrap()).unwrap();
        let s = |k: &str| plain(row[k].as_str().unwrap());
        let v = |k: &str| want[k].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect::<Vec<_>>();
        let t = tokenize_row(&pair(s("prompt"), s("chosen"), s("rejected")), Some(&tokenizer())).unwrap();
        assert_eq!(t.example, Example::new("line 1", v("prompt_ids"), v("chosen_ids"), v("rejected_ids")));
        assert!(!t.prompt_not_prefix);
    }

    #[test]
    fn eos_is_appended_once_and_empty_text_is_allowed() {
        let tok = tokenizer();
        let eos = tok.eos_id().unwrap();
        let t = tokenize_row(&pair(plain("Hi."), plain(" Yo<|endoftext|>"), plain("")), Some(&tok)).unwrap();
        let ex = t.example;
        assert_eq!(ex.prompt_ids, enc(&tok, "Hi."));
        assert_eq!(ex.chosen_ids, enc(&tok, " Yo<|endoftext|>"));
        assert_eq!(ex.chosen_ids.iter().filter(|&&t| t == eos).count(), 1);
        assert_eq!(ex.rejected_ids, vec![eos]);
        // An empty prompt: the completion's first token has nothing before it and is not scored.
        let ex = tokenize_row(&pair(plain(""), plain("Yes."), plain("No.")), Some(&tok)).unwrap().example;
        assert!(ex.prompt_ids.is_empty());
        assert_eq!(ex.chosen_ids, enc(&tok, "Yes.<|endoftext|>"));
        assert_eq!(ex.chosen_len(), ex.chosen_ids.len() - 1);
    }

    #[test]
    fn divergence_point_when_tokens_merge_across_the_boundary() {
        let tok = tokenizer();
        let text = "Tell me about my grandmother.";
        let mut merged = 0;
        // Every split of the sentence into prompt and completion: wherever BPE merges across the split,
        // the completion starts where the token lists diverge.
        for (i, _) in text.char_indices().skip(1) {
            let (p, c) = text.split_at(i);
            let full = enc(&tok, &format!("{p}{c}<|endoftext|>"));
            let prompt = enc(&tok, p);
            let k = common_prefix(&prompt, &full);
            let row = UnpairedRow { location: "line 2".into(), prompt: plain(p), completion: plain(c), label: true };
            let t = tokenize_unpaired(&row, Some(&tok)).unwrap();
            assert_eq!(t.prompt_not_prefix, k < prompt.len(), "{p:?} | {c:?}");
            assert_eq!((t.example.prompt_ids.as_slice(), t.example.completion_ids.as_slice()), full.split_at(k));
            merged += t.prompt_not_prefix as usize;
        }
        assert!(merged > 0, "no split of {text:?} merges tokens across the boundary");
    }

    #[test]
    fn conversations_use_the_chat_template_without_eos() {
        let tok = chat_tokenizer("tokenize-chat");
        let prompt = msgs(&[("user", "What is ice?")]);
        let row = pair(prompt.clone(), msgs(&[("assistant", "Frozen water.")]), msgs(&[("assistant", "Steam.")]));
        let ex = tokenize_row(&row, Some(&tok)).unwrap().example;
        let p = "<|im_start|>user\nWhat is ice?<|im_end|>\n<|im_start|>assistant\n";
        let no_special = |s: &str| tok.encode(s, false).unwrap();
        assert_eq!(ex.prompt_ids, no_special(p));
        assert_eq!(ex.chosen_ids, no_special(&format!("{p}Frozen water.<|im_end|>\n"))[ex.prompt_ids.len()..]);
        assert_eq!(ex.rejected_ids, no_special(&format!("{p}Steam.<|im_end|>\n"))[ex.prompt_ids.len()..]);
        assert_ne!(ex.chosen_ids.last(), tok.eos_id().as_ref());

        let sft = SftRow { location: "line 3".into(), prompt, completion: msgs(&[("assistant", "Frozen water.")]) };
        let s = tokenize_sft(&sft, Some(&tok)).unwrap().example;
        assert_eq!((s.prompt_ids, s.completion_ids), (ex.prompt_ids, ex.chosen_ids));
    }

    #[test]
    fn setup_problems_are_not_row_errors() {
        let row = pair(plain("p"), plain("c"), plain("r"));
        assert!(matches!(tokenize_row(&row, None), Err(TokenizeError::Setup(m)) if m.contains("tokenizer")));
        let row = pair(msgs(&[("user", "q")]), msgs(&[("assistant", "a")]), msgs(&[("assistant", "b")]));
        let e = tokenize_row(&row, Some(&tokenizer())).unwrap_err();
        assert!(matches!(&e, TokenizeError::Setup(m) if m.contains("chat template")), "{e}");
        // Pre-tokenized rows need no tokenizer and are taken as they are (no EOS added).
        let row = pair(Text::Ids(vec![1]), Text::Ids(vec![2]), Text::Ids(vec![3, 4]));
        assert_eq!(tokenize_row(&row, None).unwrap().example, Example::new("line 1", vec![1], vec![2], vec![3, 4]));
    }
}
