//! Sequence log-probs of preference pairs under one model, batch by batch, without keeping activations:
//! what `dpo logps`, evaluation and the reference pass share.

use engine::model::Model;
use engine::{Activations, Decoder, EngineError};
use serde::{Deserialize, Serialize};

use crate::data::{pack::sum_ranges, pack_pairs, Example, Packing};

/// Summed completion log-probs of one pair, and the number of completion tokens scored.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PairScore {
    pub chosen_logps: f64,
    pub rejected_logps: f64,
    pub chosen_len: usize,
    pub rejected_len: usize,
}

/// Scores every example under `params` (a model's weights, or a base with an adapter on it),
/// `pairs_per_batch` pairs per forward pass; `progress` is called with the number of pairs done after
/// each batch. In a data-parallel run each rank scores its contiguous share of the examples and every
/// rank gets all the scores ([`crate::dist::gather_shares`]).
pub fn score_pairs<'m>(
    model: &Decoder,
    params: impl Into<Model<'m>>,
    examples: &[Example],
    packing: Packing,
    pairs_per_batch: usize,
    progress: impl FnMut(usize),
) -> Result<Vec<PairScore>, EngineError> {
    let params = params.into();
    crate::dist::gather_shares(examples.len(), |share| {
        score_share(model, params, &examples[share], packing, pairs_per_batch, progress)
    })
}

/// [`score_pairs`] in this process.
fn score_share(
    model: &Decoder,
    params: Model<'_>,
    examples: &[Example],
    packing: Packing,
    pairs_per_batch: usize,
    mut progress: impl FnMut(usize),
) -> Result<Vec<PairScore>, EngineError> {
    let mut acts = Activations::default();
    let mut out = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(pairs_per_batch.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let packed = pack_pairs(&refs, packing);
        let head = model.logprobs(params, &packed.batch, &mut acts, false)?;
        let chosen = sum_ranges(&head.logp, &packed.chosen);
        let rejected = sum_ranges(&head.logp, &packed.rejected);
        for i in 0..chunk.len() {
            out.push(PairScore {
                chosen_logps: chosen[i],
                rejected_logps: rejected[i],
                chosen_len: packed.chosen[i].len(),
                rejected_len: packed.rejected[i].len(),
            });
        }
        progress(out.len());
    }
    Ok(out)
}

/// Summed completion log-probs of each `(prompt, completion)` under `params`, `seqs_per_batch` sequences
/// per forward pass (activations not kept): what an implicit-reward judge and KL estimates read.
pub fn score_sequences<'m>(
    model: &Decoder,
    params: impl Into<Model<'m>>,
    seqs: &[(&[u32], &[u32])],
    seqs_per_batch: usize,
) -> Result<Vec<f64>, EngineError> {
    let params = params.into();
    let mut acts = Activations::default();
    let mut out = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(seqs_per_batch.max(1)) {
        let (batch, ranges) = crate::data::pack_sequences(chunk);
        let head = model.logprobs(params, &batch, &mut acts, false)?;
        out.extend(sum_ranges(&head.logp, &ranges));
    }
    Ok(out)
}

impl crate::dist::Wire for PairScore {
    fn put(&self, b: &mut Vec<u8>) {
        b.extend(self.chosen_logps.to_bits().to_le_bytes());
        b.extend(self.rejected_logps.to_bits().to_le_bytes());
        b.extend((self.chosen_len as u64).to_le_bytes());
        b.extend((self.rejected_len as u64).to_le_bytes());
    }

    fn get(b: &mut &[u8]) -> Self {
        let mut u = || {
            let (head, rest) = b.split_at(8);
            *b = rest;
            u64::from_le_bytes(head.try_into().expect("8 bytes"))
        };
        let (c, r, cl, rl) = (u(), u(), u(), u());
        PairScore {
            chosen_logps: f64::from_bits(c),
            rejected_logps: f64::from_bits(r),
            chosen_len: cl as usize,
            rejected_len: rl as usize,
        }
    }
}
