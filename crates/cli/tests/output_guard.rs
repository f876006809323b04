//! No command writes over its own inputs, and a model or file already at an output is replaced only with
//! `--overwrite` (`hf::output`, the one guard): `dpo merge --output`, `dpo export --gguf`, and the run
//! directories of `dpo train` (`--merge`), `dpo reward-model train` and `dpo ppo`. Every refusal leaves the
//! inputs byte for byte as they were.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// The PEFT fixture: a tiny Llama base with a tokenizer, and an adapter trained on it.
fn lora_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/more/lora/llama")
}

fn copy_dir(from: &Path, to: &Path) -> PathBuf {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    to.to_path_buf()
}

/// Every file under `dir` (relative path -> bytes), but a run's `.lock` (taken and dropped by a refused
/// run, never part of its content).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else if p.file_name().is_some_and(|n| n != ".lock") {
                out.insert(p.strip_prefix(root).unwrap().to_path_buf(), std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// A base model and an adapter on it, copied into `dir`.
fn base_and_adapter(dir: &Path) -> (PathBuf, PathBuf) {
    let base = copy_dir(&lora_fixture().join("base"), &dir.join("base"));
    let adapter = copy_dir(&lora_fixture().join("trained_adapter"), &dir.join("adapter"));
    (base, adapter)
}

fn merge(base: &Path, adapter: &Path, output: &Path) -> Command {
    let mut c = dpo();
    c.arg("merge").arg("--model").arg(base).arg("--adapter").arg(adapter).arg("--output").arg(output);
    c
}

fn export(model: &Path, gguf: &Path) -> Command {
    let mut c = dpo();
    c.args(["export", "--dtype", "f32", "--model"]).arg(model).arg("--gguf").arg(gguf);
    c
}

#[test]
fn merge_never_writes_into_or_over_its_inputs() {
    let dir = scratch("guard-merge-inputs");
    let (base, adapter) = base_and_adapter(&dir);
    let before = (snapshot(&base), snapshot(&adapter));
    // QA's case: the base as its own output, with --overwrite too.
    fails(&mut merge(&base, &adapter, &base), &["the output is the --model", "choose another --output"]);
    fails(merge(&base, &adapter, &base).arg("--overwrite"), &["the output is the --model"]);
    // The same directory spelled another way.
    fails(&mut merge(&base, &adapter, &dir.join("adapter/../base/.")), &["the output is the --model"]);
    fails(&mut merge(&base, &adapter, &base.join("merged")), &["is inside the --model"]);
    fails(merge(&base, &adapter, &adapter).arg("--overwrite"), &["the output is the --adapter"]);
    fails(&mut merge(&base, &adapter, &dir), &["the output holds the --model"]);
    assert!(!base.join("merged").exists());
    assert!(before == (snapshot(&base), snapshot(&adapter)), "an input changed");
}

#[test]
fn merge_replaces_an_existing_model_only_with_overwrite() {
    let dir = scratch("guard-merge-overwrite");
    let (base, adapter) = base_and_adapter(&dir);
    let inputs = (snapshot(&base), snapshot(&adapter));
    let other = copy_model("gpt2-policy", &dir.join("other"));
    let held = snapshot(&other);
    fails(
        &mut merge(&base, &adapter, &other),
        &["other: already holds a model (config.json, model.safetensors)", "pass --overwrite to replace it"],
    );
    assert!(snapshot(&other) == held, "the refused output changed");

    let fresh = dir.join("merged");
    let said = succeeds(&mut merge(&base, &adapter, &fresh));
    assert!(said.contains(&format!("with base {}", base.display())) && said.contains("written to"), "{said}");
    assert!(!said.contains("into"), "{said}");
    succeeds(merge(&base, &adapter, &other).arg("--overwrite"));
    let weights = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert!(weights(&other) == weights(&fresh), "--overwrite did not write the merged model");
    // An empty directory is no model: written without --overwrite.
    std::fs::create_dir(dir.join("empty")).unwrap();
    succeeds(&mut merge(&base, &adapter, &dir.join("empty")));
    assert!(inputs == (snapshot(&base), snapshot(&adapter)), "an input changed");
}

#[test]
fn export_never_writes_over_an_input_file() {
    let dir = scratch("guard-export-inputs");
    let m = copy_model("llama-policy", &dir.join("mcopy"));
    let before = snapshot(&m);
    // QA's case: the GGUF over the model's own weights, refused even with --overwrite.
    for name in ["model.safetensors", "config.json", "tokenizer.json"] {
        fails(
            export(&m, &m.join(name)).arg("--overwrite"),
            &[&format!("{name}: the output is a file of the --model"), "choose another --gguf"],
        );
    }
    fails(&mut export(&m, &dir.join("mcopy/../mcopy/model.safetensors")), &["is a file of the --model"]);
    fails(export(&m, &m).arg("--overwrite"), &["the output is the --model"]);
    assert!(before == snapshot(&m), "the model changed");
    // The adapter's files are inputs too.
    let (base, adapter) = base_and_adapter(&dir);
    let inputs = (snapshot(&base), snapshot(&adapter));
    fails(
        export(&base, &adapter.join("adapter_model.safetensors")).arg("--adapter").arg(&adapter).arg("--overwrite"),
        &["is a file of the --adapter"],
    );
    assert!(inputs == (snapshot(&base), snapshot(&adapter)), "an input changed");
    hf::load_model(&m).unwrap();
}

#[test]
fn export_replaces_an_existing_file_only_with_overwrite() {
    let dir = scratch("guard-export-overwrite");
    let m = copy_model("llama-policy", &dir.join("m"));
    let model_files = snapshot(&m);
    // A new file beside the model's files is fine.
    let out = m.join("model.gguf");
    succeeds(&mut export(&m, &out));
    std::fs::write(&out, b"an older export").unwrap();
    fails(&mut export(&m, &out), &["model.gguf: already exists", "pass --overwrite to replace it"]);
    assert_eq!(std::fs::read(&out).unwrap(), b"an older export");
    succeeds(export(&m, &out).arg("--overwrite"));
    hf::gguf::parse(&std::fs::read(&out).unwrap()).unwrap();
    let mut now = snapshot(&m);
    now.remove(Path::new("model.gguf"));
    assert!(now == model_files, "the model changed");
}

/// `dpo train --merge` writes RUN/final-merged at its end: an input there is refused before anything is
/// read, even in a directory that holds no run yet.
#[test]
fn train_merge_does_not_write_over_an_input_in_final_merged() {
    let dir = scratch("guard-train-merge");
    let run = dir.join("run");
    let input = copy_model("gpt2-policy", &run.join("final-merged"));
    let before = snapshot(&run);
    fails(
        train(&input, &prefs(), &run).args(["--lora-r", "4", "--merge", "--max-steps", "1"]),
        &[
            "the run replaces",
            "final-merged at its end, where the input --model",
            "copy the input out of the run first, or choose another --output",
        ],
    );
    assert!(snapshot(&run) == before, "the run directory changed");
}

/// `--overwrite` moves the previous run aside and deletes it: `dpo reward-model train` and `dpo ppo` refuse
/// an input inside it, as `dpo train` does.
#[test]
fn reward_model_and_ppo_overwrite_do_not_delete_their_inputs() {
    let dir = scratch("guard-run-overwrite");
    let rm = trained_reward_model(&dir);
    let before = snapshot(&rm);
    let want = [
        "--overwrite would replace the run that holds the input",
        "copy the input out of the run first, or choose another --output",
    ];
    let mut c = dpo();
    c.args(["reward-model", "train", "--max-steps", "1", "--overwrite", "--model"])
        .arg(rm.join("final"))
        .arg("--data")
        .arg(prefs())
        .arg("--output")
        .arg(&rm);
    fails(&mut c, &want);
    let mut c = dpo();
    c.args(["ppo", "--overwrite", "--model"])
        .arg(model("gpt2-policy"))
        .arg("--reward-model")
        .arg(&rm)
        .arg("--prompts")
        .arg(prefs())
        .arg("--output")
        .arg(&rm);
    fails(&mut c, &want);
    assert!(snapshot(&rm) == before, "the reward model's run changed");
}
