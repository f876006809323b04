//! TRL's logged metrics of a batch of pairs.

use serde::{Deserialize, Serialize};

use super::batch::validate_shapes;
use super::{ObjectiveError, PairLogps};

/// TRL's reward metrics (`rewards/*`, `logps/*`), batch means.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RewardMetrics {
    /// `rewards/chosen`: mean of `beta * (policy - reference)` chosen log-prob.
    pub rewards_chosen: f64,
    /// `rewards/rejected`.
    pub rewards_rejected: f64,
    /// `rewards/accuracies`: share of rows whose chosen reward is larger than the rejected one.
    pub rewards_accuracies: f64,
    /// `rewards/margins`: mean of chosen minus rejected reward.
    pub rewards_margins: f64,
    /// `logps/chosen`: mean policy chosen log-prob.
    pub logps_chosen: f64,
    /// `logps/rejected`.
    pub logps_rejected: f64,
}

/// DPO's reward metrics as `DPOTrainer._compute_loss` logs them. Without a reference the rewards are
/// `beta * policy` log-probs (as CPO and ORPO log them).
pub fn reward_metrics(beta: f64, x: &PairLogps) -> Result<RewardMetrics, ObjectiveError> {
    let n = validate_shapes(x)?;
    let nf = n as f64;
    let (mut rc, mut rr, mut acc, mut margin, mut lc, mut lr) = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    for i in 0..n {
        let c = beta * (x.policy_chosen[i] - x.ref_chosen.map_or(0.0, |r| r[i]));
        let r = beta * (x.policy_rejected[i] - x.ref_rejected.map_or(0.0, |r| r[i]));
        rc += c;
        rr += r;
        margin += c - r;
        if c > r {
            acc += 1.0;
        }
        lc += x.policy_chosen[i];
        lr += x.policy_rejected[i];
    }
    Ok(RewardMetrics {
        rewards_chosen: rc / nf,
        rewards_rejected: rr / nf,
        rewards_accuracies: acc / nf,
        rewards_margins: margin / nf,
        logps_chosen: lc / nf,
        logps_rejected: lr / nf,
    })
}

/// Mean over pairs of sigma(beta * (log-ratio_rejected - log-ratio_chosen)): the weight DPO's gradient
/// puts on each pair (the paper's eq. 7) — large while the implicit reward ranks a pair wrongly, small once
/// it is learned. NaN without a reference.
pub fn gradient_weight(beta: f64, x: &PairLogps) -> f64 {
    let (Some(rc), Some(rr)) = (x.ref_chosen, x.ref_rejected) else { return f64::NAN };
    let n = x.policy_chosen.len().max(1) as f64;
    (0..x.policy_chosen.len())
        .map(|i| {
            let margin = beta * ((x.policy_chosen[i] - rc[i]) - (x.policy_rejected[i] - rr[i]));
            1.0 / (1.0 + margin.exp())
        })
        .sum::<f64>()
        / n
}
