//! Progress on standard error: lines as they come. On a terminal, a step line overwrites the previous
//! one (a live status line); elsewhere (CI, files) every line is kept.

use std::io::{IsTerminal, Write};

pub struct Progress {
    tty: bool,
    live: bool,
}

impl Progress {
    pub fn new() -> Self {
        Progress { tty: std::io::stderr().is_terminal(), live: false }
    }

    /// Prints a line; step lines (`step N/M ...`) stay on one refreshed line on a terminal.
    pub fn line(&mut self, text: &str) {
        let mut err = std::io::stderr().lock();
        let is_step = text.starts_with("step ");
        if self.tty && is_step {
            let width = 160;
            let shown: String = text.chars().take(width).collect();
            let _ = write!(err, "\r\x1b[2K{shown}");
            self.live = true;
        } else {
            if self.live {
                let _ = writeln!(err);
                self.live = false;
            }
            let _ = writeln!(err, "{text}");
        }
        let _ = err.flush();
    }

    pub fn finish(&mut self) {
        if self.live {
            eprintln!();
            self.live = false;
        }
    }
}
