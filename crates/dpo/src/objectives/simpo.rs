//! SimPO, simple preference optimisation (Meng et al. 2024, "SimPO: Simple Preference Optimization with
//! a Reference-Free Reward", Eq. 6): reference-free, the implicit reward is the length-normalised
//! log-prob, and the Bradley-Terry margin must exceed a target `gamma`. With `alphapo_alpha != 0` the
//! reward shape of AlphaPO (Gupta et al. 2025, "AlphaPO: Reward shape matters for LLM alignment").
//!
//! As TRL 1.16's `CPOTrainer` with `loss_type="simpo"` (`trl/experimental/cpo`): with `a_c = pc / L_c`,
//! `a_r = pr / L_r` the average log-probs, the reward `r(a) = a` (or `(1 - exp(-alpha a)) / alpha`, whose
//! derivative is `exp(-alpha a)`), `z = beta * (r(a_c) - r(a_r) - gamma / beta)`, `eps = label_smoothing`:
//!
//! ```text
//! loss = -(1 - eps) * logsigmoid(z) - eps * logsigmoid(-z)
//! d loss / d z = -(1 - eps) * sigmoid(-z) + eps * sigmoid(z)
//! d loss / d policy_chosen   =  d loss / d z * beta * r'(a_c) / L_c
//! d loss / d policy_rejected = -d loss / d z * beta * r'(a_r) / L_r
//! ```
//!
//! This is SimPO proper, TRL's `cpo_alpha=0.0` (what TRL's docs prescribe for SimPO and what `alphapo`
//! sets). CPO-SimPO, TRL's default `cpo_alpha=1.0`, adds the chosen NLL: combine with `sft` weighted by
//! `cpo_alpha` (`--loss simpo,sft --loss-weights 1,1`), which is exactly CPO's `nll_loss`. `beta` and
//! `gamma` default to TRL's `CPOConfig` values (0.1 and 0.5); the SimPO paper uses beta 2 to 2.5.

use super::math::{log_sigmoid, sigmoid};
use super::{Batch, LossConfig, LossSpec, ObjectiveError, RewardBasis, Term};

pub(super) const SPEC: LossSpec = LossSpec {
    name: "simpo",
    help: "SimPO (Meng et al. 2024), reference-free: length-normalised rewards, margin gamma",
    needs_reference: false,
    per_pair: true,
    f_divergence: false,
    label_smoothing: true,
    weighting: false,
    reads_prompt: false,
    rewards: RewardBasis::AlphaPoAverage,
    term,
};

/// `a = sum / len`, or an error naming the loss, side and row when `len` is 0 (TRL would divide by zero).
pub(super) fn averages(b: &Batch, loss: &str) -> Result<(Vec<f64>, Vec<f64>), ObjectiveError> {
    let avg = |sums: &[f64], lens: &[usize], field: &'static str| {
        sums.iter()
            .zip(lens)
            .enumerate()
            .map(|(row, (&s, &l))| {
                if l == 0 {
                    Err(ObjectiveError::ZeroLength { loss: loss.to_string(), field, row })
                } else {
                    Ok(s / l as f64)
                }
            })
            .collect::<Result<Vec<_>, _>>()
    };
    Ok((avg(b.x.policy_chosen, b.x.chosen_len, "chosen")?, avg(b.x.policy_rejected, b.x.rejected_len, "rejected")?))
}

pub(super) fn term(cfg: &LossConfig, b: &Batch) -> Result<Term, ObjectiveError> {
    let (beta, eps, gamma, alpha) = (cfg.beta, cfg.label_smoothing, cfg.simpo_gamma, cfg.alphapo_alpha);
    let (ac, ar) = averages(b, "simpo")?;
    // Reward and its derivative with respect to the average log-prob.
    let reward = |a: f64| {
        if alpha != 0.0 {
            let e = (-alpha * a).exp();
            ((1.0 - e) / alpha, e)
        } else {
            (a, 1.0)
        }
    };
    Ok(b.separable(|i| {
        let ((rc, drc), (rr, drr)) = (reward(ac[i]), reward(ar[i]));
        let z = beta * (rc - rr - gamma / beta);
        let l = -(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z);
        let dz = -(1.0 - eps) * sigmoid(-z) + eps * sigmoid(z);
        let lc = b.x.chosen_len[i] as f64;
        let lr = b.x.rejected_len[i] as f64;
        (l, dz * beta * drc / lc, -dz * beta * drr / lr)
    }))
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::{combined, pair_loss, LossConfig, LossType, PairLogps};

    fn no_ref(x: PairLogps) -> PairLogps {
        PairLogps { ref_chosen: None, ref_rejected: None, ..x }
    }

    /// gpt2 fixture, beta 0.1, gamma 0.5, label_smoothing 0.1, and AlphaPO with alpha 0.25: TRL's
    /// `logits = (pc/Lc - pr/Lr) - gamma/beta`, `-(1-ls) logsigmoid(beta logits) - ls logsigmoid(-beta logits)`.
    #[test]
    fn values_match_reference() {
        let f = &fixtures()[0];
        let got = pair_loss(LossType::Simpo, &golden_cfg(), &no_ref(f.pair())).unwrap().loss;
        assert!(rel_err(got, GPT2_SIMPO) < 1e-12, "{got} vs {GPT2_SIMPO}");
        let cfg = LossConfig { alphapo_alpha: 0.25, ..golden_cfg() };
        let got = pair_loss(LossType::Simpo, &cfg, &no_ref(f.pair())).unwrap().loss;
        assert!(rel_err(got, GPT2_SIMPO_ALPHAPO) < 1e-12, "{got} vs {GPT2_SIMPO_ALPHAPO}");
        // The reference is ignored.
        let with_ref = pair_loss(LossType::Simpo, &golden_cfg(), &f.pair()).unwrap().loss;
        assert_eq!(with_ref, pair_loss(LossType::Simpo, &golden_cfg(), &no_ref(f.pair())).unwrap().loss);
    }

    #[test]
    fn gradient_matches_finite_differences() {
        for f in fixtures() {
            check_grad(&[(LossType::Simpo, 1.0)], &golden_cfg(), &no_ref(f.pair()));
            // CPO-SimPO (cpo_alpha = 1).
            check_grad(&[(LossType::Simpo, 1.0), (LossType::Sft, 1.0)], &golden_cfg(), &no_ref(f.pair()));
        }
        let paper = LossConfig { beta: 2.5, simpo_gamma: 1.4, label_smoothing: 0.0, ..LossConfig::default() };
        let s = synthetic(32, 16, 30.0);
        check_grad(&[(LossType::Simpo, 1.0)], &paper, &no_ref(s.pair()));
        let alphapo = LossConfig { alphapo_alpha: 0.25, ..paper };
        check_grad(&[(LossType::Simpo, 1.0)], &alphapo, &no_ref(s.pair()));
        assert!(combined(&[(LossType::Simpo, 1.0)], &alphapo, &s.pair()).is_ok());
    }

    #[test]
    fn zero_length_is_an_error() {
        let f = &fixtures()[0];
        let mut lr = f.lr.clone();
        lr[3] = 0;
        let x = PairLogps { rejected_len: &lr, ..f.pair() };
        let e = pair_loss(LossType::Simpo, &golden_cfg(), &x).unwrap_err().to_string();
        assert!(e.contains("simpo") && e.contains("rejected") && e.contains("row 3"), "{e}");
    }
}
