//! `dpo demo`: the DPO paper's controlled sentiment experiment (Rafailov et al. 2023, section 6.1,
//! figure 2 left), built in. [`world`] makes everything the experiment needs in code (reviews, a BPE
//! tokenizer, a VADER reward, PNG charts); [`experiment`] runs DPO against PPO, Preferred-FT,
//! Unlikelihood and Best-of-N on the reward / KL plane through the `dpo` library.
//!
//! A crate of its own (like candle's `candle-examples`) so that the library's users do not compile the
//! plotting, VADER and font dependencies.

pub mod experiment;
pub mod world;
