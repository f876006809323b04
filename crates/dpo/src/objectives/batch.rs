//! A batch of preference pairs (the objectives' input), its validation, and the weighted sum of loss terms
//! (the objectives' output).

use super::{FDivergence, LossConfig, LossType, ObjectiveError};

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
    /// `dpo train` fills them when a loss [reads the prompt](super::LossSpec::reads_prompt).
    pub prompt: Option<PromptLogps<'a>>,
    /// Detached per-row multipliers of every loss (TRL's `use_weighting`, WPO: the product of the chosen and
    /// rejected length-normalised sequence probabilities). `dpo train` does not set them yet: TRL's weights
    /// read `logsumexp(2 log p)` over the vocabulary at every target, which the engine's head does not return.
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

pub(super) fn validate_shapes(x: &PairLogps) -> Result<usize, ObjectiveError> {
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

/// Refuses an f-divergence other than reverse KL when one of `kinds` has none, as TRL does.
fn check_f_divergence(kinds: &[(LossType, f64)], cfg: &LossConfig) -> Result<(), ObjectiveError> {
    if cfg.f_divergence == FDivergence::ReverseKl {
        return Ok(());
    }
    match kinds.iter().find(|(k, _)| !k.supports_f_divergence()) {
        None => Ok(()),
        Some(&(kind, _)) => Err(ObjectiveError::FDivergenceUnsupported {
            loss: kind.to_string(),
            f_divergence: cfg.f_divergence.to_string(),
            supported: names_where(LossType::supports_f_divergence),
        }),
    }
}

/// What a command checks before it runs the loss types `kinds`: [`check_f_divergence`], and a nonzero
/// `label_smoothing` that none of them reads, refused as a setting that would change nothing. (The loss
/// itself, like TRL's, ignores a `label_smoothing` its type does not read.)
pub fn check_settings(kinds: &[(LossType, f64)], cfg: &LossConfig) -> Result<(), ObjectiveError> {
    check_f_divergence(kinds, cfg)?;
    if cfg.label_smoothing != 0.0 && !kinds.iter().any(|(k, _)| k.reads_label_smoothing()) {
        return Err(ObjectiveError::LabelSmoothingUnused {
            value: cfg.label_smoothing,
            losses: kinds.iter().map(|(k, _)| k.name()).collect::<Vec<_>>().join(", "),
            readers: names_where(LossType::reads_label_smoothing),
        });
    }
    Ok(())
}

/// The names of the loss types with property `f`, comma-separated.
fn names_where(f: fn(LossType) -> bool) -> String {
    LossType::ALL.into_iter().filter(|&k| f(k)).map(|k| k.name()).collect::<Vec<_>>().join(", ")
}

/// Validates the batch against every requested loss's spec, and computes the log-ratios and f-divergence
/// scores once for all of them.
pub(super) fn prepare<'a>(
    kinds: &[(LossType, f64)],
    cfg: &LossConfig,
    x: &'a PairLogps<'a>,
) -> Result<Batch<'a>, ObjectiveError> {
    let n = validate_shapes(x)?;
    check_f_divergence(kinds, cfg)?;
    let has_ref = x.ref_chosen.is_some() && x.ref_rejected.is_some();
    for &(kind, _) in kinds {
        if kind.needs_reference() && !has_ref && !cfg.reference_free {
            return Err(ObjectiveError::MissingReference { loss: kind.to_string() });
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
        let t = (kind.spec().term)(cfg, &b)?;
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
