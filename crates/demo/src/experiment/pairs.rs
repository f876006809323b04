//! Step 2: preference pairs, as in the paper's sentiment experiment: several samples of each prompt
//! from the SFT model at temperature 1, and every two of them with different ground-truth rewards form
//! a pair, the higher-scored one chosen. Written as pre-tokenized JSONL (`prompt_ids`, `chosen_ids`,
//! `rejected_ids`) so the trainer reads exactly these token ids.

use std::path::Path;

use engine::Params;
use serde_json::json;

use super::evaluate::{mean, World};
use super::{jsonl, DemoError};
use dpo::data::Example;

/// A pair with the ground-truth rewards that ranked it.
#[derive(Clone, Debug)]
pub struct RankedPair {
    pub example: Example,
    pub chosen_reward: f64,
    pub rejected_reward: f64,
}

/// What sampling produced.
pub struct PairSet {
    pub pairs: Vec<RankedPair>,
    /// Mean ground-truth reward of all samples (the SFT model's reward on these prompts).
    pub sample_reward: f64,
    /// Pairs skipped because both samples scored the same.
    pub ties: usize,
    /// Per prompt, its highest-reward sample and that reward: the prompt's preferred completion, which
    /// win rates are measured against (the paper's reference summaries or chosen responses).
    pub preferred: Vec<(Vec<u32>, f64)>,
}

impl PairSet {
    pub fn examples(&self) -> Vec<Example> {
        self.pairs.iter().map(|p| p.example.clone()).collect()
    }
}

/// Samples `k` completions of every prompt and ranks all `k (k - 1) / 2` pairs of each by the ground
/// truth; ties are skipped.
pub fn sample_pairs(
    world: &World,
    params: &Params,
    prompts: &[Vec<u32>],
    k: usize,
    max_new_tokens: usize,
    seed: u64,
    tag: &str,
) -> Result<PairSet, DemoError> {
    let gens = world.sample(params, prompts, k, &world.sampling(max_new_tokens), seed)?;
    let items: Vec<(&[u32], &[u32])> = gens.iter().map(|g| (&prompts[g.prompt_index][..], &g.tokens[..])).collect();
    let rewards = world.ground_truth_all(&items)?;
    let mut pairs = Vec::new();
    let mut ties = 0;
    let mut preferred = Vec::with_capacity(prompts.len());
    for (p, prompt) in prompts.iter().enumerate() {
        let base = p * k;
        if let Some(best) = dpo::rlhf::best_of_n::first_best(&rewards[base..base + k]).map(|i| base + i) {
            preferred.push((gens[best].tokens.clone(), rewards[best]));
        }
        for i in 0..k {
            for j in i + 1..k {
                let (a, b) = (base + i, base + j);
                if rewards[a] == rewards[b] {
                    ties += 1;
                    continue;
                }
                let (w, l) = if rewards[a] > rewards[b] { (a, b) } else { (b, a) };
                pairs.push(RankedPair {
                    example: Example::new(
                        format!("{tag} prompt {p} samples {}/{}", w - base, l - base),
                        prompt.clone(),
                        gens[w].tokens.clone(),
                        gens[l].tokens.clone(),
                    ),
                    chosen_reward: rewards[w],
                    rejected_reward: rewards[l],
                });
            }
        }
    }
    Ok(PairSet { pairs, sample_reward: mean(&rewards), ties, preferred })
}

/// Writes pairs as pre-tokenized preference rows, with their rewards for the curious.
pub fn write_pairs(path: &Path, pairs: &[RankedPair]) -> Result<(), DemoError> {
    let rows: Vec<serde_json::Value> = pairs
        .iter()
        .map(|p| {
            json!({
                "prompt_ids": p.example.prompt_ids,
                "chosen_ids": p.example.chosen_ids,
                "rejected_ids": p.example.rejected_ids,
                "chosen_reward": p.chosen_reward,
                "rejected_reward": p.rejected_reward,
            })
        })
        .collect();
    jsonl::write(path, &rows)
}
