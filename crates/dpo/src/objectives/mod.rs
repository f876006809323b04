//! Preference objectives: pure functions from per-sequence log-probs to a batch loss and its gradient.
//!
//! The engine gives, for every row (one prompt with a chosen and a rejected completion), the summed
//! log-prob of each completion under the policy and optionally under the reference, and the completion
//! lengths. An objective returns the batch loss and `d loss / d (policy sequence log-prob)` for every
//! row; the engine spreads that gradient over the completion tokens (every token of a sum gets the
//! sum's gradient). Nothing here knows about transformers.
//!
//! The formulas are those of TRL 1.16.0 (`trl/trainer/dpo_trainer.py`, `DPOTrainer._compute_loss`;
//! `trl/experimental/cpo/cpo_trainer.py` for SimPO; `trl/experimental/orpo/orpo_trainer.py`;
//! `trl/trainer/kto_trainer.py`), one file per loss, each with its paper, its value and its analytic
//! gradient in the doc comment, and tests of the value against TRL's numbers and of the gradient
//! against finite differences.
//!
//! Several losses combine as TRL combines them (`--loss sigmoid,sft --loss-weights 1.0,0.2`):
//! `loss = sum_k weight_k * mean_rows(loss_k)`; see [`combined`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

mod aot;
mod apo;
mod bco_pair;
mod cdpo;
mod discopop;
mod exo_pair;
mod f_divergence;
mod hinge;
mod ipo;
mod kto;
pub(crate) mod math;
mod nca_pair;
mod orpo;
mod robust;
mod sft;
mod sigmoid;
mod sigmoid_norm;
mod simpo;
mod sppo_hard;
#[cfg(test)]
mod testutil;

pub use f_divergence::FDivergence;
pub use kto::{kto_loss, KtoBatch, KtoConfig, KtoLossType, KtoMetrics, KtoOutput};

/// Errors of the objectives; each names the loss, field or row at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ObjectiveError {
    #[error("unknown loss type `{name}`; valid loss types: {valid}")]
    UnknownLoss { name: String, valid: String },
    #[error("unknown f-divergence `{name}`; valid values: {valid}")]
    UnknownFDivergence { name: String, valid: String },
    #[error("the batch has no rows")]
    EmptyBatch,
    #[error("no loss type given")]
    NoLoss,
    #[error("`{field}` has {got} entries but the batch has {expected} rows")]
    LengthMismatch { field: &'static str, got: usize, expected: usize },
    #[error(
        "loss `{loss}` needs reference log-probs; compute them (reference model or cache) or set \
         `reference_free` to treat them as 0"
    )]
    MissingReference { loss: String },
    #[error("loss `{loss}` divides by the length of the {field} completion, which is 0 tokens in row {row}")]
    ZeroLength { loss: String, field: &'static str, row: usize },
    #[error(
        "f_divergence_type `{f_divergence}` is only supported for the loss types {supported} (as in TRL); \
         `{loss}` needs `reverse_kl`"
    )]
    FDivergenceUnsupported { loss: String, f_divergence: String, supported: String },
    #[error("loss `{loss}`: {reason}")]
    InvalidConfig { loss: String, reason: String },
    #[error("{losses} loss types but {weights} loss weights")]
    WeightCount { losses: usize, weights: usize },
    #[error("loss weight `{text}` is not a number")]
    BadWeight { text: String },
}

/// The loss types, named as TRL 1.16 names them (`DPOConfig.loss_type`), plus `cdpo`, `simpo` and `orpo`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// DPO (Rafailov et al. 2023): `-logsigmoid(beta * delta)`.
    Sigmoid,
    /// Conservative DPO: the sigmoid loss with label smoothing (not a TRL 1.16 name; TRL < 1.0's
    /// `sigmoid` with `label_smoothing`).
    Cdpo,
    /// SLiC (Zhao et al. 2023): `relu(1 - beta * delta)`.
    Hinge,
    /// IPO (Azar et al. 2023), length-normalised as in TRL.
    Ipo,
    /// EXO (Ji et al. 2024), pairwise.
    ExoPair,
    /// NCA (Chen et al. 2024), pairwise.
    NcaPair,
    /// Robust DPO (Chowdhury et al. 2024).
    Robust,
    /// BCO (Jung et al. 2024), pairwise, without the running reward shift.
    BcoPair,
    /// SPPO (Wu et al. 2024), hard-label version.
    SppoHard,
    /// AOT (Melnyk et al. 2024), paired.
    Aot,
    /// AOT (Melnyk et al. 2024), unpaired.
    AotUnpaired,
    /// APO-zero (D'Oosterlinck et al. 2024).
    ApoZero,
    /// APO-down (D'Oosterlinck et al. 2024).
    ApoDown,
    /// DiscoPOP (Chris Lu et al. 2024).
    Discopop,
    /// Negative log-likelihood of the chosen completions, averaged over their tokens.
    Sft,
    /// The sigmoid loss on per-token (length-normalised) log-ratios.
    SigmoidNorm,
    /// SimPO (Meng et al. 2024), reference-free, as TRL's `CPOTrainer` with `loss_type="simpo"`.
    Simpo,
    /// ORPO (Hong et al. 2024), reference-free, as TRL's `ORPOTrainer`.
    Orpo,
}

impl LossType {
    /// Every loss type, in TRL's order, then the additions.
    pub const ALL: [LossType; 18] = [
        LossType::Sigmoid,
        LossType::Hinge,
        LossType::Ipo,
        LossType::ExoPair,
        LossType::NcaPair,
        LossType::Robust,
        LossType::BcoPair,
        LossType::SppoHard,
        LossType::Aot,
        LossType::AotUnpaired,
        LossType::ApoZero,
        LossType::ApoDown,
        LossType::Discopop,
        LossType::Sft,
        LossType::SigmoidNorm,
        LossType::Cdpo,
        LossType::Simpo,
        LossType::Orpo,
    ];

    /// The name TRL uses (`loss_type`).
    pub fn name(self) -> &'static str {
        match self {
            LossType::Sigmoid => "sigmoid",
            LossType::Cdpo => "cdpo",
            LossType::Hinge => "hinge",
            LossType::Ipo => "ipo",
            LossType::ExoPair => "exo_pair",
            LossType::NcaPair => "nca_pair",
            LossType::Robust => "robust",
            LossType::BcoPair => "bco_pair",
            LossType::SppoHard => "sppo_hard",
            LossType::Aot => "aot",
            LossType::AotUnpaired => "aot_unpaired",
            LossType::ApoZero => "apo_zero",
            LossType::ApoDown => "apo_down",
            LossType::Discopop => "discopop",
            LossType::Sft => "sft",
            LossType::SigmoidNorm => "sigmoid_norm",
            LossType::Simpo => "simpo",
            LossType::Orpo => "orpo",
        }
    }

    /// Whether the loss compares the policy with a reference. Those that do accept a missing reference only
    /// with [`LossConfig::reference_free`].
    pub fn needs_reference(self) -> bool {
        !matches!(self, LossType::Sft | LossType::Simpo | LossType::Orpo)
    }

    /// Whether the batch loss is the mean over rows of terms that each read only their own row (so its
    /// gradient may be computed chunk by chunk). Not the AOT losses (they sort the batch), nor `sft` and
    /// `orpo` (their NLL is one mean over all the batch's tokens).
    pub fn per_pair(self) -> bool {
        !matches!(self, LossType::Aot | LossType::AotUnpaired | LossType::Sft | LossType::Orpo)
    }

    /// Whether the loss reads the f-divergence scores (TRL: the losses built on the chosen-rejected score
    /// difference, plus `sft` which ignores them); the others reject a non-default `f_divergence_type`.
    pub fn supports_f_divergence(self) -> bool {
        matches!(
            self,
            LossType::Sigmoid
                | LossType::Cdpo
                | LossType::SigmoidNorm
                | LossType::Hinge
                | LossType::Ipo
                | LossType::ExoPair
                | LossType::Robust
                | LossType::Discopop
                | LossType::Sft
        )
    }

    /// Whether TRL's WPO weighting (`use_weighting`) may multiply this loss: not for the AOT losses, which
    /// sort rows, nor for SimPO and ORPO, whose trainers have no such option.
    pub fn supports_weighting(self) -> bool {
        !matches!(self, LossType::Aot | LossType::AotUnpaired | LossType::Simpo | LossType::Orpo)
    }

    fn valid_names() -> String {
        LossType::ALL.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
    }
}

impl fmt::Display for LossType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LossType {
    type Err = ObjectiveError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        LossType::ALL
            .into_iter()
            .find(|k| k.name() == t)
            .ok_or_else(|| ObjectiveError::UnknownLoss { name: t.to_string(), valid: LossType::valid_names() })
    }
}

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

/// Policy log-probs of the prompt tokens that are predicted (all but the first), per row; only ORPO reads
/// them, because TRL's ORPO takes its NLL term over prompt and chosen completion together.
#[derive(Clone, Copy, Debug, Default)]
pub struct PromptLogps<'a> {
    /// Sum of the policy log-probs of the predicted prompt tokens, one per row.
    pub logps: &'a [f64],
    /// Number of those tokens, one per row.
    pub len: &'a [usize],
}

/// Sequence log-probs of a batch of preference pairs, one entry per row.
#[derive(Clone, Copy, Debug, Default)]
pub struct PairLogps<'a> {
    /// Policy log-prob of the chosen completion (sum over its tokens, EOS included).
    pub policy_chosen: &'a [f64],
    /// Policy log-prob of the rejected completion.
    pub policy_rejected: &'a [f64],
    /// Reference log-prob of the chosen completion; `None` without a reference.
    pub ref_chosen: Option<&'a [f64]>,
    /// Reference log-prob of the rejected completion; `None` without a reference.
    pub ref_rejected: Option<&'a [f64]>,
    /// Number of chosen completion tokens.
    pub chosen_len: &'a [usize],
    /// Number of rejected completion tokens.
    pub rejected_len: &'a [usize],
    /// Prompt log-probs for ORPO's NLL term; without them ORPO's NLL covers the chosen completion only.
    pub prompt: Option<PromptLogps<'a>>,
    /// Detached per-row multipliers of every loss (TRL's `use_weighting`, WPO: the product of the chosen and
    /// rejected length-normalised sequence probabilities, computed by the engine).
    pub weights: Option<&'a [f64]>,
}

/// The batch loss and its gradient.
#[derive(Clone, Debug, PartialEq)]
pub struct LossGrad {
    /// The batch loss (TRL: the weighted sum over loss types of the mean over rows).
    pub loss: f64,
    /// `d loss / d policy_chosen[i]`.
    pub d_policy_chosen: Vec<f64>,
    /// `d loss / d policy_rejected[i]`.
    pub d_policy_rejected: Vec<f64>,
    /// `d loss / d prompt.logps[i]`: one per row when [`PairLogps::prompt`] is given (non-zero only for
    /// `orpo`), else empty.
    pub d_prompt: Vec<f64>,
    /// Per-row losses whose mean is `loss` (for `sft` and ORPO's NLL, the batch value repeated, as TRL
    /// expands it; for `aot`/`aot_unpaired`, indexed by sorted position rather than by row).
    pub per_row: Vec<f64>,
}

/// One loss type's contribution before weighting: per-row losses and the gradient of their mean.
pub(crate) struct Term {
    pub per_row: Vec<f64>,
    pub d_chosen: Vec<f64>,
    pub d_rejected: Vec<f64>,
    pub d_prompt: Option<Vec<f64>>,
}

/// A validated batch with its log-ratios and f-divergence scores computed once for all loss types.
pub(crate) struct Batch<'a> {
    pub n: usize,
    pub x: &'a PairLogps<'a>,
    /// Reference log-probs (0 when reference-free).
    pub ref_chosen: Vec<f64>,
    pub ref_rejected: Vec<f64>,
    /// `policy - reference` per row.
    pub chosen_ratio: Vec<f64>,
    pub rejected_ratio: Vec<f64>,
    /// f-divergence scores of the log-ratios and their derivatives `d score / d ratio`.
    pub chosen_score: Vec<f64>,
    pub chosen_score_d: Vec<f64>,
    pub rejected_score: Vec<f64>,
    pub rejected_score_d: Vec<f64>,
}

impl Batch<'_> {
    /// Builds a term from a loss that is a mean of independent per-row losses: `row(i)` returns
    /// `(l_i, d l_i / d policy_chosen[i], d l_i / d policy_rejected[i])`. Applies the WPO weights and `1/n`.
    pub fn separable(&self, row: impl Fn(usize) -> (f64, f64, f64)) -> Term {
        let n = self.n as f64;
        let mut t = Term {
            per_row: Vec::with_capacity(self.n),
            d_chosen: Vec::with_capacity(self.n),
            d_rejected: Vec::with_capacity(self.n),
            d_prompt: None,
        };
        for i in 0..self.n {
            let w = self.x.weights.map_or(1.0, |w| w[i]);
            let (l, dc, dr) = row(i);
            t.per_row.push(w * l);
            t.d_chosen.push(w * dc / n);
            t.d_rejected.push(w * dr / n);
        }
        t
    }

    /// Mean of the WPO weights (1 without them).
    pub fn mean_weight(&self) -> f64 {
        self.x.weights.map_or(1.0, |w| w.iter().sum::<f64>() / self.n as f64)
    }
}

fn check_len<T>(field: &'static str, v: &[T], n: usize) -> Result<(), ObjectiveError> {
    if v.len() == n {
        Ok(())
    } else {
        Err(ObjectiveError::LengthMismatch { field, got: v.len(), expected: n })
    }
}

fn validate_shapes(x: &PairLogps) -> Result<usize, ObjectiveError> {
    let n = x.policy_chosen.len();
    if n == 0 {
        return Err(ObjectiveError::EmptyBatch);
    }
    check_len("policy_rejected", x.policy_rejected, n)?;
    check_len("chosen_len", x.chosen_len, n)?;
    check_len("rejected_len", x.rejected_len, n)?;
    if let Some(r) = x.ref_chosen {
        check_len("ref_chosen", r, n)?;
    }
    if let Some(r) = x.ref_rejected {
        check_len("ref_rejected", r, n)?;
    }
    if let Some(p) = x.prompt {
        check_len("prompt.logps", p.logps, n)?;
        check_len("prompt.len", p.len, n)?;
    }
    if let Some(w) = x.weights {
        check_len("weights", w, n)?;
    }
    Ok(n)
}

fn prepare<'a>(kinds: &[(LossType, f64)], cfg: &LossConfig, x: &'a PairLogps<'a>) -> Result<Batch<'a>, ObjectiveError> {
    let n = validate_shapes(x)?;
    let has_ref = x.ref_chosen.is_some() && x.ref_rejected.is_some();
    for &(kind, _) in kinds {
        if kind.needs_reference() && !has_ref && !cfg.reference_free {
            return Err(ObjectiveError::MissingReference { loss: kind.to_string() });
        }
        if cfg.f_divergence != FDivergence::ReverseKl && !kind.supports_f_divergence() {
            let supported: Vec<_> =
                LossType::ALL.iter().filter(|k| k.supports_f_divergence()).map(|k| k.name()).collect();
            return Err(ObjectiveError::FDivergenceUnsupported {
                loss: kind.to_string(),
                f_divergence: cfg.f_divergence.to_string(),
                supported: supported.join(", "),
            });
        }
        if x.weights.is_some() && !kind.supports_weighting() {
            return Err(ObjectiveError::InvalidConfig {
                loss: kind.to_string(),
                reason: "per-row weights (use_weighting / WPO) are not supported by this loss".into(),
            });
        }
    }
    let zeros = vec![0.0; n];
    let (ref_chosen, ref_rejected) = match (x.ref_chosen, x.ref_rejected) {
        (Some(c), Some(r)) if !cfg.reference_free => (c.to_vec(), r.to_vec()),
        _ => (zeros.clone(), zeros),
    };
    let chosen_ratio: Vec<f64> = x.policy_chosen.iter().zip(&ref_chosen).map(|(p, r)| p - r).collect();
    let rejected_ratio: Vec<f64> = x.policy_rejected.iter().zip(&ref_rejected).map(|(p, r)| p - r).collect();
    let (chosen_score, chosen_score_d) = cfg.f_divergence.scores(&chosen_ratio, cfg.f_alpha_divergence_coef);
    let (rejected_score, rejected_score_d) = cfg.f_divergence.scores(&rejected_ratio, cfg.f_alpha_divergence_coef);
    Ok(Batch {
        n,
        x,
        ref_chosen,
        ref_rejected,
        chosen_ratio,
        rejected_ratio,
        chosen_score,
        chosen_score_d,
        rejected_score,
        rejected_score_d,
    })
}

fn term(kind: LossType, cfg: &LossConfig, b: &Batch) -> Result<Term, ObjectiveError> {
    match kind {
        LossType::Sigmoid => Ok(sigmoid::term(cfg, b)),
        LossType::Cdpo => Ok(cdpo::term(cfg, b)),
        LossType::Hinge => Ok(hinge::term(cfg, b)),
        LossType::Ipo => Ok(ipo::term(cfg, b)),
        LossType::ExoPair => exo_pair::term(cfg, b),
        LossType::NcaPair => Ok(nca_pair::term(cfg, b)),
        LossType::Robust => robust::term(cfg, b),
        LossType::BcoPair => Ok(bco_pair::term(cfg, b)),
        LossType::SppoHard => Ok(sppo_hard::term(cfg, b)),
        LossType::Aot => Ok(aot::term_paired(cfg, b)),
        LossType::AotUnpaired => Ok(aot::term_unpaired(cfg, b)),
        LossType::ApoZero => Ok(apo::term_zero(cfg, b)),
        LossType::ApoDown => Ok(apo::term_down(cfg, b)),
        LossType::Discopop => discopop::term(cfg, b),
        LossType::Sft => sft::term(b),
        LossType::SigmoidNorm => Ok(sigmoid_norm::term(cfg, b)),
        LossType::Simpo => simpo::term(cfg, b),
        LossType::Orpo => orpo::term(cfg, b),
    }
}

/// The loss `kind` over the batch `x`, and its gradient with respect to the policy log-probs.
pub fn pair_loss(kind: LossType, cfg: &LossConfig, x: &PairLogps) -> Result<LossGrad, ObjectiveError> {
    combined(&[(kind, 1.0)], cfg, x)
}

/// Several losses combined as TRL combines `loss_type=[...]` with `loss_weights=[...]`:
/// `loss = sum_k weight_k * mean_rows(loss_k)`, and the gradient likewise.
pub fn combined(losses: &[(LossType, f64)], cfg: &LossConfig, x: &PairLogps) -> Result<LossGrad, ObjectiveError> {
    if losses.is_empty() {
        return Err(ObjectiveError::NoLoss);
    }
    let b = prepare(losses, cfg, x)?;
    let n = b.n;
    let mut out = LossGrad {
        loss: 0.0,
        d_policy_chosen: vec![0.0; n],
        d_policy_rejected: vec![0.0; n],
        d_prompt: if x.prompt.is_some() { vec![0.0; n] } else { Vec::new() },
        per_row: vec![0.0; n],
    };
    for &(kind, weight) in losses {
        let t = term(kind, cfg, &b)?;
        out.loss += weight * t.per_row.iter().sum::<f64>() / n as f64;
        for i in 0..n {
            out.per_row[i] += weight * t.per_row[i];
            out.d_policy_chosen[i] += weight * t.d_chosen[i];
            out.d_policy_rejected[i] += weight * t.d_rejected[i];
        }
        if let Some(dp) = t.d_prompt {
            for (o, d) in out.d_prompt.iter_mut().zip(dp) {
                *o += weight * d;
            }
        }
    }
    Ok(out)
}

/// Parses `--loss sigmoid,sft --loss-weights 1.0,0.2`: comma-separated TRL loss names and, optionally, as many
/// weights (TRL's default weight is 1.0 for every loss).
pub fn parse_loss_list(types: &str, weights: Option<&str>) -> Result<Vec<(LossType, f64)>, ObjectiveError> {
    let kinds =
        types.split(',').filter(|s| !s.trim().is_empty()).map(LossType::from_str).collect::<Result<Vec<_>, _>>()?;
    if kinds.is_empty() {
        return Err(ObjectiveError::NoLoss);
    }
    let ws = match weights {
        None => vec![1.0; kinds.len()],
        Some(w) => w
            .split(',')
            .map(|s| s.trim().parse::<f64>().map_err(|_| ObjectiveError::BadWeight { text: s.trim().to_string() }))
            .collect::<Result<Vec<_>, _>>()?,
    };
    if ws.len() != kinds.len() {
        return Err(ObjectiveError::WeightCount { losses: kinds.len(), weights: ws.len() });
    }
    Ok(kinds.into_iter().zip(ws).collect())
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

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;

    #[test]
    fn names_round_trip_and_errors_list_valid_ones() {
        for k in LossType::ALL {
            assert_eq!(k.name().parse::<LossType>().unwrap(), k);
            assert_eq!(serde_json::to_string(&k).unwrap(), format!("\"{}\"", k.name()));
        }
        let e = "dpo".parse::<LossType>().unwrap_err().to_string();
        assert!(e.contains("`dpo`") && e.contains("sigmoid") && e.contains("sigmoid_norm"), "{e}");
    }

    #[test]
    fn parse_loss_list_follows_trl() {
        let l = parse_loss_list("sigmoid,sft", Some("1.0, 0.2")).unwrap();
        assert_eq!(l, vec![(LossType::Sigmoid, 1.0), (LossType::Sft, 0.2)]);
        assert_eq!(parse_loss_list("ipo", None).unwrap(), vec![(LossType::Ipo, 1.0)]);
        assert!(matches!(parse_loss_list("sigmoid,sft", Some("1.0")), Err(ObjectiveError::WeightCount { .. })));
        assert!(matches!(parse_loss_list("sigmoid", Some("x")), Err(ObjectiveError::BadWeight { .. })));
        assert!(matches!(parse_loss_list("", None), Err(ObjectiveError::NoLoss)));
    }

    #[test]
    fn combined_is_the_weighted_sum() {
        let f = &fixtures()[0];
        let x = f.pair();
        let cfg = golden_cfg();
        let a = pair_loss(LossType::Sigmoid, &cfg, &x).unwrap();
        let b = pair_loss(LossType::Sft, &cfg, &x).unwrap();
        let c = combined(&[(LossType::Sigmoid, 1.0), (LossType::Sft, 0.2)], &cfg, &x).unwrap();
        assert!((c.loss - (a.loss + 0.2 * b.loss)).abs() < 1e-12);
        for i in 0..x.policy_chosen.len() {
            let want = a.d_policy_chosen[i] + 0.2 * b.d_policy_chosen[i];
            assert!((c.d_policy_chosen[i] - want).abs() < 1e-15);
        }
        let mean = c.per_row.iter().sum::<f64>() / c.per_row.len() as f64;
        assert!((mean - c.loss).abs() < 1e-12);
        check_grad(&[(LossType::Sigmoid, 1.0), (LossType::Sft, 0.2), (LossType::Ipo, 0.5)], &cfg, &x);
    }

    #[test]
    fn reference_is_required_unless_reference_free() {
        let f = &fixtures()[0];
        let mut x = f.pair();
        x.ref_chosen = None;
        x.ref_rejected = None;
        let cfg = golden_cfg();
        let e = pair_loss(LossType::Ipo, &cfg, &x).unwrap_err();
        assert_eq!(e, ObjectiveError::MissingReference { loss: "ipo".into() });
        assert!(e.to_string().contains("`ipo`"));
        assert!(pair_loss(LossType::Sft, &cfg, &x).is_ok());
        assert!(pair_loss(LossType::Simpo, &cfg, &x).is_ok());
        assert!(pair_loss(LossType::Orpo, &cfg, &x).is_ok());
        // reference_free treats the reference as 0, with or without reference log-probs.
        let free = LossConfig { reference_free: true, ..cfg };
        let a = pair_loss(LossType::Sigmoid, &free, &x).unwrap();
        let b = pair_loss(LossType::Sigmoid, &free, &f.pair()).unwrap();
        assert_eq!(a, b);
        let zeros = vec![0.0; f.pc.len()];
        let y = PairLogps { ref_chosen: Some(&zeros), ref_rejected: Some(&zeros), ..f.pair() };
        assert_eq!(pair_loss(LossType::Sigmoid, &golden_cfg(), &y).unwrap(), a);
        check_grad(&[(LossType::Robust, 1.0)], &free, &x);
    }

    #[test]
    fn shapes_are_checked() {
        let f = &fixtures()[0];
        let short = &f.rc[..3];
        let x = PairLogps { ref_chosen: Some(short), ..f.pair() };
        let e = pair_loss(LossType::Sigmoid, &golden_cfg(), &x).unwrap_err();
        assert_eq!(e, ObjectiveError::LengthMismatch { field: "ref_chosen", got: 3, expected: 24 });
        let empty = PairLogps::default();
        assert_eq!(pair_loss(LossType::Sigmoid, &golden_cfg(), &empty).unwrap_err(), ObjectiveError::EmptyBatch);
        assert_eq!(combined(&[], &golden_cfg(), &f.pair()).unwrap_err(), ObjectiveError::NoLoss);
    }

    #[test]
    fn wpo_weights_scale_each_row() {
        let f = &fixtures()[0];
        let w: Vec<f64> = (0..f.pc.len()).map(|i| 0.2 + 0.03 * i as f64).collect();
        let x = PairLogps { weights: Some(&w), ..f.pair() };
        let cfg = golden_cfg();
        for kind in [LossType::Sigmoid, LossType::Ipo, LossType::Sft, LossType::NcaPair] {
            let plain = pair_loss(kind, &cfg, &f.pair()).unwrap();
            let weighted = pair_loss(kind, &cfg, &x).unwrap();
            let want = plain.per_row.iter().zip(&w).map(|(l, w)| l * w).sum::<f64>() / w.len() as f64;
            assert!((weighted.loss - want).abs() < 1e-12 * want.abs().max(1.0), "{kind}");
            check_grad(&[(kind, 1.0)], &cfg, &x);
        }
        let e = pair_loss(LossType::Aot, &cfg, &x).unwrap_err();
        assert!(matches!(e, ObjectiveError::InvalidConfig { .. }), "{e}");
    }

    #[test]
    fn metrics_match_trl() {
        for f in fixtures() {
            let m = reward_metrics(0.1, &f.pair()).unwrap();
            let g = &f.losses["_metrics"];
            for (name, got) in [
                ("rewards/chosen", m.rewards_chosen),
                ("rewards/rejected", m.rewards_rejected),
                ("rewards/accuracies", m.rewards_accuracies),
                ("rewards/margins", m.rewards_margins),
                ("logps/chosen", m.logps_chosen),
                ("logps/rejected", m.logps_rejected),
            ] {
                let want = g[name].as_f64().unwrap();
                let rel = (got - want).abs() / want.abs().max(1e-3);
                assert!(rel < 1e-4, "{} {name}: {got} vs {want}", f.arch);
            }
        }
    }

    /// The losses marked per-pair are means of per-row terms: over a batch split in two, the loss is the
    /// pair-weighted mean of the parts' losses and each row's gradient is its part's, scaled by the part's
    /// share. This is what lets training push a micro-batch through the model a few pairs at a time.
    #[test]
    fn per_pair_losses_split_into_chunks() {
        let f = &fixtures()[0];
        let cfg = golden_cfg();
        let x = f.pair();
        let n = x.policy_chosen.len();
        let cut = 3;
        let part = |r: std::ops::Range<usize>| PairLogps {
            policy_chosen: &x.policy_chosen[r.clone()],
            policy_rejected: &x.policy_rejected[r.clone()],
            ref_chosen: x.ref_chosen.map(|v| &v[r.clone()]),
            ref_rejected: x.ref_rejected.map(|v| &v[r.clone()]),
            chosen_len: &x.chosen_len[r.clone()],
            rejected_len: &x.rejected_len[r],
            ..Default::default()
        };
        let mut split_ok = vec![];
        for kind in LossType::ALL {
            let losses = [(kind, 1.0)];
            let whole = combined(&losses, &cfg, &x).unwrap();
            let (a, b) =
                (combined(&losses, &cfg, &part(0..cut)).unwrap(), combined(&losses, &cfg, &part(cut..n)).unwrap());
            let (sa, sb) = (cut as f64 / n as f64, (n - cut) as f64 / n as f64);
            let close = |u: f64, v: f64| (u - v).abs() <= 1e-12 * u.abs().max(v.abs()).max(1.0);
            let mut ok = close(whole.loss, sa * a.loss + sb * b.loss);
            for i in 0..n {
                let (p, s, j) = if i < cut { (&a, sa, i) } else { (&b, sb, i - cut) };
                ok &= close(whole.d_policy_chosen[i], s * p.d_policy_chosen[j]);
                ok &= close(whole.d_policy_rejected[i], s * p.d_policy_rejected[j]);
            }
            if kind.per_pair() {
                assert!(ok, "{kind} is marked per-pair but does not split");
            }
            split_ok.push((kind, ok));
        }
        // The check has teeth: the batch-coupled losses do not split on this data.
        for (kind, ok) in split_ok {
            if matches!(kind, LossType::Aot | LossType::Sft) {
                assert!(!ok, "{kind} unexpectedly splits");
            }
        }
    }

    #[test]
    fn config_defaults_are_trl_and_serde_round_trips() {
        let c = LossConfig::default();
        assert_eq!((c.beta, c.label_smoothing, c.f_alpha_divergence_coef, c.discopop_tau), (0.1, 0.0, 0.5, 0.05));
        assert_eq!((c.simpo_gamma, c.alphapo_alpha), (0.5, 0.0));
        let s = serde_json::to_string(&c).unwrap();
        assert!(s.contains("\"f_divergence\":\"reverse_kl\""), "{s}");
        let back: LossConfig = serde_json::from_str(&s).unwrap();
        assert_eq!(back, c);
        let partial: LossConfig = serde_json::from_str(r#"{"beta": 0.5, "f_divergence": "js_divergence"}"#).unwrap();
        assert_eq!(partial.f_divergence, FDivergence::JsDivergence);
        assert_eq!(partial.discopop_tau, 0.05);
    }
}
