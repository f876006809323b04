//! Writing files so that a crash never leaves a half-written one behind: the one definition lives in
//! [`hf::atomic`] (the lowest crate that writes files); the trainer, the demo and the commands reach it here.

pub use hf::atomic::{temp_sibling, write_atomic};

/// CPU time of this process so far (user + system, all threads; Linux `/proc/self/stat`, 10 ms ticks on
/// most kernels), in seconds; 0 where unavailable.
pub fn process_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is the 3rd field, utime the 14th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest.split_whitespace().filter_map(|v| v.parse().ok()).collect();
    // The state (a letter) does not parse, so the numbers start at ppid (field 4): utime (14) and stime
    // (15) are at 10 and 11.
    match (f.get(10), f.get(11)) {
        (Some(u), Some(s)) => (u + s) / 100.0,
        _ => 0.0,
    }
}
