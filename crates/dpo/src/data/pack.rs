//! Tokenized pairs to one packed engine batch.
//!
//! With [`Packing::SharedPrompt`] each pair becomes one group `prompt | chosen | rejected`: the prompt is
//! computed once and each completion attends to it and to itself only (see `engine::batch`). With
//! [`Packing::Separate`] each pair becomes two independent sequences `prompt+chosen` and
//! `prompt+rejected`, which is what TRL computes; both give the same log-probs. Unpaired and SFT examples
//! are single sequences ([`pack_sequences`]).

use std::ops::Range;

use engine::Batch;

use super::Example;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Packing {
    #[default]
    SharedPrompt,
    Separate,
}

/// A batch and, per example, where its chosen and rejected targets are in `batch.targets`.
#[derive(Clone, Debug, Default)]
pub struct PackedPairs {
    pub batch: Batch,
    pub chosen: Vec<Range<usize>>,
    pub rejected: Vec<Range<usize>>,
}

/// Packs examples in order. A completion's first token is scored from the prompt token before it; when
/// nothing of the prompt precedes it in its sequence it has no predecessor and, as in TRL, is not scored.
/// A pair whose sequences lost different amounts of prompt to `keep_end` truncation has no common
/// prompt and is packed as two sequences whatever `packing` says; the targets are the same either way.
pub fn pack_pairs(examples: &[&Example], packing: Packing) -> PackedPairs {
    let mut out = PackedPairs::default();
    for ex in examples {
        if packing == Packing::SharedPrompt && ex.shares_prompt() {
            let r = out.batch.push_shared_prefix(&ex.prompt_ids, &[&ex.chosen_ids, &ex.rejected_ids]);
            out.chosen.push(r[0].clone());
            out.rejected.push(r[1].clone());
        } else {
            out.chosen.push(push(&mut out.batch, ex.chosen_prompt(), &ex.chosen_ids));
            out.rejected.push(push(&mut out.batch, ex.rejected_prompt(), &ex.rejected_ids));
        }
    }
    out
}

/// Packs single `(prompt, completion)` sequences (unpaired, SFT) as independent sequences, in order.
/// Returns the batch and, per sequence, where its completion's targets are; a completion's first
/// token is not scored when the prompt is empty, as in [`pack_pairs`].
pub fn pack_sequences(seqs: &[(&[u32], &[u32])]) -> (Batch, Vec<Range<usize>>) {
    let mut batch = Batch::default();
    let ranges = seqs.iter().map(|(p, c)| push(&mut batch, p, c)).collect();
    (batch, ranges)
}

fn push(batch: &mut Batch, prompt: &[u32], completion: &[u32]) -> Range<usize> {
    let ids: Vec<u32> = prompt.iter().chain(completion).copied().collect();
    batch.push_sequence(&ids, prompt.len().max(1))
}

/// Sums per-target values over each range (a sequence's log-prob from its tokens' log-probs), in f64.
pub fn sum_ranges(values: &[f32], ranges: &[Range<usize>]) -> Vec<f64> {
    ranges.iter().map(|r| values[r.clone()].iter().map(|&v| v as f64).sum()).collect()
}

#[cfg(test)]
mod tests {
    use engine::batch::Target;

    use super::super::truncate::{truncate_pair, DataOptions, Truncation};
    use super::*;

    fn tokens(b: &Batch, r: &Range<usize>) -> Vec<u32> {
        b.targets[r.clone()].iter().map(|t| t.token).collect()
    }

    /// Each target's predecessor in the stream: what the hidden state that predicts it has just read.
    fn sources(b: &Batch, r: &Range<usize>) -> Vec<u32> {
        b.targets[r.clone()].iter().map(|t| b.tokens[t.pos as usize]).collect()
    }

    #[test]
    fn shared_and_separate_score_the_same_targets() {
        let a = Example::new("line 1", vec![1, 2], vec![3, 4], vec![5]);
        let b = Example::new("line 2", vec![], vec![6, 7], vec![8, 9, 10]);
        for packing in [Packing::SharedPrompt, Packing::Separate] {
            let p = pack_pairs(&[&a, &b], packing);
            let got: Vec<_> =
                (0..2).map(|i| (tokens(&p.batch, &p.chosen[i]), tokens(&p.batch, &p.rejected[i]))).collect();
            // b has no prompt: its first completion tokens have no predecessor and are not scored.
            assert_eq!(got, vec![(vec![3, 4], vec![5]), (vec![7], vec![9, 10])], "{packing:?}");
            assert_eq!(sources(&p.batch, &p.rejected[0]), vec![2], "{packing:?}");
        }
        let shared = pack_pairs(&[&a], Packing::SharedPrompt).batch;
        assert_eq!(shared.tokens, vec![1, 2, 3, 4, 5]);
        assert_eq!(shared.groups.len(), 1);
    }

    #[test]
    fn per_side_prompt_cuts_pack_as_separate_sequences() {
        // keep_end, max_length 5: chosen 1 2 3 4 5 6 7 loses two prompt tokens, rejected 1 2 3 4 8 none.
        let opts = DataOptions { max_length: Some(5), truncation: Truncation::KeepEnd, ..DataOptions::default() };
        let (ex, _) = truncate_pair(Example::new("line 1", vec![1, 2, 3, 4], vec![5, 6, 7], vec![8]), &opts).unwrap();
        let shared = pack_pairs(&[&ex], Packing::SharedPrompt);
        let separate = pack_pairs(&[&ex], Packing::Separate);
        assert_eq!(shared.batch, separate.batch);
        assert_eq!((&shared.chosen, &shared.rejected), (&separate.chosen, &separate.rejected));

        let b = &shared.batch;
        assert_eq!(b.tokens, vec![3, 4, 5, 6, 7, 1, 2, 3, 4, 8]);
        assert_eq!(b.positions, vec![0, 1, 2, 3, 4, 0, 1, 2, 3, 4]);
        assert_eq!(b.groups, vec![0..5, 5..10]);
        assert_eq!(
            b.targets,
            vec![
                Target { pos: 1, token: 5 },
                Target { pos: 2, token: 6 },
                Target { pos: 3, token: 7 },
                Target { pos: 8, token: 8 },
            ]
        );
        assert_eq!((shared.chosen[0].clone(), shared.rejected[0].clone()), (0..3, 3..4));

        // A sequence that starts inside its completion: its first token is context only.
        let (ex, _) =
            truncate_pair(Example::new("line 2", vec![1, 2], vec![5, 6, 7, 8, 9, 10], vec![11]), &opts).unwrap();
        let p = pack_pairs(&[&ex], Packing::SharedPrompt);
        assert_eq!(p.batch.tokens, vec![6, 7, 8, 9, 10, 1, 2, 11]);
        assert_eq!(
            (tokens(&p.batch, &p.chosen[0]), sources(&p.batch, &p.chosen[0])),
            (vec![7, 8, 9, 10], vec![6, 7, 8, 9])
        );
        assert_eq!((tokens(&p.batch, &p.rejected[0]), sources(&p.batch, &p.rejected[0])), (vec![11], vec![2]));
        assert_eq!((p.chosen[0].len(), p.rejected[0].len()), (ex.chosen_len(), ex.rejected_len()));
    }

    #[test]
    fn equal_cuts_still_share_the_prompt() {
        let opts = DataOptions { max_length: Some(4), truncation: Truncation::KeepEnd, ..DataOptions::default() };
        let (ex, _) = truncate_pair(Example::new("line 1", vec![1, 2, 3, 4], vec![5], vec![6]), &opts).unwrap();
        assert!(ex.shares_prompt());
        let p = pack_pairs(&[&ex], Packing::SharedPrompt);
        assert_eq!(p.batch.tokens, vec![2, 3, 4, 5, 6]);
        assert_eq!(sources(&p.batch, &p.rejected[0]), vec![4]);
    }

    #[test]
    fn sequences_pack_one_after_another() {
        let (b, r) = pack_sequences(&[(&[1, 2], &[3, 4]), (&[], &[5, 6, 7])]);
        assert_eq!(b.tokens, vec![1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(b.positions, vec![0, 1, 2, 3, 0, 1, 2]);
        assert_eq!(b.groups, vec![0..4, 4..7]);
        assert_eq!(r, vec![0..2, 2..4]);
        assert_eq!((tokens(&b, &r[0]), sources(&b, &r[0])), (vec![3, 4], vec![2, 3]));
        assert_eq!((tokens(&b, &r[1]), sources(&b, &r[1])), (vec![6, 7], vec![5, 6]));
        assert_eq!(sum_ranges(&[1.0, 2.0, 3.0, 4.0], &r), vec![3.0, 7.0]);
    }
}
