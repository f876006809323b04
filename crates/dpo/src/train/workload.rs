//! What the training loop trains on. The loop (`trainer.rs`) owns order, accumulation, clipping, the
//! optimizer, metrics, evaluation and checkpoints; a workload turns a list of row indices into a loss,
//! its gradient and TRL-named metrics.

use std::collections::BTreeMap;

use engine::model::{Grads, Model};
use engine::Decoder;

use super::pairs::{pair_batch, BatchOutcome, PairObjective, Workspace};
use super::reference::Reference;
use super::TrainError;
use crate::data::{pack_pairs, pack_sequences, Example, Packing, SftExample};
use crate::dist::SplitWeight;

pub trait Workload {
    /// Rows available.
    fn rows(&self) -> usize;
    /// Where a row came from ("line 12"), for messages about bad steps.
    fn location(&self, row: usize) -> String;
    /// Forward of the policy `model` (and, with `grads`, backward scaled by the given factor into every
    /// weight or the adapter alone) on the rows.
    fn run(
        &self,
        decoder: &Decoder,
        model: Model<'_>,
        grads: Option<(Grads<'_>, f64)>,
        rows: &[usize],
        ws: &mut Workspace,
    ) -> Result<BatchOutcome, TrainError>;
    /// The weight of `rows` in a micro-batch's loss when the micro-batch is split across the ranks of a
    /// data-parallel run ([`crate::dist`]); `None` (the default) when the loss of a batch is not a
    /// weighted mean of its parts' (one rank then computes the whole micro-batch).
    fn split_weight(&self, _rows: &[usize]) -> Option<SplitWeight> {
        None
    }
}

/// Preference pairs under an objective of the DPO family.
pub struct PairWorkload<'a> {
    pub examples: &'a [Example],
    pub reference: &'a Reference,
    pub objective: &'a PairObjective,
    pub packing: Packing,
    /// Pairs pushed through forward and backward at once when training a per-pair loss (0: the whole
    /// micro-batch); see [`pair_batch`].
    pub micro_pairs: usize,
}

impl Workload for PairWorkload<'_> {
    fn rows(&self) -> usize {
        self.examples.len()
    }

    fn location(&self, row: usize) -> String {
        self.examples[row].location.clone()
    }

    fn run(
        &self,
        decoder: &Decoder,
        model: Model<'_>,
        grads: Option<(Grads<'_>, f64)>,
        rows: &[usize],
        ws: &mut Workspace,
    ) -> Result<BatchOutcome, TrainError> {
        let (ex, pk, mp) = (self.examples, self.packing, self.micro_pairs);
        pair_batch(decoder, model, grads, self.reference, self.objective, ex, rows, pk, mp, ws)
    }

    /// A mean over pairs when every loss term is a pair's own; the `logits/*` metrics are means over
    /// the completions' tokens.
    fn split_weight(&self, rows: &[usize]) -> Option<SplitWeight> {
        if !self.objective.per_pair() {
            return None;
        }
        let batch: Vec<&Example> = rows.iter().map(|&i| &self.examples[i]).collect();
        let packed = pack_pairs(&batch, self.packing);
        let tokens = |r: &[std::ops::Range<usize>]| r.iter().map(|r| r.len()).sum::<usize>() as f64;
        let metrics = [
            ("logits/chosen".to_string(), tokens(&packed.chosen)),
            ("logits/rejected".to_string(), tokens(&packed.rejected)),
        ];
        Some(SplitWeight { loss: rows.len() as f64, metrics: metrics.into() })
    }
}

/// Supervised fine-tuning: the mean negative log-likelihood of the completion tokens of the batch
/// (TRL's SFTTrainer with completion-only loss: one mean over all completion tokens, not per row).
pub struct SftWorkload<'a> {
    pub examples: &'a [SftExample],
}

impl Workload for SftWorkload<'_> {
    fn rows(&self) -> usize {
        self.examples.len()
    }

    fn location(&self, row: usize) -> String {
        self.examples[row].location.clone()
    }

    fn run(
        &self,
        decoder: &Decoder,
        params: Model<'_>,
        grads: Option<(Grads<'_>, f64)>,
        rows: &[usize],
        ws: &mut Workspace,
    ) -> Result<BatchOutcome, TrainError> {
        let parts: Vec<(&[u32], &[u32])> = rows.iter().map(|&i| self.examples[i].parts()).collect();
        let (batch, ranges) = pack_sequences(&parts);
        let keep = ws.policy_keep(grads.is_some());
        let head = decoder.logprobs(params, &batch, &mut ws.policy, keep)?;
        let n: usize = ranges.iter().map(|r| r.len()).sum();
        let sum: f64 = head.logp.iter().map(|&v| v as f64).sum();
        let loss = if n == 0 { 0.0 } else { -sum / n as f64 };
        let mut metrics = BTreeMap::new();
        metrics.insert("loss".to_string(), loss);
        let vocab = decoder.cfg.vocab_size as f64;
        let logit_mean = head.logit_sum.iter().map(|&v| v as f64).sum::<f64>() / vocab / n.max(1) as f64;
        metrics.insert("logits/completion".to_string(), logit_mean);
        let finite = loss.is_finite();
        if let (Some((g, scale)), true, true) = (grads, finite, n > 0) {
            let d = (-scale / n as f64) as f32;
            let dlogp = vec![d; head.logp.len()];
            decoder.backward_logprobs(params, &batch, &mut ws.policy, &dlogp, g)?;
        }
        let num_tokens = parts.iter().map(|(p, c)| (p.len() + c.len()) as u64).sum();
        Ok(BatchOutcome { metrics, num_tokens, finite })
    }

    /// A mean over the completion tokens.
    fn split_weight(&self, rows: &[usize]) -> Option<SplitWeight> {
        let parts: Vec<(&[u32], &[u32])> = rows.iter().map(|&i| self.examples[i].parts()).collect();
        let (_, ranges) = pack_sequences(&parts);
        let tokens = ranges.iter().map(|r| r.len()).sum::<usize>() as f64;
        Some(SplitWeight { loss: tokens, ..Default::default() })
    }
}
