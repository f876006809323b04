//! PEFT LoRA adapters (`tests/fixtures/more/lora`, made with PEFT 0.21): loading onto the engine's fused
//! layout, saving back with PEFT's names and bits, merging as `merge_and_unload` does, target resolution
//! by PEFT's rules on every family, and refusals that name the field or tensor.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{more, parity, TempDir};
use dpo_hf::peft::{
    fresh_config, load_adapter, merged_params, resolve_targets, save_adapter, save_merged, LoraConfig, MergeBase,
    TargetModules, CONFIG_FILE, WEIGHTS_FILE,
};
use dpo_hf::safetensors::WriteDtype;
use dpo_hf::{load_config, load_model, save_model, to_hf_tensors, Error, ModelConfig, SafeTensors};
use engine::rng::Rng;
use engine::{Adapter, LoraTarget, Site};
use serde_json::{json, Value};

const ARCHS: [&str; 3] = ["gpt2", "llama", "qwen3"];

/// A scratch directory of its own (tests run in parallel threads of one process).
fn scratch(tag: &str) -> TempDir {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    TempDir::new(&format!("{tag}-{}", NEXT.fetch_add(1, Ordering::Relaxed)))
}

fn lora(arch: &str, rel: &str) -> PathBuf {
    more(&format!("lora/{arch}/{rel}"))
}

fn base_config(arch: &str) -> ModelConfig {
    load_config(&lora(arch, "base")).unwrap()
}

/// `(module, site, rows, r, scale)` of one layer's targets.
fn summary(ts: &[LoraTarget]) -> Vec<(String, Site, std::ops::Range<usize>, usize, f32)> {
    ts.iter().map(|t| (t.module.clone(), t.site, t.rows.clone(), t.r, t.scale)).collect()
}

fn row(
    m: &str,
    site: Site,
    rows: std::ops::Range<usize>,
    r: usize,
    scale: f32,
) -> (String, Site, std::ops::Range<usize>, usize, f32) {
    (m.to_string(), site, rows, r, scale)
}

#[test]
fn fixture_adapters_load_onto_their_modules() {
    for arch in ARCHS {
        let model = base_config(arch);
        let want = match arch {
            // c_attn: all q/k/v rows of the fused Conv1D (d = 48); c_fc: the MLP's 4d rows. alpha 8, r 8.
            "gpt2" => vec![row("attn.c_attn", Site::Qkv, 0..144, 8, 1.0), row("mlp.c_fc", Site::MlpIn, 0..192, 8, 1.0)],
            // q: 4 heads x 16, k and v: 2 heads x 16 each. alpha 32, r 4.
            "llama" => {
                vec![
                    row("self_attn.q_proj", Site::Qkv, 0..64, 4, 8.0),
                    row("self_attn.v_proj", Site::Qkv, 96..128, 4, 8.0),
                ]
            }
            // Every linear layer, named by full path in the file. alpha 16, r 8.
            _ => vec![
                row("self_attn.q_proj", Site::Qkv, 0..64, 8, 2.0),
                row("self_attn.k_proj", Site::Qkv, 64..96, 8, 2.0),
                row("self_attn.v_proj", Site::Qkv, 96..128, 8, 2.0),
                row("self_attn.o_proj", Site::AttnOut, 0..64, 8, 2.0),
                row("mlp.gate_proj", Site::MlpIn, 0..96, 8, 2.0),
                row("mlp.up_proj", Site::MlpIn, 96..192, 8, 2.0),
                row("mlp.down_proj", Site::MlpOut, 0..64, 8, 2.0),
            ],
        };
        for which in ["init_adapter", "trained_adapter"] {
            let dir = lora(arch, which);
            let loaded = load_adapter(&dir, &model).unwrap_or_else(|e| panic!("{arch}/{which}: {e}"));
            let a = &loaded.adapter;
            assert_eq!(a.layers.len(), 2);
            assert_eq!(a.dropout, 0.0);
            for (l, layer) in a.layers.iter().enumerate() {
                let targets: Vec<LoraTarget> = layer.pairs.iter().map(|p| p.target.clone()).collect();
                assert_eq!(summary(&targets), want, "{arch}/{which} layer {l}");
                // The values are the file's, A [r, in] and B [rows, r] as stored (no transpose on Conv1D).
                let st = SafeTensors::open(&dir.join(WEIGHTS_FILE)).unwrap();
                let prefix = if arch == "gpt2" { format!("transformer.h.{l}") } else { format!("model.layers.{l}") };
                for p in &layer.pairs {
                    let name = |part: &str| format!("base_model.model.{prefix}.{}.{part}.weight", p.target.module);
                    assert_eq!(st.read_f32(&name("lora_A")).unwrap(), p.a, "{arch} {}", name("lora_A"));
                    assert_eq!(st.read_f32(&name("lora_B")).unwrap(), p.b, "{arch} {}", name("lora_B"));
                }
            }
            let b_zero = a.layers.iter().flat_map(|l| &l.pairs).all(|p| p.b.data.iter().all(|&v| v == 0.0));
            // Only llama's starting adapter is PEFT's own initialisation (B zero); training moves every B.
            assert_eq!(b_zero, arch == "llama" && which == "init_adapter", "{arch}/{which}");
        }
    }
}

/// `(name, shape, values)` of tensors to write.
type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

/// `(name, shape, raw bytes)` of every tensor of a safetensors file, by name.
fn raw_tensors(path: &Path) -> Vec<(String, Vec<usize>, Vec<u8>)> {
    let st = SafeTensors::open(path).unwrap();
    let mut out: Vec<_> =
        st.tensors().iter().map(|t| (t.name.clone(), t.shape.clone(), st.bytes(&t.name).unwrap().to_vec())).collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn load_save_load_keeps_names_and_bits() {
    for arch in ARCHS {
        let model = base_config(arch);
        for which in ["init_adapter", "trained_adapter"] {
            let src = lora(arch, which);
            let loaded = load_adapter(&src, &model).unwrap();
            let tmp = TempDir::new(&format!("peft-rt-{arch}-{which}"));
            let out = tmp.path().join("adapter");
            save_adapter(&out, &loaded.config, &loaded.adapter, &model).unwrap();
            assert_eq!(raw_tensors(&out.join(WEIGHTS_FILE)), raw_tensors(&src.join(WEIGHTS_FILE)), "{arch}/{which}");
            let again = load_adapter(&out, &model).unwrap();
            assert_eq!(again.adapter, loaded.adapter);
            assert_eq!(LoraConfig { file: None, ..again.config }, LoraConfig { file: None, ..loaded.config });
            // Every field PEFT wrote is written back with the same value.
            let read =
                |p: &Path| -> Value { serde_json::from_slice(&std::fs::read(p.join(CONFIG_FILE)).unwrap()).unwrap() };
            assert_eq!(read(&out), read(&src), "{arch}/{which}: adapter_config.json");
            // Nothing but the two files, no staging directory left beside it.
            assert_eq!(std::fs::read_dir(&out).unwrap().count(), 2);
            assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
        }
    }
}

#[test]
fn merging_the_trained_adapter_gives_pefts_merged_model() {
    for arch in ARCHS {
        let base = load_model(&lora(arch, "base")).unwrap();
        let trained = load_adapter(&lora(arch, "trained_adapter"), &base.config).unwrap();
        let merged = merged_params(&base.params, &trained.adapter, &base.config).unwrap();
        let want = load_model(&lora(arch, "trained_merged")).unwrap().params;
        // Relative to each tensor's largest value: PEFT sums B A in f32 and the engine in f64 (rounded
        // once), so elements near zero differ by a few of the tensor's ulps, not of their own.
        let (mut worst, mut worst_abs, mut changed) = (0.0f64, 0.0f64, 0usize);
        for ((name, got), (_, want)) in merged.named().into_iter().zip(want.named()) {
            let scale = want.data.iter().fold(0.0f64, |m, w| m.max((*w as f64).abs()));
            let err = got.data.iter().zip(&want.data).fold(0.0f64, |m, (g, w)| m.max((*g as f64 - *w as f64).abs()));
            let rel = err / scale.max(f64::MIN_POSITIVE);
            assert!(rel <= 1e-6, "{arch} `{name}`: max |merged - PEFT's| = {err:e}, {rel:e} of its largest value");
            worst = worst.max(rel);
            worst_abs = worst_abs.max(err);
            changed += usize::from(got != base.params.named().iter().find(|(n, _)| *n == name).unwrap().1);
        }
        assert!(changed > 0, "{arch}: the merge changed nothing");
        eprintln!(
            "{arch}: merged vs PEFT's merge_and_unload: max error {worst_abs:.3e} absolute, {worst:.3e} of the \
             tensor's largest value; {changed} tensors changed"
        );

        // The merged directory writes and reads back as a plain model: written a tensor at a time, from the
        // base in memory or read from its directory, it holds the bytes `save_model` writes for the
        // merged parameters.
        let tmp = TempDir::new(&format!("peft-merged-{arch}"));
        let whole = tmp.path().join("whole");
        save_model(&whole, &base.config, &merged, Some(&base.dir)).unwrap();
        for (name, from) in [("loaded", MergeBase::Loaded(&base)), ("dir", MergeBase::Dir(&lora(arch, "base")))] {
            let out = tmp.path().join(name);
            save_merged(&out, from, &trained.adapter, WriteDtype::F32).unwrap();
            assert_eq!(load_model(&out).unwrap().params, merged, "{arch} {name}");
            for file in ["model.safetensors", "config.json", "generation_config.json"] {
                let read = |d: &Path| std::fs::read(d.join(file)).unwrap();
                assert!(read(&out) == read(&whole), "{arch} {name}: {file} differs from save_model's");
            }
        }
        // In bf16 and f16: every value of the merged model rounded to the nearest, and config.json says so.
        fn f16(x: f32) -> f32 {
            half::f16::from_f32(x).to_f32()
        }
        let halves = [
            (WriteDtype::Bf16, dpo_hf::Dtype::BF16, "bfloat16", engine::quant::bf16::round as fn(f32) -> f32),
            (WriteDtype::F16, dpo_hf::Dtype::F16, "float16", f16),
        ];
        for (dtype, stored, torch, round) in halves {
            let out = tmp.path().join(torch);
            save_merged(&out, MergeBase::Dir(&lora(arch, "base")), &trained.adapter, dtype).unwrap();
            let st = SafeTensors::open(&out.join("model.safetensors")).unwrap();
            assert!(st.tensors().iter().all(|t| t.dtype == stored), "{arch}: a tensor not in {torch}");
            let mut rounded = merged.clone();
            for (_, t) in rounded.named_mut() {
                t.data.iter_mut().for_each(|x| *x = round(*x));
            }
            assert_eq!(load_model(&out).unwrap().params, rounded, "{arch}: {torch} merged");
            let config: Value =
                serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
            assert!(config.get("dtype").or(config.get("torch_dtype")) == Some(&json!(torch)), "{config}");
            // A model made from it is written in its dtype unless told otherwise.
            assert_eq!(dpo_hf::stored_dtype(&out).unwrap(), dtype, "{arch} {torch}");
        }
        assert_eq!(dpo_hf::stored_dtype(&lora(arch, "base")).unwrap(), WriteDtype::F32);
    }
}

/// A config with `target_modules` (and any other fields) replaced, for targeting tests.
fn config_with(base: &Path, fields: Value) -> LoraConfig {
    let tmp = scratch("peft-cfg");
    let mut v: Value = serde_json::from_slice(&std::fs::read(base.join(CONFIG_FILE)).unwrap()).unwrap();
    for (k, x) in fields.as_object().unwrap() {
        v[k] = x.clone();
    }
    let p = tmp.path().join(CONFIG_FILE);
    std::fs::write(&p, v.to_string()).unwrap();
    LoraConfig::read(&p).unwrap()
}

fn modules(ts: &[Vec<LoraTarget>], layer: usize) -> Vec<&str> {
    ts[layer].iter().map(|t| t.module.as_str()).collect()
}

#[test]
fn all_linear_on_every_family_is_the_four_sites_without_the_head() {
    let llama_cfg = lora("llama", "init_adapter");
    let cases: [(PathBuf, &[&str]); 8] = [
        (parity("models/gpt2-policy"), &["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
        (
            parity("models/neox-policy"),
            &["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
        ),
        (
            more("models/gptj-policy"),
            &["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.fc_in", "mlp.fc_out"],
        ),
        (more("models/phi3-policy"), &["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"]),
        (parity("models/llama-policy"), LLAMA_ALL),
        (more("models/qwen3-policy"), LLAMA_ALL),
        (more("models/smollm3-policy"), LLAMA_ALL),
        (more("models/gemma3-policy"), LLAMA_ALL),
    ];
    for (dir, want) in cases {
        let model = load_config(&dir).unwrap();
        let ts = resolve_targets(&config_with(&llama_cfg, json!({"target_modules": "all-linear"})), &model).unwrap();
        assert_eq!(ts.len(), model.decoder.n_layers);
        for l in 0..ts.len() {
            assert_eq!(modules(&ts, l), want, "{}", dir.display());
            // The rows of each site are covered exactly once, in order.
            for site in Site::ALL {
                let rows: Vec<_> = ts[l].iter().filter(|t| t.site == site).map(|t| t.rows.clone()).collect();
                let (_, out) = site.dims(&model.decoder);
                let mut next = 0;
                for r in &rows {
                    assert_eq!(r.start, next, "{} {site:?}", dir.display());
                    next = r.end;
                }
                assert_eq!(next, out, "{} {site:?}", dir.display());
            }
        }
    }
}

const LLAMA_ALL: &[&str] = &[
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

#[test]
fn peft_matching_rules() {
    let src = lora("llama", "init_adapter");
    let model = base_config("llama");
    let resolve = |fields: Value| resolve_targets(&config_with(&src, fields), &model);

    // A regular expression must match the whole path.
    let ts = resolve(json!({"target_modules": r".*\.1\.mlp\.(up|down)_proj"})).unwrap();
    assert!(ts[0].is_empty());
    assert_eq!(modules(&ts, 1), ["mlp.up_proj", "mlp.down_proj"]);
    assert!(resolve(json!({"target_modules": "up_proj"})).is_err(), "a regex is not a suffix");

    // Suffixes match on a dot boundary; layers_to_transform filters them (with or without layers_pattern).
    let ts = resolve(json!({"target_modules": ["o_proj", "mlp.up_proj"], "layers_to_transform": [1]})).unwrap();
    assert!(ts[0].is_empty());
    assert_eq!(modules(&ts, 1), ["self_attn.o_proj", "mlp.up_proj"]);
    let ts =
        resolve(json!({"target_modules": ["o_proj"], "layers_to_transform": 0, "layers_pattern": "layers"})).unwrap();
    assert_eq!((modules(&ts, 0), modules(&ts, 1)), (vec!["self_attn.o_proj"], vec![]));
    assert!(resolve(json!({"target_modules": ["o_proj"], "layers_to_transform": 0, "layers_pattern": "h"})).is_err());
    // A full path is an exact match, which PEFT does not filter by layer.
    let ts = resolve(json!({"target_modules": ["model.layers.0.mlp.up_proj"], "layers_to_transform": [1]})).unwrap();
    assert_eq!((modules(&ts, 0), modules(&ts, 1)), (vec!["mlp.up_proj"], vec![]));
    assert!(resolve(json!({"target_modules": ["p_proj"]})).is_err(), "`q_proj` does not end with `.p_proj`");

    // exclude_modules (names or a regex) wins over the targets.
    let ts = resolve(json!({"target_modules": "all-linear", "exclude_modules": ["mlp.down_proj", "k_proj"]})).unwrap();
    assert_eq!(
        modules(&ts, 0),
        ["self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"]
    );
    let ts = resolve(json!({"target_modules": ["q_proj"], "exclude_modules": r".*\.0\..*"})).unwrap();
    assert_eq!((modules(&ts, 0), modules(&ts, 1)), (vec![], vec!["self_attn.q_proj"]));

    // rank_pattern / alpha_pattern: the first pattern matching the end of the path; rsLoRA alpha/sqrt(r).
    let ts = resolve(json!({
        "target_modules": ["q_proj", "v_proj"], "r": 4, "lora_alpha": 8,
        "rank_pattern": {"layers.1.self_attn.q_proj": 16, "q_proj": 2},
        "alpha_pattern": {"v_proj": 3}
    }))
    .unwrap();
    let rs = |l: usize| ts[l].iter().map(|t| (t.r, t.scale)).collect::<Vec<_>>();
    assert_eq!(rs(0), [(2, 4.0), (4, 0.75)]);
    assert_eq!(rs(1), [(16, 0.5), (4, 0.75)]);
    let ts = resolve(json!({"target_modules": ["q_proj"], "r": 16, "lora_alpha": 8, "use_rslora": true})).unwrap();
    assert_eq!(ts[0][0].scale, 2.0);
}

/// The error of loading `arch`'s init adapter with `fields` changed in its config.
fn load_error(arch: &str, fields: Value) -> Error {
    let tmp = scratch(&format!("peft-bad-{arch}"));
    let src = lora(arch, "init_adapter");
    let dir = tmp.path().join("adapter");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join(WEIGHTS_FILE), dir.join(WEIGHTS_FILE)).unwrap();
    let mut v: Value = serde_json::from_slice(&std::fs::read(src.join(CONFIG_FILE)).unwrap()).unwrap();
    for (k, x) in fields.as_object().unwrap() {
        v[k] = x.clone();
    }
    std::fs::write(dir.join(CONFIG_FILE), v.to_string()).unwrap();
    load_adapter(&dir, &base_config(arch)).expect_err(&format!("{fields} was accepted"))
}

#[test]
fn unsupported_configs_are_refused_by_field() {
    let cases = [
        (json!({"use_dora": true}), "use_dora"),
        (json!({"bias": "all"}), "bias"),
        (json!({"bias": "lora_only"}), "bias"),
        (json!({"modules_to_save": ["lm_head"]}), "modules_to_save"),
        (json!({"peft_type": "IA3"}), "peft_type"),
        (json!({"task_type": "SEQ_CLS"}), "task_type"),
        (json!({"init_lora_weights": "pissa"}), "init_lora_weights"),
        (json!({"lora_bias": true}), "lora_bias"),
        (json!({"r": 0}), "r"),
        (json!({"lora_dropout": 1.5}), "lora_dropout"),
        (json!({"layer_replication": [[0, 1]]}), "layer_replication"),
    ];
    for (fields, want) in cases {
        match load_error("llama", fields.clone()) {
            Error::ConfigField { field, path, msg } => {
                assert_eq!(field, want, "{fields}: {msg}");
                assert!(path.ends_with(CONFIG_FILE));
            }
            e => panic!("{fields}: {e}"),
        }
    }
    // Targets that PEFT would put on other modules, or that match nothing, are named.
    for (targets, want) in [
        (json!(["q_proj", "nonexistent"]), "nonexistent"),
        (json!(["lm_head"]), "lm_head"),
        (json!(["embed_tokens"]), "embed_tokens"),
        (json!(["self_attn"]), "self_attn"),
        (json!(".*norm"), ".*norm"),
        (json!("(?<=x)q_proj"), "(?<=x)q_proj"),
    ] {
        match load_error("llama", json!({ "target_modules": targets })) {
            Error::LoraTarget { target, origin, msg } => {
                assert_eq!(target, want, "{msg}");
                assert!(origin.contains("target_modules"), "{origin}");
            }
            e => panic!("{targets}: {e}"),
        }
    }
}

#[test]
fn weight_files_that_do_not_match_are_refused_by_tensor() {
    let model = base_config("llama");
    let src = lora("llama", "trained_adapter");
    let st = SafeTensors::open(&src.join(WEIGHTS_FILE)).unwrap();
    let original: Tensors =
        st.tensors().iter().map(|t| (t.name.clone(), t.shape.clone(), st.read_f32(&t.name).unwrap().data)).collect();
    let q_b = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight";
    let with = |edit: &dyn Fn(&mut Tensors)| {
        let tmp = scratch("peft-badw");
        let dir = tmp.path().join("a");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(src.join(CONFIG_FILE), dir.join(CONFIG_FILE)).unwrap();
        let mut t = original.clone();
        edit(&mut t);
        dpo_hf::safetensors::write_f32(&dir.join(WEIGHTS_FILE), &t).unwrap();
        match load_adapter(&dir, &model) {
            Err(Error::Weights { problems, .. }) => problems.join("\n"),
            other => panic!("accepted or other error: {other:?}"),
        }
    };
    let missing = with(&|t| t.retain(|(n, _, _)| n != q_b));
    assert!(missing.contains(&format!("missing tensor `{q_b}`")), "{missing}");
    let shape = with(&|t| {
        let e = t.iter_mut().find(|(n, _, _)| n == q_b).unwrap();
        e.1 = vec![32, 8];
    });
    assert!(shape.contains(&format!("tensor `{q_b}`: expected shape [64, 4], found [32, 8]")), "{shape}");
    let extra = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight";
    let unexpected = with(&|t| t.push((extra.into(), vec![4, 64], vec![0.0; 256])));
    assert!(unexpected.contains(&format!("unexpected tensor `{extra}`")), "{unexpected}");
    let nan = with(&|t| t.iter_mut().find(|(n, _, _)| n == q_b).unwrap().2[5] = f32::NAN);
    assert!(nan.contains(&format!("tensor `{q_b}`: value NaN at flat index 5")), "{nan}");
}

#[test]
fn neox_b_rows_follow_the_fused_weights_permutation() {
    // Merging in the engine's q/k/v row order, then saving as HF, must equal merging in HF's interleaved
    // order: W_hf + scale * B_hf A, with B_hf the adapter's B as saved.
    let base = load_model(&parity("models/neox-policy")).unwrap();
    let cfg = fresh_config(2, 4.0, 0.0, false, &["query_key_value".into()], &base.config).unwrap();
    let targets = resolve_targets(&cfg, &base.config).unwrap();
    let mut adapter = Adapter::zeros(&base.config.decoder, &targets, 0.0);
    let mut rng = Rng::new(7);
    for p in adapter.layers.iter_mut().flat_map(|l| l.pairs.iter_mut()) {
        p.a.data.iter_mut().for_each(|v| *v = rng.uniform() as f32 - 0.5);
        p.b.data.iter_mut().for_each(|v| *v = rng.uniform() as f32 - 0.5);
    }
    let tmp = TempDir::new("peft-neox");
    let dir = tmp.path().join("a");
    save_adapter(&dir, &cfg, &adapter, &base.config).unwrap();
    assert_eq!(load_adapter(&dir, &base.config).unwrap().adapter, adapter);

    let merged = merged_params(&base.params, &adapter, &base.config).unwrap();
    let hf_merged = to_hf_tensors(&base.config, &merged);
    let hf_base = to_hf_tensors(&base.config, &base.params);
    let st = SafeTensors::open(&dir.join(WEIGHTS_FILE)).unwrap();
    let d = base.config.decoder.hidden;
    for l in 0..base.config.decoder.n_layers {
        let w = format!("gpt_neox.layers.{l}.attention.query_key_value.weight");
        let key = format!("base_model.model.gpt_neox.layers.{l}.attention.query_key_value");
        let a = st.read_f32(&format!("{key}.lora_A.weight")).unwrap();
        let b = st.read_f32(&format!("{key}.lora_B.weight")).unwrap();
        let find = |ts: &Tensors| ts.iter().find(|t| t.0 == w).unwrap().2.clone();
        let (w0, w1) = (find(&hf_base), find(&hf_merged));
        for row in 0..3 * d {
            for col in 0..d {
                let delta: f32 = (0..2).map(|k| b.data[row * 2 + k] * a.data[k * d + col]).sum();
                let want = w0[row * d + col] + 2.0 * delta;
                assert!((w1[row * d + col] - want).abs() <= 1e-5, "layer {l} row {row} col {col}");
            }
        }
    }
}

#[test]
fn fresh_configs_from_flags() {
    let llama = base_config("llama");
    let c = fresh_config(16, 32.0, 0.05, false, &[], &llama).unwrap();
    assert_eq!(c.target_modules, TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]));
    assert!(!c.fan_in_fan_out);
    let ts = resolve_targets(&c, &llama).unwrap();
    assert_eq!(modules(&ts, 0), ["self_attn.q_proj", "self_attn.v_proj"]);
    assert_eq!((ts[0][0].r, ts[0][0].scale), (16, 2.0));

    let gpt2 = base_config("gpt2");
    let c = fresh_config(4, 8.0, 0.0, true, &["all-linear".into()], &gpt2).unwrap();
    assert_eq!(c.target_modules, TargetModules::AllLinear);
    assert!(c.fan_in_fan_out, "GPT-2's Conv1D");
    assert_eq!(resolve_targets(&c, &gpt2).unwrap()[1][0].scale, 4.0);

    let phi3 = load_config(&more("models/phi3-policy")).unwrap();
    assert!(matches!(fresh_config(8, 16.0, 0.0, false, &[], &phi3), Err(Error::InvalidLora { .. })));
    assert!(matches!(fresh_config(0, 16.0, 0.0, false, &[], &llama), Err(Error::InvalidLora { .. })));
    match fresh_config(8, 16.0, 0.0, false, &["q_proj".into(), "c_attn".into()], &llama) {
        Err(Error::LoraTarget { target, origin, .. }) => {
            assert_eq!((target.as_str(), origin.as_str()), ("c_attn", "--lora-targets"))
        }
        other => panic!("{other:?}"),
    }

    // A fresh adapter saves as a PEFT directory and loads back.
    let c = fresh_config(4, 8.0, 0.1, false, &["all-linear".into()], &llama).unwrap();
    let ts = resolve_targets(&c, &llama).unwrap();
    let mut a = Adapter::zeros(&llama.decoder, &ts, c.lora_dropout);
    a.init_peft(&mut Rng::new(3));
    let tmp = TempDir::new("peft-fresh");
    save_adapter(&tmp.path().join("a"), &c, &a, &llama).unwrap();
    let back = load_adapter(&tmp.path().join("a"), &llama).unwrap();
    let written: Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("a").join(CONFIG_FILE)).unwrap()).unwrap();
    assert_eq!((&written["lora_dropout"], &written["target_modules"]), (&json!(0.1), &json!("all-linear")));
    assert_eq!(back.adapter, a);
    assert_eq!(back.config.base_model_name_or_path, c.base_model_name_or_path);
    // An adapter its configuration does not describe is not saved.
    let mut other = a.clone();
    other.layers[0].pairs.pop();
    assert!(save_adapter(&tmp.path().join("b"), &c, &other, &llama).is_err());
}

/// PEFT itself loads what is saved here: for every family, a random adapter on all linear layers (B
/// nonzero) saved with [`save_adapter`] must make `PeftModel.from_pretrained(base, dir)` create exactly
/// the file's LoRA modules and give the logits of our merged model; the fixtures re-saved give PEFT's
/// logits of the originals. Needs the reference venv (`DPO_REFERENCE_PYTHON`, default
/// /work/venv/bin/python): `cargo test --release -p dpo-hf --test peft -- --ignored --nocapture`.
#[test]
#[ignore = "needs Python with torch, transformers and peft"]
fn peft_loads_what_we_save() {
    let python = std::env::var("DPO_REFERENCE_PYTHON").unwrap_or_else(|_| "/work/venv/bin/python".into());
    let tmp = scratch("peft-python");
    let mut cases = Vec::new();
    let families = [
        parity("models/gpt2-policy"),
        parity("models/llama-policy"),
        parity("models/neox-policy"),
        more("models/qwen3-policy"),
        more("models/phi3-policy"),
        more("models/gptj-policy"),
        more("models/gemma3-policy"),
        more("models/smollm3-policy"),
    ];
    for (i, dir) in families.iter().enumerate() {
        let base = load_model(dir).unwrap();
        let cfg = fresh_config(4, 8.0, 0.0, i % 2 == 1, &["all-linear".into()], &base.config).unwrap();
        let mut adapter = Adapter::zeros(&base.config.decoder, &resolve_targets(&cfg, &base.config).unwrap(), 0.0);
        let mut rng = Rng::new(11 + i as u64);
        adapter.init_peft(&mut rng);
        for p in adapter.layers.iter_mut().flat_map(|l| l.pairs.iter_mut()) {
            p.b.data.iter_mut().for_each(|v| *v = (rng.uniform() as f32 - 0.5) * 0.2);
        }
        let (a, m) = (tmp.path().join(format!("{i}-adapter")), tmp.path().join(format!("{i}-merged")));
        save_adapter(&a, &cfg, &adapter, &base.config).unwrap();
        save_merged(&m, MergeBase::Loaded(&base), &adapter, WriteDtype::F32).unwrap();
        cases.push(json!({"base": dir, "adapter": a, "merged": m, "reference": null}));
    }
    for arch in ARCHS {
        let base = load_model(&lora(arch, "base")).unwrap();
        for which in ["init_adapter", "trained_adapter"] {
            let loaded = load_adapter(&lora(arch, which), &base.config).unwrap();
            let a = tmp.path().join(format!("{arch}-{which}"));
            save_adapter(&a, &loaded.config, &loaded.adapter, &base.config).unwrap();
            let m = tmp.path().join(format!("{arch}-{which}-merged"));
            save_merged(&m, MergeBase::Dir(&lora(arch, "base")), &loaded.adapter, WriteDtype::F32).unwrap();
            cases.push(json!({"base": lora(arch, "base"), "adapter": a, "merged": m, "reference": lora(arch, which)}));
        }
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peft_check.py");
    let out = std::process::Command::new(&python)
        .arg(&script)
        .args(cases.iter().map(Value::to_string))
        .output()
        .unwrap_or_else(|e| panic!("{python}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), cases.len());
    for r in &rows {
        eprintln!("{r}");
        assert_eq!(r["modules_match"], true, "{r}");
        assert_eq!(r["values_equal"], true, "{r}");
        // llama's starting adapter is PEFT's own initialisation: B zero, the base's outputs exactly.
        let fresh_peft_init = r["adapter"].as_str().unwrap().ends_with("llama-init_adapter");
        let change = r["max_abs_logit_change_by_adapter"].as_f64().unwrap();
        assert!(if fresh_peft_init { change == 0.0 } else { change > 1e-3 }, "{r}");
        assert!(r["max_abs_logit_diff_vs_merged"].as_f64().unwrap() <= 1e-4, "{r}");
        if let Some(d) = r["max_abs_logit_diff_vs_reference"].as_f64() {
            assert_eq!(d, 0.0, "{r}");
        }
    }
}

#[test]
fn rank_patterns_apply_in_file_order() {
    // PEFT takes the first matching pattern in the file's order; sorted, `layers.1...` would come first.
    let tmp = scratch("peft-order");
    let p = tmp.path().join(CONFIG_FILE);
    let text = r#"{"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8.5,
        "target_modules": ["q_proj"], "layers_to_transform": 1,
        "rank_pattern": {"q_proj": 2, "layers.1.self_attn.q_proj": 16}}"#;
    std::fs::write(&p, text).unwrap();
    let c = LoraConfig::read(&p).unwrap();
    assert_eq!(c.rank_pattern, [("q_proj".to_string(), 2), ("layers.1.self_attn.q_proj".to_string(), 16)]);
    assert_eq!(c.layers_to_transform, Some(vec![1]));
    let ts = resolve_targets(&c, &base_config("llama")).unwrap();
    assert!(ts[0].is_empty());
    assert_eq!((ts[1][0].r, ts[1][0].scale), (2, 4.25));
    // Written back with PEFT's defaults for the fields the file left out, and read back the same.
    let out = tmp.path().join("saved");
    let model = base_config("llama");
    let mut a = Adapter::zeros(&model.decoder, &ts, 0.0);
    a.init_peft(&mut Rng::new(5));
    save_adapter(&out, &c, &a, &model).unwrap();
    let back = load_adapter(&out, &model).unwrap();
    assert_eq!((back.adapter, back.config.lora_alpha), (a, 8.5));
}
