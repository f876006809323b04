//! KTO, Kahneman-Tversky optimisation (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect
//! Theoretic Optimization", Eq. 7): unpaired data, each completion labelled desirable or undesirable, its
//! value measured against a reference point `z0`, an estimate of the KL divergence from the reference.
//!
//! As TRL 1.16's `KTOTrainer` (`trl/trainer/kto_trainer.py`). With `r_i = beta * (log pi - log pi_ref)`
//! of row `i`, `w_D`, `w_U` the desirable and undesirable weights, and
//! `z0 = max(0, mean_j(kl_policy_j - kl_reference_j))` over the mismatched (prompt, completion) pairs of
//! the batch, computed without gradient:
//!
//! ```text
//! desirable:    loss_i = w_D * (1 - sigmoid(r_i - beta z0))   d loss / d policy_i = -w_D * beta * sigma'(r_i - beta z0) / n
//! undesirable:  loss_i = w_U * (1 - sigmoid(beta z0 - r_i))   d loss / d policy_i =  w_U * beta * sigma'(beta z0 - r_i) / n
//! loss = mean_i loss_i                                         sigma'(x) = sigmoid(x) (1 - sigmoid(x))
//! ```
//!
//! `apo_zero_unpaired` (D'Oosterlinck et al. 2024) drops `z0`: `w_D (1 - sigmoid(r_i))` for desirable and
//! `w_U sigmoid(r_i)` for undesirable rows.
//!
//! TRL: `kl = (KL_logps - ref_KL_logps).mean().detach()`, `.clamp(min=0)`; `chosen_losses = 1 -
//! F.sigmoid(self.beta * (chosen_logratios - kl))`, `rejected_losses = 1 - F.sigmoid(self.beta * (kl -
//! rejected_logratios))`, weighted and concatenated, `losses.nanmean()`. TRL builds the mismatched pairs
//! by pairing each prompt with the previous row's completion; the engine supplies their log-probs.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::math::sigmoid;
use super::ObjectiveError;

/// TRL's `KTOConfig.loss_type`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KtoLossType {
    #[default]
    Kto,
    ApoZeroUnpaired,
}

impl KtoLossType {
    pub fn name(self) -> &'static str {
        match self {
            KtoLossType::Kto => "kto",
            KtoLossType::ApoZeroUnpaired => "apo_zero_unpaired",
        }
    }
}

impl fmt::Display for KtoLossType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KtoLossType {
    type Err = ObjectiveError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "kto" => Ok(KtoLossType::Kto),
            "apo_zero_unpaired" => Ok(KtoLossType::ApoZeroUnpaired),
            t => Err(ObjectiveError::UnknownLoss { name: t.to_string(), valid: "kto, apo_zero_unpaired".into() }),
        }
    }
}

/// KTO's hyper-parameters; defaults are TRL 1.16's `KTOConfig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KtoConfig {
    pub loss_type: KtoLossType,
    /// 0.1.
    pub beta: f64,
    /// Weight of the desirable rows' losses (1.0).
    pub desirable_weight: f64,
    /// Weight of the undesirable rows' losses (1.0).
    pub undesirable_weight: f64,
}

impl Default for KtoConfig {
    fn default() -> Self {
        KtoConfig { loss_type: KtoLossType::Kto, beta: 0.1, desirable_weight: 1.0, undesirable_weight: 1.0 }
    }
}

/// One batch of unpaired completions.
#[derive(Clone, Copy, Debug, Default)]
pub struct KtoBatch<'a> {
    /// Policy log-prob of each completion (sum over its tokens).
    pub policy: &'a [f64],
    /// Reference log-prob of each completion.
    pub reference: &'a [f64],
    /// Whether each completion is desirable (TRL's `label`).
    pub desirable: &'a [bool],
    /// Policy log-probs of the mismatched (prompt, completion) pairs (no gradient flows through them);
    /// needed by `kto`, ignored by `apo_zero_unpaired`.
    pub kl_policy: Option<&'a [f64]>,
    /// Reference log-probs of the same mismatched pairs.
    pub kl_reference: Option<&'a [f64]>,
}

/// TRL's KTO metrics. The reward and log-prob means are over the desirable (`chosen`) or undesirable
/// (`rejected`) rows, `None` when the batch has none; `rewards_margins` needs both.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct KtoMetrics {
    /// `kl`: the reference point `z0`.
    pub kl: f64,
    pub rewards_chosen: Option<f64>,
    pub rewards_rejected: Option<f64>,
    pub rewards_margins: Option<f64>,
    pub logps_chosen: Option<f64>,
    pub logps_rejected: Option<f64>,
}

/// The KTO loss, its gradient with respect to every policy log-prob, and the metrics.
#[derive(Clone, Debug, PartialEq)]
pub struct KtoOutput {
    pub loss: f64,
    /// `d loss / d policy[i]`.
    pub d_policy: Vec<f64>,
    /// Weighted per-row losses, in row order; their mean is `loss`.
    pub per_row: Vec<f64>,
    pub metrics: KtoMetrics,
}

fn check_len<T>(field: &'static str, v: &[T], n: usize) -> Result<(), ObjectiveError> {
    if v.len() == n {
        Ok(())
    } else {
        Err(ObjectiveError::LengthMismatch { field, got: v.len(), expected: n })
    }
}

/// The reference point: `max(0, mean(kl_policy - kl_reference))`.
fn reference_point(x: &KtoBatch) -> Result<f64, ObjectiveError> {
    let missing = || ObjectiveError::InvalidConfig {
        loss: "kto".into(),
        reason: "needs the log-probs of the mismatched (prompt, completion) pairs (kl_policy, kl_reference)".into(),
    };
    let (p, r) = (x.kl_policy.ok_or_else(missing)?, x.kl_reference.ok_or_else(missing)?);
    if p.is_empty() {
        return Err(missing());
    }
    check_len("kl_reference", r, p.len())?;
    let mean = p.iter().zip(r).map(|(p, r)| p - r).sum::<f64>() / p.len() as f64;
    Ok(mean.max(0.0))
}

/// KTO (or unpaired APO-zero) over the batch `x`.
pub fn kto_loss(cfg: &KtoConfig, x: &KtoBatch) -> Result<KtoOutput, ObjectiveError> {
    let n = x.policy.len();
    if n == 0 {
        return Err(ObjectiveError::EmptyBatch);
    }
    check_len("reference", x.reference, n)?;
    check_len("desirable", x.desirable, n)?;
    let kl = match cfg.loss_type {
        KtoLossType::Kto => reference_point(x)?,
        KtoLossType::ApoZeroUnpaired => 0.0,
    };
    let beta = cfg.beta;
    let mut out = KtoOutput {
        loss: 0.0,
        d_policy: Vec::with_capacity(n),
        per_row: Vec::with_capacity(n),
        metrics: KtoMetrics {
            kl,
            rewards_chosen: None,
            rewards_rejected: None,
            rewards_margins: None,
            logps_chosen: None,
            logps_rejected: None,
        },
    };
    let (mut rc, mut rr, mut lc, mut lr, mut nc, mut nr) = (0.0, 0.0, 0.0, 0.0, 0usize, 0usize);
    for i in 0..n {
        let ratio = x.policy[i] - x.reference[i];
        let reward = beta * ratio;
        // (loss, d loss / d ratio) before weighting
        let (l, d) = match (cfg.loss_type, x.desirable[i]) {
            (KtoLossType::Kto, true) => {
                let s = sigmoid(beta * (ratio - kl));
                (1.0 - s, -beta * s * (1.0 - s))
            }
            (KtoLossType::Kto, false) => {
                let s = sigmoid(beta * (kl - ratio));
                (1.0 - s, beta * s * (1.0 - s))
            }
            (KtoLossType::ApoZeroUnpaired, true) => {
                let s = sigmoid(reward);
                (1.0 - s, -beta * s * (1.0 - s))
            }
            (KtoLossType::ApoZeroUnpaired, false) => {
                let s = sigmoid(reward);
                (s, beta * s * (1.0 - s))
            }
        };
        let w = if x.desirable[i] { cfg.desirable_weight } else { cfg.undesirable_weight };
        out.per_row.push(w * l);
        out.d_policy.push(w * d / n as f64);
        if x.desirable[i] {
            (rc, lc, nc) = (rc + reward, lc + x.policy[i], nc + 1);
        } else {
            (rr, lr, nr) = (rr + reward, lr + x.policy[i], nr + 1);
        }
    }
    out.loss = out.per_row.iter().sum::<f64>() / n as f64;
    let m = &mut out.metrics;
    if nc > 0 {
        (m.rewards_chosen, m.logps_chosen) = (Some(rc / nc as f64), Some(lc / nc as f64));
    }
    if nr > 0 {
        (m.rewards_rejected, m.logps_rejected) = (Some(rr / nr as f64), Some(lr / nr as f64));
    }
    if let (Some(c), Some(r)) = (m.rewards_chosen, m.rewards_rejected) {
        m.rewards_margins = Some(c - r);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    /// The gpt2 fixture unpaired: its 24 chosen completions desirable, its 24 rejected ones undesirable.
    struct Unpaired {
        policy: Vec<f64>,
        reference: Vec<f64>,
        desirable: Vec<bool>,
    }

    fn unpaired() -> Unpaired {
        let f = &fixtures()[0];
        Unpaired {
            policy: f.pc.iter().chain(&f.pr).copied().collect(),
            reference: f.rc.iter().chain(&f.rr).copied().collect(),
            desirable: (0..48).map(|i| i < 24).collect(),
        }
    }

    fn check_grad_kto(cfg: &KtoConfig, x: &KtoBatch) {
        let g = kto_loss(cfg, x).unwrap();
        for i in 0..x.policy.len() {
            let fd = central_diff(
                |v| {
                    let mut p = x.policy.to_vec();
                    p[i] = v;
                    kto_loss(cfg, &KtoBatch { policy: &p, ..*x }).unwrap().loss
                },
                x.policy[i],
                FD_STEP,
            );
            assert_close_grad(&format!("{} d/d policy[{i}]", cfg.loss_type), g.d_policy[i], fd);
        }
    }

    /// Reference point from mismatched pairs whose policy/reference log-probs are the fixture's chosen
    /// reference/policy ones (so that the KL estimate is positive, about 9.98); desirable weight 1,
    /// undesirable weight 1.33. TRL: `1 - sigmoid(beta * (chosen_logratios - kl))`, `1 - sigmoid(beta *
    /// (kl - rejected_logratios))`, weighted, concatenated, mean.
    #[test]
    fn values_match_reference() {
        let f = &fixtures()[0];
        let u = unpaired();
        let cfg = KtoConfig { undesirable_weight: 1.33, ..KtoConfig::default() };
        let x = KtoBatch {
            policy: &u.policy,
            reference: &u.reference,
            desirable: &u.desirable,
            kl_policy: Some(&f.rc),
            kl_reference: Some(&f.pc),
        };
        let out = kto_loss(&cfg, &x).unwrap();
        assert!(rel_err(out.metrics.kl, GPT2_KTO_KL) < 1e-12, "{} vs {GPT2_KTO_KL}", out.metrics.kl);
        assert!(rel_err(out.loss, GPT2_KTO) < 1e-12, "{} vs {GPT2_KTO}", out.loss);
        let apo = KtoConfig { loss_type: KtoLossType::ApoZeroUnpaired, ..cfg };
        let out = kto_loss(&apo, &KtoBatch { kl_policy: None, kl_reference: None, ..x }).unwrap();
        assert!(rel_err(out.loss, GPT2_APO_ZERO_UNPAIRED) < 1e-12, "{} vs {GPT2_APO_ZERO_UNPAIRED}", out.loss);
        // Its metrics are DPO's on the same rows.
        let m = super::super::reward_metrics(0.1, &f.pair()).unwrap();
        assert!((out.metrics.rewards_chosen.unwrap() - m.rewards_chosen).abs() < 1e-12);
        assert!((out.metrics.rewards_margins.unwrap() - m.rewards_margins).abs() < 1e-12);
        assert!((out.metrics.logps_rejected.unwrap() - m.logps_rejected).abs() < 1e-12);
    }

    #[test]
    fn negative_kl_estimate_is_clamped_to_zero() {
        let f = &fixtures()[0];
        let u = unpaired();
        let x = KtoBatch {
            policy: &u.policy,
            reference: &u.reference,
            desirable: &u.desirable,
            kl_policy: Some(&f.pc),
            kl_reference: Some(&f.rc),
        };
        let out = kto_loss(&KtoConfig::default(), &x).unwrap();
        assert_eq!(out.metrics.kl, 0.0);
    }

    #[test]
    fn gradients_match_finite_differences() {
        let f = &fixtures()[0];
        let u = unpaired();
        let x = KtoBatch {
            policy: &u.policy,
            reference: &u.reference,
            desirable: &u.desirable,
            kl_policy: Some(&f.rc),
            kl_reference: Some(&f.pc),
        };
        let cfg = KtoConfig { undesirable_weight: 1.33, ..KtoConfig::default() };
        check_grad_kto(&cfg, &x);
        check_grad_kto(&KtoConfig { loss_type: KtoLossType::ApoZeroUnpaired, ..cfg.clone() }, &x);
        let s = synthetic(32, 18, 30.0);
        let desirable: Vec<bool> = (0..32).map(|i| i % 3 != 0).collect();
        let y = KtoBatch {
            policy: &s.pc,
            reference: &s.rc,
            desirable: &desirable,
            kl_policy: Some(&s.pr),
            kl_reference: Some(&s.rr),
        };
        check_grad_kto(&KtoConfig { beta: 0.5, ..cfg }, &y);
    }

    #[test]
    fn inputs_are_checked() {
        let u = unpaired();
        let x = KtoBatch { policy: &u.policy, reference: &u.reference, desirable: &u.desirable, ..Default::default() };
        let e = kto_loss(&KtoConfig::default(), &x).unwrap_err().to_string();
        assert!(e.contains("kto") && e.contains("kl_policy"), "{e}");
        let y = KtoBatch { desirable: &u.desirable[..3], ..x };
        assert!(matches!(
            kto_loss(&KtoConfig::default(), &y),
            Err(ObjectiveError::LengthMismatch { field: "desirable", .. })
        ));
        assert_eq!("apo_zero_unpaired".parse::<KtoLossType>().unwrap(), KtoLossType::ApoZeroUnpaired);
        assert!("kto2".parse::<KtoLossType>().is_err());
    }
}
