//! Rollouts: completions sampled from the current policy, scored by the reward function, and turned into
//! per-token advantages and value targets.
//!
//! ```text
//! prompts --generate (KV cache, temperature, EOS)--> completions --RewardFn--> scores
//! (prompt, completion) --policy forward--> old log-probs, values     --reference forward--> ref log-probs
//! per-token rewards (KL penalty, score on the last token) --GAE--> advantages (whitened), returns
//! ```
//! The old log-probs are recomputed with the training forward pass rather than taken from the sampler, so
//! that the first minibatch of a rollout sees a ratio of exactly 1 (TRL recomputes them the same way).

use engine::generate::{generate, SamplingConfig};
use engine::model::Model;
use engine::rng::Rng;
use engine::{Activations, Decoder, EngineError, Params, ScalarHead};

use super::gae::{gae, kl_penalized_rewards, whiten};
use super::{PpoConfig, PpoError, RefModel, RewardFn};
use crate::data::pack_sequences;

/// One rollout: `B` sequences, each a prompt and one sampled completion, with everything PPO needs per
/// completion token.
#[derive(Clone, Debug, Default)]
pub struct Rollout {
    pub prompts: Vec<Vec<u32>>,
    /// `[B][T_b]` sampled tokens, the EOS token included when one was produced
    pub completions: Vec<Vec<u32>>,
    /// Whether each completion ended with EOS (rather than at `max_new_tokens`).
    pub finished: Vec<bool>,
    /// `[B]` the reward function's scores
    pub scores: Vec<f64>,
    /// `[B][T_b]` log-probs under the policy that sampled them
    pub logp: Vec<Vec<f32>>,
    /// `[B][T_b]` log-probs under the reference
    pub ref_logp: Vec<Vec<f32>>,
    /// `[B][T_b]` the value head's estimates when sampled
    pub values: Vec<Vec<f64>>,
    /// `[B][T_b]` GAE advantages, whitened over every token of the rollout
    pub advantages: Vec<Vec<f64>>,
    /// `[B][T_b]` value targets: advantages (before whitening) plus values
    pub returns: Vec<Vec<f64>>,
    /// `[B]` `sum_t (logp - ref_logp)`
    pub kl: Vec<f64>,
    /// `[B]` `sum_t -kl_coef (logp - ref_logp)`
    pub non_score: Vec<f64>,
}

impl Rollout {
    pub fn len(&self) -> usize {
        self.prompts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }

    /// `(prompt, completion)` of sequence `i`.
    pub fn pair(&self, i: usize) -> (&[u32], &[u32]) {
        (&self.prompts[i], &self.completions[i])
    }
}

/// What [`completion_scores`] returns, per sequence.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CompletionScores {
    /// `[B][T_b]` log-prob of each completion token
    pub logp: Vec<Vec<f32>>,
    /// `[B][T_b]` value at each completion token (empty without a value head)
    pub values: Vec<Vec<f64>>,
}

/// Per-token log-probs of each completion after its prompt, and (with a value head) the values read at
/// the hidden states that predict them. Forward only, `chunk` sequences per pass.
pub fn completion_scores(
    decoder: &Decoder,
    model: Model<'_>,
    head: Option<&ScalarHead>,
    pairs: &[(&[u32], &[u32])],
    chunk: usize,
    acts: &mut Activations,
) -> Result<CompletionScores, EngineError> {
    let (mut logps, mut values) = (Vec::with_capacity(pairs.len()), Vec::with_capacity(pairs.len()));
    for part in pairs.chunks(chunk.max(1)) {
        let (batch, ranges) = pack_sequences(part);
        let out = decoder.logprobs(model, &batch, acts, false)?;
        for r in ranges {
            logps.push(out.logp[r.clone()].to_vec());
            values.push(match head {
                Some(h) => h.forward(&acts.hidden, batch.targets[r].iter().map(|t| t.pos as usize)),
                None => Vec::new(),
            });
        }
    }
    Ok(CompletionScores { logp: logps, values })
}

/// Samples one completion per prompt from `params`, scores it and computes advantages and returns.
#[allow(clippy::too_many_arguments)]
pub fn collect_rollout(
    decoder: &Decoder,
    params: &Params,
    head: &ScalarHead,
    reference: RefModel<'_>,
    prompts: Vec<Vec<u32>>,
    eos_ids: &[u32],
    reward: &mut dyn RewardFn,
    cfg: &PpoConfig,
    rng: &mut Rng,
    acts: &mut Activations,
) -> Result<Rollout, PpoError> {
    let sampling = SamplingConfig {
        temperature: cfg.temperature,
        top_k: None,
        top_p: None,
        max_new_tokens: cfg.max_new_tokens,
        eos_ids: eos_ids.to_vec(),
    };
    let policy = Model::new(params, None).with_precision(cfg.precision);
    let gens = generate(decoder, policy, &prompts, 1, &sampling, rng)?;
    let finished = gens.iter().map(|g| g.finished).collect();
    let completions: Vec<Vec<u32>> = gens.into_iter().map(|g| g.tokens).collect();

    let prompt_refs: Vec<&[u32]> = prompts.iter().map(|p| &p[..]).collect();
    let completion_refs: Vec<&[u32]> = completions.iter().map(|c| &c[..]).collect();
    let scores = reward.rewards(&prompt_refs, &completion_refs);
    if scores.len() != prompts.len() {
        return Err(PpoError::Reward(format!("{} scores for {} completions", scores.len(), prompts.len())));
    }
    if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
        return Err(PpoError::Reward(format!("the score of completion {i} is {}", scores[i])));
    }

    let pairs: Vec<(&[u32], &[u32])> = prompt_refs.iter().copied().zip(completion_refs.iter().copied()).collect();
    let CompletionScores { logp, values } =
        completion_scores(decoder, policy, Some(head), &pairs, cfg.minibatch, acts)?;
    let ref_logp =
        completion_scores(reference.decoder, reference.view(cfg.precision), None, &pairs, cfg.minibatch, acts)?.logp;

    let n = prompts.len();
    let (mut advantages, mut returns) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut kl, mut non_score) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        let (rewards, k, ns) = kl_penalized_rewards(scores[i], &logp[i], &ref_logp[i], cfg.kl_coef);
        let adv = gae(&rewards, &values[i], cfg.gamma, cfg.lam);
        returns.push(adv.iter().zip(&values[i]).map(|(a, v)| a + v).collect::<Vec<f64>>());
        advantages.push(adv);
        kl.push(k);
        non_score.push(ns);
    }
    // Whitened over every completion token of the rollout, as TRL's `masked_whiten` over the batch.
    let mut flat: Vec<f64> = advantages.iter().flatten().copied().collect();
    whiten(&mut flat);
    let mut it = flat.into_iter();
    for a in advantages.iter_mut().flat_map(|a| a.iter_mut()) {
        *a = it.next().expect("as many whitened values as advantages");
    }
    Ok(Rollout { prompts, completions, finished, scores, logp, ref_logp, values, advantages, returns, kl, non_score })
}
