//! HF tensor names, one [`Naming`] row per checkpoint layout, and the one [`plan`] that walks the engine's
//! parameter names through a row.
//!
//! The engine names its tensors `wte`, `wpe`, `layers.{i}.{norm1.weight, w_qkv, b_qkv, ...}`, `norm_f.*`,
//! `lm_head`: each is a *module* (`qkv`, `norm1`, `embed`, ...) plus a *part* (`weight` or `bias`). A row
//! says where each module lives in the HF checkpoint and how its tensors are laid out there; the plan
//! appends `.weight` / `.bias`. Loading and saving both walk the plan, so they are inverses.

use std::ops::Range;

use engine::{DecoderConfig, Params, Site};

/// Where a module's tensors live in the checkpoint and how they are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hf {
    /// One HF module, the engine's layout (`nn.Linear` stores `[out, in]`, as the engine does).
    Same(&'static str),
    /// One GPT-2 `Conv1D` module: 2-D weights stored `[in, out]`, transposed on the way in and out.
    Conv1D(&'static str),
    /// Several HF modules whose rows the engine stacks in this order (q/k/v, gate/up).
    Rows(&'static [&'static str]),
    /// One fused q/k/v module whose rows are `[n_heads, 3, head_dim]` (GPT-NeoX); the engine wants all
    /// q rows, then all k rows, then all v rows.
    HeadsInterleaved(&'static str),
}

/// The HF names of one checkpoint layout. Module paths are relative to the model (`global`) or to layer
/// `i` (`layer`, with `{i}` in `layer_prefix`); a module the engine's config does not create is skipped.
#[derive(Debug, PartialEq)]
pub struct Naming {
    /// `"model.layers.{i}"`
    pub layer_prefix: &'static str,
    /// Engine module → HF module, for `wte` (`embed`), `wpe` (`positions`), `norm_f` and `lm_head`.
    pub global: &'static [(&'static str, Hf)],
    /// Engine module → HF module inside one layer (`norm1`, `qkv`, `o`, `norm2`, `mlp_in`, `mlp_out`, ...).
    pub layer: &'static [(&'static str, Hf)],
    /// Name suffixes of buffers that checkpoints may carry and the model does not use.
    pub ignored: &'static [&'static str],
    /// `(saved prefix, also accepted prefix)`: other names a tensor may be stored under.
    pub aliases: &'static [(&'static str, &'static str)],
}

/// Buffers every layout may carry: precomputed rotary frequencies.
const ALWAYS_IGNORED: &[&str] = &["rotary_emb.inv_freq"];

/// GPT-2: `transformer.h.{i}`, Conv1D weights.
pub static GPT2: Naming = Naming {
    layer_prefix: "transformer.h.{i}",
    global: &[
        ("embed", Hf::Same("transformer.wte")),
        ("positions", Hf::Same("transformer.wpe")),
        ("norm_f", Hf::Same("transformer.ln_f")),
        ("lm_head", Hf::Same("lm_head")),
    ],
    layer: &[
        ("norm1", Hf::Same("ln_1")),
        ("qkv", Hf::Conv1D("attn.c_attn")),
        ("o", Hf::Conv1D("attn.c_proj")),
        ("norm2", Hf::Same("ln_2")),
        ("mlp_in", Hf::Conv1D("mlp.c_fc")),
        ("mlp_out", Hf::Conv1D("mlp.c_proj")),
    ],
    ignored: &[".attn.bias", ".attn.masked_bias"],
    // Checkpoints saved from `GPT2Model` (not `GPT2LMHeadModel`) lack the `transformer.` prefix.
    aliases: &[("transformer.", "")],
};

/// The Llama layout (Llama, Mistral, Qwen2/3, SmolLM2/3): `model.layers.{i}`, split q/k/v and
/// gate/up projections.
pub static LLAMA: Naming = Naming {
    layer_prefix: "model.layers.{i}",
    global: &[
        ("embed", Hf::Same("model.embed_tokens")),
        ("norm_f", Hf::Same("model.norm")),
        ("lm_head", Hf::Same("lm_head")),
    ],
    layer: &[
        ("norm1", Hf::Same("input_layernorm")),
        ("qkv", Hf::Rows(&["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])),
        ("q_norm", Hf::Same("self_attn.q_norm")),
        ("k_norm", Hf::Same("self_attn.k_norm")),
        ("o", Hf::Same("self_attn.o_proj")),
        ("norm2", Hf::Same("post_attention_layernorm")),
        ("mlp_in", Hf::Rows(&["mlp.gate_proj", "mlp.up_proj"])),
        ("mlp_out", Hf::Same("mlp.down_proj")),
    ],
    ignored: &[],
    aliases: &[],
};

/// Gemma 3: the Llama layout with four norms per layer: `input_layernorm` (the engine's `norm1`),
/// `post_attention_layernorm` on the attention output, `pre_feedforward_layernorm` (`norm2`) and
/// `post_feedforward_layernorm` on the MLP output.
pub static GEMMA3: Naming = Naming {
    layer_prefix: "model.layers.{i}",
    global: LLAMA.global,
    layer: &[
        ("norm1", Hf::Same("input_layernorm")),
        ("qkv", Hf::Rows(&["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])),
        ("q_norm", Hf::Same("self_attn.q_norm")),
        ("k_norm", Hf::Same("self_attn.k_norm")),
        ("o", Hf::Same("self_attn.o_proj")),
        ("post_attn_norm", Hf::Same("post_attention_layernorm")),
        ("norm2", Hf::Same("pre_feedforward_layernorm")),
        ("post_mlp_norm", Hf::Same("post_feedforward_layernorm")),
        ("mlp_in", Hf::Rows(&["mlp.gate_proj", "mlp.up_proj"])),
        ("mlp_out", Hf::Same("mlp.down_proj")),
    ],
    ignored: &[],
    aliases: &[],
};

/// Phi-3 / Phi-4-mini: the Llama layout with q/k/v fused into `qkv_proj` (q rows, k rows, v rows) and
/// gate/up into `gate_up_proj` (gate rows, then up rows), both exactly the engine's fused layout.
pub static PHI3: Naming = Naming {
    layer_prefix: "model.layers.{i}",
    global: LLAMA.global,
    layer: &[
        ("norm1", Hf::Same("input_layernorm")),
        ("qkv", Hf::Same("self_attn.qkv_proj")),
        ("o", Hf::Same("self_attn.o_proj")),
        ("norm2", Hf::Same("post_attention_layernorm")),
        ("mlp_in", Hf::Same("mlp.gate_up_proj")),
        ("mlp_out", Hf::Same("mlp.down_proj")),
    ],
    ignored: &[],
    aliases: &[],
};

/// GPT-NeoX / Pythia: `gpt_neox.layers.{i}`, q/k/v interleaved per head.
pub static GPT_NEOX: Naming = Naming {
    layer_prefix: "gpt_neox.layers.{i}",
    global: &[
        ("embed", Hf::Same("gpt_neox.embed_in")),
        ("norm_f", Hf::Same("gpt_neox.final_layer_norm")),
        ("lm_head", Hf::Same("embed_out")),
    ],
    layer: &[
        ("norm1", Hf::Same("input_layernorm")),
        ("qkv", Hf::HeadsInterleaved("attention.query_key_value")),
        ("o", Hf::Same("attention.dense")),
        ("norm2", Hf::Same("post_attention_layernorm")),
        ("mlp_in", Hf::Same("mlp.dense_h_to_4h")),
        ("mlp_out", Hf::Same("mlp.dense_4h_to_h")),
    ],
    ignored: &[".attention.bias", ".attention.masked_bias"],
    // transformers 5 names NeoX's output layer `lm_head` in memory (so gradient dumps use that name) and
    // `embed_out` on disk.
    aliases: &[("embed_out.", "lm_head.")],
};

/// GPT-J: `transformer.h.{i}`, split q/k/v projections, one norm per layer (`ln_1`), a biased `lm_head`.
pub static GPTJ: Naming = Naming {
    layer_prefix: "transformer.h.{i}",
    global: &[
        ("embed", Hf::Same("transformer.wte")),
        ("norm_f", Hf::Same("transformer.ln_f")),
        ("lm_head", Hf::Same("lm_head")),
    ],
    layer: &[
        ("norm1", Hf::Same("ln_1")),
        ("qkv", Hf::Rows(&["attn.q_proj", "attn.k_proj", "attn.v_proj"])),
        ("o", Hf::Same("attn.out_proj")),
        ("mlp_in", Hf::Same("mlp.fc_in")),
        ("mlp_out", Hf::Same("mlp.fc_out")),
    ],
    ignored: &[".attn.bias", ".attn.masked_bias"],
    aliases: &[],
};

/// One HF tensor of an engine tensor: its name and its HF shape.
pub type HfTensor = (String, Vec<usize>);

/// One engine tensor and the HF tensors that make it.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The engine's name ([`Params::named`]).
    pub engine: String,
    /// The HF tensors, in the order the engine stacks them.
    pub hf: Vec<HfTensor>,
    pub layout: Hf,
}

/// Splits an engine name into (layer, module, part): `layers.3.w_qkv` → `(Some(3), "qkv", "weight")`,
/// `norm_f.bias` → `(None, "norm_f", "bias")`, `wte` → `(None, "embed", "weight")`.
fn split_engine_name(name: &str) -> Option<(Option<usize>, &str, &'static str)> {
    let (layer, rest) = match name.strip_prefix("layers.") {
        Some(r) => {
            let (i, rest) = r.split_once('.')?;
            (Some(i.parse().ok()?), rest)
        }
        None => (None, name),
    };
    let (module, part) = match rest {
        "wte" => ("embed", "weight"),
        "wpe" => ("positions", "weight"),
        "lm_head" => ("lm_head", "weight"),
        "b_head" => ("lm_head", "bias"),
        _ => {
            if let Some(m) = rest.strip_suffix(".weight") {
                (m, "weight")
            } else if let Some(m) = rest.strip_suffix(".bias") {
                (m, "bias")
            } else if let Some(m) = rest.strip_prefix("w_") {
                (engine_module(m), "weight")
            } else {
                (engine_module(rest.strip_prefix("b_")?), "bias")
            }
        }
    };
    Some((layer, module, part))
}

/// The engine's short names for its projections: `w_in` is the MLP's input projection, `w_out` its output.
fn engine_module(short: &str) -> &str {
    match short {
        "in" => "mlp_in",
        "out" => "mlp_out",
        other => other,
    }
}

/// Row counts of the stacked parts of an `Hf::Rows` module: q/k/v heads, or equal parts (gate/up).
fn row_split(module: &str, cfg: &DecoderConfig, rows: usize, parts: usize) -> Vec<usize> {
    if module == "qkv" && parts == 3 {
        let (q, kv) = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim);
        vec![q, kv, kv]
    } else {
        vec![rows / parts; parts]
    }
}

/// Why a plan cannot be made: the row has no HF module for an engine tensor (a programming error in the
/// table, reported as such).
#[derive(Debug)]
pub struct NoModule(pub String);

/// The table for `cfg` under `naming`, in [`Params::named`] order: every engine tensor the config creates,
/// with its HF names and shapes.
pub fn plan(naming: &Naming, cfg: &DecoderConfig) -> Result<Vec<Entry>, NoModule> {
    let zeros = Params::zeros(cfg);
    let mut out = Vec::new();
    for (engine, t) in zeros.named() {
        let (layer, module, part) = split_engine_name(&engine).ok_or_else(|| NoModule(engine.clone()))?;
        let (table, prefix) = match layer {
            Some(i) => (naming.layer, format!("{}.", naming.layer_prefix.replace("{i}", &i.to_string()))),
            None => (naming.global, String::new()),
        };
        let layout =
            table.iter().find(|(m, _)| *m == module).map(|(_, hf)| *hf).ok_or_else(|| NoModule(engine.clone()))?;
        let name = |m: &str| format!("{prefix}{m}.{part}");
        let hf = match layout {
            Hf::Same(m) | Hf::HeadsInterleaved(m) => vec![(name(m), t.shape.clone())],
            Hf::Conv1D(m) => vec![(name(m), t.shape.iter().rev().copied().collect())],
            Hf::Rows(ms) => {
                let cols: usize = t.shape[1..].iter().product();
                row_split(module, cfg, t.shape[0], ms.len())
                    .into_iter()
                    .zip(ms.iter())
                    .map(|(rows, m)| (name(m), if t.shape.len() == 2 { vec![rows, cols] } else { vec![rows] }))
                    .collect()
            }
        };
        out.push(Entry { engine, hf, layout });
    }
    Ok(out)
}

/// Whether a checkpoint tensor that the plan does not use may be skipped: a buffer, or the duplicate of a
/// tied LM head.
pub fn ignored(naming: &Naming, cfg: &DecoderConfig, name: &str) -> bool {
    if ALWAYS_IGNORED.iter().chain(naming.ignored).any(|s| name.ends_with(s)) {
        return true;
    }
    if !cfg.tied_embeddings {
        return false;
    }
    let head = naming.global.iter().find(|(m, _)| *m == "lm_head").map(|(_, hf)| *hf);
    let head_names = match head {
        Some(Hf::Same(m)) => vec![format!("{m}.weight")],
        _ => Vec::new(),
    };
    name == "lm_head.weight" || head_names.iter().flat_map(|n| aliases(naming, n)).any(|n| n == name)
}

/// The names a tensor may be stored under, preferred (saved) name first.
pub fn aliases(naming: &Naming, name: &str) -> Vec<String> {
    let mut out = vec![name.to_string()];
    for (saved, other) in naming.aliases {
        if let Some(rest) = name.strip_prefix(saved) {
            out.push(format!("{other}{rest}"));
        }
    }
    out
}

/// The engine modules of a layer that are linear layers LoRA can adapt, and the fused weight each lives in.
const LINEAR_SITES: [(&str, Site); 4] =
    [("qkv", Site::Qkv), ("o", Site::AttnOut), ("mlp_in", Site::MlpIn), ("mlp_out", Site::MlpOut)];

/// One HF linear module of one layer: where its rows sit in the engine's fused weight.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearModule {
    pub layer: usize,
    /// The module's path inside the layer (`self_attn.q_proj`, `attn.c_attn`).
    pub module: &'static str,
    /// The full module path in the HF model (`model.layers.0.self_attn.q_proj`): what PEFT matches
    /// `target_modules` against and prefixes its tensor names with.
    pub key: String,
    pub site: Site,
    /// Rows of the site's fused weight this module owns.
    pub rows: Range<usize>,
    /// How the module's weight is stored (GPT-2's `Conv1D`, NeoX's interleaved heads).
    pub layout: Hf,
}

/// The full path of layer `layer` (`model.layers.3`).
pub fn layer_path(naming: &Naming, layer: usize) -> String {
    naming.layer_prefix.replace("{i}", &layer.to_string())
}

/// Every block linear module of a model under `naming`, layer by layer in the row's order (q, k, v, o,
/// gate, up, down): what PEFT calls the linear layers, less the LM head.
pub fn linear_modules(naming: &Naming, cfg: &DecoderConfig) -> Vec<LinearModule> {
    let mut out = Vec::new();
    for layer in 0..cfg.n_layers {
        let prefix = layer_path(naming, layer);
        for (engine_module, hf) in naming.layer {
            let Some(&(_, site)) = LINEAR_SITES.iter().find(|(m, _)| m == engine_module) else { continue };
            let (_, rows) = site.dims(cfg);
            let parts: Vec<(&'static str, usize)> = match *hf {
                Hf::Rows(ms) => ms.iter().copied().zip(row_split(engine_module, cfg, rows, ms.len())).collect(),
                Hf::Same(m) | Hf::Conv1D(m) | Hf::HeadsInterleaved(m) => vec![(m, rows)],
            };
            let mut start = 0;
            for (module, n) in parts {
                out.push(LinearModule {
                    layer,
                    module,
                    key: format!("{prefix}.{module}"),
                    site,
                    rows: start..start + n,
                    layout: *hf,
                });
                start += n;
            }
        }
    }
    out
}

/// The paths of every module of the HF model that holds tensors (`model.norm`, `lm_head`,
/// `model.layers.0.self_attn.q_proj`) and of the modules that contain them (`model.layers.0.self_attn`,
/// `model.layers.0`, `model`): the names PEFT's `target_modules` may match.
pub fn module_paths(naming: &Naming, cfg: &DecoderConfig) -> Result<Vec<String>, NoModule> {
    let mut out: Vec<String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for entry in plan(naming, cfg)? {
        for (name, _) in &entry.hf {
            let module = name.rsplit_once('.').map_or(name.as_str(), |(m, _)| m);
            let mut path = module;
            loop {
                if seen.insert(path.to_string()) {
                    out.push(path.to_string());
                }
                match path.rsplit_once('.') {
                    Some((parent, _)) => path = parent,
                    None => break,
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_names_split_into_module_and_part() {
        assert_eq!(split_engine_name("wte"), Some((None, "embed", "weight")));
        assert_eq!(split_engine_name("layers.12.w_qkv"), Some((Some(12), "qkv", "weight")));
        assert_eq!(split_engine_name("layers.0.b_in"), Some((Some(0), "mlp_in", "bias")));
        assert_eq!(split_engine_name("layers.1.norm2.bias"), Some((Some(1), "norm2", "bias")));
        assert_eq!(split_engine_name("norm_f.weight"), Some((None, "norm_f", "weight")));
        assert_eq!(split_engine_name("b_head"), Some((None, "lm_head", "bias")));
        assert_eq!(split_engine_name("layers.0.q_norm.weight"), Some((Some(0), "q_norm", "weight")));
        assert_eq!(split_engine_name("layers.x.w_o"), None);
    }

    #[test]
    fn aliases_replace_prefixes() {
        assert_eq!(aliases(&GPT2, "transformer.wte.weight"), vec!["transformer.wte.weight", "wte.weight"]);
        assert_eq!(aliases(&GPT_NEOX, "embed_out.weight"), vec!["embed_out.weight", "lm_head.weight"]);
        assert_eq!(aliases(&LLAMA, "lm_head.weight"), vec!["lm_head.weight"]);
    }
}
