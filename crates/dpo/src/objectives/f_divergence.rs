//! f-DPO: the reverse-KL regulariser of DPO replaced by another f-divergence (Wang et al. 2023, "Beyond
//! Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence Constraints").
//!
//! With `u = log(pi / pi_ref)` the log-ratio of a completion, the implicit reward is `beta * f'(e^u)` instead
//! of `beta * u`. TRL 1.16 (`f_divergence_type`) computes these scores, which the losses built on the
//! chosen-rejected score difference (`sigmoid`, `sigmoid_norm`, `hinge`, `ipo`, `exo_pair`, `robust`,
//! `discopop`; `sft` ignores them) read in place of the log-ratios:
//!
//! | `f_divergence_type` | score `s(u)` | `ds/du` |
//! | --- | --- | --- |
//! | `reverse_kl` (DPO) | `u` | `1` |
//! | `forward_kl` | `1 - exp(-u)` | `exp(-u)` |
//! | `js_divergence` | `log 2 + logsigmoid(u)` | `sigmoid(-u)` |
//! | `alpha_divergence` | `(exp(t) - 1) / (alpha - 1)`, `t = min((alpha - 1) u, 80)` | `exp(t)`, 0 where clamped |
//!
//! `alpha_divergence` with `|alpha - 1| < 1e-6` is `reverse_kl` (the limit). The clamp at 80 is TRL's for
//! f32 log-probs, kept so that the numbers match a TRL run in f32.
//!
//! TRL 1.16 differs from older TRL (for example the 1.10 development snapshot), which dropped the constants
//! (`-exp(-u)`, `logsigmoid(u)`, `exp(t) / (alpha - 1)`); the constants cancel in the score difference, so the
//! losses are unchanged, but the 1.16 scores are 0 at `u = 0` as the reverse-KL ones are.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::math::{log_sigmoid, sigmoid};
use super::ObjectiveError;

/// The f-divergence of f-DPO (TRL's `f_divergence_type`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FDivergence {
    /// Standard DPO.
    #[default]
    ReverseKl,
    ForwardKl,
    JsDivergence,
    /// With [`super::LossConfig::f_alpha_divergence_coef`] as alpha.
    AlphaDivergence,
}

/// TRL's clamp of `(alpha - 1) * u` before `exp`, for f32.
const ALPHA_CLAMP_MAX: f64 = 80.0;

impl FDivergence {
    pub const ALL: [FDivergence; 4] =
        [FDivergence::ReverseKl, FDivergence::ForwardKl, FDivergence::JsDivergence, FDivergence::AlphaDivergence];

    /// TRL's name.
    pub fn name(self) -> &'static str {
        match self {
            FDivergence::ReverseKl => "reverse_kl",
            FDivergence::ForwardKl => "forward_kl",
            FDivergence::JsDivergence => "js_divergence",
            FDivergence::AlphaDivergence => "alpha_divergence",
        }
    }

    /// The score `s(u)` of each log-ratio `u` and its derivative `ds/du`.
    pub(crate) fn scores(self, ratios: &[f64], alpha: f64) -> (Vec<f64>, Vec<f64>) {
        ratios.iter().map(|&u| self.score(u, alpha)).unzip()
    }

    fn score(self, u: f64, alpha: f64) -> (f64, f64) {
        match self {
            FDivergence::ReverseKl => (u, 1.0),
            FDivergence::ForwardKl => {
                let e = (-u).exp();
                (1.0 - e, e)
            }
            FDivergence::JsDivergence => (std::f64::consts::LN_2 + log_sigmoid(u), sigmoid(-u)),
            FDivergence::AlphaDivergence => {
                if (alpha - 1.0).abs() < 1e-6 {
                    return (u, 1.0);
                }
                let t = (alpha - 1.0) * u;
                let (tc, dt) = if t > ALPHA_CLAMP_MAX { (ALPHA_CLAMP_MAX, 0.0) } else { (t, 1.0) };
                let e = tc.exp();
                // d/du [(exp(t) - 1) / (alpha - 1)] = exp(t) * dt/du / (alpha - 1) = exp(t)
                ((e - 1.0) / (alpha - 1.0), e * dt)
            }
        }
    }
}

impl fmt::Display for FDivergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FDivergence {
    type Err = ObjectiveError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        FDivergence::ALL.into_iter().find(|k| k.name() == t).ok_or_else(|| ObjectiveError::UnknownFDivergence {
            name: t.to_string(),
            valid: FDivergence::ALL.iter().map(|k| k.name()).collect::<Vec<_>>().join(", "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::{pair_loss, LossConfig, LossType, ObjectiveError};
    use super::*;

    fn cfg(f: FDivergence, alpha: f64) -> LossConfig {
        LossConfig { f_divergence: f, f_alpha_divergence_coef: alpha, ..golden_cfg() }
    }

    /// Sigmoid loss on the gpt2 fixture under each f-divergence. Computed in f64 by transcribing TRL 1.16's
    /// lines into Python (`math` only), see the script at the end of `testutil.rs`:
    /// `cs = 1 - exp(-cl)` / `log(2) + logsigmoid(cl)` / `(exp(min((a-1)*cl, 80)) - 1) / (a-1)`, then
    /// `mean(-logsigmoid(beta * (cs - rs)))`.
    #[test]
    fn sigmoid_values_match_trl_formulas() {
        let f = &fixtures()[0];
        for (div, alpha, want) in [
            (FDivergence::ForwardKl, 0.5, GPT2_SIGMOID_FORWARD_KL),
            (FDivergence::JsDivergence, 0.5, GPT2_SIGMOID_JS),
            (FDivergence::AlphaDivergence, 0.5, GPT2_SIGMOID_ALPHA_05),
            (FDivergence::AlphaDivergence, 1.5, GPT2_SIGMOID_ALPHA_15),
        ] {
            let got = pair_loss(LossType::Sigmoid, &cfg(div, alpha), &f.pair()).unwrap().loss;
            assert!(rel_err(got, want) < 1e-10, "{div} {alpha}: {got} vs {want}");
        }
        // alpha -> 1 is reverse KL.
        let a = pair_loss(LossType::Sigmoid, &cfg(FDivergence::AlphaDivergence, 1.0), &f.pair()).unwrap();
        let b = pair_loss(LossType::Sigmoid, &golden_cfg(), &f.pair()).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn gradients_match_finite_differences() {
        let divs = [
            (FDivergence::ForwardKl, 0.5),
            (FDivergence::JsDivergence, 0.5),
            (FDivergence::AlphaDivergence, 0.5),
            (FDivergence::AlphaDivergence, 1.5),
        ];
        // Small log-ratios so that exp(-u) and exp((alpha-1) u) stay moderate.
        let s = synthetic(16, 7, 3.0);
        for (div, alpha) in divs {
            for kind in LossType::ALL.into_iter().filter(|k| k.supports_f_divergence()) {
                check_grad(&[(kind, 1.0)], &cfg(div, alpha), &s.pair());
            }
        }
    }

    #[test]
    fn unsupported_losses_are_rejected() {
        let f = &fixtures()[0];
        let e = pair_loss(LossType::NcaPair, &cfg(FDivergence::JsDivergence, 0.5), &f.pair()).unwrap_err();
        assert!(matches!(e, ObjectiveError::FDivergenceUnsupported { .. }));
        assert!(e.to_string().contains("nca_pair") && e.to_string().contains("js_divergence"), "{e}");
        assert_eq!("forward_kl".parse::<FDivergence>().unwrap(), FDivergence::ForwardKl);
        assert!("kl".parse::<FDivergence>().unwrap_err().to_string().contains("alpha_divergence"));
    }

    #[test]
    fn alpha_clamp_stops_the_gradient() {
        let (s, d) = FDivergence::AlphaDivergence.score(-200.0, 0.5);
        assert_eq!(d, 0.0);
        assert_eq!(s, (80f64.exp() - 1.0) / -0.5);
    }
}
