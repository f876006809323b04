//! TRL's logged metrics of a batch of pairs.

use serde::{Deserialize, Serialize};

use super::batch::validate_shapes;
use super::{LossConfig, LossType, ObjectiveError, PairLogps};

/// What a loss's reward metrics are computed from, as the TRL trainer of that loss logs them
/// ([`LossSpec::rewards`](super::LossSpec::rewards)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RewardBasis {
    /// `DPOTrainer`: the reward is `beta * (policy - reference)` summed completion log-prob (`beta *
    /// policy` without a reference); `logps/*` are the summed policy log-probs. Also DPO's `ipo` and
    /// `sigmoid_norm`, whose losses normalise by length but whose metrics do not.
    SummedLogRatio,
    /// `ORPOTrainer` (`average_log_prob=True`): the reward is `beta * a`, `a = sum / completion length`
    /// the policy's average log-prob, no reference; `logps/*` are the averages.
    Average,
    /// `CPOTrainer` with `loss_type="simpo"` (`average_log_prob=True`): as [`RewardBasis::Average`], the
    /// reward being `beta * r(a)` with AlphaPO's `r(a) = (1 - exp(-alpha a)) / alpha` when
    /// `alphapo_alpha != 0` (`cpo_loss`'s "transformed rewards").
    AlphaPoAverage,
}

/// The reward metrics of a run's objective, on the basis its losses declare: the first loss in the list
/// that is not [`RewardBasis::SummedLogRatio`] decides (so `simpo,sft`, CPO-SimPO, logs as CPO's simpo);
/// otherwise DPO's [`reward_metrics`]. `dpo train` and `dpo eval` both log these.
pub fn objective_reward_metrics(
    losses: &[(LossType, f64)],
    cfg: &LossConfig,
    x: &PairLogps,
) -> Result<RewardMetrics, ObjectiveError> {
    let basis = losses.iter().map(|(k, _)| k.rewards()).find(|b| *b != RewardBasis::SummedLogRatio);
    let (basis, loss) = match basis {
        None => return reward_metrics(cfg.beta, x),
        Some(b) => (b, losses.iter().find(|(k, _)| k.rewards() == b).map_or("", |(k, _)| k.name())),
    };
    let n = validate_shapes(x)?;
    let avg = |sums: &[f64], lens: &[usize], field: &'static str| {
        (0..n)
            .map(|row| match lens[row] {
                0 => Err(ObjectiveError::ZeroLength { loss: loss.to_string(), field, row }),
                l => Ok(sums[row] / l as f64),
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let ac = avg(x.policy_chosen, x.chosen_len, "chosen")?;
    let ar = avg(x.policy_rejected, x.rejected_len, "rejected")?;
    let alpha = cfg.alphapo_alpha;
    let reward = |a: f64| {
        if basis == RewardBasis::AlphaPoAverage && alpha != 0.0 {
            cfg.beta * (1.0 - (-alpha * a).exp()) / alpha
        } else {
            cfg.beta * a
        }
    };
    Ok(summarise(n, |i| (reward(ac[i]), reward(ar[i]), ac[i], ar[i])))
}

/// Batch means of `(chosen reward, rejected reward, chosen logp, rejected logp)` per row.
fn summarise(n: usize, row: impl Fn(usize) -> (f64, f64, f64, f64)) -> RewardMetrics {
    let nf = n as f64;
    let (mut rc, mut rr, mut acc, mut margin, mut lc, mut lr) = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    for i in 0..n {
        let (c, r, pc, pr) = row(i);
        rc += c;
        rr += r;
        margin += c - r;
        if c > r {
            acc += 1.0;
        }
        lc += pc;
        lr += pr;
    }
    RewardMetrics {
        rewards_chosen: rc / nf,
        rewards_rejected: rr / nf,
        rewards_accuracies: acc / nf,
        rewards_margins: margin / nf,
        logps_chosen: lc / nf,
        logps_rejected: lr / nf,
    }
}

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

impl RewardMetrics {
    /// Each metric under the name TRL logs it with, in that order.
    pub fn named(&self) -> [(&'static str, f64); 6] {
        [
            ("rewards/chosen", self.rewards_chosen),
            ("rewards/rejected", self.rewards_rejected),
            ("rewards/accuracies", self.rewards_accuracies),
            ("rewards/margins", self.rewards_margins),
            ("logps/chosen", self.logps_chosen),
            ("logps/rejected", self.logps_rejected),
        ]
    }
}

/// DPO's reward metrics as `DPOTrainer._compute_loss` logs them ([`RewardBasis::SummedLogRatio`]).
/// Without a reference the rewards are `beta * policy` summed log-probs. For a run's metrics, which follow
/// its losses' [`RewardBasis`], see [`objective_reward_metrics`].
pub fn reward_metrics(beta: f64, x: &PairLogps) -> Result<RewardMetrics, ObjectiveError> {
    let n = validate_shapes(x)?;
    Ok(summarise(n, |i| {
        let c = beta * (x.policy_chosen[i] - x.ref_chosen.map_or(0.0, |r| r[i]));
        let r = beta * (x.policy_rejected[i] - x.ref_rejected.map_or(0.0, |r| r[i]));
        (c, r, x.policy_chosen[i], x.policy_rejected[i])
    }))
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
