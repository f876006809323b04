//! A LoRA run's frozen base, loaded as the run holds it: the block linears stored (QLoRA's NF4, bf16)
//! as they are read, and in a bf16 run the token embedding and head as a [`FrozenEmbedding`] (the data's
//! lookup rows in f32, the head in bf16), made as they are read too.

use std::collections::BTreeSet;

use engine::kernels::Precision;
use engine::model::Model;
use engine::quant::{FrozenEmbedding, FrozenLinears, Storage};
use engine::Adapter;

use super::{memory, TrainConfig, TrainError};

/// What of a LoRA run's base is held frozen other than in f32: its block linears (QLoRA's NF4, bf16) and,
/// in a bf16 run, its embedding and head ([`FrozenEmbedding`]: the head's products round it to bf16 anyway
/// and the lookups read the same f32 rows, so the numbers do not change).
#[derive(Clone, Copy)]
pub(super) struct Frozen<'a> {
    pub(super) linears: Option<&'a FrozenLinears>,
    pub(super) tables: Option<&'a FrozenEmbedding>,
}

/// `cfg.model` as a LoRA (or full) run holds it: the block linears in `cfg.base_storage`, and with
/// `tables_of` (a bf16 LoRA run: the data's tokens) the embedding and head frozen for those tokens.
pub(super) fn load(
    cfg: &TrainConfig,
    tables_of: Option<&BTreeSet<u32>>,
    log: &mut dyn FnMut(&str),
) -> Result<(hf::HfModel, Option<FrozenLinears>, Option<FrozenEmbedding>), TrainError> {
    // Each block linear is stored as it is read (the base never exists whole in f32), and with
    // `tables_of` so are the tables (the f32 embedding and head are never held together).
    let (model, frozen, embedding) = match (cfg.base_storage, tables_of) {
        (Storage::F32, None) => (hf::load_model(&cfg.model)?, None, None),
        (Storage::F32, Some(tokens)) => {
            let (model, tables) = hf::load_with_frozen_tables(&cfg.model, tokens)?;
            (model, None, Some(tables))
        }
        (storage, Some(tokens)) => {
            let (model, frozen, tables) = hf::load_frozen_base(&cfg.model, storage, tokens)?;
            (model, Some(frozen), Some(tables))
        }
        (storage, None) => {
            let (model, frozen) = hf::load_model_stored(&cfg.model, storage)?;
            (model, Some(frozen), None)
        }
    };
    if let Some(f) = &frozen {
        log(&format!("frozen base linears stored as {:?}: {}", cfg.base_storage, memory::human(f.bytes() as u64)));
    }
    if let Some(e) = &embedding {
        let (kept, bytes) = (e.kept(), memory::human(e.bytes() as u64));
        log(&format!("frozen base embedding: head in bf16, lookups of the data's {kept} tokens in f32: {bytes}"));
    }
    Ok((model, frozen, embedding))
}

/// `model`'s weights as a pass reads them: with its stored linears, and `adapter` on it, the products in
/// `precision`.
pub fn base_model<'a>(
    model: &'a hf::HfModel,
    frozen: Option<&'a FrozenLinears>,
    adapter: Option<&'a Adapter>,
    precision: Precision,
) -> Model<'a> {
    let m = Model::new(&model.params, adapter).with_precision(precision);
    match frozen {
        Some(f) => m.with_frozen(f),
        None => m,
    }
}
