//! A reward model's batch across the ranks of a data-parallel run ([`crate::dist`]): each rank runs
//! the contiguous share of the pairs, its gradient weighted by the share's part of the batch's mean,
//! and every rank gets all the pairs' rewards (so the loss and the metrics are the whole batch's).

use engine::model::Model;
use engine::{Activations, Decoder, ParamSet, ScalarHead};

use super::train::{pair_batch, Grads, PairOutcome};
use super::RewardModelError;
use crate::data::Example;
use crate::dist::{self, Wire};
use crate::objectives::math::log_sigmoid;

/// One pair's rewards, chosen then rejected.
struct Rewards(f64, f64);

impl Wire for Rewards {
    fn put(&self, b: &mut Vec<u8>) {
        b.extend(self.0.to_bits().to_le_bytes());
        b.extend(self.1.to_bits().to_le_bytes());
    }

    fn get(b: &mut &[u8]) -> Self {
        let mut f = || {
            let (head, rest) = b.split_at(8);
            *b = rest;
            f64::from_bits(u64::from_le_bytes(head.try_into().expect("8 bytes")))
        };
        let c = f();
        Rewards(c, f())
    }
}

/// [`pair_batch`] of `pairs` with one process; with several, this rank's share of them, the rewards
/// of all gathered and the loss (the mean over all pairs) recomputed from them. With `grads`, the share's
/// gradient is scaled to its part of the batch's mean: [`dist::reduce_grads`] then sums the batch's.
pub(super) fn pair_batch_shared(
    decoder: &Decoder,
    params: Model<'_>,
    head: &ScalarHead,
    pairs: &[&Example],
    acts: &mut Activations,
    grads: Option<Grads>,
) -> Result<PairOutcome, RewardModelError> {
    let w = dist::world();
    if w.size() == 1 || pairs.is_empty() {
        return pair_batch(decoder, params, head, pairs, acts, grads);
    }
    let mut tokens = 0usize;
    let rewards = dist::gather_shares(pairs.len(), |share| -> Result<Vec<Rewards>, RewardModelError> {
        let mine = &pairs[share];
        if mine.is_empty() {
            return Ok(Vec::new());
        }
        let factor = mine.len() as f64 / pairs.len() as f64;
        let mut grads = grads;
        let again = grads.as_mut().map(|g| Grads { trunk: &mut *g.trunk, head: &mut *g.head });
        let out = pair_batch(decoder, params, head, mine, acts, again)?;
        // The share's mean, weighted by its part of the batch (the buffers held only this share's).
        if let Some(g) = grads {
            for (_, t) in (g.trunk, g.head).named_mut() {
                t.data.iter_mut().for_each(|v| *v = (*v as f64 * factor) as f32);
            }
        }
        tokens = out.tokens;
        Ok(out.chosen.iter().zip(&out.rejected).map(|(&c, &r)| Rewards(c, r)).collect())
    })?;
    let counts = w.all_gather_bytes(&(tokens as u64).to_le_bytes());
    let tokens = counts.iter().map(|b| u64::from_le_bytes(b[..8].try_into().expect("8 bytes")) as usize).sum();
    let (chosen, rejected): (Vec<f64>, Vec<f64>) = rewards.iter().map(|r| (r.0, r.1)).unzip();
    let n = pairs.len() as f64;
    let loss = chosen.iter().zip(&rejected).map(|(w, l)| -log_sigmoid(w - l)).sum::<f64>() / n;
    Ok(PairOutcome { chosen, rejected, loss, tokens })
}
