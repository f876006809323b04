//! The training loop shared by every objective on preference pairs:
//!
//! ```text
//! for each optimizer step:
//!     for each of grad_accum micro-batches (rows in file order or a seeded per-epoch shuffle):
//!         policy forward (activations kept) -> reference log-probs -> objective -> backward, scaled 1/grad_accum
//!     non-finite check -> clip global norm -> optimizer step at the scheduled rate -> metrics line
//!     evaluate / checkpoint when due; stop cleanly when interrupted
//! ```

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use engine::optim::{clip_grad_norm, lr_at, Optimizer, OptimizerConfig, ScheduleKind};
use engine::rng::Rng;
use engine::{Decoder, Params};

use super::checkpoint::{self, TrainerState};
use super::kto::KtoWorkload;
use super::memory::{self, MemoryPlan};
use super::pairs::{PairObjective, Workspace};
use super::reference::{default_cache_dir, precompute, Reference};
use super::workload::{PairWorkload, SftWorkload, Workload};
use super::{TrainConfig, TrainError};
use crate::data::{
    check_vocab, check_vocab_sft, load_pairs, load_sft, load_unpaired, pack_pairs, DataOptions, Example, Packing,
    SftExample, Truncation, UnpairedExample,
};
use crate::objectives::{parse_loss_list, KtoConfig, KtoLossType};

/// How a run ended.
#[derive(Debug)]
pub struct TrainOutcome {
    pub steps: u64,
    pub total_steps: u64,
    /// `OUTPUT/final`, written when the run completed.
    pub final_dir: Option<PathBuf>,
    /// Newest checkpoint written by this run.
    pub checkpoint: Option<PathBuf>,
    pub interrupted: bool,
}

/// Options that are about this invocation rather than the run's configuration.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Continue from this checkpoint (or the newest one in this run directory).
    pub resume: Option<PathBuf>,
    /// Replace a previous run in the output directory.
    pub overwrite: bool,
}

/// Everything a run needs besides the policy weights.
pub struct Setup {
    pub model: hf::HfModel,
    pub tokenizer: Option<hf::Tokenizer>,
    pub train: Vec<Example>,
    pub eval: Vec<Example>,
    pub objective: PairObjective,
    pub packing: Packing,
}

pub fn data_options(cfg: &TrainConfig) -> Result<DataOptions, TrainError> {
    let truncation: Truncation = cfg.truncation.parse().map_err(|e| TrainError::Invalid(format!("truncation: {e}")))?;
    Ok(DataOptions {
        max_length: cfg.max_length,
        max_prompt_length: cfg.max_prompt_length,
        truncation,
        skip_bad_rows: cfg.skip_bad_rows,
    })
}

pub fn optimizer_config(cfg: &TrainConfig) -> Result<OptimizerConfig, TrainError> {
    let (wd, m) = (cfg.weight_decay, cfg.momentum);
    Ok(match cfg.optimizer.as_str() {
        "adamw" => {
            OptimizerConfig::AdamW { beta1: cfg.adam_beta1, beta2: cfg.adam_beta2, eps: cfg.adam_eps, weight_decay: wd }
        }
        "rmsprop" => OptimizerConfig::RmsProp { alpha: 0.99, eps: 1e-8, weight_decay: wd, momentum: m },
        "sgd" => OptimizerConfig::Sgd { momentum: m, weight_decay: wd },
        other => return Err(TrainError::Invalid(format!("unknown optimizer {other:?}; use adamw, rmsprop or sgd"))),
    })
}

/// Loads the model, tokenizer and data a run needs, and reports what the data loading noticed.
pub fn prepare(cfg: &TrainConfig, log: &mut dyn FnMut(&str)) -> Result<Setup, TrainError> {
    cfg.validate()?;
    let model_cfg = hf::load_config(&cfg.model)?;
    let tokenizer = hf::load_tokenizer_if_present(&cfg.model)?;
    let opts = data_options(cfg)?;
    let load = |path: &Path, log: &mut dyn FnMut(&str)| -> Result<Vec<Example>, TrainError> {
        let loaded = load_pairs(path, tokenizer.as_ref(), &opts)?;
        log(&format!("{}: {}", path.display(), loaded.stats.summary()));
        check_vocab(path, &loaded.examples, model_cfg.decoder.vocab_size)?;
        if loaded.examples.is_empty() {
            return Err(TrainError::Invalid(format!("{}: no usable rows left", path.display())));
        }
        Ok(loaded.examples)
    };
    let train = load(&cfg.data, log)?;
    let eval = match &cfg.eval_data {
        Some(p) => load(p, log)?,
        None => Vec::new(),
    };
    let objective =
        PairObjective { losses: parse_loss_list(&cfg.loss, cfg.loss_weights.as_deref())?, cfg: cfg.objective.clone() };
    let packing = if cfg.prefix_sharing { Packing::SharedPrompt } else { Packing::Separate };
    // The memory check comes before the weights are loaded: a run that cannot fit stops at once.
    let reference = match &cfg.ref_model {
        _ if objective.reference_free() || cfg.precompute_ref => None,
        Some(dir) => Some(hf::load_config(dir)?.decoder),
        None => Some(model_cfg.decoder.clone()),
    };
    let row_tokens =
        train.iter().chain(&eval).map(|e| pack_pairs(&[e], packing).batch.len() as u64).collect::<Vec<_>>();
    let in_flight = match cfg.micro_pairs {
        m if m > 0 && objective.per_pair() => m.min(cfg.batch_size),
        _ => cfg.batch_size,
    };
    check_memory(cfg, &model_cfg.decoder, reference.as_ref(), row_tokens, in_flight, log)?;
    let model = hf::load_model(&cfg.model)?;
    Ok(Setup { model, tokenizer, train, eval, objective, packing })
}

/// Estimates the run's peak memory, logs it, and refuses a run that would not fit in `max_memory` (or
/// the machine's available memory).
fn check_memory(
    cfg: &TrainConfig,
    policy: &engine::DecoderConfig,
    reference: Option<&engine::DecoderConfig>,
    row_tokens: Vec<u64>,
    rows_in_flight: usize,
    log: &mut dyn FnMut(&str),
) -> Result<(), TrainError> {
    let plan =
        MemoryPlan { policy, optimizer: &optimizer_config(cfg)?, reference, row_tokens, batch_size: rows_in_flight };
    let est = memory::estimate(&plan);
    let limit = match &cfg.max_memory {
        Some(m) => Some((memory::parse_size(m).map_err(TrainError::Invalid)?, "the --max-memory limit of")),
        None => memory::available_memory().map(|b| (b, "the available memory (MemAvailable) of")),
    };
    let Some((limit, what)) = limit else {
        log(&format!("memory: {}", est.summary()));
        return Ok(());
    };
    log(&format!("memory: {}; limit {}", est.summary(), memory::human(limit)));
    if est.total() <= limit {
        return Ok(());
    }
    let advice = if est.activations >= est.weights {
        "lower --batch-size, --micro-pairs or --max-length"
    } else {
        "use a smaller model, --precompute-ref (no reference model in memory) or --optimizer sgd"
    };
    Err(TrainError::Memory(format!(
        "the run needs an estimated {} of memory, more than {what} {}: activations {} for the largest micro-batch \
         ({} rows, {} tokens), weights, gradient, optimizer and reference {}; {advice}, or pass --max-memory \
         SIZE to run anyway",
        memory::human(est.total()),
        memory::human(limit),
        memory::human(est.activations),
        est.batch_rows,
        est.batch_tokens,
        memory::human(est.weights),
    )))
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

/// Takes the next micro-batch of row indices, moving to the next epoch at the end of one.
fn next_micro_batch(state: &mut TrainerState, order: &mut Vec<usize>, cfg: &TrainConfig, rows: usize) -> Vec<usize> {
    if state.cursor >= order.len() {
        state.epoch += 1;
        state.cursor = 0;
        *order = epoch_order(rows, state.epoch, cfg.seed, !cfg.no_shuffle);
    }
    let end = (state.cursor + cfg.batch_size).min(order.len());
    let batch = order[state.cursor..end].to_vec();
    state.cursor = end;
    batch
}

/// Refuses to mix two runs in one directory; clears a previous run's files when asked to.
fn prepare_output(cfg: &TrainConfig, opts: &RunOptions) -> Result<(), TrainError> {
    let out = &cfg.output;
    let held = out.join("metrics.jsonl").exists() || checkpoint::checkpoints_dir(out).exists();
    if held && opts.resume.is_none() {
        if !opts.overwrite {
            return Err(TrainError::OutputExists(out.clone()));
        }
        for f in ["metrics.jsonl", "config.toml"] {
            let _ = std::fs::remove_file(out.join(f));
        }
        for d in ["checkpoints", "final"] {
            let p = out.join(d);
            if p.exists() {
                // Renamed away first, so that a crash while deleting leaves no half-deleted checkpoint.
                let doomed = out.join(format!(".{d}.tmp-{}-old", std::process::id()));
                std::fs::rename(&p, &doomed).map_err(|e| TrainError::io(&p, e))?;
                std::fs::remove_dir_all(&doomed).map_err(|e| TrainError::io(&doomed, e))?;
            }
        }
    }
    if out.exists() && !out.is_dir() {
        return Err(TrainError::Output { path: out.clone(), msg: "exists and is not a directory".into() });
    }
    std::fs::create_dir_all(out)
        .map_err(|e| TrainError::Output { path: out.clone(), msg: format!("cannot create the run directory ({e})") })?;
    let probe = out.join(".write-test");
    std::fs::write(&probe, b"")
        .map_err(|e| TrainError::Output { path: out.clone(), msg: format!("cannot write in it ({e})") })?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

/// Keeps the metrics lines of steps up to `step` (a resumed run rewrites what came after).
fn truncate_metrics(path: &Path, step: u64) -> Result<(), TrainError> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    crate::io::write_atomic(path, kept.as_bytes()).map_err(|e| TrainError::io(path, e))
}

/// Builds the reference for the training (and evaluation) examples.
fn build_reference(
    cfg: &TrainConfig,
    setup: &Setup,
    start: &Params,
    log: &mut dyn FnMut(&str),
) -> Result<(Reference, Reference), TrainError> {
    if setup.objective.reference_free() {
        return Ok((Reference::None, Reference::None));
    }
    let (decoder, params) = match &cfg.ref_model {
        Some(dir) => {
            let m = hf::load_model(dir)?;
            if m.config.decoder.vocab_size != setup.model.config.decoder.vocab_size {
                return Err(TrainError::Invalid(format!(
                    "reference {} has a vocabulary of {} tokens, the policy {}",
                    dir.display(),
                    m.config.decoder.vocab_size,
                    setup.model.config.decoder.vocab_size
                )));
            }
            (Decoder::new(m.config.decoder.clone()), m.params)
        }
        None => (Decoder::new(setup.model.config.decoder.clone()), start.clone()),
    };
    if !cfg.precompute_ref {
        let shared = std::sync::Arc::new((decoder, params));
        return Ok((Reference::Model(shared.clone()), Reference::Model(shared)));
    }
    let cache = cfg.cache_dir.clone().unwrap_or_else(default_cache_dir);
    let cached = |examples: &[Example], what: &str, log: &mut dyn FnMut(&str)| -> Result<Reference, TrainError> {
        if examples.is_empty() {
            return Ok(Reference::None);
        }
        let p = precompute(&decoder, &params, examples, setup.packing, cfg.batch_size, &cache, |_| {})?;
        log(&format!("reference log-probs of {} {what} rows {}", examples.len(), p.summary()));
        Ok(Reference::Cached(p.scores))
    };
    let train = cached(&setup.train, "training", log)?;
    let eval = cached(&setup.eval, "evaluation", log)?;
    Ok((train, eval))
}

/// One human-readable line per logged step (the full record goes to metrics.jsonl).
fn step_summary(step: u64, total: u64, m: &BTreeMap<String, f64>, grad_norm: f64, lr: f64, tps: f64) -> String {
    let mut s = format!("step {step}/{total}  loss {:.4}", m.get("loss").copied().unwrap_or(f64::NAN));
    if let (Some(acc), Some(margin)) = (m.get("rewards/accuracies"), m.get("rewards/margins")) {
        s += &format!("  reward acc {acc:.2}  margin {margin:+.4}");
    }
    s + &format!("  grad_norm {grad_norm:.3}  lr {lr:.2e}  {tps:.0} tok/s")
}

/// Mean of each metric over rows (TRL's names, unprefixed).
pub fn evaluate(
    decoder: &Decoder,
    params: &Params,
    workload: &dyn Workload,
    batch_size: usize,
    ws: &mut Workspace,
) -> Result<BTreeMap<String, f64>, TrainError> {
    let mut sums: BTreeMap<String, f64> = BTreeMap::new();
    let rows: Vec<usize> = (0..workload.rows()).collect();
    for chunk in rows.chunks(batch_size.max(1)) {
        let out = workload.run(decoder, params, None, chunk, ws)?;
        for (k, v) in out.metrics {
            *sums.entry(k).or_default() += v * chunk.len() as f64;
        }
    }
    let n = workload.rows().max(1) as f64;
    Ok(sums.into_iter().map(|(k, v)| (k, v / n)).collect())
}

/// Trains on preference pairs (DPO and its variants) as configured, or resumes such a run.
pub fn train(
    cfg: &TrainConfig,
    opts: &RunOptions,
    stop: &AtomicBool,
    log: &mut dyn FnMut(&str),
) -> Result<TrainOutcome, TrainError> {
    if let Some(kind) = kto_loss_type(&cfg.loss) {
        return train_kto(cfg, opts, kind, stop, log);
    }
    prepare_output(cfg, opts)?;
    let setup = prepare(cfg, log)?;
    let (train_ref, eval_ref) = build_reference(cfg, &setup, &setup.model.params, log)?;
    let train = PairWorkload {
        examples: &setup.train,
        reference: &train_ref,
        objective: &setup.objective,
        packing: setup.packing,
        micro_pairs: cfg.micro_pairs,
    };
    // A model reference serves both data sets; a cache holds the evaluation rows separately.
    let eval_reference = if matches!(eval_ref, Reference::None) { &train_ref } else { &eval_ref };
    let eval = PairWorkload { examples: &setup.eval, reference: eval_reference, ..train };
    let eval = (!setup.eval.is_empty()).then_some(&eval as &dyn Workload);
    run_loop(cfg, opts, &setup.model, &train, eval, stop, log)
}

/// `kto` or `apo_zero_unpaired` selects training on unpaired rows (`prompt`, `completion`, `label`).
fn kto_loss_type(loss: &str) -> Option<KtoLossType> {
    match loss.trim() {
        "kto" => Some(KtoLossType::Kto),
        "apo_zero_unpaired" => Some(KtoLossType::ApoZeroUnpaired),
        _ => None,
    }
}

/// KTO on unpaired rows (preference rows are split into a desirable and an undesirable row, as TRL does),
/// against a reference model (`--ref-model` or the starting weights).
fn train_kto(
    cfg: &TrainConfig,
    opts: &RunOptions,
    loss_type: KtoLossType,
    stop: &AtomicBool,
    log: &mut dyn FnMut(&str),
) -> Result<TrainOutcome, TrainError> {
    prepare_output(cfg, opts)?;
    cfg.validate()?;
    if cfg.precompute_ref {
        return Err(TrainError::Invalid(
            "--precompute-ref does not apply to KTO: its KL pairs are formed per batch".into(),
        ));
    }
    let model = hf::load_model(&cfg.model)?;
    let tokenizer = hf::load_tokenizer_if_present(&cfg.model)?;
    let data_opts = data_options(cfg)?;
    let load = |path: &Path, log: &mut dyn FnMut(&str)| -> Result<Vec<UnpairedExample>, TrainError> {
        let loaded = load_unpaired(path, tokenizer.as_ref(), &data_opts)?;
        log(&format!("{}: {}", path.display(), loaded.stats.summary()));
        Ok(loaded.examples)
    };
    let train_rows = load(&cfg.data, log)?;
    let eval_rows = match &cfg.eval_data {
        Some(p) => load(p, log)?,
        None => Vec::new(),
    };
    let reference = match &cfg.ref_model {
        Some(dir) => {
            let m = hf::load_model(dir)?;
            Reference::Model(std::sync::Arc::new((Decoder::new(m.config.decoder.clone()), m.params)))
        }
        None => {
            Reference::Model(std::sync::Arc::new((Decoder::new(model.config.decoder.clone()), model.params.clone())))
        }
    };
    let kto = KtoConfig { loss_type, beta: cfg.objective.beta, ..Default::default() };
    let train = KtoWorkload { examples: &train_rows, reference: &reference, cfg: kto.clone() };
    let eval = KtoWorkload { examples: &eval_rows, reference: &reference, cfg: kto };
    let eval = (!eval_rows.is_empty()).then_some(&eval as &dyn Workload);
    run_loop(cfg, opts, &model, &train, eval, stop, log)
}

/// Supervised fine-tuning (the reference model of DPO, or the paper's preferred-FT) on prompt/completion
/// rows or on the chosen side of preference rows.
pub fn train_sft(
    cfg: &TrainConfig,
    opts: &RunOptions,
    stop: &AtomicBool,
    log: &mut dyn FnMut(&str),
) -> Result<TrainOutcome, TrainError> {
    prepare_output(cfg, opts)?;
    cfg.validate()?;
    let model_cfg = hf::load_config(&cfg.model)?;
    let tokenizer = hf::load_tokenizer_if_present(&cfg.model)?;
    let data_opts = data_options(cfg)?;
    let load = |path: &Path, log: &mut dyn FnMut(&str)| -> Result<Vec<SftExample>, TrainError> {
        let loaded = load_sft(path, tokenizer.as_ref(), &data_opts)?;
        log(&format!("{}: {}", path.display(), loaded.stats.summary()));
        check_vocab_sft(path, &loaded.examples, model_cfg.decoder.vocab_size)?;
        Ok(loaded.examples)
    };
    let train_rows = load(&cfg.data, log)?;
    let eval_rows = match &cfg.eval_data {
        Some(p) => load(p, log)?,
        None => Vec::new(),
    };
    let row_tokens = train_rows.iter().chain(&eval_rows).map(|e| (e.prompt_ids.len() + e.completion_ids.len()) as u64);
    check_memory(cfg, &model_cfg.decoder, None, row_tokens.collect(), cfg.batch_size, log)?;
    let model = hf::load_model(&cfg.model)?;
    let train = SftWorkload { examples: &train_rows };
    let eval = SftWorkload { examples: &eval_rows };
    let eval = (!eval_rows.is_empty()).then_some(&eval as &dyn Workload);
    run_loop(cfg, opts, &model, &train, eval, stop, log)
}

/// The loop itself, for any workload. `stop` is polled between steps: when set, a checkpoint is written
/// and the run returns with `interrupted`.
fn run_loop(
    cfg: &TrainConfig,
    opts: &RunOptions,
    model: &hf::HfModel,
    workload: &dyn Workload,
    eval: Option<&dyn Workload>,
    stop: &AtomicBool,
    log: &mut dyn FnMut(&str),
) -> Result<TrainOutcome, TrainError> {
    let decoder = Decoder::new(model.config.decoder.clone());
    let opt_cfg = optimizer_config(cfg)?;
    let schedule: ScheduleKind = cfg.scheduler.parse().map_err(|e| TrainError::Invalid(format!("{e}")))?;
    let rows = workload.rows();
    let total = total_steps(cfg, rows);

    // Resuming replaces the starting weights, the optimizer and the position; the reference is still the
    // starting model (or --ref-model), never the checkpoint.
    let (mut params, mut optimizer, mut state) = match &opts.resume {
        Some(path) => {
            let c = checkpoint::load(path, opt_cfg)?;
            log(&format!("resuming at step {} from {}", c.state.step, path.display()));
            (c.model.params, c.optimizer, c.state)
        }
        None => {
            let p = model.params.clone();
            let o = Optimizer::new(opt_cfg, &p);
            (p, o, TrainerState { step: 0, epoch: 0, cursor: 0, num_tokens: 0, skipped_steps: 0 })
        }
    };
    let config_path = cfg.output.join("config.toml");
    crate::io::write_atomic(&config_path, cfg.to_toml().as_bytes()).map_err(|e| TrainError::io(&config_path, e))?;
    let metrics_path = cfg.output.join("metrics.jsonl");
    if opts.resume.is_some() {
        truncate_metrics(&metrics_path, state.step)?;
    } else {
        let _ = std::fs::remove_file(&metrics_path);
    }
    let mut metrics_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(|e| TrainError::io(&metrics_path, e))?;

    let mut order = epoch_order(rows, state.epoch, cfg.seed, !cfg.no_shuffle);
    let mut grads = Params::zeros(&decoder.cfg);
    let mut ws = Workspace::default();
    // The newest checkpoint this run wrote: the same state is not written twice (an interruption or a
    // non-finite step right after a periodic save reuses it).
    let mut newest: Option<(u64, PathBuf)> = None;
    let mut save = |params: &Params, optimizer: &Optimizer, state: &TrainerState| {
        if let Some((_, p)) = newest.as_ref().filter(|(step, _)| *step == state.step) {
            return Ok(p.clone());
        }
        match checkpoint::save(&cfg.output, &model.config, params, &cfg.model, optimizer, state) {
            Ok(p) => {
                checkpoint::prune(&cfg.output, cfg.save_total_limit);
                newest = Some((state.step, p.clone()));
                Ok(p)
            }
            Err(e) => Err(TrainError::CheckpointWrite {
                step: state.step,
                message: e.to_string(),
                newest: checkpoint::list(&cfg.output).pop().map(|(_, p)| p),
                output: cfg.output.clone(),
            }),
        }
    };

    while state.step < total {
        if stop.load(Ordering::SeqCst) {
            let p = save(&params, &optimizer, &state)?;
            return Ok(TrainOutcome {
                steps: state.step,
                total_steps: total,
                final_dir: None,
                checkpoint: Some(p),
                interrupted: true,
            });
        }
        let t0 = Instant::now();
        let before = state.clone();
        let mut sums: BTreeMap<String, f64> = BTreeMap::new();
        let mut step_rows = Vec::new();
        let mut step_tokens = 0u64;
        let mut finite = true;
        let scale = 1.0 / cfg.grad_accum as f64;
        for _ in 0..cfg.grad_accum {
            let batch = next_micro_batch(&mut state, &mut order, cfg, rows);
            let out = workload.run(&decoder, &params, Some((&mut grads, scale)), &batch, &mut ws)?;
            finite &= out.finite;
            step_tokens += out.num_tokens;
            for (k, v) in out.metrics {
                *sums.entry(k).or_default() += v * scale;
            }
            step_rows.extend(batch);
        }
        let grad_norm = if finite { clip_grad_norm(&mut grads, cfg.max_grad_norm) } else { f64::NAN };
        let lr = lr_at(schedule, cfg.lr, cfg.warmup_steps, total, state.step);
        state.num_tokens += step_tokens;
        let applied = finite && grad_norm.is_finite();
        if applied {
            optimizer.step(&mut params, &grads, lr);
        } else {
            let what = if finite { "gradient" } else { "loss" };
            let rows_text = step_rows.iter().map(|&i| workload.location(i)).collect::<Vec<_>>().join(", ");
            match cfg.on_nonfinite {
                super::OnNonFinite::Stop => {
                    // The step was not applied: the weights and optimizer are still those after the last
                    // good step, and the checkpoint of that state resumes before this batch.
                    let checkpoint = save(&params, &optimizer, &before)?;
                    return Err(TrainError::NonFinite {
                        step: state.step + 1,
                        what,
                        rows: rows_text,
                        checkpoint,
                        output: cfg.output.clone(),
                    });
                }
                super::OnNonFinite::Skip => {
                    state.skipped_steps += 1;
                    log(&format!("step {}: {what} not finite (rows {rows_text}); step skipped", state.step + 1));
                }
            }
        }
        grads.fill_zero();
        state.step += 1;

        let secs = t0.elapsed().as_secs_f64();
        let mut line = serde_json::Map::new();
        line.insert("step".into(), state.step.into());
        line.insert("epoch".into(), (state.epoch as f64 + state.cursor as f64 / rows as f64).into());
        for (k, v) in &sums {
            line.insert(k.clone(), (*v).into());
        }
        line.insert("grad_norm".into(), grad_norm.into());
        line.insert("learning_rate".into(), lr.into());
        line.insert("num_tokens".into(), state.num_tokens.into());
        line.insert("tokens_per_s".into(), (step_tokens as f64 / secs).into());
        if !applied {
            line.insert("skipped".into(), true.into());
        }
        let due = |every: u64| every > 0 && state.step.is_multiple_of(every);
        if let Some(ev) = eval.filter(|_| due(cfg.eval_every) || state.step == total) {
            let m = evaluate(&decoder, &params, ev, cfg.batch_size, &mut ws)?;
            line.extend(m.into_iter().map(|(k, v)| (format!("eval_{k}"), v.into())));
        }
        let text = serde_json::Value::Object(line).to_string();
        writeln!(metrics_file, "{text}").map_err(|e| TrainError::io(&metrics_path, e))?;
        metrics_file.flush().map_err(|e| TrainError::io(&metrics_path, e))?;
        if cfg.log_every > 0 && (state.step.is_multiple_of(cfg.log_every) || state.step == total) {
            log(&step_summary(state.step, total, &sums, grad_norm, lr, step_tokens as f64 / secs));
        }
        if due(cfg.save_every) && state.step < total {
            save(&params, &optimizer, &state)?;
        }
    }
    let checkpoint = save(&params, &optimizer, &state)?;
    let final_dir = cfg.output.join("final");
    hf::save_model(&final_dir, &model.config, &params, Some(&cfg.model)).map_err(|e| TrainError::FinalWrite {
        message: e.to_string(),
        checkpoint: checkpoint.clone(),
        output: cfg.output.clone(),
    })?;
    let checkpoint = Some(checkpoint);
    Ok(TrainOutcome {
        steps: state.step,
        total_steps: total,
        final_dir: Some(final_dir),
        checkpoint,
        interrupted: false,
    })
}
