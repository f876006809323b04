//! KTO (Ethayarajh et al. 2024) on unpaired rows: each completion is labelled desirable or not, and its
//! implicit reward is compared with a reference point z0, the KL between policy and reference estimated
//! on mismatched (prompt, completion) pairs of the same batch (TRL's KTOTrainer: completion i+1 after
//! prompt i), with no gradient through the estimate.

use std::collections::BTreeMap;

use engine::model::{Grads, Model};
use engine::Decoder;

use super::pairs::{BatchOutcome, Workspace};
use super::reference::Reference;
use super::workload::Workload;
use super::TrainError;
use crate::data::pack::sum_ranges;
use crate::data::{pack_sequences, UnpairedExample};
use crate::objectives::{kto_loss, KtoBatch, KtoConfig};

pub struct KtoWorkload<'a> {
    pub examples: &'a [UnpairedExample],
    /// Must be a model: the KL pairs are formed per batch, so they cannot be cached ahead of time.
    pub reference: &'a Reference,
    pub cfg: KtoConfig,
}

impl Workload for KtoWorkload<'_> {
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
        let Some((ref_decoder, ref_params)) = self.reference.frozen((decoder, params)) else {
            return Err(TrainError::NeedsReferenceModel { objective: "KTO" });
        };
        let parts: Vec<(&[u32], &[u32])> = rows.iter().map(|&i| self.examples[i].parts()).collect();
        // Mismatched pairs for the KL estimate: prompt i with completion i+1 (a batch of one pairs itself).
        let mismatched: Vec<(&[u32], &[u32])> =
            (0..parts.len()).map(|i| (parts[i].0, parts[(i + 1) % parts.len()].1)).collect();

        let (batch, ranges) = pack_sequences(&parts);
        let (kl_batch, kl_ranges) = pack_sequences(&mismatched);
        let keep = ws.policy_keep(grads.is_some());
        let head = decoder.logprobs(params, &batch, &mut ws.policy, keep)?;
        let policy = sum_ranges(&head.logp, &ranges);
        let kl_policy = sum_ranges(&decoder.logprobs(params, &kl_batch, &mut ws.reference, false)?.logp, &kl_ranges);
        let reference = sum_ranges(&ref_decoder.logprobs(ref_params, &batch, &mut ws.reference, false)?.logp, &ranges);
        let kl_reference =
            sum_ranges(&ref_decoder.logprobs(ref_params, &kl_batch, &mut ws.reference, false)?.logp, &kl_ranges);
        let desirable: Vec<bool> = rows.iter().map(|&i| self.examples[i].label).collect();
        let out = kto_loss(
            &self.cfg,
            &KtoBatch {
                policy: &policy,
                reference: &reference,
                desirable: &desirable,
                kl_policy: Some(&kl_policy),
                kl_reference: Some(&kl_reference),
            },
        )?;
        let mut metrics = BTreeMap::new();
        metrics.insert("loss".to_string(), out.loss);
        metrics.insert("kl".to_string(), out.metrics.kl);
        let m = &out.metrics;
        for (k, v) in [
            ("rewards/chosen", m.rewards_chosen),
            ("rewards/rejected", m.rewards_rejected),
            ("rewards/margins", m.rewards_margins),
            ("logps/chosen", m.logps_chosen),
            ("logps/rejected", m.logps_rejected),
        ] {
            if let Some(v) = v {
                metrics.insert(k.to_string(), v);
            }
        }
        let finite = out.loss.is_finite();
        if let (Some((g, scale)), true) = (grads, finite) {
            let mut dlogp = vec![0.0f32; head.logp.len()];
            for (i, r) in ranges.iter().enumerate() {
                let d = (out.d_policy[i] * scale) as f32;
                r.clone().for_each(|t| dlogp[t] = d);
            }
            decoder.backward_logprobs(params, &batch, &mut ws.policy, &dlogp, g)?;
        }
        let num_tokens = parts.iter().map(|(p, c)| (p.len() + c.len()) as u64).sum();
        Ok(BatchOutcome { metrics, num_tokens, finite })
    }
}
