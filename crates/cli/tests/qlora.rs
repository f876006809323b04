//! QLoRA through the real binary: `dpo train --lora-r 4 --quantize nf4` (and `--base-dtype bf16`) on a
//! tiny Llama trains an adapter on a stored base, records the setting in config.toml, writes a PEFT
//! final/, resumes bit-identically, and scores its first step as the f32 base holding the same
//! (dequantised) weights does; a stored base without an adapter is refused.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use engine::quant::Storage;

fn base() -> PathBuf {
    fixtures().join("../more/lora/llama/base")
}

fn lora_train(model: &Path, run: &Path, storage: &[&str]) -> Command {
    let mut c = train(model, &prefs(), run);
    c.args(["--lora-r", "4", "--lora-targets", "all-linear", "--batch-size", "4", "--max-steps", "4"])
        .args(["--save-every", "2"])
        .args(storage);
    c
}

fn adapter_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("adapter_model.safetensors")).unwrap()
}

/// `(logps/chosen, logps/rejected)` of a run's first logged step.
fn first_logps(run: &Path) -> (f64, f64) {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["step"].as_u64(), Some(1), "{first}");
    (first["logps/chosen"].as_f64().unwrap(), first["logps/rejected"].as_f64().unwrap())
}

/// The fixture base with its block linears as `storage` holds them, widened back to f32 and saved.
fn widened_base(storage: Storage, out: &Path) -> PathBuf {
    let (mut model, frozen) = hf::load_model_stored(&base(), storage).unwrap();
    frozen.restore_into(&mut model.params);
    hf::save_model(out, &model.config, &model.params, Some(&base())).unwrap();
    out.to_path_buf()
}

fn trains_resumes_and_scores_as_its_widened_base(name: &str, storage: Storage, flags: &[&str], key: &str) {
    let dir = scratch(name);
    let run = dir.join("run");
    succeeds(lora_train(&base(), &run, flags).arg("--merge"));
    let fin = run.join("final");
    assert!(fin.join("adapter_config.json").is_file() && !fin.join("model.safetensors").exists());
    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(config.contains(key), "{config}");
    let want = adapter_bytes(&fin);
    let at_step_2 = checkpoints(&run).into_iter().find(|(s, _)| *s == 2).unwrap().1;
    assert!(adapter_bytes(&at_step_2.join("adapter")) != want, "steps 3 and 4 changed nothing");

    // Resume from the step-2 checkpoint: the same final adapter, bit for bit.
    std::fs::remove_dir_all(&fin).unwrap();
    let newest = checkpoints(&run).pop().unwrap();
    assert_eq!(newest.0, 4);
    std::fs::remove_dir_all(&newest.1).unwrap();
    succeeds(dpo().args(["train", "--resume"]).arg(&run));
    assert!(adapter_bytes(&fin) == want, "the resumed adapter differs");

    // --merge merged into the f32 base read from disk: what `dpo merge` writes from the f32 --model.
    let merged = dir.join("merged");
    succeeds(dpo().arg("merge").arg("--model").arg(base()).arg("--adapter").arg(&fin).arg("--output").arg(&merged));
    let weights = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert!(weights(&merged) == weights(&run.join("final-merged")), "--merge differs from dpo merge on f32");

    // Step 1 (B = 0: the base's own log-probs) equals an f32 run on the widened weights.
    let widened = widened_base(storage, &dir.join("widened"));
    let f32_run = dir.join("f32");
    succeeds(&mut lora_train(&widened, &f32_run, &[]));
    let (stored, f32) = (first_logps(&run), first_logps(&f32_run));
    for (a, b) in [(stored.0, f32.0), (stored.1, f32.1)] {
        assert!((a - b).abs() <= 1e-5 * b.abs(), "first-step log-probs {a} (stored) vs {b} (widened f32)");
    }
    // `dpo logps --adapter` with the run's storage flags scores the trained adapter as on the widened base.
    let logps = |model: &Path, extra: &[&str]| -> Vec<f64> {
        let mut c = dpo();
        c.arg("logps").arg("--model").arg(model).arg("--adapter").arg(&fin).arg("--data").arg(prefs()).args(extra);
        let out = c.output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let rows = String::from_utf8(out.stdout).unwrap();
        rows.lines()
            .flat_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                [v["chosen_logps"].as_f64().unwrap(), v["rejected_logps"].as_f64().unwrap()]
            })
            .collect()
    };
    let (on_stored, on_widened) = (logps(&base(), flags), logps(&widened, &[]));
    assert_eq!(on_stored.len(), on_widened.len());
    for (a, b) in on_stored.iter().zip(&on_widened) {
        assert!((a - b).abs() <= 1e-5 * b.abs(), "dpo logps {a} (stored) vs {b} (widened f32)");
    }
    // `dpo generate --adapter` with the run's storage flags decodes on the stored base, the adapter beside
    // it: greedy completions are those of the widened weights held as stored f32 (`--base-dtype f32`).
    let generate = |model: &Path, extra: &[&str]| -> String {
        let mut c = dpo();
        c.arg("generate").arg("--model").arg(model).arg("--adapter").arg(&fin).args(extra);
        c.args(["--prompt", "The quick brown fox", "--temperature", "0", "--max-new-tokens", "12"]);
        let out = c.output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    let (on_stored, on_widened) = (generate(&base(), flags), generate(&widened, &["--base-dtype", "f32"]));
    assert!(on_stored.contains("\"tokens\":12") || on_stored.contains("\"finished\":true"), "{on_stored}");
    assert_eq!(on_stored, on_widened, "greedy completions on the stored and the widened base");
    // `dpo win-rate` samples A so too: greedy, the same completions and so the same judged rates; against
    // --model itself, B is the same base with the adapter off (the run's reference), held once.
    let win_rate = |model: &Path, extra: &[&str], against: Option<&Path>, chart: &str| -> String {
        let mut c = dpo();
        c.arg("win-rate").arg("--model").arg(model).arg("--adapter").arg(&fin).args(extra);
        match against {
            Some(b) => c.arg("--against").arg(b).arg("--prompts").arg(prefs()),
            None => c.arg("--against-data").arg(prefs()),
        };
        let judge = format!("{},{}", widened.display(), base().display());
        c.args(["--judge-implicit", &judge, "--temperatures", "0", "--max-new-tokens", "6"]);
        let out = c.arg("--chart").arg(dir.join(chart)).output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    for (against_stored, against_widened) in [(None, None), (Some(base()), Some(widened.clone()))] {
        let on_stored = win_rate(&base(), flags, against_stored.as_deref(), "stored.png");
        let on_widened = win_rate(&widened, &["--base-dtype", "f32"], against_widened.as_deref(), "widened.png");
        // B is not A: the adapter is off (or B is the data's chosen completions), so not every prompt ties.
        let line: serde_json::Value = serde_json::from_str(on_stored.trim()).unwrap();
        assert!(line["ties"].as_u64().unwrap() < line["n"].as_u64().unwrap(), "{on_stored}");
        assert_eq!(on_stored, on_widened, "win rates on the stored and the widened base");
    }
    // The stored base really is not the f32 one.
    let plain = dir.join("plain");
    succeeds(&mut lora_train(&base(), &plain, &[]));
    assert!(first_logps(&plain) != stored, "storing the base changed no log-prob");
}

#[test]
fn a_qlora_nf4_run_trains_resumes_and_scores_as_its_dequantised_base() {
    let nf4 = Storage::Nf4 { double_quant: false };
    trains_resumes_and_scores_as_its_widened_base("qlora-nf4", nf4, &["--quantize", "nf4"], "quantize = \"nf4\"");
}

#[test]
fn a_double_quant_nf4_run_trains_resumes_and_scores_as_its_dequantised_base() {
    let dq = Storage::Nf4 { double_quant: true };
    let flags = ["--quantize", "nf4", "--double-quant"];
    trains_resumes_and_scores_as_its_widened_base("qlora-nf4-dq", dq, &flags, "double_quant = true");
}

#[test]
fn a_bf16_base_run_trains_resumes_and_scores_as_its_widened_base() {
    let flags = ["--base-dtype", "bf16"];
    trains_resumes_and_scores_as_its_widened_base("qlora-bf16", Storage::Bf16, &flags, "base_dtype = \"bf16\"");
}

/// A bf16 LoRA run's products round the base's weights to bf16 however it stores them: with
/// `--base-dtype f32` (linears in f32, the embedding and head frozen as they are read) it trains the
/// adapter of the default bf16 storage, bit for bit.
#[test]
fn a_bf16_run_trains_the_same_adapter_on_an_f32_or_bf16_base() {
    let dir = scratch("qlora-bf16-f32-base");
    let (f32_base, bf16_base) = (dir.join("f32"), dir.join("bf16"));
    succeeds(&mut lora_train(&base(), &f32_base, &["--precision", "bf16", "--base-dtype", "f32"]));
    succeeds(&mut lora_train(&base(), &bf16_base, &["--precision", "bf16"]));
    assert!(adapter_bytes(&f32_base.join("final")) == adapter_bytes(&bf16_base.join("final")));
    let plain = dir.join("f32-run");
    succeeds(&mut lora_train(&base(), &plain, &[]));
    assert!(adapter_bytes(&plain.join("final")) != adapter_bytes(&f32_base.join("final")), "bf16 changed nothing");
}

#[test]
fn a_stored_base_without_an_adapter_is_refused() {
    let run = scratch("qlora-refused").join("run");
    fails(train(&base(), &prefs(), &run).args(["--quantize", "nf4"]), &["quantize", "LoRA run", "lora_r"]);
    fails(train(&base(), &prefs(), &run).args(["--base-dtype", "bf16"]), &["base_dtype", "LoRA run"]);
    let mut sft = dpo();
    sft.args(["sft", "--quantize", "nf4", "--model"]).arg(base()).arg("--data").arg(prefs()).arg("--output").arg(&run);
    fails(&mut sft, &["quantize", "LoRA run"]);
    // The two storages exclude each other, and double quantisation is NF4's (clap's usage errors).
    let usage = |args: &[&str], want: &str| {
        let out = train(&base(), &prefs(), &run).args(args).output().unwrap();
        let err = stderr(&out);
        assert!(!out.status.success() && err.contains(want) && !err.contains("panicked"), "{err}");
    };
    usage(&["--lora-r", "4", "--quantize", "nf4", "--base-dtype", "bf16"], "cannot be used with");
    usage(&["--lora-r", "4", "--double-quant"], "--quantize");
}

/// In bf16, `dpo logps`, `reward` and `eval --adapter` hold the base as `dpo train` does (block linears
/// in bf16, the embedding's rows of the data's tokens, the head in bf16), which reads as the f32 model:
/// a reward's log-probs are exactly `dpo logps`' with the adapter and the plain f32 base's (its reference,
/// the adapter off), and `eval` averages the same log-probs; with `--base-dtype f32` the same.
#[test]
fn bf16_scoring_under_an_adapter_reads_the_base_as_the_f32_model() {
    let dir = scratch("bf16-adapter-scoring");
    let run = dir.join("run");
    succeeds(&mut lora_train(&base(), &run, &["--precision", "bf16"]));
    let fin = run.join("final");
    let lines = |c: &mut Command| -> Vec<serde_json::Value> {
        let out = c.output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let scored_with = |command: &str, adapter: bool, flags: &[&str]| -> Vec<serde_json::Value> {
        let mut c = dpo();
        c.arg(command).arg("--model").arg(base()).arg("--data").arg(prefs()).args(["--precision", "bf16"]);
        if adapter {
            c.arg("--adapter").arg(&fin).args(flags);
        }
        lines(&mut c)
    };
    let scored = |command: &str, adapter: bool| scored_with(command, adapter, &[]);
    let (policy, plain, rewards) = (scored("logps", true), scored("logps", false), scored("reward", true));
    // Block linears kept in f32 (the tables frozen as read): the products round them as they round bf16.
    assert_eq!(scored_with("logps", true, &["--base-dtype", "f32"]), policy, "--base-dtype f32");
    assert_eq!((policy.len(), rewards.len()), (plain.len(), plain.len()));
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap();
    for ((p, b), r) in policy.iter().zip(&plain).zip(&rewards) {
        for side in ["chosen", "rejected"] {
            let (logps, ref_logps) = (format!("{side}_logps"), format!("ref_{side}_logps"));
            assert_eq!((f(r, &logps), f(r, &ref_logps)), (f(p, &logps), f(b, &logps)), "{r}");
        }
    }
    assert!(policy.iter().zip(&plain).any(|(p, b)| f(p, "chosen_logps") != f(b, "chosen_logps")), "no training");
    let eval = scored("eval", true).remove(0);
    let mean = policy.iter().map(|p| f(p, "chosen_logps")).sum::<f64>() / policy.len() as f64;
    assert!((f(&eval, "logps/chosen") - mean).abs() <= 1e-6 * mean.abs(), "{eval} against {mean}");
}

/// A random NF4 base (`dpo bench --quantize nf4`) is drawn tensor by tensor, each f32 tensor freed once
/// stored: the run holds the stored bytes, within its own estimate. Dead f32 tensors kept for reuse by the
/// page pool (which starts at the first backward pass) held the whole f32 model (SmolLM2-1.7B: 6.6 GB
/// against a 1.7 GB estimate).
#[test]
fn a_stored_random_base_is_held_as_stored() {
    let out = dpo()
        .args(["bench", "--arch", "llama", "--lora-r", "4", "--quantize", "nf4", "--gradient-checkpointing"])
        .args(["--pairs", "1", "--prompt", "8", "--completion", "8", "--steps", "2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let line = String::from_utf8(out.stdout).unwrap();
    let v: serde_json::Value = serde_json::from_str(line.lines().last().unwrap()).unwrap();
    let (peak, estimate) = (v["peak_rss_mb"].as_f64().unwrap(), v["estimated_peak_mb"].as_f64().unwrap());
    assert!(peak <= 1.1 * estimate, "peak {peak} MB against an estimate of {estimate} MB: {v}");
}

/// The LoRA fixture's Llama with a vocabulary of `vocab` tokens (rows of 64 values) and random weights,
/// written in f32.
fn large_vocab_llama(dir: &Path, vocab: usize) -> PathBuf {
    let m = copy_model("../../more/lora/llama/base", dir);
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(m.join("config.json")).unwrap()).unwrap();
    cfg["vocab_size"] = serde_json::json!(vocab);
    write_random_model(&m, cfg, 0.2);
    m
}

/// A bf16 LoRA run reads its base's embedding and head a block of the file at a time: the rows of the
/// data's tokens and the bf16 head are kept as the blocks pass, so neither f32 table is ever held whole.
/// Between vocabularies of 131072 and 524288 tokens (rows of 64 values) the peak grows by the bf16
/// head's 2 bytes a value, not an f32 table's 4 (reading a table whole, as before, grew it by 4), and
/// stays within the run's estimate; `--merge` holds no whole f32 model.
#[test]
fn a_bf16_lora_base_never_holds_a_whole_f32_table() {
    let dir = scratch("qlora-large-vocab");
    let vocabs = [131_072usize, 524_288];
    let models = vocabs.map(|v| large_vocab_llama(&dir.join(format!("vocab{v}")), v));
    let mib = |bytes: usize| bytes as f64 / 1048576.0;
    // The run's measured peak, within its estimate.
    let peak_of = |m: &Path, flags: &[&str]| -> f64 {
        let run = dir.join("run");
        let _ = std::fs::remove_dir_all(&run);
        let err = succeeds(
            train(m, &prefs(), &run)
                .args(["--lora-r", "4", "--batch-size", "2", "--max-steps", "1", "--max-length", "64"])
                .args(flags),
        );
        let size = |after: &str| -> f64 {
            let at = err.find(after).unwrap_or_else(|| panic!("no {after:?} in:\n{err}")) + after.len();
            let mut words = err[at..].split_whitespace();
            let (n, unit) = (words.next().unwrap().parse::<f64>().unwrap(), words.next().unwrap());
            n * match unit.trim_end_matches([';', ')', ',']) {
                "KiB" => 1.0 / 1024.0,
                "MiB" => 1.0,
                "GiB" => 1024.0,
                u => panic!("unit {u}"),
            }
        };
        let (estimate, peak) = (size("estimated peak "), size("peak memory (resident): "));
        println!("{flags:?} on {}: peak {peak:.1} MiB, estimate {estimate:.1} MiB", m.display());
        assert!(peak <= 1.1 * estimate, "{flags:?}: peak {peak:.1} MiB against an estimate of {estimate:.1}:\n{err}");
        peak
    };
    // --merge reads the f32 base from its file a tensor at a time as it writes the merged model: the
    // run holds one f32 table (128 MiB), not the f32 model (257 MiB) nor it and its merged copy.
    let merged = peak_of(&models[1], &["--precision", "bf16", "--quantize", "nf4", "--merge"]);
    let f32_model = mib(std::fs::metadata(models[1].join("model.safetensors")).unwrap().len() as usize);
    assert!(merged < f32_model, "--merge peaked at {merged:.1} MiB, the f32 model is {f32_model:.1} MiB");
    for flags in [&["--precision", "bf16"][..], &["--precision", "bf16", "--quantize", "nf4"]] {
        let peaks = models.clone().map(|m| peak_of(&m, flags));
        let values = (vocabs[1] - vocabs[0]) * 64;
        let (grew, bf16, f32) = (peaks[1] - peaks[0], mib(2 * values), mib(4 * values));
        assert!(grew < (bf16 + f32) / 2.0, "{flags:?}: the peak grew {grew:.1} MiB: bf16 head {bf16:.1}, f32 {f32:.1}");
    }
}
