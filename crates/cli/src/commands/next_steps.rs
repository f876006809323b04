//! The command a finished run prints to go on with its model. After a pair objective, `dpo eval`: the
//! run's final model scored on its evaluation data (or its training data) with the run's own settings, so
//! that the rows are read and scored as they were in training. The settings come from the run's
//! config.toml, which holds them as the run resolved them (the max length lowered to the model's
//! positions, the storage of a LoRA base); eval's own defaults differ (no max length: every row whole).
//! After SFT, the DPO half of SFT-then-DPO.

use std::path::Path;

use dpo::train::{Objective, TrainConfig};

/// The run settings `dpo eval` takes under the same flag name (`max_length` as `--max-length`): how rows
/// are cut, the precision and base storage of the passes, and the objective that scores them.
const EVAL_FLAGS: [&str; 17] = [
    "max_length",
    "max_prompt_length",
    "truncation",
    "precision",
    "quantize",
    "double_quant",
    "base_dtype",
    "loss",
    "loss_weights",
    "beta",
    "label_smoothing",
    "f_divergence",
    "f_alpha",
    "simpo_gamma",
    "alphapo_alpha",
    "discopop_tau",
    "reference_free",
];

/// What to run next on the model a finished run wrote to `final_dir`, and how the line says it: `dpo
/// eval` of a pair objective's run ([`eval_command`]), the DPO half of SFT-then-DPO after an SFT run;
/// `None` after KTO's unpaired rows or unlikelihood, which `dpo eval` does not score.
pub fn next_command(cfg: &TrainConfig, final_dir: &Path) -> Option<(&'static str, String)> {
    match cfg.objective {
        Objective::Pairs(_) => Some(("evaluate with", eval_command(cfg, final_dir))),
        Objective::Sft => {
            let policy = match cfg.is_lora() {
                true => format!("{} --adapter {}", cfg.model.display(), final_dir.display()),
                false => final_dir.display().to_string(),
            };
            Some(("align it with", format!("dpo train --model {policy} --data PREFERENCES.jsonl")))
        }
        Objective::Kto(_) | Objective::Unlikelihood(_) => None,
    }
}

/// `dpo eval ...` for the pair objective's run `cfg` describes, whose final model is `final_dir`.
fn eval_command(cfg: &TrainConfig, final_dir: &Path) -> String {
    let reference = match (&cfg.ref_model, &cfg.adapter) {
        (Some(r), _) => format!(" --ref-model {}", r.display()),
        (None, Some(start)) if cfg.is_lora() => format!(" --ref-adapter {}", start.display()),
        (None, _) if cfg.is_lora() => String::new(),
        (None, _) => format!(" --ref-model {}", cfg.model.display()),
    };
    let policy = match cfg.is_lora() {
        true => format!("{} --adapter {}", cfg.model.display(), final_dir.display()),
        false => final_dir.display().to_string(),
    };
    let data = cfg.eval_data.as_ref().unwrap_or(&cfg.data);
    let settings = run_settings(cfg);
    format!("dpo eval --model {policy}{reference} --data {}{}", data.display(), eval_flags(&settings, cfg))
}

/// The run's settings as config.toml holds them, or (a run directory without one) as `cfg` has them.
fn run_settings(cfg: &TrainConfig) -> toml::Table {
    let file = cfg.output.join("config.toml");
    dpo::train::config::read_toml_table(&file)
        .ok()
        .or_else(|| toml::Table::try_from(cfg.to_raw()).ok())
        .unwrap_or_default()
}

/// ` --flag value` for each of [`EVAL_FLAGS`] that `settings` holds with another value than the default
/// (the max length always: eval has none by default); base storage only for a LoRA run, whose base eval
/// reads with `--adapter`.
fn eval_flags(settings: &toml::Table, cfg: &TrainConfig) -> String {
    let defaults = toml::Table::try_from(TrainConfig::default().to_raw()).unwrap_or_default();
    let mut out = String::new();
    for key in EVAL_FLAGS {
        let Some(value) = settings.get(key) else { continue };
        let base_storage = matches!(key, "quantize" | "double_quant" | "base_dtype");
        if (base_storage && !cfg.is_lora()) || (key != "max_length" && defaults.get(key) == Some(value)) {
            continue;
        }
        let flag = key.replace('_', "-");
        match value {
            toml::Value::Boolean(true) => out += &format!(" --{flag}"),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                if key == "loss_weights" && items.iter().all(|w| w.as_float() == Some(1.0)) {
                    continue;
                }
                let items: Vec<String> = items.iter().map(plain).collect();
                out += &format!(" --{flag} {}", items.join(","));
            }
            v => out += &format!(" --{flag} {}", plain(v)),
        }
    }
    out
}

/// A value as a command line spells it: strings without TOML's quotes.
fn plain(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        text.parse().unwrap()
    }

    #[test]
    fn a_runs_own_settings_become_eval_flags() {
        let cfg = TrainConfig::default();
        let s = table(
            "max_length = 1024\ntruncation = \"keep-end\"\nprecision = \"bf16\"\nloss = [\"sigmoid\", \"sft\"]\n\
             loss_weights = [1.0, 0.5]\nbeta = 0.25\nlabel_smoothing = 0.0\nreference_free = false\nquantize = \"nf4\"",
        );
        assert_eq!(
            eval_flags(&s, &cfg),
            " --max-length 1024 --truncation keep-end --precision bf16 --loss sigmoid,sft --loss-weights 1.0,0.5 --beta 0.25"
        );
    }

    #[test]
    fn defaults_add_nothing_but_the_max_length() {
        let cfg = TrainConfig::default();
        let s = toml::Table::try_from(TrainConfig { max_length: Some(256), ..cfg.clone() }.to_raw()).unwrap();
        assert_eq!(eval_flags(&s, &cfg), " --max-length 256");
    }
}
