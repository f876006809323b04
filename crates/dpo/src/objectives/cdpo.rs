//! Conservative DPO (cDPO): the sigmoid loss with label smoothing, for labels flipped with probability
//! `eps` (Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO"; as
//! `preference_loss` in eric-mitchell/direct-preference-optimization and TRL < 1.0's `sigmoid` loss).
//!
//! Not a TRL 1.16 loss name: TRL 1.16's `sigmoid` ignores `label_smoothing`. With `z = beta * (s_c - s_r)`
//! (scores as in [`super::sigmoid`]) and `eps = label_smoothing`, per row:
//!
//! ```text
//! loss = -(1 - eps) * logsigmoid(z) - eps * logsigmoid(-z)
//! d loss / d z = -(1 - eps) * sigmoid(-z) + eps * sigmoid(z)
//! d loss / d policy_chosen   =  beta * s_c' * d loss / d z
//! d loss / d policy_rejected = -beta * s_r' * d loss / d z
//! ```
//!
//! With `eps = 0` it is the sigmoid loss.

use super::math::{log_sigmoid, sigmoid};
use super::{Batch, LossConfig, LossSpec, RewardBasis, Term};

pub(super) const SPEC: LossSpec = LossSpec {
    name: "cdpo",
    help: "conservative DPO: the sigmoid loss with label smoothing",
    needs_reference: true,
    per_pair: true,
    f_divergence: true,
    label_smoothing: true,
    weighting: true,
    reads_prompt: false,
    rewards: RewardBasis::SummedLogRatio,
    term: |cfg, b| Ok(term(cfg, b)),
};

pub(super) fn term(cfg: &LossConfig, b: &Batch) -> Term {
    let (beta, eps) = (cfg.beta, cfg.label_smoothing);
    b.separable(|i| {
        let z = beta * (b.chosen_score[i] - b.rejected_score[i]);
        let l = -(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z);
        let dz = -(1.0 - eps) * sigmoid(-z) + eps * sigmoid(z);
        (l, beta * b.chosen_score_d[i] * dz, -beta * b.rejected_score_d[i] * dz)
    })
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::{pair_loss, LossConfig, LossType};

    /// `mean(-(1 - 0.1) * logsigmoid(0.1 * d) - 0.1 * logsigmoid(-0.1 * d))` on the gpt2 fixture.
    #[test]
    fn value_matches_reference() {
        let got = pair_loss(LossType::Cdpo, &golden_cfg(), &fixtures()[0].pair()).unwrap().loss;
        assert!(rel_err(got, GPT2_CDPO) < 1e-12, "{got} vs {GPT2_CDPO}");
    }

    #[test]
    fn without_smoothing_it_is_dpo() {
        let f = &fixtures()[1];
        let cfg = LossConfig { label_smoothing: 0.0, ..golden_cfg() };
        let a = pair_loss(LossType::Cdpo, &cfg, &f.pair()).unwrap();
        let b = pair_loss(LossType::Sigmoid, &cfg, &f.pair()).unwrap();
        assert!((a.loss - b.loss).abs() < 1e-15);
    }

    #[test]
    fn gradient_matches_finite_differences() {
        for f in fixtures() {
            check_grad(&[(LossType::Cdpo, 1.0)], &golden_cfg(), &f.pair());
        }
        check_grad(&[(LossType::Cdpo, 1.0)], &golden_cfg(), &synthetic(32, 2, 30.0).pair());
    }
}
