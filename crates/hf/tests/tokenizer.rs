//! Tokenization reproduces TRL's, special tokens resolve from every place transformers keeps them, and
//! chat templates render in a sandbox.

mod common;

use common::{parity, TempDir};
use dpo_hf::{load_tokenizer, ChatMessage, Error, Tokenizer};
use serde_json::Value;

fn jsonl(rel: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(parity(rel)).unwrap();
    text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn encoding_reproduces_trl() {
    let tok = load_tokenizer(&parity("models/gpt2-policy")).unwrap();
    assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id()), (Some(0), Some(0), Some(1)));
    assert_eq!((tok.eos_token(), tok.pad_token()), (Some("<|endoftext|>"), Some("<|pad|>")));
    let eos = tok.eos_token().unwrap();
    let rows = jsonl("data/prefs.jsonl");
    let want = jsonl("data/prefs.tokenized.jsonl");
    assert_eq!(rows.len(), want.len());

    // The first row, exactly as the brief states TRL's rule.
    let (r, w) = (&rows[0], &want[0]);
    let prompt = r["prompt"].as_str().unwrap();
    let chosen = r["chosen"].as_str().unwrap();
    assert_eq!(tok.encode(prompt, false).unwrap(), ids(&w["prompt_ids"]));
    assert_eq!(tok.encode(prompt, true).unwrap(), ids(&w["prompt_ids"]), "this tokenizer adds no specials");
    let full = tok.encode(&format!("{prompt}{chosen}{eos}"), false).unwrap();
    assert_eq!(full, [ids(&w["prompt_ids"]), ids(&w["chosen_ids"])].concat());

    // Every row: the completion is what follows the common prefix of prompt and prompt + completion.
    for (r, w) in rows.iter().zip(&want) {
        let prompt = r["prompt"].as_str().unwrap();
        let p = tok.encode(prompt, false).unwrap();
        assert_eq!(p, ids(&w["prompt_ids"]), "{prompt}");
        for key in ["chosen", "rejected"] {
            let full = tok.encode(&format!("{prompt}{}{eos}", r[key].as_str().unwrap()), false).unwrap();
            let k = p.iter().zip(&full).take_while(|(a, b)| a == b).count();
            assert_eq!(full[k..], ids(&w[format!("{key}_ids").as_str()])[..], "{prompt} / {key}");
        }
    }
    assert_eq!(tok.decode(&ids(&want[0]["prompt_ids"]), false).unwrap(), rows[0]["prompt"].as_str().unwrap());
    assert_eq!(tok.decode(&[0], true).unwrap(), "");
}

/// A directory holding the fixture tokenizer.json plus the given extra files.
fn tok_dir(tag: &str, files: &[(&str, &str)]) -> TempDir {
    let t = TempDir::new(tag);
    std::fs::copy(parity("tokenizer/tokenizer.json"), t.path().join("tokenizer.json")).unwrap();
    for (name, text) in files {
        std::fs::write(t.path().join(name), text).unwrap();
    }
    t
}

const CHATML: &str = "{{ bos_token }}{% for message in messages %}\
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'].strip() + '<|im_end|>' + '\\n' }}\
{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

fn convo() -> Vec<ChatMessage> {
    vec![ChatMessage::new("user", "  Hi there "), ChatMessage::new("assistant", "Hello!")]
}

#[test]
fn chat_template_from_jinja_file_renders() {
    let t = tok_dir(
        "chatml",
        &[
            ("chat_template.jinja", CHATML),
            ("tokenizer_config.json", r#"{"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}"#),
        ],
    );
    let tok = Tokenizer::from_dir(t.path()).unwrap();
    assert_eq!(tok.chat_template(), Some(CHATML));
    let out = tok.apply_chat_template(&convo(), false).unwrap();
    assert_eq!(out, "<|endoftext|><|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n");
    let out = tok.apply_chat_template(&convo()[..1], true).unwrap();
    assert_eq!(out, "<|endoftext|><|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n");
}

#[test]
fn chat_template_from_tokenizer_config_string_or_list() {
    let cfg = serde_json::json!({"eos_token": {"content": "<|endoftext|>", "special": true}, "chat_template": CHATML});
    let t = tok_dir("tc-string", &[("tokenizer_config.json", &cfg.to_string())]);
    let tok = Tokenizer::from_dir(t.path()).unwrap();
    assert_eq!(tok.eos_token(), Some("<|endoftext|>"));
    assert_eq!(tok.bos_token(), None);
    assert!(tok.apply_chat_template(&convo(), false).unwrap().starts_with("<|im_start|>user\nHi there"));

    let cfg = serde_json::json!({"chat_template": [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "{% for m in messages %}[{{ m.role | upper }}]{% endfor %}"},
    ]});
    let t = tok_dir("tc-list", &[("tokenizer_config.json", &cfg.to_string())]);
    let tok = Tokenizer::from_dir(t.path()).unwrap();
    assert_eq!(tok.apply_chat_template(&convo(), false).unwrap(), "[USER][ASSISTANT]");
}

#[test]
fn special_tokens_fall_back_to_config_ids() {
    let t = tok_dir("ids", &[("config.json", r#"{"eos_token_id": [1, 0], "bos_token_id": 0}"#)]);
    let tok = Tokenizer::from_dir(t.path()).unwrap();
    assert_eq!((tok.eos_id(), tok.eos_token()), (Some(1), Some("<|pad|>")));
    assert_eq!(tok.bos_token(), Some("<|endoftext|>"));
    assert_eq!(tok.pad_id(), None);

    let t = tok_dir("unknown-tok", &[("tokenizer_config.json", r#"{"eos_token": "</s>"}"#)]);
    let e = Tokenizer::from_dir(t.path()).unwrap_err().to_string();
    assert!(e.contains("tokenizer_config.json") && e.contains("eos_token") && e.contains("</s>"), "{e}");
}

#[test]
fn template_failures_are_errors_naming_the_source() {
    let raising =
        "{% if messages[0].role != 'system' %}{{ raise_exception('first message must be system') }}{% endif %}";
    let t = tok_dir("raise", &[("chat_template.jinja", raising)]);
    let tok = Tokenizer::from_dir(t.path()).unwrap();
    let e = tok.apply_chat_template(&convo(), false).unwrap_err();
    assert!(matches!(e, Error::ChatTemplate { .. }));
    let msg = e.to_string();
    assert!(msg.contains("chat_template.jinja") && msg.contains("first message must be system"), "{msg}");

    // No loader: a template cannot read files, even ones beside it.
    let t = tok_dir("include", &[("chat_template.jinja", "{% include 'secret.txt' %}"), ("secret.txt", "SECRET")]);
    let tok = Tokenizer::from_dir(t.path()).unwrap();
    let msg = tok.apply_chat_template(&convo(), false).unwrap_err().to_string();
    assert!(!msg.contains("SECRET") && msg.contains("secret.txt"), "{msg}");

    // A syntax error is reported when the template is used, not when the tokenizer loads.
    let t = tok_dir("syntax", &[("chat_template.jinja", "{% for m in messages %}")]);
    let tok = Tokenizer::from_dir(t.path()).unwrap();
    assert!(tok.apply_chat_template(&convo(), false).is_err());

    let t = tok_dir("none", &[]);
    let e = Tokenizer::from_dir(t.path()).unwrap().apply_chat_template(&convo(), false).unwrap_err();
    assert!(matches!(e, Error::NoChatTemplate { .. }), "{e}");
}

#[test]
fn loop_controls_and_python_methods_work() {
    let tpl = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}\
               {{ m.content.lower().startswith('  hi') }}{% endfor %}";
    let t = tok_dir("loopctl", &[("chat_template.jinja", tpl)]);
    let tok = Tokenizer::from_dir(t.path()).unwrap();
    assert_eq!(tok.apply_chat_template(&convo(), false).unwrap(), "True");
}

#[test]
fn missing_tokenizer_json_is_explained() {
    let t = TempDir::new("no-tok");
    let e = load_tokenizer(t.path()).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json") && e.contains("fast tokenizer"), "{e}");
}
