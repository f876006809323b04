//! The supervised (negative log-likelihood) loss on the chosen completions, TRL's `sft` loss type, used
//! beside a preference loss (for example MPO's `sigmoid,bco_pair,sft`; RPO, Pang et al. 2024).
//!
//! It is one number for the batch: the mean over all chosen completion tokens of the batch (not the mean
//! over rows of per-row means). With `N = sum_i L_c,i`:
//!
//! ```text
//! loss = -(sum_i policy_chosen_i) / N
//! d loss / d policy_chosen_i = -1 / N        d loss / d policy_rejected_i = 0
//! ```
//!
//! TRL 1.16: `batch_loss = -chosen_per_token_logps[chosen_mask.bool()].mean()`, expanded to every row; so
//! with WPO weights the loss is `batch_loss * mean(weights)`. It needs no reference. The CPO/SimPO
//! trainer's behaviour-cloning term (`cpo_alpha * nll_loss`) is this same quantity.

use super::{Batch, LossSpec, ObjectiveError, RewardBasis, Term};

pub(super) const SPEC: LossSpec = LossSpec {
    name: "sft",
    help: "NLL of the chosen completions, averaged over their tokens (no reference)",
    needs_reference: false,
    per_pair: false,
    f_divergence: true,
    label_smoothing: false,
    weighting: true,
    reads_prompt: false,
    rewards: RewardBasis::SummedLogRatio,
    term: |_, b| term(b),
};

pub(super) fn term(b: &Batch) -> Result<Term, ObjectiveError> {
    let tokens: usize = b.x.chosen_len.iter().sum();
    if tokens == 0 {
        return Err(ObjectiveError::ZeroLength { loss: "sft".into(), field: "chosen", row: 0 });
    }
    let nt = tokens as f64;
    let batch_loss = -b.x.policy_chosen.iter().sum::<f64>() / nt;
    let w = b.mean_weight();
    Ok(Term {
        per_row: (0..b.n).map(|i| batch_loss * b.x.weights.map_or(1.0, |w| w[i])).collect(),
        d_chosen: vec![-w / nt; b.n],
        d_rejected: vec![0.0; b.n],
        d_prompt: None,
    })
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::{pair_loss, LossType, PairLogps};

    /// `-sum(policy_chosen_logps) / sum(chosen_len)` on the gpt2 fixture.
    #[test]
    fn value_matches_reference() {
        let got = pair_loss(LossType::Sft, &golden_cfg(), &fixtures()[0].pair()).unwrap().loss;
        assert!(rel_err(got, GPT2_SFT) < 1e-12, "{got} vs {GPT2_SFT}");
    }

    #[test]
    fn gradient_matches_finite_differences() {
        for f in fixtures() {
            check_grad(&[(LossType::Sft, 1.0)], &golden_cfg(), &f.pair());
        }
    }

    #[test]
    fn no_tokens_is_an_error() {
        let z = [0usize; 2];
        let x = PairLogps {
            policy_chosen: &[0.0, 0.0],
            policy_rejected: &[-1.0, -1.0],
            chosen_len: &z,
            rejected_len: &z,
            ..Default::default()
        };
        assert!(pair_loss(LossType::Sft, &golden_cfg(), &x).unwrap_err().to_string().contains("sft"));
    }
}
