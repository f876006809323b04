//! Tokenized pairs to one packed engine batch.
//!
//! With [`Packing::SharedPrompt`] each pair becomes one group `prompt | chosen | rejected`: the prompt is
//! computed once and each completion attends to it and to itself only (see `engine::batch`). With
//! [`Packing::Separate`] each pair becomes two independent sequences `prompt+chosen` and
//! `prompt+rejected`, which is what TRL computes; both give the same log-probs.

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

/// Packs examples in order. A completion's first token is scored from the last prompt token; with an
/// empty prompt it has no predecessor and, as in TRL, is not scored.
pub fn pack_pairs(examples: &[&Example], packing: Packing) -> PackedPairs {
    let mut out = PackedPairs::default();
    for ex in examples {
        if packing == Packing::SharedPrompt && !ex.prompt_ids.is_empty() {
            let r = out.batch.push_shared_prefix(&ex.prompt_ids, &[&ex.chosen_ids, &ex.rejected_ids]);
            out.chosen.push(r[0].clone());
            out.rejected.push(r[1].clone());
        } else {
            let first = ex.prompt_ids.len().max(1);
            for (completion, ranges) in [(&ex.chosen_ids, &mut out.chosen), (&ex.rejected_ids, &mut out.rejected)] {
                let ids: Vec<u32> = ex.prompt_ids.iter().chain(completion.iter()).copied().collect();
                ranges.push(out.batch.push_sequence(&ids, first));
            }
        }
    }
    out
}

/// Sums per-target values over each range (a sequence's log-prob from its tokens' log-probs), in f64.
pub fn sum_ranges(values: &[f32], ranges: &[Range<usize>]) -> Vec<f64> {
    ranges.iter().map(|r| values[r.clone()].iter().map(|&v| v as f64).sum()).collect()
}
