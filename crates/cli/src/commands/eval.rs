//! `dpo eval`: the objective and TRL's reward metrics of a model on a preference file, averaged over rows.

use std::path::PathBuf;

use anyhow::{bail, Context};
use dpo::data::Packing;
use dpo::objectives::parse_loss_list;
use dpo::train::reference::pair_tokens;
use dpo::train::{evaluate_counting, PairObjective, PairWorkload, Reference, Workspace};
use engine::Decoder;

use super::train::ObjectiveFlags;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The model to evaluate (Hugging Face directory).
    #[arg(long, value_parser = super::source::model_arg)]
    model: PathBuf,
    #[command(flatten)]
    adapter: super::adapter::AdapterFlag,
    #[command(flatten)]
    stored_base: super::adapter::StoredBaseFlags,
    /// With --adapter and no --ref-model: the reference is --model with this PEFT adapter (the adapter a
    /// `dpo train --adapter` run started from, its frozen reference) instead of with no adapter.
    #[arg(long, value_parser = super::source::model_arg, value_name = "DIR", requires = "adapter", conflicts_with = "ref_model")]
    ref_adapter: Option<PathBuf>,
    /// Reference model; required by losses that compare with a reference (all but simpo, orpo, sft), except
    /// with --adapter, where it defaults to --model with the adapter off (a new adapter's reference).
    #[arg(long, value_parser = super::source::model_arg)]
    ref_model: Option<PathBuf>,
    /// Preference rows (JSONL, JSON or Parquet).
    #[arg(long)]
    data: PathBuf,
    /// Write the JSON object here (atomically) instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Pairs per forward pass.
    #[arg(long, default_value_t = 8, value_parser = super::at_least_one)]
    batch_size: usize,
    #[command(flatten)]
    truncation: super::logps::TruncationFlags,
    #[command(flatten)]
    objective: ObjectiveFlags,
    #[command(flatten)]
    precision: super::precision::PrecisionFlag,
}

/// `--ref-adapter DIR`, read for `model`.
pub(super) fn ref_adapter(
    dir: &Option<PathBuf>,
    base: &super::adapter::BaseToRead,
) -> anyhow::Result<Option<engine::Adapter>> {
    let flag = super::adapter::AdapterFlag { adapter: dir.clone() };
    flag.load(&base.config, &base.dir).context("--ref-adapter")
}

/// The scale of the implicit reward: a positive, finite number (NaN or infinity would print `null` or
/// infinities as if they were results; zero or less turns the objective around or off).
pub(super) fn check_beta(beta: f64) -> anyhow::Result<()> {
    if !(beta > 0.0 && beta.is_finite()) {
        bail!("--beta must be a finite number > 0, got {beta}");
    }
    Ok(())
}

pub fn run(a: Args) -> anyhow::Result<()> {
    // Settings first: a bad one stops the command before any model is read.
    let mut cfg = dpo::objectives::LossConfig::default();
    a.objective.apply(&mut cfg)?;
    check_beta(cfg.beta)?;
    let objective = PairObjective {
        losses: parse_loss_list(a.objective.loss.as_deref().unwrap_or("sigmoid"), a.objective.loss_weights.as_deref())?,
        cfg,
    };
    dpo::objectives::check_settings(&objective.losses, &objective.cfg)?;
    let precision = a.precision.get();
    let base = a.stored_base.prepare(&a.model, &a.adapter, precision)?;
    let adapter = a.adapter.load(&base.config, &a.model)?;
    let tok = hf::load_tokenizer_if_present(&a.model)?;
    let reference = match &a.ref_model {
        Some(dir) => Reference::load(dir, &base.config, tok.as_ref(), precision)?,
        None if objective.reference_free() => Reference::None,
        None if adapter.is_some() => Reference::PolicyBase(ref_adapter(&a.ref_adapter, &base)?),
        None => bail!(
            "--ref-model is required for {} (or pass --reference-free)",
            a.objective.loss.as_deref().unwrap_or("sigmoid")
        ),
    };
    let mut models = vec![&base.config.decoder];
    models.extend(reference.model().map(|m| &m.decoder.cfg));
    let examples = a.truncation.load_pairs(&a.data, tok.as_ref(), &models)?;
    let decoder = Decoder::new(base.config.decoder.clone());
    let base = base.read(|| pair_tokens(examples.iter()))?;
    let mut ws = Workspace::default();
    let workload = PairWorkload {
        examples: &examples,
        reference: &reference,
        objective: &objective,
        packing: Packing::SharedPrompt,
        micro_pairs: 0,
    };
    let policy = base.view(adapter.as_ref());
    let mut progress = super::progress::Progress::new().per_step(1, "pairs");
    let rows = examples.len();
    let metrics =
        evaluate_counting(&decoder, policy, &workload, a.batch_size, &mut ws, &mut |done| progress.count(done, rows));
    progress.finish();
    let metrics = metrics.with_context(|| format!("evaluating {}", a.data.display()))?;
    let mut obj = serde_json::Map::new();
    obj.insert("rows".into(), examples.len().into());
    obj.extend(metrics.into_iter().map(|(k, v)| (k, v.into())));
    let text = serde_json::Value::Object(obj).to_string() + "\n";
    super::emit(a.out.as_deref(), &text)
}
