//! The paper's Unlikelihood baseline (Welleck et al. 2019, "Neural text generation with unlikelihood
//! training"), as a small SFT-style loop on the preference pairs:
//!
//! ```text
//! loss = -mean_{t in chosen} log p(y_t)  -  alpha * mean_{t in rejected} log(1 - p(y_t))
//! ```
//!
//! both means over the completion tokens of the batch. Three departures from the bare formula keep it
//! from wrecking the model (measured here: without them the KL to the reference passes 50 nats and
//! the samples turn into broken words):
//! - the unlikelihood term starts where the rejected completion departs from the chosen one: the tokens
//!   the two share at the start are chosen tokens too;
//! - it skips the EOS token, which ends every completion (pushing it down only teaches not to stop);
//! - `1 - p` is floored at `MIN_COMPLEMENT` (0.1), with zero gradient below the floor: a token the model
//!   is almost sure of (the rest of a word after its first BPE piece) is not a choice of the review's
//!   sentiment, and `d/dl [-log(1 - e^l)] = p / (1 - p)` would otherwise let exactly those tokens
//!   dominate the step.
//!
//! The engine gives per-target log-probs, so the whole objective enters the model at one place.

use std::io::Write;
use std::path::Path;

use engine::optim::{clip_grad_norm, lr_at, Optimizer, OptimizerConfig, ScheduleKind};
use engine::{Activations, Decoder, Params};

use super::plan::Steps;
use super::DemoError;
use crate::data::pack::pack_sequences;
use crate::data::Example;
use crate::train::epoch_order;

const MIN_COMPLEMENT: f64 = 0.1;
const MAX_GRAD_NORM: f64 = 1.0;

/// What a target token contributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A chosen token: likelihood.
    Chosen,
    /// A rejected token after the shared start: unlikelihood.
    Rejected,
    /// A rejected token the chosen completion shares at the start, or its EOS: nothing.
    Skip,
}

/// Loss and per-target gradient of one batch, each target in the given role.
pub fn unlikelihood_loss(logp: &[f32], roles: &[Role], alpha: f64) -> (f64, Vec<f32>) {
    let n_rej = roles.iter().filter(|&&r| r == Role::Rejected).count().max(1) as f64;
    let n_cho = roles.iter().filter(|&&r| r == Role::Chosen).count().max(1) as f64;
    let mut loss = 0.0;
    let mut grad = vec![0.0f32; logp.len()];
    for (i, (&l, &role)) in logp.iter().zip(roles).enumerate() {
        let l = l as f64;
        match role {
            Role::Rejected => {
                let p = l.exp();
                let q = 1.0 - p;
                if q > MIN_COMPLEMENT {
                    loss -= alpha * q.ln() / n_rej;
                    grad[i] = (alpha * p / q / n_rej) as f32;
                } else {
                    loss -= alpha * MIN_COMPLEMENT.ln() / n_rej;
                }
            }
            Role::Chosen => {
                loss -= l / n_cho;
                grad[i] = (-1.0 / n_cho) as f32;
            }
            Role::Skip => {}
        }
    }
    (loss, grad)
}

/// Tokens the two completions share at their start.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

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
            // The targets are the last `r.len()` tokens of the completion (the first is unscored after
            // an empty prompt).
            let unscored = ex.rejected_ids.len() - r.len();
            let shared = common_prefix(&ex.chosen_ids, &ex.rejected_ids).saturating_sub(unscored);
            for (j, t) in r.clone().enumerate() {
                let eos = eos_ids.contains(&ex.rejected_ids[unscored + j]);
                roles[t] = if j < shared || eos { Role::Skip } else { Role::Rejected };
            }
        }
        let (loss, dlogp) = unlikelihood_loss(&head.logp, &roles, alpha);
        if !loss.is_finite() {
            return Err(DemoError::Msg(format!("unlikelihood: loss not finite at step {}", step + 1)));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_and_gradient_match_finite_differences() {
        let logp = [-0.3f32, -2.0, -0.05, -1.2, -4.0, -0.01];
        let rej = [Role::Chosen, Role::Rejected, Role::Rejected, Role::Chosen, Role::Rejected, Role::Skip];
        let alpha = 0.7;
        let (loss, grad) = unlikelihood_loss(&logp, &rej, alpha);
        let want = -(-0.3f64 + -1.2) / 2.0
            - alpha / 3.0 * ((1.0 - (-2.0f64).exp()).ln() + 0.1f64.ln() + (1.0 - (-4.0f64).exp()).ln());
        assert!((loss - want).abs() < 1e-6, "{loss} vs {want}");
        assert_eq!(grad[5], 0.0);
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4, 5]), 2);
        for i in 0..logp.len() {
            let h = 1e-3f32;
            let mut a = logp;
            a[i] += h;
            let mut b = logp;
            b[i] -= h;
            let fd = (unlikelihood_loss(&a, &rej, alpha).0 - unlikelihood_loss(&b, &rej, alpha).0) / (2.0 * h as f64);
            assert!((fd - grad[i] as f64).abs() < 1e-3 * fd.abs().max(1.0), "{i}: {fd} vs {}", grad[i]);
        }
    }
}
