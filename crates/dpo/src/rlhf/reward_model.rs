//! A Bradley-Terry reward model: the first stage of the RLHF pipeline DPO replaces (Ouyang et al. 2022;
//! Rafailov et al. 2023, section 3), and the scorer of Best-of-N and PPO.
//!
//! A decoder trunk (usually the SFT checkpoint) with a scalar head on the final hidden state of the last
//! token of `prompt ++ completion`:
//! ```text
//! r(x, y) = w · h_last(x ++ y) + b                       w: [d], b: scalar
//! loss    = mean over pairs of -log sigmoid(r(x, y_w) - r(x, y_l))
//! ```
//! as TRL's `RewardTrainer` (an `AutoModelForSequenceClassification` with one label, read at the last
//! token). The gradient flows into the head and, through [`Decoder::backward`] with a hidden-state
//! gradient that is nonzero only at the last-token rows, into the whole trunk. The loss depends on
//! reward differences only, so `b` receives exactly zero gradient (as does the final LayerNorm's shift,
//! which moves every reward alike): `b` is kept, at its initial value 0, so that a head trained elsewhere
//! with a bias loads unchanged.
//!
//! On disk a reward model is a Hugging Face directory of the trunk (`hf::save_model`, loadable by
//! `transformers` as the causal LM it came from) plus `reward_head.safetensors` with `score.weight`
//! `[1, d]` and `score.bias` `[1]`, written together and renamed into place.
//!
//! The last token is the last token of the sequence as tokenized: with TRL's tokenization that is the EOS
//! token appended to text completions. (transformers reads the last non-pad token, which differs only
//! when the pad token is the EOS token.)

use std::path::{Path, PathBuf};

use engine::optim::{global_grad_norm, lr_at, Optimizer, OptimizerConfig, ScheduleKind};
use engine::rng::Rng;
use engine::{Activations, Batch, Decoder, DecoderConfig, NormParams, Params, Tensor};
use serde::Serialize;

use crate::data::Example;

/// File beside the trunk's weights that holds the head.
pub const HEAD_FILE: &str = "reward_head.safetensors";

/// Sequences scored per forward pass at most, and tokens per pass at most (a longer sequence goes alone).
const SCORE_SEQS: usize = 32;
const SCORE_TOKENS: usize = 8192;

/// Why building, training, scoring, saving or loading a reward model failed.
#[derive(Debug, thiserror::Error)]
pub enum RewardModelError {
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
    #[error(transparent)]
    Model(#[from] hf::Error),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// The head file is missing, malformed or does not fit the trunk.
    #[error("{}: {msg}", path.display())]
    Head { path: PathBuf, msg: String },
    #[error("{0}")]
    Invalid(String),
    #[error(
        "reward-model step {step}: the {what} is not finite (rows {rows}); lower the learning rate or check these rows"
    )]
    NonFinite { step: u64, what: &'static str, rows: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RewardModelError + '_ {
    move |source| RewardModelError::Io { path: path.to_path_buf(), source }
}

/// A decoder trunk and a scalar head on its last hidden state.
pub struct RewardModel {
    pub decoder: Decoder,
    pub params: Params,
    /// `[d]` the head's weight (`score.weight` row)
    pub head: Vec<f32>,
    pub bias: f32,
}

impl RewardModel {
    /// A trunk with a fresh head: `w ~ N(0, head_init_std²)` (0: zeros), `b = 0`.
    pub fn new(cfg: &DecoderConfig, params: Params, head_init_std: f64, seed: u64) -> Self {
        let mut rng = Rng::new(seed ^ 0x5EED_4EAD);
        let head = (0..cfg.hidden)
            .map(|_| if head_init_std > 0.0 { (rng.normal() * head_init_std) as f32 } else { 0.0 })
            .collect();
        RewardModel { decoder: Decoder::new(cfg.clone()), params, head, bias: 0.0 }
    }

    /// `r(prompt ++ completion)` of each sequence. Sequences are batched (activations are not kept); the
    /// result does not depend on how they are grouped.
    pub fn score(&self, seqs: &[(&[u32], &[u32])]) -> Result<Vec<f64>, RewardModelError> {
        if let Some(i) = seqs.iter().position(|(p, c)| p.is_empty() && c.is_empty()) {
            return Err(RewardModelError::Invalid(format!("sequence {i} is empty: a reward needs at least one token")));
        }
        let mut out = Vec::with_capacity(seqs.len());
        let mut acts = Activations::default();
        let mut start = 0;
        while start < seqs.len() {
            let (mut end, mut tokens) = (start, 0);
            while end < seqs.len() && end - start < SCORE_SEQS {
                let n = seqs[end].0.len() + seqs[end].1.len();
                if end > start && tokens + n > SCORE_TOKENS {
                    break;
                }
                tokens += n;
                end += 1;
            }
            let mut batch = Batch::default();
            let mut last = Vec::with_capacity(end - start);
            for (p, c) in &seqs[start..end] {
                let ids: Vec<u32> = p.iter().chain(c.iter()).copied().collect();
                let s = batch.len();
                batch.push_sequence(&ids, ids.len());
                last.push(s + ids.len() - 1);
            }
            self.decoder.forward(&self.params, &batch, &mut acts, false)?;
            out.extend(last.iter().map(|&row| self.reward_at(&acts.hidden, row)));
            start = end;
        }
        Ok(out)
    }

    /// Rewards of the chosen and rejected sequences of each pair, as [`RewardModel::score`] gives them.
    pub fn score_pairs(&self, pairs: &[Example]) -> Result<Vec<(f64, f64)>, RewardModelError> {
        let seqs: Vec<(&[u32], &[u32])> = pairs
            .iter()
            .flat_map(|ex| [(ex.chosen_prompt(), &ex.chosen_ids[..]), (ex.rejected_prompt(), &ex.rejected_ids[..])])
            .collect();
        let r = self.score(&seqs)?;
        Ok(r.chunks_exact(2).map(|c| (c[0], c[1])).collect())
    }

    /// `w · hidden[row] + b`, accumulated in f64.
    fn reward_at(&self, hidden: &[f32], row: usize) -> f64 {
        reward_at(&self.head, self.bias, hidden, row)
    }

    /// Writes the reward model to `dir`: the trunk as a Hugging Face directory (`config.json` from
    /// `model_cfg`, tokenizer files copied from `source`) and [`HEAD_FILE`]. Everything is written beside
    /// `dir` and renamed into place, so `dir` is the old reward model, the new one, or absent. An existing
    /// `dir` is replaced only when it is empty or holds a `config.json`.
    pub fn save(&self, dir: &Path, model_cfg: &hf::ModelConfig, source: Option<&Path>) -> Result<(), RewardModelError> {
        let d = self.decoder.cfg.hidden;
        if model_cfg.decoder != self.decoder.cfg {
            return Err(RewardModelError::Invalid(format!(
                "saving {}: the model config ({}) does not describe this reward model's trunk",
                dir.display(),
                model_cfg.path.display()
            )));
        }
        if self.head.len() != d {
            return Err(RewardModelError::Head {
                path: dir.join(HEAD_FILE),
                msg: format!("the head has {} weights, the trunk's hidden size is {d}", self.head.len()),
            });
        }
        if dir.exists() {
            let empty = std::fs::read_dir(dir).map_err(io_err(dir))?.next().is_none();
            if !dir.is_dir() || (!empty && !dir.join("config.json").is_file()) {
                return Err(RewardModelError::Invalid(format!(
                    "{} exists and is not a model directory; refusing to replace it (choose another path)",
                    dir.display()
                )));
            }
        }
        let name = dir
            .file_name()
            .ok_or_else(|| RewardModelError::Invalid(format!("{}: no final component", dir.display())))?;
        let sibling =
            |tag: &str| dir.with_file_name(format!("{}.{tag}-{}", name.to_string_lossy(), std::process::id()));
        let stage = sibling("rm-tmp");
        if stage.exists() {
            std::fs::remove_dir_all(&stage).map_err(io_err(&stage))?;
        }
        let written = (|| -> Result<(), RewardModelError> {
            hf::save_model(&stage, model_cfg, &self.params, source)?;
            let tensors = vec![
                ("score.weight".to_string(), vec![1, d], self.head.clone()),
                ("score.bias".to_string(), vec![1], vec![self.bias]),
            ];
            hf::safetensors::write_f32(&stage.join(HEAD_FILE), &tensors)?;
            Ok(())
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_dir_all(&stage);
            return Err(e);
        }
        // Swap: the old directory aside, the new one in, then the old one deleted.
        let old = sibling("rm-old");
        let had_old = dir.exists();
        if had_old {
            if old.exists() {
                std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
            }
            std::fs::rename(dir, &old).map_err(io_err(dir))?;
        }
        if let Err(e) = std::fs::rename(&stage, dir) {
            if had_old {
                let _ = std::fs::rename(&old, dir);
            }
            let _ = std::fs::remove_dir_all(&stage);
            return Err(RewardModelError::Io { path: dir.to_path_buf(), source: e });
        }
        if had_old {
            std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
        }
        Ok(())
    }

    /// Reads a directory [`RewardModel::save`] wrote. `score.weight` may be `[1, d]` or `[d]`; a missing
    /// `score.bias` is 0 (transformers' sequence-classification heads have none).
    pub fn load(dir: &Path) -> Result<Self, RewardModelError> {
        let model = hf::load_model(dir)?;
        let path = dir.join(HEAD_FILE);
        let bad = |msg: String| RewardModelError::Head { path: path.clone(), msg };
        if !path.is_file() {
            return Err(bad(
                "missing: this model directory holds no reward head (train one with `dpo reward-model train`)".into(),
            ));
        }
        let st = hf::SafeTensors::open(&path)?;
        let d = model.config.decoder.hidden;
        let w = st.read_f32("score.weight")?;
        if !(w.shape == [1, d] || w.shape == [d]) {
            return Err(bad(format!("`score.weight` has shape {:?}; the trunk needs [1, {d}]", w.shape)));
        }
        let bias = match st.info("score.bias") {
            None => 0.0,
            Some(_) => {
                let b = st.read_f32("score.bias")?;
                if b.data.len() != 1 {
                    return Err(bad(format!("`score.bias` has shape {:?}; expected [1]", b.shape)));
                }
                b.data[0]
            }
        };
        if !w.data.iter().all(|x| x.is_finite()) || !bias.is_finite() {
            return Err(bad("the head holds non-finite values".into()));
        }
        Ok(RewardModel { decoder: Decoder::new(model.config.decoder), params: model.params, head: w.data, bias })
    }
}

fn reward_at(head: &[f32], bias: f32, hidden: &[f32], row: usize) -> f64 {
    let d = head.len();
    let h = &hidden[row * d..(row + 1) * d];
    head.iter().zip(h).map(|(&w, &x)| w as f64 * x as f64).sum::<f64>() + bias as f64
}

/// `log(1 + e^x)` without overflow.
fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// One batch of pairs packed for rewards, and the stream rows of each sequence's last token.
fn pack_pairs_for_rewards(pairs: &[&Example]) -> Result<(Batch, Vec<(usize, usize)>), RewardModelError> {
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
struct PairOutcome {
    /// `[pairs]` r(x, y_w) and r(x, y_l)
    chosen: Vec<f64>,
    rejected: Vec<f64>,
    /// Mean of `-log sigmoid(r_w - r_l)`.
    loss: f64,
    tokens: usize,
}

impl PairOutcome {
    fn accuracy(&self) -> f64 {
        let n = self.chosen.len().max(1) as f64;
        self.chosen.iter().zip(&self.rejected).filter(|(w, l)| w > l).count() as f64 / n
    }
}

/// Gradient buffers: the trunk's and the head's (a one-row "embedding", see [`head_params`]).
struct Grads<'a> {
    trunk: &'a mut Params,
    head: &'a mut [f32],
}

/// Rewards and loss of a batch of pairs; with `grads`, adds the gradient of the mean loss to them
/// (forward then keeps activations).
fn pair_batch(
    decoder: &Decoder,
    params: &Params,
    head: &[f32],
    bias: f32,
    pairs: &[&Example],
    acts: &mut Activations,
    grads: Option<Grads>,
) -> Result<PairOutcome, RewardModelError> {
    let d = decoder.cfg.hidden;
    let (batch, last) = pack_pairs_for_rewards(pairs)?;
    decoder.forward(params, &batch, acts, grads.is_some())?;
    let chosen: Vec<f64> = last.iter().map(|&(w, _)| reward_at(head, bias, &acts.hidden, w)).collect();
    let rejected: Vec<f64> = last.iter().map(|&(_, l)| reward_at(head, bias, &acts.hidden, l)).collect();
    let n = pairs.len().max(1) as f64;
    let loss = chosen.iter().zip(&rejected).map(|(w, l)| softplus(-(w - l))).sum::<f64>() / n;
    let out = PairOutcome { chosen, rejected, loss, tokens: batch.len() };
    let Some(g) = grads else { return Ok(out) };
    if !loss.is_finite() {
        return Ok(out);
    }
    // d loss / d r_w = -sigmoid(-(r_w - r_l)) / n, d loss / d r_l = +sigmoid(-(r_w - r_l)) / n;
    // d r / d h_last = w, d r / d w = h_last.
    let mut dhidden = vec![0.0f32; batch.len() * d]; // [N, d], nonzero at last-token rows only
    let mut dhead = vec![0.0f64; d];
    for (i, &(rw, rl)) in last.iter().enumerate() {
        let s = sigmoid(-(out.chosen[i] - out.rejected[i])) / n;
        for (row, dr) in [(rw, -s), (rl, s)] {
            let h = &acts.hidden[row * d..(row + 1) * d];
            for j in 0..d {
                dhidden[row * d + j] += (dr * head[j] as f64) as f32;
                dhead[j] += dr * h[j] as f64;
            }
        }
    }
    for (g, v) in g.head.iter_mut().zip(&dhead) {
        *g += *v as f32;
    }
    decoder.backward(params, &batch, acts, &dhidden, g.trunk)?;
    Ok(out)
}

/// The head as a one-row embedding table (`wte: [1, d]`, nothing else), so that the engine's AdamW updates
/// it with torch's arithmetic and decays it as HF decays `score.weight` (a matrix).
fn head_params(head: Vec<f32>) -> Params {
    let d = head.len();
    Params {
        wte: Tensor { shape: vec![1, d], data: head },
        wpe: None,
        layers: Vec::new(),
        norm_f: NormParams { weight: Tensor::zeros(&[0]), bias: None },
        lm_head: None,
        b_head: None,
    }
}

/// How a reward model is trained. Defaults follow TRL's `RewardConfig` / HF `TrainingArguments` where it
/// has one (AdamW, linear schedule without warmup, clipping at 1.0).
#[derive(Clone, Debug, PartialEq, Serialize)]
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
        }
    }
}

impl RmTrainConfig {
    fn validate(&self) -> Result<(), RewardModelError> {
        let bad = |m: String| Err(RewardModelError::Invalid(m));
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad(format!("learning rate must be a finite number >= 0, got {}", self.lr));
        }
        if self.batch_size == 0 {
            return bad("batch size must be at least 1".into());
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
        let out = pair_batch(&rm.decoder, &rm.params, &rm.head, rm.bias, chunk, &mut acts, None)?;
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

/// Row order of one epoch: file order, or a shuffle seeded by the seed and the epoch (the same order
/// `dpo train` uses with the same seed).
fn epoch_order(rows: usize, epoch: u64, seed: u64, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..rows).collect();
    if shuffle {
        Rng::new(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)).shuffle(&mut order);
    }
    order
}

/// Trains a reward model from a trunk (`cfg`, `params`, usually the SFT model) on preference pairs:
/// AdamW on the trunk and the head (the trunk's LM head, unused, stays frozen), global-norm clipping,
/// a linear schedule. Logs one line per step and the evaluation results; returns the model and the
/// per-step metrics.
pub fn train_reward_model(
    cfg: &DecoderConfig,
    params: Params,
    pairs: &[Example],
    eval: &[Example],
    rc: &RmTrainConfig,
    log: &mut dyn FnMut(&str),
) -> Result<(RewardModel, Vec<RmStepStats>), RewardModelError> {
    rc.validate()?;
    if pairs.is_empty() {
        return Err(RewardModelError::Invalid("no preference pairs to train the reward model on".into()));
    }
    let mut rm = RewardModel::new(cfg, params, rc.head_init_std, rc.seed);
    let opt_cfg = OptimizerConfig::adamw().with_weight_decay(rc.weight_decay);
    let mut trunk_opt = Optimizer::with_trainable(opt_cfg.clone(), &rm.params, |n| n != "lm_head");
    let mut head = head_params(std::mem::take(&mut rm.head));
    let mut head_opt = Optimizer::with_trainable(opt_cfg, &head, |n| n == "wte");
    let mut grads = Params::zeros(cfg);
    let mut head_grads = vec![0.0f32; cfg.hidden];
    let mut acts = Activations::default();

    let rows = pairs.len();
    let total = rc.total_steps(rows);
    let (mut epoch, mut cursor) = (0u64, 0usize);
    let mut order = epoch_order(rows, epoch, rc.seed, rc.shuffle);
    let mut stats = Vec::with_capacity(total as usize);
    let mut num_tokens = 0u64;
    for step in 0..total {
        if cursor >= rows {
            epoch += 1;
            cursor = 0;
            order = epoch_order(rows, epoch, rc.seed, rc.shuffle);
        }
        let end = (cursor + rc.batch_size).min(rows);
        let batch: Vec<&Example> = order[cursor..end].iter().map(|&i| &pairs[i]).collect();
        cursor = end;

        grads.fill_zero();
        head_grads.iter_mut().for_each(|g| *g = 0.0);
        let g = Grads { trunk: &mut grads, head: &mut head_grads };
        let out = pair_batch(&rm.decoder, &rm.params, &head.wte.data, rm.bias, &batch, &mut acts, Some(g))?;
        let mut hg = head_params(std::mem::take(&mut head_grads));
        let grad_norm = clip_together(&mut grads, &mut hg, rc.max_grad_norm);
        if !out.loss.is_finite() || !grad_norm.is_finite() {
            let rows = batch.iter().map(|e| e.location.as_str()).collect::<Vec<_>>().join(", ");
            let what = if out.loss.is_finite() { "gradient" } else { "loss" };
            return Err(RewardModelError::NonFinite { step: step + 1, what, rows });
        }
        let lr = lr_at(ScheduleKind::Linear, rc.lr, 0, total, step);
        trunk_opt.step(&mut rm.params, &grads, lr);
        head_opt.step(&mut head, &hg, lr);
        head_grads = hg.wte.data;
        num_tokens += out.tokens as u64;

        let k = out.chosen.len() as f64;
        let mut s = RmStepStats {
            step: step + 1,
            epoch: epoch as f64 + cursor as f64 / rows as f64,
            loss: out.loss,
            accuracy: out.accuracy(),
            margin: out.chosen.iter().zip(&out.rejected).map(|(w, l)| w - l).sum::<f64>() / k,
            mean_reward: (out.chosen.iter().sum::<f64>() + out.rejected.iter().sum::<f64>()) / (2.0 * k),
            grad_norm,
            learning_rate: lr,
            num_tokens,
            eval_loss: None,
            eval_accuracy: None,
        };
        let mut line = format!(
            "reward model step {}/{total}  loss {:.4}  acc {:.2}  margin {:+.4}  grad_norm {:.3}  lr {:.2e}",
            s.step, s.loss, s.accuracy, s.margin, s.grad_norm, s.learning_rate
        );
        let due = s.step == total || (rc.eval_every > 0 && s.step.is_multiple_of(rc.eval_every));
        if !eval.is_empty() && due {
            rm.head = head.wte.data.clone();
            let (l, a) = evaluate(&rm, eval, rc.batch_size)?;
            (s.eval_loss, s.eval_accuracy) = (Some(l), Some(a));
            line += &format!("  eval loss {l:.4}  eval acc {a:.3}");
        }
        log(&line);
        stats.push(s);
    }
    rm.head = head.wte.data;
    Ok((rm, stats))
}

/// `torch.nn.utils.clip_grad_norm_` over the trunk's and the head's gradients together (see
/// `engine::optim::clip_grad_norm`): returns the norm before clipping.
fn clip_together(trunk: &mut Params, head: &mut Params, max_norm: f64) -> f64 {
    let (a, b) = (global_grad_norm(trunk), global_grad_norm(head));
    let norm = (a * a + b * b).sqrt();
    if max_norm > 0.0 {
        let coef = (1.0f32 / (norm as f32 + 1e-6f32)) * max_norm as f32;
        if coef < 1.0 || coef.is_nan() {
            for (_, t) in trunk.named_mut().into_iter().chain(head.named_mut()) {
                t.data.iter_mut().for_each(|x| *x *= coef);
            }
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::presets::init_random;
    use engine::Dims;

    fn llama_tiny() -> DecoderConfig {
        DecoderConfig {
            qkv_bias: true,
            ..DecoderConfig::llama(Dims {
                vocab_size: 16,
                hidden: 8,
                n_layers: 2,
                n_heads: 2,
                n_kv_heads: 1,
                head_dim: 4,
                ffn_hidden: 12,
                max_positions: 32,
            })
        }
    }

    fn gpt2_tiny() -> DecoderConfig {
        DecoderConfig::gpt2(Dims {
            vocab_size: 16,
            hidden: 8,
            n_layers: 2,
            n_heads: 2,
            n_kv_heads: 2,
            head_dim: 4,
            ffn_hidden: 16,
            max_positions: 32,
        })
    }

    /// Random parameters with every tensor (biases and norms too) away from its special values, so that
    /// each one's gradient is exercised.
    fn random_params(cfg: &DecoderConfig, seed: u64) -> Params {
        let mut p = init_random(cfg, 0.4, seed);
        let mut r = Rng::new(seed + 1);
        for (_, t) in p.named_mut() {
            if t.shape.len() == 1 {
                t.data.iter_mut().for_each(|x| *x += 0.2 * r.normal() as f32);
            }
        }
        p
    }

    fn pairs_for_gradients() -> Vec<Example> {
        let mut tail = Example::new("line 3", vec![1, 2, 3], vec![4, 5], vec![6, 7, 8]);
        tail.rejected_prompt_skip = 1; // a per-side prompt cut: packed as two sequences
        vec![
            Example::new("line 1", vec![1, 2, 3], vec![4, 5], vec![6]),
            Example::new("line 2", vec![9], vec![10, 11, 12], vec![13, 14]),
            tail,
            Example::new("line 4", vec![], vec![3, 3], vec![15]),
        ]
    }

    /// The loss of [`pair_batch`] as a function of all trainable values, in f64.
    fn loss_of(cfg: &DecoderConfig, p: &Params, head: &[f32], bias: f32, pairs: &[&Example]) -> f64 {
        let mut acts = Activations::default();
        pair_batch(&Decoder::new(cfg.clone()), p, head, bias, pairs, &mut acts, None).unwrap().loss
    }

    #[test]
    fn loss_and_gradient_match_finite_differences() {
        for (name, cfg) in [("llama", llama_tiny()), ("gpt2", gpt2_tiny())] {
            let params = random_params(&cfg, 3);
            let mut r = Rng::new(5);
            let head: Vec<f32> = (0..cfg.hidden).map(|_| r.normal() as f32).collect();
            let bias = 0.3f32;
            let examples = pairs_for_gradients();
            let pairs: Vec<&Example> = examples.iter().collect();
            let decoder = Decoder::new(cfg.clone());

            let mut grads = Params::zeros(&cfg);
            let mut dhead = vec![0.0f32; cfg.hidden];
            let mut acts = Activations::default();
            let g = Grads { trunk: &mut grads, head: &mut dhead };
            let out = pair_batch(&decoder, &params, &head, bias, &pairs, &mut acts, Some(g)).unwrap();

            // The loss from the rewards of `score`, sequence by sequence.
            let rm =
                RewardModel { decoder: Decoder::new(cfg.clone()), params: params.clone(), head: head.clone(), bias };
            let scored = rm.score_pairs(&examples).unwrap();
            let want: f64 = scored.iter().map(|(w, l)| (1.0 + (-(w - l)).exp()).ln()).sum::<f64>() / 4.0;
            assert!((out.loss - want).abs() < 1e-6, "{name}: loss {} from scores {want}", out.loss);
            for (i, (w, l)) in scored.iter().enumerate() {
                assert!((out.chosen[i] - w).abs() < 1e-5 && (out.rejected[i] - l).abs() < 1e-5, "{name}: pair {i}");
            }

            let h = 1e-2f32;
            let check = |what: &str, an: f64, plus: f64, minus: f64| {
                let fd = (plus - minus) / (2.0 * h as f64);
                assert!(
                    (fd - an).abs() <= 2e-4 + 1e-2 * an.abs(),
                    "{name} {what}: analytic {an:.6e}, numeric {fd:.6e}"
                );
            };
            // Head: every weight; the bias gets exactly zero.
            for j in 0..cfg.hidden {
                let (mut hp, mut hm) = (head.clone(), head.clone());
                hp[j] += h;
                hm[j] -= h;
                let lp = loss_of(&cfg, &params, &hp, bias, &pairs);
                let lm = loss_of(&cfg, &params, &hm, bias, &pairs);
                check(&format!("head[{j}]"), dhead[j] as f64, lp, lm);
            }
            let lp = loss_of(&cfg, &params, &head, bias + h, &pairs);
            let lm = loss_of(&cfg, &params, &head, bias - h, &pairs);
            assert!(((lp - lm) / (2.0 * h as f64)).abs() < 1e-4, "{name}: bias gradient is zero");

            // Trunk: in every tensor, its largest-gradient element and two random ones.
            let mut checked = 0;
            for (k, (tname, gt)) in grads.named().into_iter().enumerate() {
                let mut idx: Vec<usize> =
                    vec![(0..gt.numel()).max_by(|&a, &b| gt.data[a].abs().total_cmp(&gt.data[b].abs())).unwrap()];
                idx.push(r.below(gt.numel()));
                idx.push(r.below(gt.numel()));
                for i in idx {
                    let perturbed = |delta: f32| {
                        let mut p = params.clone();
                        p.named_mut()[k].1.data[i] += delta;
                        loss_of(&cfg, &p, &head, bias, &pairs)
                    };
                    check(&format!("{tname}[{i}]"), gt.data[i] as f64, perturbed(h), perturbed(-h));
                    checked += 1;
                }
                if tname == "lm_head" {
                    assert!(gt.data.iter().all(|&x| x == 0.0), "{name}: the LM head takes no gradient");
                }
            }
            assert!(checked > 30);
            // Everything but the unused LM head and the final norm's shift (which, like `b`, moves every
            // reward alike and cancels in r_w - r_l) takes a gradient.
            for (tname, t) in grads.named() {
                let zero = t.data.iter().all(|&x| x == 0.0);
                assert_eq!(zero, tname == "lm_head" || tname == "norm_f.bias", "{name}: {tname}");
            }
        }
    }

    /// Pairs whose chosen completion contains token 5 and whose rejected one never does.
    fn separable(n: usize, seed: u64) -> Vec<Example> {
        let mut r = Rng::new(seed);
        let tok = |r: &mut Rng| 6 + r.below(10) as u32;
        (0..n)
            .map(|i| {
                let prompt: Vec<u32> = (0..1 + r.below(3)).map(|_| tok(&mut r)).collect();
                let len = 2 + r.below(3);
                let mut chosen: Vec<u32> = (0..len).map(|_| tok(&mut r)).collect();
                let at = r.below(len);
                chosen[at] = 5;
                let rejected: Vec<u32> = (0..2 + r.below(3)).map(|_| tok(&mut r)).collect();
                Example::new(format!("line {}", i + 1), prompt, chosen, rejected)
            })
            .collect()
    }

    #[test]
    fn learns_a_separable_preference() {
        let cfg = llama_tiny();
        let train = separable(64, 1);
        let held_out = separable(32, 2);
        let rc = RmTrainConfig { lr: 1e-2, batch_size: 8, epochs: 8.0, head_init_std: 0.0, ..Default::default() };
        let mut lines = 0;
        let (rm, stats) =
            train_reward_model(&cfg, init_random(&cfg, 0.1, 7), &train, &held_out, &rc, &mut |_| lines += 1).unwrap();
        assert_eq!(stats.len(), 64);
        assert_eq!(lines, 64);
        assert!((stats[0].loss - std::f64::consts::LN_2).abs() < 1e-9, "a zero head starts at log 2");
        let (loss, acc) = evaluate(&rm, &train, 8).unwrap();
        assert_eq!(acc, 1.0, "training accuracy (loss {loss})");
        assert!(loss < 0.2, "training loss {loss}");
        let last = stats.last().unwrap();
        assert_eq!(last.eval_accuracy, Some(1.0), "held-out accuracy");
        assert!(last.eval_loss.unwrap() < 0.3);
        assert_eq!(accuracy(&rm, &held_out).unwrap(), 1.0);
        assert!(last.learning_rate < rc.lr / 10.0, "linear decay");
    }

    #[test]
    fn training_is_reproducible_and_respects_max_steps() {
        let cfg = gpt2_tiny();
        let data = separable(10, 3);
        let rc = RmTrainConfig { lr: 1e-3, batch_size: 4, max_steps: Some(5), ..Default::default() };
        let run = || train_reward_model(&cfg, init_random(&cfg, 0.1, 1), &data, &[], &rc, &mut |_| {}).unwrap();
        let (a, sa) = run();
        let (b, sb) = run();
        assert_eq!(sa.len(), 5);
        assert!(sa.iter().zip(&sb).all(|(x, y)| x.loss.to_bits() == y.loss.to_bits()));
        assert!(a.params == b.params && a.head == b.head);
        // epochs: 10 rows, batches of 4 -> 3 steps per epoch.
        let rc = RmTrainConfig { max_steps: None, epochs: 2.0, ..rc };
        assert_eq!(rc.total_steps(data.len()), 6);
        assert!(train_reward_model(&cfg, init_random(&cfg, 0.1, 1), &[], &[], &rc, &mut |_| {}).is_err());
    }

    #[test]
    fn scores_do_not_depend_on_batching() {
        let cfg = llama_tiny();
        let mut r = Rng::new(4);
        let rm = RewardModel::new(&cfg, random_params(&cfg, 2), 1.0, 0);
        let seqs: Vec<(Vec<u32>, Vec<u32>)> = (0..40)
            .map(|_| {
                (
                    (0..r.below(3)).map(|_| r.below(16) as u32).collect(),
                    (0..1 + r.below(4)).map(|_| r.below(16) as u32).collect(),
                )
            })
            .collect();
        let refs: Vec<(&[u32], &[u32])> = seqs.iter().map(|(p, c)| (&p[..], &c[..])).collect();
        let all = rm.score(&refs).unwrap();
        for (i, s) in refs.iter().enumerate() {
            let one = rm.score(std::slice::from_ref(s)).unwrap()[0];
            assert!((one - all[i]).abs() < 1e-5, "sequence {i}: {one} alone, {} in a batch", all[i]);
        }
        assert!(rm.score(&[(&[][..], &[][..])]).is_err());
        assert!(rm.score(&[(&[1][..], &[99][..])]).is_err(), "a token outside the vocabulary");
    }

    const GPT2: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/parity/models/gpt2-policy");

    #[test]
    fn save_then_load_gives_identical_scores() {
        let model = hf::load_model(Path::new(GPT2)).unwrap();
        let mut rm = RewardModel::new(&model.config.decoder, model.params.clone(), 0.5, 9);
        rm.bias = -0.25;
        let dir = std::env::temp_dir().join(format!("dpo-rm-test-{}", std::process::id())).join("rm");
        rm.save(&dir, &model.config, Some(Path::new(GPT2))).unwrap();
        assert!(dir.join(HEAD_FILE).is_file() && dir.join("tokenizer.json").is_file());
        let back = RewardModel::load(&dir).unwrap();
        assert_eq!((back.head.clone(), back.bias), (rm.head.clone(), rm.bias));
        let seqs: Vec<(&[u32], &[u32])> = vec![(&[1, 2, 3], &[4, 5]), (&[7], &[8, 9, 10, 0]), (&[], &[11, 12])];
        let (a, b) = (rm.score(&seqs).unwrap(), back.score(&seqs).unwrap());
        assert_eq!(
            a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            b.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );

        // Saving again replaces it; a plain model directory is not a reward model; foreign directories
        // are not overwritten.
        rm.bias = 1.0;
        rm.save(&dir, &model.config, None).unwrap();
        assert_eq!(RewardModel::load(&dir).unwrap().bias, 1.0);
        let err = RewardModel::load(Path::new(GPT2)).err().unwrap();
        assert!(err.to_string().contains(HEAD_FILE), "{err}");
        let foreign = dir.with_file_name("foreign");
        std::fs::create_dir_all(&foreign).unwrap();
        std::fs::write(foreign.join("notes.txt"), "keep").unwrap();
        assert!(rm.save(&foreign, &model.config, None).is_err());
        assert!(foreign.join("notes.txt").is_file());
        let _ = std::fs::remove_dir_all(dir.parent().unwrap());
    }
}
