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
//!
//! # The registry
//!
//! Each loss file declares what the rest of the crate needs to know about it in a [`LossSpec`] const
//! (its name, help line, properties and term function), and [`LOSSES`] below lists them. [`LossType`],
//! its names, parsing, serde form, [`LossType::ALL`] and the properties are all read from that list, so
//! adding a loss is one file, its `mod` line and one `registry!` line.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

mod batch;
mod config;
mod error;
pub(crate) mod math;
mod metrics;

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
mod nca_pair;
mod orpo;
mod robust;
mod sft;
mod sigmoid;
mod sigmoid_norm;
mod simpo;
mod sppo_hard;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod testutil;
pub mod unlikelihood;

pub use batch::{check_settings, combined, pair_loss, LossGrad, PairLogps, PromptLogps};
pub(crate) use batch::{Batch, Term};
pub use config::LossConfig;
pub use error::ObjectiveError;
pub use f_divergence::FDivergence;
pub use kto::{kto_loss, KtoBatch, KtoConfig, KtoLossType, KtoMetrics, KtoOutput};
pub use metrics::{gradient_weight, objective_reward_metrics, reward_metrics, RewardBasis, RewardMetrics};

/// A loss type's term: per-row losses and the gradient of their mean, over a validated batch.
pub(crate) type TermFn = fn(&LossConfig, &Batch) -> Result<Term, ObjectiveError>;

/// What a loss file declares about its loss (`pub(super) const SPEC: LossSpec`).
#[derive(Debug)]
pub struct LossSpec {
    /// The name TRL uses (`loss_type`), which `--loss` and config files accept.
    pub name: &'static str,
    /// One line for `--help`: the method, its paper, its formula.
    pub help: &'static str,
    /// Whether the loss compares the policy with a reference. Those that do accept a missing reference only
    /// with [`LossConfig::reference_free`].
    pub needs_reference: bool,
    /// Whether the batch loss is the mean over rows of terms that each read only their own row (so its
    /// gradient may be computed chunk by chunk).
    pub per_pair: bool,
    /// Whether the loss reads the f-divergence scores; the others reject a non-default `f_divergence_type`.
    pub f_divergence: bool,
    /// Whether the loss reads `label_smoothing`; a nonzero value with no such loss is refused
    /// ([`check_settings`]): TRL 1.16's `sigmoid`, for one, ignores it (`cdpo` is the smoothed sigmoid).
    pub label_smoothing: bool,
    /// Whether TRL's WPO weighting (`use_weighting`) may multiply this loss.
    pub weighting: bool,
    /// Whether the term reads the policy log-probs of the prompt tokens ([`PairLogps::prompt`]), which the
    /// trainer then computes (ORPO's NLL covers prompt and chosen completion, as TRL's).
    pub reads_prompt: bool,
    /// What TRL's trainer for this loss computes its reward metrics (`rewards/*`, `logps/*`) from.
    pub rewards: RewardBasis,
    pub(crate) term: TermFn,
}

/// Declares [`LossType`] (one variant per line) and [`LOSSES`] (the variant's spec) in one list, in the
/// same order, so that `LOSSES[kind as usize]` is `kind`'s spec.
macro_rules! registry {
    ($($variant:ident => $spec:path,)*) => {
        /// The loss types, named as TRL 1.16 names them (`DPOConfig.loss_type`), plus `cdpo`, `simpo` and
        /// `orpo`. Each variant's description is its spec's [`help`](LossType::help); the formula, paper and
        /// gradient are in its file's doc comment.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum LossType {
            $($variant,)*
        }

        /// Every pairwise loss's spec, in TRL's order, then the additions.
        pub static LOSSES: &[&LossSpec] = &[$(&$spec,)*];

        impl LossType {
            /// Every loss type, in the registry's order.
            pub const ALL: [LossType; [$(stringify!($variant),)*].len()] = [$(LossType::$variant,)*];
        }
    };
}

registry! {
    Sigmoid => sigmoid::SPEC,
    Hinge => hinge::SPEC,
    Ipo => ipo::SPEC,
    ExoPair => exo_pair::SPEC,
    NcaPair => nca_pair::SPEC,
    Robust => robust::SPEC,
    BcoPair => bco_pair::SPEC,
    SppoHard => sppo_hard::SPEC,
    Aot => aot::SPEC_PAIRED,
    AotUnpaired => aot::SPEC_UNPAIRED,
    ApoZero => apo::SPEC_ZERO,
    ApoDown => apo::SPEC_DOWN,
    Discopop => discopop::SPEC,
    Sft => sft::SPEC,
    SigmoidNorm => sigmoid_norm::SPEC,
    Cdpo => cdpo::SPEC,
    Simpo => simpo::SPEC,
    Orpo => orpo::SPEC,
}

impl LossType {
    /// This loss type's entry in [`LOSSES`].
    pub fn spec(self) -> &'static LossSpec {
        LOSSES[self as usize]
    }

    /// The name TRL uses (`loss_type`).
    pub fn name(self) -> &'static str {
        self.spec().name
    }

    /// One line for `--help`.
    pub fn help(self) -> &'static str {
        self.spec().help
    }

    /// See [`LossSpec::needs_reference`].
    pub fn needs_reference(self) -> bool {
        self.spec().needs_reference
    }

    /// See [`LossSpec::per_pair`].
    pub fn per_pair(self) -> bool {
        self.spec().per_pair
    }

    /// See [`LossSpec::f_divergence`].
    pub fn supports_f_divergence(self) -> bool {
        self.spec().f_divergence
    }

    /// See [`LossSpec::label_smoothing`].
    pub fn reads_label_smoothing(self) -> bool {
        self.spec().label_smoothing
    }

    /// See [`LossSpec::weighting`].
    pub fn supports_weighting(self) -> bool {
        self.spec().weighting
    }

    /// See [`LossSpec::reads_prompt`].
    pub fn reads_prompt(self) -> bool {
        self.spec().reads_prompt
    }

    /// See [`LossSpec::rewards`].
    pub fn rewards(self) -> RewardBasis {
        self.spec().rewards
    }

    /// `(name, help)` of every loss type, in the registry's order: what a command line lists as the
    /// possible values of `--loss`.
    pub fn names_and_help() -> impl Iterator<Item = (&'static str, &'static str)> {
        LOSSES.iter().map(|s| (s.name, s.help))
    }

    fn valid_names() -> String {
        LOSSES.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
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

impl Serialize for LossType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for LossType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
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
