//! A run directory and what a run promises about it (RELIABILITY.md lists the promises and their tests):
//!
//! ```text
//! RUN/.lock            exclusive flock while a process uses the run (the kernel drops it when the process dies)
//! RUN/config.toml      the resolved configuration, written once the run's inputs checked out
//! RUN/inputs.json      fingerprints of the inputs' files when the run started (a resume compares them)
//! RUN/metrics.jsonl    one JSON line per step
//! RUN/checkpoints/step-N/   complete checkpoints (written under a temporary name, renamed into place)
//! RUN/final/           the trained model (a LoRA run: the trained adapter, a PEFT adapter directory)
//! RUN/final-merged/    a LoRA run with --merge: the adapter merged into the base (an HF model directory)
//! RUN/abandoned/       checkpoints newer than the one a run was resumed from (another trajectory)
//! RUN/.replaced-PID/   a previous run that --overwrite replaces, kept until the new run's first checkpoint
//! ```
//!
//! Nothing is created, moved or deleted before [`RunDir::open`], which the trainers call only after the
//! configuration, model, data and checkpoint have been validated and loaded.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::TrainError;
use crate::tensorboard::{EventWriter, ReportTo};

/// The files and directories that make up a run (what --overwrite moves aside).
const RUN_ENTRIES: [&str; 8] = [
    "config.toml",
    super::resume::INPUTS_FILE,
    "metrics.jsonl",
    "checkpoints",
    "final",
    "final-merged",
    "abandoned",
    crate::tensorboard::EVENTS_DIR,
];

/// How a run starts in its directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartMode {
    /// The directory must not hold a run.
    Fresh,
    /// A run already there is replaced once this one has started.
    Overwrite,
    /// The run there continues.
    Resume,
}

/// Where `--resume PATH` points: the run directory and, when PATH is a checkpoint, that checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResumeTarget {
    pub run: PathBuf,
    pub checkpoint: Option<PathBuf>,
}

/// A run directory (`RUN`) or one of its checkpoints (`RUN/checkpoints/step-N`): a checkpoint belongs to
/// the run two levels up, wherever that run directory has been copied or moved.
pub fn resume_target(path: &Path) -> ResumeTarget {
    if path.join("trainer_state.json").is_file() {
        let run = path.parent().filter(|p| p.file_name().is_some_and(|n| n == "checkpoints")).and_then(Path::parent);
        if let Some(run) = run {
            return ResumeTarget { run: run.to_path_buf(), checkpoint: Some(path.to_path_buf()) };
        }
        return ResumeTarget { run: path.to_path_buf(), checkpoint: Some(path.to_path_buf()) };
    }
    ResumeTarget { run: path.to_path_buf(), checkpoint: None }
}

/// The model a run directory holds (`RUN/final`), or `dir` itself when it is a model directory: commands
/// that read a trained model accept either.
pub fn model_of(dir: &Path) -> PathBuf {
    let fin = dir.join("final");
    if fin.join("config.json").is_file() && !dir.join("config.json").is_file() {
        fin
    } else {
        dir.to_path_buf()
    }
}

/// True when `dir` holds a run's metrics or checkpoints.
pub fn holds_run(dir: &Path) -> bool {
    dir.join("metrics.jsonl").exists() || dir.join("checkpoints").exists() || dir.join("final").exists()
}

/// What a run writes over in its directory however it starts: the model (or adapter) at the end and, with
/// `--merge`, the merged model. `--overwrite` also moves every [`RUN_ENTRIES`] aside.
const WRITTEN_AT_END: [&str; 2] = ["final", super::MERGED_DIR];

/// Refuses a run whose inputs (`(flag, path)`: the model, the data, the reference, the adapter...) are or
/// lie inside what the run in `output` replaces: final/ and final-merged/, and with `--overwrite` the whole
/// previous run. The guard every command that writes a run directory calls before it loads anything
/// (`hf::output`, the guard of `dpo merge` and `dpo export`, decides what overlaps). Creates nothing.
pub fn refuse_inputs_inside(output: &Path, mode: StartMode, inputs: &[hf::output::Input]) -> Result<(), TrainError> {
    let entries: &[&str] = if mode == StartMode::Overwrite { &RUN_ENTRIES } else { &WRITTEN_AT_END };
    for &(flag, input) in inputs {
        for name in entries {
            let entry = output.join(name);
            if hf::output::check_holds_none(&entry, &[(flag, input)]).is_ok() {
                continue;
            }
            let msg = if mode == StartMode::Overwrite {
                format!("--overwrite would replace the run that holds the input {}", input.display())
            } else {
                format!(
                    "the run replaces {} at its end, where the input {flag} {} is",
                    entry.display(),
                    input.display()
                )
            };
            return Err(TrainError::InputInRun { path: output.into(), msg });
        }
    }
    Ok(())
}

/// The cheap checks on an output directory that need no model or data, made before anything is loaded
/// so that a run that cannot start says so at once. Creates nothing.
pub fn preflight(output: &Path, mode: StartMode) -> Result<(), TrainError> {
    if output.exists() && !output.is_dir() {
        return Err(TrainError::Output { path: output.into(), msg: "exists and is not a directory".into() });
    }
    if mode == StartMode::Fresh && holds_run(output) {
        return Err(TrainError::OutputExists(output.into()));
    }
    if output.is_dir() {
        // Taken and dropped again: the lock that counts is the one `open` holds for the whole run.
        RunLock::acquire(output)?;
    }
    Ok(())
}

/// An exclusive `flock` on `RUN/.lock`. The kernel releases it when the file is closed, when the
/// process exits, or when it is killed, so a lock left by a crash is never in the way.
#[derive(Debug)]
pub struct RunLock {
    _file: std::fs::File,
}

impl RunLock {
    pub fn acquire(run: &Path) -> Result<Self, TrainError> {
        let path = run.join(".lock");
        let mut file =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(
                |e| TrainError::Output { path: run.into(), msg: format!("cannot create its lock file ({e})") },
            )?;
        // SAFETY: flock on a file descriptor this function owns; no memory is shared.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let holder = std::fs::read_to_string(&path).unwrap_or_default().trim().to_string();
                return Err(TrainError::Locked { run: run.into(), holder });
            }
            return Err(TrainError::io(&path, err));
        }
        let _ = file.set_len(0);
        let _ = writeln!(file, "{}", std::process::id());
        Ok(RunLock { _file: file })
    }
}

/// A run directory held by this process.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    _lock: RunLock,
    /// The previous run that --overwrite moved aside; deleted once this run has a checkpoint, put back
    /// if this run ends before it has one.
    replaced: Option<PathBuf>,
    /// Whether `open` created the directory (a run that ends before its first step removes it again).
    created: bool,
}

impl RunDir {
    /// Creates (or takes) the run directory, locks it, and moves a previous run aside when overwriting.
    /// Called after everything the run needs has been validated and loaded.
    pub fn open(path: &Path, mode: StartMode, log: &mut dyn FnMut(&str)) -> Result<Self, TrainError> {
        preflight(path, mode)?;
        let out = path;
        let created = !out.exists();
        std::fs::create_dir_all(out).map_err(|e| TrainError::Output {
            path: out.into(),
            msg: format!("cannot create the run directory ({e})"),
        })?;
        let lock = RunLock::acquire(out)?;
        let probe = out.join(".write-test");
        std::fs::write(&probe, b"")
            .map_err(|e| TrainError::Output { path: out.into(), msg: format!("cannot write in it ({e})") })?;
        let _ = std::fs::remove_file(probe);
        let mut dir = RunDir { path: out.to_path_buf(), _lock: lock, replaced: None, created };
        dir.recover_replaced(log)?;
        if mode == StartMode::Fresh && holds_run(out) {
            return Err(TrainError::OutputExists(out.into()));
        }
        if mode == StartMode::Overwrite && holds_run(out) {
            let aside = out.join(format!(".replaced-{}", std::process::id()));
            std::fs::create_dir_all(&aside).map_err(|e| TrainError::io(&aside, e))?;
            for name in RUN_ENTRIES {
                let p = out.join(name);
                if p.exists() {
                    std::fs::rename(&p, aside.join(name)).map_err(|e| TrainError::io(&p, e))?;
                }
            }
            log(&format!(
                "the previous run in {} was moved aside; it is deleted once this run writes its first checkpoint",
                out.display()
            ));
            dir.replaced = Some(aside);
        }
        Ok(dir)
    }

    /// A previous run moved aside by an --overwrite that was killed: put back when the new run never
    /// wrote a checkpoint, deleted when it did.
    fn recover_replaced(&mut self, log: &mut dyn FnMut(&str)) -> Result<(), TrainError> {
        let stale: Vec<PathBuf> = std::fs::read_dir(&self.path)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".replaced-"))
            .map(|e| e.path())
            .collect();
        for aside in stale {
            if super::checkpoint::list(&self.path).is_empty() && !self.path.join("final").exists() {
                restore(&self.path, &aside)?;
                log(&format!(
                    "restored the previous run of {} (its replacement never wrote a checkpoint)",
                    self.path.display()
                ));
            } else {
                let _ = std::fs::remove_dir_all(&aside);
            }
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The run now has a checkpoint or its final model: the run it replaced goes.
    pub fn started(&mut self) {
        if let Some(aside) = self.replaced.take() {
            let _ = std::fs::remove_dir_all(aside);
        }
    }

    /// A new run (not a resumed one) that stops before its first step: what it wrote goes (config.toml,
    /// inputs.json, and `written`: its metrics files), so that the same command starts it again; a run it
    /// replaced is put back (on drop). Directories go only when empty, the run directory only when `open`
    /// created it: nothing else is deleted.
    pub fn discard_unstarted(&self, written: &[PathBuf]) {
        let ours = ["config.toml", super::resume::INPUTS_FILE].map(|n| self.path.join(n));
        for p in ours.iter().chain(written) {
            let _ = std::fs::remove_file(p);
        }
        let _ = std::fs::remove_dir(self.path.join(crate::tensorboard::EVENTS_DIR));
        if self.created {
            let _ = std::fs::remove_file(self.path.join(".lock"));
            let _ = std::fs::remove_dir(&self.path);
        }
    }

    /// Writes config.toml (atomically).
    pub fn write_config(&self, toml: &str) -> Result<(), TrainError> {
        let p = self.path.join("config.toml");
        crate::io::write_atomic(&p, toml.as_bytes()).map_err(|e| TrainError::io(&p, e))
    }

    /// The metrics file: started afresh, or, when resuming at `resumed_at`, kept up to that step (the
    /// resumed run writes the later steps again).
    pub fn metrics(&self, resumed_at: Option<u64>) -> Result<Metrics, TrainError> {
        self.metrics_to(resumed_at, ReportTo::default())
    }

    /// [`Self::metrics`], also written as TensorBoard event files under `RUN/runs/` when `report_to` says so.
    pub fn metrics_to(&self, resumed_at: Option<u64>, report_to: ReportTo) -> Result<Metrics, TrainError> {
        self.metrics_tagged(resumed_at, report_to, crate::tensorboard::trl_tag)
    }

    /// [`Self::metrics_to`] with a trainer's own TensorBoard tags (PPO's are not the DPO family's).
    pub fn metrics_tagged(
        &self,
        resumed_at: Option<u64>,
        report_to: ReportTo,
        tags: crate::tensorboard::TagFn,
    ) -> Result<Metrics, TrainError> {
        let path = self.path.join("metrics.jsonl");
        match resumed_at {
            Some(step) => truncate_metrics(&path, step)?,
            None => {
                let _ = std::fs::remove_file(&path);
            }
        }
        let file =
            std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(|e| TrainError::io(&path, e))?;
        let events = match report_to.tensorboard {
            true => {
                let dir = self.path.join(crate::tensorboard::EVENTS_DIR);
                Some(EventWriter::create(&dir, tags).map_err(|e| TrainError::io(&dir, e))?)
            }
            false => None,
        };
        Ok(Metrics { path, file, events })
    }

    /// Moves checkpoints newer than `step` (and a final model) to `RUN/abandoned/`: a run resumed from an
    /// older checkpoint follows another trajectory, and a later --resume must not continue the old one.
    pub fn abandon_after(&self, step: u64, log: &mut dyn FnMut(&str)) -> Result<(), TrainError> {
        let mut moved = Vec::new();
        let mut entries: Vec<(String, PathBuf)> = super::checkpoint::list(&self.path)
            .into_iter()
            .filter(|(s, _)| *s > step)
            .map(|(s, p)| (format!("step-{s}"), p))
            .collect();
        if !entries.is_empty() {
            for name in ["final", super::MERGED_DIR] {
                let fin = self.path.join(name);
                if fin.exists() {
                    entries.push((name.into(), fin));
                }
            }
        }
        if entries.is_empty() {
            return Ok(());
        }
        let to = self.path.join("abandoned");
        std::fs::create_dir_all(&to).map_err(|e| TrainError::io(&to, e))?;
        for (name, p) in entries {
            let mut dest = to.join(&name);
            let mut n = 1;
            while dest.exists() {
                dest = to.join(format!("{name}.{n}"));
                n += 1;
            }
            std::fs::rename(&p, &dest).map_err(|e| TrainError::io(&p, e))?;
            moved.push(name);
        }
        log(&format!(
            "resuming from step {step}: {} of the later trajectory moved to {}",
            moved.join(", "),
            to.display()
        ));
        Ok(())
    }
}

impl Drop for RunDir {
    /// A run that ends before its first checkpoint gives the directory back to the run it replaced.
    fn drop(&mut self) {
        if let Some(aside) = self.replaced.take() {
            let _ = restore(&self.path, &aside);
        }
    }
}

/// Puts a run moved aside back in place of what the replacing run wrote.
fn restore(run: &Path, aside: &Path) -> Result<(), TrainError> {
    let trash = run.join(format!(".discarded-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&trash);
    std::fs::create_dir_all(&trash).map_err(|e| TrainError::io(&trash, e))?;
    for name in RUN_ENTRIES {
        let p = run.join(name);
        if p.exists() {
            std::fs::rename(&p, trash.join(name)).map_err(|e| TrainError::io(&p, e))?;
        }
        let old = aside.join(name);
        if old.exists() {
            std::fs::rename(&old, &p).map_err(|e| TrainError::io(&old, e))?;
        }
    }
    let _ = std::fs::remove_dir_all(&trash);
    let _ = std::fs::remove_dir_all(aside);
    Ok(())
}

/// `metrics.jsonl`, one line per step, flushed as written; and the same numbers as TensorBoard scalars
/// when the run reports there.
pub struct Metrics {
    path: PathBuf,
    file: std::fs::File,
    events: Option<EventWriter>,
}

impl Metrics {
    pub fn append(&mut self, line: &serde_json::Value) -> Result<(), TrainError> {
        writeln!(self.file, "{line}").map_err(|e| TrainError::io(&self.path, e))?;
        self.file.flush().map_err(|e| TrainError::io(&self.path, e))?;
        if let Some(ev) = &mut self.events {
            ev.metrics_line(line).map_err(|e| TrainError::io(ev.path(), e))?;
        }
        Ok(())
    }

    /// The files written: `metrics.jsonl` and the event file, if any (for the run's closing summary).
    pub fn files(&self) -> Vec<PathBuf> {
        std::iter::once(self.path.clone()).chain(self.events.as_ref().map(|e| e.path().to_path_buf())).collect()
    }
}

/// Keeps the metrics lines of steps up to `step` (a resumed run rewrites what came after).
fn truncate_metrics(path: &Path, step: u64) -> Result<(), TrainError> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    crate::io::write_atomic(path, kept.as_bytes()).map_err(|e| TrainError::io(path, e))
}
