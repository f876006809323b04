//! Tests of `config.rs`: both config.json layouts, every family row, and fields that are errors.

use super::*;
use serde_json::json;

fn parse(v: Value) -> Result<ModelConfig> {
    config_from_json(v, Path::new("config.json"))
}

fn llama(extra: Value) -> Value {
    let mut base = json!({
        "model_type": "llama", "vocab_size": 100, "hidden_size": 32, "num_attention_heads": 4,
        "num_hidden_layers": 2, "intermediate_size": 64, "max_position_embeddings": 128,
        "eos_token_id": [1, 2], "bos_token_id": 0
    });
    for (k, v) in extra.as_object().unwrap() {
        base[k] = v.clone();
    }
    base
}

#[test]
fn llama_defaults_and_ids() {
    let c = parse(llama(json!({}))).unwrap();
    assert_eq!(c.decoder.head_dim, 8);
    assert_eq!(c.decoder.n_kv_heads, 4);
    assert_eq!(c.eos_token_ids, vec![1, 2]);
    assert!(!c.decoder.tied_embeddings && !c.decoder.qkv_bias);
    let PositionKind::Rotary(r) = c.decoder.positions else { panic!() };
    assert_eq!((r.theta, r.rotary_dim, r.scaling), (10000.0, 8, RopeScaling::None));
}

#[test]
fn linear_scaling_both_layouts() {
    let v4 = parse(llama(json!({"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}}))).unwrap();
    let v5 =
        parse(llama(json!({"rope_parameters": {"rope_theta": 5e5, "rope_type": "linear", "factor": 2.0}}))).unwrap();
    assert_eq!(v4.decoder, v5.decoder);
    let PositionKind::Rotary(r) = v5.decoder.positions else { panic!() };
    assert_eq!((r.theta, r.scaling), (5e5, RopeScaling::Linear { factor: 2.0 }));
}

#[test]
fn unsupported_rope_and_model_type_are_named() {
    let e = parse(llama(json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))).unwrap_err();
    assert!(e.to_string().contains("`yarn`"), "{e}");
    let e = parse(llama(json!({"model_type": "bert"}))).unwrap_err();
    let m = e.to_string();
    assert!(m.contains("`bert`") && m.contains("gpt_neox") && m.contains("qwen2"), "{m}");
    let e = parse(llama(json!({"hidden_act": "gelu"}))).unwrap_err();
    assert!(e.to_string().contains("hidden_act"), "{e}");
    let e = parse(llama(json!({"hidden_size": "big"}))).unwrap_err();
    assert!(e.to_string().contains("`hidden_size`"), "{e}");
}

#[test]
fn qwen2_and_mistral_switches() {
    let q = parse(llama(json!({"model_type": "qwen2", "sliding_window": 64, "use_sliding_window": false,
                                "max_window_layers": 2})))
    .unwrap();
    assert!(q.decoder.qkv_bias && !q.decoder.attn_out_bias && q.decoder.sliding_window.is_none());
    let q = parse(llama(json!({"model_type": "qwen2", "sliding_window": 64, "use_sliding_window": true,
                                "max_window_layers": 0})))
    .unwrap();
    assert_eq!(q.decoder.sliding_window, Some(64));
    let q = parse(llama(json!({"model_type": "qwen2", "sliding_window": 64, "use_sliding_window": true,
                                "max_window_layers": 1})));
    assert!(q.is_err());
    let m = parse(llama(json!({"model_type": "mistral", "sliding_window": null}))).unwrap();
    assert_eq!(m.decoder.sliding_window, None);
    let m = parse(llama(json!({"model_type": "mistral", "sliding_window": 4096}))).unwrap();
    assert_eq!(m.decoder.sliding_window, Some(4096));
}

#[test]
fn huge_sizes_are_errors_not_panics() {
    // Reproduced with `cargo fuzz run config`: `4 * n_embd` (the default `n_inner`) overflowed, and a
    // list of `num_hidden_layers` entries was allocated before anything checked the count.
    let e = parse(json!({"model_type": "gpt2", "vocab_size": 50, "n_embd": 1u64 << 62, "n_head": 1, "n_layer": 1,
                         "n_positions": 32}))
    .unwrap_err();
    assert!(e.to_string().contains("field `n_embd`: 4611686018427387904 is too large"), "{e}");
    let m =
        parse(llama(json!({"model_type": "mistral", "num_hidden_layers": 1u64 << 40, "sliding_window": 64}))).unwrap();
    assert_eq!((m.decoder.n_layers, m.decoder.sliding_window), (1 << 40, Some(64)));
    let q = |layers: u64, m: u64| {
        parse(llama(json!({"model_type": "qwen2", "num_hidden_layers": layers, "sliding_window": 64,
                           "use_sliding_window": true, "max_window_layers": m})))
        .map(|c| c.decoder.sliding_window)
        .map_err(|e| e.to_string())
    };
    assert_eq!(q(1 << 40, 0), Ok(Some(64)));
    assert_eq!(q(1 << 40, 1 << 40), Ok(None));
    assert!(q(1 << 40, 1).unwrap_err().contains("some layers only"));
}

#[test]
fn gpt2_defaults() {
    let c = parse(json!({"model_type": "gpt2", "vocab_size": 50, "n_embd": 16, "n_head": 2, "n_layer": 1,
                         "n_positions": 32, "n_inner": null}))
    .unwrap();
    assert_eq!(c.decoder.ffn_hidden, 64);
    assert_eq!(c.decoder.mlp, MlpKind::GeluTanh);
    assert!(c.decoder.tied_embeddings);
    assert!(c.eos_token_ids.is_empty());
}

#[test]
fn neox_partial_rotary() {
    let base = json!({"model_type": "gpt_neox", "vocab_size": 50, "hidden_size": 64, "num_attention_heads": 4,
        "num_hidden_layers": 1, "intermediate_size": 128, "max_position_embeddings": 32,
        "rotary_pct": 0.5, "rotary_emb_base": 1000, "hidden_act": "gelu"});
    let c = parse(base).unwrap();
    let PositionKind::Rotary(r) = c.decoder.positions else { panic!() };
    assert_eq!((r.rotary_dim, r.theta), (8, 1000.0));
    assert_eq!(c.decoder.mlp, MlpKind::GeluErf);
    assert!(c.decoder.parallel_residual && c.decoder.qkv_bias && !c.decoder.tied_embeddings);
}
