//! The families added as naming-table rows (`tests/fixtures/more`): their configs in both layouts map to
//! the expected switches, their fused tensors land in the engine's rows unchanged, and saving writes the
//! checkpoint's own names back.

mod common;

use common::{more, TempDir};
use dpo_hf::{config_from_json, load_model, save_model, SafeTensors, FAMILIES};
use engine::{MlpKind, NormKind, PositionKind, RopeScaling, RopeStyle};
use serde_json::Value;

fn config_json(dir: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(more(&format!("models/{dir}/config.json"))).unwrap()).unwrap()
}

/// The transformers 4.x layout of a transformers 5 config: `rope_parameters` spread over the top level
/// (`rope_theta`, `partial_rotary_factor`, `rope_scaling` for the rest), `torch_dtype` for `dtype`.
fn legacy(v5: &Value) -> Value {
    let mut v = v5.clone();
    let o = v.as_object_mut().unwrap();
    if let Some(Value::Object(mut params)) = o.remove("rope_parameters") {
        for k in ["rope_theta", "partial_rotary_factor"] {
            if let Some(x) = params.remove(k) {
                o.insert(k.into(), x);
            }
        }
        let default = params.get("rope_type").and_then(Value::as_str) == Some("default");
        o.insert("rope_scaling".into(), if default { Value::Null } else { Value::Object(params) });
    }
    let dtype = o.remove("dtype").unwrap();
    o.insert("torch_dtype".into(), dtype);
    v
}

#[test]
fn every_family_has_one_row() {
    let mut types: Vec<&str> = FAMILIES.iter().map(|f| f.model_type).collect();
    types.sort();
    types.dedup();
    assert_eq!(types.len(), FAMILIES.len(), "a model_type has two rows");
    for t in ["phi3", "qwen3", "smollm3", "gptj", "gemma3_text"] {
        assert!(types.contains(&t), "{t}");
    }
}

#[test]
fn phi3_config_in_both_layouts() {
    let v5 = config_json("phi3-policy");
    let a = config_from_json(v5.clone(), "config.json".as_ref()).unwrap();
    let b = config_from_json(legacy(&v5), "config.json".as_ref()).unwrap();
    assert_eq!(a.decoder, b.decoder);
    assert_eq!(b.dtype.as_deref(), Some("float32"));
    let c = a.decoder;
    assert_eq!((c.hidden, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_hidden), (64, 4, 2, 16, 128));
    assert_eq!((c.mlp, c.norm), (MlpKind::SwiGlu, NormKind::RmsNorm { eps: 1e-5 }));
    assert!(!c.qkv_bias && !c.attn_out_bias && !c.mlp_bias && !c.tied_embeddings && c.sliding_window.is_none());
    assert_eq!(
        c.positions,
        PositionKind::Rotary(engine::RopeConfig {
            theta: 10000.0,
            rotary_dim: 16,
            style: RopeStyle::Half,
            scaling: RopeScaling::None
        })
    );
    // Phi-4-mini rotates three quarters of each head; Phi-3's long-context `longrope` is refused by name.
    let mut partial = v5.clone();
    partial["rope_parameters"]["partial_rotary_factor"] = 0.75.into();
    let PositionKind::Rotary(r) = config_from_json(partial, "config.json".as_ref()).unwrap().decoder.positions else {
        panic!()
    };
    assert_eq!(r.rotary_dim, 12);
    let mut long = legacy(&v5);
    long["rope_scaling"] = serde_json::json!({"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]});
    let e = config_from_json(long, "config.json".as_ref()).unwrap_err();
    assert!(e.to_string().contains("`longrope`"), "{e}");
}

/// Both layouts of `dir`'s config give the same decoder, which is returned.
fn both_layouts(dir: &str) -> engine::DecoderConfig {
    let v5 = config_json(dir);
    let a = config_from_json(v5.clone(), "config.json".as_ref()).unwrap();
    let b = config_from_json(legacy(&v5), "config.json".as_ref()).unwrap();
    assert_eq!(a.decoder, b.decoder, "{dir}");
    a.decoder
}

#[test]
fn qwen3_config_in_both_layouts() {
    let c = both_layouts("qwen3-policy");
    assert!(c.qk_norm && c.tied_embeddings && !c.qkv_bias && c.sliding_window.is_none());
    assert!(c.layers_without_rope.is_empty());
    let PositionKind::Rotary(r) = c.positions else { panic!() };
    assert_eq!((r.theta, r.rotary_dim), (1e6, 16));
    assert!(both_layouts("qwen3-ref").qk_norm);
}

#[test]
fn smollm3_config_in_both_layouts() {
    let c = both_layouts("smollm3-policy");
    assert_eq!(c.layers_without_rope, vec![1, 3]);
    assert!(!c.qk_norm && c.tied_embeddings);
    let PositionKind::Rotary(r) = c.positions else { panic!() };
    assert_eq!(r.theta, 5e6);
    // Without the list, SmolLM3Config derives it from the interval (every 2nd layer here, 4th by default).
    let mut v = config_json("smollm3-policy");
    v.as_object_mut().unwrap().remove("no_rope_layers");
    let derived = config_from_json(v.clone(), "config.json".as_ref()).unwrap().decoder;
    assert_eq!(derived, c);
    v.as_object_mut().unwrap().remove("no_rope_layer_interval");
    let default = config_from_json(v.clone(), "config.json".as_ref()).unwrap().decoder;
    assert_eq!(default.layers_without_rope, vec![3]);
    v["no_rope_layers"] = serde_json::json!([1, 0, 1]);
    let e = config_from_json(v.clone(), "config.json".as_ref()).unwrap_err();
    assert!(e.to_string().contains("`no_rope_layers`: 3 flags for 4 layers"), "{e}");
    v["no_rope_layers"] = serde_json::json!([1, 0, 2, 1]);
    let e = config_from_json(v, "config.json".as_ref()).unwrap_err();
    assert!(e.to_string().contains("expected 0 or 1"), "{e}");
}

#[test]
fn gptj_config_in_both_layouts() {
    let c = both_layouts("gptj-policy");
    assert_eq!((c.hidden, c.n_heads, c.head_dim, c.ffn_hidden, c.max_positions), (64, 4, 16, 256, 256));
    assert!(c.parallel_residual && c.shared_norm && c.head_bias && c.mlp_bias);
    assert!(!c.qkv_bias && !c.attn_out_bias && !c.tied_embeddings);
    assert_eq!((c.mlp, c.norm), (MlpKind::GeluTanh, NormKind::LayerNorm { eps: 1e-5 }));
    assert_eq!(
        c.positions,
        PositionKind::Rotary(engine::RopeConfig {
            theta: 10000.0,
            rotary_dim: 4,
            style: RopeStyle::Interleaved,
            scaling: RopeScaling::None
        })
    );
    let m = load_model(&more("models/gptj-policy")).unwrap();
    assert!(m.params.layers.iter().all(|l| l.norm2.is_none()));
    let st = SafeTensors::open(&more("models/gptj-policy/model.safetensors")).unwrap();
    assert_eq!(m.params.b_head.as_ref().unwrap().data, st.read_f32("lm_head.bias").unwrap().data);
}

#[test]
fn qwen3_head_norms_load_by_name() {
    let dir = more("models/qwen3-policy");
    let m = load_model(&dir).unwrap();
    let st = SafeTensors::open(&dir.join("model.safetensors")).unwrap();
    for (i, l) in m.params.layers.iter().enumerate() {
        let raw = |n: &str| st.read_f32(&format!("model.layers.{i}.self_attn.{n}.weight")).unwrap().data;
        assert_eq!(l.q_norm.as_ref().unwrap().data, raw("q_norm"));
        assert_eq!(l.k_norm.as_ref().unwrap().data, raw("k_norm"));
    }
}

#[test]
fn phi3_fused_projections_are_the_engine_rows() {
    let dir = more("models/phi3-policy");
    let m = load_model(&dir).unwrap();
    let st = SafeTensors::open(&dir.join("model.safetensors")).unwrap();
    for (i, l) in m.params.layers.iter().enumerate() {
        let raw = |n: &str| st.read_f32(&format!("model.layers.{i}.{n}.weight")).unwrap().data;
        assert_eq!(l.w_qkv.data, raw("self_attn.qkv_proj"));
        assert_eq!(l.w_in.data, raw("mlp.gate_up_proj"));
        assert_eq!(l.w_out.data, raw("mlp.down_proj"));
    }
}

/// Save writes the checkpoint's own tensor names and values back.
#[test]
fn save_writes_the_source_names() {
    for arch in ["phi3", "qwen3", "smollm3", "gptj", "gemma3"] {
        let dir = more(&format!("models/{arch}-policy"));
        let m = load_model(&dir).unwrap();
        let tmp = TempDir::new(&format!("families-{arch}"));
        let out = tmp.path().join("out");
        save_model(&out, &m.config, &m.params, Some(&dir)).unwrap();
        let (src, saved) = (
            SafeTensors::open(&dir.join("model.safetensors")).unwrap(),
            SafeTensors::open(&out.join("model.safetensors")).unwrap(),
        );
        let names = |s: &SafeTensors| {
            let mut n: Vec<String> = s.tensors().iter().map(|t| t.name.clone()).collect();
            n.sort();
            n
        };
        let tied_head = |n: &String| m.config.decoder.tied_embeddings && n == "lm_head.weight";
        let want: Vec<String> = names(&src).into_iter().filter(|n| !tied_head(n)).collect();
        assert_eq!(names(&saved), want, "{arch}");
        for n in &want {
            assert_eq!(src.read_f32(n).unwrap(), saved.read_f32(n).unwrap(), "{arch}: {n}");
        }
        assert_eq!(load_model(&out).unwrap().params, m.params, "{arch}");
    }
}

/// The transformers 4.x layout of the gemma3 fixture's config: the window pattern instead of
/// `layer_types`, `rope_theta` (full attention) and `rope_local_base_freq` (sliding) at the top level.
fn gemma3_legacy(v5: &Value) -> Value {
    let mut v = v5.clone();
    let o = v.as_object_mut().unwrap();
    let ropes = o.remove("rope_parameters").unwrap();
    o.insert("rope_theta".into(), ropes["full_attention"]["rope_theta"].clone());
    o.insert("rope_local_base_freq".into(), ropes["sliding_attention"]["rope_theta"].clone());
    o.insert("rope_scaling".into(), Value::Null);
    o.remove("layer_types");
    o.insert("sliding_window_pattern".into(), 3.into());
    v
}

#[test]
fn gemma3_config_in_both_layouts() {
    let v5 = config_json("gemma3-policy");
    let c = config_from_json(v5.clone(), "config.json".as_ref()).unwrap().decoder;
    assert_eq!(config_from_json(gemma3_legacy(&v5), "config.json".as_ref()).unwrap().decoder, c);
    assert_eq!((c.mlp, c.norm), (MlpKind::GeGluTanh, NormKind::RmsNormUnitOffset { eps: 1e-6 }));
    assert!(c.qk_norm && c.post_norms && c.scaled_embeddings && c.tied_embeddings && !c.qkv_bias);
    assert_eq!(c.sliding_window, Some(6));
    let PositionKind::Rotary(local) = c.positions else { panic!() };
    let global = c.global_layers.unwrap();
    assert_eq!(global.layers, vec![2]);
    assert_eq!((local.theta, global.rope.theta, global.rope.rotary_dim), (1e4, 1e6, 16));
}

#[test]
fn gemma3_settings_the_engine_lacks_are_refused_by_field() {
    let v5 = config_json("gemma3-policy");
    for (field, value) in [
        ("final_logit_softcapping", Value::from(30.0)),
        ("attn_logit_softcapping", Value::from(50.0)),
        ("query_pre_attn_scalar", Value::from(32)),
        ("use_bidirectional_attention", Value::from(true)),
        ("hidden_activation", Value::from("relu")),
    ] {
        let mut v = v5.clone();
        v.as_object_mut().unwrap().insert(field.into(), value);
        let err = config_from_json(v, "config.json".as_ref()).unwrap_err().to_string();
        assert!(err.contains(field), "{field}: {err}");
    }
}

#[test]
fn gemma3_four_norms_load_by_name() {
    let dir = more("models/gemma3-policy");
    let m = load_model(&dir).unwrap();
    let st = SafeTensors::open(&dir.join("model.safetensors")).unwrap();
    for (i, l) in m.params.layers.iter().enumerate() {
        let raw = |n: &str| st.read_f32(&format!("model.layers.{i}.{n}.weight")).unwrap().data;
        assert_eq!(l.norm1.weight.data, raw("input_layernorm"));
        assert_eq!(l.post_attn_norm.as_ref().unwrap().weight.data, raw("post_attention_layernorm"));
        assert_eq!(l.norm2.as_ref().unwrap().weight.data, raw("pre_feedforward_layernorm"));
        assert_eq!(l.post_mlp_norm.as_ref().unwrap().weight.data, raw("post_feedforward_layernorm"));
        assert_eq!(l.q_norm.as_ref().unwrap().data, raw("self_attn.q_norm"));
    }
}
