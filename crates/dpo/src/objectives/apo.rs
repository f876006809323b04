//! APO, anchored preference optimisation (D'Oosterlinck et al. 2024, "Anchored Preference Optimization
//! and Contrastive Revisions: Addressing Underspecification in Alignment", Eqs. 7 and 8).
//!
//! With the rewards `r_c = beta * (log pi - log pi_ref)(chosen)`, `r_r` likewise, and
//! `sigma'(x) = sigmoid(x) (1 - sigmoid(x))`, per row:
//!
//! `apo_zero`, for chosen outputs better than the model's own (raise chosen, lower rejected):
//!
//! ```text
//! loss = (1 - sigmoid(r_c)) + sigmoid(r_r)
//! d loss / d policy_chosen   = -beta * sigma'(r_c)
//! d loss / d policy_rejected =  beta * sigma'(r_r)
//! ```
//!
//! `apo_down`, for chosen outputs worse than the model's own (lower both, the rejected more):
//!
//! ```text
//! loss = sigmoid(r_c) + (1 - sigmoid(r_c - r_r))
//! d loss / d policy_chosen   = beta * (sigma'(r_c) - sigma'(r_c - r_r))
//! d loss / d policy_rejected = beta * sigma'(r_c - r_r)
//! ```
//!
//! TRL 1.16: `1 - sigmoid(beta * chosen_logratios) + sigmoid(beta * rejected_logratios)` and
//! `sigmoid(beta * chosen_logratios) + 1 - sigmoid(beta * (chosen_logratios - rejected_logratios))`.

use super::math::sigmoid;
use super::{Batch, LossConfig, LossSpec, RewardBasis, Term};

pub(super) const SPEC_ZERO: LossSpec = LossSpec {
    name: "apo_zero",
    help: "APO-zero (D'Oosterlinck et al. 2024): raise chosen, lower rejected likelihood",
    needs_reference: true,
    per_pair: true,
    f_divergence: false,
    label_smoothing: false,
    weighting: true,
    reads_prompt: false,
    rewards: RewardBasis::SummedLogRatio,
    term: |cfg, b| Ok(term_zero(cfg, b)),
};

pub(super) const SPEC_DOWN: LossSpec = LossSpec {
    name: "apo_down",
    help: "APO-down (D'Oosterlinck et al. 2024): lower both, rejected more",
    needs_reference: true,
    per_pair: true,
    f_divergence: false,
    label_smoothing: false,
    weighting: true,
    reads_prompt: false,
    rewards: RewardBasis::SummedLogRatio,
    term: |cfg, b| Ok(term_down(cfg, b)),
};

fn dsigmoid(x: f64) -> f64 {
    let s = sigmoid(x);
    s * (1.0 - s)
}

pub(super) fn term_zero(cfg: &LossConfig, b: &Batch) -> Term {
    let beta = cfg.beta;
    b.separable(|i| {
        let (rc, rr) = (beta * b.chosen_ratio[i], beta * b.rejected_ratio[i]);
        ((1.0 - sigmoid(rc)) + sigmoid(rr), -beta * dsigmoid(rc), beta * dsigmoid(rr))
    })
}

pub(super) fn term_down(cfg: &LossConfig, b: &Batch) -> Term {
    let beta = cfg.beta;
    b.separable(|i| {
        let rc = beta * b.chosen_ratio[i];
        let m = beta * (b.chosen_ratio[i] - b.rejected_ratio[i]);
        (sigmoid(rc) + (1.0 - sigmoid(m)), beta * (dsigmoid(rc) - dsigmoid(m)), beta * dsigmoid(m))
    })
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::LossType;

    #[test]
    fn values_match_trl() {
        check_golden(LossType::ApoZero);
        check_golden(LossType::ApoDown);
    }

    #[test]
    fn gradients_match_finite_differences() {
        for kind in [LossType::ApoZero, LossType::ApoDown] {
            for f in fixtures() {
                check_grad(&[(kind, 1.0)], &golden_cfg(), &f.pair());
            }
            check_grad(&[(kind, 1.0)], &golden_cfg(), &synthetic(32, 11, 30.0).pair());
        }
    }
}
