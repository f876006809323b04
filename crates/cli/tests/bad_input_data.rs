//! Bad input on the data side (issue 16): references that do not fit the policy, rows longer than the
//! model's positions, unbounded templates and lines, an unwritable reference cache, content parts, and
//! settings of the scoring commands. Each case runs the real binary and expects one clear message.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::json;

fn eval(model: &Path, reference: &Path, data: &Path) -> Command {
    let mut c = dpo();
    c.arg("eval").arg("--model").arg(model).arg("--ref-model").arg(reference).arg("--data").arg(data);
    c
}

fn reward(model: &Path, reference: &Path, data: &Path) -> Command {
    let mut c = dpo();
    c.arg("reward").arg("--model").arg(model).arg("--ref-model").arg(reference).arg("--data").arg(data);
    c
}

/// A copy of the GPT-2 reference whose vocabulary has `extra` more (zero) embedding rows: it loads and
/// runs, but its token ids are not the policy's.
fn wider_vocab_reference(dir: &Path, extra: usize) -> PathBuf {
    let out = copy_model("gpt2-ref", dir);
    let cfg_path = out.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let vocab = cfg["vocab_size"].as_u64().unwrap() as usize;
    cfg["vocab_size"] = (vocab + extra).into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    edit_safetensors(&out.join("model.safetensors"), |header, data| {
        let name = "transformer.wte.weight";
        let range = tensor_range(header, name);
        let d = header[name]["shape"][1].as_u64().unwrap() as usize;
        let grow = extra * d * 4;
        data.splice(range.end..range.end, std::iter::repeat_n(0u8, grow));
        for (k, v) in header.iter_mut().filter(|(k, _)| *k != "__metadata__") {
            let o = &mut v["data_offsets"];
            let (a, b) = (o[0].as_u64().unwrap() as usize, o[1].as_u64().unwrap() as usize);
            if k == name {
                *o = json!([a, b + grow]);
            } else if a >= range.end {
                *o = json!([a + grow, b + grow]);
            }
        }
        header[name]["shape"] = json!([vocab + extra, d]);
    });
    out
}

/// A copy of the GPT-2 reference whose tokenizer swaps the ids of two ordinary tokens: the same
/// vocabulary size, another token-to-id map.
fn swapped_tokenizer_reference(dir: &Path) -> PathBuf {
    let out = copy_model("gpt2-ref", dir);
    let path = out.join("tokenizer.json");
    let mut tok: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
    let (a, b) = {
        let mut ordinary = vocab.iter().filter(|(_, id)| id.as_u64().unwrap() >= 100);
        (ordinary.next().unwrap().0.clone(), ordinary.next().unwrap().0.clone())
    };
    let (ia, ib) = (vocab[&a].clone(), vocab[&b].clone());
    vocab.insert(a, ib);
    vocab.insert(b, ia);
    std::fs::write(&path, tok.to_string()).unwrap();
    out
}

// ---------------------------------------------------------------- defect 4: one reference loader

#[test]
fn reference_with_another_vocabulary_is_refused_by_eval_and_reward() {
    let dir = scratch("ref-vocab");
    let reference = wider_vocab_reference(&dir.join("ref"), 64);
    let policy = model("gpt2-policy");
    let wants = ["reference", "ref", "vocabulary of 576 tokens, the policy 512"];
    fails(&mut eval(&policy, &reference, &prefs()), &wants);
    fails(&mut reward(&policy, &reference, &prefs()), &wants);
}

#[test]
fn reference_with_another_tokenizer_is_refused_by_eval_and_reward() {
    let dir = scratch("ref-tokenizer");
    let reference = swapped_tokenizer_reference(&dir.join("ref"));
    let policy = model("gpt2-policy");
    let wants = ["tokenizer.json", "map tokens to different ids", "for the policy", "for the reference"];
    fails(&mut eval(&policy, &reference, &prefs()), &wants);
    fails(&mut reward(&policy, &reference, &prefs()), &wants);
    // The fixture reference itself fits.
    succeeds(&mut eval(&policy, &model("gpt2-ref"), &prefs()));
}

// ---------------------------------------------------------------- settings of the scoring commands

#[test]
fn eval_and_reward_refuse_a_beta_that_is_not_positive_and_finite() {
    let (policy, reference) = (model("gpt2-policy"), model("gpt2-ref"));
    for beta in ["nan", "inf", "0"] {
        fails(eval(&policy, &reference, &prefs()).args(["--beta", beta]), &["--beta must be a finite number > 0"]);
        fails(reward(&policy, &reference, &prefs()).args(["--beta", beta]), &["--beta must be a finite number > 0"]);
    }
}

// ---------------------------------------------------------------- defect 7: unbounded templates and lines

fn logps(model: &Path, data: &Path) -> Command {
    let mut c = dpo();
    c.arg("logps").arg("--model").arg(model).arg("--data").arg(data);
    c
}

/// A copy of the GPT-2 policy with `template` as its chat template.
fn with_template(dir: &Path, template: &str) -> PathBuf {
    let m = copy_model("gpt2-policy", dir);
    std::fs::write(m.join("chat_template.jinja"), template).unwrap();
    m
}

fn chat_row(user: serde_json::Value, chosen: &str, rejected: &str) -> serde_json::Value {
    json!({
        "prompt": [{"role": "user", "content": user}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    })
}

#[test]
fn a_chat_template_that_loops_without_end_is_stopped_naming_it() {
    let dir = scratch("template-loop");
    let looping = "{% for i in range(100000) %}{% for j in range(100000) %}{{ 'x' }}{% endfor %}{% endfor %}";
    let m = with_template(&dir.join("model"), looping);
    let data = jsonl(&dir.join("chat.jsonl"), &[chat_row(json!("Hi"), "Hello", "Go")]);
    fails(&mut logps(&m, &data), &["chat.jsonl, line 1", "chat_template.jinja", "was stopped"]);
}

#[test]
fn a_data_line_larger_than_a_row_may_be_is_refused_naming_file_and_line() {
    let dir = scratch("huge-line");
    let huge = "word ".repeat(2 << 20); // 10 MiB of text
    let data = jsonl(
        &dir.join("huge.jsonl"),
        &[
            json!({"prompt": "Q:", "chosen": " a", "rejected": " b"}),
            json!({"prompt": huge, "chosen": " a", "rejected": " b"}),
        ],
    );
    let t0 = std::time::Instant::now();
    fails(
        &mut logps(&model("gpt2-policy"), &data),
        &["huge.jsonl, line 2: the row holds 10.0 MiB, more than the 8 MiB"],
    );
    assert!(t0.elapsed().as_secs() < 20, "took {:?}", t0.elapsed());
}

// ---------------------------------------------------------------- defect 9: an unwritable reference cache

#[test]
fn precompute_ref_with_an_unwritable_cache_dir_says_it_did_not_cache() {
    let dir = scratch("cache-unwritable");
    // A directory under a regular file cannot be created, even by root.
    std::fs::write(dir.join("file"), b"").unwrap();
    let cache = dir.join("file").join("cache");
    let err = succeeds(
        train(&model("gpt2-policy"), &prefs(), &dir.join("run"))
            .args(["--precompute-ref", "--max-steps", "1"])
            .arg("--cache-dir")
            .arg(&cache),
    );
    assert!(!err.contains("computed and cached"), "{err}");
    assert!(err.contains("computed, not cached: cannot create") && err.contains("file/cache"), "{err}");
    // A writable one caches, and the next run reads the cache.
    let ok = dir.join("cache");
    let run = |name: &str| {
        succeeds(
            train(&model("gpt2-policy"), &prefs(), &dir.join(name))
                .args(["--precompute-ref", "--max-steps", "1"])
                .arg("--cache-dir")
                .arg(&ok),
        )
    };
    assert!(run("run2").contains("computed and cached"));
    assert!(run("run3").contains("read from cache"));
}

// ---------------------------------------------------------------- defect 11: content as a list of parts

const SIMPLE_TEMPLATE: &str =
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";

#[test]
fn conversational_content_as_a_list_of_text_parts_is_read_as_its_text() {
    let dir = scratch("content-parts");
    let m = with_template(&dir.join("model"), SIMPLE_TEMPLATE);
    let parts = json!([{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]);
    let with_parts = jsonl(&dir.join("parts.jsonl"), &[chat_row(parts, "4", "5")]);
    let as_text = jsonl(&dir.join("text.jsonl"), &[chat_row(json!("What is 2+2?"), "4", "5")]);
    let scores = |data: &Path| {
        let out = logps(&m, data).output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(scores(&with_parts), scores(&as_text));
    let image = json!([{"type": "image", "url": "cat.png"}, {"type": "text", "text": "What is this?"}]);
    let data = jsonl(&dir.join("image.jsonl"), &[chat_row(image, "A cat.", "A dog.")]);
    fails(&mut logps(&m, &data), &["image.jsonl, line 1, field `prompt`", "part 1: a part of type \"image\""]);
}

// ---------------------------------------------------------------- defect 5: rows against the model's positions

/// Two rows; the second is longer than the fixtures' 256 positions.
fn long_rows(dir: &Path) -> PathBuf {
    let long = "many words ".repeat(200);
    jsonl(
        &dir.join("long.jsonl"),
        &[
            json!({"prompt": "Q:", "chosen": " yes", "rejected": " no"}),
            json!({"prompt": long, "chosen": " yes", "rejected": " no"}),
        ],
    )
}

#[test]
fn a_row_longer_than_learned_positions_is_refused_naming_file_row_and_flag() {
    let dir = scratch("long-rows");
    let data = long_rows(&dir);
    let (policy, reference) = (model("gpt2-policy"), model("gpt2-ref"));
    let wants = ["long.jsonl, line 2", "more than the 256 positions", "--max-length 256"];
    fails(&mut logps(&policy, &data), &wants);
    fails(&mut eval(&policy, &reference, &data), &wants);
    fails(&mut reward(&policy, &reference, &data), &wants);
    // The flag the message names exists on every scoring command, with --truncation beside it.
    for mut c in [logps(&policy, &data), eval(&policy, &reference, &data), reward(&policy, &reference, &data)] {
        succeeds(c.args(["--max-length", "256", "--truncation", "keep-end"]));
    }
    // A rotary model extends its positions as transformers does: the same rows are read.
    succeeds(&mut logps(&model("llama-policy"), &data));
}

#[test]
fn warnings_about_rows_name_the_rows() {
    let dir = scratch("row-warnings");
    let data = long_rows(&dir);
    // A prompt longer than --max-length leaves its completion nothing: the row is dropped, and named.
    let err = succeeds(logps(&model("gpt2-policy"), &data).args(["--max-length", "100"]));
    assert!(err.contains("warning: ") && err.contains("1 examples dropped") && err.contains(": line 2"), "{err}");
}

#[test]
fn training_lowers_the_default_max_length_to_the_models_positions_and_refuses_longer_rows_up_front() {
    let dir = scratch("train-positions");
    // Row 2's chosen side has more tokens than the fixture's 256 positions, and fewer than 1024.
    let data = jsonl(
        &dir.join("long.jsonl"),
        &[
            json!({"prompt": "Q:", "chosen": " yes", "rejected": " no"}),
            json!({"prompt": "Q:", "chosen": " many words".repeat(60), "rejected": " no"}),
        ],
    );
    let policy = model("gpt2-policy");
    let run = |command: &str, output: &Path| {
        let mut c = dpo();
        c.args([command, "--max-steps", "1"]).arg("--model").arg(&policy).arg("--data").arg(&data);
        c.arg("--output").arg(output);
        c
    };
    let notice = "max_length lowered from its default 1024 to 256, the positions the model reads";
    // No --max-length: the default (1024) is lowered to the fixture's 256 learned positions, said once,
    // and config.toml holds the value used, so that a resumed run truncates as this one did.
    for command in ["train", "sft"] {
        let err = succeeds(&mut run(command, &dir.join(command)));
        assert_eq!(err.matches(notice).count(), 1, "{command}: {err}");
        let config = std::fs::read_to_string(dir.join(command).join("config.toml")).unwrap();
        assert!(config.lines().any(|l| l == "max_length = 256"), "{command}: {config}");
    }
    // An explicit --max-length is kept: a row longer than the learned positions is refused before the
    // first step, naming the file, the row and the flag, and no run directory is written.
    let wants = ["long.jsonl, line 2", "more than the 256 positions", "--max-length 256"];
    for command in ["train", "sft"] {
        let output = dir.join(format!("{command}-long"));
        fails(run(command, &output).args(["--max-length", "1024"]), &wants);
        assert!(!output.exists(), "{command}: {} was created", output.display());
    }
}

// ---------------------------------------------------------------- gap 7: one prompt reader

#[test]
fn generation_prompts_are_read_like_every_data_file_and_named_in_errors() {
    let dir = scratch("prompts");
    let m = model("gpt2-policy");
    let gen = |data: &Path| {
        let mut c = dpo();
        c.args(["generate", "--max-new-tokens", "4", "--temperature", "0"])
            .arg("--model")
            .arg(&m)
            .arg("--data")
            .arg(data);
        c
    };
    let long = "many words ".repeat(200);
    let data = jsonl(&dir.join("prompts.jsonl"), &[json!({"prompt": "Hello"}), json!({"prompt": long})]);
    fails(&mut gen(&data), &["prompts.jsonl, line 2: the prompt has", "256 learned positions", "--max-new-tokens"]);
    let data = jsonl(&dir.join("bad.jsonl"), &[json!({"prompt": "Hello"}), json!({"text": "x"})]);
    fails(&mut gen(&data), &["bad.jsonl, line 2, field `prompt`: missing"]);
    // A JSON array of rows, as the other readers take.
    let array = dir.join("prompts.json");
    std::fs::write(&array, json!([{"prompt": "Hello"}, {"prompt": "Bye"}]).to_string()).unwrap();
    let out = gen(&array).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8(out.stdout).unwrap().lines().count(), 2);
}
