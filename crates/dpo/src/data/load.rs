//! A data file to tokenized, truncated examples, with counts of what was skipped, dropped and cut.
//! Rows are parsed and tokenized in parallel (rayon) and come back in file order.

use std::fmt;
use std::path::Path;

use hf::Tokenizer;

use super::read::{map_records, Record};
use super::rows::{parse_preference_row, parse_sft_row, parse_unpaired_rows};
use super::tokenize::{tokenize_row, tokenize_sft, tokenize_unpaired, Example, SftExample, TokenizeError};
use super::tokenize::{Tokenized, UnpairedExample};
use super::truncate::{truncate_pair, truncate_sft, truncate_unpaired, Cut, DataOptions};
use super::DataError;

/// Bad-row messages kept for the report; the count covers the rest.
pub const MAX_BAD_ROW_MESSAGES: usize = 5;

/// Rows named by each warning (dropped rows, prompts not a prefix); the count covers the rest.
pub const MAX_NAMED_ROWS: usize = 5;

/// What loading a file did, for one report at the end rather than a line per row.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DataStats {
    /// Records in the file (non-blank lines, array elements, Parquet rows).
    pub rows_read: usize,
    /// Examples returned. A pair read as unpaired data gives two.
    pub examples_kept: usize,
    /// Rows skipped as unreadable or invalid (only with `skip_bad_rows`).
    pub bad_rows: usize,
    /// The first [`MAX_BAD_ROW_MESSAGES`] of their errors, each naming file, location and field.
    pub bad_row_messages: Vec<String>,
    /// Examples dropped because a completion had no scored token left (after truncation, or none to
    /// begin with).
    pub dropped_no_completion: usize,
    /// The locations of the first [`MAX_NAMED_ROWS`] of them.
    pub dropped_rows: Vec<String>,
    /// Kept examples that lost prompt tokens to `max_prompt_length` or `max_length`.
    pub prompt_truncated: usize,
    /// Kept examples that lost completion tokens to `max_length` (or the score of the first one, when
    /// `keep_end` cut the whole prompt).
    pub completion_truncated: usize,
    /// Kept examples whose tokenized prompt was not a prefix of prompt+completion; their completion
    /// starts where the two diverge.
    pub prompt_not_prefix: usize,
    /// The locations of the first [`MAX_NAMED_ROWS`] of them.
    pub prompt_not_prefix_rows: Vec<String>,
}

impl DataStats {
    /// For a log: the counts that are not zero on one line (as `Display` writes them), then one line
    /// per kept bad-row message, so that a run that skipped rows says which.
    pub fn summary(&self) -> String {
        let mut s = self.to_string();
        for m in &self.bad_row_messages {
            s.push_str("\n  skipped ");
            s.push_str(m);
        }
        if self.bad_rows > self.bad_row_messages.len() {
            s.push_str(&format!("\n  and {} more", self.bad_rows - self.bad_row_messages.len()));
        }
        for w in self.warnings() {
            s.push_str("\n  ");
            s.push_str(&w);
        }
        s
    }

    /// One line for each thing about the rows worth a warning (rows dropped, prompts that are not a token
    /// prefix), each naming the first rows.
    pub fn warnings(&self) -> Vec<String> {
        let named = |n: usize, rows: &[String]| {
            let more = if n > rows.len() { format!(" and {} more", n - rows.len()) } else { String::new() };
            format!("{}{more}", rows.join(", "))
        };
        let mut out = Vec::new();
        if self.dropped_no_completion > 0 {
            out.push(format!(
                "{} examples dropped with no scored completion token left: {}",
                self.dropped_no_completion,
                named(self.dropped_no_completion, &self.dropped_rows)
            ));
        }
        if self.prompt_not_prefix > 0 {
            out.push(format!(
                "{} prompts are not a token prefix of prompt+completion (their completions start where the token \
                 lists diverge): {}",
                self.prompt_not_prefix,
                named(self.prompt_not_prefix, &self.prompt_not_prefix_rows)
            ));
        }
        out
    }
}

impl fmt::Display for DataStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} rows read, {} examples kept", self.rows_read, self.examples_kept)?;
        let parts = [
            (self.bad_rows, "bad rows skipped"),
            (self.dropped_no_completion, "dropped with no completion token left"),
            (self.prompt_truncated, "prompts truncated"),
            (self.completion_truncated, "completions truncated"),
            (self.prompt_not_prefix, "prompts not a token prefix of prompt+completion"),
        ];
        for (n, what) in parts.into_iter().filter(|(n, _)| *n > 0) {
            write!(f, ", {n} {what}")?;
        }
        Ok(())
    }
}

/// The examples of a file and what loading them did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadedData<T> {
    pub examples: Vec<T>,
    pub stats: DataStats,
}

/// Reads, tokenizes and truncates a preference file. `tok` is needed unless every row is pre-tokenized.
pub fn load_pairs(path: &Path, tok: Option<&Tokenizer>, opts: &DataOptions) -> Result<LoadedData<Example>, DataError> {
    load(path, opts, |rec| {
        let row = parse_preference_row(path, rec).map_err(RowError::Bad)?;
        let t = tokenize_row(&row, tok).map_err(|e| tokenize_error(path, rec, e))?;
        Ok(vec![item(t, |ex| truncate_pair(ex, opts))])
    })
}

/// Reads unpaired rows (`prompt`, `completion`, `label`) for KTO; pairs are unpaired as TRL does.
pub fn load_unpaired(
    path: &Path,
    tok: Option<&Tokenizer>,
    opts: &DataOptions,
) -> Result<LoadedData<UnpairedExample>, DataError> {
    load(path, opts, |rec| {
        let rows = parse_unpaired_rows(path, rec).map_err(RowError::Bad)?;
        rows.iter()
            .map(|row| {
                let t = tokenize_unpaired(row, tok).map_err(|e| tokenize_error(path, rec, e))?;
                Ok(item(t, |ex| truncate_unpaired(ex, opts)))
            })
            .collect()
    })
}

/// Reads SFT rows (`prompt`, `completion`), or the chosen side of pairs.
pub fn load_sft(path: &Path, tok: Option<&Tokenizer>, opts: &DataOptions) -> Result<LoadedData<SftExample>, DataError> {
    load(path, opts, |rec| {
        let row = parse_sft_row(path, rec).map_err(RowError::Bad)?;
        let t = tokenize_sft(&row, tok).map_err(|e| tokenize_error(path, rec, e))?;
        Ok(vec![item(t, |ex| truncate_sft(ex, opts))])
    })
}

enum RowError {
    /// This row's fault: skipped with `skip_bad_rows`.
    Bad(DataError),
    /// Every row's (no tokenizer, no chat template): always an error.
    Setup(DataError),
}

/// One example after truncation (`None`: dropped).
struct Item<T> {
    example: Option<(T, Cut)>,
    prompt_not_prefix: bool,
}

fn item<T>(t: Tokenized<T>, truncate: impl FnOnce(T) -> Option<(T, Cut)>) -> Item<T> {
    Item { example: truncate(t.example), prompt_not_prefix: t.prompt_not_prefix }
}

fn tokenize_error(path: &Path, rec: &Record, e: TokenizeError) -> RowError {
    let err =
        |message: String| DataError::Tokenize { path: path.to_path_buf(), location: rec.location.clone(), message };
    match e {
        TokenizeError::Setup(m) => RowError::Setup(err(m)),
        TokenizeError::Row(m) => RowError::Bad(err(m)),
    }
}

/// Checks that every token id of `examples` (read from `path`) is inside a vocabulary of `vocab` tokens:
/// ids written for, or a tokenizer belonging to, another model would otherwise only fail inside the
/// engine, without the row.
pub fn check_vocab(path: &Path, examples: &[Example], vocab: usize) -> Result<(), DataError> {
    examples.iter().try_for_each(|e| {
        let fields = [("prompt_ids", &e.prompt_ids), ("chosen_ids", &e.chosen_ids), ("rejected_ids", &e.rejected_ids)];
        check_ids(path, &e.location, &fields, vocab)
    })
}

/// [`check_vocab`] for prompt/completion examples.
pub fn check_vocab_sft(path: &Path, examples: &[SftExample], vocab: usize) -> Result<(), DataError> {
    examples.iter().try_for_each(|e| {
        check_ids(path, &e.location, &[("prompt_ids", &e.prompt_ids), ("completion_ids", &e.completion_ids)], vocab)
    })
}

fn check_ids(path: &Path, location: &str, fields: &[(&str, &Vec<u32>)], vocab: usize) -> Result<(), DataError> {
    for (field, ids) in fields {
        if let Some(&id) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(DataError::Field {
                path: path.to_path_buf(),
                location: location.to_string(),
                field: field.to_string(),
                message: format!(
                    "token id {id} is outside the model's vocabulary of {vocab} tokens (token ids or a tokenizer \
                     made for another model?)"
                ),
            });
        }
    }
    Ok(())
}

fn load<T, F>(path: &Path, opts: &DataOptions, per_record: F) -> Result<LoadedData<T>, DataError>
where
    T: Send,
    F: Fn(&Record) -> Result<Vec<Item<T>>, RowError> + Sync + Send,
{
    opts.validate()?;
    let results = map_records(path, |rec| {
        rec.map_err(RowError::Bad).and_then(|r| per_record(&r).map(|items| (r.location, items)))
    })?;
    let mut stats = DataStats { rows_read: results.len(), ..DataStats::default() };
    let mut examples = Vec::with_capacity(results.len());
    // In file order, so that the error reported is the first row's whatever the threads did.
    for r in results {
        match r {
            Ok((location, items)) => {
                let name = |rows: &mut Vec<String>| {
                    if rows.len() < MAX_NAMED_ROWS && rows.last() != Some(&location) {
                        rows.push(location.clone());
                    }
                };
                for it in items {
                    let Some((ex, cut)) = it.example else {
                        stats.dropped_no_completion += 1;
                        name(&mut stats.dropped_rows);
                        continue;
                    };
                    stats.prompt_truncated += cut.prompt as usize;
                    stats.completion_truncated += cut.completion as usize;
                    if it.prompt_not_prefix {
                        stats.prompt_not_prefix += 1;
                        name(&mut stats.prompt_not_prefix_rows);
                    }
                    examples.push(ex);
                }
            }
            Err(RowError::Bad(e)) if opts.skip_bad_rows => {
                stats.bad_rows += 1;
                if stats.bad_row_messages.len() < MAX_BAD_ROW_MESSAGES {
                    stats.bad_row_messages.push(e.to_string());
                }
            }
            Err(RowError::Bad(e) | RowError::Setup(e)) => return Err(e),
        }
    }
    stats.examples_kept = examples.len();
    if examples.is_empty() {
        return Err(DataError::NoExamples { path: path.to_path_buf(), summary: stats.to_string() });
    }
    Ok(LoadedData { examples, stats })
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::super::testutil::{chat_tokenizer, enc, fixtures, scratch, tokenizer, write};
    use super::super::truncate::Truncation;
    use super::*;

    fn data(file: &str) -> std::path::PathBuf {
        fixtures().join("data").join(file)
    }

    fn ids(ex: &[Example]) -> Vec<(Vec<u32>, Vec<u32>, Vec<u32>)> {
        ex.iter().map(|e| (e.prompt_ids.clone(), e.chosen_ids.clone(), e.rejected_ids.clone())).collect()
    }

    fn skip() -> DataOptions {
        DataOptions { skip_bad_rows: true, ..DataOptions::default() }
    }

    fn jsonl(rows: &[Value]) -> String {
        rows.iter().map(|r| r.to_string() + "\n").collect()
    }

    #[test]
    fn text_rows_tokenize_as_trl_did() {
        let tok = tokenizer();
        let text = load_pairs(&data("prefs.jsonl"), Some(&tok), &DataOptions::default()).unwrap();
        let want = load_pairs(&data("prefs.tokenized.jsonl"), None, &DataOptions::default()).unwrap();
        assert_eq!(text.examples, want.examples);
        let stats = DataStats { rows_read: 24, examples_kept: 24, ..DataStats::default() };
        assert_eq!((text.stats, want.stats), (stats.clone(), stats));
        assert_eq!(text.examples[23].location, "line 24");
    }

    #[test]
    fn json_array_and_implicit_prompt() {
        let tok = tokenizer();
        let dir = scratch("load-array");
        let lines = std::fs::read_to_string(data("prefs.jsonl")).unwrap();
        let rows: Vec<Value> = lines.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let arr = write(&dir, "prefs.json", serde_json::to_string_pretty(&rows).unwrap());
        let got = load_pairs(&arr, Some(&tok), &DataOptions::default()).unwrap();
        let want = load_pairs(&data("prefs.jsonl"), Some(&tok), &DataOptions::default()).unwrap();
        assert_eq!(ids(&got.examples), ids(&want.examples));
        assert_eq!(got.examples[1].location, "element 2");

        // Implicit prompt (Anthropic HH): the common prefix of the two texts, the space left with the
        // completions, gives the same examples as the explicit split.
        let hh = [("Human: hi Assistant:", " hello there", " go away"), ("Q: 2+2? A:", " 4", " 5")];
        let explicit: Vec<Value> =
            hh.iter().map(|(p, c, r)| json!({"prompt": p, "chosen": c, "rejected": r})).collect();
        let implicit: Vec<Value> =
            hh.iter().map(|(p, c, r)| json!({"chosen": format!("{p}{c}"), "rejected": format!("{p}{r}")})).collect();
        let want = load_pairs(&write(&dir, "ex.jsonl", jsonl(&explicit)), Some(&tok), &DataOptions::default()).unwrap();
        let got = load_pairs(&write(&dir, "hh.jsonl", jsonl(&implicit)), Some(&tok), &DataOptions::default()).unwrap();
        assert_eq!(got.examples, want.examples);
        assert_eq!(got.examples[1].prompt_ids, enc(&tok, "Q: 2+2? A:"));
    }

    #[test]
    fn conversational_pairs() {
        let tok = chat_tokenizer("load-chat");
        let dir = scratch("load-chat");
        let m = |role: &str, content: &str| json!({"role": role, "content": content});
        let row = json!({"prompt": [m("user", "Hi")], "chosen": [m("assistant", "Hello!")], "rejected": [m("assistant", "Go.")]});
        // Implicit conversational prompt: the shared leading messages.
        let implicit = json!({"chosen": [m("user", "Hi"), m("assistant", "Hello!")], "rejected": [m("user", "Hi"), m("assistant", "Go.")]});
        let got =
            load_pairs(&write(&dir, "c.jsonl", jsonl(&[row, implicit])), Some(&tok), &DataOptions::default()).unwrap();
        let p = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n";
        let e = |s: &str| tok.encode(s, false).unwrap();
        assert_eq!(got.examples[0].prompt_ids, e(p));
        assert_eq!(got.examples[0].chosen_ids, e(&format!("{p}Hello!<|im_end|>\n"))[e(p).len()..]);
        assert_eq!(ids(&got.examples[..1]), ids(&got.examples[1..]));
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let tok = tokenizer();
        let dir = scratch("load-errors");
        let cases: [(&str, &[u8], &str); 5] = [
            (
                "json.jsonl",
                b"{\"prompt\": \"p\", \"chosen\": \"c\", \"rejected\": \"r\"}\n{\"prompt\": \"p\",",
                "json.jsonl, line 2, column 15: invalid JSON: EOF while parsing",
            ),
            (
                "type.jsonl",
                b"{\"prompt\": \"p\", \"chosen\": [1], \"rejected\": \"r\"}",
                "type.jsonl, line 1, field `chosen`: message 1: expected an object",
            ),
            (
                "missing.jsonl",
                b"\n{\"prompt\": \"p\", \"chosen\": \"c\"}",
                "missing.jsonl, line 2, field `rejected`: missing",
            ),
            (
                "utf8.jsonl",
                b"{\"prompt\": \"\xff\", \"chosen\": \"c\", \"rejected\": \"r\"}",
                "utf8.jsonl, line 1: not UTF-8 text",
            ),
            ("empty.jsonl", b"", "empty.jsonl holds no rows"),
        ];
        for (name, bytes, want) in cases {
            let e = load_pairs(&write(&dir, name, bytes), Some(&tok), &DataOptions::default()).unwrap_err().to_string();
            assert!(e.contains(want), "{name}: {e}");
        }
        let e = load_pairs(&dir, Some(&tok), &DataOptions::default()).unwrap_err().to_string();
        assert!(e.contains("load-errors is a directory"), "{e}");
        // A split's shards: the row's location names the shard it is in.
        let shards = dir.join("shards");
        std::fs::create_dir_all(&shards).unwrap();
        let good = "{\"prompt\": \"p\", \"chosen\": \"c\", \"rejected\": \"r\"}\n";
        write(&shards, "train-00000-of-00002.jsonl", good);
        write(&shards, "train-00001-of-00002.jsonl", format!("{good}{{\"prompt\": \"p\", \"chosen\": \"c\"}}\n"));
        let e = load_pairs(&shards.join("train-*.jsonl"), Some(&tok), &DataOptions::default()).unwrap_err().to_string();
        assert!(e.contains("train-00001-of-00002.jsonl, line 2, field `rejected`: missing"), "{e}");
        let bad = DataOptions { max_length: Some(0), ..DataOptions::default() };
        let e = load_pairs(&data("prefs.jsonl"), Some(&tok), &bad).unwrap_err().to_string();
        assert_eq!(e, "invalid data option: max_length must be at least 1");
    }

    #[test]
    fn skip_bad_rows_counts_and_keeps_the_first_messages() {
        let tok = tokenizer();
        let dir = scratch("load-skip");
        let good = r#"{"prompt": "Q:", "chosen": " yes", "rejected": " no"}"#;
        let text = [
            good.as_bytes(),
            b"{not json",
            br#"{"prompt": "Q:", "chosen": 5, "rejected": " no"}"#,
            br#"{"prompt": "Q:", "chosen": " yes"}"#,
            b"{\"prompt\": \"\xc3\x28\", \"chosen\": \"a\", \"rejected\": \"b\"}",
            br#"{"prompt_ids": [1], "chosen_ids": [], "rejected_ids": [2]}"#,
            br#"{"prompt": [{"role": "user"}], "chosen": [], "rejected": []}"#,
            good.as_bytes(),
        ]
        .join(&b'\n');
        let path = write(&dir, "mixed.jsonl", text);
        let e = load_pairs(&path, Some(&tok), &DataOptions::default()).unwrap_err().to_string();
        assert!(e.contains("mixed.jsonl, line 2, column 2: invalid JSON"), "{e}");

        let got = load_pairs(&path, Some(&tok), &skip()).unwrap();
        assert_eq!(got.examples.iter().map(|e| e.location.as_str()).collect::<Vec<_>>(), ["line 1", "line 8"]);
        let s = &got.stats;
        assert_eq!((s.rows_read, s.examples_kept, s.bad_rows), (8, 2, 6));
        assert_eq!(s.bad_row_messages.len(), MAX_BAD_ROW_MESSAGES);
        let wants = [
            "line 2, column 2: invalid JSON",
            "line 3, field `chosen`",
            "line 4, field `rejected`: missing",
            "line 5: not UTF-8",
            "line 6, field `chosen_ids`: no completion tokens",
        ];
        for (m, want) in s.bad_row_messages.iter().zip(wants) {
            assert!(m.contains("mixed.jsonl") && m.contains(want), "{m} / {want}");
        }
        let summary = s.summary();
        assert!(summary.starts_with("8 rows read, 2 examples kept, 6 bad rows skipped\n  skipped "), "{summary}");
        assert!(summary.ends_with("\n  and 1 more"), "{summary}");

        // A missing tokenizer is not the rows' fault: it stops the load even when skipping.
        let e = load_pairs(&path, None, &skip()).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("need the model's tokenizer"), "{e}");
        // Nothing usable is an error that says why.
        let path = write(&dir, "allbad.jsonl", "{}\n[]\n");
        let e = load_pairs(&path, Some(&tok), &skip()).unwrap_err().to_string();
        assert!(e.contains("allbad.jsonl: no usable rows (2 rows read, 0 examples kept, 2 bad rows skipped)"), "{e}");
    }

    #[test]
    fn truncation_is_counted_and_empty_rows_dropped() {
        let dir = scratch("load-truncate");
        let rows = [
            json!({"prompt_ids": [1, 2, 3, 4], "chosen_ids": [5, 6, 7], "rejected_ids": [8]}),
            json!({"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4]}),
            json!({"prompt_ids": [1, 2, 3, 4, 5, 6], "chosen_ids": [7], "rejected_ids": [8]}),
            json!({"prompt_ids": [], "chosen_ids": [9], "rejected_ids": [8, 7]}),
        ];
        let path = write(&dir, "ids.jsonl", jsonl(&rows));
        let o = |l, m, t| DataOptions { max_length: l, max_prompt_length: m, truncation: t, skip_bad_rows: false };

        let got = load_pairs(&path, None, &o(Some(5), None, Truncation::KeepStart)).unwrap();
        assert_eq!(ids(&got.examples), vec![(vec![1, 2, 3, 4], vec![5], vec![8]), (vec![1, 2], vec![3], vec![4])]);
        let s = &got.stats;
        // Row 3's prompt fills max_length; row 4's chosen side has one token and nothing before it.
        assert_eq!((s.rows_read, s.examples_kept, s.dropped_no_completion), (4, 2, 2));
        assert_eq!((s.prompt_truncated, s.completion_truncated, s.bad_rows), (0, 1, 0));
        // The warning names the dropped rows.
        assert_eq!(s.dropped_rows, ["line 3", "line 4"]);
        let summary = s.summary();
        let want = "\n  2 examples dropped with no scored completion token left: line 3, line 4";
        assert!(summary.ends_with(want), "{summary}");

        let got = load_pairs(&path, None, &o(Some(5), None, Truncation::KeepEnd)).unwrap();
        let ex = &got.examples;
        assert_eq!((ex[0].chosen_prompt(), ex[0].chosen_ids.as_slice()), (&[3, 4][..], &[5, 6, 7][..]));
        assert_eq!((ex[0].rejected_prompt(), ex[0].rejected_ids.as_slice()), (&[1, 2, 3, 4][..], &[8][..]));
        assert_eq!((ex[2].prompt_ids.as_slice(), ex[2].chosen_ids.as_slice()), (&[3, 4, 5, 6][..], &[7][..]));
        assert_eq!(
            (got.stats.prompt_truncated, got.stats.completion_truncated, got.stats.dropped_no_completion),
            (2, 0, 1)
        );

        let got = load_pairs(&path, None, &o(None, Some(2), Truncation::KeepStart)).unwrap();
        assert_eq!(got.examples[0].prompt_ids, vec![3, 4]);
        assert_eq!(got.examples[2].prompt_ids, vec![5, 6]);
        assert_eq!((got.stats.prompt_truncated, got.stats.dropped_no_completion), (2, 1));

        assert_eq!(got.stats.dropped_rows, ["line 4"]);

        let e = load_pairs(&path, None, &o(Some(1), None, Truncation::KeepStart)).unwrap_err().to_string();
        assert!(
            e.contains("no usable rows (4 rows read, 0 examples kept, 4 dropped with no completion token left)"),
            "{e}"
        );
    }

    #[test]
    fn unpaired_rows_and_pairs_for_kto() {
        let tok = tokenizer();
        let dir = scratch("load-unpaired");
        let rows = [
            json!({"prompt": "Q: ice?", "completion": " Cold.", "label": true}),
            json!({"prompt": "Q: ice?", "chosen": " Cold.", "rejected": " Hot."}),
        ];
        let got = load_unpaired(&write(&dir, "kto.jsonl", jsonl(&rows)), Some(&tok), &DataOptions::default()).unwrap();
        let want = |c: &str, label: bool, line: &str| UnpairedExample {
            location: line.into(),
            prompt_ids: enc(&tok, "Q: ice?"),
            completion_ids: enc(&tok, &format!("Q: ice?{c}<|endoftext|>"))[enc(&tok, "Q: ice?").len()..].to_vec(),
            label,
        };
        assert_eq!(
            got.examples,
            vec![want(" Cold.", true, "line 1"), want(" Cold.", true, "line 2"), want(" Hot.", false, "line 2")]
        );
        assert_eq!((got.stats.rows_read, got.stats.examples_kept), (2, 3));
    }

    #[test]
    fn sft_rows_and_the_chosen_side_of_pairs() {
        let tok = tokenizer();
        let pairs = load_pairs(&data("prefs.jsonl"), Some(&tok), &DataOptions::default()).unwrap();
        let sft = load_sft(&data("prefs.jsonl"), Some(&tok), &DataOptions::default()).unwrap();
        let chosen: Vec<_> = pairs.examples.iter().map(|e| (e.prompt_ids.clone(), e.chosen_ids.clone())).collect();
        let got: Vec<_> = sft.examples.iter().map(|e| (e.prompt_ids.clone(), e.completion_ids.clone())).collect();
        // The pair's prompt ends where either completion diverges; alone, where the chosen one does.
        // For these rows (no merge across the boundary) they are the same.
        assert_eq!(got, chosen);

        let dir = scratch("load-sft");
        let rows =
            [json!({"prompt": "Say hi.", "completion": " Hi!"}), json!({"prompt_ids": [7], "completion_ids": [8, 9]})];
        let opts = DataOptions { max_length: Some(3), truncation: Truncation::KeepEnd, ..DataOptions::default() };
        let got = load_sft(&write(&dir, "sft.jsonl", jsonl(&rows)), Some(&tok), &opts).unwrap();
        let full = enc(&tok, "Say hi. Hi!<|endoftext|>");
        let p = enc(&tok, "Say hi.").len();
        let kept = &full[full.len() - 3..];
        let cut = 3usize.saturating_sub(full.len() - p);
        assert_eq!(
            (got.examples[0].prompt_ids.as_slice(), got.examples[0].completion_ids.as_slice()),
            kept.split_at(cut)
        );
        assert_eq!((got.examples[1].prompt_ids.clone(), got.examples[1].completion_ids.clone()), (vec![7], vec![8, 9]));
    }

    #[test]
    fn parallel_load_keeps_file_order() {
        let tok = tokenizer();
        let dir = scratch("load-order");
        let rows: Vec<Value> = (0..3000)
            .map(|i| json!({"prompt": format!("Question {i}:"), "chosen": format!(" answer {}", i * 7), "rejected": " no"}))
            .collect();
        let got = load_pairs(&write(&dir, "many.jsonl", jsonl(&rows)), Some(&tok), &DataOptions::default()).unwrap();
        assert_eq!(got.examples.len(), 3000);
        for (i, ex) in got.examples.iter().enumerate().step_by(97) {
            assert_eq!(ex.location, format!("line {}", i + 1));
            assert_eq!(ex.prompt_ids, enc(&tok, &format!("Question {i}:")));
        }
    }
}
