//! Loading a frozen base (QLoRA) with its block linears stored as they are read: each layer's `w_qkv`,
//! `w_o`, `w_in`, `w_out` goes into a [`Matrix`] (NF4, bf16 or f32) the moment it is built from the
//! checkpoint and its f32 copy is freed, so the peak is the f32 non-linear tensors (embeddings, norms,
//! biases, head) + one f32 linear + the stored bytes, never the whole model in f32.

use std::path::Path;

use engine::quant::{FrozenLinears, Matrix, Storage};
use engine::Params;

use crate::error::{Error, Result};
use crate::model_dir::{load_config, HfModel};
use crate::safetensors::Checkpoint;
use crate::weights::read_tensors;

/// Loads `dir` as [`crate::load_model`] does, with the block linears in `storage`: the returned
/// [`HfModel`]'s linear tensors are empty (shape kept, no data) and the [`FrozenLinears`] hold them.
/// Pass both to `engine::Model::new(&model.params, ..).with_frozen(&frozen)`.
pub fn load_model_stored(dir: &Path, storage: Storage) -> Result<(HfModel, FrozenLinears)> {
    let config = load_config(dir)?;
    let ckpt = Checkpoint::open_dir(dir)?;
    let cfg = &config.decoder;
    // `Params::zeros` allocates without touching pages; the linears' zeros are dropped unused.
    let mut params = Params::zeros(cfg);
    for (name, t) in params.named_mut() {
        if FrozenLinears::linear_of(&name).is_some() {
            t.data = Vec::new();
        }
    }
    let mut slots: Vec<[Option<Matrix>; 4]> = (0..cfg.n_layers).map(|_| Default::default()).collect();
    let problem = |what: String| Error::Weights { path: ckpt.path.clone(), problems: vec![what] };
    {
        let mut named = params.named_mut();
        read_tensors(&ckpt, &config, |engine_name, data| {
            let Some((_, t)) = named.iter_mut().find(|(n, _)| n == engine_name) else {
                return Err(problem(format!("internal: no engine tensor `{engine_name}`; please report this")));
            };
            match FrozenLinears::linear_of(engine_name) {
                Some((layer, site)) => {
                    let (rows, cols) = (t.shape[0], t.shape[1]);
                    let m = Matrix::new(data, rows, cols, storage)
                        .map_err(|e| problem(format!("`{engine_name}` cannot be stored as {storage:?}: {e}")))?;
                    slots[layer][FrozenLinears::slot_of(site)] = Some(m);
                }
                None if t.data.len() == data.len() => t.data = data,
                None => {
                    return Err(problem(format!("internal: `{engine_name}` has the wrong size; please report this")))
                }
            }
            Ok(())
        })?;
    }
    let frozen = FrozenLinears::from_slots(slots).map_err(|e| problem(format!("internal: {e}; please report this")))?;
    Ok((HfModel { config, params, dir: dir.to_path_buf() }, frozen))
}
