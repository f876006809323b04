//! What the data tests share: scratch directories, the parity fixtures' tokenizer, a chat template.

use std::path::{Path, PathBuf};

/// A fresh directory for one test (tests run in parallel, so each names its own).
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dpo-data-tests-{}", std::process::id())).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn write(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parity")
}

/// The fixtures' byte-level BPE tokenizer: `<|endoftext|>` (id 0) is EOS.
pub fn tokenizer() -> hf::Tokenizer {
    hf::Tokenizer::from_dir(&fixtures().join("tokenizer")).unwrap()
}

pub const CHATML: &str =
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}\
{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The same tokenizer in a scratch directory with a ChatML `chat_template.jinja` beside it.
pub fn chat_tokenizer(name: &str) -> hf::Tokenizer {
    let dir = scratch(&format!("{name}-tokenizer"));
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixtures().join("tokenizer").join(f), dir.join(f)).unwrap();
    }
    write(&dir, "chat_template.jinja", CHATML);
    hf::Tokenizer::from_dir(&dir).unwrap()
}

/// `text` tokenized as `tokenizer(text)` would.
pub fn enc(tok: &hf::Tokenizer, text: &str) -> Vec<u32> {
    tok.encode(text, true).unwrap()
}
