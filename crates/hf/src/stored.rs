//! Loading a frozen base (QLoRA) with its block linears stored as they are read: each layer's `w_qkv`,
//! `w_o`, `w_in`, `w_out` goes into a [`Matrix`] (NF4, bf16 or f32) a block of the file at a time
//! ([`MatrixBuilder`], fed by [`read_tensors`]' [`Values::Blocks`]), so the peak is the f32 non-linear
//! tensors (norms, biases, and the embedding and head unless frozen) + the stored bytes + one block, never
//! the whole model nor one whole linear in f32. A bf16 LoRA run's base ([`load_frozen_base`], or
//! [`load_with_frozen_tables`] with f32 linears) keeps its embedding and head as a `FrozenEmbedding` made
//! the same way: the lookups' rows gathered and the head narrowed to bf16 block by block. A checkpoint
//! stored in bf16 is sampled from with both tables kept whole in bf16 ([`load_with_bf16_tables`]), which
//! loses nothing. Layouts the engine converts (GPT-2's transposed Conv1D, NeoX's interleaved q/k/v) are
//! read whole, one at a time.

use std::collections::BTreeSet;
use std::path::Path;

use engine::quant::{FrozenEmbedding, FrozenLinears, Lookups, Matrix, MatrixBuilder, QuantError, Storage};
use engine::Params;

use crate::error::{Error, Result};
use crate::model_dir::{load_config, HfModel};
use crate::safetensors::{Checkpoint, Dtype};
use crate::weights::{read_tensors, Values};

/// Loads `dir` as [`crate::load_model`] does, with the block linears in `storage`: the returned
/// [`HfModel`]'s linear tensors are empty (shape kept, no data) and the [`FrozenLinears`] hold them.
/// Pass both to `engine::Model::new(&model.params, ..).with_frozen(&frozen)`.
pub fn load_model_stored(dir: &Path, storage: Storage) -> Result<(HfModel, FrozenLinears)> {
    let (model, frozen, _) = load(dir, Some(storage), Tables::F32)?;
    Ok((model, frozen.ok_or_else(|| internal(dir, "no block linears stored"))?))
}

/// [`load_model_stored`], with the token embedding and head kept as a [`FrozenEmbedding`] for the
/// lookups of `tokens` (a bf16 LoRA run's base: `dpo train` knows its data's tokens before it loads the
/// model), made as they are read, a block of the file at a time: neither f32 table (Llama-3-8B: 2 GiB
/// each) is ever held whole.
/// The returned model's `wte` and `lm_head` are empty.
pub fn load_frozen_base(
    dir: &Path,
    storage: Storage,
    tokens: &BTreeSet<u32>,
) -> Result<(HfModel, FrozenLinears, FrozenEmbedding)> {
    let (model, frozen, tables) = load(dir, Some(storage), Tables::Kept(tokens))?;
    let frozen = frozen.ok_or_else(|| internal(dir, "no block linears stored"))?;
    Ok((model, frozen, tables.ok_or_else(|| internal(dir, "no token embedding"))?))
}

/// [`load_model_stored`] of a checkpoint stored in bf16, its token embedding and head kept whole in
/// bf16 as well ([`FrozenEmbedding::whole`]), each made as the file is read: the model holds every
/// value as the file does (bf16 widens to f32 exactly), in half the bytes of f32, and generates. Refused
/// unless every floating tensor of the checkpoint is bf16. The returned model's `wte` and `lm_head` are
/// empty.
pub fn load_with_bf16_tables(dir: &Path, storage: Storage) -> Result<(HfModel, FrozenLinears, FrozenEmbedding)> {
    let dtype = Checkpoint::open_dir(dir)?.float_dtype();
    if dtype != Some(Dtype::BF16) {
        let stored = dtype.map_or("tensors of several dtypes", |d| d.name());
        return Err(Error::dir(dir, format!("bf16 tables need a checkpoint stored in bf16; it holds {stored}")));
    }
    let (model, frozen, tables) = load(dir, Some(storage), Tables::Whole)?;
    let frozen = frozen.ok_or_else(|| internal(dir, "no block linears stored"))?;
    Ok((model, frozen, tables.ok_or_else(|| internal(dir, "no token embedding"))?))
}

/// [`load_frozen_base`] with the block linears left in f32 in the returned model (a bf16 LoRA run with
/// `--base-dtype f32`): the same tables, made as they are read, so the f32 embedding and head are never
/// held whole, as `load_model` and then freezing them would hold them.
pub fn load_with_frozen_tables(dir: &Path, tokens: &BTreeSet<u32>) -> Result<(HfModel, FrozenEmbedding)> {
    let (model, _, tables) = load(dir, None, Tables::Kept(tokens))?;
    Ok((model, tables.ok_or_else(|| internal(dir, "no token embedding"))?))
}

fn internal(dir: &Path, what: &str) -> Error {
    Error::Weights { path: dir.to_path_buf(), problems: vec![format!("internal: {what}; please report this")] }
}

/// How [`load`] keeps the token embedding and the head.
#[derive(Clone, Copy)]
enum Tables<'t> {
    /// In the model's f32 tensors.
    F32,
    /// A [`FrozenEmbedding`] of these tokens' f32 rows, the head in bf16.
    Kept(&'t BTreeSet<u32>),
    /// A [`FrozenEmbedding::whole`]: both tables in bf16.
    Whole,
}

/// `storage: None` leaves the block linears in the model's f32 tensors.
fn load(
    dir: &Path,
    storage: Option<Storage>,
    tables: Tables<'_>,
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
    // Unless `Tables::F32`: the embedding's kept rows or its whole bf16 table, and the head (the tied
    // embedding, or its own) in bf16.
    let (mut lookups, mut whole, mut head) = (None, None, None);
    {
        let mut named = params.named_mut();
        read_tensors(&ckpt, &config, |engine_name, values| {
            let Some((_, t)) = named.iter_mut().find(|(n, _)| n == engine_name) else {
                return Err(internal(dir, &format!("no engine tensor `{engine_name}`")));
            };
            if values.len() != t.shape.iter().product::<usize>() {
                return Err(internal(dir, &format!("`{engine_name}` has the wrong size")));
            }
            let stored = |storage: Storage| {
                move |e: QuantError| problem(format!("`{engine_name}` cannot be stored as {storage:?}: {e}"))
            };
            let gathered = |e: QuantError| problem(format!("`{engine_name}`'s rows cannot be kept: {e}"));
            let linear = storage.and_then(|s| FrozenLinears::linear_of(engine_name).map(|l| (l, s)));
            let is_table = engine_name == "wte" || engine_name == "lm_head";
            match (linear, tables) {
                (Some(((layer, site), storage)), _) => {
                    let (rows, cols) = (t.shape[0], t.shape[1]);
                    let m = match values {
                        // Converted (GPT-2's transpose, NeoX's de-interleave): already whole in f32.
                        Values::Whole(w) => Matrix::new(w, rows, cols, storage).map_err(stored(storage))?,
                        blocks => {
                            let mut m = MatrixBuilder::new(rows, cols, storage);
                            blocks.for_each_block(|b| m.push(b).map_err(stored(storage)))?;
                            m.finish().map_err(stored(storage))?
                        }
                    };
                    slots[layer][FrozenLinears::slot_of(site)] = Some(m);
                }
                (None, Tables::Whole) if is_table => {
                    let mut m = MatrixBuilder::new(vocab, d, Storage::Bf16);
                    values.for_each_block(|b| m.push(b).map_err(stored(Storage::Bf16)))?;
                    let m = m.finish().map_err(stored(Storage::Bf16))?;
                    // The tied embedding is the head; an untied one is the lookups' own table.
                    if engine_name == "wte" && !cfg.tied_embeddings {
                        whole = Some(m);
                    } else {
                        head = Some(m);
                    }
                    t.data = Vec::new();
                }
                (None, Tables::Kept(tokens)) if is_table => {
                    // The embedding gives the lookups, and the head too where tied; each block of the
                    // f32 table goes where it is kept as it is read.
                    let wte = engine_name == "wte";
                    let mut gather = wte.then(|| Lookups::gather(vocab, d, tokens));
                    let mut bf16 = (!wte || cfg.tied_embeddings).then(|| MatrixBuilder::new(vocab, d, Storage::Bf16));
                    values.for_each_block(|b| {
                        if let Some(g) = &mut gather {
                            g.push(b).map_err(gathered)?;
                        }
                        match &mut bf16 {
                            Some(h) => h.push(b).map_err(stored(Storage::Bf16)),
                            None => Ok(()),
                        }
                    })?;
                    if let Some(g) = gather {
                        lookups = Some(g.finish().map_err(gathered)?);
                    }
                    if let Some(h) = bf16 {
                        head = Some(h.finish().map_err(stored(Storage::Bf16))?);
                    }
                    t.data = Vec::new();
                }
                (None, _) => t.data = values.into_vec()?,
            }
            Ok(())
        })?;
    }
    let frozen = match storage {
        Some(_) => Some(FrozenLinears::from_slots(slots).map_err(|e| internal(dir, &e))?),
        None => None,
    };
    let table_error = |e: QuantError| problem(format!("`lm_head`: {e}"));
    let tables = match (tables, lookups, head) {
        (Tables::F32, ..) => None,
        (Tables::Kept(_), Some(l), Some(h)) => Some(FrozenEmbedding::from_parts(l, h).map_err(table_error)?),
        (Tables::Whole, None, Some(h)) if whole.is_some() != cfg.tied_embeddings => {
            Some(FrozenEmbedding::whole(h, whole).map_err(table_error)?)
        }
        _ => return Err(internal(dir, "the embedding or the head was not read")),
    };
    Ok((HfModel { config, params, dir: dir.to_path_buf() }, frozen, tables))
}
