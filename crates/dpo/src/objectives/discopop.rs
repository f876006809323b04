//! DiscoPOP, the log-ratio modulated loss found by LLM-driven objective discovery (Chris Lu et al. 2024,
//! "Discovering Preference Optimization Algorithms with and for Large Language Models", Eq. 5): a blend
//! of the logistic (DPO) and exponential losses, mixed by the sign and size of the margin.
//!
//! With `z = beta * (s_c - s_r)` (scores as in [`super::sigmoid`]), `tau = discopop_tau` (0.05) and
//! `m = sigmoid(z / tau)`, per row:
//!
//! ```text
//! loss = -logsigmoid(z) * (1 - m) + exp(-z) * m
//! d loss / d z = -sigmoid(-z) (1 - m) - exp(-z) m + (exp(-z) + logsigmoid(z)) * m (1 - m) / tau
//! d loss / d policy_chosen   =  beta * s_c' * d loss / d z
//! d loss / d policy_rejected = -beta * s_r' * d loss / d z
//! ```
//!
//! TRL 1.16: `logits = delta_score * beta`, `m = sigmoid(logits / discopop_tau)`,
//! `-F.logsigmoid(logits) * (1 - m) + torch.exp(-logits) * m`.

use super::math::{log_sigmoid, sigmoid};
use super::{Batch, LossConfig, LossSpec, ObjectiveError, RewardBasis, Term};

pub(super) const SPEC: LossSpec = LossSpec {
    name: "discopop",
    help: "DiscoPOP (Chris Lu et al. 2024): log-ratio modulated sigmoid/exp mix",
    needs_reference: true,
    per_pair: true,
    f_divergence: true,
    label_smoothing: false,
    weighting: true,
    reads_prompt: false,
    rewards: RewardBasis::SummedLogRatio,
    term,
};

pub(super) fn term(cfg: &LossConfig, b: &Batch) -> Result<Term, ObjectiveError> {
    let (beta, tau) = (cfg.beta, cfg.discopop_tau);
    if tau.is_nan() || tau <= 0.0 {
        return Err(ObjectiveError::InvalidConfig {
            loss: "discopop".into(),
            reason: format!("discopop_tau must be positive, got {tau}"),
        });
    }
    Ok(b.separable(|i| {
        let z = beta * (b.chosen_score[i] - b.rejected_score[i]);
        let m = sigmoid(z / tau);
        let logistic = -log_sigmoid(z);
        let exp = (-z).exp();
        let l = logistic * (1.0 - m) + exp * m;
        let dm = m * (1.0 - m) / tau;
        let dz = -sigmoid(-z) * (1.0 - m) - exp * m + (exp - logistic) * dm;
        (l, beta * b.chosen_score_d[i] * dz, -beta * b.rejected_score_d[i] * dz)
    }))
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::{pair_loss, LossConfig, LossType};

    /// `mean(-logsigmoid(z) * (1 - m) + exp(-z) * m)`, `z = 0.1 * d`, `m = sigmoid(z / 0.05)`, gpt2 fixture.
    #[test]
    fn value_matches_reference() {
        let got = pair_loss(LossType::Discopop, &golden_cfg(), &fixtures()[0].pair()).unwrap().loss;
        assert!(rel_err(got, GPT2_DISCOPOP) < 1e-12, "{got} vs {GPT2_DISCOPOP}");
    }

    #[test]
    fn gradient_matches_finite_differences() {
        for f in fixtures() {
            check_grad(&[(LossType::Discopop, 1.0)], &golden_cfg(), &f.pair());
        }
        check_grad(&[(LossType::Discopop, 1.0)], &golden_cfg(), &synthetic(32, 13, 5.0).pair());
        let cfg = LossConfig { discopop_tau: 0.5, ..golden_cfg() };
        check_grad(&[(LossType::Discopop, 1.0)], &cfg, &synthetic(32, 14, 30.0).pair());
    }
}
