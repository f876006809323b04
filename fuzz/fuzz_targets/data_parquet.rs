//! Preference / unpaired / SFT data as Parquet: the same pipeline and checks as `data_json`, the bytes
//! after the three settings bytes being a `.parquet` file.
//!
//! The parquet crate panics on some malformed files; dpo's reader runs its calls under `catch_unwind`
//! (`guarded` in crates/dpo/src/data/parquet.rs) and reports an error. libfuzzer-sys's panic hook would
//! abort on those caught panics too, so this target's hook lets a panic unwind when it comes from the
//! parquet crate or passes through `guarded` (printing each such place once), and aborts on any other.
//! A panic that dpo does not catch still reaches libfuzzer-sys's `catch_unwind`, which aborts: a crash.
#![no_main]

use std::collections::HashSet;
use std::sync::{Mutex, Once};

use libfuzzer_sys::fuzz_target;

fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let fuzzer_hook = std::panic::take_hook();
        let seen = Mutex::new(HashSet::new());
        std::panic::set_hook(Box::new(move |info| {
            let place = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
            let caught = place.contains("/parquet-") || {
                let trace = std::backtrace::Backtrace::force_capture().to_string();
                trace.contains("guarded") && trace.contains("crates/dpo/src/data/parquet.rs")
            };
            if !caught {
                return fuzzer_hook(info);
            }
            if seen.lock().unwrap().insert(place.clone()) {
                let what = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                eprintln!("data_parquet: caught panic in the parquet crate at {place}: {what}");
            }
        }));
    });
}

fuzz_target!(|data: &[u8]| {
    install_hook();
    dpo_fuzz::fuzz_data(data, "parquet");
});
