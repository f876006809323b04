//! Every parity checkpoint loads, both config layouts agree, the layout conversions match the raw HF
//! tensors, and save → load is lossless.

mod common;

use std::path::Path;

use common::{copy_dir, parity, TempDir};
use dpo_hf::{load_model, load_params, load_params_file, load_tokenizer, parse_config, save_model, Error, SafeTensors};
use engine::{MlpKind, NormKind, PositionKind, RopeScaling};

const ARCHS: [&str; 4] = ["gpt2", "llama", "llama3", "neox"];

#[test]
fn every_fixture_checkpoint_loads() {
    let mut n = 0;
    for e in std::fs::read_dir(parity("models")).unwrap() {
        let dir = e.unwrap().path();
        let m = load_model(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        assert_eq!(m.config.decoder.vocab_size, 512);
        assert_eq!(m.params.wte.shape, vec![512, m.config.decoder.hidden]);
        assert_eq!(m.config.eos_token_ids, vec![0]);
        assert_eq!((m.config.bos_token_id, m.config.pad_token_id), (Some(0), Some(1)));
        load_tokenizer(&dir).unwrap();
        n += 1;
    }
    assert_eq!(n, 12);
    for arch in ARCHS {
        load_model(&parity(&format!("expected/{arch}/trained"))).unwrap();
    }
}

#[test]
fn legacy_config_gives_the_same_model() {
    for arch in ARCHS {
        let v5 = load_model(&parity(&format!("models/{arch}-policy"))).unwrap();
        let v4 = load_model(&parity(&format!("models/{arch}-policy-legacy"))).unwrap();
        assert_eq!(v5.config.decoder, v4.config.decoder, "{arch}");
        assert_eq!(v5.params, v4.params, "{arch}");
        assert_eq!(v4.config.dtype.as_deref(), Some("float32"));
    }
}

#[test]
fn configs_map_to_the_expected_switches() {
    let c = |d: &str| parse_config(&parity(&format!("models/{d}/config.json"))).unwrap().decoder;
    let g = c("gpt2-policy");
    assert_eq!((g.hidden, g.n_heads, g.head_dim, g.ffn_hidden, g.max_positions), (64, 4, 16, 256, 256));
    assert_eq!(
        (g.mlp, g.positions, g.norm),
        (MlpKind::GeluTanh, PositionKind::Learned, NormKind::LayerNorm { eps: 1e-5 })
    );
    assert!(g.tied_embeddings && g.qkv_bias && g.attn_out_bias && g.mlp_bias && !g.parallel_residual);

    let l = c("llama-policy");
    assert_eq!((l.n_heads, l.n_kv_heads, l.head_dim, l.ffn_hidden), (4, 2, 16, 128));
    assert_eq!((l.mlp, l.norm), (MlpKind::SwiGlu, NormKind::RmsNorm { eps: 1e-6 }));
    assert!(!l.tied_embeddings && !l.qkv_bias && !l.attn_out_bias && !l.mlp_bias);
    let PositionKind::Rotary(r) = l.positions else { panic!("llama is rotary") };
    assert_eq!((r.theta, r.rotary_dim, r.scaling), (10000.0, 16, RopeScaling::None));

    let PositionKind::Rotary(r) = c("llama3-policy").positions else { panic!() };
    assert_eq!(r.theta, 500000.0);
    assert_eq!(
        r.scaling,
        RopeScaling::Llama3 { factor: 4.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_positions: 16 }
    );
    assert_eq!(c("llama3-ref").n_kv_heads, 1);

    let n = c("neox-policy");
    assert_eq!((n.mlp, n.norm), (MlpKind::GeluErf, NormKind::LayerNorm { eps: 1e-5 }));
    assert!(n.parallel_residual && n.qkv_bias && n.attn_out_bias && n.mlp_bias && !n.tied_embeddings);
    let PositionKind::Rotary(r) = n.positions else { panic!() };
    assert_eq!(r.rotary_dim, 4);
    let PositionKind::Rotary(r) = c("neox-ref").positions else { panic!() };
    assert_eq!(r.rotary_dim, 8);
}

#[test]
fn loaded_types_can_be_shared_across_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<dpo_hf::HfModel>();
    send_sync::<dpo_hf::Tokenizer>();
    send_sync::<dpo_hf::Checkpoint>();
    send_sync::<Error>();
}

fn raw(dir: &str, name: &str) -> Vec<f32> {
    let st = SafeTensors::open(&parity(&format!("models/{dir}/model.safetensors"))).unwrap();
    st.read_f32(name).unwrap().data
}

#[test]
fn gpt2_conv1d_is_transposed() {
    let m = load_model(&parity("models/gpt2-policy")).unwrap();
    let d = 64;
    let c_attn = raw("gpt2-policy", "transformer.h.1.attn.c_attn.weight"); // [d, 3d]
    let w = &m.params.layers[1].w_qkv; // [3d, d]
    assert_eq!(w.shape, vec![3 * d, d]);
    for r in 0..3 * d {
        for c in 0..d {
            assert_eq!(w.data[r * d + c], c_attn[c * 3 * d + r]);
        }
    }
    let c_fc = raw("gpt2-policy", "transformer.h.0.mlp.c_fc.weight"); // [d, 4d]
    let w_in = &m.params.layers[0].w_in;
    assert_eq!(w_in.data[5 * d + 7], c_fc[7 * 4 * d + 5]);
    assert_eq!(m.params.wpe.as_ref().unwrap().data, raw("gpt2-policy", "transformer.wpe.weight"));
    assert!(m.params.lm_head.is_none());
}

#[test]
fn llama_projections_are_fused_in_order() {
    let m = load_model(&parity("models/llama-policy")).unwrap();
    let p = "model.layers.1";
    let qkv = [
        raw("llama-policy", &format!("{p}.self_attn.q_proj.weight")),
        raw("llama-policy", &format!("{p}.self_attn.k_proj.weight")),
        raw("llama-policy", &format!("{p}.self_attn.v_proj.weight")),
    ]
    .concat();
    assert_eq!(m.params.layers[1].w_qkv.data, qkv);
    assert_eq!(m.params.layers[1].w_qkv.shape, vec![128, 64]);
    let w_in = [
        raw("llama-policy", &format!("{p}.mlp.gate_proj.weight")),
        raw("llama-policy", &format!("{p}.mlp.up_proj.weight")),
    ]
    .concat();
    assert_eq!(m.params.layers[1].w_in.data, w_in);
    assert_eq!(m.params.lm_head.as_ref().unwrap().data, raw("llama-policy", "lm_head.weight"));
}

#[test]
fn neox_qkv_is_deinterleaved() {
    let m = load_model(&parity("models/neox-policy")).unwrap();
    let (nh, hd, d) = (4, 16, 64);
    let w = raw("neox-policy", "gpt_neox.layers.0.attention.query_key_value.weight"); // rows [nh, 3, hd]
    let b = raw("neox-policy", "gpt_neox.layers.0.attention.query_key_value.bias");
    let l = &m.params.layers[0];
    for h in 0..nh {
        for j in 0..3 {
            for i in 0..hd {
                let (hf, en) = ((h * 3 + j) * hd + i, (j * nh + h) * hd + i);
                assert_eq!(l.w_qkv.data[en * d..en * d + d], w[hf * d..hf * d + d]);
                assert_eq!(l.b_qkv.as_ref().unwrap().data[en], b[hf]);
            }
        }
    }
    assert_eq!(m.params.lm_head.as_ref().unwrap().data, raw("neox-policy", "embed_out.weight"));
}

#[test]
fn gradient_files_load_with_hf_names() {
    for arch in ARCHS {
        let cfg = parse_config(&parity(&format!("models/{arch}-policy/config.json"))).unwrap();
        let g = load_params_file(&parity(&format!("expected/{arch}/grads.safetensors")), &cfg).unwrap();
        assert!(g.wte.data.iter().any(|&x| x != 0.0), "{arch}");
    }
}

/// Tensor name → (shape, raw bytes) of a safetensors file.
fn tensor_bytes(path: &Path) -> Vec<(String, Vec<usize>, Vec<u8>)> {
    let st = SafeTensors::open(path).unwrap();
    st.tensors().iter().map(|t| (t.name.clone(), t.shape.clone(), st.bytes(&t.name).unwrap().to_vec())).collect()
}

#[test]
fn save_then_load_is_lossless() {
    let tmp = TempDir::new("roundtrip");
    for arch in ARCHS {
        let src = parity(&format!("models/{arch}-policy"));
        let m = load_model(&src).unwrap();
        let out = tmp.path().join(arch);
        save_model(&out, &m.config, &m.params, Some(&src)).unwrap();
        let back = load_model(&out).unwrap();
        assert_eq!(back.params, m.params, "{arch}");
        assert_eq!(back.config.decoder, m.config.decoder, "{arch}");
        assert_eq!(
            tensor_bytes(&out.join("model.safetensors")),
            tensor_bytes(&src.join("model.safetensors")),
            "{arch}"
        );
        // Written one converted tensor at a time, the file is byte for byte the serialisation of the whole
        // converted model.
        let whole = dpo_hf::safetensors::serialize_f32(&dpo_hf::to_hf_tensors(&m.config, &m.params)).unwrap();
        assert_eq!(std::fs::read(out.join("model.safetensors")).unwrap(), whole, "{arch}");
        for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
            assert_eq!(std::fs::read(out.join(f)).unwrap(), std::fs::read(src.join(f)).unwrap(), "{f}");
        }
        let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["dtype"], "float32");
        let tok = load_tokenizer(&out).unwrap();
        assert_eq!(tok.eos_id(), Some(0));
    }
    // The legacy layout keeps its own dtype key.
    let legacy = load_model(&parity("models/llama-policy-legacy")).unwrap();
    let out = tmp.path().join("legacy");
    save_model(&out, &legacy.config, &legacy.params, None).unwrap();
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["torch_dtype"], "float32");
    assert!(cfg.get("dtype").is_none());
    let gen: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("generation_config.json")).unwrap()).unwrap();
    assert_eq!(gen["eos_token_id"], 0);
    assert_eq!(load_model(&out).unwrap().params, legacy.params);
}

#[test]
fn save_replaces_a_model_dir_and_leaves_no_temporaries() {
    let tmp = TempDir::new("replace");
    let gpt2 = load_model(&parity("models/gpt2-policy")).unwrap();
    let llama = load_model(&parity("models/llama-policy")).unwrap();
    let out = tmp.path().join("out");
    save_model(&out, &gpt2.config, &gpt2.params, None).unwrap();
    std::fs::write(out.join("stale.txt"), "old").unwrap();
    save_model(&out, &llama.config, &llama.params, None).unwrap();
    assert_eq!(load_model(&out).unwrap().params, llama.params);
    assert!(!out.join("stale.txt").exists());
    let names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("out")]);

    // A directory that is not a model directory is never replaced.
    let other = tmp.path().join("notes");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("keep.txt"), "mine").unwrap();
    let e = save_model(&other, &gpt2.config, &gpt2.params, None).unwrap_err();
    assert!(e.to_string().contains("refusing"), "{e}");
    assert!(other.join("keep.txt").exists());

    // Parameters that do not match the config are refused before anything is written.
    let e = save_model(&tmp.path().join("bad"), &gpt2.config, &llama.params, None).unwrap_err();
    assert!(e.to_string().contains("do not match"), "{e}");
    assert!(!tmp.path().join("bad").exists());
}

#[test]
fn directory_errors_are_clear() {
    let tmp = TempDir::new("dirs");
    let e = load_model(&tmp.path().join("nope")).unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
    let file = tmp.path().join("file");
    std::fs::write(&file, "x").unwrap();
    assert!(load_model(&file).unwrap_err().to_string().contains("not a directory"));
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert!(load_model(&empty).unwrap_err().to_string().contains("config.json"));

    let pickle = tmp.path().join("pickle");
    std::fs::create_dir(&pickle).unwrap();
    std::fs::copy(parity("models/gpt2-policy/config.json"), pickle.join("config.json")).unwrap();
    let e = load_model(&pickle).unwrap_err();
    assert!(matches!(e, Error::NoWeights { .. }), "{e}");
    std::fs::write(pickle.join("pytorch_model.bin"), b"\x80\x02").unwrap();
    let e = load_model(&pickle).unwrap_err();
    assert!(matches!(e, Error::PickleOnly { .. }), "{e}");
    assert!(e.to_string().contains("safetensors"), "{e}");
}

#[test]
fn every_weight_problem_is_listed() {
    let tmp = TempDir::new("problems");
    let src = parity("models/llama-policy");
    let dir = tmp.path().join("m");
    copy_dir(&src, &dir);
    let st = SafeTensors::open(&src.join("model.safetensors")).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = st
        .tensors()
        .iter()
        .filter(|t| t.name != "model.norm.weight")
        .map(|t| (t.name.clone(), t.shape.clone(), st.read_f32(&t.name).unwrap().data))
        .collect();
    for (name, shape, data) in &mut tensors {
        if name == "model.layers.0.self_attn.k_proj.weight" {
            *shape = vec![64, 32];
        }
        if name == "model.layers.1.mlp.up_proj.weight" {
            data[3] = f32::NAN;
        }
    }
    tensors.push(("model.extra.weight".into(), vec![2], vec![0.0, 1.0]));
    tensors.push(("model.layers.0.self_attn.rotary_emb.inv_freq".into(), vec![2], vec![1.0, 0.5]));
    dpo_hf::safetensors::write_f32(&dir.join("model.safetensors"), &tensors).unwrap();
    let e = load_model(&dir).unwrap_err();
    let Error::Weights { problems, .. } = &e else { panic!("{e}") };
    assert_eq!(problems.len(), 4, "{e}");
    let msg = e.to_string();
    for want in [
        "missing tensor `model.norm.weight` (expected shape [64])",
        "tensor `model.layers.0.self_attn.k_proj.weight`: expected shape [32, 64], found [64, 32]",
        "tensor `model.layers.1.mlp.up_proj.weight`: value NaN at flat index 3",
        "unexpected tensor `model.extra.weight`",
    ] {
        assert!(msg.contains(want), "{want} not in {msg}");
    }
}

#[test]
fn gpt2_without_prefix_and_with_buffers_loads() {
    let tmp = TempDir::new("gpt2-bare");
    let src = parity("models/gpt2-policy");
    let dir = tmp.path().join("m");
    copy_dir(&src, &dir);
    let st = SafeTensors::open(&src.join("model.safetensors")).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = st
        .tensors()
        .iter()
        .map(|t| {
            let bare = t.name.strip_prefix("transformer.").unwrap().to_string();
            (bare, t.shape.clone(), st.read_f32(&t.name).unwrap().data)
        })
        .collect();
    tensors.push(("h.0.attn.bias".into(), vec![1, 1, 2, 2], vec![1.0, 0.0, 1.0, 1.0]));
    tensors.push(("h.0.attn.masked_bias".into(), vec![], vec![-1e4]));
    tensors.push(("lm_head.weight".into(), vec![512, 64], st.read_f32("transformer.wte.weight").unwrap().data));
    dpo_hf::safetensors::write_f32(&dir.join("model.safetensors"), &tensors).unwrap();
    let want = load_model(&src).unwrap();
    assert_eq!(load_model(&dir).unwrap().params, want.params);
}

fn write_index(dir: &Path, map: &[(&str, &str)]) {
    let wm: serde_json::Map<String, serde_json::Value> =
        map.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(*v))).collect();
    let idx = serde_json::json!({"metadata": {}, "weight_map": wm});
    std::fs::write(dir.join("model.safetensors.index.json"), idx.to_string()).unwrap();
}

#[test]
fn sharded_checkpoints_load_and_unsafe_shards_are_refused() {
    let tmp = TempDir::new("shards");
    let src = parity("models/gpt2-policy");
    let dir = tmp.path().join("m");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let st = SafeTensors::open(&src.join("model.safetensors")).unwrap();
    let all: Vec<(String, Vec<usize>, Vec<f32>)> =
        st.tensors().iter().map(|t| (t.name.clone(), t.shape.clone(), st.read_f32(&t.name).unwrap().data)).collect();
    let (a, b) = all.split_at(all.len() / 2);
    let names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"];
    dpo_hf::safetensors::write_f32(&dir.join(names[0]), a).unwrap();
    dpo_hf::safetensors::write_f32(&dir.join(names[1]), b).unwrap();
    let map: Vec<(&str, &str)> =
        a.iter().map(|t| (t.0.as_str(), names[0])).chain(b.iter().map(|t| (t.0.as_str(), names[1]))).collect();
    write_index(&dir, &map);
    let want = load_model(&src).unwrap();
    assert_eq!(load_model(&dir).unwrap().params, want.params);

    let cfg = parse_config(&dir.join("config.json")).unwrap();
    for bad in ["../x.safetensors", "/etc/x.safetensors", "sub/../../x.safetensors"] {
        let mut m = map.clone();
        m[0].1 = bad;
        write_index(&dir, &m);
        let e = load_params(&dir, &cfg).unwrap_err();
        assert!(matches!(e, Error::Shard { .. }) && e.to_string().contains(bad), "{bad}: {e}");
    }
    let mut m = map.clone();
    m[0].1 = "model-00009-of-00009.safetensors";
    write_index(&dir, &m);
    let e = load_params(&dir, &cfg).unwrap_err();
    assert!(e.to_string().contains("missing"), "{e}");
}

#[test]
fn corrupt_files_name_the_tensor() {
    let tmp = TempDir::new("corrupt");
    let src = parity("models/gpt2-policy");
    let dir = tmp.path().join("m");
    copy_dir(&src, &dir);
    let good = std::fs::read(src.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let path = dir.join("model.safetensors");
    let check = |bytes: &[u8], want: &[&str]| {
        std::fs::write(&path, bytes).unwrap();
        let e = load_model(&dir).unwrap_err().to_string();
        for w in want {
            assert!(e.contains(w), "{w} not in {e}");
        }
    };

    // Header length beyond the file.
    let mut b = good.clone();
    b[..8].copy_from_slice(&(good.len() as u64).to_le_bytes());
    check(&b, &["model.safetensors", "header length"]);

    // Data section cut short: the last tensor's offsets run past it.
    check(&good[..good.len() - 4], &["tensor `transformer.wte.weight`", "outside the data section"]);

    // A shape that does not match the byte span.
    let mut header: serde_json::Value = serde_json::from_slice(&good[8..8 + n]).unwrap();
    header["transformer.h.0.attn.c_attn.bias"]["shape"] = serde_json::json!([191]);
    let h = header.to_string();
    let mut b = (h.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(h.as_bytes());
    b.extend_from_slice(&good[8 + n..]);
    check(&b, &["tensor `transformer.h.0.attn.c_attn.bias`", "needs 764 bytes"]);

    // Too short to hold a header at all; not JSON.
    check(&[0, 1], &["too short"]);
    check(&[], &["model.safetensors"]);
    let mut b = 4u64.to_le_bytes().to_vec();
    b.extend_from_slice(b"{{{{");
    check(&b, &["not valid JSON"]);
}
