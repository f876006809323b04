//! The paper's Unlikelihood baseline (Welleck et al. 2019, "Neural text generation with unlikelihood
//! training"), as a small SFT-style loop on the preference pairs. The objective, with the three departures
//! from the bare formula that keep it from wrecking the model, is [`dpo::objectives::unlikelihood`].

use std::io::Write;
use std::path::Path;

use engine::optim::{clip_grad_norm, lr_at, Optimizer, OptimizerConfig, ScheduleKind};
use engine::{Activations, Decoder, Params};

use super::plan::Steps;
use super::DemoError;
use dpo::data::pack::pack_sequences;
use dpo::data::Example;
use dpo::objectives::unlikelihood::{rejected_roles, unlikelihood_loss, Role};
use dpo::train::epoch_order;

const MAX_GRAD_NORM: f64 = 1.0;

/// Trains from `start` on the pairs; writes `out/metrics.jsonl` and a model directory per evaluation
/// point (`out/checkpoints/step-N/model`), and returns those points' weights.
#[allow(clippy::too_many_arguments)]
pub fn train_unlikelihood(
    decoder: &Decoder,
    model_cfg: &hf::ModelConfig,
    source_dir: &Path,
    start: &Params,
    pairs: &[Example],
    plan: &Steps,
    alpha: f64,
    eos_ids: &[u32],
    seed: u64,
    out: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<Vec<(u64, Params)>, DemoError> {
    std::fs::create_dir_all(out).map_err(|e| DemoError::io(out, e))?;
    let metrics_path = out.join("metrics.jsonl");
    let mut metrics = std::fs::File::create(&metrics_path).map_err(|e| DemoError::io(&metrics_path, e))?;
    let mut params = start.clone();
    let mut opt = Optimizer::new(OptimizerConfig::adamw(), &params);
    let mut grads = Params::zeros(&decoder.cfg);
    let mut acts = Activations::default();
    let (mut epoch, mut cursor) = (0u64, 0usize);
    let mut order = epoch_order(pairs.len(), epoch, seed, true);
    let mut snapshots = Vec::new();
    for step in 0..plan.steps {
        let mut rows = Vec::with_capacity(plan.batch);
        while rows.len() < plan.batch.min(pairs.len()) {
            if cursor >= order.len() {
                epoch += 1;
                cursor = 0;
                order = epoch_order(pairs.len(), epoch, seed, true);
            }
            rows.push(order[cursor]);
            cursor += 1;
        }
        let mut seqs: Vec<(&[u32], &[u32])> = Vec::with_capacity(2 * rows.len());
        for &r in &rows {
            seqs.push((&pairs[r].prompt_ids, &pairs[r].chosen_ids));
            seqs.push((&pairs[r].prompt_ids, &pairs[r].rejected_ids));
        }
        let (batch, ranges) = pack_sequences(&seqs);
        let head = decoder.logprobs(&params, &batch, &mut acts, true)?;
        let mut roles = vec![Role::Chosen; head.logp.len()];
        for (k, &row) in rows.iter().enumerate() {
            let (ex, r) = (&pairs[row], &ranges[2 * k + 1]);
            roles[r.clone()].copy_from_slice(&rejected_roles(&ex.chosen_ids, &ex.rejected_ids, r.len(), eos_ids));
        }
        let (loss, dlogp) = unlikelihood_loss(&head.logp, &roles, alpha);
        if !loss.is_finite() {
            return Err(DemoError::NonFinite { method: "Unlikelihood", step: step + 1 });
        }
        decoder.backward_logprobs(&params, &batch, &mut acts, &dlogp, &mut grads)?;
        let grad_norm = clip_grad_norm(&mut grads, MAX_GRAD_NORM);
        let lr = lr_at(ScheduleKind::Linear, plan.lr, 0, plan.steps, step);
        opt.step(&mut params, &grads, lr);
        grads.fill_zero();
        let done = step + 1;
        let chosen_logp: f64 =
            ranges.iter().step_by(2).map(|r| head.logp[r.clone()].iter().map(|&v| v as f64).sum::<f64>()).sum::<f64>()
                / rows.len() as f64;
        let rejected_logp: f64 = ranges
            .iter()
            .skip(1)
            .step_by(2)
            .map(|r| head.logp[r.clone()].iter().map(|&v| v as f64).sum::<f64>())
            .sum::<f64>()
            / rows.len() as f64;
        let line = serde_json::json!({
            "step": done, "loss": loss, "grad_norm": grad_norm, "learning_rate": lr,
            "logps/chosen": chosen_logp, "logps/rejected": rejected_logp,
        });
        writeln!(metrics, "{line}").map_err(|e| DemoError::io(&metrics_path, e))?;
        if done % (plan.steps / 4).max(1) == 0 || done == plan.steps {
            log(&format!(
                "step {done}/{}  loss {loss:.4}  logps chosen {chosen_logp:.2} rejected {rejected_logp:.2}  grad_norm {grad_norm:.3}",
                plan.steps
            ));
        }
        if done % plan.save_every() == 0 || done == plan.steps {
            let dir = out.join("checkpoints").join(format!("step-{done}")).join("model");
            hf::save_model(&dir, model_cfg, &params, Some(source_dir))?;
            snapshots.push((done, params.clone()));
        }
    }
    Ok(snapshots)
}
