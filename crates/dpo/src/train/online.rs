//! Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"; TRL's
//! `OnlineDPOTrainer`) as a workload of the training loop: the rows are prompts, and every micro-batch
//! samples `samples` completions of each of its prompts from the *current* policy, has a judge score
//! them, pairs the best against the worst, and takes the DPO objective's gradient on those pairs.
//!
//! ```text
//! rows (prompts) -> generate K samples each (policy as it is now, no dropout)
//!                -> judge(prompt, completion) - missing_eos_penalty if no EOS   (TRL's scores)
//!                -> chosen = first best, rejected = last worst                   (K = 2: TRL's mask s0 >= s1)
//!                -> pair_batch (the offline DPO micro-batch) on those pairs
//! ```
//!
//! Sampling draws from the loop's per-step seed (the one an adapter's dropout uses), so a run's samples
//! depend on the run's seed and the step only. [`train_online`] drives the loop's [`Trainer`] over a
//! prompt file and writes the run like `dpo train` (config.toml, metrics.jsonl, checkpoints, final/).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use engine::generate::{generate, Generation, SamplingConfig};
use engine::model::{Grads, Model};
use engine::rng::Rng;
use engine::Decoder;

use super::checkpoint;
use super::lora::LoraRun;
use super::pairs::{pair_batch, BatchOutcome, PairObjective, Workspace};
use super::reference::{Reference, ReferenceModel};
use super::run_dir::RunDir;
use super::setup::RunOptions;
use super::train_loop::{TrainOutcome, Trainer};
use super::{Objective, TrainConfig, TrainError, Trained, Workload};
use crate::data::{Example, Packing};
use crate::rlhf::best_of_n::{first_best, last_worst};

/// Scores `(prompt, completion)` token sequences, higher is better: a reward model, an implicit reward,
/// a ground truth.
pub type JudgeFn<'a> = dyn Fn(&[(&[u32], &[u32])]) -> Result<Vec<f64>, String> + 'a;

/// How the policy is sampled and its samples scored.
#[derive(Clone, Debug)]
pub struct OnlineSampling {
    /// Completions per prompt (TRL: 2).
    pub samples: usize,
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub eos_ids: Vec<u32>,
    /// Subtracted from the score of a completion that ends without an EOS token (TRL's
    /// `missing_eos_penalty`); `None`: no penalty.
    pub missing_eos_penalty: Option<f64>,
}

impl OnlineSampling {
    /// Refuses what the labels cannot honour, naming it, before anything is sampled or written: a penalty
    /// that is not a finite number scores every unfinished completion as NaN or infinity (TRL's too).
    pub fn check(&self) -> Result<(), TrainError> {
        match self.missing_eos_penalty {
            Some(p) if !p.is_finite() => {
                Err(TrainError::Invalid(format!("missing_eos_penalty {p} is not a finite number")))
            }
            _ => Ok(()),
        }
    }
}

/// Labels the `samples` generations of each prompt (in prompt order, as [`generate`] returns them) by
/// their scores: chosen the first highest, rejected the last lowest, so two equal samples give
/// (0, 1) as TRL's `scores[0] >= scores[1]` does. Scores are the judge's, less the penalty of a
/// completion without EOS. Returns the pairs and the penalised scores.
pub fn label_pairs(
    prompts: &[&[u32]],
    gens: &[Generation],
    scores: &[f64],
    samples: usize,
    missing_eos_penalty: Option<f64>,
) -> (Vec<Example>, Vec<f64>) {
    let scores: Vec<f64> = gens
        .iter()
        .zip(scores)
        .map(|(g, &s)| if g.finished { s } else { s - missing_eos_penalty.unwrap_or(0.0) })
        .collect();
    let mut pairs = Vec::with_capacity(prompts.len());
    for (p, (group, s)) in gens.chunks_exact(samples).zip(scores.chunks_exact(samples)).enumerate() {
        let Some(best) = first_best(s) else { continue };
        // The last lowest: never the first highest with two samples or more (all equal: the last one, as
        // TRL's s0 >= s1 makes sample 1 the rejected one).
        let Some(worst) = last_worst(s).filter(|&w| w != best) else { continue };
        pairs.push(Example::new(
            format!("online prompt {p} samples {best}/{worst}"),
            prompts[p].to_vec(),
            group[best].tokens.clone(),
            group[worst].tokens.clone(),
        ));
    }
    (pairs, scores)
}

/// The file in an online run's directory that records what decides its samples (see [`train_online`]).
pub const ONLINE_JSON: &str = "online.json";

/// Prompts under online DPO, a workload of the training loop.
pub struct OnlineDpoWorkload<'a> {
    pub prompts: &'a [Vec<u32>],
    pub reference: &'a Reference,
    pub objective: &'a PairObjective,
    pub judge: &'a JudgeFn<'a>,
    pub sampling: OnlineSampling,
    pub packing: Packing,
    /// Seed of the samples when the loop gives none (evaluation).
    pub seed: u64,
    /// The pairs of the last micro-batch (for logging and tests).
    pub last_pairs: RefCell<Vec<Example>>,
}

impl Workload for OnlineDpoWorkload<'_> {
    fn rows(&self) -> usize {
        self.prompts.len()
    }

    fn location(&self, row: usize) -> String {
        format!("prompt {}", row + 1)
    }

    fn run(
        &self,
        decoder: &Decoder,
        model: Model<'_>,
        grads: Option<(Grads<'_>, f64)>,
        rows: &[usize],
        ws: &mut Workspace,
    ) -> Result<BatchOutcome, TrainError> {
        let s = &self.sampling;
        if s.samples < 2 {
            return Err(TrainError::Invalid(format!(
                "online DPO needs at least 2 samples per prompt, got {}",
                s.samples
            )));
        }
        let prompts: Vec<Vec<u32>> = rows.iter().map(|&r| self.prompts[r].clone()).collect();
        let cfg = SamplingConfig {
            temperature: s.temperature,
            max_new_tokens: s.max_new_tokens,
            eos_ids: s.eos_ids.clone(),
            ..Default::default()
        };
        let seed = model.dropout_seed.unwrap_or(self.seed) ^ 0x0D11_5E5D;
        let sampler = Model { dropout_seed: None, ..model };
        let gens = generate(decoder, sampler, &prompts, s.samples, &cfg, &mut Rng::new(seed))?;
        let items: Vec<(&[u32], &[u32])> = gens.iter().map(|g| (&prompts[g.prompt_index][..], &g.tokens[..])).collect();
        let judged = (self.judge)(&items).map_err(|e| TrainError::Invalid(format!("the online judge: {e}")))?;
        if judged.len() != items.len() || judged.iter().any(|v| v.is_nan()) {
            return Err(TrainError::Invalid(format!(
                "the online judge returned {} scores (NaN among them: {}) for {} completions",
                judged.len(),
                judged.iter().any(|v| v.is_nan()),
                items.len()
            )));
        }
        let refs: Vec<&[u32]> = prompts.iter().map(|p| &p[..]).collect();
        let (pairs, scores) = label_pairs(&refs, &gens, &judged, s.samples, s.missing_eos_penalty);
        let idx: Vec<usize> = (0..pairs.len()).collect();
        let mut out =
            pair_batch(decoder, model, grads, self.reference, self.objective, &pairs, &idx, self.packing, 0, ws)?;
        let n = gens.len().max(1) as f64;
        let mean_score = scores.iter().sum::<f64>() / n;
        let eos = gens.iter().filter(|g| g.finished).count() as f64 / n;
        let len = gens.iter().map(|g| g.tokens.len()).sum::<usize>() as f64 / n;
        out.metrics.extend(BTreeMap::from([
            ("objective/scores".to_string(), mean_score),
            ("val/contain_eos_token".to_string(), eos),
            ("val/completion_length".to_string(), len),
        ]));
        *self.last_pairs.borrow_mut() = pairs;
        Ok(out)
    }
}

/// The judge of an online run: what scores the samples, and what it is (a reward model's directory,
/// say), recorded in `online.json` so that a resume keeps it.
pub struct OnlineJudge<'a> {
    pub name: String,
    pub score: &'a JudgeFn<'a>,
}

/// Online DPO from `cfg.model` (every weight trained; the reference `cfg.ref_model` or the model
/// itself) over `prompts`, `cfg.batch_size` prompts per micro-batch, for `cfg.max_steps` steps (or
/// `cfg.epochs` passes over the prompts), scored by `judge`. The run directory is written as `dpo
/// train` writes it (`opts.overwrite` replaces a run there), with `online.json`, the settings that decide
/// its samples. An interrupted run keeps its checkpoint, and `opts.resume` continues it: a step's samples
/// depend only on the run's seed, the step and the weights, so the resumed run ends with the weights of
/// an uninterrupted one; a resume that changes the sampling, the judge or the prompts is refused.
pub fn train_online(
    cfg: &TrainConfig,
    sampling: &OnlineSampling,
    prompts: &[Vec<u32>],
    judge: &OnlineJudge,
    opts: &RunOptions,
    stop: &AtomicBool,
    log: &mut dyn FnMut(&str),
) -> Result<TrainOutcome, TrainError> {
    let Objective::Pairs(objective) = &cfg.objective else {
        return Err(TrainError::Invalid("online DPO trains a pair objective (the DPO family)".into()));
    };
    if cfg.base_storage != engine::quant::Storage::F32 {
        return Err(TrainError::Invalid(
            "online DPO samples from an f32 base; a stored (bf16/NF4) base is not supported here".into(),
        ));
    }
    if prompts.is_empty() {
        return Err(TrainError::Invalid("online DPO needs at least one prompt".into()));
    }
    sampling.check()?;
    if let Some(e) = &cfg.eval_data {
        return Err(TrainError::Invalid(format!(
            "online DPO does not evaluate held-out data (eval_data {}); score the final model with dpo eval",
            e.display()
        )));
    }
    super::run_dir::refuse_inputs_inside(&cfg.output, opts.start_mode(), &super::setup::inputs(cfg))?;
    // A LoRA run (--lora-r, or --adapter to go on training one) trains an adapter on the frozen model, as
    // `dpo train` does: the samples come from the base with the adapter as it is now.
    let mut cfg = cfg.clone();
    let model_cfg = hf::load_config(&cfg.model)?;
    let lora = LoraRun::prepare(&mut cfg, &model_cfg)?;
    let cfg = &cfg;
    // Compared once an --adapter's settings are filled in, as the run recorded them.
    if let Some(resume) = &opts.resume {
        super::resume::check_settings(resume, cfg)?;
    }
    let mut model = hf::load_model(&cfg.model)?;
    let start = super::setup::start_point(cfg, opts, &model, lora.as_ref(), log)?;
    let inputs = super::resume::input_fingerprints(cfg)?;
    if let Some(resume) = &opts.resume {
        super::resume::check_inputs(resume, cfg, &inputs)?;
    }
    let ref_dir = cfg.ref_model.clone().unwrap_or_else(|| cfg.model.clone());
    let reference = match &lora {
        // The reference is the base with the starting adapter (none, or --adapter's), read from the policy.
        Some(l) if cfg.ref_model.is_none() => Reference::PolicyBase(l.start.clone()),
        // Samples come from the trained copy: the reference takes the loaded weights themselves.
        None if ref_dir == cfg.model => {
            let decoder = Decoder::new(model.config.decoder.clone());
            let weights = super::setup::take_loaded_weights(&mut model);
            let held = ReferenceModel::new(decoder, weights, cfg.precision)
                .map_err(|e| TrainError::Invalid(format!("the reference: {e}")))?;
            Reference::Model(Arc::new(held))
        }
        _ => Reference::load(&ref_dir, &model.config, None, cfg.precision)?,
    };
    if lora.is_none() {
        // Samples come from the trained copy; the reference holds its own.
        super::setup::free_loaded_weights(&mut model);
    }
    let workload = OnlineDpoWorkload {
        prompts,
        reference: &reference,
        objective,
        judge: judge.score,
        sampling: sampling.clone(),
        packing: if cfg.prefix_sharing { Packing::SharedPrompt } else { Packing::Separate },
        seed: cfg.seed,
        last_pairs: RefCell::new(Vec::new()),
    };
    // Interrupted while loading: the run stops before its directory is touched, as `train` does.
    if stop.load(Ordering::SeqCst) {
        let (steps, total_steps) = (start.state.step, super::total_steps(cfg, prompts.len()));
        return Ok(TrainOutcome { steps, total_steps, final_dir: None, checkpoint: None, interrupted: true });
    }
    let mut dir = RunDir::open(&cfg.output, opts.start_mode(), log)?;
    // The run's length (and what a resume may change besides, as `check_settings` compared above) does
    // not decide its samples: a finished run may be extended. Records of older runs hold `max_steps`.
    let free = super::resume::MAY_CHANGE_ON_RESUME;
    let mut record = super::iterative::sampled_run_settings(cfg, sampling, &judge.name, prompts);
    if let Some(o) = record.as_object_mut() {
        o.retain(|k, _| !free.contains(&k.as_str()));
    }
    let resumed_at = start.resumed.as_ref().map(|_| start.state.step);
    if resumed_at.is_none() {
        let _ = std::fs::remove_file(cfg.output.join(ONLINE_JSON));
    }
    super::iterative::check_recorded(
        &cfg.output.join(ONLINE_JSON),
        &record,
        "its steps were sampled with other settings",
        "resume it with the same --online flags, judge and prompts",
        &free,
    )?;
    if let Some(step) = resumed_at {
        dir.abandon_after(step, log)?;
    }
    dir.write_config(&cfg.to_toml())?;
    super::resume::record_inputs(dir.path(), &inputs, resumed_at.is_some())?;
    let mut metrics = dir.metrics_to(resumed_at, cfg.report_to)?;
    let decoder = Decoder::new(model.config.decoder.clone());
    let base = lora.as_ref().map(|_| super::setup::base_model(&model, None, None, cfg.precision));
    let mut t = Trainer::new(cfg, decoder, start.trained, base, start.optimizer, start.state, prompts.len())?;
    let total = t.total;
    let output = cfg.output.clone();
    let lora_cfg = lora.as_ref().map(|l| &l.config);
    let save = |dir: &mut RunDir, t: &Trainer| -> Result<std::path::PathBuf, TrainError> {
        let (opt, state) = (&t.optimizer, &t.state);
        let p = checkpoint::save(&output, &model.config, &t.trained, lora_cfg, &cfg.model, opt, state, total)?;
        checkpoint::prune(&output, cfg.save_total_limit);
        dir.started();
        Ok(p)
    };
    let first_step = t.state.step;
    while t.state.step < total {
        if stop.load(Ordering::SeqCst) {
            if t.state.step == first_step {
                // Not a step taken: no checkpoint (a resumed run's is still the newest), and a new run
                // leaves nothing that would stop the same command from starting it again.
                if resumed_at.is_none() {
                    let mut written = metrics.files();
                    written.push(cfg.output.join(ONLINE_JSON));
                    dir.discard_unstarted(&written);
                }
                return Ok(TrainOutcome {
                    steps: t.state.step,
                    total_steps: total,
                    final_dir: None,
                    checkpoint: None,
                    interrupted: true,
                });
            }
            let p = save(&mut dir, &t)?;
            return Ok(TrainOutcome {
                steps: t.state.step,
                total_steps: total,
                final_dir: None,
                checkpoint: Some(p),
                interrupted: true,
            });
        }
        let out = t.step(&workload)?;
        if let Some(what) = out.nonfinite {
            log(&format!("step {}: {what} not finite; step skipped", out.before.step + 1));
        }
        let step = t.state.step;
        let mut line = serde_json::Map::new();
        line.insert("step".into(), step.into());
        for (k, v) in &out.metrics {
            line.insert(k.clone(), (*v).into());
        }
        line.insert("grad_norm".into(), out.grad_norm.into());
        line.insert("learning_rate".into(), out.lr.into());
        line.insert("num_tokens".into(), t.state.num_tokens.into());
        metrics.append(&serde_json::Value::Object(line))?;
        if cfg.log_every > 0 && (step.is_multiple_of(cfg.log_every) || step == total) {
            let m = &out.metrics;
            let get = |k: &str| m.get(k).copied().unwrap_or(f64::NAN);
            log(&format!(
                "step {step}/{total}  loss {:.4}  score {:+.3}  margin {:+.4}  eos {:.2}  grad_norm {:.3}",
                get("loss"),
                get("objective/scores"),
                get("rewards/margins"),
                get("val/contain_eos_token"),
                out.grad_norm
            ));
        }
        if cfg.save_every > 0 && step.is_multiple_of(cfg.save_every) && step < total {
            save(&mut dir, &t)?;
        }
    }
    let checkpoint = save(&mut dir, &t)?;
    let final_dir = output.join("final");
    let final_error = TrainError::final_write(&checkpoint, &output);
    match (&t.trained, lora_cfg) {
        (Trained::Full(params), _) => {
            hf::save_model(&final_dir, &model.config, params, Some(&cfg.model)).map_err(final_error)?
        }
        (Trained::Adapter(adapter), Some(config)) => {
            hf::peft::save_adapter(&final_dir, config, adapter, &model.config).map_err(final_error)?;
            if cfg.merge {
                let merged = output.join(super::MERGED_DIR);
                let dtype = super::train_loop::merged_dtype(cfg.merge_dtype, &cfg.model).map_err(final_error)?;
                hf::peft::save_merged(&merged, hf::peft::MergeBase::Loaded(&model), adapter, dtype)
                    .map_err(final_error)?;
                log(&format!("merged model written to {} ({})", merged.display(), dtype.name()));
            }
        }
        (Trained::Adapter(_), None) => return Err(TrainError::Invalid("an adapter with no LoRA configuration".into())),
    }
    dir.started();
    Ok(TrainOutcome {
        steps: total,
        total_steps: total,
        final_dir: Some(final_dir),
        checkpoint: Some(checkpoint),
        interrupted: false,
    })
}

#[cfg(test)]
mod tests {
    use engine::optim::Optimizer;
    use engine::presets::init_random;
    use engine::{DecoderConfig, Dims, Params};

    use super::checkpoint::TrainerState;
    use super::*;
    use crate::objectives::{LossConfig, LossType};
    use crate::train::PairWorkload;

    fn gen(tokens: &[u32], finished: bool) -> Generation {
        Generation { prompt_index: 0, tokens: tokens.to_vec(), logps: vec![0.0; tokens.len()], finished }
    }

    /// By hand: prompt A's samples score (0.2, 0.9): chosen 1, rejected 0. Prompt B's (0.5, 0.5) tie:
    /// chosen 0, rejected 1, as TRL's `scores[0] >= scores[1]`. With three samples (0.1, 0.7, 0.1):
    /// chosen 1, rejected the last lowest, 2. The EOS penalty 1.0 turns (0.9 unfinished, 0.2) into
    /// (-0.1, 0.2): the finished sample wins.
    #[test]
    fn labels_follow_the_scores() {
        let (a, b) = (&[1u32, 2][..], &[3u32][..]);
        let gens = [gen(&[4], true), gen(&[5], true), gen(&[6], true), gen(&[7], true)];
        let (pairs, _) = label_pairs(&[a, b], &gens, &[0.2, 0.9, 0.5, 0.5], 2, None);
        assert_eq!((pairs[0].chosen_ids.clone(), pairs[0].rejected_ids.clone()), (vec![5], vec![4]));
        assert_eq!((pairs[1].chosen_ids.clone(), pairs[1].rejected_ids.clone()), (vec![6], vec![7]));
        assert_eq!(pairs[1].prompt_ids, vec![3]);
        let three = [gen(&[4], true), gen(&[5], true), gen(&[6], true)];
        let (pairs, _) = label_pairs(&[a], &three, &[0.1, 0.7, 0.1], 3, None);
        assert_eq!((pairs[0].chosen_ids.clone(), pairs[0].rejected_ids.clone()), (vec![5], vec![6]));
        let penalised = [gen(&[4], false), gen(&[5, 0], true)];
        let (pairs, scores) = label_pairs(&[a], &penalised, &[0.9, 0.2], 2, Some(1.0));
        assert_eq!(scores, vec![0.9 - 1.0, 0.2]);
        assert_eq!((pairs[0].chosen_ids.clone(), pairs[0].rejected_ids.clone()), (vec![5, 0], vec![4]));
    }

    fn tiny() -> (DecoderConfig, Params) {
        let cfg = DecoderConfig::gpt2(Dims {
            vocab_size: 32,
            hidden: 16,
            n_layers: 2,
            n_heads: 2,
            n_kv_heads: 2,
            head_dim: 8,
            ffn_hidden: 32,
            max_positions: 64,
        });
        let params = init_random(&cfg, 0.5, 7);
        (cfg, params)
    }

    /// One online step is, by construction, the offline DPO step on the pairs it sampled and labelled:
    /// the same loss (ln 2 at the first step, where the policy is its reference), the same updated
    /// weights, bit for bit; each pair's chosen completion is the one the judge scored higher.
    #[test]
    fn an_online_step_is_the_dpo_step_on_its_labelled_samples() {
        let (dcfg, params) = tiny();
        let prompts = vec![vec![1, 2, 3], vec![4, 5], vec![6, 7, 8, 9]];
        // The judge: the sum of the completion's token ids, a deterministic stand-in for a reward model.
        let judge = |items: &[(&[u32], &[u32])]| -> Result<Vec<f64>, String> {
            Ok(items.iter().map(|(_, c)| c.iter().map(|&t| t as f64).sum()).collect())
        };
        let objective = PairObjective {
            losses: vec![(LossType::Sigmoid, 1.0)],
            cfg: LossConfig { beta: 0.1, ..Default::default() },
        };
        let cfg = TrainConfig { lr: 1e-2, batch_size: 3, max_steps: Some(1), no_shuffle: true, ..Default::default() };
        let reference = Reference::Model(Arc::new(
            ReferenceModel::new(Decoder::new(dcfg.clone()), params.clone(), cfg.precision).unwrap(),
        ));
        let sampling = OnlineSampling {
            samples: 2,
            max_new_tokens: 4,
            temperature: 1.0,
            eos_ids: vec![0],
            missing_eos_penalty: None,
        };
        let online = OnlineDpoWorkload {
            prompts: &prompts,
            reference: &reference,
            objective: &objective,
            judge: &judge,
            sampling,
            packing: Packing::Separate,
            seed: 3,
            last_pairs: RefCell::new(Vec::new()),
        };
        let trainer = |rows| {
            let trained = Trained::Full(params.clone());
            let opt = Optimizer::new(cfg.optimizer_config(), &trained);
            let state = TrainerState { step: 0, epoch: 0, cursor: 0, num_tokens: 0, skipped_steps: 0 };
            Trainer::new(&cfg, Decoder::new(dcfg.clone()), trained, None, opt, state, rows).unwrap()
        };
        let mut t_online = trainer(prompts.len());
        let on = t_online.step(&online).unwrap();
        let pairs = online.last_pairs.borrow().clone();
        assert_eq!(pairs.len(), 3);
        for (p, prompt) in pairs.iter().zip(&prompts) {
            assert_eq!(&p.prompt_ids, prompt);
            let s = judge(&[(&p.prompt_ids[..], &p.chosen_ids[..]), (&p.prompt_ids[..], &p.rejected_ids[..])]).unwrap();
            assert!(s[0] >= s[1], "{p:?}: chosen scored {} < rejected {}", s[0], s[1]);
        }
        assert!((on.metrics["loss"] - std::f64::consts::LN_2).abs() < 1e-6, "{}", on.metrics["loss"]);
        let hand_scores: f64 = pairs
            .iter()
            .flat_map(|p| [&p.chosen_ids, &p.rejected_ids])
            .map(|c| c.iter().map(|&t| t as f64).sum::<f64>())
            .sum::<f64>()
            / 6.0;
        assert!((on.metrics["objective/scores"] - hand_scores).abs() < 1e-12);

        let offline = PairWorkload {
            examples: &pairs,
            reference: &reference,
            objective: &objective,
            packing: Packing::Separate,
            micro_pairs: 0,
        };
        let mut t_offline = trainer(pairs.len());
        let off = t_offline.step(&offline).unwrap();
        assert_eq!(on.metrics["loss"], off.metrics["loss"]);
        assert_eq!(on.grad_norm, off.grad_norm);
        let (Trained::Full(a), Trained::Full(b)) = (&t_online.trained, &t_offline.trained) else { unreachable!() };
        let same = |x: &Params, y: &Params| x.named().iter().zip(y.named()).all(|((_, u), (_, v))| u.data == v.data);
        assert!(same(a, b), "the updated weights differ");
        assert!(!same(a, &params), "the step changed nothing");
    }
}
