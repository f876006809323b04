//! Errors of the objectives.

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
    #[error(
        "label_smoothing {value} is read by none of the loss types {losses}: only {readers} read it (TRL 1.16's \
         sigmoid ignores it; cdpo is the smoothed sigmoid)"
    )]
    LabelSmoothingUnused { value: f64, losses: String, readers: String },
    #[error("loss `{loss}`: {reason}")]
    InvalidConfig { loss: String, reason: String },
    #[error("{losses} loss types but {weights} loss weights")]
    WeightCount { losses: usize, weights: usize },
    #[error("loss weight `{text}` is not a number")]
    BadWeight { text: String },
}
