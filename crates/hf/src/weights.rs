//! HF tensor names ↔ engine [`Params`], with the layout conversions between them.
//!
//! One `Entry` per engine tensor says which HF tensors make it and how: copied, transposed (GPT-2's
//! Conv1D stores `[in, out]`), row-concatenated (q/k/v, gate/up) or de-interleaved (NeoX stores q/k/v rows
//! as `[n_heads, 3, head_dim]`). Loading and saving both walk the same table, so they are inverses.

use std::collections::HashSet;
use std::path::Path;

use engine::{Params, Tensor};

use crate::config::{Arch, ModelConfig};
use crate::error::{Error, Result};
use crate::safetensors::Checkpoint;

/// How HF tensors become one engine tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Conv {
    /// One HF tensor, same layout.
    Copy,
    /// One HF 2-D tensor stored `[in, out]`; the engine wants `[out, in]`.
    Transpose,
    /// Several HF tensors stacked along rows, in order.
    Concat,
    /// One HF tensor whose rows are `[n_heads, 3, head_dim]`; the engine wants q rows, k rows, v rows.
    NeoxQkv { n_heads: usize, head_dim: usize },
}

/// One engine tensor and its HF sources (name, HF shape).
#[derive(Clone, Debug)]
struct Entry {
    engine: String,
    hf: Vec<(String, Vec<usize>)>,
    conv: Conv,
}

/// The table for `cfg`, in [`Params::named`] order.
fn plan(cfg: &ModelConfig) -> Vec<Entry> {
    let c = &cfg.decoder;
    let (d, v, ff) = (c.hidden, c.vocab_size, c.ffn_hidden);
    let (q, kv) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
    let mut out = Vec::new();
    let mut e = |engine: String, conv: Conv, hf: Vec<(String, Vec<usize>)>| out.push(Entry { engine, hf, conv });
    let one = |name: String, shape: Vec<usize>| vec![(name, shape)];
    match cfg.arch {
        Arch::Gpt2 => {
            let t = "transformer";
            e("wte".into(), Conv::Copy, one(format!("{t}.wte.weight"), vec![v, d]));
            e("wpe".into(), Conv::Copy, one(format!("{t}.wpe.weight"), vec![c.max_positions, d]));
            for i in 0..c.n_layers {
                let (p, l) = (format!("{t}.h.{i}"), format!("layers.{i}"));
                e(format!("{l}.norm1.weight"), Conv::Copy, one(format!("{p}.ln_1.weight"), vec![d]));
                e(format!("{l}.norm1.bias"), Conv::Copy, one(format!("{p}.ln_1.bias"), vec![d]));
                e(format!("{l}.w_qkv"), Conv::Transpose, one(format!("{p}.attn.c_attn.weight"), vec![d, 3 * d]));
                e(format!("{l}.b_qkv"), Conv::Copy, one(format!("{p}.attn.c_attn.bias"), vec![3 * d]));
                e(format!("{l}.w_o"), Conv::Transpose, one(format!("{p}.attn.c_proj.weight"), vec![d, d]));
                e(format!("{l}.b_o"), Conv::Copy, one(format!("{p}.attn.c_proj.bias"), vec![d]));
                e(format!("{l}.norm2.weight"), Conv::Copy, one(format!("{p}.ln_2.weight"), vec![d]));
                e(format!("{l}.norm2.bias"), Conv::Copy, one(format!("{p}.ln_2.bias"), vec![d]));
                e(format!("{l}.w_in"), Conv::Transpose, one(format!("{p}.mlp.c_fc.weight"), vec![d, ff]));
                e(format!("{l}.b_in"), Conv::Copy, one(format!("{p}.mlp.c_fc.bias"), vec![ff]));
                e(format!("{l}.w_out"), Conv::Transpose, one(format!("{p}.mlp.c_proj.weight"), vec![ff, d]));
                e(format!("{l}.b_out"), Conv::Copy, one(format!("{p}.mlp.c_proj.bias"), vec![d]));
            }
            e("norm_f.weight".into(), Conv::Copy, one(format!("{t}.ln_f.weight"), vec![d]));
            e("norm_f.bias".into(), Conv::Copy, one(format!("{t}.ln_f.bias"), vec![d]));
            if !c.tied_embeddings {
                e("lm_head".into(), Conv::Copy, one("lm_head.weight".into(), vec![v, d]));
            }
        }
        Arch::Llama => {
            e("wte".into(), Conv::Copy, one("model.embed_tokens.weight".into(), vec![v, d]));
            for i in 0..c.n_layers {
                let (p, l) = (format!("model.layers.{i}"), format!("layers.{i}"));
                let a = format!("{p}.self_attn");
                let m = format!("{p}.mlp");
                e(format!("{l}.norm1.weight"), Conv::Copy, one(format!("{p}.input_layernorm.weight"), vec![d]));
                e(
                    format!("{l}.w_qkv"),
                    Conv::Concat,
                    vec![
                        (format!("{a}.q_proj.weight"), vec![q, d]),
                        (format!("{a}.k_proj.weight"), vec![kv, d]),
                        (format!("{a}.v_proj.weight"), vec![kv, d]),
                    ],
                );
                if c.qkv_bias {
                    e(
                        format!("{l}.b_qkv"),
                        Conv::Concat,
                        vec![
                            (format!("{a}.q_proj.bias"), vec![q]),
                            (format!("{a}.k_proj.bias"), vec![kv]),
                            (format!("{a}.v_proj.bias"), vec![kv]),
                        ],
                    );
                }
                e(format!("{l}.w_o"), Conv::Copy, one(format!("{a}.o_proj.weight"), vec![d, q]));
                if c.attn_out_bias {
                    e(format!("{l}.b_o"), Conv::Copy, one(format!("{a}.o_proj.bias"), vec![d]));
                }
                e(
                    format!("{l}.norm2.weight"),
                    Conv::Copy,
                    one(format!("{p}.post_attention_layernorm.weight"), vec![d]),
                );
                e(
                    format!("{l}.w_in"),
                    Conv::Concat,
                    vec![(format!("{m}.gate_proj.weight"), vec![ff, d]), (format!("{m}.up_proj.weight"), vec![ff, d])],
                );
                if c.mlp_bias {
                    e(
                        format!("{l}.b_in"),
                        Conv::Concat,
                        vec![(format!("{m}.gate_proj.bias"), vec![ff]), (format!("{m}.up_proj.bias"), vec![ff])],
                    );
                }
                e(format!("{l}.w_out"), Conv::Copy, one(format!("{m}.down_proj.weight"), vec![d, ff]));
                if c.mlp_bias {
                    e(format!("{l}.b_out"), Conv::Copy, one(format!("{m}.down_proj.bias"), vec![d]));
                }
            }
            e("norm_f.weight".into(), Conv::Copy, one("model.norm.weight".into(), vec![d]));
            if !c.tied_embeddings {
                e("lm_head".into(), Conv::Copy, one("lm_head.weight".into(), vec![v, d]));
            }
        }
        Arch::GptNeox => {
            let qkv = Conv::NeoxQkv { n_heads: c.n_heads, head_dim: c.head_dim };
            e("wte".into(), Conv::Copy, one("gpt_neox.embed_in.weight".into(), vec![v, d]));
            for i in 0..c.n_layers {
                let (p, l) = (format!("gpt_neox.layers.{i}"), format!("layers.{i}"));
                let a = format!("{p}.attention");
                let m = format!("{p}.mlp");
                e(format!("{l}.norm1.weight"), Conv::Copy, one(format!("{p}.input_layernorm.weight"), vec![d]));
                e(format!("{l}.norm1.bias"), Conv::Copy, one(format!("{p}.input_layernorm.bias"), vec![d]));
                e(format!("{l}.w_qkv"), qkv, one(format!("{a}.query_key_value.weight"), vec![3 * q, d]));
                if c.qkv_bias {
                    e(format!("{l}.b_qkv"), qkv, one(format!("{a}.query_key_value.bias"), vec![3 * q]));
                }
                e(format!("{l}.w_o"), Conv::Copy, one(format!("{a}.dense.weight"), vec![d, q]));
                if c.attn_out_bias {
                    e(format!("{l}.b_o"), Conv::Copy, one(format!("{a}.dense.bias"), vec![d]));
                }
                e(
                    format!("{l}.norm2.weight"),
                    Conv::Copy,
                    one(format!("{p}.post_attention_layernorm.weight"), vec![d]),
                );
                e(format!("{l}.norm2.bias"), Conv::Copy, one(format!("{p}.post_attention_layernorm.bias"), vec![d]));
                e(format!("{l}.w_in"), Conv::Copy, one(format!("{m}.dense_h_to_4h.weight"), vec![ff, d]));
                e(format!("{l}.b_in"), Conv::Copy, one(format!("{m}.dense_h_to_4h.bias"), vec![ff]));
                e(format!("{l}.w_out"), Conv::Copy, one(format!("{m}.dense_4h_to_h.weight"), vec![d, ff]));
                e(format!("{l}.b_out"), Conv::Copy, one(format!("{m}.dense_4h_to_h.bias"), vec![d]));
            }
            e("norm_f.weight".into(), Conv::Copy, one("gpt_neox.final_layer_norm.weight".into(), vec![d]));
            e("norm_f.bias".into(), Conv::Copy, one("gpt_neox.final_layer_norm.bias".into(), vec![d]));
            if !c.tied_embeddings {
                e("lm_head".into(), Conv::Copy, one("embed_out.weight".into(), vec![v, d]));
            }
        }
    }
    out
}

/// Buffers and duplicates that checkpoints may carry and the model does not use.
fn ignored(cfg: &ModelConfig, name: &str) -> bool {
    let tied = cfg.decoder.tied_embeddings;
    name.ends_with("rotary_emb.inv_freq")
        || match cfg.arch {
            Arch::Gpt2 => {
                name.ends_with(".attn.bias")
                    || name.ends_with(".attn.masked_bias")
                    || (tied && name == "lm_head.weight")
            }
            Arch::Llama => tied && name == "lm_head.weight",
            Arch::GptNeox => {
                name.ends_with(".attention.bias")
                    || name.ends_with(".attention.masked_bias")
                    || (tied && (name == "embed_out.weight" || name == "lm_head.weight"))
            }
        }
}

/// The names a tensor may be stored under, preferred (saved) name first.
fn aliases(arch: Arch, name: &str) -> Vec<String> {
    let mut out = vec![name.to_string()];
    match arch {
        // Checkpoints saved from `GPT2Model` (not `GPT2LMHeadModel`) lack the `transformer.` prefix.
        Arch::Gpt2 => out.extend(name.strip_prefix("transformer.").map(str::to_string)),
        // transformers 5 names NeoX's output layer `lm_head` in memory (so gradient dumps use that name)
        // and `embed_out` on disk.
        Arch::GptNeox if name == "embed_out.weight" => out.push("lm_head.weight".into()),
        _ => {}
    }
    out
}

/// Loads the weights of model directory `dir` (single file or sharded) into engine [`Params`].
pub fn load_params(dir: &Path, config: &ModelConfig) -> Result<Params> {
    params_from_checkpoint(&Checkpoint::open_dir(dir)?, config)
}

/// Loads one safetensors file with HF names (a checkpoint, or a gradient file with the same names).
pub fn load_params_file(path: &Path, config: &ModelConfig) -> Result<Params> {
    params_from_checkpoint(&Checkpoint::open_file(path)?, config)
}

/// Maps an opened checkpoint onto [`Params`]. Every problem — missing, unexpected, wrong shape, unreadable
/// dtype, NaN/infinite values — is collected and reported together, each under its HF name.
pub fn params_from_checkpoint(ckpt: &Checkpoint, config: &ModelConfig) -> Result<Params> {
    let entries = plan(config);
    let resolve = |name: &str| aliases(config.arch, name).into_iter().find(|n| ckpt.info(n).is_some());
    let mut problems = Vec::new();
    let mut used = HashSet::new();
    let mut built = Vec::with_capacity(entries.len());
    for entry in &entries {
        let mut parts = Vec::with_capacity(entry.hf.len());
        for (name, want) in &entry.hf {
            let Some(found) = resolve(name) else {
                problems.push(format!("missing tensor `{name}` (expected shape {want:?})"));
                continue;
            };
            used.insert(found.clone());
            let info = ckpt.info(&found).map(|i| i.shape.clone()).unwrap_or_default();
            if &info != want {
                problems.push(format!("tensor `{found}`: expected shape {want:?}, found {info:?}"));
                continue;
            }
            match ckpt.read_f32(&found) {
                Ok(t) => match t.data.iter().position(|x| !x.is_finite()) {
                    Some(i) => problems.push(format!(
                        "tensor `{found}`: value {} at flat index {i} is not finite; the checkpoint is corrupt \
                         or diverged",
                        t.data[i]
                    )),
                    None => parts.push(t.data),
                },
                Err(e) => problems.push(e.to_string()),
            }
        }
        if parts.len() == entry.hf.len() {
            built.push((entry, parts));
        }
    }
    for name in ckpt.names() {
        if !used.contains(name) && !ignored(config, name) {
            let shape = ckpt.info(name).map(|i| i.shape.clone()).unwrap_or_default();
            problems.push(format!("unexpected tensor `{name}` (shape {shape:?})"));
        }
    }
    if !problems.is_empty() {
        return Err(Error::Weights { path: ckpt.path.clone(), problems });
    }
    let mut params = Params::zeros(&config.decoder);
    let mut slots = params.named_mut();
    if built.len() != slots.len() {
        return Err(internal(ckpt, "<count>"));
    }
    for (entry, parts) in built {
        let Some((_, slot)) = slots.iter_mut().find(|(n, _)| *n == entry.engine) else {
            return Err(internal(ckpt, &entry.engine));
        };
        let data = to_engine(entry, parts);
        if data.len() != slot.data.len() {
            return Err(internal(ckpt, &entry.engine));
        }
        slot.data = data;
    }
    Ok(params)
}

fn internal(ckpt: &Checkpoint, engine_name: &str) -> Error {
    Error::Weights {
        path: ckpt.path.clone(),
        problems: vec![format!(
            "internal: the name table and engine::Params disagree on `{engine_name}`; please report this"
        )],
    }
}

/// Checks that `params` has exactly the tensors and shapes `config` implies.
pub fn check_params(config: &ModelConfig, params: &Params) -> std::result::Result<(), String> {
    let want = Params::zeros(&config.decoder);
    let (a, b) = (want.named(), params.named());
    let mut problems = Vec::new();
    for (name, t) in &a {
        match b.iter().find(|(n, _)| n == name) {
            None => problems.push(format!("`{name}` missing")),
            Some((_, p)) if p.shape != t.shape || p.data.len() != t.data.len() => {
                problems.push(format!("`{name}`: expected shape {:?}, found {:?}", t.shape, p.shape))
            }
            Some(_) => {}
        }
    }
    for (name, _) in &b {
        if !a.iter().any(|(n, _)| n == name) {
            problems.push(format!("`{name}` not expected by the config"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// The inverse of loading: `(HF name, HF shape, values)` for every tensor, as transformers saves them
/// (a tied model has no `lm_head.weight` / `embed_out.weight`).
///
/// `params` must match `config` ([`check_params`]); it does when it came from [`load_params`] or
/// `Params::zeros(&config.decoder)`. Panics otherwise (a programming error, not bad input).
pub fn to_hf_tensors(config: &ModelConfig, params: &Params) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let named = params.named();
    let mut out = Vec::new();
    for entry in plan(config) {
        let Some((_, t)) = named.iter().find(|(n, _)| *n == entry.engine) else {
            panic!("to_hf_tensors: params lack `{}`; they do not match the config", entry.engine)
        };
        for ((name, shape), data) in entry.hf.iter().zip(from_engine(&entry, t)) {
            out.push((name.clone(), shape.clone(), data));
        }
    }
    out
}

/// HF parts (in `entry.hf` order, shapes already checked) → engine data.
fn to_engine(entry: &Entry, parts: Vec<Vec<f32>>) -> Vec<f32> {
    match entry.conv {
        Conv::Copy => parts.into_iter().next().unwrap_or_default(),
        Conv::Concat => parts.concat(),
        Conv::Transpose => {
            let s = &entry.hf[0].1;
            transpose(&parts[0], s[0], s[1])
        }
        Conv::NeoxQkv { n_heads, head_dim } => {
            let s = &entry.hf[0].1;
            let cols = if s.len() == 2 { s[1] } else { 1 };
            neox_qkv(&parts[0], n_heads, head_dim, cols, false)
        }
    }
}

/// Engine tensor → HF parts, in `entry.hf` order.
fn from_engine(entry: &Entry, t: &Tensor) -> Vec<Vec<f32>> {
    match entry.conv {
        Conv::Copy => vec![t.data.clone()],
        Conv::Concat => {
            let mut rest = &t.data[..];
            entry
                .hf
                .iter()
                .map(|(_, s)| {
                    let n = s.iter().product();
                    let (head, tail) = rest.split_at(n);
                    rest = tail;
                    head.to_vec()
                })
                .collect()
        }
        Conv::Transpose => {
            let s = &entry.hf[0].1;
            vec![transpose(&t.data, s[1], s[0])]
        }
        Conv::NeoxQkv { n_heads, head_dim } => {
            let s = &entry.hf[0].1;
            let cols = if s.len() == 2 { s[1] } else { 1 };
            vec![neox_qkv(&t.data, n_heads, head_dim, cols, true)]
        }
    }
}

/// `[rows, cols]` → `[cols, rows]`.
fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = x[r * cols + c];
        }
    }
    out
}

/// Rows `[n_heads, 3, head_dim]` (NeoX) ↔ `[3, n_heads, head_dim]` (engine: q rows, k rows, v rows); each
/// row has `cols` values. `to_hf` selects the direction.
fn neox_qkv(x: &[f32], n_heads: usize, head_dim: usize, cols: usize, to_hf: bool) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    let block = head_dim * cols;
    for h in 0..n_heads {
        for j in 0..3 {
            let hf = (h * 3 + j) * block;
            let en = (j * n_heads + h) * block;
            let (src, dst) = if to_hf { (en, hf) } else { (hf, en) };
            out[dst..dst + block].copy_from_slice(&x[src..src + block]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neox_deinterleave_is_inverted() {
        // 2 heads, head_dim 1, 2 columns: rows q0 k0 v0 q1 k1 v1.
        let hf: Vec<f32> = (0..12).map(|x| x as f32).collect();
        let en = neox_qkv(&hf, 2, 1, 2, false);
        assert_eq!(en, vec![0., 1., 6., 7., 2., 3., 8., 9., 4., 5., 10., 11.]);
        assert_eq!(neox_qkv(&en, 2, 1, 2, true), hf);
    }

    #[test]
    fn transpose_is_inverted() {
        let x: Vec<f32> = (0..6).map(|x| x as f32).collect();
        let t = transpose(&x, 2, 3);
        assert_eq!(t, vec![0., 3., 1., 4., 2., 5.]);
        assert_eq!(transpose(&t, 3, 2), x);
    }
}
