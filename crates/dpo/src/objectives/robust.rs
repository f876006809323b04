//! Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy
//! Feedback"): an unbiased estimate of the DPO loss when labels are flipped with probability `eps`.
//!
//! With `z = beta * (s_c - s_r)` (scores as in [`super::sigmoid`]) and `eps = label_smoothing` in
//! [0, 0.5), per row:
//!
//! ```text
//! loss = (-(1 - eps) * logsigmoid(z) + eps * logsigmoid(-z)) / (1 - 2 eps)
//! d loss / d z = (-(1 - eps) * sigmoid(-z) - eps * sigmoid(z)) / (1 - 2 eps)
//! d loss / d policy_chosen   =  beta * s_c' * d loss / d z
//! d loss / d policy_rejected = -beta * s_r' * d loss / d z
//! ```
//!
//! TRL 1.16: `clean = -(1 - ls) * logsigmoid(beta * delta_score)`, `flipped = -ls * logsigmoid(-beta *
//! delta_score)`, `(clean - flipped) / (1 - 2 * ls)`. TRL only warns outside [0, 0.5); here that is an
//! error, since the loss is infinite at 0.5 and rewards flipping the labels beyond it.

use super::math::{log_sigmoid, sigmoid};
use super::{Batch, LossConfig, LossSpec, ObjectiveError, RewardBasis, Term};

pub(super) const SPEC: LossSpec = LossSpec {
    name: "robust",
    help: "Robust DPO (Chowdhury et al. 2024): label_smoothing is the flip rate",
    needs_reference: true,
    per_pair: true,
    f_divergence: true,
    label_smoothing: true,
    weighting: true,
    reads_prompt: false,
    rewards: RewardBasis::SummedLogRatio,
    term,
};

pub(super) fn term(cfg: &LossConfig, b: &Batch) -> Result<Term, ObjectiveError> {
    let (beta, eps) = (cfg.beta, cfg.label_smoothing);
    if !(0.0..0.5).contains(&eps) {
        return Err(ObjectiveError::InvalidConfig {
            loss: "robust".into(),
            reason: format!("label_smoothing (the label flip rate) must lie in [0, 0.5), got {eps}"),
        });
    }
    let k = 1.0 / (1.0 - 2.0 * eps);
    Ok(b.separable(|i| {
        let z = beta * (b.chosen_score[i] - b.rejected_score[i]);
        let l = (-(1.0 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) * k;
        let dz = (-(1.0 - eps) * sigmoid(-z) - eps * sigmoid(z)) * k;
        (l, beta * b.chosen_score_d[i] * dz, -beta * b.rejected_score_d[i] * dz)
    }))
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::{pair_loss, LossConfig, LossType};

    #[test]
    fn value_matches_trl() {
        check_golden(LossType::Robust);
    }

    #[test]
    fn gradient_matches_finite_differences() {
        for f in fixtures() {
            check_grad(&[(LossType::Robust, 1.0)], &golden_cfg(), &f.pair());
        }
        check_grad(&[(LossType::Robust, 1.0)], &golden_cfg(), &synthetic(32, 6, 30.0).pair());
    }

    #[test]
    fn flip_rate_must_be_below_half() {
        let cfg = LossConfig { label_smoothing: 0.5, ..golden_cfg() };
        assert!(pair_loss(LossType::Robust, &cfg, &fixtures()[0].pair()).is_err());
    }
}
