//! IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
//! Eq. 17), with `beta` as the regularisation tau, on per-token log-ratios as TRL computes it.
//!
//! With `L_c`, `L_r` the completion lengths (at least 1), `s_c`, `s_r` the scores (log-ratios under
//! reverse KL, see [`super::FDivergence`]), and `h = s_c / L_c - s_r / L_r - 1 / (2 beta)`, per row:
//!
//! ```text
//! loss = h^2
//! d loss / d policy_chosen   =  2 h * s_c' / L_c
//! d loss / d policy_rejected = -2 h * s_r' / L_r
//! ```
//!
//! TRL 1.16 normalises by the number of completion tokens ("confirmed with the IPO authors"):
//! `chosen_avg_score = chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0)`, ...,
//! `per_sequence_loss = (ipo_delta - 1 / (2 * self.beta)) ** 2`.

use super::{Batch, LossConfig, LossSpec, RewardBasis, Term};

pub(super) const SPEC: LossSpec = LossSpec {
    name: "ipo",
    help: "IPO (Azar et al. 2023) on per-token log-ratios, as TRL: (delta_avg - 1/(2 beta))^2",
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
    let target = 1.0 / (2.0 * cfg.beta);
    b.separable(|i| {
        let lc = b.x.chosen_len[i].max(1) as f64;
        let lr = b.x.rejected_len[i].max(1) as f64;
        let h = b.chosen_score[i] / lc - b.rejected_score[i] / lr - target;
        (h * h, 2.0 * h * b.chosen_score_d[i] / lc, -2.0 * h * b.rejected_score_d[i] / lr)
    })
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::LossType;

    #[test]
    fn value_matches_trl() {
        check_golden(LossType::Ipo);
    }

    #[test]
    fn gradient_matches_finite_differences() {
        for f in fixtures() {
            check_grad(&[(LossType::Ipo, 1.0)], &golden_cfg(), &f.pair());
        }
        check_grad(&[(LossType::Ipo, 1.0)], &golden_cfg(), &synthetic(32, 4, 30.0).pair());
    }

    #[test]
    fn zero_length_counts_as_one_token() {
        let f = &fixtures()[0];
        let mut lc = f.lc.clone();
        lc[0] = 0;
        let x = super::super::PairLogps { chosen_len: &lc, ..f.pair() };
        let g = super::super::pair_loss(LossType::Ipo, &golden_cfg(), &x).unwrap();
        assert!(g.loss.is_finite());
    }
}
