//! Gemma 3 (`gemma3_text`): the Llama layout with Gemma's own block. Unit-offset RMSNorm (`(1 + w)`),
//! a tanh-GELU gated MLP, per-head q/k norms, norms after the attention and the MLP, embeddings scaled by
//! `sqrt(hidden)`, and sliding-window layers interleaved with full-attention layers that rotate with
//! their own base.

use serde_json::{Map, Value};

use super::{rope, Fields};
use crate::error::Result;
use engine::{DecoderConfig, Dims, GlobalLayers, MlpKind, NormKind, PositionKind, RopeConfig};

/// `Gemma3TextConfig`'s defaults.
const DEFAULT_HEAD_DIM: usize = 256;
const DEFAULT_WINDOW: usize = 4096;
const DEFAULT_PATTERN: usize = 6;
const DEFAULT_GLOBAL_THETA: f64 = 1_000_000.0;
const DEFAULT_LOCAL_THETA: f64 = 10_000.0;

pub(super) fn gemma3(f: &Fields) -> Result<DecoderConfig> {
    let d = f.req_usize("hidden_size")?;
    let n_heads = f.req_usize("num_attention_heads")?;
    let head_dim = f.opt_usize("head_dim")?.unwrap_or(DEFAULT_HEAD_DIM);
    let n_layers = f.req_usize("num_hidden_layers")?;
    let act = f.opt_str("hidden_activation")?.or(f.opt_str("hidden_act")?).unwrap_or("gelu_pytorch_tanh");
    if !matches!(act, "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast") {
        return Err(f.err("hidden_activation", format!("`{act}` is not supported; Gemma 3 needs gelu_pytorch_tanh")));
    }
    for field in ["final_logit_softcapping", "attn_logit_softcapping"] {
        if f.get(field).is_some() {
            return Err(f.err(field, "logit soft-capping is not supported by this trainer (set it to null)"));
        }
    }
    if f.bool_or("use_bidirectional_attention", false)? {
        return Err(f.err("use_bidirectional_attention", "bidirectional attention is not supported (set it false)"));
    }
    // The engine scales scores by 1/sqrt(head_dim); Gemma by query_pre_attn_scalar^-1/2.
    let scalar = f.opt_usize("query_pre_attn_scalar")?.unwrap_or(DEFAULT_HEAD_DIM);
    if scalar != head_dim {
        return Err(f.err(
            "query_pre_attn_scalar",
            format!("{scalar} differs from head_dim {head_dim}: an attention scale other than 1/sqrt(head_dim) is not supported"),
        ));
    }
    let bias = f.bool_or("attention_bias", false)?;
    let dims = Dims {
        vocab_size: f.req_usize("vocab_size")?,
        hidden: d,
        n_layers,
        n_heads,
        n_kv_heads: f.opt_usize("num_key_value_heads")?.unwrap_or(n_heads),
        head_dim,
        ffn_hidden: f.req_usize("intermediate_size")?,
        max_positions: f.req_usize("max_position_embeddings")?,
    };
    let (local_rope, global_rope) = ropes(f, head_dim)?;
    let global = GlobalLayers { layers: full_attention_layers(f, n_layers)?, rope: global_rope };
    Ok(DecoderConfig {
        norm: NormKind::RmsNormUnitOffset { eps: f.f32_or("rms_norm_eps", 1e-6)? },
        mlp: MlpKind::GeGluTanh,
        positions: PositionKind::Rotary(local_rope),
        qkv_bias: bias,
        attn_out_bias: bias,
        tied_embeddings: f.bool_or("tie_word_embeddings", true)?,
        sliding_window: Some(f.opt_usize("sliding_window")?.unwrap_or(DEFAULT_WINDOW)),
        qk_norm: true,
        scaled_embeddings: true,
        post_norms: true,
        global_layers: Some(global),
        ..DecoderConfig::llama(dims)
    })
}

/// The full-attention layers: `layer_types` (transformers 5), or every `sliding_window_pattern`-th layer.
fn full_attention_layers(f: &Fields, n_layers: usize) -> Result<Vec<usize>> {
    const FIELD: &str = "layer_types";
    match f.get(FIELD) {
        Some(Value::Array(types)) => {
            if types.len() != n_layers {
                return Err(f.err(FIELD, format!("{} layer types for {n_layers} layers", types.len())));
            }
            let mut out = Vec::new();
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    Some("full_attention") => out.push(i),
                    Some("sliding_attention") => {}
                    _ => return Err(f.err(FIELD, format!("expected full_attention or sliding_attention, found {t}"))),
                }
            }
            Ok(out)
        }
        None => {
            let every = match f.opt_usize("sliding_window_pattern")? {
                Some(p) => p,
                None => f.opt_usize("_sliding_window_pattern")?.unwrap_or(DEFAULT_PATTERN),
            };
            if every == 0 {
                return Err(f.err("sliding_window_pattern", "must be positive"));
            }
            if n_layers / every > 1 << 20 {
                return Err(f.err("num_hidden_layers", format!("{n_layers} layers is more than this trainer supports")));
            }
            Ok((every - 1..n_layers).step_by(every).collect())
        }
        Some(v) => Err(f.err(FIELD, format!("expected a list of layer types, found {v}"))),
    }
}

/// `(sliding layers' rotary, full-attention layers' rotary)`: `rope_parameters.{sliding,full}_attention`
/// (transformers 5), or `rope_local_base_freq` and `rope_theta` / `rope_scaling` (4.x).
fn ropes(f: &Fields, head_dim: usize) -> Result<(RopeConfig, RopeConfig)> {
    let one = |section: Map<String, Value>| -> Result<RopeConfig> {
        let fields = Fields { path: f.path, obj: &section, prefix: "" };
        rope(&fields, head_dim, 1.0)
    };
    let wrap = |name: &str, v: Value| Map::from_iter([(name.to_string(), v)]);
    match f.get("rope_parameters") {
        Some(Value::Object(p)) if p.contains_key("full_attention") || p.contains_key("sliding_attention") => {
            let part = |name: &str| match p.get(name) {
                Some(Value::Object(s)) => Ok(Value::Object(s.clone())),
                _ => Err(f.err("rope_parameters", format!("expected an object `{name}`"))),
            };
            Ok((
                one(wrap("rope_parameters", part("sliding_attention")?))?,
                one(wrap("rope_parameters", part("full_attention")?))?,
            ))
        }
        _ => {
            let local = f.opt_f64("rope_local_base_freq")?.unwrap_or(DEFAULT_LOCAL_THETA);
            let global = f.opt_f64("rope_theta")?.unwrap_or(DEFAULT_GLOBAL_THETA);
            let number = |x: f64| serde_json::Number::from_f64(x).map(Value::Number).unwrap_or(Value::Null);
            let mut g = wrap("rope_theta", number(global));
            if let Some(s) = f.get("rope_scaling") {
                g.insert("rope_scaling".into(), s.clone());
            }
            Ok((one(wrap("rope_theta", number(local)))?, one(g)?))
        }
    }
}
