//! Hyper-parameters of the pairwise losses.

use serde::{Deserialize, Serialize};

use super::FDivergence;

/// Hyper-parameters of the pairwise losses; defaults are TRL 1.16's (`DPOConfig`, and `CPOConfig` /
/// `ORPOConfig` for SimPO / ORPO).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossConfig {
    /// Temperature of the implicit reward (`beta`, 0.1). IPO's tau; ORPO's lambda (`ORPOConfig.beta`).
    pub beta: f64,
    /// Label smoothing (0.0): flip probability for `robust` (in [0, 0.5)), epsilon for `exo_pair` (> 0), and
    /// the smoothing of `cdpo`, `aot`, `aot_unpaired` and `simpo`. TRL 1.16's `sigmoid` ignores it.
    pub label_smoothing: f64,
    /// f-divergence regulariser of f-DPO (`f_divergence_type`, reverse KL).
    pub f_divergence: FDivergence,
    /// alpha of the alpha-divergence (`f_alpha_divergence_coef`, 0.5 in TRL 1.16).
    pub f_alpha_divergence_coef: f64,
    /// Temperature of DiscoPOP's mixing (`discopop_tau`, 0.05).
    pub discopop_tau: f64,
    /// Treat the reference log-probs as 0 (TRL < 1.0's `reference_free`; TRL 1.16 dropped the flag and always
    /// needs a reference for the DPO losses).
    pub reference_free: bool,
    /// SimPO's target reward margin (`CPOConfig.simpo_gamma`, 0.5).
    pub simpo_gamma: f64,
    /// AlphaPO's reward shape for SimPO (`CPOConfig.alpha`, 0.0 = log-prob rewards).
    pub alphapo_alpha: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig {
            beta: 0.1,
            label_smoothing: 0.0,
            f_divergence: FDivergence::ReverseKl,
            f_alpha_divergence_coef: 0.5,
            discopop_tau: 0.05,
            reference_free: false,
            simpo_gamma: 0.5,
            alphapo_alpha: 0.0,
        }
    }
}
