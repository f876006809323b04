//! DPO, the sigmoid loss (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
//! Secretly a Reward Model", Eq. 7).
//!
//! With `s_c`, `s_r` the chosen and rejected scores (the log-ratios `log pi - log pi_ref` under reverse KL,
//! see [`super::FDivergence`]) and `z = beta * (s_c - s_r)`, per row:
//!
//! ```text
//! loss = -logsigmoid(z)
//! d loss / d z = -sigmoid(-z)
//! d loss / d policy_chosen   =  beta * s_c' * d loss / d z
//! d loss / d policy_rejected = -beta * s_r' * d loss / d z
//! ```
//!
//! TRL 1.16: `per_sequence_loss = -F.logsigmoid(self.beta * delta_score)`. Unlike TRL < 1.0, it ignores
//! `label_smoothing`; the smoothed (conservative) form is [`super::LossType::Cdpo`].

use super::math::{log_sigmoid, sigmoid};
use super::{Batch, LossConfig, LossSpec, RewardBasis, Term};

pub(super) const SPEC: LossSpec = LossSpec {
    name: "sigmoid",
    help: "DPO (Rafailov et al. 2023): -logsigmoid(beta * delta)",
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
        let z = beta * (b.chosen_score[i] - b.rejected_score[i]);
        let dz = -sigmoid(-z);
        (-log_sigmoid(z), beta * b.chosen_score_d[i] * dz, -beta * b.rejected_score_d[i] * dz)
    })
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::LossType;

    #[test]
    fn value_matches_trl() {
        check_golden(LossType::Sigmoid);
    }

    #[test]
    fn gradient_matches_finite_differences() {
        for f in fixtures() {
            check_grad(&[(LossType::Sigmoid, 1.0)], &golden_cfg(), &f.pair());
        }
        check_grad(&[(LossType::Sigmoid, 1.0)], &golden_cfg(), &synthetic(32, 1, 30.0).pair());
    }

    /// `grads.json`: the mean sigmoid loss over the first 8 rows, which the engine's gradient test starts from.
    #[test]
    fn first_eight_rows_match_grads_json() {
        for f in fixtures() {
            let path =
                format!("{}/../../tests/fixtures/parity/expected/{}/grads.json", env!("CARGO_MANIFEST_DIR"), f.arch);
            let Ok(text) = std::fs::read_to_string(path) else { continue };
            let want = serde_json::from_str::<serde_json::Value>(&text).unwrap()["loss"].as_f64().unwrap();
            let x = super::super::PairLogps {
                policy_chosen: &f.pc[..8],
                policy_rejected: &f.pr[..8],
                ref_chosen: Some(&f.rc[..8]),
                ref_rejected: Some(&f.rr[..8]),
                chosen_len: &f.lc[..8],
                rejected_len: &f.lr[..8],
                ..Default::default()
            };
            let got = super::super::pair_loss(LossType::Sigmoid, &golden_cfg(), &x).unwrap().loss;
            assert!(rel_err(got, want) < 1e-4, "{}: {got} vs {want}", f.arch);
        }
    }
}
