//! EXO, pairwise (Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment",
//! Eq. 16): the reverse KL from the policy's preference distribution to the smoothed label distribution.
//!
//! With `z = beta * (s_c - s_r)` (scores as in [`super::sigmoid`]), `q = sigmoid(z)` and
//! `eps = label_smoothing` (in (0, 1); the paper recommends 1e-3), per row:
//!
//! ```text
//! loss = q * (log q - log(1 - eps)) + (1 - q) * (log(1 - q) - log eps)
//! d loss / d z = q (1 - q) * (z - log(1 - eps) + log eps)      (log q - log(1 - q) = z)
//! d loss / d policy_chosen   =  beta * s_c' * d loss / d z
//! d loss / d policy_rejected = -beta * s_r' * d loss / d z
//! ```
//!
//! TRL 1.16: `qw * (log_qw - log_pw) + ql * (log_ql - log_pl)` with `qw = sigmoid(beta * delta_score)`,
//! `log_pw = log1p(-epsilon)`, `log_pl = log(epsilon)`; TRL refuses `label_smoothing == 0`.

use super::math::{log_sigmoid, sigmoid};
use super::{Batch, LossConfig, LossSpec, ObjectiveError, RewardBasis, Term};

pub(super) const SPEC: LossSpec = LossSpec {
    name: "exo_pair",
    help: "EXO (Ji et al. 2024), pairwise; needs label_smoothing > 0",
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
    if !(eps > 0.0 && eps < 1.0) {
        return Err(ObjectiveError::InvalidConfig {
            loss: "exo_pair".into(),
            reason: format!("label_smoothing must lie in (0, 1), got {eps}; the EXO paper recommends 1e-3"),
        });
    }
    let (log_pw, log_pl) = ((-eps).ln_1p(), eps.ln());
    Ok(b.separable(|i| {
        let z = beta * (b.chosen_score[i] - b.rejected_score[i]);
        let (qw, ql) = (sigmoid(z), sigmoid(-z));
        let l = qw * (log_sigmoid(z) - log_pw) + ql * (log_sigmoid(-z) - log_pl);
        let dz = qw * ql * (z - log_pw + log_pl);
        (l, beta * b.chosen_score_d[i] * dz, -beta * b.rejected_score_d[i] * dz)
    }))
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::{pair_loss, LossConfig, LossType, ObjectiveError};

    #[test]
    fn value_matches_trl() {
        check_golden(LossType::ExoPair);
    }

    #[test]
    fn gradient_matches_finite_differences() {
        for f in fixtures() {
            check_grad(&[(LossType::ExoPair, 1.0)], &golden_cfg(), &f.pair());
        }
        let cfg = LossConfig { label_smoothing: 1e-3, ..golden_cfg() };
        check_grad(&[(LossType::ExoPair, 1.0)], &cfg, &synthetic(32, 5, 30.0).pair());
    }

    #[test]
    fn needs_label_smoothing() {
        let cfg = LossConfig { label_smoothing: 0.0, ..golden_cfg() };
        let e = pair_loss(LossType::ExoPair, &cfg, &fixtures()[0].pair()).unwrap_err();
        assert!(matches!(e, ObjectiveError::InvalidConfig { .. }) && e.to_string().contains("exo_pair"), "{e}");
    }
}
