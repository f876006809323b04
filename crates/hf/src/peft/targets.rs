//! Which modules of a model get an adapter: PEFT's matching rules (`check_target_module_exists`,
//! `get_pattern_key`, `"all-linear"`) over the module paths of the model's [`Naming`] row, giving the
//! engine's [`LoraTarget`]s (fused weight, rows, rank, scale) per layer.

use engine::LoraTarget;
use regex::Regex;

use super::config::{LoraConfig, LoraInit, TargetModules};
use crate::config::{ModelConfig, FAMILIES};
use crate::error::{Error, Result};
use crate::naming::{linear_modules, module_paths, Hf, LinearModule};

/// The targets of `config` on `model`, one list per layer (in the naming row's module order).
///
/// A module matches as in PEFT: a list entry matches a module whose full path equals it or ends with
/// `"." + entry` (then `layers_to_transform` filters by layer index), a string is a regular expression
/// the whole path must match, `"all-linear"` takes every block linear layer; `exclude_modules` removes
/// modules. Refused, naming the target: a list entry that matches no linear layer, a target that matches
/// a module that is not one (an embedding, a norm, the LM head, a whole block), or nothing matched at all.
pub fn resolve_targets(config: &LoraConfig, model: &ModelConfig) -> Result<Vec<Vec<LoraTarget>>> {
    let cfg = &model.decoder;
    let linear = linear_modules(model.naming, cfg);
    let others: Vec<String> = module_paths(model.naming, cfg)
        .map_err(|e| internal(config, &e.0))?
        .into_iter()
        .filter(|p| !linear.iter().any(|m| &m.key == p))
        .collect();
    let rules = Rules::new(config)?;
    let target_err = |target: &str, msg: String| Error::LoraTarget {
        origin: config.origin("target_modules"),
        target: target.to_string(),
        msg,
    };

    if let TargetModules::Names(names) = &config.target_modules {
        if names.is_empty() {
            return Err(target_err("[]", "the list of target modules is empty".into()));
        }
        for name in names {
            if !linear.iter().any(|m| name_matches(name, &m.key)) && !others.iter().any(|k| name_matches(name, k)) {
                return Err(target_err(
                    name,
                    format!(
                        "matches no module of this {} model; its linear layers are {}",
                        model.model_type,
                        layer_module_names(&linear)
                    ),
                ));
            }
        }
    }
    for key in &others {
        if rules.matches(key, false)? {
            let target = match &config.target_modules {
                TargetModules::Names(names) => names.iter().find(|n| name_matches(n, key)).cloned().unwrap_or_default(),
                TargetModules::Regex(r) => r.clone(),
                TargetModules::AllLinear => "all-linear".to_string(),
            };
            return Err(target_err(
                &target,
                format!(
                    "matches `{key}`, which is not a linear layer of a block; adapters go on {} only (not on \
                     embeddings, norms, the LM head or whole blocks)",
                    layer_module_names(&linear)
                ),
            ));
        }
    }

    let mut out = vec![Vec::new(); cfg.n_layers];
    for m in &linear {
        if rules.matches(&m.key, true)? {
            let (r, scale) = rules.rank_and_scale(&m.key);
            out[m.layer].push(LoraTarget {
                module: m.module.to_string(),
                site: m.site,
                rows: m.rows.clone(),
                r,
                scale,
            });
        }
    }
    if out.iter().all(Vec::is_empty) {
        let target = match &config.target_modules {
            TargetModules::Names(n) => n.join(","),
            TargetModules::Regex(r) => r.clone(),
            TargetModules::AllLinear => "all-linear".into(),
        };
        return Err(target_err(
            &target,
            "selects no module once `layers_to_transform` and `exclude_modules` are applied".into(),
        ));
    }
    Ok(out)
}

/// A configuration for a new adapter from command-line input (`--lora-r`, `--lora-alpha`,
/// `--lora-dropout`, rsLoRA, `--lora-targets`): `targets` empty takes PEFT's default for the model type,
/// `["all-linear"]` every linear layer, otherwise module names or paths. PEFT's default initialisation.
pub fn fresh_config(
    r: usize,
    alpha: f64,
    dropout: f32,
    use_rslora: bool,
    targets: &[String],
    model: &ModelConfig,
) -> Result<LoraConfig> {
    let invalid = |what: &str, msg: String| Error::InvalidLora { what: what.to_string(), msg };
    if r == 0 {
        return Err(invalid("rank (--lora-r)", "must be a positive integer".into()));
    }
    if !alpha.is_finite() || alpha <= 0.0 {
        return Err(invalid("alpha (--lora-alpha)", format!("{alpha} must be a finite number > 0")));
    }
    if !(0.0..1.0).contains(&dropout) {
        return Err(invalid("dropout (--lora-dropout)", format!("{dropout} must be in [0, 1)")));
    }
    let target_modules = match targets {
        [] => {
            let defaults =
                FAMILIES.iter().find(|f| f.model_type == model.model_type).map_or(&[][..], |f| f.lora_targets);
            if defaults.is_empty() {
                return Err(invalid(
                    "targets (--lora-targets)",
                    format!(
                        "PEFT has no default target modules for model_type `{}`; name them (e.g. all-linear)",
                        model.model_type
                    ),
                ));
            }
            TargetModules::Names(defaults.iter().map(|s| s.to_string()).collect())
        }
        [one] if one.eq_ignore_ascii_case("all-linear") => TargetModules::AllLinear,
        many => TargetModules::Names(many.to_vec()),
    };
    let conv1d = linear_modules(model.naming, &model.decoder).iter().any(|m| matches!(m.layout, Hf::Conv1D(_)));
    let config = LoraConfig {
        r,
        lora_alpha: alpha,
        lora_dropout: dropout,
        use_rslora,
        target_modules,
        exclude_modules: None,
        rank_pattern: Vec::new(),
        alpha_pattern: Vec::new(),
        layers_to_transform: None,
        layers_pattern: Vec::new(),
        fan_in_fan_out: conv1d,
        init_lora_weights: LoraInit::Default,
        base_model_name_or_path: model
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(|p| p.display().to_string()),
        file: None,
    };
    resolve_targets(&config, model)?;
    Ok(config)
}

/// PEFT's suffix rule for one list entry: the path equals it or ends with `"." + name`.
fn name_matches(name: &str, key: &str) -> bool {
    key == name || key.strip_suffix(name).is_some_and(|rest| rest.ends_with('.'))
}

/// `q_proj, k_proj, ...`: the distinct module names of the linear layers, for messages.
fn layer_module_names(linear: &[LinearModule]) -> String {
    let mut names: Vec<&str> = Vec::new();
    for m in linear {
        let short = m.module.rsplit('.').next().unwrap_or(m.module);
        if !names.contains(&short) {
            names.push(short);
        }
    }
    names.join(", ")
}

fn internal(config: &LoraConfig, what: &str) -> Error {
    Error::LoraTarget {
        origin: config.origin("target_modules"),
        target: what.to_string(),
        msg: "internal: the naming table has no HF module for this engine tensor; please report this".into(),
    }
}

/// `config`'s matching rules with their regular expressions compiled (Python's `re` syntax as far as the
/// `regex` crate reads it; an expression it cannot read is refused, naming it).
struct Rules<'a> {
    config: &'a LoraConfig,
    target: Option<Regex>,
    exclude: Option<Regex>,
    /// Extracts the layer index from a path for `layers_to_transform`.
    layer_index: Vec<Regex>,
    rank: Vec<(Regex, usize)>,
    alpha: Vec<(Regex, f64)>,
}

impl<'a> Rules<'a> {
    fn new(config: &'a LoraConfig) -> Result<Self> {
        let compile = |field: &str, shown: &str, anchored: String| {
            Regex::new(&anchored).map_err(|e| Error::LoraTarget {
                origin: config.origin(field),
                target: shown.to_string(),
                msg: format!("not a regular expression this trainer can read: {e}"),
            })
        };
        let full = |field: &str, t: &Option<&TargetModules>| match t {
            Some(TargetModules::Regex(p)) => compile(field, p, format!("^(?:{p})$")).map(Some),
            _ => Ok(None),
        };
        // PEFT's `get_pattern_key`: re.match(rf"(.*\.)?({key})$", path).
        let suffix = |field: &str, p: &str| compile(field, p, format!(r"^(?:.*\.)?(?:{p})$"));
        let layer_index = if config.layers_pattern.is_empty() {
            vec![compile("layers_pattern", "", r"^.*?\.[^.]*\.(?P<idx>\d+)\.".into())?]
        } else {
            let to_re = |p: &String| compile("layers_pattern", p, format!(r"^(?:|.*?\.){p}\.(?P<idx>\d+)\."));
            config.layers_pattern.iter().map(to_re).collect::<Result<_>>()?
        };
        Ok(Rules {
            config,
            target: full("target_modules", &Some(&config.target_modules))?,
            exclude: full("exclude_modules", &config.exclude_modules.as_ref())?,
            layer_index,
            rank: config
                .rank_pattern
                .iter()
                .map(|(p, r)| Ok((suffix("rank_pattern", p)?, *r)))
                .collect::<Result<_>>()?,
            alpha: config
                .alpha_pattern
                .iter()
                .map(|(p, a)| Ok((suffix("alpha_pattern", p)?, *a)))
                .collect::<Result<_>>()?,
        })
    }

    /// PEFT's `check_target_module_exists` for the module at `key`; `linear` says whether it is one of
    /// the block linear layers (all that `"all-linear"` takes).
    fn matches(&self, key: &str, linear: bool) -> Result<bool> {
        let excluded = match (&self.exclude, &self.config.exclude_modules) {
            (Some(re), _) => re.is_match(key),
            (None, Some(TargetModules::Names(names))) => names.iter().any(|n| name_matches(n, key)),
            _ => false,
        };
        if excluded {
            return Ok(false);
        }
        Ok(match &self.config.target_modules {
            // PEFT turns "all-linear" into the set of full paths, which match exactly: no layer filter.
            TargetModules::AllLinear => linear,
            TargetModules::Regex(_) => self.target.as_ref().is_some_and(|re| re.is_match(key)),
            TargetModules::Names(names) if names.iter().any(|n| n == key) => true,
            TargetModules::Names(names) => {
                let found = names.iter().any(|n| name_matches(n, key));
                match &self.config.layers_to_transform {
                    Some(layers) if found => self.layer_of(key).is_some_and(|i| layers.contains(&i)),
                    _ => found,
                }
            }
        })
    }

    /// The first layer index in `key` (`model.layers.3.mlp.up_proj` → 3), as PEFT extracts it.
    fn layer_of(&self, key: &str) -> Option<usize> {
        self.layer_index.iter().find_map(|re| re.captures(key)?.name("idx")?.as_str().parse().ok())
    }

    /// Rank and scale of the module at `key`: the first `rank_pattern` / `alpha_pattern` entry matching
    /// the end of its path, else `r` / `lora_alpha`; scale `alpha / r` or, with rsLoRA, `alpha / sqrt(r)`.
    fn rank_and_scale(&self, key: &str) -> (usize, f32) {
        let r = self.rank.iter().find(|(re, _)| re.is_match(key)).map_or(self.config.r, |(_, r)| *r);
        let alpha = self.alpha.iter().find(|(re, _)| re.is_match(key)).map_or(self.config.lora_alpha, |(_, a)| *a);
        let scale = if self.config.use_rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 };
        (r, scale as f32)
    }
}
