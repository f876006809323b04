//! A reward model on disk and in use: a decoder trunk and its scalar head, scored sequence by sequence.

use std::path::Path;

use engine::kernels::Precision;
use engine::model::Model;
use engine::rng::Rng;
use engine::{Activations, Batch, Decoder, DecoderConfig, ParamSet, Params, ScalarHead};

use super::{io_err, RewardModelError};
use crate::data::Example;

/// File beside the trunk's weights that holds the head (the file a checkpoint that trains one writes).
pub use crate::train::checkpoint::HEAD_FILE;

/// Sequences scored per forward pass at most, and tokens per pass at most (a longer sequence goes alone).
const SCORE_SEQS: usize = 32;
const SCORE_TOKENS: usize = 8192;

/// A decoder trunk and a scalar head on its last hidden state.
pub struct RewardModel {
    pub decoder: Decoder,
    pub params: Params,
    /// `score.weight` `[1, d]` and `score.bias` `[1]`
    pub head: ScalarHead,
    /// The precision of the trunk's passes (its block linears' products).
    pub precision: Precision,
}

impl RewardModel {
    /// A trunk with a fresh head: `w ~ N(0, head_init_std²)` (0: zeros), `b = 0`.
    pub fn new(cfg: &DecoderConfig, params: Params, head_init_std: f64, seed: u64) -> Self {
        let mut rng = Rng::new(seed ^ 0x5EED_4EAD);
        let w = (0..cfg.hidden)
            .map(|_| if head_init_std > 0.0 { (rng.normal() * head_init_std) as f32 } else { 0.0 })
            .collect();
        let head = ScalarHead::new(w, 0.0);
        RewardModel { decoder: Decoder::new(cfg.clone()), params, head, precision: Precision::F32 }
    }

    /// This reward model with its trunk's passes in `precision`.
    pub fn with_precision(self, precision: Precision) -> Self {
        RewardModel { precision, ..self }
    }

    /// The trunk as its passes read it.
    pub fn trunk(&self) -> Model<'_> {
        Model::new(&self.params, None).with_precision(self.precision)
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
            self.decoder.forward(self.trunk(), &batch, &mut acts, false)?;
            out.extend(self.head.forward(&acts.hidden, last));
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
        if self.head.width() != d {
            return Err(RewardModelError::Head {
                path: dir.join(HEAD_FILE),
                msg: format!("the head has {} weights, the trunk's hidden size is {d}", self.head.width()),
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
            let tensors: Vec<(String, Vec<usize>, Vec<f32>)> =
                self.head.named().into_iter().map(|(name, t)| (name, t.shape.clone(), t.data.clone())).collect();
            hf::safetensors::write_f32(&stage.join(HEAD_FILE), &tensors)?;
            Ok(())
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_dir_all(&stage);
            return Err(e);
        }
        hf::atomic::replace_dir(&stage, dir).map_err(|e| {
            let _ = std::fs::remove_dir_all(&stage);
            RewardModelError::Io { path: dir.to_path_buf(), source: e }
        })
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
        let w = st.read_f32(ScalarHead::WEIGHT)?;
        if !(w.shape == [1, d] || w.shape == [d]) {
            return Err(bad(format!("`score.weight` has shape {:?}; the trunk needs [1, {d}]", w.shape)));
        }
        let bias = match st.info(ScalarHead::BIAS) {
            None => 0.0,
            Some(_) => {
                let b = st.read_f32(ScalarHead::BIAS)?;
                if b.data.len() != 1 {
                    return Err(bad(format!("`score.bias` has shape {:?}; expected [1]", b.shape)));
                }
                b.data[0]
            }
        };
        if !w.data.iter().all(|x| x.is_finite()) || !bias.is_finite() {
            return Err(bad("the head holds non-finite values".into()));
        }
        let head = ScalarHead::new(w.data, bias);
        Ok(RewardModel {
            decoder: Decoder::new(model.config.decoder),
            params: model.params,
            head,
            precision: Precision::F32,
        })
    }
}
