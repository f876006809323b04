//! BCO, pairwise (Jung et al. 2024, "Binary Classifier Optimization for Large Language Model
//! Alignment"): chosen and rejected completions classified separately by their implicit reward, as TRL's
//! `bco_pair` computes it (without the paper's running reward shift `delta`).
//!
//! With the rewards `r_c = beta * (log pi - log pi_ref)(chosen)` and `r_r` likewise, per row:
//!
//! ```text
//! loss = -logsigmoid(r_c) - logsigmoid(-r_r)
//! d loss / d policy_chosen   = -beta * sigmoid(-r_c)
//! d loss / d policy_rejected =  beta * sigmoid(r_r)
//! ```
//!
//! TRL 1.16: `-F.logsigmoid(chosen_rewards) - F.logsigmoid(-rejected_rewards)`, on log-ratios.

use super::math::{log_sigmoid, sigmoid};
use super::{Batch, LossConfig, LossSpec, RewardBasis, Term};

pub(super) const SPEC: LossSpec = LossSpec {
    name: "bco_pair",
    help: "BCO (Jung et al. 2024), pairwise, without the running reward shift",
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
        (-log_sigmoid(rc) - log_sigmoid(-rr), -beta * sigmoid(-rc), beta * sigmoid(rr))
    })
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::LossType;

    #[test]
    fn value_matches_trl() {
        check_golden(LossType::BcoPair);
    }

    #[test]
    fn gradient_matches_finite_differences() {
        for f in fixtures() {
            check_grad(&[(LossType::BcoPair, 1.0)], &golden_cfg(), &f.pair());
        }
        check_grad(&[(LossType::BcoPair, 1.0)], &golden_cfg(), &synthetic(32, 9, 30.0).pair());
    }
}
