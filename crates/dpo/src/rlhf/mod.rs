//! The RLHF baselines DPO is measured against: a Bradley-Terry reward model, PPO against a reward, and
//! Best-of-N sampling.

pub mod best_of_n;
pub mod ppo;
pub mod reward;
