//! Writing files so that a crash never leaves a half-written one behind: the one definition lives in
//! [`hf::atomic`] (the lowest crate that writes files); the trainer, the demo and the commands reach it here.

pub use hf::atomic::{temp_sibling, write_atomic};
