//! The flags the command line gave (not defaulted), and what they may change in a resumed run: `dpo ppo`
//! and `dpo reward-model train` read a resumed run's settings from its config.toml, take a flag given
//! with `--resume` where it changes nothing a run computes (or lengthens it), and refuse the rest by name
//! through the rule `dpo train --resume` follows ([`dpo::train::resume::refuse_changes`]).

use std::collections::BTreeSet;
use std::path::Path;

use clap::parser::ValueSource;
use clap::ArgMatches;
use dpo::train::TrainError;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The ids (field names) of the arguments of the innermost subcommand that the command line gave.
#[derive(Clone, Debug, Default)]
pub struct Given(BTreeSet<String>);

impl Given {
    pub fn of(matches: &ArgMatches) -> Self {
        let mut m = matches;
        while let Some((_, sub)) = m.subcommand() {
            m = sub;
        }
        let given = m.ids().map(|id| id.as_str()).filter(|id| {
            // Group ids (one per flattened argument struct) have no source.
            matches!(m.try_get_raw(id), Ok(Some(_))) && m.value_source(id) == Some(ValueSource::CommandLine)
        });
        Given(given.map(String::from).collect())
    }

    pub fn has(&self, id: &str) -> bool {
        self.0.contains(id)
    }
}

/// The settings a resume of `run` continues with: `saved` (its config.toml) with each setting whose flag
/// the command line gave (`given`, called with config.toml's key, nested tables flattened) taken from
/// `flags` (the configuration the same flags would start a new run with). A given setting that changes
/// the run's numbers is refused, all of them named `key: saved -> now`, before anything is written;
/// [`dpo::train::resume::TRAJECTORY_FREE`], [`dpo::train::resume::MAY_CHANGE_ON_RESUME`] and `length`
/// (the run's own name for its length) are taken.
pub fn resume_settings<T: Serialize + DeserializeOwned>(
    run: &Path,
    saved: &T,
    flags: &T,
    given: &dyn Fn(&str) -> bool,
    length: &[&str],
) -> Result<T, TrainError> {
    let table = |c: &T| toml::Table::try_from(c).map_err(|e| TrainError::Invalid(e.to_string()));
    let was = table(saved)?;
    let mut now = was.clone();
    take_given(&mut now, &table(flags)?, given);
    dpo::train::resume::refuse_changes(run.to_path_buf(), &flat(&was), &flat(&now), length)?;
    now.try_into().map_err(|e: toml::de::Error| TrainError::Invalid(e.to_string()))
}

/// `into` with the value of every key of `flags` that was given (within nested tables too).
fn take_given(into: &mut toml::Table, flags: &toml::Table, given: &dyn Fn(&str) -> bool) {
    for (k, v) in flags {
        match (into.get_mut(k), v) {
            (Some(toml::Value::Table(inner)), toml::Value::Table(f)) => take_given(inner, f, given),
            _ if given(k) => {
                into.insert(k.clone(), v.clone());
            }
            _ => {}
        }
    }
}

/// One table of every key, nested tables' keys lifted.
fn flat(t: &toml::Table) -> toml::Table {
    let mut out = toml::Table::new();
    for (k, v) in t {
        match v {
            toml::Value::Table(inner) => out.extend(flat(inner)),
            v => {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    out
}
