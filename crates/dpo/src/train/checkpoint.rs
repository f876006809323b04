//! Resumable checkpoints: `OUTPUT/checkpoints/step-<N>/` holds the model as an HF directory (`model/`),
//! the optimizer's state (`optimizer.safetensors`) and the trainer's position (`trainer_state.json`:
//! step, epoch, place in the epoch's row order, token count). A checkpoint is written under a temporary
//! name and renamed into place when complete, so a `step-<N>` directory either loads or does not exist.
//! A run that trains a scalar head beside the decoder (the reward model) adds [`HEAD_FILE`] beside
//! `model/`; the head's optimizer moments sit in `optimizer.safetensors` under their parameter-set names.
//! A LoRA run's checkpoint holds no model: `adapter/` (a PEFT adapter directory) and the adapter's
//! optimizer state, the base being the run's `--model`.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use engine::optim::{Optimizer, OptimizerConfig, OptimizerState};
use engine::{ParamSet, Params, ScalarHead};
use serde::{Deserialize, Serialize};

use super::policy::Trained;
use super::TrainError;

/// The adapter of a LoRA run's checkpoint (a PEFT adapter directory).
pub const ADAPTER_DIR: &str = "adapter";

/// Where the trainer is; everything else is derived from the configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Epoch of the next micro-batch.
    pub epoch: u64,
    /// Index into that epoch's row order of the next micro-batch.
    pub cursor: usize,
    /// Tokens seen so far (TRL's `num_tokens`).
    pub num_tokens: u64,
    /// Steps skipped because their loss or gradient was not finite.
    pub skipped_steps: u64,
}

/// The scalar head of a checkpoint that trains one (`score.weight` `[1, d]`, `score.bias` `[1]`).
pub const HEAD_FILE: &str = "reward_head.safetensors";

pub fn checkpoints_dir(output: &Path) -> PathBuf {
    output.join("checkpoints")
}

/// Writes a checkpoint atomically and returns its directory. The run is expected to take `total_steps`
/// steps (recorded so that a resume can say when the schedule changes).
///
/// A complete `step-N` already in place holds this very state (a run directory holds one trajectory:
/// --overwrite moves a previous run aside, a resume from an older checkpoint moves the newer ones
/// aside), so it is kept as it is: an existing checkpoint is never replaced, and no moment exists at
/// which neither the old nor the new copy is in place.
///
/// A LoRA run (`trained` an adapter) writes the adapter with its PEFT configuration `lora`.
#[allow(clippy::too_many_arguments)]
pub fn save(
    output: &Path,
    model_cfg: &hf::ModelConfig,
    trained: &Trained,
    lora: Option<&hf::peft::LoraConfig>,
    source_dir: &Path,
    optimizer: &Optimizer,
    state: &TrainerState,
    total_steps: u64,
) -> Result<PathBuf, TrainError> {
    match (trained, lora) {
        (Trained::Full(params), _) => {
            save_with_head(output, model_cfg, params, None, source_dir, optimizer, state, total_steps)
        }
        (Trained::Adapter(adapter), Some(config)) => write(output, optimizer, state, total_steps, |tmp| {
            Ok(hf::peft::save_adapter(&tmp.join(ADAPTER_DIR), config, adapter, model_cfg)?)
        }),
        (Trained::Adapter(_), None) => {
            Err(TrainError::Invalid("an adapter checkpoint needs the adapter's PEFT configuration".into()))
        }
    }
}

/// [`save`], with the scalar head trained beside the decoder (written to [`HEAD_FILE`]).
#[allow(clippy::too_many_arguments)]
pub fn save_with_head(
    output: &Path,
    model_cfg: &hf::ModelConfig,
    params: &Params,
    head: Option<&ScalarHead>,
    source_dir: &Path,
    optimizer: &Optimizer,
    state: &TrainerState,
    total_steps: u64,
) -> Result<PathBuf, TrainError> {
    save_with_extras(output, model_cfg, params, head, &[], source_dir, optimizer, state, total_steps)
}

/// [`save_with_head`], plus files a trainer keeps beside the model (`extras`: name and contents, e.g.
/// PPO's sampler state), written inside the same temporary directory so that they appear with the rest.
#[allow(clippy::too_many_arguments)]
pub fn save_with_extras(
    output: &Path,
    model_cfg: &hf::ModelConfig,
    params: &Params,
    head: Option<&ScalarHead>,
    extras: &[(&str, &[u8])],
    source_dir: &Path,
    optimizer: &Optimizer,
    state: &TrainerState,
    total_steps: u64,
) -> Result<PathBuf, TrainError> {
    write(output, optimizer, state, total_steps, |tmp| {
        hf::save_model(&tmp.join("model"), model_cfg, params, Some(source_dir))?;
        if let Some(head) = head {
            let tensors: Vec<(String, Vec<usize>, Vec<f32>)> =
                head.named().into_iter().map(|(n, t)| (n, t.shape.clone(), t.data.clone())).collect();
            hf::safetensors::write_f32(&tmp.join(HEAD_FILE), &tensors)?;
        }
        for (name, bytes) in extras {
            let path = tmp.join(name);
            std::fs::write(&path, bytes).map_err(|e| TrainError::io(&path, e))?;
        }
        Ok(())
    })
}

/// Writes a checkpoint atomically: `trained` writes what is trained into the temporary directory, then
/// the optimizer's state and the trainer's position follow.
fn write(
    output: &Path,
    optimizer: &Optimizer,
    state: &TrainerState,
    total_steps: u64,
    trained: impl FnOnce(&Path) -> Result<(), TrainError>,
) -> Result<PathBuf, TrainError> {
    let root = checkpoints_dir(output);
    std::fs::create_dir_all(&root).map_err(|e| TrainError::io(&root, e))?;
    let fin = root.join(format!("step-{}", state.step));
    if fin.join("trainer_state.json").is_file() {
        return Ok(fin);
    }
    let tmp = root.join(format!(".step-{}.tmp-{}", state.step, std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = (|| -> Result<(), TrainError> {
        std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        trained(&tmp)?;
        // The moments are written from the optimizer's own buffers, not a copy of them.
        let steps = optimizer.steps_taken();
        let buffers: Vec<(String, &[usize], &[f32])> = optimizer.buffers().collect();
        let shapes: Vec<(String, Vec<usize>)> = buffers.iter().map(|(n, s, _)| (n.clone(), s.to_vec())).collect();
        let opt_path = tmp.join("optimizer.safetensors");
        hf::safetensors::write_f32_with(&opt_path, &shapes, |i| Ok(Cow::Borrowed(buffers[i].2)))?;
        let meta = serde_json::json!({ "state": state, "optimizer_step": steps, "total_steps": total_steps });
        let meta_path = tmp.join("trainer_state.json");
        crate::io::write_atomic(&meta_path, serde_json::to_string_pretty(&meta).expect("json").as_bytes())
            .map_err(|e| TrainError::io(&meta_path, e))?;
        // A directory left by an interrupted write of this step (no trainer_state.json) goes first.
        let _ = std::fs::remove_dir_all(&fin);
        std::fs::rename(&tmp, &fin).map_err(|e| TrainError::io(&fin, e))?;
        sync_dir(&root);
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result.map(|_| fin)
}

fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Completed checkpoints of a run, oldest first.
pub fn list(output: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(checkpoints_dir(output))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Removes leftovers of interrupted checkpoint writes and all but the newest `keep` checkpoints
/// (`keep = 0` keeps all).
pub fn prune(output: &Path, keep: usize) {
    let root = checkpoints_dir(output);
    for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(".step-") && name.contains(".tmp-") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let all = list(output);
    if keep > 0 && all.len() > keep {
        for (step, p) in &all[..all.len() - keep] {
            // Renamed first, as above: a crash during the deletion leaves a temporary name, not a
            // `step-N` that no longer loads.
            let doomed = root.join(format!(".step-{step}.tmp-{}-pruned", std::process::id()));
            if std::fs::rename(p, &doomed).is_ok() {
                let _ = std::fs::remove_dir_all(&doomed);
            }
        }
    }
}

/// What a checkpoint holds.
pub struct Loaded {
    /// The checkpoint directory.
    pub dir: PathBuf,
    pub model: hf::HfModel,
    pub optimizer: Optimizer,
    pub state: TrainerState,
    /// The steps the run that wrote it was to take (absent in checkpoints of older versions).
    pub total_steps: Option<u64>,
}

/// Leftovers of checkpoint writes that did not complete (`.step-N.tmp-PID`).
pub fn incomplete(output: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(checkpoints_dir(output))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".step-") && n.contains(".tmp-"))
        .collect();
    v.sort();
    v
}

/// The newest complete checkpoint of a run, or an error that says what is there instead.
pub fn newest(run: &Path) -> Result<PathBuf, TrainError> {
    if let Some((_, p)) = list(run).pop() {
        return Ok(p);
    }
    let left = incomplete(run);
    let detail = if left.is_empty() {
        String::new()
    } else {
        format!(
            " (only {}, left by a checkpoint write that was interrupted and holding no usable state)",
            left.join(", ")
        )
    };
    Err(TrainError::NoCheckpoint { run: run.to_path_buf(), detail })
}

/// What a checkpoint of `dpo train` or `dpo sft` holds.
pub struct Resumed {
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// Every weight, or a LoRA run's adapter.
    pub trained: Trained,
    pub optimizer: Optimizer,
    pub state: TrainerState,
    /// The steps the run that wrote it was to take (absent in checkpoints of older versions).
    pub total_steps: Option<u64>,
}

/// Loads a checkpoint directory (`.../checkpoints/step-N`) or, given a run directory, its newest
/// checkpoint, of a run on the model configured as `model`: its weights, or (a LoRA run, `lora` its
/// adapter's configuration) its adapter.
pub fn load(
    path: &Path,
    opt_cfg: OptimizerConfig,
    model: &hf::ModelConfig,
    lora: Option<&hf::peft::LoraConfig>,
) -> Result<Resumed, TrainError> {
    let dir = if path.join("trainer_state.json").is_file() { path.to_path_buf() } else { newest(path)? };
    let has_adapter = dir.join(ADAPTER_DIR).is_dir();
    let trained = match (lora, has_adapter) {
        (Some(_), true) => Trained::Adapter(hf::peft::load_adapter(&dir.join(ADAPTER_DIR), model)?.adapter),
        (None, false) => Trained::Full(hf::load_model(&dir.join("model"))?.params),
        (Some(_), false) => {
            return Err(TrainError::Checkpoint(dir, "holds a full model, and this run trains a LoRA adapter".into()))
        }
        (None, true) => {
            return Err(TrainError::Checkpoint(dir, "holds a LoRA adapter, and this run trains every weight".into()))
        }
    };
    let (state, total_steps, opt_state) = read_meta(&dir)?;
    let optimizer = Optimizer::restore(opt_cfg, &trained, opt_state)
        .map_err(|e| TrainError::Checkpoint(dir.clone(), e.to_string()))?;
    Ok(Resumed { dir, trained, optimizer, state, total_steps })
}

/// [`load`] for a run that trains the decoder and a scalar head as one parameter set (decoder first),
/// the optimizer training the tensors `trainable` accepts.
pub fn load_with_head(
    path: &Path,
    opt_cfg: OptimizerConfig,
    trainable: &dyn Fn(&str) -> bool,
) -> Result<(Loaded, ScalarHead), TrainError> {
    let (dir, model, state, total_steps, opt_state) = read(path)?;
    let head = read_head(&dir.join(HEAD_FILE), model.config.decoder.hidden)?;
    let hf::HfModel { config, params, dir: model_dir } = model;
    let set = (params, head);
    let optimizer = Optimizer::restore_with_trainable(opt_cfg, &set, trainable, opt_state)
        .map_err(|e| TrainError::Checkpoint(dir.clone(), e.to_string()))?;
    let (params, head) = set;
    let model = hf::HfModel { config, params, dir: model_dir };
    Ok((Loaded { dir, model, optimizer, state, total_steps }, head))
}

type Read = (PathBuf, hf::HfModel, TrainerState, Option<u64>, OptimizerState);

fn read(path: &Path) -> Result<Read, TrainError> {
    let dir = if path.join("trainer_state.json").is_file() { path.to_path_buf() } else { newest(path)? };
    let model = hf::load_model(&dir.join("model"))?;
    let (state, total_steps, opt_state) = read_meta(&dir)?;
    Ok((dir, model, state, total_steps, opt_state))
}

/// A checkpoint's position, planned steps and optimizer state.
fn read_meta(dir: &Path) -> Result<(TrainerState, Option<u64>, OptimizerState), TrainError> {
    let meta_path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&meta_path).map_err(|e| TrainError::io(&meta_path, e))?;
    let meta: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint(meta_path.clone(), e.to_string()))?;
    let state: TrainerState = serde_json::from_value(meta["state"].clone())
        .map_err(|e| TrainError::Checkpoint(meta_path.clone(), e.to_string()))?;
    let opt_step = meta["optimizer_step"]
        .as_u64()
        .ok_or_else(|| TrainError::Checkpoint(meta_path.clone(), "missing optimizer_step".into()))?;
    let total_steps = meta["total_steps"].as_u64();
    let st = hf::SafeTensors::open(&dir.join("optimizer.safetensors"))?;
    let mut tensors = Vec::new();
    for info in st.tensors() {
        tensors.push((info.name.clone(), st.read_f32(&info.name)?));
    }
    Ok((state, total_steps, OptimizerState { steps: opt_step, buffers: tensors }))
}

/// A checkpoint's head: `score.weight` `[1, hidden]` and `score.bias` `[1]`, both required.
fn read_head(path: &Path, hidden: usize) -> Result<ScalarHead, TrainError> {
    let bad = |msg: String| TrainError::Checkpoint(path.to_path_buf(), msg);
    if !path.is_file() {
        return Err(bad("missing: this checkpoint holds no scalar head".into()));
    }
    let st = hf::SafeTensors::open(path)?;
    let w = st.read_f32(ScalarHead::WEIGHT)?;
    if w.shape != [1, hidden] {
        return Err(bad(format!("`{}` has shape {:?}; the trunk needs [1, {hidden}]", ScalarHead::WEIGHT, w.shape)));
    }
    let b = st.read_f32(ScalarHead::BIAS)?;
    if b.data.len() != 1 {
        return Err(bad(format!("`{}` has shape {:?}; expected [1]", ScalarHead::BIAS, b.shape)));
    }
    Ok(ScalarHead::new(w.data, b.data[0]))
}
