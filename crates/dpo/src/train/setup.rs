//! Everything a run needs, validated and loaded before the run directory is touched: the settings, the
//! output directory's state, the model, tokenizer, data, reference, the memory estimate and, when
//! resuming, the checkpoint (checked against the model). A run that cannot start fails here and leaves
//! the disk as it was.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use engine::kernels::Precision;
use engine::model::Model;
use engine::optim::Optimizer;
use engine::quant::{FrozenEmbedding, FrozenLinears};
use engine::{Adapter, Decoder, DecoderConfig, Params};

use super::checkpoint::{self, TrainerState};
use super::config::{Objective, DEFAULT_MAX_LENGTH};
use super::frozen_base::{self, Frozen};
use super::kto::KtoWorkload;
use super::lora::LoraRun;
use super::memory;
use super::pairs::PairObjective;
use super::policy::Trained;
use super::reference::{
    self, default_cache_dir, pair_tokens, precompute, sft_tokens, unpaired_tokens, Reference, ReferenceModel,
};
use super::resume;
use super::run_dir::{self, StartMode};
use super::workload::{PairWorkload, SftWorkload, Workload};
use super::UnlikelihoodWorkload;
use super::{TrainConfig, TrainError};
use crate::data::{
    check_positions, check_vocab, check_vocab_sft, load_pairs, load_sft, load_unpaired, pack_pairs, resolve_max_length,
    DataOptions, Example, Packing, SftExample, UnpairedExample,
};
use crate::fingerprint::InputFingerprints;
use crate::objectives::unlikelihood::UnlikelihoodConfig;

/// Options that are about this invocation rather than the run's configuration.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Continue from this checkpoint (or the newest one in this run directory).
    pub resume: Option<PathBuf>,
    /// Replace a previous run in the output directory.
    pub overwrite: bool,
}

impl RunOptions {
    pub fn start_mode(&self) -> StartMode {
        match (&self.resume, self.overwrite) {
            (Some(_), _) => StartMode::Resume,
            (None, true) => StartMode::Overwrite,
            (None, false) => StartMode::Fresh,
        }
    }
}

/// The rows a run trains on, by objective, with what each objective needs besides them.
pub enum Data {
    Pairs {
        train: Vec<Example>,
        eval: Vec<Example>,
        objective: PairObjective,
        packing: Packing,
        train_ref: Reference,
        eval_ref: Reference,
    },
    Kto {
        train: Vec<UnpairedExample>,
        eval: Vec<UnpairedExample>,
        reference: Reference,
        cfg: crate::objectives::KtoConfig,
    },
    Sft {
        train: Vec<SftExample>,
        eval: Vec<SftExample>,
    },
    Unlikelihood {
        train: Vec<Example>,
        eval: Vec<Example>,
        cfg: UnlikelihoodConfig,
        /// The tokens that end a completion (the model's and the tokenizer's EOS).
        eos_ids: Vec<u32>,
    },
}

impl Data {
    /// Every token id of the rows, training and evaluation: what a frozen embedding keeps the rows of.
    pub fn tokens(&self) -> BTreeSet<u32> {
        match self {
            Data::Pairs { train, eval, .. } | Data::Unlikelihood { train, eval, .. } => {
                pair_tokens(train.iter().chain(eval))
            }
            Data::Kto { train, eval, .. } => unpaired_tokens(train.iter().chain(eval)),
            Data::Sft { train, eval } => sft_tokens(train.iter().chain(eval)),
        }
    }
}

/// Where training starts: the starting weights (or adapter), or a checkpoint.
pub struct Start {
    pub trained: Trained,
    pub optimizer: Optimizer,
    pub state: TrainerState,
    /// The checkpoint resumed from, and the total steps its run was to take.
    pub resumed: Option<(PathBuf, Option<u64>)>,
}

/// A run, ready to train.
pub struct Setup {
    pub cfg: TrainConfig,
    /// The starting model; in a LoRA run, the frozen base the adapter sits on. In a full run only its
    /// configuration: the weights, copied into the trained set and the reference, are freed by `setup`.
    pub model: hf::HfModel,
    pub data: Data,
    /// A LoRA run's adapter configuration (`None`: every weight is trained).
    pub lora: Option<LoraRun>,
    /// The base's block linears when `base_storage` keeps them other than in f32 (QLoRA); `model.params`
    /// then holds the rest of the base and empty linear tensors.
    pub frozen: Option<FrozenLinears>,
    /// A bf16 LoRA run's base embedding and head (`freeze_base_tables`); `model.params`' are then empty.
    pub embedding: Option<FrozenEmbedding>,
    /// The fingerprints of the inputs' files, recorded in the run ([`resume::record_inputs`]).
    pub inputs: InputFingerprints,
}

impl Setup {
    /// The frozen base a LoRA run's adapter sits on (its stored linears included).
    pub fn base(&self) -> Model<'_> {
        let m = base_model(&self.model, self.frozen.as_ref(), None, self.cfg.precision);
        match &self.embedding {
            Some(e) => m.with_embedding(e),
            None => m,
        }
    }

    /// The training workload and, when there are evaluation rows, the evaluation one.
    pub fn workloads(&self) -> (Box<dyn Workload + '_>, Option<Box<dyn Workload + '_>>) {
        match &self.data {
            Data::Pairs { train, eval, objective, packing, train_ref, eval_ref } => {
                let t = PairWorkload {
                    examples: train,
                    reference: train_ref,
                    objective,
                    packing: *packing,
                    micro_pairs: self.cfg.micro_pairs,
                };
                // A model reference serves both data sets; a cache holds the evaluation rows separately.
                let eval_reference = if matches!(eval_ref, Reference::None) { train_ref } else { eval_ref };
                let e = PairWorkload { examples: eval, reference: eval_reference, ..t };
                (Box::new(t), (!eval.is_empty()).then(|| Box::new(e) as Box<dyn Workload>))
            }
            Data::Kto { train, eval, reference, cfg } => {
                let t = KtoWorkload { examples: train, reference, cfg: cfg.clone() };
                let e = KtoWorkload { examples: eval, reference, cfg: cfg.clone() };
                (Box::new(t), (!eval.is_empty()).then(|| Box::new(e) as Box<dyn Workload>))
            }
            Data::Sft { train, eval } => {
                let e = SftWorkload { examples: eval };
                (
                    Box::new(SftWorkload { examples: train }),
                    (!eval.is_empty()).then(|| Box::new(e) as Box<dyn Workload>),
                )
            }
            Data::Unlikelihood { train, eval, cfg, eos_ids } => {
                let t = UnlikelihoodWorkload { examples: train, cfg: *cfg, eos_ids };
                let e = UnlikelihoodWorkload { examples: eval, ..t };
                (Box::new(t), (!eval.is_empty()).then(|| Box::new(e) as Box<dyn Workload>))
            }
        }
    }
}

/// The data options of a configuration whose `max_length` is resolved.
fn data_options(cfg: &TrainConfig) -> DataOptions {
    DataOptions {
        max_length: cfg.max_length,
        max_prompt_length: cfg.max_prompt_length,
        truncation: cfg.truncation,
        skip_bad_rows: cfg.skip_bad_rows,
    }
}

/// Validates and loads everything the run needs, and where it starts; touches no file of the run
/// directory. The returned [`Setup`] holds the configuration with `max_length` resolved.
pub fn setup(cfg: &TrainConfig, opts: &RunOptions, log: &mut dyn FnMut(&str)) -> Result<(Setup, Start), TrainError> {
    cfg.validate()?;
    // Rank 0 alone takes the run directory (the others only read it, when resuming).
    if crate::dist::is_root() {
        run_dir::preflight(&cfg.output, opts.start_mode())?;
    }
    run_dir::refuse_inputs_inside(&cfg.output, opts.start_mode(), &inputs(cfg))?;
    let model_cfg = hf::load_config(&cfg.model)?;
    let tokenizer = hf::load_tokenizer_if_present(&cfg.model)?;
    // The adapter's settings (and an --adapter's weights) are checked against the model first.
    let mut cfg = cfg.clone();
    let lora = LoraRun::prepare(&mut cfg, &model_cfg)?;
    let cfg = &cfg;
    // Compared once an --adapter's settings are filled in, as the run recorded them.
    if let Some(resume) = &opts.resume {
        resume::check_settings(resume, cfg)?;
    }
    // The reference that scores the rows (checked before any weights or rows are read), if any.
    let reference_cfg = match &cfg.objective {
        Objective::Pairs(objective) if objective.reference_free() => None,
        Objective::Sft | Objective::Unlikelihood(_) => None,
        _ => Some(match &cfg.ref_model {
            Some(dir) => reference_config(dir, &model_cfg, tokenizer.as_ref())?,
            None => model_cfg.decoder.clone(),
        }),
    };
    let models: Vec<&DecoderConfig> = std::iter::once(&model_cfg.decoder).chain(reference_cfg.as_ref()).collect();
    let (max_length, notice) = resolve_max_length(cfg.max_length, Some(DEFAULT_MAX_LENGTH), &models);
    if let Some(notice) = notice {
        log(&notice);
    }
    let cfg = &TrainConfig { max_length, ..cfg.clone() };
    let opts_data = data_options(cfg);
    let vocab = model_cfg.decoder.vocab_size;
    let paths = |cfg: &TrainConfig| {
        let mut v = vec![cfg.data.clone()];
        v.extend(cfg.eval_data.clone());
        v
    };
    // Preference rows of the training file and (if given) the eval file, each checked and non-empty.
    let mut load_pair_sets = || -> Result<(Vec<Example>, Vec<Example>), TrainError> {
        let mut sets = Vec::new();
        for path in paths(cfg) {
            let loaded = load_pairs(&path, tokenizer.as_ref(), &opts_data)?;
            log(&format!("{}: {}", path.display(), loaded.stats.summary()));
            check_vocab(&path, &loaded.examples, vocab)?;
            check_positions(&path, &loaded.examples, &models)?;
            if loaded.examples.is_empty() {
                return Err(TrainError::Invalid(format!("{}: no usable rows left", path.display())));
            }
            sets.push(loaded.examples);
        }
        let eval = if sets.len() > 1 { sets.pop().unwrap_or_default() } else { Vec::new() };
        Ok((sets.pop().unwrap_or_default(), eval))
    };
    let (data, row_tokens, in_flight) = match &cfg.objective {
        Objective::Pairs(objective) => {
            let (train, eval) = load_pair_sets()?;
            let packing = if cfg.prefix_sharing { Packing::SharedPrompt } else { Packing::Separate };
            let rows = train.iter().chain(&eval).map(|e| pack_pairs(&[e], packing).batch.len() as u64).collect();
            let in_flight = match cfg.micro_pairs {
                m if m > 0 && objective.per_pair() => m.min(cfg.batch_size),
                _ => cfg.batch_size,
            };
            let data = Data::Pairs {
                train,
                eval,
                objective: objective.clone(),
                packing,
                train_ref: Reference::None,
                eval_ref: Reference::None,
            };
            (data, rows, in_flight)
        }
        Objective::Kto(kto) => {
            let mut sets = Vec::new();
            for path in paths(cfg) {
                let loaded = load_unpaired(&path, tokenizer.as_ref(), &opts_data)?;
                log(&format!("{}: {}", path.display(), loaded.stats.summary()));
                check_positions(&path, &loaded.examples, &models)?;
                sets.push(loaded.examples);
            }
            let eval = if sets.len() > 1 { sets.pop().unwrap_or_default() } else { Vec::new() };
            let train = sets.pop().unwrap_or_default();
            let rows = train.iter().chain(&eval).map(|e| (e.prompt_ids.len() + e.completion_ids.len()) as u64);
            let rows = rows.collect();
            let data = Data::Kto { train, eval, reference: Reference::None, cfg: kto.clone() };
            (data, rows, cfg.batch_size)
        }
        Objective::Sft => {
            let mut sets = Vec::new();
            for path in paths(cfg) {
                let loaded = load_sft(&path, tokenizer.as_ref(), &opts_data)?;
                log(&format!("{}: {}", path.display(), loaded.stats.summary()));
                check_vocab_sft(&path, &loaded.examples, vocab)?;
                check_positions(&path, &loaded.examples, &models)?;
                sets.push(loaded.examples);
            }
            let eval = if sets.len() > 1 { sets.pop().unwrap_or_default() } else { Vec::new() };
            let train = sets.pop().unwrap_or_default();
            let rows = train.iter().chain(&eval).map(|e| (e.prompt_ids.len() + e.completion_ids.len()) as u64);
            let rows = rows.collect();
            (Data::Sft { train, eval }, rows, cfg.batch_size)
        }
        Objective::Unlikelihood(u) => {
            let (train, eval) = load_pair_sets()?;
            // Both completions of a row are in flight at once, each after its own copy of the prompt.
            let rows = train.iter().chain(&eval).map(|e| pack_pairs(&[e], Packing::Separate).batch.len() as u64);
            let rows = rows.collect();
            let eos_ids = match tokenizer.as_ref() {
                Some(t) => crate::data::stop_ids(&model_cfg, t),
                None => model_cfg.eos_token_ids.clone(),
            };
            (Data::Unlikelihood { train, eval, cfg: *u, eos_ids }, rows, cfg.batch_size)
        }
    };
    // Precomputed reference log-probs hold no reference model while training.
    let held_reference = reference_cfg.as_ref().filter(|_| !cfg.precompute_ref);
    // In a bf16 run a held reference (`attach_reference`) and a LoRA base (`freeze_base_tables`) keep the
    // embeddings of the data's tokens alone, and their heads in bf16.
    let tokens = (cfg.precision == Precision::Bf16).then(|| data.tokens());
    let lookups = tokens.as_ref().map(|t| t.len() as u64);
    // The memory check comes before the weights are loaded: a run that cannot fit stops at once.
    let adapter = lora.as_ref().map(|l| l.plan(&model_cfg, cfg, lookups)).transpose()?;
    let reference_lookups = lookups.filter(|_| matches!(data, Data::Pairs { .. } | Data::Kto { .. }));
    let held_reference = held_reference.map(|r| (r, reference_lookups));
    memory::check(cfg, &model_cfg.decoder, held_reference, row_tokens, in_flight, adapter, log)?;
    if cfg.merge && crate::dist::is_root() {
        // The merged model is written once the run is over: a file system too small for it is said now.
        let dtype = super::train_loop::merged_dtype(cfg.merge_dtype, &cfg.model)?;
        let what = format!("the {} model --merge writes at the end", dtype.name());
        hf::output::check_room(&cfg.output, &what, hf::weights_bytes(&model_cfg, dtype))?;
    }
    // A bf16 LoRA run's base keeps its embedding's rows of the data's tokens and its head in bf16.
    let tables_of = tokens.as_ref().filter(|_| lora.is_some());
    let (mut model, frozen, embedding) = frozen_base::load(cfg, tables_of, log)?;
    let start = start_point(cfg, opts, &model, lora.as_ref(), log)?;
    // The checkpoint fits the model; its run must also have read these very files.
    let inputs = resume::input_fingerprints(cfg)?;
    if let Some(resume) = &opts.resume {
        resume::check_inputs(resume, cfg, &inputs)?;
    }
    let loaded = lora.is_none().then(|| take_loaded_weights(&mut model));
    let base = Frozen { linears: frozen.as_ref(), tables: embedding.as_ref() };
    let data = attach_reference(cfg, data, &model, loaded, base, lora.as_ref(), tokenizer.as_ref(), log)?;
    Ok((Setup { cfg: cfg.clone(), model, data, lora, frozen, embedding, inputs }, start))
}

/// Frees the loaded weights of a full run once they are copied into the trained set (`start_point`) and the
/// reference: nothing reads them again (their configuration, yes), so they are not held through the run,
/// one f32 copy of the model (4 bytes a parameter) less at the peak. The tensors keep their shapes.
pub(super) fn free_loaded_weights(model: &mut hf::HfModel) {
    model.params.named_mut().into_iter().for_each(|(_, t)| t.data = Vec::new());
}

/// The loaded weights of a full run, moved out once the trained set is made (`start_point`), for the one
/// holder left that reads them: the reference, which takes them rather than a copy (one f32 copy of the
/// model less while setting up; a resume holds the checkpoint's weights and moments by then). The model
/// keeps the tensors' shapes, as after [`free_loaded_weights`].
pub(super) fn take_loaded_weights(model: &mut hf::HfModel) -> Params {
    // Zeros are mapped, not written: the placeholder costs no memory before it is freed.
    let taken = std::mem::replace(&mut model.params, Params::zeros(&model.config.decoder));
    free_loaded_weights(model);
    taken
}

/// The reference's configuration, after checking that it reads the policy's token ids (before any
/// weights are loaded).
fn reference_config(
    dir: &Path,
    policy: &hf::ModelConfig,
    tokenizer: Option<&hf::Tokenizer>,
) -> Result<DecoderConfig, TrainError> {
    let config = hf::load_config(dir)?;
    reference::check_fits(dir, &config, policy, tokenizer)?;
    Ok(config.decoder)
}

/// The files and directories a run reads, by the flag that names them: what its run directory must not
/// replace ([`run_dir::refuse_inputs_inside`]).
pub(super) fn inputs(cfg: &TrainConfig) -> Vec<hf::output::Input<'_>> {
    let named = [
        ("--model", Some(&cfg.model)),
        ("--data", Some(&cfg.data)),
        ("--ref-model", cfg.ref_model.as_ref()),
        ("--eval-data", cfg.eval_data.as_ref()),
        ("--adapter", cfg.adapter.as_ref()),
    ];
    // An online run reads prompts, not --data: its data path is empty.
    named
        .into_iter()
        .filter_map(|(flag, p)| Some((flag, p?.as_path())))
        .filter(|(_, p)| !p.as_os_str().is_empty())
        .collect()
}

/// The starting weights (or adapter), or the checkpoint to resume from after checking that it fits the
/// model.
pub(super) fn start_point(
    cfg: &TrainConfig,
    opts: &RunOptions,
    model: &hf::HfModel,
    lora: Option<&LoraRun>,
    log: &mut dyn FnMut(&str),
) -> Result<Start, TrainError> {
    let opt_cfg = cfg.optimizer_config();
    let Some(path) = &opts.resume else {
        let initial = match lora {
            Some(l) => Trained::Adapter(l.initial(&model.config, cfg.seed)?),
            None => Trained::Full(model.params.clone()),
        };
        let optimizer = Optimizer::new(opt_cfg, &initial);
        let state = TrainerState { step: 0, epoch: 0, cursor: 0, num_tokens: 0, skipped_steps: 0 };
        return Ok(Start { trained: initial, optimizer, state, resumed: None });
    };
    let dir = if path.join("trainer_state.json").is_file() { path.clone() } else { checkpoint::newest(path)? };
    let c = checkpoint::load(&dir, opt_cfg, &model.config, lora.map(|l| &l.config))?;
    // Checked against the model's own tensors: a full run's starting copy is not made only to compare.
    let adapter = lora.map(|l| l.initial(&model.config, cfg.seed)).transpose()?;
    let start = match &adapter {
        Some(a) => Starting::Adapter(a),
        None => Starting::Full(&model.params),
    };
    check_checkpoint_fits(&dir, &cfg.model, &c.trained, start)?;
    log(&format!("resuming at step {} from {}", c.state.step, path.display()));
    Ok(Start { trained: c.trained, optimizer: c.optimizer, state: c.state, resumed: Some((c.dir, c.total_steps)) })
}

/// What a run starts training, borrowed: the model's weights, or a fresh (or given) adapter.
#[derive(Clone, Copy)]
enum Starting<'a> {
    Full(&'a Params),
    Adapter(&'a Adapter),
}

/// A checkpoint continues the run of one model (and adapter): every tensor must have the starting shape.
fn check_checkpoint_fits(
    checkpoint: &Path,
    model_dir: &Path,
    saved: &Trained,
    start: Starting,
) -> Result<(), TrainError> {
    let what = |full: bool| if full { "every weight" } else { "a LoRA adapter" };
    match (saved, start) {
        (Trained::Full(s), Starting::Full(t)) => check_shapes_fit(checkpoint, model_dir, s, t),
        (Trained::Adapter(s), Starting::Adapter(t)) => check_shapes_fit(checkpoint, model_dir, s, t),
        (saved, _) => Err(TrainError::ModelMismatch {
            checkpoint: checkpoint.display().to_string(),
            model: model_dir.display().to_string(),
            detail: {
                let full = matches!(saved, Trained::Full(_));
                format!("the checkpoint trains {} and this run {}", what(full), what(!full))
            },
        }),
    }
}

/// Every tensor of `saved` (a checkpoint's) has the name and shape of one of `start`'s, and none is missing.
pub(crate) fn check_shapes_fit(
    checkpoint: &Path,
    model_dir: &Path,
    saved: &impl engine::ParamSet,
    start: &impl engine::ParamSet,
) -> Result<(), TrainError> {
    let (a, b) = (saved.named(), start.named());
    let mismatch = |detail: String| TrainError::ModelMismatch {
        checkpoint: checkpoint.display().to_string(),
        model: model_dir.display().to_string(),
        detail,
    };
    for (name, t) in &a {
        match b.iter().find(|(n, _)| n == name) {
            None => return Err(mismatch(format!("tensor {name} of the checkpoint is not in the model"))),
            Some((_, u)) if u.shape != t.shape => {
                return Err(mismatch(format!(
                    "tensor {name} has shape {:?} in the checkpoint and {:?} in the model",
                    t.shape, u.shape
                )))
            }
            Some(_) => {}
        }
    }
    if let Some((name, _)) = b.iter().find(|(n, _)| !a.iter().any(|(m, _)| m == n)) {
        return Err(mismatch(format!("tensor {name} of the model is not in the checkpoint")));
    }
    Ok(())
}

/// Loads the reference (`--ref-model`, the starting weights, or in a LoRA run the base with the starting
/// adapter or none) and, with `precompute_ref`, scores the rows under it once.
/// `loaded`: a full run's loaded weights ([`take_loaded_weights`]), which a reference copy of the
/// starting model takes.
#[allow(clippy::too_many_arguments)]
fn attach_reference(
    cfg: &TrainConfig,
    data: Data,
    model: &hf::HfModel,
    mut loaded: Option<Params>,
    frozen: Frozen,
    lora: Option<&LoraRun>,
    tokenizer: Option<&hf::Tokenizer>,
    log: &mut dyn FnMut(&str),
) -> Result<Data, TrainError> {
    // A LoRA run's own reference reads the base it trains on: nothing is loaded or copied.
    let base_reference = lora.filter(|_| cfg.ref_model.is_none()).map(|l| Reference::PolicyBase(l.start.clone()));
    // `tokens`: the data the reference scores, all of it known now (its lookups keep those rows alone).
    let mut load = |tokens: Option<&BTreeSet<u32>>| -> Result<Arc<ReferenceModel>, TrainError> {
        let mut held = match &cfg.ref_model {
            Some(dir) => match Reference::load(dir, &model.config, tokenizer, cfg.precision)? {
                Reference::Model(m) => m,
                _ => return Err(TrainError::Invalid(format!("reference {}: no model loaded", dir.display()))),
            },
            None => {
                let decoder = Decoder::new(model.config.decoder.clone());
                let weights = loaded.take().unwrap_or_else(|| model.params.clone());
                let held = ReferenceModel::new(decoder, weights, cfg.precision)
                    .map_err(|e| TrainError::Invalid(format!("the reference copy of {}: {e}", cfg.model.display())))?;
                Arc::new(held)
            }
        };
        if let (Some(tokens), Some(m)) = (tokens, Arc::get_mut(&mut held)) {
            m.keep_lookups_of(tokens).map_err(|e| TrainError::Invalid(format!("the reference's embedding: {e}")))?;
        }
        if let Some(linears) = &held.linears {
            log(&format!("reference block linears stored in bf16: {}", memory::human(linears.bytes() as u64)));
        }
        if let Some(e) = &held.embedding {
            let (kept, bytes) = (e.kept(), memory::human(e.bytes() as u64));
            log(&format!("reference embedding: head in bf16, lookups of the data's {kept} tokens in f32: {bytes}"));
        }
        Ok(held)
    };
    Ok(match data {
        Data::Pairs { train, eval, objective, packing, .. } if !objective.reference_free() => {
            let (train_ref, eval_ref) = if cfg.precompute_ref {
                let shared = match &base_reference {
                    Some(_) => None,
                    None => Some(load(None)?),
                };
                let base_decoder = Decoder::new(model.config.decoder.clone());
                let (d, frozen) = match (&shared, &base_reference) {
                    (Some(m), _) => (&m.decoder, m.view(cfg.precision)),
                    (None, Some(Reference::PolicyBase(a))) => {
                        let m = base_model(model, frozen.linears, a.as_ref(), cfg.precision);
                        (&base_decoder, frozen.tables.map_or(m, |t| m.with_embedding(t)))
                    }
                    (None, _) => unreachable!("a LoRA run's reference is its base"),
                };
                let cache = cfg.cache_dir.clone().unwrap_or_else(default_cache_dir);
                let mut cached = |examples: &[Example], what: &str| -> Result<Reference, TrainError> {
                    if examples.is_empty() {
                        return Ok(Reference::None);
                    }
                    let r = precompute(d, frozen, examples, packing, cfg.batch_size, &cache, |_| {})?;
                    let n = examples.len();
                    log(&format!("reference log-probs of {n} {what} rows {}", r.summary()));
                    Ok(Reference::Cached(r.scores))
                };
                (cached(&train, "training")?, cached(&eval, "evaluation")?)
            } else if let Some(r) = base_reference {
                (r, Reference::None)
            } else {
                let tokens = pair_tokens(train.iter().chain(&eval));
                let shared = load(Some(&tokens))?;
                (Reference::Model(shared.clone()), Reference::Model(shared))
            };
            Data::Pairs { train, eval, objective, packing, train_ref, eval_ref }
        }
        Data::Kto { train, eval, cfg: kto, .. } => {
            let reference = match base_reference {
                Some(r) => r,
                None => Reference::Model(load(Some(&unpaired_tokens(train.iter().chain(&eval))))?),
            };
            Data::Kto { train, eval, reference, cfg: kto }
        }
        other => other,
    })
}

pub use super::frozen_base::base_model;
