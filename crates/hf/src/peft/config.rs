//! `adapter_config.json` (PEFT's `LoraConfig`) ↔ [`LoraConfig`].
//!
//! The fields that decide which modules get an adapter and at what rank and scale are read; the variants
//! this trainer does not run (DoRA, trained biases, `modules_to_save`, initialisations that rewrite the
//! base weights, other PEFT methods) are refused by field. Unknown fields are ignored, as PEFT ignores
//! fields of newer versions. The file written carries every field PEFT 0.21 writes, keys sorted as PEFT's
//! `save_pretrained` sorts them.

use std::path::{Path, PathBuf};

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::error::{Error, Result};

/// The adapter's configuration file in a PEFT directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The adapter's weights in a PEFT directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The PEFT release whose file layout is written (`peft_version`); `PeftModel.from_pretrained` of that
/// release loads what [`super::save_adapter`] writes.
pub const PEFT_VERSION: &str = "0.21.2";

/// Which modules get an adapter (`target_modules`).
#[derive(Clone, Debug, PartialEq)]
pub enum TargetModules {
    /// Module names or full module paths: a module matches when its full path equals one of them or ends
    /// with `"." + name`.
    Names(Vec<String>),
    /// `"all-linear"`: every linear layer except the LM head.
    AllLinear,
    /// Any other string: a regular expression the whole module path must match (`re.fullmatch`).
    Regex(String),
}

/// `init_lora_weights`: how PEFT initialised the pair. None of the accepted values changes the base
/// weights, so a stored adapter loads the same way under each; a fresh adapter uses [`LoraInit::Default`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraInit {
    /// `true`: A Kaiming-uniform, B zero ([`engine::Adapter::init_peft`]).
    Default,
    /// `false`: A and B random (tests).
    Random,
    /// `"gaussian"`: A normal with std `1/r`, B zero.
    Gaussian,
}

/// The parts of a PEFT `LoraConfig` that this trainer runs.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    /// Dropout on the adapter's input while training.
    pub lora_dropout: f32,
    /// Scale `alpha / sqrt(r)` in place of `alpha / r`.
    pub use_rslora: bool,
    pub target_modules: TargetModules,
    /// Modules left out even when targeted (names/paths, or a regular expression; never `AllLinear`).
    pub exclude_modules: Option<TargetModules>,
    /// `(pattern, r)` in file order: the first pattern matching a module's path sets its rank.
    pub rank_pattern: Vec<(String, usize)>,
    /// `(pattern, alpha)` in file order, as `rank_pattern`.
    pub alpha_pattern: Vec<(String, f64)>,
    /// Only these layer indices, when set (PEFT applies it to name targets matched by suffix).
    pub layers_to_transform: Option<Vec<usize>>,
    /// Names of the layer list (`layers`, `h`) that `layers_to_transform` counts in; empty = any.
    pub layers_pattern: Vec<String>,
    /// Whether the targeted weights are stored `[in, out]` (GPT-2's `Conv1D`). PEFT corrects it per module,
    /// so it never changes how the pair is stored or applied; kept to write it back.
    pub fan_in_fan_out: bool,
    pub init_lora_weights: LoraInit,
    pub base_model_name_or_path: Option<String>,
    /// The `adapter_config.json` this was read from; `None` for one built from command-line flags.
    pub file: Option<PathBuf>,
}

/// Fields of variants this trainer does not run: each must be absent, null, false or empty.
const UNSUPPORTED_WHEN_SET: &[(&str, &str)] = &[
    ("use_dora", "DoRA (weight-decomposed LoRA) is not supported"),
    ("lora_bias", "trained LoRA biases are not supported"),
    ("modules_to_save", "fully trained extra modules (modules_to_save) are not supported"),
    ("use_qalora", "QA-LoRA is not supported"),
    ("layer_replication", "layer replication is not supported"),
    ("target_parameters", "LoRA on parameters (target_parameters) is not supported"),
    ("trainable_token_indices", "trainable tokens are not supported"),
    ("alora_invocation_tokens", "activated LoRA (aLoRA) is not supported"),
    ("use_bdlora", "BD-LoRA is not supported"),
    ("megatron_config", "Megatron-parallel LoRA layers are not supported"),
    ("arrow_config", "Arrow routing is not supported"),
    ("kasa_config", "KaSA is not supported"),
    ("monteclora_config", "MonteCLoRA is not supported"),
    ("velora_config", "VeLoRA is not supported"),
    ("lora_ga_config", "LoRA-GA is not supported"),
    ("loftq_config", "LoftQ is not supported"),
    ("corda_config", "CorDA is not supported"),
    ("eva_config", "EVA is not supported"),
];

impl LoraConfig {
    /// Reads and checks `path` (an `adapter_config.json`).
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let raw: Value = serde_json::from_slice(&text).map_err(|e| Error::json(path, e))?;
        let patterns: OrderedPatterns = serde_json::from_slice(&text).map_err(|e| Error::json(path, e))?;
        Self::from_json(&raw, patterns, path)
    }

    fn from_json(raw: &Value, patterns: OrderedPatterns, path: &Path) -> Result<Self> {
        let err = |field: &str, msg: String| Error::field(path, field, msg);
        let Value::Object(obj) = raw else {
            return Err(err("<root>", "adapter_config.json must hold a JSON object".into()));
        };
        let get = |name: &str| obj.get(name).filter(|v| !v.is_null());
        match get("peft_type").and_then(Value::as_str) {
            Some("LORA") => {}
            Some(other) => return Err(err("peft_type", format!("`{other}` is not supported; only LORA adapters are"))),
            None => return Err(err("peft_type", "missing; expected \"LORA\"".into())),
        }
        match get("task_type") {
            None => {}
            Some(Value::String(t)) if t == "CAUSAL_LM" => {}
            Some(v) => {
                return Err(err(
                    "task_type",
                    format!("{v} is not supported; this trainer adapts causal LMs (CAUSAL_LM)"),
                ))
            }
        }
        match get("bias").map(|v| v.as_str()) {
            None | Some(Some("none")) => {}
            Some(_) => return Err(err("bias", format!("{} is not supported; only \"none\"", obj["bias"]))),
        }
        for (field, why) in UNSUPPORTED_WHEN_SET {
            let set = match get(field) {
                None | Some(Value::Bool(false)) => false,
                Some(Value::Array(a)) => !a.is_empty(),
                Some(Value::Object(o)) => !o.is_empty(),
                Some(_) => true,
            };
            if set {
                return Err(err(field, format!("{why} (found {})", obj[*field])));
            }
        }
        let r = positive_usize(get("r"), "r", path)?.ok_or_else(|| err("r", "missing; expected the rank".into()))?;
        let lora_alpha = match get("lora_alpha") {
            None => 8.0, // PEFT's default
            Some(v) => {
                v.as_f64().filter(|a| a.is_finite()).ok_or_else(|| err("lora_alpha", format!("{v} is not a number")))?
            }
        };
        let lora_dropout = match get("lora_dropout") {
            None => 0.0,
            Some(v) => v
                .as_f64()
                .filter(|p| (0.0..1.0).contains(p))
                .ok_or_else(|| err("lora_dropout", format!("{v} must be a number in [0, 1)")))?,
        };
        let target_modules = match get("target_modules") {
            None => return Err(err("target_modules", "missing; the adapter names no modules".into())),
            Some(v) => {
                targets(v).ok_or_else(|| err("target_modules", format!("{v}: expected a list of names or a string")))?
            }
        };
        let exclude_modules = match get("exclude_modules") {
            None => None,
            Some(v) => match targets(v) {
                Some(TargetModules::AllLinear) | None => {
                    return Err(err(
                        "exclude_modules",
                        format!("{v}: expected a list of names or a regular expression"),
                    ))
                }
                Some(TargetModules::Names(n)) if n.is_empty() => None,
                t => t,
            },
        };
        let rank_pattern = patterns
            .rank_pattern
            .map(|p| p.0)
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| match positive_usize(Some(&v), &format!("rank_pattern.{k}"), path)? {
                Some(r) => Ok((k, r)),
                None => Err(err(&format!("rank_pattern.{k}"), "expected a positive rank".into())),
            })
            .collect::<Result<Vec<_>>>()?;
        let alpha_pattern = patterns
            .alpha_pattern
            .map(|p| p.0)
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| match v.as_f64().filter(|a| a.is_finite()) {
                Some(a) => Ok((k, a)),
                None => Err(err(&format!("alpha_pattern.{k}"), format!("{v} is not a number"))),
            })
            .collect::<Result<Vec<_>>>()?;
        let layers_to_transform = match get("layers_to_transform") {
            None => None,
            Some(Value::Array(a)) if a.is_empty() => None,
            Some(v) => Some(layer_indices(v).ok_or_else(|| {
                err("layers_to_transform", format!("{v}: expected a layer index or a list of layer indices"))
            })?),
        };
        let layers_pattern = match get("layers_pattern") {
            None => Vec::new(),
            Some(Value::String(s)) if s.is_empty() => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| err("layers_pattern", format!("{}: expected strings", obj["layers_pattern"])))?,
            Some(v) => return Err(err("layers_pattern", format!("{v}: expected a string or a list of strings"))),
        };
        let init_lora_weights = match get("init_lora_weights") {
            None | Some(Value::Bool(true)) => LoraInit::Default,
            Some(Value::Bool(false)) => LoraInit::Random,
            Some(Value::String(s)) if s == "gaussian" => LoraInit::Gaussian,
            Some(v) => {
                return Err(err(
                    "init_lora_weights",
                    format!(
                        "{v} is not supported: initialisations that rewrite the base weights (PiSSA, OLoRA, LoftQ, \
                         CorDA, ...) or are not PEFT's plain LoRA cannot be loaded on the original base; convert the \
                         adapter to plain LoRA first"
                    ),
                ))
            }
        };
        let flag = |name: &str| match get(name) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(err(name, format!("expected true or false, found {v}"))),
        };
        Ok(LoraConfig {
            r,
            lora_alpha,
            lora_dropout: lora_dropout as f32,
            use_rslora: flag("use_rslora")?,
            target_modules,
            exclude_modules,
            rank_pattern,
            alpha_pattern,
            layers_to_transform,
            layers_pattern,
            fan_in_fan_out: flag("fan_in_fan_out")?,
            init_lora_weights,
            base_model_name_or_path: get("base_model_name_or_path").and_then(Value::as_str).map(str::to_string),
            file: Some(path.to_path_buf()),
        })
    }

    /// Where `field` came from, for messages: the file and the field, or the command-line flag.
    pub fn origin(&self, field: &str) -> String {
        match &self.file {
            Some(p) => format!("{}: field `{field}`", p.display()),
            None => "--lora-targets".to_string(),
        }
    }

    /// The text of the `adapter_config.json` PEFT 0.21 writes for this configuration, with `lora_dropout`
    /// set to `dropout` (the adapter's own): keys sorted as PEFT sorts them, except inside `rank_pattern`
    /// and `alpha_pattern`, whose order decides which pattern applies and is kept.
    pub fn to_json_text(&self, dropout: f32) -> String {
        let mut fields = self.to_json(dropout);
        let fields = fields.as_object_mut().map(std::mem::take).unwrap_or_default();
        let ordered =
            |pairs: Vec<(String, Value)>| Field::Object(pairs.into_iter().map(|(k, v)| (k, Field::Plain(v))).collect());
        let entries: Vec<(String, Field)> = fields
            .into_iter()
            .map(|(k, v)| {
                let f = match k.as_str() {
                    "rank_pattern" => ordered(self.rank_pattern.iter().map(|(p, r)| (p.clone(), json!(r))).collect()),
                    "alpha_pattern" => {
                        ordered(self.alpha_pattern.iter().map(|(p, a)| (p.clone(), number(*a))).collect())
                    }
                    _ => Field::Plain(v),
                };
                (k, f)
            })
            .collect();
        let mut text = serde_json::to_string_pretty(&Field::Object(entries)).unwrap_or_default();
        text.push('\n');
        text
    }

    /// [`LoraConfig::to_json_text`] as a value (its patterns sorted by key, as a JSON object keeps them).
    pub fn to_json(&self, dropout: f32) -> Value {
        let targets = |t: &TargetModules| match t {
            TargetModules::Names(n) => json!(n),
            TargetModules::AllLinear => json!("all-linear"),
            TargetModules::Regex(r) => json!(r),
        };
        let rank_pattern: Map<String, Value> = self.rank_pattern.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        let alpha_pattern: Map<String, Value> =
            self.alpha_pattern.iter().map(|(k, v)| (k.clone(), number(*v))).collect();
        let init = match self.init_lora_weights {
            LoraInit::Default => json!(true),
            LoraInit::Random => json!(false),
            LoraInit::Gaussian => json!("gaussian"),
        };
        let layers_pattern = match self.layers_pattern.as_slice() {
            [] => Value::Null,
            [one] => json!(one),
            many => json!(many),
        };
        json!({
            "alora_invocation_tokens": null,
            "alpha_pattern": alpha_pattern,
            "arrow_config": null,
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": "none",
            "corda_config": null,
            "ensure_weight_tying": false,
            "eva_config": null,
            "exclude_modules": self.exclude_modules.as_ref().map(targets),
            "fan_in_fan_out": self.fan_in_fan_out,
            "inference_mode": true,
            "init_lora_weights": init,
            "kasa_config": null,
            "layer_replication": null,
            "layers_pattern": layers_pattern,
            "layers_to_transform": self.layers_to_transform,
            "loftq_config": {},
            "lora_alpha": number(self.lora_alpha),
            "lora_bias": false,
            // The f32's shortest decimal (0.1, not 0.10000000149011612).
            "lora_dropout": dropout.to_string().parse::<f64>().unwrap_or(dropout as f64),
            "lora_ga_config": null,
            "megatron_config": null,
            "megatron_core": "megatron.core",
            "modules_to_save": null,
            "monteclora_config": null,
            "peft_type": "LORA",
            "peft_version": PEFT_VERSION,
            "qalora_group_size": 16,
            "r": self.r,
            "rank_pattern": rank_pattern,
            "revision": null,
            "target_modules": targets(&self.target_modules),
            "target_parameters": null,
            "task_type": "CAUSAL_LM",
            "trainable_token_indices": null,
            "use_bdlora": null,
            "use_dora": false,
            "use_qalora": false,
            "use_rslora": self.use_rslora,
            "velora_config": null,
        })
    }
}

/// An integral alpha as an integer (PEFT writes `"lora_alpha": 16`), any other as a float.
fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

/// A JSON value written with a chosen key order (`serde_json::Map` sorts its keys).
enum Field {
    Plain(Value),
    /// An object whose keys are written in this order.
    Object(Vec<(String, Field)>),
}

impl serde::Serialize for Field {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            Field::Plain(v) => v.serialize(s),
            Field::Object(pairs) => {
                let mut m = s.serialize_map(Some(pairs.len()))?;
                for (k, v) in pairs {
                    m.serialize_entry(k, v)?;
                }
                m.end()
            }
        }
    }
}

fn targets(v: &Value) -> Option<TargetModules> {
    match v {
        Value::String(s) if s.eq_ignore_ascii_case("all-linear") => Some(TargetModules::AllLinear),
        Value::String(s) => Some(TargetModules::Regex(s.clone())),
        Value::Array(a) => {
            a.iter().map(|x| x.as_str().map(str::to_string)).collect::<Option<Vec<_>>>().map(TargetModules::Names)
        }
        _ => None,
    }
}

fn layer_indices(v: &Value) -> Option<Vec<usize>> {
    let one = |x: &Value| x.as_u64().and_then(|i| usize::try_from(i).ok());
    match v {
        Value::Array(a) => a.iter().map(one).collect(),
        v => one(v).map(|i| vec![i]),
    }
}

fn positive_usize(v: Option<&Value>, field: &str, path: &Path) -> Result<Option<usize>> {
    match v {
        None => Ok(None),
        Some(v) => match v.as_u64().and_then(|x| usize::try_from(x).ok()) {
            Some(x) if x > 0 => Ok(Some(x)),
            _ => Err(Error::field(path, field, format!("{v}: expected a positive integer"))),
        },
    }
}

/// `rank_pattern` and `alpha_pattern` in file order (a `serde_json::Map` sorts its keys, and PEFT takes
/// the first pattern that matches, in the file's order).
#[derive(Deserialize)]
struct OrderedPatterns {
    #[serde(default)]
    rank_pattern: Option<Ordered>,
    #[serde(default)]
    alpha_pattern: Option<Ordered>,
}

struct Ordered(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Ordered;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of patterns")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Ordered, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    out.push(entry);
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(V)
    }
}
