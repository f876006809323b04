//! Progress on standard error. On a terminal, step lines (`step N/M ...`) drive an `indicatif` bar with
//! the elapsed time, the ETA, items per second (pairs, rows) and the rest of the latest step line (loss,
//! reward accuracy and margin, ...); other lines print above it. Elsewhere (CI, files) every line is kept
//! as it comes, unchanged. Commands that count rows or prompts rather than print step lines move the same
//! bar with [`Progress::count`]. [`written`] is the closing summary of what a command wrote where.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    target: Option<fn() -> ProgressDrawTarget>,
    bar: Option<Bar>,
    /// Items of one step and their name, for the rate (`pairs/s`); steps/s without it.
    per_step: Option<(f64, &'static str)>,
}

struct Bar {
    bar: ProgressBar,
    /// The first step this process saw and when: the rate counts steps run here, not resumed ones.
    first: (u64, Instant),
}

/// `step N/M rest` → `(N, M, rest)`.
fn parse_step(text: &str) -> Option<(u64, u64, &str)> {
    let rest = text.strip_prefix("step ")?;
    let (frac, rest) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let (n, m) = frac.split_once('/')?;
    Some((n.parse().ok()?, m.parse().ok()?, rest.trim_start()))
}

impl Progress {
    pub fn new() -> Self {
        let target = std::io::stderr().is_terminal().then_some(ProgressDrawTarget::stderr as fn() -> _);
        Progress { target, bar: None, per_step: None }
    }

    /// Shows the rate in `name`/s, `items` per step (e.g. pairs of an optimizer step).
    pub fn per_step(mut self, items: usize, name: &'static str) -> Self {
        self.per_step = Some((items as f64, name));
        self
    }

    /// Prints a line; step lines update the bar on a terminal.
    pub fn line(&mut self, text: &str) {
        match (self.target, parse_step(text)) {
            (Some(target), Some((n, m, rest))) => self.step(target, n, m, rest),
            _ => match &self.bar {
                Some(b) => b.bar.println(text),
                None => {
                    let mut err = std::io::stderr().lock();
                    let _ = writeln!(err, "{text}");
                    let _ = err.flush();
                }
            },
        }
    }

    /// `done` of `total` items (rows, prompts) on a terminal's bar; elsewhere nothing (no line per batch).
    pub fn count(&mut self, done: usize, total: usize) {
        if let Some(target) = self.target {
            self.step(target, done as u64, total as u64, "");
        }
    }

    fn step(&mut self, target: fn() -> ProgressDrawTarget, n: u64, m: u64, rest: &str) {
        // A step below the bar's: the next run of a command that trains several (iterate's rounds).
        if self.bar.as_ref().is_some_and(|b| n < b.bar.position()) {
            self.finish();
        }
        let b = self.bar.get_or_insert_with(|| {
            let bar = ProgressBar::with_draw_target(Some(m), target());
            let style = ProgressStyle::with_template(
                "{bar:20.cyan/blue} {pos}/{len} [{elapsed_precise} < {eta_precise}] {wide_msg}",
            )
            .expect("a valid template")
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_position(n.saturating_sub(1));
            bar.reset_eta();
            Bar { bar, first: (n.saturating_sub(1), Instant::now()) }
        });
        b.bar.set_length(m);
        b.bar.set_position(n);
        let secs = b.first.1.elapsed().as_secs_f64();
        let steps = n.saturating_sub(b.first.0) as f64;
        let rate = match self.per_step {
            Some((items, name)) if secs > 0.0 => format!("{:.1} {name}/s", steps * items / secs),
            None if secs > 0.0 => format!("{:.2} steps/s", steps / secs),
            _ => String::new(),
        };
        // The loss first: a narrow terminal cuts the message from the right.
        let (loss, others) = match rest.strip_prefix("loss ") {
            Some(r) => {
                let (v, o) = r.split_once(char::is_whitespace).unwrap_or((r, ""));
                (format!("loss {v}  "), o.trim_start())
            }
            None => (String::new(), rest),
        };
        b.bar.set_message(format!("{loss}{rate}  {others}").trim_end().to_string());
    }

    /// Leaves the bar as it stands (the last step stays on screen) before the closing summary.
    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.bar.abandon();
            // The bar's line ends without a newline.
            eprintln!();
        }
    }
}

/// The closing summary of what a command wrote where: one `  what:  path` line each, aligned.
pub fn written(items: &[(&str, String)]) {
    eprint!("{}", written_text(items));
}

/// `path` as the summary shows it.
pub fn at(path: &Path) -> String {
    path.display().to_string()
}

fn written_text(items: &[(&str, String)]) -> String {
    let width = items.iter().map(|(what, _)| what.len()).max().unwrap_or(0) + 1;
    items.iter().map(|(what, path)| format!("  {:<width$} {path}\n", format!("{what}:"))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_lines_are_recognised() {
        assert_eq!(parse_step("step 3/10  loss 0.6931  lr 1e-3"), Some((3, 10, "loss 0.6931  lr 1e-3")));
        assert_eq!(parse_step("step 10/10"), Some((10, 10, "")));
        assert_eq!(parse_step("step skipped"), None);
        assert_eq!(parse_step("resuming from step 4"), None);
    }

    #[test]
    fn the_bar_follows_the_steps_with_rate_and_loss() {
        let mut p = Progress { target: Some(ProgressDrawTarget::hidden), bar: None, per_step: Some((8.0, "pairs")) };
        p.line("step 5/20  loss 0.6500  reward acc 0.75");
        std::thread::sleep(std::time::Duration::from_millis(20));
        p.line("step 6/20  loss 0.6000  reward acc 0.80");
        p.line("a checkpoint line");
        let bar = &p.bar.as_ref().unwrap().bar;
        assert_eq!((bar.position(), bar.length()), (6, Some(20)));
        let msg = bar.message();
        assert!(msg.starts_with("loss 0.6000  ") && msg.ends_with(" pairs/s  reward acc 0.80"), "{msg}");
        // Two steps counted from the first one seen (5 steps of a resumed run are not "fast").
        let rate: f64 = msg.split_whitespace().nth(2).unwrap().parse().unwrap();
        assert!(rate > 0.0 && rate < 2.0 * 8.0 / 0.02, "{msg}");
        p.finish();
        assert!(p.bar.is_none());
    }

    #[test]
    fn a_step_below_the_bar_starts_the_next_run_and_counts_drive_the_same_bar() {
        let mut p = Progress { target: Some(ProgressDrawTarget::hidden), bar: None, per_step: None };
        p.line("step 3/3  loss 0.5");
        p.line("step 1/4  loss 0.7");
        let bar = &p.bar.as_ref().unwrap().bar;
        assert_eq!((bar.position(), bar.length()), (1, Some(4)));
        let mut rows = Progress { target: Some(ProgressDrawTarget::hidden), bar: None, per_step: Some((1.0, "rows")) };
        rows.count(8, 20);
        std::thread::sleep(std::time::Duration::from_millis(10));
        rows.count(16, 20);
        let bar = &rows.bar.as_ref().unwrap().bar;
        assert_eq!((bar.position(), bar.length()), (16, Some(20)));
        assert!(bar.message().ends_with(" rows/s"), "{}", bar.message());
        // Not on a terminal: counting draws and prints nothing.
        let mut plain = Progress { target: None, bar: None, per_step: None };
        plain.count(1, 2);
        assert!(plain.bar.is_none());
    }

    #[test]
    fn the_summary_aligns_what_was_written_where() {
        let text = written_text(&[("model", at(Path::new("/r/final"))), ("tensorboard", "/r/runs".into())]);
        assert_eq!(text, "  model:       /r/final\n  tensorboard: /r/runs\n");
    }
}
