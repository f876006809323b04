//! The training loop shared by every objective:
//!
//! ```text
//! for each optimizer step (Trainer::step):
//!     for each of grad_accum micro-batches (rows in file order or a seeded per-epoch shuffle):
//!         policy forward (activations kept) -> reference log-probs -> objective -> backward, scaled 1/grad_accum
//!     non-finite check -> global gradient norm -> optimizer step at the scheduled rate, which scales
//!     (clips), applies and zeroes each chunk of the gradients in one pass
//! then (run): metrics line, evaluation / checkpoint when due, stop cleanly when interrupted
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use engine::kernels::Precision;
use engine::model::Model;
use engine::optim::{clip_coefficient, lr_at, Optimizer};
use engine::rng::Rng;
use engine::{Decoder, ParamSet};
use hf::safetensors::WriteDtype;

use super::checkpoint::{self, TrainerState};
use super::pairs::Workspace;
use super::policy::Trained;
use super::run_dir::RunDir;
use super::setup::{setup, RunOptions, Setup, Start};
use super::workload::Workload;
use super::{OnNonFinite, TrainConfig, TrainError};

/// Where `--merge` writes the trained adapter merged into the base (an HF model directory).
pub const MERGED_DIR: &str = "final-merged";

/// How a run ended.
#[derive(Debug)]
pub struct TrainOutcome {
    pub steps: u64,
    pub total_steps: u64,
    /// `OUTPUT/final`, written when the run completed.
    pub final_dir: Option<PathBuf>,
    /// Newest checkpoint written by this run; `None` for a run interrupted before its first step, which
    /// writes none (a new run leaves nothing behind, a resumed one its checkpoints as they were).
    pub checkpoint: Option<PathBuf>,
    pub interrupted: bool,
}

/// Total optimizer steps: `max_steps`, or enough micro-batches for `epochs` passes over the data.
pub fn total_steps(cfg: &TrainConfig, rows: usize) -> u64 {
    if let Some(s) = cfg.max_steps {
        return s;
    }
    let micro_per_epoch = rows.div_ceil(cfg.batch_size) as f64;
    ((cfg.epochs * micro_per_epoch) / cfg.grad_accum as f64).ceil().max(1.0) as u64
}

/// Row order of one epoch: file order, or a shuffle seeded by the run's seed and the epoch number.
pub fn epoch_order(rows: usize, epoch: u64, seed: u64, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..rows).collect();
    if shuffle {
        Rng::new(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)).shuffle(&mut order);
    }
    order
}

/// What one optimizer step did.
#[derive(Clone, Debug)]
pub struct StepOutcome {
    /// The trainer's position before the step (the state a checkpoint of "before this step" holds).
    pub before: TrainerState,
    /// Metrics averaged over the step's micro-batches (TRL's names).
    pub metrics: BTreeMap<String, f64>,
    /// Rows the step used.
    pub rows: Vec<usize>,
    pub tokens: u64,
    /// Global gradient norm before clipping (NaN when the loss was not finite).
    pub grad_norm: f64,
    pub lr: f64,
    /// `None` when the update was applied; otherwise what was not finite (`loss` or `gradient`).
    pub nonfinite: Option<&'static str>,
    /// Seconds of the whole step and of its update (clip, optimizer, zeroing).
    pub secs: f64,
    pub update_secs: f64,
}

/// The policy being trained, its optimizer and its place in the data: one call of [`Trainer::step`]
/// is one optimizer step of any workload.
pub struct Trainer<'c> {
    pub cfg: &'c TrainConfig,
    pub decoder: Decoder,
    /// Every weight, or the adapter of a LoRA run.
    pub trained: Trained,
    /// The frozen base a trained adapter sits on, as the passes read it (its `Params`, and its block
    /// linears in another storage where it has one); `None` when every weight is trained.
    pub base: Option<Model<'c>>,
    pub optimizer: Optimizer,
    pub state: TrainerState,
    pub total: u64,
    /// The gradient, in `trained`'s layout (an adapter's only, in a LoRA run).
    grads: Trained,
    ws: Workspace,
    order: Vec<usize>,
    rows: usize,
}

impl<'c> Trainer<'c> {
    /// A trainer of `trained`; an adapter needs the `base` it sits on.
    pub fn new(
        cfg: &'c TrainConfig,
        decoder: Decoder,
        trained: Trained,
        base: Option<Model<'c>>,
        optimizer: Optimizer,
        state: TrainerState,
        rows: usize,
    ) -> Result<Self, TrainError> {
        if matches!(trained, Trained::Adapter(_)) && base.is_none() {
            return Err(TrainError::Invalid("a LoRA adapter is trained on a base model, and none was given".into()));
        }
        let order = epoch_order(rows, state.epoch, cfg.seed, !cfg.no_shuffle);
        let grads = trained.zeros_like(&decoder.cfg);
        let total = total_steps(cfg, rows);
        let ws = Workspace { gradient_checkpointing: cfg.gradient_checkpointing, ..Default::default() };
        Ok(Trainer { cfg, decoder, trained, base, optimizer, state, total, grads, ws, order, rows })
    }

    /// The policy as the passes read it: the trained weights, or the base with the trained adapter.
    pub fn model(&self) -> Model<'_> {
        policy_model(&self.trained, self.base, self.cfg.precision)
    }

    /// Takes the next micro-batch of row indices, moving to the next epoch at the end of one.
    fn next_micro_batch(&mut self) -> Vec<usize> {
        if self.state.cursor >= self.order.len() {
            self.state.epoch += 1;
            self.state.cursor = 0;
            self.order = epoch_order(self.rows, self.state.epoch, self.cfg.seed, !self.cfg.no_shuffle);
        }
        let end = (self.state.cursor + self.cfg.batch_size).min(self.order.len());
        let batch = self.order[self.state.cursor..end].to_vec();
        self.state.cursor = end;
        batch
    }

    /// One optimizer step: accumulate the micro-batches' gradients, clip, update at the scheduled rate.
    /// A step whose loss or gradient is not finite is not applied (`nonfinite`); the position still
    /// moves on and the step is counted as skipped.
    pub fn step(&mut self, workload: &dyn Workload) -> Result<StepOutcome, TrainError> {
        let t0 = Instant::now();
        let before = self.state.clone();
        let mut metrics: BTreeMap<String, f64> = BTreeMap::new();
        let mut rows = Vec::new();
        let mut tokens = 0u64;
        let mut finite = true;
        let scale = 1.0 / self.cfg.grad_accum as f64;
        for micro in 0..self.cfg.grad_accum {
            let batch = self.next_micro_batch();
            // An adapter's dropout draws its masks from the run's seed, the step and the micro-batch, so a
            // resumed run draws the same ones.
            let seed = self.cfg.seed ^ (self.state.step.wrapping_mul(0x9E37_79B9_7F4A_7C15)) ^ micro as u64;
            let model = policy_model(&self.trained, self.base, self.cfg.precision).with_dropout_seed(seed);
            let grads = Some((self.grads.grads(), scale));
            let out = crate::dist::run_share(workload, &self.decoder, model, grads, &batch, &mut self.ws)?;
            finite &= out.finite;
            tokens += out.num_tokens;
            for (k, v) in out.metrics {
                *metrics.entry(k).or_default() += v * scale;
            }
            rows.extend(batch);
        }
        // Data parallelism: every rank now holds the sum of the ranks' shares (nothing with one process).
        crate::dist::reduce_grads(&mut self.grads);
        let t_update = Instant::now();
        let (grad_norm, clip) =
            if finite { clip_coefficient(&self.grads, self.cfg.max_grad_norm) } else { (f64::NAN, None) };
        let cfg = self.cfg;
        let lr = lr_at(cfg.scheduler, cfg.lr, cfg.warmup_steps, self.total, self.state.step);
        self.state.num_tokens += tokens;
        let nonfinite = match (finite, grad_norm.is_finite()) {
            (true, true) => None,
            (false, _) => Some("loss"),
            (true, false) => Some("gradient"),
        };
        if nonfinite.is_none() {
            // Clipping, the update and zeroing the gradients for the next step, in one pass.
            self.optimizer.step_and_clear(&mut self.trained, &mut self.grads, lr, clip);
        } else {
            self.state.skipped_steps += 1;
            self.grads.fill_zero();
        }
        self.state.step += 1;
        let update_secs = t_update.elapsed().as_secs_f64();
        Ok(StepOutcome {
            before,
            metrics,
            rows,
            tokens,
            grad_norm,
            lr,
            nonfinite,
            secs: t0.elapsed().as_secs_f64(),
            update_secs,
        })
    }

    /// Mean of each metric over the rows of `workload`, at the current weights.
    pub fn evaluate(&mut self, workload: &dyn Workload) -> Result<BTreeMap<String, f64>, TrainError> {
        let model = policy_model(&self.trained, self.base, self.cfg.precision);
        evaluate(&self.decoder, model, workload, self.cfg.batch_size, &mut self.ws)
    }
}

/// The trained weights, or `base` with the trained adapter on it, its products in `precision`.
fn policy_model<'a>(trained: &'a Trained, base: Option<Model<'a>>, precision: Precision) -> Model<'a> {
    match (trained, base) {
        (Trained::Full(p), _) => Model::new(p, None).with_precision(precision),
        (Trained::Adapter(a), Some(base)) => Model { adapter: Some(a), ..base }.with_precision(precision),
        (Trained::Adapter(_), None) => unreachable!("Trainer::new refuses an adapter without a base"),
    }
}

/// Mean of each metric over rows (TRL's names, unprefixed), under `model` (a decoder's weights, or a
/// base with an adapter on it).
pub fn evaluate<'m>(
    decoder: &Decoder,
    model: impl Into<Model<'m>>,
    workload: &dyn Workload,
    batch_size: usize,
    ws: &mut Workspace,
) -> Result<BTreeMap<String, f64>, TrainError> {
    evaluate_counting(decoder, model, workload, batch_size, ws, &mut |_| {})
}

/// [`evaluate`], telling `done` the rows evaluated so far after each batch (a command's progress bar).
pub fn evaluate_counting<'m>(
    decoder: &Decoder,
    model: impl Into<Model<'m>>,
    workload: &dyn Workload,
    batch_size: usize,
    ws: &mut Workspace,
    done: &mut dyn FnMut(usize),
) -> Result<BTreeMap<String, f64>, TrainError> {
    let model = model.into();
    let mut sums: BTreeMap<String, f64> = BTreeMap::new();
    let rows: Vec<usize> = (0..workload.rows()).collect();
    for (i, chunk) in rows.chunks(batch_size.max(1)).enumerate() {
        let out = crate::dist::run_share(workload, decoder, model, None, chunk, ws)?;
        for (k, v) in out.metrics {
            *sums.entry(k).or_default() += v * chunk.len() as f64;
        }
        done((i * batch_size.max(1) + chunk.len()).min(rows.len()));
    }
    let n = workload.rows().max(1) as f64;
    Ok(sums.into_iter().map(|(k, v)| (k, v / n)).collect())
}

/// Trains as configured (pairs, KTO or SFT, as `cfg.objective` says), or resumes such a run:
/// everything is validated and loaded first ([`setup`]), then the run directory is opened.
pub fn train(
    cfg: &TrainConfig,
    opts: &RunOptions,
    stop: &AtomicBool,
    log: &mut dyn FnMut(&str),
) -> Result<TrainOutcome, TrainError> {
    let (s, start) = setup(cfg, opts, log)?;
    // Data parallelism: every rank has read its checkpoint before rank 0 takes the directory, and only
    // rank 0 writes in it.
    crate::dist::barrier();
    // Interrupted while loading: the run stops before its directory is touched.
    if crate::dist::any(stop.load(Ordering::SeqCst)) {
        let (steps, total_steps) = (start.state.step, total_steps(&s.cfg, s.workloads().0.rows()));
        return Ok(TrainOutcome { steps, total_steps, final_dir: None, checkpoint: None, interrupted: true });
    }
    let mut dir = crate::dist::is_root().then(|| RunDir::open(&cfg.output, opts.start_mode(), log)).transpose()?;
    let outcome = run(&s, start, dir.as_mut(), stop, log)?;
    // The run's own configuration (a resumed run's, as written in it).
    let written = (&outcome.final_dir, &outcome.checkpoint);
    if let ((Some(final_dir), Some(checkpoint)), Some(_), Some(_dir), true) = (written, &s.lora, dir, s.cfg.merge) {
        // The run's base, adapter and optimizer go before the merge, which reads the f32 base from its
        // directory a block at a time (a stored base is never merged into); the run directory stays
        // locked (`_dir`) until the merged model is written.
        let (model, config, output) = (s.cfg.model.clone(), s.model.config.clone(), s.cfg.output.clone());
        let dtype = s.cfg.merge_dtype;
        drop(s);
        merge_final(&model, &config, dtype, final_dir, &output, checkpoint, log)?;
    }
    Ok(outcome)
}

/// `--merge`: the adapter of `final_dir` (as written, read back) merged into the base `model`, written as
/// `OUTPUT/final-merged` ([`MERGED_DIR`]).
fn merge_final(
    model: &Path,
    config: &hf::ModelConfig,
    dtype: Option<WriteDtype>,
    final_dir: &Path,
    output: &Path,
    checkpoint: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<(), TrainError> {
    let final_error = TrainError::final_write(checkpoint, output);
    let adapter = hf::peft::load_adapter(final_dir, config).map_err(final_error)?.adapter;
    let merged = output.join(MERGED_DIR);
    let dtype = merged_dtype(dtype, model).map_err(final_error)?;
    hf::peft::save_merged(&merged, hf::peft::MergeBase::Dir(model), &adapter, dtype).map_err(final_error)?;
    log(&format!("merged model written to {} ({})", merged.display(), dtype.name()));
    Ok(())
}

/// The dtype `--merge` writes in: `merge_dtype` when set, else the one the base `model` is stored in.
pub(super) fn merged_dtype(merge_dtype: Option<WriteDtype>, model: &Path) -> hf::Result<WriteDtype> {
    merge_dtype.map(Ok).unwrap_or_else(|| hf::stored_dtype(model))
}

/// Supervised fine-tuning (the reference model of DPO, or the paper's preferred-FT) on prompt/completion
/// rows or on the chosen side of preference rows: [`train`] with the SFT objective.
pub fn train_sft(
    cfg: &TrainConfig,
    opts: &RunOptions,
    stop: &AtomicBool,
    log: &mut dyn FnMut(&str),
) -> Result<TrainOutcome, TrainError> {
    let cfg = TrainConfig { objective: super::Objective::Sft, ..cfg.clone() };
    train(&cfg, opts, stop, log)
}

/// One human-readable line per logged step (the full record goes to metrics.jsonl).
fn step_summary(step: u64, total: u64, out: &StepOutcome) -> String {
    let m = &out.metrics;
    let mut s = format!("step {step}/{total}  loss {:.4}", m.get("loss").copied().unwrap_or(f64::NAN));
    if let (Some(acc), Some(margin)) = (m.get("rewards/accuracies"), m.get("rewards/margins")) {
        s += &format!("  reward acc {acc:.2}  margin {margin:+.4}");
    }
    let tps = out.tokens as f64 / out.secs;
    s + &format!("  grad_norm {:.3}  lr {:.2e}  {tps:.0} tok/s", out.grad_norm, out.lr)
}

/// The loop itself, for a prepared run in its directory. `stop` is polled between steps: when set, a
/// checkpoint is written and the run returns with `interrupted`. `dir` is `None` on the ranks of a
/// data-parallel run other than rank 0 (which alone writes the run's files; all stop at the same step).
pub fn run(
    s: &Setup,
    start: Start,
    mut dir: Option<&mut RunDir>,
    stop: &AtomicBool,
    log: &mut dyn FnMut(&str),
) -> Result<TrainOutcome, TrainError> {
    let cfg = &s.cfg;
    let (workload, eval) = s.workloads();
    let decoder = Decoder::new(s.model.config.decoder.clone());
    let resumed = start.resumed;
    let base = s.lora.as_ref().map(|_| s.base());
    let mut t = Trainer::new(cfg, decoder, start.trained, base, start.optimizer, start.state, workload.rows())?;
    let total = t.total;
    if let Some((_, Some(before))) = &resumed {
        // A constant rate does not depend on the length: nothing changes but the number of steps.
        if *before != total && cfg.scheduler != engine::optim::ScheduleKind::Constant {
            let step = t.state.step;
            log(&format!(
                "the run was to take {before} steps and now takes {total}: the {} learning-rate schedule changes \
                 from step {} on, recomputed over {total} steps (lr {:.3e} at that step; {:.3e} over {before})",
                super::config::schedule_name(cfg.scheduler),
                step + 1,
                lr_at(cfg.scheduler, cfg.lr, cfg.warmup_steps, total, step),
                lr_at(cfg.scheduler, cfg.lr, cfg.warmup_steps, *before, step),
            ));
        }
    }
    // The resumed checkpoint checked out against the model (setup): only now is the configuration written.
    if let (Some(dir), Some(_)) = (dir.as_deref(), &resumed) {
        dir.abandon_after(t.state.step, log)?;
    }
    if let Some(dir) = dir.as_deref() {
        dir.write_config(&cfg.to_toml())?;
        super::resume::record_inputs(dir.path(), &s.inputs, resumed.is_some())?;
    }
    let resumed_at = resumed.as_ref().map(|_| t.state.step);
    let mut metrics = dir.as_deref().map(|d| d.metrics_to(resumed_at, cfg.report_to)).transpose()?;
    let output = cfg.output.clone();

    let lora = s.lora.as_ref().map(|l| &l.config);
    let ckpt = |dir: &mut RunDir, trained: &Trained, optimizer: &Optimizer, state: &TrainerState| match checkpoint::save(
        &output,
        &s.model.config,
        trained,
        lora,
        &cfg.model,
        optimizer,
        state,
        total,
    ) {
        Ok(p) => {
            checkpoint::prune(&output, cfg.save_total_limit);
            dir.started();
            Ok(p)
        }
        Err(e) => Err(TrainError::CheckpointWrite {
            step: state.step,
            message: e.to_string(),
            newest: checkpoint::list(&output).pop().map(|(_, p)| p),
            output: output.clone(),
        }),
    };
    // Rank 0 writes the checkpoint; the other ranks of a data-parallel run only name it.
    let save = |dir: &mut Option<&mut RunDir>, trained: &Trained, optimizer: &Optimizer, state: &TrainerState| match dir
    {
        Some(dir) => ckpt(dir, trained, optimizer, state),
        None => Ok(checkpoint::checkpoints_dir(&output).join(format!("step-{}", state.step))),
    };

    let first_step = t.state.step;
    while t.state.step < total {
        if crate::dist::any(stop.load(Ordering::SeqCst)) {
            if t.state.step == first_step {
                // Not a step taken: no checkpoint (a resumed run's is still the newest), and a new run
                // leaves nothing that would stop the same command from starting it again.
                if let (Some(dir), None) = (dir.as_deref(), &resumed) {
                    dir.discard_unstarted(&metrics.take().map(|m| m.files()).unwrap_or_default());
                }
                let outcome = TrainOutcome {
                    steps: t.state.step,
                    total_steps: total,
                    final_dir: None,
                    checkpoint: None,
                    interrupted: true,
                };
                return Ok(outcome);
            }
            let p = save(&mut dir, &t.trained, &t.optimizer, &t.state)?;
            let outcome = TrainOutcome {
                steps: t.state.step,
                total_steps: total,
                final_dir: None,
                checkpoint: Some(p),
                interrupted: true,
            };
            return Ok(outcome);
        }
        let out = t.step(workload.as_ref())?;
        if let Some(what) = out.nonfinite {
            let rows_text = out.rows.iter().map(|&i| workload.location(i)).collect::<Vec<_>>().join(", ");
            match cfg.on_nonfinite {
                OnNonFinite::Stop => {
                    // The step was not applied: the weights and optimizer are still those after the last
                    // good step, and the checkpoint of that state resumes before this batch.
                    let checkpoint = save(&mut dir, &t.trained, &t.optimizer, &out.before)?;
                    return Err(TrainError::NonFinite {
                        step: out.before.step + 1,
                        what,
                        rows: rows_text,
                        checkpoint,
                        output: output.clone(),
                    });
                }
                OnNonFinite::Skip => {
                    log(&format!("step {}: {what} not finite (rows {rows_text}); step skipped", out.before.step + 1));
                }
            }
        }
        let state = &t.state;
        let mut line = serde_json::Map::new();
        line.insert("step".into(), state.step.into());
        line.insert("epoch".into(), (state.epoch as f64 + state.cursor as f64 / workload.rows() as f64).into());
        for (k, v) in &out.metrics {
            line.insert(k.clone(), (*v).into());
        }
        line.insert("grad_norm".into(), out.grad_norm.into());
        line.insert("learning_rate".into(), out.lr.into());
        line.insert("num_tokens".into(), state.num_tokens.into());
        line.insert("tokens_per_s".into(), (out.tokens as f64 / out.secs).into());
        if out.nonfinite.is_some() {
            line.insert("skipped".into(), true.into());
        }
        let step = state.step;
        let due = |every: u64| every > 0 && step.is_multiple_of(every);
        if let Some(ev) = eval.as_deref().filter(|_| due(cfg.eval_every) || step == total) {
            let m = t.evaluate(ev)?;
            line.extend(m.into_iter().map(|(k, v)| (format!("eval_{k}"), v.into())));
        }
        if let Some(metrics) = metrics.as_mut() {
            metrics.append(&serde_json::Value::Object(line))?;
        }
        if cfg.log_every > 0 && (step.is_multiple_of(cfg.log_every) || step == total) {
            log(&step_summary(step, total, &out));
        }
        if due(cfg.save_every) && step < total {
            save(&mut dir, &t.trained, &t.optimizer, &t.state)?;
        }
    }
    let checkpoint = save(&mut dir, &t.trained, &t.optimizer, &t.state)?;
    let final_dir = output.join("final");
    let (steps, total_steps) = (t.state.step, total);
    let Some(dir) = dir else {
        return Ok(TrainOutcome {
            steps,
            total_steps,
            final_dir: Some(final_dir),
            checkpoint: Some(checkpoint),
            interrupted: false,
        });
    };
    let final_error = TrainError::final_write(&checkpoint, &output);
    match (&t.trained, lora) {
        (Trained::Full(params), _) => {
            hf::save_model(&final_dir, &s.model.config, params, Some(&cfg.model)).map_err(final_error)?
        }
        (Trained::Adapter(adapter), Some(config)) => {
            // `--merge` is written by `train` once the run's state is freed ([`merge_final`]).
            hf::peft::save_adapter(&final_dir, config, adapter, &s.model.config).map_err(final_error)?;
        }
        (Trained::Adapter(_), None) => {
            return Err(TrainError::Invalid("a LoRA run's setup holds no adapter configuration".into()))
        }
    }
    dir.started();
    Ok(TrainOutcome {
        steps: t.state.step,
        total_steps: total,
        final_dir: Some(final_dir),
        checkpoint: Some(checkpoint),
        interrupted: false,
    })
}
