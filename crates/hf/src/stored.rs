//! Loading a frozen base (QLoRA) with its block linears stored as they are read: each layer's `w_qkv`,
//! `w_o`, `w_in`, `w_out` goes into a [`Matrix`] (NF4, bf16 or f32) the moment it is built from the
//! checkpoint and its f32 copy is freed, so the peak is the f32 non-linear tensors (embeddings, norms,
//! biases, head) + one f32 linear + the stored bytes, never the whole model in f32. A bf16 LoRA run's base
//! ([`load_frozen_base`], or [`load_with_frozen_tables`] with f32 linears) keeps its embedding and head as
//! a `FrozenEmbedding` made the same way.

use std::collections::BTreeSet;
use std::path::Path;

use engine::quant::{FrozenEmbedding, FrozenLinears, Lookups, Matrix, Storage};
use engine::Params;

use crate::error::{Error, Result};
use crate::model_dir::{load_config, HfModel};
use crate::safetensors::Checkpoint;
use crate::weights::read_tensors;

/// Loads `dir` as [`crate::load_model`] does, with the block linears in `storage`: the returned
/// [`HfModel`]'s linear tensors are empty (shape kept, no data) and the [`FrozenLinears`] hold them.
/// Pass both to `engine::Model::new(&model.params, ..).with_frozen(&frozen)`.
pub fn load_model_stored(dir: &Path, storage: Storage) -> Result<(HfModel, FrozenLinears)> {
    let (model, frozen, _) = load(dir, Some(storage), None)?;
    Ok((model, frozen.ok_or_else(|| internal(dir, "no block linears stored"))?))
}

/// [`load_model_stored`], with the token embedding and head kept as a [`FrozenEmbedding`] for the
/// lookups of `tokens` (a bf16 LoRA run's base: `dpo train` knows its data's tokens before it loads the
/// model), made as they are read: an untied embedding's other rows and each f32 table are dropped at
/// once, so the two f32 tables (Llama-3-8B: 2 GiB each) are never held together nor beside the bf16 head.
/// The returned model's `wte` and `lm_head` are empty.
pub fn load_frozen_base(
    dir: &Path,
    storage: Storage,
    tokens: &BTreeSet<u32>,
) -> Result<(HfModel, FrozenLinears, FrozenEmbedding)> {
    let (model, frozen, tables) = load(dir, Some(storage), Some(tokens))?;
    let frozen = frozen.ok_or_else(|| internal(dir, "no block linears stored"))?;
    Ok((model, frozen, tables.ok_or_else(|| internal(dir, "no token embedding"))?))
}

/// [`load_frozen_base`] with the block linears left in f32 in the returned model (a bf16 LoRA run with
/// `--base-dtype f32`): the same tables, made as they are read, so the f32 embedding and head are never
/// held together nor beside the bf16 head, as `load_model` and then freezing them would.
pub fn load_with_frozen_tables(dir: &Path, tokens: &BTreeSet<u32>) -> Result<(HfModel, FrozenEmbedding)> {
    let (model, _, tables) = load(dir, None, Some(tokens))?;
    Ok((model, tables.ok_or_else(|| internal(dir, "no token embedding"))?))
}

fn internal(dir: &Path, what: &str) -> Error {
    Error::Weights { path: dir.to_path_buf(), problems: vec![format!("internal: {what}; please report this")] }
}

/// `storage: None` leaves the block linears in the model's f32 tensors.
fn load(
    dir: &Path,
    storage: Option<Storage>,
    tokens: Option<&BTreeSet<u32>>,
) -> Result<(HfModel, Option<FrozenLinears>, Option<FrozenEmbedding>)> {
    let config = load_config(dir)?;
    let ckpt = Checkpoint::open_dir(dir)?;
    let cfg = &config.decoder;
    let (vocab, d) = (cfg.vocab_size, cfg.hidden);
    // `Params::zeros` allocates without touching pages; the linears' zeros are dropped unused.
    let mut params = Params::zeros(cfg);
    for (name, t) in params.named_mut() {
        if storage.is_some() && FrozenLinears::linear_of(&name).is_some() {
            t.data = Vec::new();
        }
    }
    let mut slots: Vec<[Option<Matrix>; 4]> = (0..cfg.n_layers).map(|_| Default::default()).collect();
    let problem = |what: String| Error::Weights { path: ckpt.path.clone(), problems: vec![what] };
    // With `tokens`: the untied embedding's kept rows, and the head in bf16, as each is read.
    let (mut lookups, mut head) = (None, None);
    {
        let mut named = params.named_mut();
        read_tensors(&ckpt, &config, |engine_name, data| {
            let Some((_, t)) = named.iter_mut().find(|(n, _)| n == engine_name) else {
                return Err(internal(dir, &format!("no engine tensor `{engine_name}`")));
            };
            let stored =
                |e: engine::quant::QuantError| problem(format!("`{engine_name}` cannot be stored as bf16: {e}"));
            let linear = storage.and_then(|s| FrozenLinears::linear_of(engine_name).map(|l| (l, s)));
            match (linear, tokens) {
                (Some(((layer, site), storage)), _) => {
                    let (rows, cols) = (t.shape[0], t.shape[1]);
                    let m = Matrix::new(data, rows, cols, storage)
                        .map_err(|e| problem(format!("`{engine_name}` cannot be stored as {storage:?}: {e}")))?;
                    slots[layer][FrozenLinears::slot_of(site)] = Some(m);
                }
                _ if t.data.len() != data.len() => {
                    return Err(internal(dir, &format!("`{engine_name}` has the wrong size")))
                }
                (None, Some(tokens)) if engine_name == "wte" && !cfg.tied_embeddings => {
                    lookups = Some(Lookups::of(&data, vocab, d, tokens).map_err(stored)?);
                    t.data = Vec::new();
                }
                (None, Some(_)) if engine_name == "lm_head" => {
                    head = Some(Matrix::bf16_from(data, vocab, d).map_err(stored)?);
                    t.data = Vec::new();
                }
                (None, _) => t.data = data,
            }
            Ok(())
        })?;
    }
    let frozen = match storage {
        Some(_) => Some(FrozenLinears::from_slots(slots).map_err(|e| internal(dir, &e))?),
        None => None,
    };
    let tables = match tokens {
        None => None,
        // Tied: the embedding read whole in f32 becomes the lookups and the bf16 head.
        Some(tokens) if cfg.tied_embeddings => {
            let wte = std::mem::take(&mut params.wte.data);
            Some(FrozenEmbedding::new(wte, None, vocab, d, tokens).map_err(|e| problem(format!("`wte`: {e}")))?)
        }
        Some(_) => match (lookups, head) {
            (Some(l), Some(h)) => {
                Some(FrozenEmbedding::from_parts(l, h).map_err(|e| problem(format!("`lm_head`: {e}")))?)
            }
            _ => return Err(internal(dir, "the embedding or the head was not read")),
        },
    };
    Ok((HfModel { config, params, dir: dir.to_path_buf() }, frozen, tables))
}
