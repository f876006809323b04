//! Training a reward model on preference pairs: the Bradley-Terry loss on a batch of pairs, its gradient
//! through the scalar head and the trunk, and the loop (AdamW over trunk and head as one parameter set,
//! one global-norm clip, a linear schedule).

use engine::optim::{clip_grad_norm, global_grad_norm, lr_at, Optimizer, OptimizerConfig, ScheduleKind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use engine::kernels::Precision;
use engine::model::Model;
use engine::{Activations, Batch, Decoder, DecoderConfig, ParamSet, Params, ScalarHead};
use serde::{Deserialize, Serialize};

use super::{RewardModel, RewardModelError};
use crate::data::Example;
use crate::objectives::math::{log_sigmoid, sigmoid};
use crate::train::checkpoint::{self, TrainerState};
use crate::train::run_dir::RunDir;
use crate::train::{epoch_order, OnNonFinite};

/// One batch of pairs packed for rewards, and the stream rows of each sequence's last token.
pub(super) fn pack_pairs_for_rewards(pairs: &[&Example]) -> Result<(Batch, Vec<(usize, usize)>), RewardModelError> {
    let mut batch = Batch::default();
    let mut last = Vec::with_capacity(pairs.len());
    for ex in pairs {
        let s = batch.len();
        if ex.shares_prompt() {
            // prompt | chosen | rejected: each completion sees the prompt and itself (engine::batch).
            let (np, nc, nr) = (ex.prompt_ids.len(), ex.chosen_ids.len(), ex.rejected_ids.len());
            batch.push_shared_prefix(&ex.prompt_ids, &[&ex.chosen_ids, &ex.rejected_ids]);
            let chosen = s + np + nc - 1;
            let rejected = if nr == 0 { s + np - 1 } else { s + np + nc + nr - 1 };
            last.push((chosen, rejected));
        } else {
            let mut push = |p: &[u32], c: &[u32]| -> Result<usize, RewardModelError> {
                let ids: Vec<u32> = p.iter().chain(c).copied().collect();
                if ids.is_empty() {
                    return Err(RewardModelError::Invalid(format!("{}: an empty sequence has no reward", ex.location)));
                }
                let s = batch.len();
                batch.push_sequence(&ids, ids.len());
                Ok(s + ids.len() - 1)
            };
            let chosen = push(ex.chosen_prompt(), &ex.chosen_ids)?;
            let rejected = push(ex.rejected_prompt(), &ex.rejected_ids)?;
            last.push((chosen, rejected));
        }
    }
    Ok((batch, last))
}

/// What one batch of pairs gave.
#[derive(Clone, Debug, Default)]
pub(super) struct PairOutcome {
    /// `[pairs]` r(x, y_w) and r(x, y_l)
    pub(super) chosen: Vec<f64>,
    pub(super) rejected: Vec<f64>,
    /// Mean of `-log sigmoid(r_w - r_l)`.
    pub(super) loss: f64,
    pub(super) tokens: usize,
}

impl PairOutcome {
    pub(super) fn accuracy(&self) -> f64 {
        let n = self.chosen.len().max(1) as f64;
        self.chosen.iter().zip(&self.rejected).filter(|(w, l)| w > l).count() as f64 / n
    }
}

/// Gradient buffers of the trunk and the head.
pub(super) struct Grads<'a> {
    pub(super) trunk: &'a mut Params,
    pub(super) head: &'a mut ScalarHead,
}

/// Rewards and loss of a batch of pairs; with `grads`, adds the gradient of the mean loss to them
/// (forward then keeps activations).
pub(super) fn pair_batch(
    decoder: &Decoder,
    params: Model<'_>,
    head: &ScalarHead,
    pairs: &[&Example],
    acts: &mut Activations,
    grads: Option<Grads>,
) -> Result<PairOutcome, RewardModelError> {
    let d = decoder.cfg.hidden;
    let (batch, last) = pack_pairs_for_rewards(pairs)?;
    decoder.forward(params, &batch, acts, grads.is_some())?;
    let chosen = head.forward(&acts.hidden, last.iter().map(|&(w, _)| w));
    let rejected = head.forward(&acts.hidden, last.iter().map(|&(_, l)| l));
    let n = pairs.len().max(1) as f64;
    let loss = chosen.iter().zip(&rejected).map(|(w, l)| -log_sigmoid(w - l)).sum::<f64>() / n;
    let out = PairOutcome { chosen, rejected, loss, tokens: batch.len() };
    let Some(g) = grads else { return Ok(out) };
    if !loss.is_finite() {
        return Ok(out);
    }
    // d loss / d r_w = -sigmoid(-(r_w - r_l)) / n, d loss / d r_l = +sigmoid(-(r_w - r_l)) / n, in pair
    // order, chosen before rejected; the head turns them into d loss / d h_last and its own gradient.
    let mut rows = Vec::with_capacity(2 * last.len());
    let mut dvalues = Vec::with_capacity(2 * last.len());
    for (i, &(rw, rl)) in last.iter().enumerate() {
        let s = sigmoid(-(out.chosen[i] - out.rejected[i])) / n;
        rows.extend([rw, rl]);
        dvalues.extend([-s, s]);
    }
    let mut dhidden = vec![0.0f32; batch.len() * d]; // [N, d], nonzero at last-token rows only
    head.backward(&acts.hidden, rows, &dvalues, g.head, &mut dhidden);
    decoder.backward(params, &batch, acts, &dhidden, g.trunk)?;
    Ok(out)
}

/// How a reward model is trained. Defaults follow TRL's `RewardConfig` / HF `TrainingArguments` where it
/// has one (AdamW, linear schedule without warmup, clipping at 1.0).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RmTrainConfig {
    pub lr: f64,
    /// Pairs per optimizer step.
    pub batch_size: usize,
    /// Passes over the pairs (fractional allowed); ignored when `max_steps` is set.
    pub epochs: f64,
    pub max_steps: Option<u64>,
    /// AdamW decoupled weight decay, on matrices only (trunk and `score.weight`).
    pub weight_decay: f64,
    /// Clip the global gradient norm (trunk and head together) to this; 0 or less: no clipping.
    pub max_grad_norm: f64,
    /// Seeds the head initialisation and the per-epoch shuffle.
    pub seed: u64,
    pub shuffle: bool,
    /// Standard deviation of the fresh head's weights. transformers initialises a new `score` layer with
    /// `N(0, initializer_range²)`, 0.02 for most models; 0 starts from zeros (every reward 0 and the
    /// first step moving the head only).
    pub head_init_std: f64,
    /// Evaluate on the evaluation pairs every this many steps (0: only after the last step).
    pub eval_every: u64,
    /// The precision of the trunk's passes (training and evaluation).
    #[serde(with = "crate::precision::by_name", default)]
    pub precision: Precision,
}

impl Default for RmTrainConfig {
    fn default() -> Self {
        RmTrainConfig {
            lr: 1e-5,
            batch_size: 8,
            epochs: 1.0,
            max_steps: None,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            seed: 42,
            shuffle: true,
            head_init_std: 0.02,
            eval_every: 0,
            precision: Precision::F32,
        }
    }
}

impl RmTrainConfig {
    /// Refuses settings the loop cannot run with, naming them: what a command checks before it loads or
    /// writes anything, and the loop again.
    pub fn validate(&self) -> Result<(), RewardModelError> {
        let bad = |m: String| Err(RewardModelError::Invalid(m));
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad(format!("learning rate must be a finite number >= 0, got {}", self.lr));
        }
        if self.batch_size == 0 {
            return bad("batch size must be at least 1".into());
        }
        if self.max_steps == Some(0) {
            return bad("max_steps must be at least 1".into());
        }
        if self.max_steps.is_none() && !(self.epochs.is_finite() && self.epochs > 0.0) {
            return bad(format!("epochs must be a positive number, got {}", self.epochs));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!("weight decay must be a finite number >= 0, got {}", self.weight_decay));
        }
        if !(self.head_init_std.is_finite() && self.head_init_std >= 0.0) {
            return bad(format!("head_init_std must be a finite number >= 0, got {}", self.head_init_std));
        }
        Ok(())
    }

    /// Optimizer steps: `max_steps`, or `ceil(epochs * ceil(rows / batch_size))`.
    pub fn total_steps(&self, rows: usize) -> u64 {
        match self.max_steps {
            Some(s) => s,
            None => (self.epochs * rows.div_ceil(self.batch_size.max(1)) as f64).ceil().max(1.0) as u64,
        }
    }
}

/// One optimizer step's metrics (on its batch), TRL's `RewardTrainer` names where it has them.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RmStepStats {
    pub step: u64,
    pub epoch: f64,
    pub loss: f64,
    /// Share of pairs with `r_w > r_l`.
    pub accuracy: f64,
    /// Mean `r_w - r_l`.
    pub margin: f64,
    /// Mean reward over both completions of the batch.
    pub mean_reward: f64,
    /// Global norm of the gradient (trunk and head) before clipping.
    pub grad_norm: f64,
    pub learning_rate: f64,
    pub num_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_accuracy: Option<f64>,
}

/// Mean loss and accuracy of a reward model on pairs (forward only, `batch_size` pairs per pass).
pub fn evaluate(rm: &RewardModel, pairs: &[Example], batch_size: usize) -> Result<(f64, f64), RewardModelError> {
    let mut acts = Activations::default();
    let (mut loss, mut correct) = (0.0, 0.0);
    let refs: Vec<&Example> = pairs.iter().collect();
    for chunk in refs.chunks(batch_size.max(1)) {
        let out = super::shard::pair_batch_shared(&rm.decoder, rm.trunk(), &rm.head, chunk, &mut acts, None)?;
        loss += out.loss * chunk.len() as f64;
        correct += out.accuracy() * chunk.len() as f64;
    }
    let n = pairs.len().max(1) as f64;
    Ok((loss / n, correct / n))
}

/// Share of pairs the reward model ranks right (`r_w > r_l`; ties count as wrong, as in TRL).
pub fn accuracy(rm: &RewardModel, pairs: &[Example]) -> Result<f64, RewardModelError> {
    Ok(evaluate(rm, pairs, 8)?.1)
}

/// Tensors the optimizer trains: the trunk's LM head is unused and the head's bias gets zero gradient.
fn trainable(name: &str) -> bool {
    name != "lm_head" && name != ScalarHead::BIAS
}

fn optimizer_config(rc: &RmTrainConfig) -> OptimizerConfig {
    OptimizerConfig::adamw().with_weight_decay(rc.weight_decay)
}

/// Where a reward-model run starts: a fresh head on a trunk, or a checkpoint of an earlier run.
pub struct RmStart {
    pub rm: RewardModel,
    pub optimizer: Optimizer,
    pub state: TrainerState,
    /// The steps the checkpoint's run was to take; `None` for a fresh start.
    pub resumed_total: Option<u64>,
    pub resumed: bool,
}

impl RmStart {
    /// A trunk (`cfg`, `params`) with a fresh head, at step 0.
    pub fn fresh(cfg: &DecoderConfig, params: Params, rc: &RmTrainConfig) -> Self {
        let mut rm = RewardModel::new(cfg, params, rc.head_init_std, rc.seed).with_precision(rc.precision);
        let optimizer = Optimizer::with_trainable(optimizer_config(rc), &(&mut rm.params, &mut rm.head), trainable);
        let state = TrainerState { step: 0, epoch: 0, cursor: 0, num_tokens: 0, skipped_steps: 0 };
        RmStart { rm, optimizer, state, resumed_total: None, resumed: false }
    }

    /// The checkpoint `path` names (`checkpoints/step-N`, or a run directory: its newest), with its
    /// model configuration.
    pub fn resume(path: &Path, rc: &RmTrainConfig) -> Result<(Self, hf::ModelConfig), RewardModelError> {
        let (c, head) = checkpoint::load_with_head(path, optimizer_config(rc), &trainable)?;
        let decoder = Decoder::new(c.model.config.decoder.clone());
        let rm = RewardModel { decoder, params: c.model.params, head, precision: rc.precision };
        let start = RmStart { rm, optimizer: c.optimizer, state: c.state, resumed_total: c.total_steps, resumed: true };
        Ok((start, c.model.config))
    }
}

/// The run directory of a resumable run: checkpoints every `save_every` steps, when `stop` is set
/// (polled between steps) and after the last step, `metrics.jsonl` one line per step.
pub struct RmRun<'a> {
    /// `None` on the ranks of a data-parallel run other than rank 0, which alone writes the run's files.
    pub dir: Option<&'a mut RunDir>,
    /// Describes the trunk (written as `model/` of each checkpoint).
    pub model_cfg: &'a hf::ModelConfig,
    /// The starting model's directory (tokenizer files are copied from it).
    pub source: &'a Path,
    /// 0: only when stopped and at the end.
    pub save_every: u64,
    pub on_nonfinite: OnNonFinite,
    pub stop: &'a AtomicBool,
    /// TensorBoard event files besides metrics.jsonl.
    pub report_to: crate::tensorboard::ReportTo,
}

/// How a reward-model run ended.
pub struct RmOutcome {
    pub rm: RewardModel,
    /// Metrics of the steps this call took.
    pub stats: Vec<RmStepStats>,
    pub steps: u64,
    pub total_steps: u64,
    /// Newest checkpoint this call wrote.
    pub checkpoint: Option<PathBuf>,
    pub interrupted: bool,
}

/// Trains a reward model from a trunk (`cfg`, `params`, usually the SFT model) on preference pairs:
/// one AdamW over the trunk and the head (the trunk's LM head, unused, and the head's bias, whose gradient
/// is zero, stay frozen), global-norm clipping over both, a linear schedule. The epoch order is
/// `dpo train`'s with the same seed. Logs one line per step and the evaluation results; returns the model and the
/// per-step metrics. Without a run directory: [`run_reward_model`] has checkpoints and resume.
pub fn train_reward_model(
    cfg: &DecoderConfig,
    params: Params,
    pairs: &[Example],
    eval: &[Example],
    rc: &RmTrainConfig,
    log: &mut dyn FnMut(&str),
) -> Result<(RewardModel, Vec<RmStepStats>), RewardModelError> {
    rc.validate()?;
    let out = run_reward_model(RmStart::fresh(cfg, params, rc), pairs, eval, rc, None, log)?;
    Ok((out.rm, out.stats))
}

/// The reward-model training loop from `start`, with checkpoints, resume, stop and non-finite handling
/// when given a run (`run`), as `dpo train`'s loop: a checkpoint holds the trunk, the head, the
/// optimizer's moments of both and the position in the data, so a resumed run ends bit-identical to an
/// uninterrupted one.
pub fn run_reward_model(
    start: RmStart,
    pairs: &[Example],
    eval: &[Example],
    rc: &RmTrainConfig,
    mut run: Option<RmRun>,
    log: &mut dyn FnMut(&str),
) -> Result<RmOutcome, RewardModelError> {
    rc.validate()?;
    if pairs.is_empty() {
        return Err(RewardModelError::Invalid("no preference pairs to train the reward model on".into()));
    }
    let RmStart { mut rm, mut optimizer, mut state, resumed_total, resumed } = start;
    let cfg = rm.decoder.cfg.clone();
    let mut trunk_grads = Params::zeros(&cfg);
    let mut head_grads = ScalarHead::zeros(cfg.hidden);
    let mut acts = Activations::default();

    let rows = pairs.len();
    let total = rc.total_steps(rows);
    if let Some(before) = resumed_total.filter(|&b| b != total) {
        log(&format!(
            "the run was to take {before} steps and now takes {total}: the linear learning-rate schedule changes \
             from step {} on",
            state.step + 1
        ));
    }
    let mut metrics = match run.as_mut() {
        Some(r) => {
            if resumed {
                log(&format!("resuming at step {}", state.step));
                if let Some(dir) = r.dir.as_deref() {
                    dir.abandon_after(state.step, log)?;
                }
            }
            r.dir.as_deref().map(|dir| dir.metrics_to(resumed.then_some(state.step), r.report_to)).transpose()?
        }
        None => None,
    };
    let save = |run: &mut RmRun, rm: &RewardModel, optimizer: &Optimizer, state: &TrainerState| {
        let Some(dir) = run.dir.as_deref_mut() else {
            return Ok(PathBuf::new());
        };
        let output = dir.path().to_path_buf();
        let (p, h) = (&rm.params, Some(&rm.head));
        let path = checkpoint::save_with_head(&output, run.model_cfg, p, h, run.source, optimizer, state, total)?;
        checkpoint::prune(&output, 0);
        dir.started();
        Ok::<_, RewardModelError>(path)
    };
    let mut order = epoch_order(rows, state.epoch, rc.seed, rc.shuffle);
    let mut stats = Vec::with_capacity(total.saturating_sub(state.step) as usize);
    let mut newest = None;
    while state.step < total {
        // The ranks of a data-parallel run stop together, at the first step boundary any of them saw a stop.
        let stop = crate::dist::any(run.as_ref().is_some_and(|r| r.stop.load(Ordering::SeqCst)));
        if let Some(r) = run.as_mut().filter(|_| stop) {
            let p = save(r, &rm, &optimizer, &state)?;
            let steps = state.step;
            return Ok(RmOutcome { rm, stats, steps, total_steps: total, checkpoint: Some(p), interrupted: true });
        }
        let before = state.clone();
        if state.cursor >= rows {
            state.epoch += 1;
            state.cursor = 0;
            order = epoch_order(rows, state.epoch, rc.seed, rc.shuffle);
        }
        let end = (state.cursor + rc.batch_size).min(rows);
        let batch: Vec<&Example> = order[state.cursor..end].iter().map(|&i| &pairs[i]).collect();
        state.cursor = end;

        trunk_grads.fill_zero();
        head_grads.fill_zero();
        let g = Grads { trunk: &mut trunk_grads, head: &mut head_grads };
        let out = super::shard::pair_batch_shared(&rm.decoder, rm.trunk(), &rm.head, &batch, &mut acts, Some(g))?;
        let mut grads = (&mut trunk_grads, &mut head_grads);
        crate::dist::reduce_grads(&mut grads);
        // A loss that is not finite left the gradient unset (pair_batch): its norm is not a number either.
        let grad_norm = if !out.loss.is_finite() {
            f64::NAN
        } else if rc.max_grad_norm > 0.0 {
            clip_grad_norm(&mut grads, rc.max_grad_norm)
        } else {
            global_grad_norm(&grads)
        };
        let lr = lr_at(ScheduleKind::Linear, rc.lr, 0, total, state.step);
        state.num_tokens += out.tokens as u64;
        state.step += 1;
        if !out.loss.is_finite() || !grad_norm.is_finite() {
            let rows = batch.iter().map(|e| e.location.as_str()).collect::<Vec<_>>().join(", ");
            let what = if out.loss.is_finite() { "gradient" } else { "loss" };
            match run.as_mut() {
                Some(r) if r.on_nonfinite == OnNonFinite::Skip => {
                    log(&format!("step {}: {what} not finite (rows {rows}); step skipped", state.step));
                    state.skipped_steps += 1;
                }
                Some(r) => {
                    // Not applied: the weights and optimizer are those after the last good step, and the
                    // checkpoint of that state resumes before this batch.
                    let p = save(r, &rm, &optimizer, &before)?;
                    log(&format!("checkpoint of the last good state written to {}", p.display()));
                    return Err(RewardModelError::NonFinite { step: state.step, what, rows });
                }
                None => return Err(RewardModelError::NonFinite { step: state.step, what, rows }),
            }
        } else {
            optimizer.step(&mut (&mut rm.params, &mut rm.head), &grads, lr);
        }

        let k = out.chosen.len() as f64;
        let mut s = RmStepStats {
            step: state.step,
            epoch: state.epoch as f64 + state.cursor as f64 / rows as f64,
            loss: out.loss,
            accuracy: out.accuracy(),
            margin: out.chosen.iter().zip(&out.rejected).map(|(w, l)| w - l).sum::<f64>() / k,
            mean_reward: (out.chosen.iter().sum::<f64>() + out.rejected.iter().sum::<f64>()) / (2.0 * k),
            grad_norm,
            learning_rate: lr,
            num_tokens: state.num_tokens,
            eval_loss: None,
            eval_accuracy: None,
        };
        let mut line = format!(
            "step {}/{total}  loss {:.4}  acc {:.2}  margin {:+.4}  grad_norm {:.3}  lr {:.2e}",
            s.step, s.loss, s.accuracy, s.margin, s.grad_norm, s.learning_rate
        );
        let due = s.step == total || (rc.eval_every > 0 && s.step.is_multiple_of(rc.eval_every));
        if !eval.is_empty() && due {
            let (l, a) = evaluate(&rm, eval, rc.batch_size)?;
            (s.eval_loss, s.eval_accuracy) = (Some(l), Some(a));
            line += &format!("  eval loss {l:.4}  eval acc {a:.3}");
        }
        log(&line);
        if let Some(m) = metrics.as_mut() {
            m.append(&serde_json::to_value(&s).expect("metrics serialize"))?;
        }
        stats.push(s);
        if let Some(r) = run.as_mut() {
            if state.step == total || (r.save_every > 0 && state.step.is_multiple_of(r.save_every)) {
                newest = Some(save(r, &rm, &optimizer, &state)?);
            }
        }
    }
    Ok(RmOutcome { rm, stats, steps: state.step, total_steps: total, checkpoint: newest, interrupted: false })
}
