//! The sigmoid (DPO) loss on per-token log-ratios: each score divided by its completion length, which
//! removes DPO's bias towards long completions (as in length-normalised DPO, e.g. Meng et al. 2024's
//! ablations; TRL's `sigmoid_norm`).
//!
//! With `L_c`, `L_r` the completion lengths (at least 1), scores `s_c`, `s_r` as in [`super::sigmoid`],
//! and `z = beta * (s_c / L_c - s_r / L_r)`, per row:
//!
//! ```text
//! loss = -logsigmoid(z)
//! d loss / d policy_chosen   = -sigmoid(-z) * beta * s_c' / L_c
//! d loss / d policy_rejected =  sigmoid(-z) * beta * s_r' / L_r
//! ```
//!
//! TRL 1.16: `delta = chosen_scores / chosen_mask.sum(1).clamp(min=1) - rejected_scores /
//! rejected_mask.sum(1).clamp(min=1)`, `-F.logsigmoid(self.beta * delta)`.

use super::math::{log_sigmoid, sigmoid};
use super::{Batch, LossConfig, LossSpec, RewardBasis, Term};

pub(super) const SPEC: LossSpec = LossSpec {
    name: "sigmoid_norm",
    help: "the sigmoid loss on per-token (length-normalised) log-ratios",
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
        let lc = b.x.chosen_len[i].max(1) as f64;
        let lr = b.x.rejected_len[i].max(1) as f64;
        let z = beta * (b.chosen_score[i] / lc - b.rejected_score[i] / lr);
        let dz = -sigmoid(-z);
        (-log_sigmoid(z), dz * beta * b.chosen_score_d[i] / lc, -dz * beta * b.rejected_score_d[i] / lr)
    })
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::LossType;

    #[test]
    fn value_matches_trl() {
        check_golden(LossType::SigmoidNorm);
    }

    #[test]
    fn gradient_matches_finite_differences() {
        for f in fixtures() {
            check_grad(&[(LossType::SigmoidNorm, 1.0)], &golden_cfg(), &f.pair());
        }
        check_grad(&[(LossType::SigmoidNorm, 1.0)], &golden_cfg(), &synthetic(32, 12, 30.0).pair());
    }
}
