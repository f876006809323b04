//! The unlikelihood objective ([`crate::objectives::unlikelihood`]) as a workload of the training loop.

use std::collections::BTreeMap;

use engine::{Decoder, Grads, Model};

use super::{BatchOutcome, TrainError, Workload, Workspace};
use crate::data::{pack_sequences, Example};
use crate::objectives::unlikelihood::{rejected_roles, unlikelihood_loss, Role, UnlikelihoodConfig};

/// Preference pairs under the unlikelihood objective, a workload of the training loop: per micro-batch,
/// `prompt ++ chosen` and `prompt ++ rejected` of each row packed as separate sequences, one loss over
/// all their targets ([`unlikelihood_loss`]), its gradient scaled by the loop's factor.
pub struct UnlikelihoodWorkload<'a> {
    pub examples: &'a [Example],
    pub cfg: UnlikelihoodConfig,
    /// Tokens that end a completion (skipped by the unlikelihood term).
    pub eos_ids: &'a [u32],
}

impl Workload for UnlikelihoodWorkload<'_> {
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
        let mut seqs: Vec<(&[u32], &[u32])> = Vec::with_capacity(2 * rows.len());
        for &r in rows {
            let ex = &self.examples[r];
            seqs.push((ex.chosen_prompt(), &ex.chosen_ids));
            seqs.push((ex.rejected_prompt(), &ex.rejected_ids));
        }
        let (batch, ranges) = pack_sequences(&seqs);
        let keep = ws.policy_keep(grads.is_some());
        let head = decoder.logprobs(params, &batch, &mut ws.policy, keep)?;
        let mut roles = vec![Role::Chosen; head.logp.len()];
        for (k, &row) in rows.iter().enumerate() {
            let (ex, r) = (&self.examples[row], &ranges[2 * k + 1]);
            roles[r.clone()].copy_from_slice(&rejected_roles(&ex.chosen_ids, &ex.rejected_ids, r.len(), self.eos_ids));
        }
        let (loss, dlogp) = unlikelihood_loss(&head.logp, &roles, self.cfg.alpha);
        // Mean over rows of each completion's summed log-prob.
        let side_mean = |side: usize| {
            let sums = ranges.iter().skip(side).step_by(2);
            sums.map(|r| head.logp[r.clone()].iter().map(|&v| v as f64).sum::<f64>()).sum::<f64>()
                / rows.len().max(1) as f64
        };
        let metrics = BTreeMap::from([
            ("loss".to_string(), loss),
            ("logps/chosen".to_string(), side_mean(0)),
            ("logps/rejected".to_string(), side_mean(1)),
        ]);
        let finite = loss.is_finite();
        if let (Some((g, scale)), true) = (grads, finite) {
            let dlogp: Vec<f32> = dlogp.iter().map(|&d| (d as f64 * scale) as f32).collect();
            decoder.backward_logprobs(params, &batch, &mut ws.policy, &dlogp, g)?;
        }
        let num_tokens = seqs.iter().map(|(p, c)| (p.len() + c.len()) as u64).sum();
        Ok(BatchOutcome { metrics, num_tokens, finite })
    }
}
