//! `adapter_model.safetensors` ↔ [`Adapter`].
//!
//! PEFT stores each adapted module's pair as `base_model.model.<module path>.lora_A.weight` `[r, in]` and
//! `.lora_B.weight` `[out, r]`: `nn.Linear`-shaped even on GPT-2's `Conv1D` (there `fan_in_fan_out`
//! transposes the product `B A` when merging, never the factors), so A and B load as they are. Only
//! GPT-NeoX's fused `query_key_value` needs a change: its rows are `[n_heads, 3, head_dim]`, and B's rows
//! are permuted into the engine's q/k/v order exactly as the loader permutes the fused weight's rows.

use std::collections::HashSet;
use std::path::Path;

use engine::{Adapter, LayerAdapter, LoraPair, LoraTarget, Tensor};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::naming::{linear_modules, Hf, LinearModule};
use crate::safetensors::SafeTensors;
use crate::weights::neox_qkv;

/// What PEFT's `PeftModelForCausalLM` puts before a module path in its state dict.
const PREFIX: &str = "base_model.model.";

/// The names of the pair on the module at full path `key`: `(lora_A, lora_B)`.
pub fn pair_names(key: &str) -> (String, String) {
    (format!("{PREFIX}{key}.lora_A.weight"), format!("{PREFIX}{key}.lora_B.weight"))
}

/// The linear module of `target` on layer `layer`, if the model has it at the target's site and rows.
fn module_of<'a>(linear: &'a [LinearModule], layer: usize, target: &LoraTarget) -> Option<&'a LinearModule> {
    linear
        .iter()
        .find(|m| m.layer == layer && m.module == target.module && m.site == target.site && m.rows == target.rows)
}

/// Reads the pairs `targets` names from `path` into an [`Adapter`] with `dropout`. Every problem (a
/// missing, unexpected or non-finite tensor, a wrong shape, an unreadable dtype) is reported together,
/// each under its tensor name.
pub fn adapter_from_file(
    path: &Path,
    targets: &[Vec<LoraTarget>],
    model: &ModelConfig,
    dropout: f32,
) -> Result<Adapter> {
    let st = SafeTensors::open(path)?;
    let cfg = &model.decoder;
    let linear = linear_modules(model.naming, cfg);
    let mut problems = Vec::new();
    let mut used = HashSet::new();
    let mut layers = Vec::with_capacity(targets.len());
    for (layer, ts) in targets.iter().enumerate() {
        let mut pairs = Vec::with_capacity(ts.len());
        for t in ts {
            let Some(m) = module_of(&linear, layer, t) else {
                problems
                    .push(format!("internal: no linear module `{}` on layer {layer}; please report this", t.module));
                continue;
            };
            let (inp, _) = t.site.dims(cfg);
            let (a_name, b_name) = pair_names(&m.key);
            let a = read(&st, &a_name, &[t.r, inp], &mut used, &mut problems);
            let b = read(&st, &b_name, &[t.rows.len(), t.r], &mut used, &mut problems);
            if let (Some(a), Some(mut b)) = (a, b) {
                if matches!(m.layout, Hf::HeadsInterleaved(_)) {
                    b.data = neox_qkv(&b.data, cfg.n_heads, cfg.head_dim, t.r, false);
                }
                pairs.push(LoraPair { target: t.clone(), a, b });
            }
        }
        layers.push(LayerAdapter { pairs });
    }
    for info in st.tensors() {
        if !used.contains(&info.name) {
            problems.push(format!(
                "unexpected tensor `{}` (shape {:?}): adapter_config.json does not select this module",
                info.name, info.shape
            ));
        }
    }
    if !problems.is_empty() {
        return Err(Error::Weights { path: path.to_path_buf(), problems });
    }
    Ok(Adapter { dropout, layers })
}

/// One checked tensor of the file, or `None` with the problem recorded.
fn read(
    st: &SafeTensors,
    name: &str,
    want: &[usize],
    used: &mut HashSet<String>,
    problems: &mut Vec<String>,
) -> Option<Tensor> {
    let Some(info) = st.info(name) else {
        problems.push(format!("missing tensor `{name}` (expected shape {want:?})"));
        return None;
    };
    used.insert(name.to_string());
    if info.shape != want {
        problems.push(format!("tensor `{name}`: expected shape {want:?}, found {:?}", info.shape));
        return None;
    }
    match st.read_f32(name) {
        Ok(t) => match t.data.iter().position(|x| !x.is_finite()) {
            Some(i) => {
                problems.push(format!("tensor `{name}`: value {} at flat index {i} is not finite", t.data[i]));
                None
            }
            None => Some(t),
        },
        Err(e) => {
            problems.push(e.to_string());
            None
        }
    }
}

/// Checks that `adapter` fits `model`: one entry per layer, each pair on a linear module of its layer (at
/// that module's site and rows), each module at most once per layer, A `[r, in]`, B `[rows, r]`.
pub fn check_adapter(adapter: &Adapter, model: &ModelConfig) -> std::result::Result<(), Vec<String>> {
    let cfg = &model.decoder;
    let linear = linear_modules(model.naming, cfg);
    let mut problems = Vec::new();
    if adapter.layers.len() != cfg.n_layers {
        problems.push(format!("{} adapter layers for a model of {} layers", adapter.layers.len(), cfg.n_layers));
    }
    for (layer, la) in adapter.layers.iter().enumerate() {
        let mut seen = HashSet::new();
        for p in &la.pairs {
            let t = &p.target;
            if !seen.insert(&t.module) {
                problems.push(format!("layer {layer}: module `{}` has two pairs", t.module));
            }
            if module_of(&linear, layer, t).is_none() {
                problems.push(format!(
                    "layer {layer}: `{}` at {:?} rows {:?} is not a linear module of this {} model",
                    t.module, t.site, t.rows, model.model_type
                ));
                continue;
            }
            let (inp, _) = t.site.dims(cfg);
            for (part, tensor, want) in [("lora_A", &p.a, [t.r, inp]), ("lora_B", &p.b, [t.rows.len(), t.r])] {
                if tensor.shape != want || tensor.data.len() != want.iter().product::<usize>() {
                    problems.push(format!(
                        "layer {layer}: `{}.{part}`: expected shape {want:?}, found {:?} ({} values)",
                        t.module,
                        tensor.shape,
                        tensor.data.len()
                    ));
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// `(PEFT name, shape, values)` of every tensor of `adapter` (checked with [`check_adapter`] first).
pub fn adapter_tensors(adapter: &Adapter, model: &ModelConfig) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let cfg = &model.decoder;
    let linear = linear_modules(model.naming, cfg);
    let mut out = Vec::new();
    for (layer, la) in adapter.layers.iter().enumerate() {
        for p in &la.pairs {
            let Some(m) = module_of(&linear, layer, &p.target) else { continue };
            let (a_name, b_name) = pair_names(&m.key);
            let b = match m.layout {
                Hf::HeadsInterleaved(_) => neox_qkv(&p.b.data, cfg.n_heads, cfg.head_dim, p.target.r, true),
                _ => p.b.data.clone(),
            };
            out.push((a_name, p.a.shape.clone(), p.a.data.clone()));
            out.push((b_name, p.b.shape.clone(), b));
        }
    }
    out
}
