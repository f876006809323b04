//! Ctrl-C and SIGTERM: the first asks the trainer (which polls the flag between steps) to stop cleanly; a
//! second one, in one process, exits at once with 130 and says what it cut short and where a `--resume`
//! continues from.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use dpo::train::checkpoint;

/// SIGINT/SIGTERM set the returned flag; a second signal exits with 130 after one line about `run` (the run
/// directory whose checkpoint may be being written, if the command has one).
pub fn stop_flag(run: Option<&Path>) -> anyhow::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])?;
    // Under mpirun the launcher itself may signal a rank again while rank 0 writes the checkpoint; it
    // kills the ranks after its own timeout, so there a second signal only asks again.
    let several = dpo::dist::world().size() > 1;
    let (set, run) = (flag.clone(), run.map(Path::to_path_buf));
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        for _ in signals.forever() {
            if set.swap(true, Ordering::SeqCst) && !several {
                let start = if std::io::stderr().is_terminal() { "\n" } else { "" };
                eprintln!("{start}{}", second_interrupt(run.as_deref()));
                // At once: what is being written stays a temporary directory that no resume reads.
                std::process::exit(130);
            }
        }
    })?;
    Ok(flag)
}

/// The line a second interrupt prints: the checkpoint this process was writing (a temporary directory
/// under `RUN/checkpoints/`), and the newest complete one, which a `--resume` continues from.
fn second_interrupt(run: Option<&Path>) -> String {
    let Some(run) = run.filter(|r| r.exists()) else {
        return "interrupted again, stopped at once: no checkpoint was being written".into();
    };
    let mine = format!(".tmp-{}", std::process::id());
    let writing: Option<PathBuf> = checkpoint::incomplete(run)
        .into_iter()
        .filter(|n| n.ends_with(&mine))
        .map(|n| checkpoint::checkpoints_dir(run).join(n))
        .next();
    let abandoned = match &writing {
        Some(tmp) => {
            let name = tmp.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let step = name.trim_start_matches(".step-").split(".tmp-").next().unwrap_or("?").to_string();
            format!("the checkpoint of step {step} being written was abandoned ({})", tmp.display())
        }
        None => "no checkpoint was being written".into(),
    };
    let resume = match checkpoint::list(run).pop() {
        Some((_, p)) => format!("--resume {} continues from {}", run.display(), p.display()),
        None => format!("{} holds no complete checkpoint to resume from", run.display()),
    };
    format!("interrupted again, stopped at once: {abandoned}; {resume}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_second_interrupt_names_the_abandoned_and_the_newest_checkpoint() {
        let run = std::env::temp_dir().join(format!("dpo-second-interrupt-{}", std::process::id()));
        let root = checkpoint::checkpoints_dir(&run);
        std::fs::create_dir_all(root.join("step-2")).unwrap();
        std::fs::create_dir_all(root.join(format!(".step-4.tmp-{}", std::process::id()))).unwrap();
        let line = second_interrupt(Some(&run));
        assert!(line.contains("the checkpoint of step 4 being written was abandoned"), "{line}");
        assert!(line.contains(&format!("continues from {}", root.join("step-2").display())), "{line}");
        std::fs::remove_dir_all(&run).unwrap();
        assert!(second_interrupt(Some(&run)).contains("no checkpoint was being written"));
    }
}
