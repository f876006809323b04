//! What a resumed run must keep: the settings of its config.toml that change its numbers, and its inputs
//! (the model, reference, adapter, data and eval data: the paths config.toml names and the contents
//! `RUN/inputs.json` fingerprints). A run that switched either halfway would be neither run, so a resume
//! that changes one is refused, naming each `key: saved -> now`, before anything is written.

use std::path::{Path, PathBuf};

use super::run_dir::resume_target;
use super::{TrainConfig, TrainError};
use crate::fingerprint::{fingerprint_files, fingerprint_path, InputFingerprints};

/// The settings that do not change a run's numbers: where it writes, how often it logs, evaluates and
/// saves, the reference cache's place, the threads and the memory cap. Sampled runs (online, iterative
/// DPO) leave them out of what they record too.
pub const TRAJECTORY_FREE: [&str; 11] = [
    "output",
    "log_every",
    "save_every",
    "save_total_limit",
    "eval_every",
    "report_to",
    "cache_dir",
    "threads",
    "max_memory",
    // What is written once the run is over (the merged model) changes none of its steps.
    "merge",
    "merge_dtype",
];

/// What a resume may change besides [`TRAJECTORY_FREE`]: the run's length (training further is a real
/// use; a schedule that is not constant is recomputed over the new length, and the run says so), what a
/// non-finite step does (it stops the run or skips the step; the steps taken are the same), and the ways
/// of computing a step that change no bit of it (`gradient_checkpointing`, `micro_pairs`).
pub const MAY_CHANGE_ON_RESUME: [&str; 5] =
    ["max_steps", "epochs", "on_nonfinite", "gradient_checkpointing", "micro_pairs"];

/// The inputs a run reads, as config.toml names them; their contents are fingerprinted in [`INPUTS_FILE`].
pub const INPUT_KEYS: [&str; 5] = ["model", "ref_model", "adapter", "data", "eval_data"];

/// `RUN/inputs.json`: the fingerprint of each input's files when the run started.
pub const INPUTS_FILE: &str = "inputs.json";

/// One setting or input a resume would change: `key: was -> now`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub key: String,
    pub was: String,
    pub now: String,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} -> {}", self.key, self.was, self.now)
    }
}

/// The run directory `--resume PATH` continues and its config.toml, when it has one.
fn saved_config(resume: &Path) -> Option<(PathBuf, PathBuf)> {
    let run = resume_target(resume).run;
    let file = run.join("config.toml");
    file.is_file().then_some((run, file))
}

/// Refuses a resume of the run `resume` points into whose config.toml holds other values than `now` (this
/// run's resolved configuration) of any setting but [`TRAJECTORY_FREE`] and [`MAY_CHANGE_ON_RESUME`]:
/// every changed setting is named. Both sides are read through [`TrainConfig`], so a key an older
/// config.toml lacks counts with its default. Nothing to compare without a config.toml.
pub fn check_settings(resume: &Path, now: &TrainConfig) -> Result<(), TrainError> {
    let Some((run, file)) = saved_config(resume) else { return Ok(()) };
    let saved = TrainConfig::from_layers(Some(&file), toml::Table::new(), now.objective.method())?;
    let table = |c: &TrainConfig| toml::Table::try_from(c.to_raw()).map_err(|e| TrainError::Invalid(e.to_string()));
    let (mut was, mut is) = (table(&saved)?, table(now)?);
    // No max_length yet is the default, which setup lowers to the models' positions as it did when the
    // run started (the models are compared too): config.toml holds the value that gave.
    if now.max_length.is_none() {
        was.remove("max_length");
        is.remove("max_length");
    }
    refuse_changes(run, &was, &is, &[])
}

/// Refuses a resume of `run` whose settings `now` differ from those its config.toml holds (`was`), both as
/// flat tables, in any key but [`TRAJECTORY_FREE`], [`MAY_CHANGE_ON_RESUME`] and `may_change` (what else
/// the run calls its length: `dpo ppo`'s `steps`), naming each `key: saved -> now`
/// ([`TrainError::ResumeChanged`]). `dpo train`, `dpo ppo` and `dpo reward-model train` resume through it.
pub fn refuse_changes(
    run: PathBuf,
    was: &toml::Table,
    now: &toml::Table,
    may_change: &[&str],
) -> Result<(), TrainError> {
    let mut keys: Vec<&String> = was.keys().chain(now.keys()).collect();
    keys.sort();
    keys.dedup();
    let show = |v: Option<&toml::Value>| v.map(|v| v.to_string()).unwrap_or_else(|| "none".into());
    let free = |k: &str| TRAJECTORY_FREE.contains(&k) || MAY_CHANGE_ON_RESUME.contains(&k) || may_change.contains(&k);
    let changes: Vec<Change> = keys
        .into_iter()
        .filter(|k| !free(k.as_str()))
        .filter(|k| was.get(*k) != now.get(*k))
        .map(|k| Change { key: k.clone(), was: show(was.get(k)), now: show(now.get(k)) })
        .collect();
    if changes.is_empty() {
        return Ok(());
    }
    Err(TrainError::ResumeChanged { run, changes })
}

/// The fingerprint of each input `cfg` names ([`INPUT_KEYS`]) as it is on disk: a model or adapter
/// directory's files, a data file or a dataset directory's files.
pub fn input_fingerprints(cfg: &TrainConfig) -> Result<InputFingerprints, TrainError> {
    let inputs = [
        ("model", Some(&cfg.model), false),
        ("ref_model", cfg.ref_model.as_ref(), false),
        ("adapter", cfg.adapter.as_ref(), false),
        ("data", Some(&cfg.data), true),
        ("eval_data", cfg.eval_data.as_ref(), true),
    ];
    let mut out = InputFingerprints::new();
    for (key, path, recurse) in inputs {
        if let Some(path) = path {
            // A data pattern (a dataset's shards, `train-*.parquet`) stands for the files it matches.
            let f = match crate::data::source::has_pattern(path) {
                true => fingerprint_files(&crate::data::source::expand_pattern(path)?),
                false => fingerprint_path(path, recurse),
            };
            let f = f.map_err(|e| TrainError::io(path, e))?;
            out.insert(key.into(), f);
        }
    }
    Ok(out)
}

/// Refuses a resume whose inputs' contents are not those `RUN/inputs.json` recorded when the run started
/// (each input recorded is compared; a run from before the file existed has none, and resumes). `cfg`
/// names the files, `now` holds their fingerprints ([`input_fingerprints`]).
pub fn check_inputs(resume: &Path, cfg: &TrainConfig, now: &InputFingerprints) -> Result<(), TrainError> {
    let run = resume_target(resume).run;
    let Some(saved) = read_inputs(&run)? else { return Ok(()) };
    let path_of = |key: &str| match key {
        "model" => Some(&cfg.model),
        "ref_model" => cfg.ref_model.as_ref(),
        "adapter" => cfg.adapter.as_ref(),
        "data" => Some(&cfg.data),
        "eval_data" => cfg.eval_data.as_ref(),
        _ => None,
    };
    let changes: Vec<Change> = saved
        .iter()
        .filter(|(k, v)| now.get(*k).is_some_and(|n| n != *v))
        .map(|(k, v)| {
            let file = path_of(k).map(|p| format!("{} ", p.display())).unwrap_or_default();
            let now = now.get(k).cloned().unwrap_or_default();
            Change { key: k.clone(), was: format!("{file}(content {v})"), now: format!("{file}(content {now})") }
        })
        .collect();
    if changes.is_empty() {
        return Ok(());
    }
    Err(TrainError::ResumeChanged { run, changes })
}

/// The fingerprints a run recorded, if it did.
fn read_inputs(run: &Path) -> Result<Option<InputFingerprints>, TrainError> {
    let file = run.join(INPUTS_FILE);
    let Ok(text) = std::fs::read_to_string(&file) else { return Ok(None) };
    let saved = serde_json::from_str(&text).map_err(|e| TrainError::Output { path: file, msg: e.to_string() })?;
    Ok(Some(saved))
}

/// Records the inputs' fingerprints in the run (atomically). A `resumed` run keeps what its start
/// recorded ([`check_inputs`] found them equal), and one from before the file existed records what it
/// reads now.
pub fn record_inputs(run: &Path, now: &InputFingerprints, resumed: bool) -> Result<(), TrainError> {
    let file = run.join(INPUTS_FILE);
    if resumed && read_inputs(run)?.is_some() {
        return Ok(());
    }
    let text = serde_json::to_string_pretty(now).expect("fingerprints serialise");
    crate::io::write_atomic(&file, text.as_bytes()).map_err(|e| TrainError::io(&file, e))
}
