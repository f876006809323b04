//! One micro-batch of preference pairs: policy forward, reference log-probs, objective, metrics, and
//! (when training) the backward pass. Shared by `dpo train` and `dpo eval`.

use std::collections::BTreeMap;

use engine::{Activations, Decoder, Params};

use super::reference::Reference;
use super::TrainError;
use crate::data::pack::sum_ranges;
use crate::data::{pack_pairs, Example, Packing};
use crate::objectives::{combined, reward_metrics, LossConfig, LossType, PairLogps};

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
}

/// Runs one micro-batch. With `grads = Some((g, scale))` it also back-propagates `scale * dloss` into
/// `g` (`scale` is 1 / gradient-accumulation steps), unless the loss is not finite.
#[allow(clippy::too_many_arguments)]
pub fn pair_batch(
    policy: &Decoder,
    params: &Params,
    grads: Option<(&mut Params, f64)>,
    reference: &Reference,
    objective: &PairObjective,
    examples: &[Example],
    rows: &[usize],
    packing: Packing,
    ws: &mut Workspace,
) -> Result<BatchOutcome, TrainError> {
    let batch: Vec<&Example> = rows.iter().map(|&i| &examples[i]).collect();
    let packed = pack_pairs(&batch, packing);
    let head = policy.logprobs(params, &packed.batch, &mut ws.policy, grads.is_some())?;
    let pc = sum_ranges(&head.logp, &packed.chosen);
    let pr = sum_ranges(&head.logp, &packed.rejected);
    let refs = reference.pair_logps(rows, &packed, &mut ws.reference)?;
    let chosen_len: Vec<usize> = packed.chosen.iter().map(|r| r.len()).collect();
    let rejected_len: Vec<usize> = packed.rejected.iter().map(|r| r.len()).collect();
    let x = PairLogps {
        policy_chosen: &pc,
        policy_rejected: &pr,
        ref_chosen: refs.as_ref().map(|r| &r.0[..]),
        ref_rejected: refs.as_ref().map(|r| &r.1[..]),
        chosen_len: &chosen_len,
        rejected_len: &rejected_len,
        ..Default::default()
    };
    let lg = combined(&objective.losses, &objective.cfg, &x)?;
    let rm = reward_metrics(objective.cfg.beta, &x)?;

    let vocab = policy.cfg.vocab_size as f64;
    let mean_logit = |ranges: &[std::ops::Range<usize>]| {
        let n: usize = ranges.iter().map(|r| r.len()).sum();
        let s: f64 = ranges.iter().flat_map(|r| head.logit_sum[r.clone()].iter()).map(|&v| v as f64).sum();
        if n == 0 {
            0.0
        } else {
            s / vocab / n as f64
        }
    };
    let mut metrics = BTreeMap::new();
    for (k, v) in [
        ("loss", lg.loss),
        ("rewards/chosen", rm.rewards_chosen),
        ("rewards/rejected", rm.rewards_rejected),
        ("rewards/accuracies", rm.rewards_accuracies),
        ("rewards/margins", rm.rewards_margins),
        ("logps/chosen", rm.logps_chosen),
        ("logps/rejected", rm.logps_rejected),
        ("logits/chosen", mean_logit(&packed.chosen)),
        ("logits/rejected", mean_logit(&packed.rejected)),
        ("dpo/gradient_weight", gradient_weight(objective.cfg.beta, &x)),
    ] {
        metrics.insert(k.to_string(), v);
    }
    let num_tokens = batch
        .iter()
        .map(|e| {
            (e.chosen_prompt().len() + e.chosen_ids.len() + e.rejected_prompt().len() + e.rejected_ids.len()) as u64
        })
        .sum();
    let finite = lg.loss.is_finite();

    if let (Some((g, scale)), true) = (grads, finite) {
        let mut dlogp = vec![0.0f32; head.logp.len()];
        for i in 0..rows.len() {
            let (dc, dr) = ((lg.d_policy_chosen[i] * scale) as f32, (lg.d_policy_rejected[i] * scale) as f32);
            packed.chosen[i].clone().for_each(|t| dlogp[t] = dc);
            packed.rejected[i].clone().for_each(|t| dlogp[t] = dr);
        }
        policy.backward_logprobs(params, &packed.batch, &mut ws.policy, &dlogp, g)?;
    }
    Ok(BatchOutcome { metrics, num_tokens, finite })
}

/// Mean over pairs of sigma(beta * (log-ratio_rejected - log-ratio_chosen)): the weight DPO's gradient
/// puts on each pair (the paper's eq. 7) — large while the implicit reward ranks a pair wrongly, small once
/// it is learned. NaN without a reference.
fn gradient_weight(beta: f64, x: &PairLogps) -> f64 {
    let (Some(rc), Some(rr)) = (x.ref_chosen, x.ref_rejected) else { return f64::NAN };
    let n = x.policy_chosen.len().max(1) as f64;
    (0..x.policy_chosen.len())
        .map(|i| {
            let margin = beta * ((x.policy_chosen[i] - rc[i]) - (x.policy_rejected[i] - rr[i]));
            1.0 / (1.0 + margin.exp())
        })
        .sum::<f64>()
        / n
}
