//! Bad input, one case per test, through the real binary: each must end with a non-zero exit and one
//! message that names the file, line, field or tensor at fault (and what to do), never a panic.
//! `cargo test --release -p dpo-cli --test bad_input -- --nocapture` prints the catalog of messages.

mod common;

use std::path::Path;

use common::*;
use serde_json::json;

fn logps(model: &Path, data: &Path) -> std::process::Command {
    let mut c = dpo();
    c.arg("logps").arg("--model").arg(model).arg("--data").arg(data);
    c
}

fn row(prompt: &str, chosen: &str, rejected: &str) -> serde_json::Value {
    json!({"prompt": prompt, "chosen": chosen, "rejected": rejected})
}

// ---------------------------------------------------------------- data files

#[test]
fn malformed_json_line() {
    let dir = scratch("malformed");
    let data = dir.join("bad.jsonl");
    std::fs::write(&data, "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n{\"prompt\": \"x\",\n")
        .unwrap();
    // The column is the file line's; serde's own "at line 1 column N" (within the row) is not repeated.
    let msg = fails(
        &mut logps(&model("gpt2-policy"), &data),
        &["bad.jsonl, line 2, column 15: invalid JSON: EOF while parsing"],
    );
    assert!(!msg.contains("line 1"), "{msg}");
    // A JSON array file cites the line of the syntax error.
    let data = dir.join("bad.json");
    std::fs::write(&data, "[{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"},\n {\"prompt\" \"x\"}]")
        .unwrap();
    fails(&mut logps(&model("gpt2-policy"), &data), &["bad.json, file: invalid JSON", "line 2"]);
}

/// A Parquet file whose dictionary page holds fewer values than its header says (found by the `data_parquet`
/// fuzz target): the parquet crate panics inside its decoder; the user gets one error naming the file and
/// row, and no panic text.
#[test]
fn corrupt_parquet_page() {
    let data = fixtures().join("../bad/short_dictionary_page.parquet");
    fails(&mut logps(&model("gpt2-policy"), &data), &["short_dictionary_page.parquet, row 1", "Parquet reader failed"]);
}

#[test]
fn wrong_types() {
    let dir = scratch("types");
    let m = model("gpt2-policy");
    let data = jsonl(&dir.join("a.jsonl"), &[row("p", "c", "r"), json!({"prompt": "p", "chosen": 3, "rejected": "r"})]);
    fails(
        &mut logps(&m, &data),
        &["a.jsonl, line 2, field `chosen`: expected a string or a list of messages, found a number"],
    );
    let data =
        jsonl(&dir.join("b.jsonl"), &[json!({"prompt_ids": [1, 2], "chosen_ids": [3, "4"], "rejected_ids": [5]})]);
    fails(
        &mut logps(&m, &data),
        &["b.jsonl, line 1, field `chosen_ids`: token ids are non-negative integers, found \"4\""],
    );
    let data = jsonl(
        &dir.join("c.jsonl"),
        &[json!({"prompt": [{"role": "user", "content": 7}], "chosen": [], "rejected": []})],
    );
    fails(
        &mut logps(&m, &data),
        &["c.jsonl, line 1, field `prompt`: message 1: `content` must be a string, found a number"],
    );
    let data = jsonl(&dir.join("d.jsonl"), &[json!(["p", "c", "r"])]);
    fails(&mut logps(&m, &data), &["d.jsonl, line 1: expected a JSON object, found an array"]);
    // A token id outside the vocabulary is caught before the engine sees it.
    let data =
        jsonl(&dir.join("e.jsonl"), &[json!({"prompt_ids": [1, 2], "chosen_ids": [3, 99999], "rejected_ids": [5]})]);
    fails(
        &mut logps(&m, &data),
        &["e.jsonl, line 1, field `chosen_ids`: token id 99999 is outside the model's vocabulary of 512 tokens"],
    );
    fails(
        train(&m, &data, &dir.join("run")).args(["--max-steps", "1"]),
        &["e.jsonl, line 1, field `chosen_ids`: token id 99999 is outside"],
    );
}

#[test]
fn missing_fields() {
    let dir = scratch("missing");
    let m = model("gpt2-policy");
    let data = jsonl(&dir.join("a.jsonl"), &[json!({"prompt": "p", "chosen": "c"})]);
    fails(&mut logps(&m, &data), &["a.jsonl, line 1, field `rejected`: missing"]);
    let data = jsonl(&dir.join("b.jsonl"), &[json!({"prompt_ids": [1], "chosen_ids": [2]})]);
    fails(&mut logps(&m, &data), &["b.jsonl, line 1, field `rejected_ids`: missing"]);
    let data = jsonl(&dir.join("c.jsonl"), &[json!({"text": "no preference here"})]);
    fails(&mut logps(&m, &data), &["c.jsonl, line 1, field `chosen`: missing"]);
}

/// Empty text is allowed, as in TRL: an empty prompt leaves the first completion token unscored (it has
/// no predecessor), an empty completion is scored on the EOS token appended to it. A row left with no
/// scored token (empty prompt and empty completion) is dropped and counted; a file of nothing but such
/// rows is an error. Pre-tokenized rows need at least one completion token.
#[test]
fn empty_prompt_or_completion() {
    let dir = scratch("empty-text");
    let m = model("gpt2-policy");
    let data = jsonl(&dir.join("ok.jsonl"), &[row("", " Hello there.", " Go."), row("Hi.", "", " Go.")]);
    let out = logps(&m, &data).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: Vec<serde_json::Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 2);
    // Row 2's empty chosen completion is the EOS token alone.
    assert_eq!(rows[1]["chosen_len"], 1);
    assert!(rows[1]["chosen_logps"].as_f64().unwrap() < 0.0);

    let out = dir.join("run");
    let data = jsonl(&dir.join("mixed.jsonl"), &[row("", "", ""), row("Hi.", " Hello.", " Go.")]);
    let err = succeeds(train(&m, &data, &out).args(["--max-steps", "1"]));
    assert!(err.contains("2 rows read, 1 examples kept, 1 dropped with no completion token left"), "{err}");

    let data = jsonl(&dir.join("none.jsonl"), &[row("", "", "")]);
    fails(
        &mut logps(&m, &data),
        &["none.jsonl: no usable rows (1 rows read, 0 examples kept, 1 dropped with no completion token left)"],
    );
    let data = jsonl(&dir.join("ids.jsonl"), &[json!({"prompt_ids": [1], "chosen_ids": [], "rejected_ids": [2]})]);
    fails(&mut logps(&m, &data), &["ids.jsonl, line 1, field `chosen_ids`: no completion tokens"]);
}

#[test]
fn non_utf8_bytes() {
    let dir = scratch("utf8");
    let data = dir.join("latin1.jsonl");
    std::fs::write(&data, b"{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n{\"prompt\": \"caf\xe9\", \"chosen\": \"b\", \"rejected\": \"c\"}\n").unwrap();
    fails(&mut logps(&model("gpt2-policy"), &data), &["latin1.jsonl, line 2: not UTF-8 text"]);
}

#[test]
fn empty_file() {
    let dir = scratch("empty-file");
    let data = dir.join("empty.jsonl");
    std::fs::write(&data, "").unwrap();
    fails(&mut logps(&model("gpt2-policy"), &data), &["empty.jsonl holds no rows"]);
    std::fs::write(&data, "\n  \n").unwrap();
    fails(&mut logps(&model("gpt2-policy"), &data), &["empty.jsonl holds no rows"]);
}

#[test]
fn directory_where_a_file_is_expected() {
    let dir = scratch("dir-as-file");
    let sub = dir.join("data.jsonl");
    std::fs::create_dir_all(&sub).unwrap();
    fails(&mut logps(&model("gpt2-policy"), &sub), &["data.jsonl is a directory; pass a data file"]);
    let out = dir.join("run");
    fails(train(&model("gpt2-policy"), &prefs(), &out).arg("--config").arg(&sub), &["cannot read", "data.jsonl"]);
    // And a file where a model directory is expected.
    fails(&mut logps(&prefs(), &prefs()), &["prefs.jsonl: is not a directory; pass the model directory"]);
}

// ---------------------------------------------------------------- model directories

#[test]
fn missing_model_directory() {
    let dir = scratch("no-model");
    fails(&mut logps(&dir.join("nope"), &prefs()), &["nope: model directory does not exist"]);
    fails(&mut logps(&dir, &prefs()), &["no config.json; this is not a Hugging Face model directory"]);
    fails(&mut train(&dir.join("nope"), &prefs(), &dir.join("run")), &["nope: model directory does not exist"]);
}

#[test]
fn unsupported_architecture() {
    let dir = scratch("arch");
    let m = copy_model("gpt2-policy", &dir.join("m"));
    let cfg = std::fs::read_to_string(m.join("config.json")).unwrap().replace("\"gpt2\"", "\"bert\"");
    std::fs::write(m.join("config.json"), cfg).unwrap();
    fails(
        &mut logps(&m, &prefs()),
        &["config.json: model_type `bert` is not supported; supported: gpt2, llama, mistral, qwen2, gpt_neox"],
    );
    // A context so long its position table could not be allocated is refused, not an abort.
    let m = copy_model("llama-policy", &dir.join("long"));
    let cfg = std::fs::read_to_string(m.join("config.json")).unwrap();
    std::fs::write(
        m.join("config.json"),
        cfg.replace("\"max_position_embeddings\": 256", "\"max_position_embeddings\": 1000000000000"),
    )
    .unwrap();
    fails(
        &mut logps(&m, &prefs()),
        &["config.json: field `max_position_embeddings`", "more than this trainer supports"],
    );
}

#[test]
fn missing_safetensors() {
    let dir = scratch("no-weights");
    let m = copy_model("gpt2-policy", &dir.join("m"));
    std::fs::remove_file(m.join("model.safetensors")).unwrap();
    fails(&mut logps(&m, &prefs()), &["no model.safetensors or model.safetensors.index.json"]);
    std::fs::write(m.join("pytorch_model.bin"), b"pickle").unwrap();
    fails(&mut logps(&m, &prefs()), &["only pickle checkpoints (*.bin) found", "Convert to safetensors"]);
}

#[test]
fn truncated_safetensors() {
    let dir = scratch("truncated");
    let m = copy_model("gpt2-policy", &dir.join("m"));
    let st = m.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    fails(
        &mut logps(&m, &prefs()),
        &["model.safetensors: tensor `", "outside the data section", "truncated or corrupt"],
    );
    std::fs::write(&st, &bytes[..5]).unwrap();
    fails(&mut logps(&m, &prefs()), &["model.safetensors: file is 5 bytes, too short for a safetensors header"]);
}

#[test]
fn corrupt_safetensors_header() {
    let dir = scratch("corrupt");
    let m = copy_model("gpt2-policy", &dir.join("m"));
    let st = m.join("model.safetensors");
    let good = std::fs::read(&st).unwrap();
    // The header length lies.
    let mut bytes = good.clone();
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&st, &bytes).unwrap();
    fails(
        &mut logps(&m, &prefs()),
        &["model.safetensors: header length 1099511627776 exceeds", "truncated or not safetensors"],
    );
    // Random bytes.
    let noise: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(&st, noise).unwrap();
    fails(&mut logps(&m, &prefs()), &["model.safetensors: header length"]);
    // The offsets lie: past the end, and overlapping another tensor.
    std::fs::write(&st, &good).unwrap();
    edit_safetensors(&st, |h, _| {
        let r = tensor_range(h, "transformer.h.0.mlp.c_fc.weight");
        h["transformer.h.0.mlp.c_fc.weight"]["data_offsets"] = json!([r.start, r.end + (1 << 30)]);
    });
    fails(
        &mut logps(&m, &prefs()),
        &["tensor `transformer.h.0.mlp.c_fc.weight`: data_offsets", "outside the data section"],
    );
    std::fs::write(&st, &good).unwrap();
    edit_safetensors(&st, |h, _| {
        let r = tensor_range(h, "transformer.wte.weight");
        h["transformer.h.0.ln_1.bias"]["data_offsets"] = json!([r.start, r.start + 256]);
    });
    fails(&mut logps(&m, &prefs()), &["data_offsets overlap those of", "the file is corrupt"]);
    // A header that is not JSON.
    std::fs::write(&st, &good).unwrap();
    let mut bytes = good.clone();
    bytes[8] = b'#';
    std::fs::write(&st, &bytes).unwrap();
    fails(&mut logps(&m, &prefs()), &["model.safetensors: header is not valid JSON"]);
}

#[test]
fn tensor_of_the_wrong_shape() {
    let dir = scratch("shape");
    let m = copy_model("gpt2-policy", &dir.join("m"));
    edit_safetensors(&m.join("model.safetensors"), |h, _| {
        h["transformer.h.0.attn.c_proj.weight"]["shape"] = json!([32, 128]);
    });
    fails(
        &mut logps(&m, &prefs()),
        &[
            "model.safetensors: the weights cannot be loaded (1 problem(s))",
            "tensor `transformer.h.0.attn.c_proj.weight`: expected shape [64, 64], found [32, 128]",
        ],
    );
    // A missing tensor is named too.
    edit_safetensors(&m.join("model.safetensors"), |h, _| {
        h.remove("transformer.ln_f.bias");
    });
    fails(&mut logps(&m, &prefs()), &["missing tensor `transformer.ln_f.bias` (expected shape [64])"]);
}

#[test]
fn sharded_index_pointing_outside_the_model_directory() {
    let dir = scratch("shard-escape");
    let m = copy_model("gpt2-policy", &dir.join("m"));
    std::fs::rename(m.join("model.safetensors"), dir.join("outside.safetensors")).unwrap();
    let st = hf::SafeTensors::open(&dir.join("outside.safetensors")).unwrap();
    let map: serde_json::Map<String, serde_json::Value> =
        st.tensors().iter().map(|t| (t.name.clone(), json!("../outside.safetensors"))).collect();
    std::fs::write(m.join("model.safetensors.index.json"), json!({"metadata": {}, "weight_map": map}).to_string())
        .unwrap();
    fails(
        &mut logps(&m, &prefs()),
        &["model.safetensors.index.json: shard `../outside.safetensors`: must be a plain relative path inside the model directory"],
    );
    let abs = dir.join("outside.safetensors").display().to_string();
    let map: serde_json::Map<String, serde_json::Value> =
        st.tensors().iter().map(|t| (t.name.clone(), json!(abs))).collect();
    std::fs::write(m.join("model.safetensors.index.json"), json!({"weight_map": map}).to_string()).unwrap();
    fails(&mut logps(&m, &prefs()), &["no absolute paths"]);
    let map: serde_json::Map<String, serde_json::Value> =
        st.tensors().iter().map(|t| (t.name.clone(), json!("model-00001-of-00002.safetensors"))).collect();
    std::fs::write(m.join("model.safetensors.index.json"), json!({"weight_map": map}).to_string()).unwrap();
    fails(&mut logps(&m, &prefs()), &["shard `model-00001-of-00002.safetensors`: file is missing"]);
}

#[test]
fn missing_tokenizer_with_text_data() {
    let dir = scratch("no-tokenizer");
    let m = copy_model("gpt2-policy", &dir.join("m"));
    std::fs::remove_file(m.join("tokenizer.json")).unwrap();
    fails(
        &mut logps(&m, &prefs()),
        &["prefs.jsonl, line 1: text rows need the model's tokenizer", "no tokenizer.json"],
    );
    fails(train(&m, &prefs(), &dir.join("run")).arg("--skip-bad-rows"), &["no tokenizer.json"]);
    // Pre-tokenized rows need none.
    let out = logps(&m, &fixtures().join("data/prefs.tokenized.jsonl")).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn chat_template_that_fails_to_render() {
    let dir = scratch("chat");
    let m = copy_model("gpt2-policy", &dir.join("m"));
    let msg = |role: &str, content: &str| json!([{"role": role, "content": content}]);
    let data = jsonl(
        &dir.join("chat.jsonl"),
        &[
            json!({"prompt": msg("user", "Hi"), "chosen": msg("assistant", "Hello"), "rejected": msg("assistant", "Go")}),
        ],
    );
    fails(&mut logps(&m, &data), &["chat.jsonl, line 1: conversational rows need a chat template"]);
    let template = m.join("chat_template.jinja");
    std::fs::write(&template, "{% for m in messages %}{{ m.content.nope.deeper }}{% endfor %}").unwrap();
    fails(
        &mut logps(&m, &data),
        &["chat.jsonl, line 1: chat template from", "chat_template.jinja failed to render: undefined value"],
    );
    std::fs::write(&template, "{{ raise_exception('Conversation roles must alternate') }}").unwrap();
    fails(&mut logps(&m, &data), &["failed to render", "raise_exception: Conversation roles must alternate"]);
    std::fs::write(&template, "{% for m in messages %").unwrap();
    fails(&mut logps(&m, &data), &["failed to render: syntax error"]);
    // Skipping bad rows does not hide a template that fails on every row.
    fails(train(&m, &data, &dir.join("run")).arg("--skip-bad-rows"), &["chat.jsonl"]);
}

#[test]
fn nan_or_infinite_weights() {
    let dir = scratch("nonfinite-weights");
    let m = copy_model("gpt2-policy", &dir.join("m"));
    edit_safetensors(&m.join("model.safetensors"), |h, data| {
        let r = tensor_range(h, "transformer.h.1.ln_2.weight");
        data[r.start + 12..r.start + 16].copy_from_slice(&f32::NAN.to_le_bytes());
        let r = tensor_range(h, "transformer.wte.weight");
        data[r.start..r.start + 4].copy_from_slice(&f32::INFINITY.to_le_bytes());
    });
    fails(
        &mut logps(&m, &prefs()),
        &[
            "the weights cannot be loaded (2 problem(s))",
            "tensor `transformer.wte.weight`: value inf at flat index 0 is not finite",
            "tensor `transformer.h.1.ln_2.weight`: value NaN at flat index 3 is not finite",
        ],
    );
    // A stored LoRA base reads its tensors a block at a time into their storage (NF4 linears, the bf16
    // head): each bad value is still named by its tensor (k_proj: the second of the stacked q/k/v) and
    // its index there.
    let m = copy_model("../../more/lora/llama/base", &dir.join("llama"));
    edit_safetensors(&m.join("model.safetensors"), |h, data| {
        let r = tensor_range(h, "model.layers.1.self_attn.k_proj.weight");
        data[r.start + 20..r.start + 24].copy_from_slice(&f32::NAN.to_le_bytes());
        let r = tensor_range(h, "lm_head.weight");
        data[r.start + 400..r.start + 404].copy_from_slice(&f32::NEG_INFINITY.to_le_bytes());
    });
    let flags = ["--lora-r", "4", "--precision", "bf16", "--quantize", "nf4", "--max-steps", "1"];
    fails(
        train(&m, &prefs(), &dir.join("run")).args(flags),
        &[
            "the weights cannot be loaded (2 problem(s))",
            "tensor `model.layers.1.self_attn.k_proj.weight`: value NaN at flat index 5 is not finite",
            "tensor `lm_head.weight`: value -inf at flat index 100 is not finite",
        ],
    );
}

// ---------------------------------------------------------------- configuration and run directories

#[test]
fn unknown_key_in_a_toml_config() {
    let dir = scratch("toml");
    let m = model("gpt2-policy");
    let cfg = dir.join("run.toml");
    std::fs::write(&cfg, "lr = 1e-3\nbatchsize = 4\n").unwrap();
    fails(
        train(&m, &prefs(), &dir.join("run")).arg("--config").arg(&cfg),
        &["run.toml", "line 2", "unknown field `batchsize`", "`batch_size`"],
    );
    std::fs::write(&cfg, "[objective]\nbetta = 0.2\n").unwrap();
    fails(
        train(&m, &prefs(), &dir.join("run")).arg("--config").arg(&cfg),
        &["run.toml", "unknown field `betta`", "`beta`"],
    );
    std::fs::write(&cfg, "lr = \"fast\"\n").unwrap();
    fails(
        train(&m, &prefs(), &dir.join("run")).arg("--config").arg(&cfg),
        &["run.toml", "line 1", "invalid type: string \"fast\", expected f64"],
    );
    std::fs::write(&cfg, "max_memory = \"lots\"\n").unwrap();
    fails(
        train(&m, &prefs(), &dir.join("run")).arg("--config").arg(&cfg),
        &["invalid setting `max_memory`", "not a size"],
    );
    assert!(!dir.join("run").join("checkpoints").exists());
}

#[test]
fn output_directory_that_already_holds_a_run() {
    let dir = scratch("output-exists");
    let (m, out) = (model("gpt2-policy"), dir.join("run"));
    succeeds(train(&m, &prefs(), &out).args(["--max-steps", "2"]));
    let first = std::fs::read(out.join("final/model.safetensors")).unwrap();
    let out_s = out.display().to_string();
    fails(
        train(&m, &prefs(), &out).args(["--max-steps", "3"]),
        &[&format!("{out_s} already holds a run"), "pass --overwrite to replace it", &format!("--resume {out_s}")],
    );
    assert_eq!(std::fs::read(out.join("final/model.safetensors")).unwrap(), first, "a refused run changed the old one");
    // --resume continues it (to a longer run), --overwrite replaces it.
    let err = succeeds(dpo().args(["train", "--max-steps", "3", "--resume"]).arg(&out));
    assert!(err.contains("resuming at step 2"), "{err}");
    succeeds(train(&m, &prefs(), &out).args(["--max-steps", "1", "--overwrite"]));
    let steps: Vec<u64> = checkpoints(&out).into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, [1]);
    // --resume of a directory with no run says so.
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    fails(dpo().args(["train", "--resume"]).arg(&empty), &["no config.toml of a run found there"]);
}

#[test]
fn output_directory_that_cannot_be_written() {
    // Tests may run as root, where permission bits do not bind: use a path through a regular file.
    let dir = scratch("output-unwritable");
    let file = dir.join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    fails(
        &mut train(&model("gpt2-policy"), &prefs(), &file.join("run")),
        &["a-file/run: cannot create the run directory (Not a directory", "choose another --output"],
    );
    fails(
        &mut train(&model("gpt2-policy"), &prefs(), &file),
        &["a-file: exists and is not a directory; choose another --output"],
    );
    fails(
        logps(&model("gpt2-policy"), &prefs()).arg("--out").arg(file.join("x.jsonl")),
        &["writing", "a-file/x.jsonl", "Not a directory"],
    );
}

/// A disk that fills up while a checkpoint is written (a file-size limit: the model file fits, the
/// optimizer's does not): the run stops with one message, and nothing that looks like a checkpoint is
/// left behind.
#[test]
fn disk_full_while_a_checkpoint_is_written() {
    let dir = scratch("disk-full");
    let out = dir.join("run");
    let cmd = format!(
        "ulimit -f 1000; exec '{}' train --model '{}' --data '{}' --output '{}' --batch-size 4 --max-steps 3 --save-every 1",
        env!("CARGO_BIN_EXE_dpo"),
        model("gpt2-policy").display(),
        prefs().display(),
        out.display()
    );
    let msg = fails(
        std::process::Command::new("bash").arg("-c").arg(&cmd),
        &[
            "could not write the checkpoint of step 1",
            "optimizer.safetensors: File too large",
            "nothing of it was left behind",
            "No checkpoint was completed",
        ],
    );
    assert!(!msg.contains("panicked"));
    let left: Vec<String> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");

    // With a checkpoint in place before the disk fills, the message says how to continue from it.
    succeeds(train(&model("gpt2-policy"), &prefs(), &out).args(["--max-steps", "1", "--overwrite"]));
    let cmd = format!(
        "ulimit -f 1000; exec '{}' train --resume '{}' --max-steps 3 --save-every 1",
        env!("CARGO_BIN_EXE_dpo"),
        out.display()
    );
    fails(
        std::process::Command::new("bash").arg("-c").arg(&cmd),
        &[
            "could not write the checkpoint of step 2",
            "The newest complete checkpoint is",
            "step-1",
            "dpo train --resume",
        ],
    );
    assert_eq!(checkpoints(&out).into_iter().map(|(s, _)| s).collect::<Vec<_>>(), [1]);
    assert_checkpoint_loads(&out.join("checkpoints/step-1"));
}

// ---------------------------------------------------------------- non-finite steps

/// A GPT-NeoX fixture whose embedding of token 500 is huge (3e38, finite): LayerNorm overflows on it and
/// any row holding that token gets a NaN log-prob, the others stay finite. Row 7 (line 7) holds it.
fn poisoned(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let m = copy_model("neox-policy", &dir.join("poisoned"));
    edit_safetensors(&m.join("model.safetensors"), |h, data| {
        let r = tensor_range(h, "gpt_neox.embed_in.weight");
        let d = h["gpt_neox.embed_in.weight"]["shape"][1].as_u64().unwrap() as usize;
        for j in 0..d {
            let at = r.start + (500 * d + j) * 4;
            data[at..at + 4].copy_from_slice(&3e38f32.to_le_bytes());
        }
    });
    let rows: Vec<serde_json::Value> = (0..12u32)
        .map(|i| {
            let t = |k: u32| 2 + (i * 37 + k * 11) % 400;
            let chosen = if i == 6 { vec![t(7), 500, t(8)] } else { vec![t(7), t(9), t(8)] };
            json!({"prompt_ids": [t(1), t(2), t(3), t(4)], "chosen_ids": chosen, "rejected_ids": [t(5), t(6)]})
        })
        .collect();
    (m, jsonl(&dir.join("rows.jsonl"), &rows))
}

#[test]
fn nonfinite_loss_stops_and_keeps_the_last_good_checkpoint() {
    let dir = scratch("nonfinite-stop");
    let (m, data) = poisoned(&dir);
    // dpo logps says which row.
    let out = logps(&m, &data).output().unwrap();
    assert!(out.status.success());
    assert!(
        stderr(&out).contains("1 of 12 rows have a log-prob that is not finite (written as null): line 7"),
        "{}",
        stderr(&out)
    );

    // Default (stop), no periodic checkpoints: step 2 (rows 5-8) is not applied; the state after step 1
    // is written as a checkpoint and named.
    let run = dir.join("run");
    let msg = fails(
        train(&m, &data, &run).args(["--batch-size", "4", "--no-shuffle", "--max-steps", "3"]),
        &[
            "step 2: the loss is not finite (rows line 5, line 6, line 7, line 8)",
            "the step was not applied",
            "checkpoints/step-1 holds the last good state",
            "--on-nonfinite skip",
        ],
    );
    assert!(msg.contains(&format!("dpo train --resume {}", run.display())), "{msg}");
    assert_eq!(checkpoints(&run).into_iter().map(|(s, _)| s).collect::<Vec<_>>(), [1]);
    assert_checkpoint_loads(&run.join("checkpoints/step-1"));
    assert!(!run.join("final").exists());

    // Resuming with --on-nonfinite skip drops step 2 and finishes; the weights after the skipped step
    // are those before it.
    let err = succeeds(dpo().args(["train", "--on-nonfinite", "skip", "--resume"]).arg(&run));
    assert!(err.contains("step 2: loss not finite (rows line 5, line 6, line 7, line 8); step skipped"), "{err}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    assert_eq!((lines[1]["step"].as_u64(), lines[1]["skipped"].as_bool()), (Some(2), Some(true)));
    assert!(lines[2]["loss"].as_f64().unwrap().is_finite());

    // Skip from the start gives the same run.
    let run2 = dir.join("run2");
    succeeds(train(&m, &data, &run2).args([
        "--batch-size",
        "4",
        "--no-shuffle",
        "--max-steps",
        "3",
        "--on-nonfinite",
        "skip",
    ]));
    assert_eq!(
        std::fs::read(run.join("final/model.safetensors")).unwrap(),
        std::fs::read(run2.join("final/model.safetensors")).unwrap()
    );
}

#[test]
fn nonfinite_gradient_stops_at_the_first_step() {
    // A beta so large that the loss gradient overflows f32 at once (the loss itself is log 2).
    let dir = scratch("nonfinite-grad");
    let run = dir.join("run");
    fails(
        train(&model("gpt2-policy"), &prefs(), &run).args(["--max-steps", "2", "--beta", "1e300"]),
        &["step 1: the gradient is not finite (rows line", "checkpoints/step-0 holds the last good state"],
    );
    assert_checkpoint_loads(&run.join("checkpoints/step-0"));
}

// ---------------------------------------------------------------- memory

/// The peak memory estimate against the measured peak resident set of a run where activations and
/// weights dominate (a GPT-2 shape with d = 256, 4 layers, batches of 2000 tokens): the two agree within
/// a factor 1.5 either way (measured: see the printed line).
#[test]
fn memory_estimate_tracks_measured_peak() {
    let dir = scratch("memory");
    let m = dir.join("gpt2-d256");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model("gpt2-policy").join("config.json")).unwrap()).unwrap();
    cfg["n_embd"] = json!(256);
    cfg["n_layer"] = json!(4);
    cfg["n_positions"] = json!(1024);
    write_random_model(&m, cfg, 0.04);
    let rows: Vec<serde_json::Value> = (0..8u32)
        .map(|i| {
            let ids = |n: u32, k: u32| (0..n).map(|j| 2 + (i * 131 + j * 7 + k) % 500).collect::<Vec<u32>>();
            json!({"prompt_ids": ids(400, 0), "chosen_ids": ids(50, 1), "rejected_ids": ids(50, 2)})
        })
        .collect();
    let data = jsonl(&dir.join("long.jsonl"), &rows);
    let err = succeeds(train(&m, &data, &dir.join("run")).args([
        "--batch-size",
        "4",
        "--max-steps",
        "1",
        "--max-length",
        "1024",
    ]));
    let size = |after: &str| -> f64 {
        let at = err.find(after).unwrap_or_else(|| panic!("no {after:?} in:\n{err}")) + after.len();
        let mut words = err[at..].split_whitespace();
        let (n, unit) = (words.next().unwrap().parse::<f64>().unwrap(), words.next().unwrap());
        n * match unit.trim_end_matches([';', ')', ',']) {
            "KiB" => 1024.0,
            "MiB" => 1048576.0,
            "GiB" => 1073741824.0,
            u => panic!("unit {u}"),
        }
    };
    let (estimate, measured) = (size("estimated peak "), size("peak memory (resident): "));
    let ratio = measured / estimate;
    println!(
        "memory: estimated {:.1} MiB, measured peak RSS {:.1} MiB (ratio {ratio:.2})",
        estimate / 1048576.0,
        measured / 1048576.0
    );
    assert!(err.contains("activations"), "{err}");
    assert!((1.0 / 1.5..=1.5).contains(&ratio), "estimate {estimate} vs measured {measured}:\n{err}");
}

/// A batch that cannot fit is refused before any weight is loaded, with the numbers and what to lower:
/// 100 rows of 60 000 tokens in one micro-batch of the Llama fixture (an estimated ~74 GiB, mostly
/// activations), against the machine's available memory (where it is below 64 GiB) and against an
/// explicit --max-memory.
#[test]
fn absurd_batch_is_refused() {
    let dir = scratch("memory-refusal");
    let ids: String = (0..60_000u32).map(|j| (2 + j % 500).to_string()).collect::<Vec<_>>().join(",");
    let line = format!("{{\"prompt_ids\": [{ids}], \"chosen_ids\": [3], \"rejected_ids\": [4]}}\n");
    let data = dir.join("huge.jsonl");
    std::fs::write(&data, line.repeat(100)).unwrap();
    let run = dir.join("run");
    let absurd = |extra: &[&str]| {
        let mut c = train(&model("llama-policy"), &data, &run);
        c.args(["--batch-size", "100", "--max-length", "100000", "--max-steps", "1"]).args(extra);
        c
    };
    let available_kb = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| {
        let l = t.lines().find(|l| l.starts_with("MemAvailable:"))?.to_string();
        l.split_whitespace().nth(1)?.parse::<u64>().ok()
    });
    if available_kb.is_some_and(|kb| kb < 64 << 20) {
        fails(
            &mut absurd(&[]),
            &[
                "the run needs an estimated",
                "more than the available memory (MemAvailable)",
                "(100 rows, 6000200 tokens)",
                "lower --batch-size, --micro-pairs or --max-length",
                "--max-memory",
            ],
        );
    }
    fails(
        &mut absurd(&["--max-memory", "4GiB"]),
        &["more than the --max-memory limit of 4.0 GiB", "(100 rows, 6000200 tokens)"],
    );
    assert!(!run.join("checkpoints").exists());
}
