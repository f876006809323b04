//! LoRA through the real binary: `dpo train --lora-r` writes a PEFT adapter (and with `--merge` a merged
//! model equal to `dpo merge`'s), `--adapter` on `logps`/`eval`/`reward`/`generate` reads it as it is,
//! conflicting `--lora-*` flags are refused, and an adapter run killed at random moments leaves
//! checkpoints that load and resumes bit-identically.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn lora_train(run: &Path, steps: u64, save_every: u64) -> Command {
    let mut c = train(&model("gpt2-policy"), &prefs(), run);
    c.args(["--lora-r", "4", "--lora-alpha", "8", "--lora-targets", "c_attn,c_fc,mlp.c_proj", "--batch-size", "4"])
        .args(["--max-steps", &steps.to_string(), "--save-every", &save_every.to_string()]);
    c
}

fn adapter_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("adapter_model.safetensors")).unwrap()
}

/// `dpo logps` output as (chosen, rejected) per row.
fn logps(args: &[&std::ffi::OsStr]) -> Vec<(f64, f64)> {
    let out = dpo().arg("logps").args(args).arg("--data").arg(prefs()).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["chosen_logps"].as_f64().unwrap(), v["rejected_logps"].as_f64().unwrap())
        })
        .collect()
}

/// The dtypes a model directory's weights are stored in.
fn stored_dtypes(dir: &Path) -> Vec<hf::Dtype> {
    let st = hf::SafeTensors::open(&dir.join("model.safetensors")).unwrap();
    let mut dtypes: Vec<hf::Dtype> = st.tensors().iter().map(|t| t.dtype).collect();
    dtypes.dedup();
    dtypes
}

#[test]
fn a_merged_model_is_written_in_its_bases_dtype_unless_told() {
    let dir = scratch("lora-merge-dtype");
    let run = dir.join("run");
    succeeds(&mut lora_train(&run, 1, 1));
    let fin = run.join("final");
    let merge = |base: &Path, out: &str, dtype: Option<&str>| {
        let mut c = dpo();
        c.arg("merge").arg("--model").arg(base).arg("--adapter").arg(&fin).arg("--output").arg(dir.join(out));
        if let Some(dtype) = dtype {
            c.args(["--dtype", dtype]);
        }
        let said = succeeds(&mut c);
        (dir.join(out), said)
    };
    use hf::Dtype::{BF16, F16, F32};
    // The f32 fixture merges to f32; asked, to bf16.
    let (f32_merged, said) = merge(&model("gpt2-policy"), "f32", None);
    assert!(stored_dtypes(&f32_merged) == [F32] && said.contains("in f32"), "{said}");
    let (bf16_base, _) = merge(&model("gpt2-policy"), "bf16", Some("bf16"));
    assert_eq!(stored_dtypes(&bf16_base), [BF16]);
    // A model made from the bf16 one is bf16 unless told otherwise, as PEFT keeps a base's dtype.
    let (again, said) = merge(&bf16_base, "again", None);
    assert!(stored_dtypes(&again) == [BF16] && said.contains("in bf16"), "{said}");
    assert_eq!(stored_dtypes(&merge(&bf16_base, "f16", Some("f16")).0), [F16]);
    assert_eq!(stored_dtypes(&merge(&bf16_base, "wide", Some("f32")).0), [F32]);

    // `dpo train --merge` likewise: the base's dtype, or --merge-dtype's.
    let lora = ["--lora-r", "4", "--max-steps", "1", "--merge"];
    let on_bf16 = dir.join("on-bf16");
    let said = succeeds(train(&bf16_base, &prefs(), &on_bf16).args(lora));
    assert!(said.contains("final-merged (bf16)"), "{said}");
    assert_eq!(stored_dtypes(&on_bf16.join("final-merged")), [BF16]);
    let to_f16 = dir.join("to-f16");
    succeeds(train(&bf16_base, &prefs(), &to_f16).args(lora).args(["--merge-dtype", "f16"]));
    assert_eq!(stored_dtypes(&to_f16.join("final-merged")), [F16]);
    let config = std::fs::read_to_string(to_f16.join("config.toml")).unwrap();
    assert!(config.contains("merge_dtype = \"f16\""), "{config}");
    // A resume may add the merge, and change its dtype: neither changes the run's steps.
    let resume = |steps: &str, flags: &[&str]| {
        succeeds(dpo().args(["train", "--resume"]).arg(&run).args(["--max-steps", steps]).args(flags));
    };
    resume("2", &["--merge", "--merge-dtype", "bf16"]);
    assert_eq!(stored_dtypes(&run.join("final-merged")), [BF16]);
    resume("3", &["--merge-dtype", "f16"]);
    assert_eq!(stored_dtypes(&run.join("final-merged")), [F16]);
    // Without --merge it has nothing to apply to.
    let no = dir.join("no");
    fails(
        train(&bf16_base, &prefs(), &no).args(["--lora-r", "4", "--merge-dtype", "f16"]),
        &["merge_dtype", "applies with merge"],
    );
    assert!(!no.exists());
}

#[test]
fn an_adapter_run_writes_peft_and_merged_outputs_that_the_commands_read() {
    let dir = scratch("lora-e2e");
    let run = dir.join("run");
    let err = succeeds(lora_train(&run, 4, 2).arg("--merge"));
    assert!(err.contains("merged model written to"), "{err}");
    let fin = run.join("final");
    assert!(fin.join("adapter_config.json").is_file() && !fin.join("model.safetensors").exists());
    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(config.contains("lora_r = 4") && config.contains("merge = true"), "{config}");

    // dpo merge writes what --merge wrote.
    let merged = dir.join("merged");
    succeeds(
        dpo()
            .arg("merge")
            .arg("--model")
            .arg(model("gpt2-policy"))
            .arg("--adapter")
            .arg(&fin)
            .arg("--output")
            .arg(&merged),
    );
    let weights = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert!(weights(&merged) == weights(&run.join("final-merged")), "dpo merge and --merge differ");

    // The adapter read as it is scores as the merged model does (merging rounds once per weight).
    let m = model("gpt2-policy");
    let unmerged = logps(&["--model".as_ref(), m.as_os_str(), "--adapter".as_ref(), run.as_os_str()]);
    let by_merge = logps(&["--model".as_ref(), merged.as_os_str()]);
    let base = logps(&["--model".as_ref(), m.as_os_str()]);
    let worst =
        unmerged.iter().zip(&by_merge).map(|(a, b)| (a.0 - b.0).abs().max((a.1 - b.1).abs())).fold(0.0, f64::max);
    assert!(worst < 1e-3, "adapter and merged log-probs differ by {worst}");
    assert!(unmerged.iter().zip(&base).any(|(a, b)| (a.0 - b.0).abs() > 1e-3), "the adapter changed nothing");

    // eval and reward default the reference to the base with the adapter off; generate reads the adapter.
    let out = dpo()
        .arg("eval")
        .arg("--model")
        .arg(&m)
        .arg("--adapter")
        .arg(&fin)
        .arg("--data")
        .arg(prefs())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let ev: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(ev["rewards/margins"].as_f64().unwrap() != 0.0, "{ev}");
    succeeds(dpo().arg("reward").arg("--model").arg(&m).arg("--adapter").arg(&fin).arg("--data").arg(prefs()));
    // --ref-adapter: the reference is --model with that adapter; the same adapter on both sides rewards nothing.
    let out = dpo()
        .arg("reward")
        .arg("--model")
        .arg(&m)
        .arg("--adapter")
        .arg(&fin)
        .arg("--ref-adapter")
        .arg(&fin)
        .arg("--data")
        .arg(prefs())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["margin"].as_f64(), Some(0.0), "{line}");
    }
    let g = |extra: &[&std::ffi::OsStr]| {
        let out = dpo()
            .args(["generate", "--prompt", "hello", "--temperature", "0", "--max-new-tokens", "6", "--model"])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        out.stdout
    };
    assert_eq!(g(&[m.as_os_str(), "--adapter".as_ref(), fin.as_os_str()]), g(&[merged.as_os_str()]));
}

/// A checkpoint stored in bf16 is sampled from in bf16 (block linears, embedding and head as the file
/// holds them, half the memory of f32): `dpo generate` gives its f32 copy's completions, greedy and
/// sampled, alone and with an adapter beside it (on the f32 copy with `--base-dtype f32`: beside f32
/// linears); `win-rate --against` the same directory is the base with the adapter off.
#[test]
fn a_bf16_checkpoint_samples_as_its_f32_copy() {
    let dir = scratch("lora-bf16-sampling");
    let run = dir.join("run");
    succeeds(&mut lora_train(&run, 1, 1));
    let fin = run.join("final");
    let bf16 = dir.join("bf16");
    let mut merge = dpo();
    merge.arg("merge").arg("--model").arg(model("gpt2-policy")).arg("--adapter").arg(&fin).arg("--output");
    succeeds(merge.arg(&bf16).args(["--dtype", "bf16"]));
    let f32_copy = dir.join("f32");
    let m = hf::load_model(&bf16).unwrap();
    hf::save_model(&f32_copy, &m.config, &m.params, Some(&bf16)).unwrap();
    assert!(stored_dtypes(&bf16) == [hf::Dtype::BF16] && stored_dtypes(&f32_copy) == [hf::Dtype::F32]);
    let generate = |model: &Path, extra: &[&str]| -> String {
        let mut c = dpo();
        c.arg("generate").arg("--model").arg(model).args(["--prompt", "hello", "--n", "3", "--seed", "4"]);
        let out = c.args(["--max-new-tokens", "8"]).args(extra).output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    let adapter = ["--adapter", fin.to_str().unwrap()];
    for temperature in ["0", "1"] {
        let t = ["--temperature", temperature];
        let plain = generate(&bf16, &t);
        assert_eq!(plain, generate(&f32_copy, &t), "temperature {temperature}");
        let with = generate(&bf16, &[&t[..], &adapter].concat());
        assert_eq!(with, generate(&f32_copy, &[&t[..], &adapter, &["--base-dtype", "f32"]].concat()));
        assert!(temperature == "0" || with != plain, "the adapter changed no completion");
    }
    // The base with the adapter off, held once: against itself without an adapter, every prompt ties.
    let prompts = jsonl(&dir.join("prompts.jsonl"), &[serde_json::json!({"prompt": "hello"})]);
    let win_rate = |extra: &[&str]| -> serde_json::Value {
        let mut c = dpo();
        c.arg("win-rate").arg("--model").arg(&bf16).arg("--against").arg(&bf16).arg("--prompts").arg(&prompts);
        c.arg("--chart").arg(dir.join("win_rate.png"));
        let judge = ["--judge-implicit", &format!("{},{}", bf16.display(), bf16.display())];
        let out = c.args(judge).args(["--temperatures", "0", "--max-new-tokens", "6"]).args(extra).output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_str(String::from_utf8(out.stdout).unwrap().lines().last().unwrap()).unwrap()
    };
    let alone = win_rate(&[]);
    assert_eq!(alone["ties"], alone["n"], "{alone}");
    assert!(win_rate(&adapter)["n"] == alone["n"]);
}

/// `dpo sft --lora-r` trains an adapter (the SFT-then-DPO pipeline's first half), and the end-of-run
/// message names the base and the adapter.
#[test]
fn sft_trains_an_adapter() {
    let dir = scratch("lora-sft");
    let run = dir.join("run");
    let sft = ["sft", "--lr", "1e-2", "--lora-r", "8", "--lora-targets", "all-linear", "--max-steps", "8"];
    let err = succeeds(&mut on_fixture(&sft, &run));
    assert!(err.contains("adapter (PEFT) written to") && err.contains("--adapter"), "{err}");
    let losses: Vec<f64> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect();
    assert!(losses[7] < 0.9 * losses[0], "SFT loss of the adapter did not fall: {losses:?}");
    assert!(run.join("final/adapter_model.safetensors").is_file());
}

/// A memory limit that refuses training every weight accepts the same run with an adapter: the estimate
/// counts no gradient, optimizer state or copy of the frozen base.
#[test]
fn a_run_refused_for_full_training_fits_with_an_adapter() {
    let dir = scratch("lora-memory");
    let estimate = |extra: &[&str], run: &str| {
        let mut c = train(&model("gpt2-policy"), &prefs(), &dir.join(run));
        c.args(["--max-steps", "1", "--batch-size", "1", "--max-memory", "1K"]).args(extra);
        let msg = fails(&mut c, &["the run needs an estimated"]);
        let at = msg.find("an estimated ").unwrap() + 13;
        let mib: f64 = msg[at..].split(' ').next().unwrap().parse().unwrap();
        assert!(msg[at..].split(' ').nth(1) == Some("MiB"), "{msg}");
        mib
    };
    let (full, lora) = (estimate(&[], "full"), estimate(&["--lora-r", "4"], "lora"));
    assert!(lora < full - 0.2, "full {full} MiB, LoRA {lora} MiB");
    let limit = format!("{:.1}M", (full + lora) / 2.0);
    let mut c = train(&model("gpt2-policy"), &prefs(), &dir.join("full"));
    c.args(["--max-steps", "1", "--batch-size", "1", "--max-memory", &limit]);
    fails(&mut c, &["the run needs an estimated", "--lora-r 16"]);
    let mut c = train(&model("gpt2-policy"), &prefs(), &dir.join("lora"));
    c.args(["--max-steps", "1", "--batch-size", "1", "--lora-r", "4", "--max-memory", &limit]);
    succeeds(&mut c);
}

#[test]
fn lora_flags_that_contradict_the_adapter_are_refused() {
    let dir = scratch("lora-conflict");
    let run = dir.join("run");
    succeeds(&mut lora_train(&run, 1, 0));
    let mut c = train(&model("gpt2-policy"), &prefs(), &dir.join("again"));
    c.arg("--adapter").arg(run.join("final")).args(["--lora-r", "8", "--max-steps", "1"]);
    fails(&mut c, &["lora_r", "8 differs from the adapter's 4"]);
    let mut c = train(&model("gpt2-policy"), &prefs(), &dir.join("alpha"));
    c.args(["--lora-alpha", "8", "--max-steps", "1"]);
    fails(&mut c, &["lora_alpha", "give lora_r"]);
    let mut c = train(&model("gpt2-policy"), &prefs(), &dir.join("targets"));
    c.args(["--lora-r", "2", "--lora-targets", "no_such_proj", "--max-steps", "1"]);
    fails(&mut c, &["no_such_proj"]);
    assert!(!dir.join("again").exists() && !dir.join("alpha").exists() && !dir.join("targets").exists());
    // A stored (quantised) base is a frozen one: only an adapter trains on it.
    fails(dpo().args(["bench", "--quantize", "nf4"]), &["--quantize", "need --lora-r"]);
}

/// SIGKILL at seeded random moments of an adapter run: every checkpoint left loads (a PEFT adapter, the
/// optimizer state, the position), and resuming ends with the adapter of an uninterrupted run, bit for bit.
#[test]
fn an_adapter_run_killed_at_random_moments_resumes_exactly() {
    let dir = scratch("lora-sigkill");
    let steps = 12;
    let whole = dir.join("whole");
    let t0 = Instant::now();
    succeeds(&mut lora_train(&whole, steps, 1));
    let span = (t0.elapsed().as_millis() as u64 * 5 / 4).max(20);
    let want = adapter_bytes(&whole.join("final"));
    let check = |run: &Path| {
        for (step, ck) in checkpoints(run) {
            let base = hf::load_config(&model("gpt2-policy")).unwrap();
            let adapter = hf::peft::load_adapter(&ck.join("adapter"), &base);
            assert!(adapter.is_ok(), "{}: {}", ck.display(), adapter.unwrap_err());
            assert!(hf::SafeTensors::open(&ck.join("optimizer.safetensors")).is_ok(), "{}", ck.display());
            let state: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(ck.join("trainer_state.json")).unwrap()).unwrap();
            assert_eq!(state["state"]["step"].as_u64(), Some(step));
        }
    };
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut kills = 0;
    for chain in 0..3 {
        let run = dir.join(format!("run-{chain}"));
        for _ in 0..3 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut cmd = if checkpoints(&run).is_empty() {
                let mut c = lora_train(&run, steps, 1);
                c.arg("--overwrite");
                c
            } else {
                let mut c = dpo();
                c.args(["train", "--resume"]).arg(&run);
                c
            };
            let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
            std::thread::sleep(Duration::from_millis(seed % span));
            if child.try_wait().unwrap().is_none() {
                child.kill().unwrap();
                kills += 1;
            }
            child.wait().unwrap();
            check(&run);
        }
        if checkpoints(&run).is_empty() {
            succeeds(lora_train(&run, steps, 1).arg("--overwrite"));
        } else {
            succeeds(dpo().args(["train", "--resume"]).arg(&run));
        }
        assert!(
            adapter_bytes(&run.join("final")) == want,
            "chain {chain}: the adapter differs from the uninterrupted run"
        );
        check(&run);
    }
    println!("SIGKILL of adapter runs: {kills} kills, every resumed run bit-identical (kill times 0..{span} ms)");
}
