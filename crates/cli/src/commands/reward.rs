//! `dpo reward`: the implicit reward beta*log(pi/ref) of every completion, one JSON line per row — the
//! paper's "your language model is secretly a reward model", usable on its own.

use std::path::PathBuf;

use anyhow::{bail, Context};
use dpo::data::Packing;
use dpo::scoring::score_pairs;
use dpo::train::reference::pair_tokens;
use dpo::train::Reference;
use engine::model::Model;
use engine::Decoder;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The policy (a DPO-trained model).
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
    /// The reference it was trained against [required, except with --adapter: then --model with the adapter
    /// off, the reference of a new adapter].
    #[arg(long, value_parser = super::source::model_arg)]
    ref_model: Option<PathBuf>,
    /// Preference rows (JSONL, JSON or Parquet); each row's chosen and rejected completions are scored.
    #[arg(long)]
    data: PathBuf,
    /// Scale of the reward, the beta the policy was trained with.
    #[arg(long, default_value_t = 0.1)]
    beta: f64,
    /// Pairs per forward pass.
    #[arg(long, default_value_t = 8, value_parser = super::at_least_one)]
    batch_size: usize,
    /// Write the JSON lines here (atomically) instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    truncation: super::logps::TruncationFlags,
    #[command(flatten)]
    precision: super::precision::PrecisionFlag,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    super::eval::check_beta(a.beta)?;
    let precision = a.precision.get();
    let base = a.stored_base.prepare(&a.model, &a.adapter, precision)?;
    let adapter = a.adapter.load(&base.config, &a.model)?;
    let tok = hf::load_tokenizer_if_present(&a.model)?;
    let decoder = Decoder::new(base.config.decoder.clone());
    let (reference, ref_name) = match (&a.ref_model, &adapter) {
        (Some(dir), _) => (Reference::load(dir, &base.config, tok.as_ref(), precision)?, dir.display().to_string()),
        (None, Some(_)) => match super::eval::ref_adapter(&a.ref_adapter, &base)? {
            Some(r) => (Reference::PolicyBase(Some(r)), format!("{} with --ref-adapter", a.model.display())),
            None => (Reference::PolicyBase(None), format!("{} (adapter off)", a.model.display())),
        },
        (None, None) => bail!("--ref-model is required (the reference the policy was trained against)"),
    };
    let mut models = vec![&base.config.decoder];
    models.extend(reference.model().map(|m| &m.decoder.cfg));
    let examples = a.truncation.load_pairs(&a.data, tok.as_ref(), &models)?;
    let base = base.read(|| pair_tokens(examples.iter()))?;
    let policy_model = base.view(adapter.as_ref());
    let Some((ref_decoder, ref_model)) = reference.frozen((&decoder, policy_model)) else {
        bail!("{ref_name} gave no reference model");
    };
    let score = |decoder: &Decoder, model: Model, name: &str| {
        score_pairs(decoder, model, &examples, Packing::SharedPrompt, a.batch_size, |_| {})
            .with_context(|| format!("scoring {} with {name}", a.data.display()))
    };
    let p = score(&decoder, policy_model, &a.model.display().to_string())?;
    let r = score(ref_decoder, ref_model, &ref_name)?;
    let mut text = String::new();
    for (p, r) in p.iter().zip(&r) {
        let (c, j) = (a.beta * (p.chosen_logps - r.chosen_logps), a.beta * (p.rejected_logps - r.rejected_logps));
        let line = serde_json::json!({
            "chosen_reward": c,
            "rejected_reward": j,
            "margin": c - j,
            "chosen_preferred": c > j,
            "chosen_logps": p.chosen_logps,
            "rejected_logps": p.rejected_logps,
            "ref_chosen_logps": r.chosen_logps,
            "ref_rejected_logps": r.rejected_logps,
            "chosen_len": p.chosen_len,
            "rejected_len": p.rejected_len,
        });
        text.push_str(&line.to_string());
        text.push('\n');
    }
    super::emit(a.out.as_deref(), &text)
}
