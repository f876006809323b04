//! The RLHF baselines DPO is measured against: a Bradley-Terry reward model, PPO against a reward, and
//! Best-of-N sampling.

pub mod best_of_n;
pub mod ppo;
pub mod reward;

/// The reward model's former path (`rlhf::reward_model`), kept for callers outside this module.
pub use reward as reward_model;
