//! Length limits on tokenized rows, in the order TRL applied them:
//!
//! 1. `max_prompt_length` keeps the END of the prompt, the tokens nearest the completion (TRL before
//!    1.0 truncated prompts this way; 1.x dropped the option).
//! 2. `max_length` limits each prompt+completion sequence, as TRL 1.16's `DataCollatorForPreference`
//!    slices `prompt + completion`: `keep_start` keeps the first `max_length` tokens (cutting the
//!    completion's end), `keep_end` the last ones (cutting the prompt's start, then the completion's).
//!
//! A completion token left at the very start of its sequence has no predecessor and is not scored, as
//! in TRL. A row where some completion is left with no scored token is dropped (TRL drops `keep_start`
//! rows whose prompt fills `max_length`; the other cases would give empty sums and NaN length-normalized
//! losses later).

use serde::{Deserialize, Serialize};

use super::tokenize::{scored_tokens, Example, SftExample, UnpairedExample};
use super::DataError;

/// Which end of an over-long sequence to keep.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    /// TRL's `keep_start` (its default): the first `max_length` tokens.
    #[default]
    KeepStart,
    /// TRL's `keep_end`: the last `max_length` tokens.
    KeepEnd,
}

impl std::str::FromStr for Truncation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "keep_start" | "keep-start" => Ok(Truncation::KeepStart),
            "keep_end" | "keep-end" => Ok(Truncation::KeepEnd),
            _ => Err(format!("unknown truncation mode {s:?}; expected keep_start or keep_end")),
        }
    }
}

impl std::fmt::Display for Truncation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Truncation::KeepStart => "keep_start",
            Truncation::KeepEnd => "keep_end",
        })
    }
}

/// How rows are limited and which are kept. The default truncates nothing and stops at the first bad
/// row; TRL's trainers default to `max_length` 1024, which is the trainer configuration's to set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DataOptions {
    /// Tokens per prompt+completion sequence.
    pub max_length: Option<usize>,
    /// Tokens per prompt, keeping its end.
    pub max_prompt_length: Option<usize>,
    pub truncation: Truncation,
    /// Skip (and count) rows that cannot be read or tokenized instead of stopping at the first.
    pub skip_bad_rows: bool,
}

impl DataOptions {
    pub fn validate(&self) -> Result<(), DataError> {
        // Python's `ids[-0:]` would keep everything; a zero here is a mistake, not a request for that.
        for (name, v) in [("max_length", self.max_length), ("max_prompt_length", self.max_prompt_length)] {
            if v == Some(0) {
                return Err(DataError::Options(format!("{name} must be at least 1")));
            }
        }
        Ok(())
    }
}

/// What truncation did to one kept example.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cut {
    /// Some sequence lost prompt tokens.
    pub prompt: bool,
    /// Some sequence lost completion tokens, or the score of its first one.
    pub completion: bool,
}

/// Truncates a freshly tokenized pair (its skips are recomputed); `None` when a side has no scored
/// completion token left.
pub fn truncate_pair(ex: Example, opts: &DataOptions) -> Option<(Example, Cut)> {
    let Example { location, mut prompt_ids, mut chosen_ids, mut rejected_ids, .. } = ex;
    let (skips, cut) = truncate(&mut prompt_ids, &mut [&mut chosen_ids, &mut rejected_ids], opts)?;
    let ex = Example {
        location,
        prompt_ids,
        chosen_ids,
        rejected_ids,
        chosen_prompt_skip: skips[0],
        rejected_prompt_skip: skips[1],
    };
    Some((ex, cut))
}

/// Truncates an unpaired example; `None` when no scored completion token is left.
pub fn truncate_unpaired(mut ex: UnpairedExample, opts: &DataOptions) -> Option<(UnpairedExample, Cut)> {
    let (_, cut) = truncate(&mut ex.prompt_ids, &mut [&mut ex.completion_ids], opts)?;
    Some((ex, cut))
}

/// Truncates an SFT example; `None` when no scored completion token is left.
pub fn truncate_sft(mut ex: SftExample, opts: &DataOptions) -> Option<(SftExample, Cut)> {
    let (_, cut) = truncate(&mut ex.prompt_ids, &mut [&mut ex.completion_ids], opts)?;
    Some((ex, cut))
}

/// Truncates a prompt and the completions that follow it in place. Returns, per completion, how many
/// leading prompt tokens its sequence lost beyond what was taken off `prompt` itself (a cut that every
/// sequence shares is taken off the prompt, so that it can still be shared), or `None` to drop the row.
fn truncate(prompt: &mut Vec<u32>, sides: &mut [&mut Vec<u32>], opts: &DataOptions) -> Option<(Vec<usize>, Cut)> {
    let before: Vec<usize> = sides.iter().map(|c| scored_tokens(prompt.len(), c.len())).collect();
    let mut cut = Cut::default();
    if let Some(m) = opts.max_prompt_length {
        if prompt.len() > m {
            prompt.drain(..prompt.len() - m);
            cut.prompt = true;
        }
    }
    let p = prompt.len();
    let mut skips = vec![0; sides.len()];
    if let Some(l) = opts.max_length {
        for (c, skip) in sides.iter_mut().zip(&mut skips) {
            let excess = (p + c.len()).saturating_sub(l);
            if excess == 0 {
                continue;
            }
            match opts.truncation {
                // When the prompt alone fills `l`, nothing of the completion is left and the row goes.
                Truncation::KeepStart => c.truncate(l.saturating_sub(p)),
                Truncation::KeepEnd if excess <= p => *skip = excess,
                Truncation::KeepEnd => {
                    *skip = p;
                    c.drain(..excess - p);
                }
            }
        }
        let common = skips.iter().copied().min().unwrap_or(0);
        prompt.drain(..common);
        skips.iter_mut().for_each(|s| *s -= common);
    }
    let mut keep = true;
    for ((c, &skip), &b) in sides.iter().zip(&skips).zip(&before) {
        let seq_prompt = prompt.len() - skip;
        let after = scored_tokens(seq_prompt, c.len());
        keep &= after > 0;
        cut.prompt |= seq_prompt < p;
        cut.completion |= after < b;
    }
    keep.then_some((skips, cut))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(max_length: Option<usize>, max_prompt_length: Option<usize>, truncation: Truncation) -> DataOptions {
        DataOptions { max_length, max_prompt_length, truncation, skip_bad_rows: false }
    }

    fn pair(p: &[u32], c: &[u32], r: &[u32]) -> Example {
        Example::new("line 1", p.to_vec(), c.to_vec(), r.to_vec())
    }

    /// TRL 1.16's collator on one sequence: slice `prompt + completion` and its completion mask, then
    /// score token i (i >= 1) where the mask is 1. Returns (sequence, scored tokens).
    fn trl(p: &[u32], c: &[u32], l: Option<usize>, t: Truncation) -> (Vec<u32>, Vec<u32>) {
        let ids: Vec<u32> = p.iter().chain(c).copied().collect();
        let mask: Vec<bool> = (0..ids.len()).map(|i| i >= p.len()).collect();
        let n = ids.len();
        let range = match (l, t) {
            (None, _) => 0..n,
            (Some(l), Truncation::KeepStart) => 0..l.min(n),
            (Some(l), Truncation::KeepEnd) => n.saturating_sub(l)..n,
        };
        let (ids, mask) = (&ids[range.clone()], &mask[range]);
        let scored = (1..ids.len()).filter(|&i| mask[i]).map(|i| ids[i]).collect();
        (ids.to_vec(), scored)
    }

    fn side(ex: &Example, chosen: bool) -> (Vec<u32>, Vec<u32>) {
        let (p, c) =
            if chosen { (ex.chosen_prompt(), &ex.chosen_ids) } else { (ex.rejected_prompt(), &ex.rejected_ids) };
        let seq: Vec<u32> = p.iter().chain(c.iter()).copied().collect();
        let scored = c[c.len() - scored_tokens(p.len(), c.len())..].to_vec();
        (seq, scored)
    }

    #[test]
    fn keep_start_cuts_completion_ends() {
        let (ex, cut) =
            truncate_pair(pair(&[1, 2, 3, 4], &[5, 6, 7], &[8]), &opts(Some(5), None, Truncation::KeepStart)).unwrap();
        assert_eq!(ex, pair(&[1, 2, 3, 4], &[5], &[8]));
        assert_eq!(cut, Cut { prompt: false, completion: true });
        assert!(ex.shares_prompt());
    }

    #[test]
    fn keep_end_cuts_each_prompt_separately() {
        let o = opts(Some(5), None, Truncation::KeepEnd);
        let (ex, cut) = truncate_pair(pair(&[1, 2, 3, 4], &[5, 6, 7], &[8]), &o).unwrap();
        // chosen: 1 2 3 4 5 6 7 -> 3 4 5 6 7 (two prompt tokens gone); rejected: 1 2 3 4 8 fits.
        assert_eq!((ex.chosen_prompt_skip, ex.rejected_prompt_skip), (2, 0));
        assert_eq!(ex.prompt_ids, vec![1, 2, 3, 4]);
        assert_eq!(side(&ex, true).0, vec![3, 4, 5, 6, 7]);
        assert_eq!(side(&ex, false).0, vec![1, 2, 3, 4, 8]);
        assert!(!ex.shares_prompt());
        assert_eq!(cut, Cut { prompt: true, completion: false });

        // Both sides cut: the shared part of the cut comes off the prompt itself.
        let (ex, _) = truncate_pair(pair(&[1, 2, 3, 4], &[5, 6, 7], &[8, 9]), &o).unwrap();
        assert_eq!(ex.prompt_ids, vec![2, 3, 4]);
        assert_eq!((ex.chosen_prompt_skip, ex.rejected_prompt_skip), (1, 0));

        // A sequence that starts inside its completion loses that token's score.
        let (ex, cut) = truncate_pair(pair(&[1, 2], &[5, 6, 7, 8, 9, 10], &[11]), &o).unwrap();
        assert_eq!(side(&ex, true), (vec![6, 7, 8, 9, 10], vec![7, 8, 9, 10]));
        assert_eq!(side(&ex, false), (vec![1, 2, 11], vec![11]));
        assert_eq!((ex.chosen_len(), ex.rejected_len()), (4, 1));
        assert_eq!(cut, Cut { prompt: true, completion: true });
    }

    #[test]
    fn max_prompt_length_keeps_the_prompt_end() {
        let (ex, cut) =
            truncate_pair(pair(&[1, 2, 3, 4], &[5], &[6]), &opts(None, Some(2), Truncation::KeepStart)).unwrap();
        assert_eq!(ex, pair(&[3, 4], &[5], &[6]));
        assert_eq!(cut, Cut { prompt: true, completion: false });
        // Then max_length applies to what is left.
        let (ex, _) =
            truncate_pair(pair(&[1, 2, 3, 4], &[5, 6, 7], &[8]), &opts(Some(4), Some(2), Truncation::KeepStart))
                .unwrap();
        assert_eq!(ex, pair(&[3, 4], &[5, 6], &[8]));
    }

    #[test]
    fn rows_without_a_scored_token_are_dropped() {
        // keep_start: the prompt fills max_length (TRL drops these too).
        assert!(truncate_pair(pair(&[1, 2, 3], &[4], &[5]), &opts(Some(3), None, Truncation::KeepStart)).is_none());
        // keep_end with max_length 1: the one token left has no predecessor.
        assert!(truncate_pair(pair(&[1, 2, 3], &[4], &[5]), &opts(Some(1), None, Truncation::KeepEnd)).is_none());
        // An empty prompt and a one-token completion has nothing to score even untruncated.
        assert!(truncate_pair(pair(&[], &[4], &[5, 6]), &DataOptions::default()).is_none());
        let single = SftExample { location: "row 1".into(), prompt_ids: vec![1, 2], completion_ids: vec![3] };
        assert!(truncate_sft(single.clone(), &opts(Some(2), None, Truncation::KeepStart)).is_none());
        let (s, _) = truncate_sft(single, &opts(Some(2), None, Truncation::KeepEnd)).unwrap();
        assert_eq!((s.prompt_ids, s.completion_ids), (vec![2], vec![3]));
    }

    #[test]
    fn options_reject_zero() {
        assert!(opts(Some(0), None, Truncation::KeepStart).validate().is_err());
        assert!(opts(None, Some(0), Truncation::KeepStart).validate().is_err());
        assert_eq!("keep_end".parse::<Truncation>(), Ok(Truncation::KeepEnd));
    }

    /// Every small shape against TRL's collator: the same sequences and the same scored tokens, and a
    /// row is dropped exactly when a side would score nothing.
    #[test]
    fn matches_trl_collator_on_all_small_shapes() {
        for t in [Truncation::KeepStart, Truncation::KeepEnd] {
            for l in [None, Some(1), Some(2), Some(3), Some(4), Some(5), Some(7)] {
                for (np, nc, nr) in (0..4).flat_map(|p| (1..5).flat_map(move |c| (1..4).map(move |r| (p, c, r)))) {
                    let p: Vec<u32> = (0..np).map(|i| 100 + i).collect();
                    let c: Vec<u32> = (0..nc).map(|i| 200 + i).collect();
                    let r: Vec<u32> = (0..nr).map(|i| 300 + i).collect();
                    let (want_c, want_r) = (trl(&p, &c, l, t), trl(&p, &r, l, t));
                    let got = truncate_pair(pair(&p, &c, &r), &opts(l, None, t));
                    let what = format!("{t} l={l:?} p={np} c={nc} r={nr}");
                    match got {
                        None => assert!(want_c.1.is_empty() || want_r.1.is_empty(), "{what}: dropped"),
                        Some((ex, _)) => {
                            assert_eq!(side(&ex, true), want_c, "{what}: chosen");
                            assert_eq!(side(&ex, false), want_r, "{what}: rejected");
                            assert!(ex.chosen_prompt_skip == 0 || ex.rejected_prompt_skip == 0, "{what}");
                        }
                    }
                }
            }
        }
    }
}
