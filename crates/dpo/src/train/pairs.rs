//! One micro-batch of preference pairs: policy forward, reference log-probs, objective, metrics, and
//! (when training) the backward pass. Shared by `dpo train` and `dpo eval`.

use std::collections::BTreeMap;
use std::ops::Range;

use engine::{Activations, Decoder, Params, PendingEmbeddingGrads};

use super::reference::Reference;
use super::TrainError;
use crate::data::pack::sum_ranges;
use crate::data::{pack_pairs, Example, Packing};
use crate::objectives::{combined, gradient_weight, reward_metrics, LossConfig, LossType, PairLogps};

/// The objective of a run: weighted loss types and their settings.
#[derive(Clone, Debug)]
pub struct PairObjective {
    pub losses: Vec<(LossType, f64)>,
    pub cfg: LossConfig,
}

impl PairObjective {
    /// True when no loss type reads reference log-probs (or the run is explicitly reference-free).
    pub fn reference_free(&self) -> bool {
        self.cfg.reference_free || self.losses.iter().all(|(k, _)| !k.needs_reference())
    }

    /// True when the loss is a mean over pairs of terms that each depend on their own pair only, so a
    /// micro-batch may be pushed through the model in chunks of pairs.
    pub fn per_pair(&self) -> bool {
        self.losses.iter().all(|(k, _)| k.per_pair())
    }
}

/// Metrics of one micro-batch, by TRL's names, and whether the loss was finite.
pub struct BatchOutcome {
    pub metrics: BTreeMap<String, f64>,
    /// Tokens the batch fed to the model, counted as TRL does (the prompt once per completion).
    pub num_tokens: u64,
    pub finite: bool,
}

/// Buffers reused from batch to batch.
#[derive(Default)]
pub struct Workspace {
    pub policy: Activations,
    pub reference: Activations,
    /// The embedding lookups' gradient of a micro-batch's chunks, added once every chunk's head gradient
    /// is in (see [`PendingEmbeddingGrads`]).
    pub embedding: PendingEmbeddingGrads,
}

/// Per-pair results of the forward passes over a micro-batch, gathered chunk by chunk.
#[derive(Default)]
struct PairSums {
    policy_chosen: Vec<f64>,
    policy_rejected: Vec<f64>,
    ref_chosen: Vec<f64>,
    ref_rejected: Vec<f64>,
    has_ref: bool,
    chosen_len: Vec<usize>,
    rejected_len: Vec<usize>,
    /// Sums of the logits of every chosen / rejected target (for the `logits/*` metrics).
    logit_sum_chosen: f64,
    logit_sum_rejected: f64,
}

impl PairSums {
    fn logps(&self) -> PairLogps<'_> {
        PairLogps {
            policy_chosen: &self.policy_chosen,
            policy_rejected: &self.policy_rejected,
            ref_chosen: self.has_ref.then_some(&self.ref_chosen[..]),
            ref_rejected: self.has_ref.then_some(&self.ref_rejected[..]),
            chosen_len: &self.chosen_len,
            rejected_len: &self.rejected_len,
            ..Default::default()
        }
    }
}

/// Runs one micro-batch. With `grads = Some((g, scale))` it also back-propagates `scale * dloss` into
/// `g` (`scale` is 1 / gradient-accumulation steps), unless the loss is not finite.
///
/// When training with an objective that is a mean of per-pair terms, the pairs go through forward and
/// backward `micro_pairs` at a time (0: all at once): the gradient of the mean is the sum of each chunk's
/// gradient weighted by its share of the pairs, so the step is the same while only one chunk's activations
/// are held. Metrics are computed once over the whole micro-batch either way.
#[allow(clippy::too_many_arguments)]
pub fn pair_batch(
    policy: &Decoder,
    params: &Params,
    mut grads: Option<(&mut Params, f64)>,
    reference: &Reference,
    objective: &PairObjective,
    examples: &[Example],
    rows: &[usize],
    packing: Packing,
    micro_pairs: usize,
    ws: &mut Workspace,
) -> Result<BatchOutcome, TrainError> {
    let chunk = match micro_pairs {
        m if m > 0 && grads.is_some() && objective.per_pair() => m,
        _ => rows.len().max(1),
    };
    ws.embedding.clear();
    let mut sums = PairSums::default();
    let mut finite = true;
    let (mut tokens_chosen, mut tokens_rejected) = (0usize, 0usize);
    for part in rows.chunks(chunk) {
        let batch: Vec<&Example> = part.iter().map(|&i| &examples[i]).collect();
        let packed = pack_pairs(&batch, packing);
        let head = policy.logprobs(params, &packed.batch, &mut ws.policy, grads.is_some())?;
        let refs = reference.pair_logps(part, &packed, &mut ws.reference)?;
        let first = sums.policy_chosen.len();
        sums.policy_chosen.extend(sum_ranges(&head.logp, &packed.chosen));
        sums.policy_rejected.extend(sum_ranges(&head.logp, &packed.rejected));
        sums.has_ref = refs.is_some();
        if let Some((c, r)) = refs {
            sums.ref_chosen.extend(c);
            sums.ref_rejected.extend(r);
        }
        sums.chosen_len.extend(packed.chosen.iter().map(|r| r.len()));
        sums.rejected_len.extend(packed.rejected.iter().map(|r| r.len()));
        let logit_total = |ranges: &[Range<usize>]| -> f64 {
            ranges.iter().flat_map(|r| head.logit_sum[r.clone()].iter()).map(|&v| v as f64).sum()
        };
        sums.logit_sum_chosen += logit_total(&packed.chosen);
        sums.logit_sum_rejected += logit_total(&packed.rejected);
        tokens_chosen += packed.chosen.iter().map(|r| r.len()).sum::<usize>();
        tokens_rejected += packed.rejected.iter().map(|r| r.len()).sum::<usize>();

        let Some((g, scale)) = grads.as_mut() else { continue };
        let x = sums.logps();
        let x = PairLogps {
            policy_chosen: &x.policy_chosen[first..],
            policy_rejected: &x.policy_rejected[first..],
            ref_chosen: x.ref_chosen.map(|r| &r[first..]),
            ref_rejected: x.ref_rejected.map(|r| &r[first..]),
            chosen_len: &x.chosen_len[first..],
            rejected_len: &x.rejected_len[first..],
            ..Default::default()
        };
        let lg = combined(&objective.losses, &objective.cfg, &x)?;
        if !lg.loss.is_finite() {
            finite = false;
            continue;
        }
        let share = *scale * part.len() as f64 / rows.len() as f64;
        let mut dlogp = vec![0.0f32; head.logp.len()];
        for i in 0..part.len() {
            let (dc, dr) = ((lg.d_policy_chosen[i] * share) as f32, (lg.d_policy_rejected[i] * share) as f32);
            packed.chosen[i].clone().for_each(|t| dlogp[t] = dc);
            packed.rejected[i].clone().for_each(|t| dlogp[t] = dr);
        }
        policy.backward_logprobs_deferred(params, &packed.batch, &mut ws.policy, &dlogp, g, &mut ws.embedding)?;
    }
    if let Some((g, _)) = grads {
        ws.embedding.apply(g);
    }

    let x = sums.logps();
    let lg = combined(&objective.losses, &objective.cfg, &x)?;
    let rm = reward_metrics(objective.cfg.beta, &x)?;
    let vocab = policy.cfg.vocab_size as f64;
    let mean_logit = |sum: f64, n: usize| if n == 0 { 0.0 } else { sum / vocab / n as f64 };
    let mut metrics = BTreeMap::new();
    for (k, v) in [
        ("loss", lg.loss),
        ("rewards/chosen", rm.rewards_chosen),
        ("rewards/rejected", rm.rewards_rejected),
        ("rewards/accuracies", rm.rewards_accuracies),
        ("rewards/margins", rm.rewards_margins),
        ("logps/chosen", rm.logps_chosen),
        ("logps/rejected", rm.logps_rejected),
        ("logits/chosen", mean_logit(sums.logit_sum_chosen, tokens_chosen)),
        ("logits/rejected", mean_logit(sums.logit_sum_rejected, tokens_rejected)),
        ("dpo/gradient_weight", gradient_weight(objective.cfg.beta, &x)),
    ] {
        metrics.insert(k.to_string(), v);
    }
    let num_tokens = rows
        .iter()
        .map(|&i| {
            let e = &examples[i];
            (e.chosen_prompt().len() + e.chosen_ids.len() + e.rejected_prompt().len() + e.rejected_ids.len()) as u64
        })
        .sum();
    Ok(BatchOutcome { metrics, num_tokens, finite: finite && lg.loss.is_finite() })
}
