//! The fast tokenizer (`tokenizer.json`), its special tokens and its chat template.
//!
//! Special-token strings come from `tokenizer_config.json` (or `special_tokens_map.json`), falling back
//! to the ids in `config.json`. The chat template comes from `chat_template.jinja` (transformers 5) or
//! `tokenizer_config.json`'s `chat_template` (4.x) and is rendered with minijinja configured like
//! transformers' sandboxed jinja2 environment: `trim_blocks`, `lstrip_blocks`, loop controls, Python
//! string/dict/list methods, `raise_exception`, and no access to the file system.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{read_json, Error, Result};

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// A special token: its text and its id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecialToken {
    pub content: String,
    pub id: u32,
}

const TEMPLATE_NAME: &str = "chat_template";

/// Instructions one rendering of a chat template may run (minijinja's fuel). Real templates take a few
/// thousand per conversation; a runaway loop stops here within a second or so instead of running for hours.
pub const TEMPLATE_FUEL: u64 = 50_000_000;

/// Bytes one rendering of a chat template may write: far more than any conversation a model reads, far
/// less than what would exhaust memory.
pub const MAX_TEMPLATE_OUTPUT: usize = 64 << 20;

/// A loaded tokenizer with its special tokens and (optional) chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    bos: Option<SpecialToken>,
    eos: Option<SpecialToken>,
    pad: Option<SpecialToken>,
    unk: Option<SpecialToken>,
    /// (where it came from, template text)
    template: Option<(String, String)>,
    /// Compiled on first use; a template that does not parse is reported when it is applied.
    env: OnceLock<std::result::Result<Environment<'static>, String>>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field("chat_template", &self.template.as_ref().map(|t| &t.0))
            .finish()
    }
}

impl Tokenizer {
    /// Only `tokenizer.json`: no special-token roles, no chat template.
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            msg: format!("cannot load the tokenizer: {e}"),
        })?;
        Ok(Tokenizer {
            inner,
            path: path.to_path_buf(),
            bos: None,
            eos: None,
            pad: None,
            unk: None,
            template: None,
            env: OnceLock::new(),
        })
    }

    /// A model or tokenizer directory: `tokenizer.json`, plus `tokenizer_config.json`,
    /// `special_tokens_map.json`, `config.json` and `chat_template.jinja` when present.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::Tokenizer {
                path,
                msg: "missing; only fast tokenizers are loaded. Save one with \
                      `AutoTokenizer.from_pretrained(dir).save_pretrained(dir)` in Python"
                    .into(),
            });
        }
        let mut tok = Self::from_file(&path)?;
        let tc_path = dir.join("tokenizer_config.json");
        let tc = optional_json(&tc_path)?;
        let stm_path = dir.join("special_tokens_map.json");
        let stm = optional_json(&stm_path)?;
        let cfg_path = dir.join("config.json");
        let cfg = optional_json(&cfg_path)?;
        let sources = [(&tc_path, tc.as_ref()), (&stm_path, stm.as_ref())];
        tok.bos = tok.special(&sources, "bos_token", (&cfg_path, cfg.as_ref()), "bos_token_id")?;
        tok.eos = tok.special(&sources, "eos_token", (&cfg_path, cfg.as_ref()), "eos_token_id")?;
        tok.pad = tok.special(&sources, "pad_token", (&cfg_path, cfg.as_ref()), "pad_token_id")?;
        tok.unk = tok.special(&sources, "unk_token", (&cfg_path, cfg.as_ref()), "unk_token_id")?;

        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            let text = std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?;
            tok.template = Some((jinja.display().to_string(), text));
        } else if let Some(t) = tc.as_ref().and_then(|tc| tc.get("chat_template")).filter(|t| !t.is_null()) {
            let source = format!("{}'s `chat_template`", tc_path.display());
            let text = match t {
                Value::String(s) => Some(s.clone()),
                // A list of named templates: the one called "default" is the chat template.
                Value::Array(list) => list
                    .iter()
                    .find(|e| e.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|e| e.get("template"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
                _ => {
                    return Err(Error::field(
                        &tc_path,
                        "chat_template",
                        "expected a string or a list of {name, template}",
                    ))
                }
            };
            tok.template = text.map(|t| (source, t));
        }
        Ok(tok)
    }

    /// Replaces the chat template (e.g. one given on the command line); `source_name` names it in errors.
    pub fn with_chat_template(mut self, template: String, source_name: String) -> Self {
        self.template = Some((source_name, template));
        self.env = OnceLock::new();
        self
    }

    /// Resolves one special token: its string from the first config file that names it (a string or an
    /// AddedToken object `{"content": ..}`), else its id from `config.json`.
    fn special(
        &self,
        sources: &[(&PathBuf, Option<&Value>)],
        field: &str,
        config: (&PathBuf, Option<&Value>),
        id_field: &str,
    ) -> Result<Option<SpecialToken>> {
        for (path, json) in sources {
            let Some(v) = json.and_then(|j| j.get(field)) else { continue };
            let content = match v {
                Value::Null => continue,
                Value::String(s) => s.clone(),
                Value::Object(o) => match o.get("content").and_then(Value::as_str) {
                    Some(s) => s.to_string(),
                    None => return Err(Error::field(path, field, "an AddedToken object needs a string `content`")),
                },
                _ => return Err(Error::field(path, field, "expected a string or {\"content\": ...}")),
            };
            let id = self.inner.token_to_id(&content).ok_or_else(|| {
                Error::field(path, field, format!("token {content:?} is not in {}", self.path.display()))
            })?;
            return Ok(Some(SpecialToken { content, id }));
        }
        let (cfg_path, cfg) = config;
        let id = match cfg.and_then(|c| c.get(id_field)) {
            Some(Value::Array(a)) => a.first().and_then(Value::as_u64),
            Some(v) => v.as_u64(),
            None => None,
        };
        let Some(id) = id.and_then(|i| u32::try_from(i).ok()) else { return Ok(None) };
        let content = self
            .inner
            .id_to_token(id)
            .ok_or_else(|| Error::field(cfg_path, id_field, format!("id {id} is not in {}", self.path.display())))?;
        Ok(Some(SpecialToken { content, id }))
    }

    fn err(&self, msg: String) -> Error {
        Error::Tokenizer { path: self.path.clone(), msg }
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| self.err(format!("encoding failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| self.err(format!("decoding failed: {e}")))
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos.as_ref().map(|t| t.id)
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos.as_ref().map(|t| t.id)
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.pad.as_ref().map(|t| t.id)
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_ref().map(|t| t.content.as_str())
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos.as_ref().map(|t| t.content.as_str())
    }

    pub fn pad_token(&self) -> Option<&str> {
        self.pad.as_ref().map(|t| t.content.as_str())
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The wrapped `tokenizers` object, for what this type does not expose.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The `tokenizer.json` this was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.template.as_ref().map(|t| t.1.as_str())
    }

    /// Renders `messages` with the chat template, as transformers' `apply_chat_template(tokenize=False)`.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let Some((source, text)) = &self.template else {
            return Err(Error::NoChatTemplate { dir: self.path.parent().unwrap_or(Path::new(".")).to_path_buf() });
        };
        let fail = |msg: String| Error::ChatTemplate { source_name: source.clone(), msg };
        let env = self.env.get_or_init(|| template_env(text.clone()).map_err(|e| describe(&e)));
        let env = env.as_ref().map_err(|m| fail(m.clone()))?;
        let template = env.get_template(TEMPLATE_NAME).map_err(|e| fail(describe(&e)))?;
        // An unset special token is undefined (renders as ""), as in transformers, not `none`.
        let tok = |t: &Option<SpecialToken>| match t {
            Some(t) => minijinja::Value::from(t.content.as_str()),
            None => minijinja::Value::UNDEFINED,
        };
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => tok(&self.bos),
            eos_token => tok(&self.eos),
            pad_token => tok(&self.pad),
            unk_token => tok(&self.unk),
        };
        let mut out = BoundedOutput { bytes: Vec::new(), exceeded: false };
        match template.render_captured_to(ctx, &mut out) {
            Ok(_) => String::from_utf8(out.bytes).map_err(|e| fail(format!("rendered text is not UTF-8 ({e})"))),
            Err(_) if out.exceeded => Err(fail(format!(
                "the rendered text passed {} MiB and was stopped there (a template that loops without end?)",
                MAX_TEMPLATE_OUTPUT >> 20
            ))),
            Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(fail(format!(
                "rendering ran more than {TEMPLATE_FUEL} template instructions and was stopped (a template that \
                 loops without end?)"
            ))),
            Err(e) => Err(fail(describe(&e))),
        }
    }
}

/// The rendered text, refusing to grow past [`MAX_TEMPLATE_OUTPUT`].
struct BoundedOutput {
    bytes: Vec<u8>,
    exceeded: bool,
}

impl std::io::Write for BoundedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > MAX_TEMPLATE_OUTPUT {
            self.exceeded = true;
            return Err(std::io::Error::other("chat template output limit"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A sandboxed environment holding one template: no loader, so `include`/`import`/`extends` cannot reach
/// the file system.
fn template_env(text: String) -> std::result::Result<Environment<'static>, minijinja::Error> {
    let mut env = Environment::new();
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
        Err(minijinja::Error::new(ErrorKind::InvalidOperation, format!("raise_exception: {msg}")))
    });
    env.add_template_owned(TEMPLATE_NAME, text)?;
    Ok(env)
}

/// minijinja's message with its causes and the template line.
fn describe(e: &minijinja::Error) -> String {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    msg
}

fn optional_json(path: &Path) -> Result<Option<Value>> {
    if path.is_file() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn with_template(template: &str) -> Tokenizer {
        let file =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parity/models/gpt2-policy/tokenizer.json");
        Tokenizer::from_file(&file).unwrap().with_chat_template(template.into(), "loop.jinja".into())
    }

    fn render(tok: &Tokenizer) -> Result<String> {
        tok.apply_chat_template(&[ChatMessage::new("user", "hi")], true)
    }

    #[test]
    fn a_template_that_loops_without_end_is_stopped_by_its_fuel() {
        // 10^10 iterations writing nothing: without fuel this runs for hours.
        let tok = with_template("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}");
        let t0 = Instant::now();
        let e = render(&tok).unwrap_err().to_string();
        assert!(e.contains("loop.jinja") && e.contains("template instructions and was stopped"), "{e}");
        assert!(t0.elapsed().as_secs() < 30, "took {:?}", t0.elapsed());
    }

    #[test]
    fn a_template_whose_output_grows_without_end_is_stopped_at_the_output_limit() {
        // 10^10 bytes (it aborted on allocation before): stopped at MAX_TEMPLATE_OUTPUT.
        let tok = with_template("{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}");
        let e = render(&tok).unwrap_err().to_string();
        assert!(e.contains("loop.jinja") && e.contains("the rendered text passed 64 MiB"), "{e}");
        // An ordinary template still renders.
        let tok = with_template("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}");
        assert_eq!(render(&tok).unwrap(), "<user>hi");
    }
}
