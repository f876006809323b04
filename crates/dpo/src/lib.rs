//! Direct Preference Optimization on the `engine` decoder: preference data, objectives, and the
//! programs built from them.

pub mod data;
pub mod dist;
pub mod fingerprint;
pub mod io;
pub mod objectives;
pub mod precision;
pub mod rlhf;
pub mod scoring;
pub mod tensorboard;
pub mod train;
pub mod winrate;
