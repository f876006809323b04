//! NCA, pairwise (Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit
//! Rewards"): each completion's own reward, not only their difference, so that the chosen likelihood
//! does not fall.
//!
//! With the rewards `r_c = beta * (log pi - log pi_ref)(chosen)` and `r_r` likewise, per row:
//!
//! ```text
//! loss = -logsigmoid(r_c) - 0.5 * logsigmoid(-r_c) - 0.5 * logsigmoid(-r_r)
//! d loss / d policy_chosen   = beta * (-sigmoid(-r_c) + 0.5 * sigmoid(r_c))
//! d loss / d policy_rejected = beta * 0.5 * sigmoid(r_r)
//! ```
//!
//! TRL 1.16: `-F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 *
//! F.logsigmoid(-rejected_rewards)`, on log-ratios (no f-divergence).

use super::math::{log_sigmoid, sigmoid};
use super::{Batch, LossConfig, LossSpec, RewardBasis, Term};

pub(super) const SPEC: LossSpec = LossSpec {
    name: "nca_pair",
    help: "NCA (Chen et al. 2024), pairwise",
    needs_reference: true,
    per_pair: true,
    f_divergence: false,
    label_smoothing: false,
    weighting: true,
    reads_prompt: false,
    rewards: RewardBasis::SummedLogRatio,
    term: |cfg, b| Ok(term(cfg, b)),
};

pub(super) fn term(cfg: &LossConfig, b: &Batch) -> Term {
    let beta = cfg.beta;
    b.separable(|i| {
        let (rc, rr) = (beta * b.chosen_ratio[i], beta * b.rejected_ratio[i]);
        let l = -log_sigmoid(rc) - 0.5 * log_sigmoid(-rc) - 0.5 * log_sigmoid(-rr);
        (l, beta * (-sigmoid(-rc) + 0.5 * sigmoid(rc)), beta * 0.5 * sigmoid(rr))
    })
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::LossType;

    #[test]
    fn value_matches_trl() {
        check_golden(LossType::NcaPair);
    }

    #[test]
    fn gradient_matches_finite_differences() {
        for f in fixtures() {
            check_grad(&[(LossType::NcaPair, 1.0)], &golden_cfg(), &f.pair());
        }
        check_grad(&[(LossType::NcaPair, 1.0)], &golden_cfg(), &synthetic(32, 8, 30.0).pair());
    }
}
