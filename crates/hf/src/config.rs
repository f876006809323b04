//! `config.json` → [`engine::DecoderConfig`]: one table row per `model_type`.
//!
//! Both layouts are read: transformers 4.x (`rope_theta`, `rope_scaling`, `rotary_pct` /
//! `partial_rotary_factor`, `torch_dtype` at the top level) and transformers 5 (`rope_parameters` holding
//! `rope_theta`, `rope_type`, `partial_rotary_factor` and the scaling fields; `dtype`).

use std::path::{Path, PathBuf};

use engine::{DecoderConfig, Dims, MlpKind, NormKind, PositionKind, RopeConfig, RopeScaling, RopeStyle};
use serde_json::{Map, Value};

use crate::error::{read_json, Error, Result};
use crate::naming::{self, Naming};

mod gemma3;

/// Longest context accepted from `config.json`: the rotary (or learned) position table is built for all
/// of it up front, `max_positions * head_dim` floats.
pub const MAX_POSITIONS: usize = 1 << 22;

/// One supported `model_type`: how its `config.json` maps onto the engine's switches and how its
/// checkpoint names its tensors. Adding an architecture is adding a row here (and its switches, if new).
#[derive(Debug)]
pub struct Family {
    pub model_type: &'static str,
    pub naming: &'static Naming,
    /// The field holding the context length (named in errors).
    pub positions_field: &'static str,
    /// PEFT's default LoRA `target_modules` for this model type (its
    /// `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`); empty where PEFT has none.
    pub lora_targets: &'static [&'static str],
    decoder: fn(&Fields) -> Result<DecoderConfig>,
}

/// Every supported family, one row per `model_type`.
pub static FAMILIES: &[Family] = &[
    Family {
        model_type: "gpt2",
        naming: &naming::GPT2,
        positions_field: "n_positions",
        lora_targets: &["c_attn"],
        decoder: gpt2,
    },
    Family {
        model_type: "llama",
        naming: &naming::LLAMA,
        positions_field: MAX_POS,
        lora_targets: QV,
        decoder: |f| llama_like(f, "llama"),
    },
    Family {
        model_type: "mistral",
        naming: &naming::LLAMA,
        positions_field: MAX_POS,
        lora_targets: QV,
        decoder: |f| llama_like(f, "mistral"),
    },
    Family {
        model_type: "qwen2",
        naming: &naming::LLAMA,
        positions_field: MAX_POS,
        lora_targets: QV,
        decoder: |f| llama_like(f, "qwen2"),
    },
    Family {
        model_type: "gpt_neox",
        naming: &naming::GPT_NEOX,
        positions_field: MAX_POS,
        lora_targets: &["query_key_value"],
        decoder: gpt_neox,
    },
    Family { model_type: "qwen3", naming: &naming::LLAMA, positions_field: MAX_POS, lora_targets: QV, decoder: qwen3 },
    Family {
        model_type: "smollm3",
        naming: &naming::LLAMA,
        positions_field: MAX_POS,
        lora_targets: &[],
        decoder: smollm3,
    },
    Family {
        model_type: "gptj",
        naming: &naming::GPTJ,
        positions_field: "n_positions",
        lora_targets: QV,
        decoder: gptj,
    },
    Family {
        model_type: "phi3",
        naming: &naming::PHI3,
        positions_field: MAX_POS,
        lora_targets: &[],
        decoder: |f| llama_like(f, "phi3"),
    },
    Family {
        model_type: "gemma3_text",
        naming: &naming::GEMMA3,
        positions_field: MAX_POS,
        lora_targets: QV,
        decoder: gemma3::gemma3,
    },
];

/// PEFT's default targets for most families: the query and value projections.
const QV: &[&str] = &["q_proj", "v_proj"];

const MAX_POS: &str = "max_position_embeddings";

/// The `model_type` values this crate maps onto the decoder family, in [`FAMILIES`] order.
pub fn supported_model_types() -> impl Iterator<Item = &'static str> {
    FAMILIES.iter().map(|f| f.model_type)
}

/// A parsed `config.json`: the engine's switches plus what the rest of the trainer needs from it.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub decoder: DecoderConfig,
    /// How the checkpoint names its tensors.
    pub naming: &'static Naming,
    pub model_type: String,
    /// The whole file, kept so that saving writes back every field this crate does not interpret.
    pub raw: Value,
    pub bos_token_id: Option<u32>,
    /// `eos_token_id` may be one id or a list (Llama 3 instruct); empty when absent.
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// `dtype` (transformers 5) or `torch_dtype` (4.x) as written, e.g. `"bfloat16"`.
    pub dtype: Option<String>,
    /// The file this was read from (for messages).
    pub path: PathBuf,
}

/// Reads `path` (a `config.json`) and maps it onto the decoder family.
///
/// Special-token ids missing from `config.json` are taken from `generation_config.json` beside it.
pub fn parse_config(path: &Path) -> Result<ModelConfig> {
    let raw = read_json(path)?;
    let mut cfg = config_from_json(raw, path)?;
    if cfg.eos_token_ids.is_empty() || cfg.bos_token_id.is_none() || cfg.pad_token_id.is_none() {
        let gen = path.with_file_name("generation_config.json");
        if gen.is_file() {
            if let Ok(Value::Object(g)) = read_json(&gen) {
                let f = Fields { path: &gen, obj: &g, prefix: "" };
                if cfg.eos_token_ids.is_empty() {
                    cfg.eos_token_ids = f.ids("eos_token_id")?;
                }
                if cfg.bos_token_id.is_none() {
                    cfg.bos_token_id = f.ids("bos_token_id")?.first().copied();
                }
                if cfg.pad_token_id.is_none() {
                    cfg.pad_token_id = f.ids("pad_token_id")?.first().copied();
                }
            }
        }
    }
    Ok(cfg)
}

/// Maps an already-parsed `config.json` value; `path` is only used in messages.
pub fn config_from_json(raw: Value, path: &Path) -> Result<ModelConfig> {
    let Value::Object(obj) = &raw else {
        return Err(Error::field(path, "<root>", "config.json must hold a JSON object"));
    };
    let f = Fields { path, obj, prefix: "" };
    let model_type = f.req_str("model_type")?.to_string();
    let Some(family) = FAMILIES.iter().find(|fam| fam.model_type == model_type) else {
        return Err(Error::UnsupportedModelType { path: path.to_path_buf(), model_type });
    };
    let decoder = (family.decoder)(&f)?;
    decoder.validate().map_err(|m| Error::field(path, "<model shape>", m))?;
    if decoder.max_positions > MAX_POSITIONS {
        return Err(Error::field(
            path,
            family.positions_field,
            format!(
                "{} positions is more than this trainer supports ({MAX_POSITIONS}); the position tables would not \
                 fit in memory. Lower it in config.json to the context length you train with",
                decoder.max_positions
            ),
        ));
    }
    let dtype = f.opt_str("dtype")?.or(f.opt_str("torch_dtype")?).map(str::to_string);
    Ok(ModelConfig {
        decoder,
        naming: family.naming,
        model_type,
        bos_token_id: f.ids("bos_token_id")?.first().copied(),
        eos_token_ids: f.ids("eos_token_id")?,
        pad_token_id: f.ids("pad_token_id")?.first().copied(),
        dtype,
        path: path.to_path_buf(),
        raw,
    })
}

fn gpt2(f: &Fields) -> Result<DecoderConfig> {
    let d = f.req_usize("n_embd")?;
    let n_heads = f.req_usize("n_head")?;
    if f.bool_or("scale_attn_by_inverse_layer_idx", false)? {
        return Err(f.err("scale_attn_by_inverse_layer_idx", "true is not supported (set it false)"));
    }
    let act = f.opt_str("activation_function")?.unwrap_or("gelu_new");
    let ffn_hidden = n_inner(f, d)?;
    let dims = Dims {
        vocab_size: f.req_usize("vocab_size")?,
        hidden: d,
        n_layers: f.req_usize("n_layer")?,
        n_heads,
        n_kv_heads: n_heads,
        head_dim: f.divide(d, n_heads, "n_head")?,
        ffn_hidden,
        max_positions: f.req_usize("n_positions")?,
    };
    Ok(DecoderConfig {
        norm: NormKind::LayerNorm { eps: f.f32_or("layer_norm_epsilon", 1e-5)? },
        mlp: gelu_kind(f, "activation_function", act)?,
        tied_embeddings: f.bool_or("tie_word_embeddings", true)?,
        ..DecoderConfig::gpt2(dims)
    })
}

fn llama_like(f: &Fields, model_type: &str) -> Result<DecoderConfig> {
    let d = f.req_usize("hidden_size")?;
    let n_heads = f.req_usize("num_attention_heads")?;
    let head_dim = match f.opt_usize("head_dim")? {
        Some(h) => h,
        None => f.divide(d, n_heads, "num_attention_heads")?,
    };
    let act = f.opt_str("hidden_act")?.unwrap_or("silu");
    if act != "silu" {
        return Err(f.err("hidden_act", format!("`{act}` is not supported; this family needs `silu` (SwiGLU)")));
    }
    let (qkv_bias, attn_out_bias, mlp_bias) = if model_type == "qwen2" {
        (true, false, false)
    } else {
        let attn = f.bool_or("attention_bias", false)?;
        (attn, attn, f.bool_or("mlp_bias", false)?)
    };
    // Qwen2/3 and SmolLM3 write a `sliding_window` that only `use_sliding_window` turns on.
    let gated = matches!(model_type, "qwen2" | "qwen3" | "smollm3");
    let sliding_window = if gated && !f.bool_or("use_sliding_window", false)? { None } else { sliding_window(f)? };
    let dims = Dims {
        vocab_size: f.req_usize("vocab_size")?,
        hidden: d,
        n_layers: f.req_usize("num_hidden_layers")?,
        n_heads,
        n_kv_heads: f.opt_usize("num_key_value_heads")?.unwrap_or(n_heads),
        head_dim,
        ffn_hidden: f.req_usize("intermediate_size")?,
        max_positions: f.req_usize("max_position_embeddings")?,
    };
    Ok(DecoderConfig {
        norm: NormKind::RmsNorm { eps: f.f32_or("rms_norm_eps", 1e-6)? },
        positions: PositionKind::Rotary(rope(f, head_dim, 1.0)?),
        qkv_bias,
        attn_out_bias,
        mlp_bias,
        tied_embeddings: f.bool_or("tie_word_embeddings", false)?,
        sliding_window,
        ..DecoderConfig::llama(dims)
    })
}

/// GPT-2 and GPT-J's MLP width: `n_inner`, or `4 * n_embd` when null.
fn n_inner(f: &Fields, d: usize) -> Result<usize> {
    match f.opt_usize("n_inner")? {
        Some(n) => Ok(n),
        None => d
            .checked_mul(4)
            .ok_or_else(|| f.err("n_embd", format!("{d} is too large (4 * n_embd, the default n_inner, overflows)"))),
    }
}

/// GPT-J: GPT-NeoX's parallel block with one norm per layer (`ln_1`), interleaved rotary over the first
/// `rotary_dim` dimensions of each head (base 10000, fixed in `GPTJAttention`), no attention biases, MLP
/// biases and a biased LM head.
fn gptj(f: &Fields) -> Result<DecoderConfig> {
    let d = f.req_usize("n_embd")?;
    let n_heads = f.req_usize("n_head")?;
    let head_dim = f.divide(d, n_heads, "n_head")?;
    let act = f.opt_str("activation_function")?.unwrap_or("gelu_new");
    let dims = Dims {
        vocab_size: f.req_usize("vocab_size")?,
        hidden: d,
        n_layers: f.req_usize("n_layer")?,
        n_heads,
        n_kv_heads: n_heads,
        head_dim,
        ffn_hidden: n_inner(f, d)?,
        max_positions: f.req_usize("n_positions")?,
    };
    // `rotary_dim: null` rotates the whole head.
    let rotary_dim = f.opt_usize("rotary_dim")?.unwrap_or(head_dim);
    let rope = RopeConfig { style: RopeStyle::Interleaved, ..RopeConfig::half(10000.0, rotary_dim) };
    Ok(DecoderConfig {
        norm: NormKind::LayerNorm { eps: f.f32_or("layer_norm_epsilon", 1e-5)? },
        mlp: gelu_kind(f, "activation_function", act)?,
        positions: PositionKind::Rotary(rope),
        qkv_bias: false,
        attn_out_bias: false,
        shared_norm: true,
        head_bias: true,
        tied_embeddings: f.bool_or("tie_word_embeddings", false)?,
        ..DecoderConfig::neox(dims)
    })
}

/// Qwen3: the Llama block with a per-head RMSNorm on queries and keys (`q_norm`, `k_norm`).
fn qwen3(f: &Fields) -> Result<DecoderConfig> {
    Ok(DecoderConfig { qk_norm: true, ..llama_like(f, "qwen3")? })
}

/// SmolLM3: the Llama block, without rotary embeddings in the layers that `no_rope_layers` marks 0.
fn smollm3(f: &Fields) -> Result<DecoderConfig> {
    let base = llama_like(f, "smollm3")?;
    Ok(DecoderConfig { layers_without_rope: layers_without_rope(f, base.n_layers)?, ..base })
}

/// The layers without rotary: `no_rope_layers` (one 0/1 flag per layer, 1 = rotary), or when absent
/// every `no_rope_layer_interval`-th layer (SmolLM3Config's default, 4).
fn layers_without_rope(f: &Fields, n_layers: usize) -> Result<Vec<usize>> {
    const FIELD: &str = "no_rope_layers";
    match f.get(FIELD) {
        Some(Value::Array(flags)) => {
            if flags.len() != n_layers {
                return Err(f.err(FIELD, format!("{} flags for {n_layers} layers", flags.len())));
            }
            let mut out = Vec::new();
            for (i, v) in flags.iter().enumerate() {
                match v.as_u64() {
                    Some(0) => out.push(i),
                    Some(1) => {}
                    _ => return Err(f.err(FIELD, format!("expected 0 or 1 per layer, found {v}"))),
                }
            }
            Ok(out)
        }
        None => {
            let every = f.opt_usize("no_rope_layer_interval")?.unwrap_or(4);
            if every == 0 {
                return Err(f.err("no_rope_layer_interval", "must be positive"));
            }
            // The list is built before anything checks the layer count against memory: bound it.
            if n_layers / every > 1 << 20 {
                return Err(f.err("num_hidden_layers", format!("{n_layers} layers is more than this trainer supports")));
            }
            Ok((every - 1..n_layers).step_by(every).collect())
        }
        Some(v) => Err(f.err(FIELD, format!("expected a list of 0/1 flags, found {v}"))),
    }
}

/// One window for every layer, or none. transformers 5 writes `layer_types`; a mix of sliding and full
/// layers (Qwen2's `max_window_layers`) cannot be expressed by the engine and is refused.
fn sliding_window(f: &Fields) -> Result<Option<usize>> {
    let Some(window) = f.opt_usize("sliding_window")? else { return Ok(None) };
    let n_layers = f.req_usize("num_hidden_layers")?;
    // Whether every layer, and whether no layer, uses the window (not a list per layer: the count is the
    // file's, and is not checked against memory before this).
    let (all, none) = match f.obj.get("layer_types") {
        Some(Value::Array(types)) => {
            let sliding = |t: &Value| t.as_str() == Some("sliding_attention");
            (types.iter().all(sliding), !types.iter().any(sliding))
        }
        _ => match f.opt_usize("max_window_layers")? {
            // Qwen2: layers from `max_window_layers` on use the window.
            Some(m) if f.obj.contains_key("use_sliding_window") => (m == 0 || n_layers == 0, m >= n_layers),
            _ => (true, n_layers == 0),
        },
    };
    if all {
        Ok(Some(window))
    } else if none {
        Ok(None)
    } else {
        Err(f.err(
            "layer_types",
            "sliding-window attention on some layers only is not supported (the engine applies one window to all layers)",
        ))
    }
}

fn gpt_neox(f: &Fields) -> Result<DecoderConfig> {
    let d = f.req_usize("hidden_size")?;
    let n_heads = f.req_usize("num_attention_heads")?;
    let head_dim = f.divide(d, n_heads, "num_attention_heads")?;
    let act = f.opt_str("hidden_act")?.unwrap_or("gelu");
    let bias = f.bool_or("attention_bias", true)?;
    let dims = Dims {
        vocab_size: f.req_usize("vocab_size")?,
        hidden: d,
        n_layers: f.req_usize("num_hidden_layers")?,
        n_heads,
        n_kv_heads: n_heads,
        head_dim,
        ffn_hidden: f.req_usize("intermediate_size")?,
        max_positions: f.req_usize("max_position_embeddings")?,
    };
    Ok(DecoderConfig {
        norm: NormKind::LayerNorm { eps: f.f32_or("layer_norm_eps", 1e-5)? },
        mlp: gelu_kind(f, "hidden_act", act)?,
        // GPTNeoXConfig's default rotary_pct is 0.25.
        positions: PositionKind::Rotary(rope(f, head_dim, 0.25)?),
        qkv_bias: bias,
        attn_out_bias: bias,
        parallel_residual: f.bool_or("use_parallel_residual", true)?,
        tied_embeddings: f.bool_or("tie_word_embeddings", false)?,
        ..DecoderConfig::neox(dims)
    })
}

fn gelu_kind(f: &Fields, field: &str, act: &str) -> Result<MlpKind> {
    match act {
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(MlpKind::GeluTanh),
        "gelu" => Ok(MlpKind::GeluErf),
        _ => Err(f.err(field, format!("activation `{act}` is not supported (gelu, gelu_new, gelu_pytorch_tanh)"))),
    }
}

/// Rotary settings from `rope_parameters` (transformers 5) or the top-level `rope_theta` / `rope_scaling`
/// / `rotary_pct` / `partial_rotary_factor` (4.x).
fn rope(f: &Fields, head_dim: usize, default_partial: f64) -> Result<RopeConfig> {
    let section = |name: &'static str| match f.obj.get(name) {
        Some(Value::Object(p)) => Ok(Some(Fields { path: f.path, obj: p, prefix: name })),
        None | Some(Value::Null) => Ok(None),
        Some(v) => Err(f.err(name, format!("expected an object or null, found {v}"))),
    };
    let params = section("rope_parameters")?;
    let legacy = section("rope_scaling")?;
    let in_params = |name: &str| match &params {
        Some(p) => p.opt_f64(name),
        None => Ok(None),
    };

    let theta = match in_params("rope_theta")? {
        Some(t) => t,
        None => f.opt_f64("rope_theta")?.or(f.opt_f64("rotary_emb_base")?).unwrap_or(10000.0),
    };
    let partial = match in_params("partial_rotary_factor")? {
        Some(p) => p,
        None => f.opt_f64("partial_rotary_factor")?.or(f.opt_f64("rotary_pct")?).unwrap_or(default_partial),
    };
    if !(partial > 0.0 && partial <= 1.0) {
        return Err(f.err("partial_rotary_factor", format!("{partial} must be in (0, 1]")));
    }
    // transformers: int(head_dim * partial_rotary_factor)
    let rotary_dim = (head_dim as f64 * partial) as usize;

    // The scaling fields: transformers 5 keeps them in rope_parameters, 4.x in rope_scaling.
    let s = match (params, legacy) {
        (Some(p), _) if p.obj.contains_key("rope_type") || p.obj.contains_key("type") => p,
        (_, Some(l)) => l,
        (Some(p), None) => p,
        (None, None) => {
            return Ok(RopeConfig {
                theta: theta as f32,
                rotary_dim,
                style: RopeStyle::Half,
                scaling: RopeScaling::None,
            })
        }
    };
    let rope_type = s.opt_str("rope_type")?.or(s.opt_str("type")?).unwrap_or("default");
    let req = |name: &str| -> Result<f64> {
        s.opt_f64(name)?.ok_or_else(|| s.err(name, format!("missing; required by rope type `{rope_type}`")))
    };
    let scaling = match rope_type {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: req("factor")? as f32 },
        "llama3" => RopeScaling::Llama3 {
            factor: req("factor")? as f32,
            low_freq_factor: req("low_freq_factor")? as f32,
            high_freq_factor: req("high_freq_factor")? as f32,
            original_max_positions: s
                .opt_usize("original_max_position_embeddings")?
                .ok_or_else(|| s.err("original_max_position_embeddings", "missing; required by rope type `llama3`"))?,
        },
        other => return Err(Error::UnsupportedRope { path: f.path.to_path_buf(), rope_type: other.to_string() }),
    };
    Ok(RopeConfig { theta: theta as f32, rotary_dim, style: RopeStyle::Half, scaling })
}

/// Typed access to one JSON object, with errors that name the file and the field.
#[derive(Clone, Copy)]
struct Fields<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
    /// `""` for the top level, else the enclosing object's field name (`rope_parameters`).
    prefix: &'static str,
}

impl Fields<'_> {
    fn err(&self, field: &str, msg: impl Into<String>) -> Error {
        if self.prefix.is_empty() {
            Error::field(self.path, field, msg)
        } else {
            Error::field(self.path, &format!("{}.{field}", self.prefix), msg)
        }
    }

    /// `None` for an absent or null field.
    fn get(&self, name: &str) -> Option<&Value> {
        self.obj.get(name).filter(|v| !v.is_null())
    }

    fn req_str(&self, name: &str) -> Result<&str> {
        self.opt_str(name)?.ok_or_else(|| self.err(name, "missing; expected a string"))
    }

    fn opt_str(&self, name: &str) -> Result<Option<&str>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.err(name, format!("expected a string, found {v}"))),
        }
    }

    fn req_usize(&self, name: &str) -> Result<usize> {
        self.opt_usize(name)?.ok_or_else(|| self.err(name, "missing; expected a non-negative integer"))
    }

    fn opt_usize(&self, name: &str) -> Result<Option<usize>> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| self.err(name, format!("expected a non-negative integer, found {v}"))),
        }
    }

    fn opt_f64(&self, name: &str) -> Result<Option<f64>> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| self.err(name, format!("expected a finite number, found {v}"))),
        }
    }

    fn f32_or(&self, name: &str, default: f32) -> Result<f32> {
        Ok(self.opt_f64(name)?.map(|x| x as f32).unwrap_or(default))
    }

    fn bool_or(&self, name: &str, default: bool) -> Result<bool> {
        match self.get(name) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.err(name, format!("expected true or false, found {v}"))),
        }
    }

    /// A token id field: absent/null, one id, or a list of ids.
    fn ids(&self, name: &str) -> Result<Vec<u32>> {
        let one = |v: &Value| {
            v.as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| self.err(name, format!("expected a token id (or a list of ids), found {v}")))
        };
        match self.get(name) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => a.iter().map(one).collect(),
            Some(v) => Ok(vec![one(v)?]),
        }
    }

    fn divide(&self, d: usize, heads: usize, heads_field: &str) -> Result<usize> {
        if d.checked_rem(heads) != Some(0) {
            return Err(self.err(heads_field, format!("hidden size {d} is not divisible by {heads} heads")));
        }
        Ok(d / heads)
    }
}

#[cfg(test)]
mod tests;
