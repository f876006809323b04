//! LoRA runs against TRL + PEFT on the public fixtures of `tests/fixtures/more/lora` (its README): 6 steps
//! of `dpo train --adapter lora/<arch>/init_adapter --model lora/<arch>/base` within 1e-3 per metric of
//! `train.jsonl` and 1e-2 on the adapter change of `trained_adapter`, and the log-probs of base + starting
//! adapter within 1e-4 of PEFT's. Beside them the invariants of an adapter run: a frozen base, a new
//! adapter's reference is the base, `--precompute-ref` caches per adapter, exact resumption, and what
//! `final/`, checkpoints and `--merge` hold.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use dpo::train::config::{LoraFlags, LoraTargets};
use dpo::train::{train, RunOptions, TrainConfig};
use engine::{Adapter, ParamSet};

use common::{jsonl, run, scratch, trl_settings, MORE, TRL_METRICS};

/// The LoRA fixtures: GPT-2's Conv1D `c_attn` and `c_fc` (A and B random), Llama's `q_proj` and `v_proj`
/// (PEFT's own initialisation, B zero), Qwen 3's every linear layer (A and B random).
const ARCHS: [&str; 3] = ["gpt2", "llama", "qwen3"];

fn lora(arch: &str, rel: &str) -> PathBuf {
    MORE.path(&format!("lora/{arch}/{rel}"))
}

/// MANIFEST.json's TRL + PEFT run: the settings of the full-model runs, from the starting adapter.
fn settings(arch: &str, output: PathBuf) -> TrainConfig {
    TrainConfig {
        model: lora(arch, "base"),
        ref_model: None,
        adapter: Some(lora(arch, "init_adapter")),
        ..trl_settings(MORE, arch, output)
    }
}

fn adapter_of(dir: &Path, arch: &str) -> Adapter {
    let model = hf::load_config(&lora(arch, "base")).unwrap();
    hf::peft::load_adapter(dir, &model).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).adapter
}

fn flat(a: &Adapter) -> Vec<f64> {
    a.named().into_iter().flat_map(|(_, t)| t.data.iter().map(|&x| x as f64).collect::<Vec<_>>()).collect()
}

/// The worst per-step metric error against `train.jsonl` (relative to max(|x|, 1), with where), and the
/// relative error of the adapter change against `trained_adapter`. Token counts must match exactly.
fn errors(arch: &str, out: &Path) -> ((f64, String), f64) {
    let ours = jsonl(&out.join("metrics.jsonl"));
    let theirs = jsonl(&lora(arch, "train.jsonl"));
    assert_eq!(ours.len(), theirs.len(), "{arch}: steps");
    let mut worst = (0.0f64, String::new());
    for (o, t) in ours.iter().zip(&theirs) {
        for key in TRL_METRICS {
            let (a, b) = (o[key].as_f64().unwrap(), t[key].as_f64().unwrap());
            let err = (a - b).abs() / b.abs().max(1.0);
            let err = if err.is_nan() { f64::INFINITY } else { err };
            if err > worst.0 || worst.1.is_empty() {
                worst = (err, format!("step {} {key}: ours {a}, TRL {b}", t["step"]));
            }
        }
        assert_eq!(o["num_tokens"].as_f64(), t["num_tokens"].as_f64(), "{arch} num_tokens");
    }
    let start = flat(&adapter_of(&lora(arch, "init_adapter"), arch));
    let mine = flat(&adapter_of(&out.join("final"), arch));
    let trl = flat(&adapter_of(&lora(arch, "trained_adapter"), arch));
    assert_eq!((start.len(), mine.len()), (trl.len(), trl.len()), "{arch}: adapter sizes");
    let (mut diff, mut norm) = (0.0, 0.0);
    for i in 0..start.len() {
        let (dm, dt) = (mine[i] - start[i], trl[i] - start[i]);
        diff += (dm - dt) * (dm - dt);
        norm += dt * dt;
    }
    (worst, (diff / norm).sqrt())
}

#[test]
fn six_steps_from_an_adapter_match_trl_and_peft() {
    for arch in ARCHS {
        let out = scratch(&format!("lora-trl-{arch}"));
        run(&settings(arch, out.clone()));
        let (worst, rel) = errors(arch, &out);
        println!("{arch}: worst metric error {:.2e} ({}); adapter change relative error {rel:.2e}", worst.0, worst.1);
        assert!(worst.0 < 1e-3, "{arch}: {}", worst.1);
        assert!(rel < 1e-2, "{arch}: adapter change differs from TRL + PEFT's by {rel}");
        // final/ is a PEFT adapter directory; the run recorded the adapter's own settings.
        assert!(
            out.join("final/adapter_config.json").is_file() && out.join("final/adapter_model.safetensors").is_file()
        );
        assert!(!out.join("final/model.safetensors").exists(), "{arch}: final/ holds a full model");
        let recorded = TrainConfig::from_toml_file(&out.join("config.toml")).unwrap();
        assert_eq!(recorded.adapter.as_deref(), Some(lora(arch, "init_adapter").as_path()));
        assert!(recorded.lora.r.is_some() && recorded.lora.alpha.is_some(), "{:?}", recorded.lora);
        std::fs::remove_dir_all(&out).unwrap();
    }
}

/// Gradient checkpointing on an adapter run (with dropout, whose masks the recomputation must draw
/// again) changes no bit of the trained adapter.
#[test]
fn gradient_checkpointing_changes_no_bit_of_an_adapter_run() {
    let (a, b) = (scratch("lora-gc-a"), scratch("lora-gc-b"));
    let mut ca = settings("qwen3", a.clone());
    ca.adapter = None;
    ca.lora = LoraFlags { r: Some(4), dropout: Some(0.1), targets: Some(LoraTargets::AllLinear), ..Default::default() };
    ca.max_steps = Some(3);
    let cb = TrainConfig { output: b.clone(), gradient_checkpointing: true, ..ca.clone() };
    run(&ca);
    run(&cb);
    assert!(
        adapter_of(&a.join("final"), "qwen3") == adapter_of(&b.join("final"), "qwen3"),
        "checkpointing changed the adapter"
    );
    for d in [a, b] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

/// A new adapter (`lora_r`) trains only the adapter: the base in the run's checkpoints is never written
/// (they hold `adapter/` and the adapter's optimizer state only), the first step's rewards are zero (the
/// reference is the base, and B starts at zero), and `--merge` writes a model equal to base + adapter.
#[test]
fn a_new_adapter_trains_on_a_frozen_base() {
    let out = scratch("lora-new");
    let mut c = settings("llama", out.clone());
    c.adapter = None;
    c.lora = LoraFlags { r: Some(4), targets: Some(LoraTargets::AllLinear), ..Default::default() };
    c.merge = true;
    c.save_every = 3;
    run(&c);
    let m = jsonl(&out.join("metrics.jsonl"));
    let first = m[0]["rewards/margins"].as_f64().unwrap();
    assert!(first.abs() < 1e-6, "a new adapter starts at its reference: margin {first}");
    assert!(m[5]["rewards/margins"].as_f64().unwrap() != 0.0, "the adapter trained");
    let ck = out.join("checkpoints/step-3");
    assert!(ck.join("adapter/adapter_config.json").is_file() && !ck.join("model").exists());
    let opt = hf::SafeTensors::open(&ck.join("optimizer.safetensors")).unwrap();
    assert!(opt.tensors().iter().all(|t| t.name.contains("lora_")), "optimizer state beyond the adapter");
    let base = hf::load_model(&lora("llama", "base")).unwrap();
    let trained = adapter_of(&out.join("final"), "llama");
    let merged = hf::load_model(&out.join("final-merged")).unwrap();
    assert!(merged.params == hf::peft::merged_params(&base.params, &trained, &base.config).unwrap());
    std::fs::remove_dir_all(&out).unwrap();
}

/// A bf16 run's frozen base keeps its embedding for the data's tokens and its head in bf16 (the numbers
/// of the f32 tables: `engine/tests/frozen_embedding.rs`): the run says so, trains, and `--merge` reads the
/// f32 base from disk, so the merged model is still base + adapter (tied GPT-2, untied Llama).
#[test]
fn a_bf16_adapter_run_keeps_the_base_tables_for_its_data() {
    for arch in ["gpt2", "llama"] {
        let out = scratch(&format!("lora-bf16-tables-{arch}"));
        let mut c = settings(arch, out.clone());
        c.adapter = None;
        c.lora = LoraFlags { r: Some(4), targets: Some(LoraTargets::AllLinear), ..Default::default() };
        c.precision = engine::kernels::Precision::Bf16;
        c.merge = true;
        let mut lines = Vec::new();
        train(&c, &RunOptions::default(), &AtomicBool::new(false), &mut |l| lines.push(l.to_string())).unwrap();
        let said = lines.iter().find(|l| l.starts_with("frozen base embedding: head in bf16, lookups of the data's"));
        assert!(said.is_some(), "{arch}: {lines:#?}");
        let m = jsonl(&out.join("metrics.jsonl"));
        assert!(m.iter().all(|r| r["loss"].as_f64().unwrap().is_finite()), "{arch}: {m:?}");
        assert!(m[m.len() - 1]["rewards/margins"].as_f64().unwrap() != 0.0, "{arch}: the adapter trained");
        let base = hf::load_model(&lora(arch, "base")).unwrap();
        let trained = adapter_of(&out.join("final"), arch);
        let merged = hf::load_model(&out.join("final-merged")).unwrap();
        assert!(merged.params == hf::peft::merged_params(&base.params, &trained, &base.config).unwrap(), "{arch}");
        std::fs::remove_dir_all(&out).unwrap();
    }
}

/// `--precompute-ref` from an adapter gives the run of a reference in memory; the cache key holds the
/// adapter, so a run from another starting adapter on the same base does not read those scores.
#[test]
fn precomputed_reference_of_an_adapter_run() {
    let (a, b, cache) = (scratch("lora-preref-a"), scratch("lora-preref-b"), scratch("lora-preref-cache"));
    let ca = settings("gpt2", a.clone());
    let cb = TrainConfig { output: b.clone(), precompute_ref: true, cache_dir: Some(cache.clone()), ..ca.clone() };
    run(&ca);
    let mut lines = Vec::new();
    train(&cb, &RunOptions::default(), &AtomicBool::new(false), &mut |l| lines.push(l.to_string())).unwrap();
    assert!(lines.iter().any(|l| l.contains("computed and cached")), "{lines:?}");
    let (ma, mb) = (jsonl(&a.join("metrics.jsonl")), jsonl(&b.join("metrics.jsonl")));
    for (x, y) in ma.iter().zip(&mb) {
        for key in ["loss", "rewards/margins", "grad_norm"] {
            let (p, q) = (x[key].as_f64().unwrap(), y[key].as_f64().unwrap());
            assert!((p - q).abs() <= 1e-5 * p.abs().max(1.0), "{key}: {p} vs {q}");
        }
    }
    // A new adapter on the same base: its reference is the base alone, another cache entry.
    let cc = TrainConfig {
        adapter: None,
        lora: LoraFlags { r: Some(2), targets: Some(LoraTargets::AllLinear), ..Default::default() },
        ..cb.clone()
    };
    let mut fresh = Vec::new();
    train(&cc, &RunOptions { resume: None, overwrite: true }, &AtomicBool::new(false), &mut |l| {
        fresh.push(l.to_string())
    })
    .unwrap();
    assert!(fresh.iter().any(|l| l.contains("computed and cached")), "{fresh:?}");
    for d in [a, b, cache] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

/// An adapter run interrupted after a checkpoint and resumed ends bit-identical to an uninterrupted one.
#[test]
fn an_adapter_run_resumes_exactly() {
    let (a, b) = (scratch("lora-resume-a"), scratch("lora-resume-b"));
    let mut ca = settings("qwen3", a.clone());
    ca.no_shuffle = false;
    ca.batch_size = 3;
    ca.grad_accum = 2;
    ca.save_every = 2;
    run(&ca);
    let cb = TrainConfig { output: b.clone(), log_every: 1, ..ca.clone() };
    let stop = AtomicBool::new(false);
    let first = train(&cb, &RunOptions::default(), &stop, &mut |line| {
        if line.starts_with("step 3/") {
            stop.store(true, Ordering::SeqCst);
        }
    })
    .unwrap();
    assert!(first.interrupted && first.steps == 3, "{first:?}");
    let resume = RunOptions { resume: Some(b.clone()), overwrite: false };
    assert_eq!(train(&cb, &resume, &AtomicBool::new(false), &mut |_| {}).unwrap().steps, 6);
    assert!(adapter_of(&a.join("final"), "qwen3") == adapter_of(&b.join("final"), "qwen3"), "resumed adapter differs");
    let (ma, mb) = (jsonl(&a.join("metrics.jsonl")), jsonl(&b.join("metrics.jsonl")));
    assert_eq!(ma.len(), mb.len());
    for (x, y) in ma.iter().zip(&mb) {
        assert_eq!(x["loss"], y["loss"]);
    }
    for d in [a, b] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

/// A `lora_*` setting that contradicts the adapter's own is refused before anything is written.
#[test]
fn a_conflicting_lora_setting_is_refused() {
    let out = scratch("lora-conflict");
    let mut c = settings("llama", out.clone());
    c.lora.r = Some(16);
    let e = train(&c, &RunOptions::default(), &AtomicBool::new(false), &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("lora_r") && e.contains("differs from the adapter's 4"), "{e}");
    assert!(!out.exists(), "a refused run wrote {}", out.display());
}
