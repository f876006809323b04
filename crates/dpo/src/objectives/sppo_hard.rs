//! SPPO with hard labels (Wu et al. 2024, "Self-Play Preference Optimization for Language Model
//! Alignment", Eq. 4.7 with the win probability set to 1 for the chosen and 0 for the rejected
//! completion): squared distance of each log-ratio to `+-1 / (2 beta)`.
//!
//! With the log-ratios `u_c = log pi - log pi_ref` (chosen) and `u_r` (rejected), per row:
//!
//! ```text
//! loss = (u_c - 0.5 / beta)^2 + (u_r + 0.5 / beta)^2
//! d loss / d policy_chosen   = 2 (u_c - 0.5 / beta)
//! d loss / d policy_rejected = 2 (u_r + 0.5 / beta)
//! ```
//!
//! TRL 1.16: `(chosen_logratios - 0.5 / self.beta) ** 2 + (rejected_logratios + 0.5 / self.beta) ** 2`.

use super::{Batch, LossConfig, LossSpec, RewardBasis, Term};

pub(super) const SPEC: LossSpec = LossSpec {
    name: "sppo_hard",
    help: "SPPO (Wu et al. 2024), hard-label version",
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
    let half = 0.5 / cfg.beta;
    b.separable(|i| {
        let (ec, er) = (b.chosen_ratio[i] - half, b.rejected_ratio[i] + half);
        (ec * ec + er * er, 2.0 * ec, 2.0 * er)
    })
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::LossType;

    #[test]
    fn value_matches_trl() {
        check_golden(LossType::SppoHard);
    }

    #[test]
    fn gradient_matches_finite_differences() {
        for f in fixtures() {
            check_grad(&[(LossType::SppoHard, 1.0)], &golden_cfg(), &f.pair());
        }
        check_grad(&[(LossType::SppoHard, 1.0)], &golden_cfg(), &synthetic(32, 10, 30.0).pair());
    }
}
