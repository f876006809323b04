//! The hinge loss of SLiC (Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human
//! Feedback"), on the DPO log-ratios, with `beta` as the inverse margin.
//!
//! With `z = beta * (s_c - s_r)` (scores as in [`super::sigmoid`]), per row:
//!
//! ```text
//! loss = relu(1 - z)
//! d loss / d z = -1 where z < 1, else 0 (as torch's relu, whose gradient at 0 is 0)
//! d loss / d policy_chosen   =  beta * s_c' * d loss / d z
//! d loss / d policy_rejected = -beta * s_r' * d loss / d z
//! ```
//!
//! TRL 1.16: `per_sequence_loss = torch.relu(1 - self.beta * delta_score)`.

use super::{Batch, LossConfig, LossSpec, RewardBasis, Term};

pub(super) const SPEC: LossSpec = LossSpec {
    name: "hinge",
    help: "SLiC (Zhao et al. 2023): relu(1 - beta * delta)",
    needs_reference: true,
    per_pair: true,
    f_divergence: true,
    label_smoothing: false,
    weighting: true,
    reads_prompt: false,
    rewards: RewardBasis::SummedLogRatio,
    term: |cfg, b| Ok(term(cfg, b)),
};

pub(super) fn term(cfg: &LossConfig, b: &Batch) -> Term {
    let beta = cfg.beta;
    b.separable(|i| {
        let m = 1.0 - beta * (b.chosen_score[i] - b.rejected_score[i]);
        let dz = if m > 0.0 { -1.0 } else { 0.0 };
        (m.max(0.0), beta * b.chosen_score_d[i] * dz, -beta * b.rejected_score_d[i] * dz)
    })
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::LossType;

    #[test]
    fn value_matches_trl() {
        check_golden(LossType::Hinge);
    }

    #[test]
    fn gradient_matches_finite_differences() {
        for f in fixtures() {
            check_grad(&[(LossType::Hinge, 1.0)], &golden_cfg(), &f.pair());
        }
        // Both sides of the hinge.
        check_grad(&[(LossType::Hinge, 1.0)], &golden_cfg(), &synthetic(32, 3, 30.0).pair());
    }
}
