//! One micro-batch of preference pairs: policy forward, reference log-probs, objective, metrics, and
//! (when training) the backward pass. Shared by `dpo train` and `dpo eval`.

use std::collections::BTreeMap;
use std::ops::Range;

use engine::batch::Target;
use engine::model::{Grads, Model};
use engine::{Activations, Decoder, Keep, PendingEmbeddingGrads};

use super::reference::Reference;
use super::TrainError;
use crate::data::pack::sum_ranges;
use crate::data::pack::PackedPairs;
use crate::data::{pack_pairs, Example, Packing};
use crate::objectives::{
    combined, gradient_weight, objective_reward_metrics, LossConfig, LossType, PairLogps, PromptLogps,
};

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

    /// True when a loss type reads the policy log-probs of the prompt tokens (ORPO's NLL term).
    pub fn reads_prompt(&self) -> bool {
        self.losses.iter().any(|(k, _)| k.reads_prompt())
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
    /// The policy's passes, and the reference's forward of a pair batch (run before the policy's).
    pub policy: Activations,
    /// Passes that run while the policy's training activations are held (KTO's reference and
    /// mismatched-pair passes, after the policy's forward).
    pub reference: Activations,
    /// The embedding lookups' gradient of a micro-batch's chunks, added once every chunk's head gradient
    /// is in (see [`PendingEmbeddingGrads`]).
    pub embedding: PendingEmbeddingGrads,
    /// A training forward keeps each layer's input only and backward recomputes the layer
    /// ([`TrainConfig::gradient_checkpointing`](super::TrainConfig::gradient_checkpointing)).
    pub gradient_checkpointing: bool,
}

impl Workspace {
    /// What the policy's forward keeps: nothing without a backward; with one, every layer's activations,
    /// or each layer's input alone under gradient checkpointing.
    pub fn policy_keep(&self, backward: bool) -> Keep {
        if backward {
            Keep::for_backward(self.gradient_checkpointing)
        } else {
            Keep::None
        }
    }
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
    /// Policy log-prob sum and count of each chosen sequence's predicted prompt tokens, when the objective
    /// reads them.
    prompt_logps: Vec<f64>,
    prompt_len: Vec<usize>,
    has_prompt: bool,
    /// Sums of the logits of every chosen / rejected target (for the `logits/*` metrics).
    logit_sum_chosen: f64,
    logit_sum_rejected: f64,
}

impl PairSums {
    /// The rows from `first` on.
    fn logps(&self, first: usize) -> PairLogps<'_> {
        PairLogps {
            policy_chosen: &self.policy_chosen[first..],
            policy_rejected: &self.policy_rejected[first..],
            ref_chosen: self.has_ref.then(|| &self.ref_chosen[first..]),
            ref_rejected: self.has_ref.then(|| &self.ref_rejected[first..]),
            chosen_len: &self.chosen_len[first..],
            rejected_len: &self.rejected_len[first..],
            prompt: self
                .has_prompt
                .then(|| PromptLogps { logps: &self.prompt_logps[first..], len: &self.prompt_len[first..] }),
            weights: None,
        }
    }
}

/// Adds a target for every predicted prompt token of each chosen sequence (all but the prompt's first
/// token, as TRL's shifted cross-entropy over `prompt + chosen`), after the completions' targets, and
/// returns each pair's range of them. The prompt sits just before the chosen completion's first
/// target source (its last token), in the shared-prompt layout and the separate one alike.
fn push_prompt_targets(packed: &mut PackedPairs, examples: &[&Example]) -> Vec<Range<usize>> {
    let b = &mut packed.batch;
    let mut ranges = Vec::with_capacity(examples.len());
    for (ex, chosen) in examples.iter().zip(&packed.chosen) {
        let prompt = ex.chosen_prompt();
        let t0 = b.targets.len();
        // An empty chosen completion has no anchor; the objective refuses such a row (length 0).
        if prompt.len() > 1 && !chosen.is_empty() {
            let last = b.targets[chosen.start].pos as usize; // stream index of the prompt's last token
            let start = last + 1 - prompt.len();
            debug_assert_eq!(&b.tokens[start..=last], prompt);
            for i in start + 1..=last {
                b.targets.push(Target { pos: i as u32 - 1, token: b.tokens[i] });
            }
        }
        ranges.push(t0..b.targets.len());
    }
    ranges
}

/// Runs one micro-batch of the policy `model` (a decoder's weights, or a frozen base with the trained
/// adapter on it). With `grads = Some((g, scale))` it also back-propagates `scale * dloss` into `g` (every
/// weight, or the adapter alone; `scale` is 1 / gradient-accumulation steps), unless the loss is not finite.
///
/// When training with an objective that is a mean of per-pair terms, the pairs go through forward and
/// backward `micro_pairs` at a time (0: all at once): the gradient of the mean is the sum of each chunk's
/// gradient weighted by its share of the pairs, so the step is the same while only one chunk's activations
/// are held. Metrics are computed once over the whole micro-batch either way.
#[allow(clippy::too_many_arguments)]
pub fn pair_batch<'m, 'g, G: Into<Grads<'g>>>(
    policy: &Decoder,
    model: impl Into<Model<'m>>,
    grads: Option<(G, f64)>,
    reference: &Reference,
    objective: &PairObjective,
    examples: &[Example],
    rows: &[usize],
    packing: Packing,
    micro_pairs: usize,
    ws: &mut Workspace,
) -> Result<BatchOutcome, TrainError> {
    let params = model.into();
    let mut grads: Option<(Grads, f64)> = grads.map(|(g, scale)| (g.into(), scale));
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
        let mut packed = pack_pairs(&batch, packing);
        // The reference's forward runs on the policy's buffers, whose contents are dead until the
        // policy's forward below: the step holds one set of activations, not two.
        let refs = reference.pair_logps(part, &packed, &mut ws.policy, (policy, params))?;
        let prompt = objective.reads_prompt().then(|| push_prompt_targets(&mut packed, &batch));
        let keep = ws.policy_keep(grads.is_some());
        let head = policy.logprobs(params, &packed.batch, &mut ws.policy, keep)?;
        let first = sums.policy_chosen.len();
        sums.policy_chosen.extend(sum_ranges(&head.logp, &packed.chosen));
        sums.policy_rejected.extend(sum_ranges(&head.logp, &packed.rejected));
        sums.has_ref = refs.is_some();
        if let Some((c, r)) = refs {
            sums.ref_chosen.extend(c);
            sums.ref_rejected.extend(r);
        }
        sums.chosen_len.extend(packed.chosen.iter().map(|r| r.len()));
        if let Some(prompt) = &prompt {
            sums.has_prompt = true;
            sums.prompt_logps.extend(sum_ranges(&head.logp, prompt));
            sums.prompt_len.extend(prompt.iter().map(|r| r.len()));
        }
        sums.rejected_len.extend(packed.rejected.iter().map(|r| r.len()));
        let logit_total = |ranges: &[Range<usize>]| -> f64 {
            ranges.iter().flat_map(|r| head.logit_sum[r.clone()].iter()).map(|&v| v as f64).sum()
        };
        sums.logit_sum_chosen += logit_total(&packed.chosen);
        sums.logit_sum_rejected += logit_total(&packed.rejected);
        tokens_chosen += packed.chosen.iter().map(|r| r.len()).sum::<usize>();
        tokens_rejected += packed.rejected.iter().map(|r| r.len()).sum::<usize>();

        let Some((g, scale)) = grads.as_mut() else { continue };
        let lg = combined(&objective.losses, &objective.cfg, &sums.logps(first))?;
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
            if let Some(prompt) = &prompt {
                let dp = (lg.d_prompt[i] * share) as f32;
                prompt[i].clone().for_each(|t| dlogp[t] = dp);
            }
        }
        policy.backward_logprobs_deferred(
            params,
            &packed.batch,
            &mut ws.policy,
            &dlogp,
            reborrow(g),
            &mut ws.embedding,
        )?;
    }
    // An adapter's backward leaves the (frozen) embedding alone: nothing is pending then.
    if let Some((Grads::Full(g), _)) = grads {
        ws.embedding.apply(g);
    }

    let x = sums.logps(0);
    let lg = combined(&objective.losses, &objective.cfg, &x)?;
    let rm = objective_reward_metrics(&objective.losses, &objective.cfg, &x)?;
    let vocab = policy.cfg.vocab_size as f64;
    let mean_logit = |sum: f64, n: usize| if n == 0 { 0.0 } else { sum / vocab / n as f64 };
    let mut metrics = BTreeMap::new();
    let others = [
        ("loss", lg.loss),
        ("logits/chosen", mean_logit(sums.logit_sum_chosen, tokens_chosen)),
        ("logits/rejected", mean_logit(sums.logit_sum_rejected, tokens_rejected)),
        ("dpo/gradient_weight", gradient_weight(objective.cfg.beta, &x)),
    ];
    for (k, v) in rm.named().into_iter().chain(others) {
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

/// The same gradient target, borrowed again (one backward per chunk of a micro-batch).
pub(crate) fn reborrow<'a>(g: &'a mut Grads<'_>) -> Grads<'a> {
    match g {
        Grads::Full(p) => Grads::Full(p),
        Grads::Adapter(a) => Grads::Adapter(a),
    }
}

#[cfg(test)]
mod tests {
    use engine::presets::init_random;
    use engine::{DecoderConfig, Dims, Params};

    use super::*;
    use crate::data::pack::pack_sequences;
    use crate::objectives::pair_loss;

    fn tiny() -> (Decoder, Params) {
        let cfg = DecoderConfig::gpt2(Dims {
            vocab_size: 32,
            hidden: 16,
            n_layers: 2,
            n_heads: 2,
            n_kv_heads: 2,
            head_dim: 8,
            ffn_hidden: 32,
            max_positions: 64,
        });
        let params = init_random(&cfg, 0.5, 7);
        (Decoder::new(cfg), params)
    }

    fn examples() -> Vec<Example> {
        vec![
            Example::new("a", vec![1, 2, 3, 4], vec![5, 6, 7], vec![8, 9]),
            // One prompt token: nothing of the prompt is predicted.
            Example::new("b", vec![10], vec![11, 12], vec![13]),
            Example::new("c", vec![14, 15, 16], vec![17], vec![18, 19, 20]),
        ]
    }

    fn orpo() -> PairObjective {
        PairObjective { losses: vec![(LossType::Orpo, 1.0)], cfg: LossConfig::default() }
    }

    fn loss(dec: &Decoder, params: &Params, grads: Option<(&mut Params, f64)>, packing: Packing) -> f64 {
        let ex = examples();
        let mut ws = Workspace::default();
        let out = pair_batch(dec, params, grads, &Reference::None, &orpo(), &ex, &[0, 1, 2], packing, 0, &mut ws);
        out.unwrap().metrics["loss"]
    }

    /// `dpo train --loss orpo` takes ORPO's NLL over the prompt and the chosen completion, as TRL's
    /// `ORPOTrainer` does ("orpo chosen nll loss is computed over the full prompt and response"): the batch
    /// loss is ORPO over log-probs of each whole sequence scored on its own, in both packings.
    #[test]
    fn orpo_nll_covers_the_prompt() {
        let (dec, params) = tiny();
        let ex = examples();
        // Every chosen sequence whole (all tokens but the first scored), then each completion after its prompt.
        let whole: Vec<Vec<u32>> = ex.iter().map(|e| [&e.prompt_ids[..], &e.chosen_ids[..]].concat()).collect();
        let mut seqs: Vec<(&[u32], &[u32])> = whole.iter().map(|w| (&[][..], &w[..])).collect();
        for e in &ex {
            seqs.extend([(&e.prompt_ids[..], &e.chosen_ids[..]), (&e.prompt_ids[..], &e.rejected_ids[..])]);
        }
        let (batch, ranges) = pack_sequences(&seqs);
        let head = dec.logprobs(&params, &batch, &mut Activations::default(), false).unwrap();
        let sums = sum_ranges(&head.logp, &ranges);
        let (whole_sum, rest) = sums.split_at(3);
        let pc: Vec<f64> = rest.iter().step_by(2).copied().collect();
        let pr: Vec<f64> = rest.iter().skip(1).step_by(2).copied().collect();
        let lc: Vec<usize> = ranges[3..].iter().step_by(2).map(|r| r.len()).collect();
        let lr: Vec<usize> = ranges[3..].iter().skip(1).step_by(2).map(|r| r.len()).collect();
        let pp: Vec<f64> = whole_sum.iter().zip(&pc).map(|(w, c)| w - c).collect();
        let pl: Vec<usize> = ex.iter().map(|e| e.prompt_ids.len() - 1).collect();
        let x = PairLogps {
            policy_chosen: &pc,
            policy_rejected: &pr,
            chosen_len: &lc,
            rejected_len: &lr,
            prompt: Some(PromptLogps { logps: &pp, len: &pl }),
            ..Default::default()
        };
        let want = pair_loss(LossType::Orpo, &LossConfig::default(), &x).unwrap().loss;
        let completion_only = pair_loss(LossType::Orpo, &LossConfig::default(), &PairLogps { prompt: None, ..x });
        assert!((want - completion_only.unwrap().loss).abs() > 1e-2, "the check has no teeth");
        for packing in [Packing::SharedPrompt, Packing::Separate] {
            let got = loss(&dec, &params, None, packing);
            assert!((got - want).abs() < 1e-5 * want.abs(), "{packing:?}: {got} vs {want}");
        }
    }

    /// The prompt's gradient reaches the model: along the computed gradient `g`, the loss changes by
    /// `|g|^2` per unit step (central differences).
    #[test]
    fn orpo_prompt_gradient_matches_finite_differences() {
        let (dec, params) = tiny();
        let mut g = Params::zeros(&dec.cfg);
        loss(&dec, &params, Some((&mut g, 1.0)), Packing::SharedPrompt);
        let norm2: f64 = g.named().iter().flat_map(|(_, t)| t.data.iter()).map(|&v| (v as f64).powi(2)).sum();
        let eps = 1e-2 / norm2.sqrt();
        let moved = |sign: f64| {
            let mut p = params.clone();
            for ((_, t), (_, d)) in p.named_mut().into_iter().zip(g.named()) {
                t.data.iter_mut().zip(&d.data).for_each(|(v, d)| *v += (sign * eps * *d as f64) as f32);
            }
            loss(&dec, &p, None, Packing::SharedPrompt)
        };
        let slope = (moved(1.0) - moved(-1.0)) / (2.0 * eps);
        assert!((slope - norm2).abs() < 1e-2 * norm2, "{slope} vs {norm2}");
    }

    /// Gradient checkpointing changes what the policy's forward keeps, not the step: the same gradient bit
    /// for bit, also when the micro-batch goes through in chunks of pairs.
    #[test]
    fn gradient_checkpointing_gives_the_same_gradient() {
        let (dec, params) = tiny();
        let ex = examples();
        let cfg = LossConfig { reference_free: true, ..LossConfig::default() };
        let sigmoid = PairObjective { losses: vec![(LossType::Sigmoid, 1.0)], cfg };
        for micro_pairs in [0, 2] {
            let grads = |gradient_checkpointing| {
                let mut g = Params::zeros(&dec.cfg);
                let mut ws = Workspace { gradient_checkpointing, ..Workspace::default() };
                let rows = [0, 1, 2];
                let packing = Packing::SharedPrompt;
                pair_batch(
                    &dec,
                    &params,
                    Some((&mut g, 1.0)),
                    &Reference::None,
                    &sigmoid,
                    &ex,
                    &rows,
                    packing,
                    micro_pairs,
                    &mut ws,
                )
                .unwrap();
                g
            };
            let (kept, checkpointed) = (grads(false), grads(true));
            for ((name, a), (_, b)) in kept.named().iter().zip(checkpointed.named()) {
                let bits = |t: &engine::Tensor| t.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert!(a.data.iter().any(|&v| v != 0.0), "{name}: no gradient");
                assert_eq!(bits(a), bits(b), "micro_pairs {micro_pairs}: {name}");
            }
        }
    }
}
