//! How every policy is measured, as in the paper's figure 2 (left): samples on held-out prompts, their
//! mean ground-truth reward (VADER on the decoded prompt and completion), and the sequence-level
//! KL(pi || ref) = E_{y ~ pi} [sum_t log pi(y_t | .) - log ref(y_t | .)], estimated from the same samples
//! with both models' log-probs computed by one forward pass each.
//!
//! A policy's samples and KL are kept (by a fingerprint of its weights), so judging the same checkpoint
//! again with another reward (the learned reward model's frontier) only scores the kept samples.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use engine::generate::{generate_batched, Generation, SamplingConfig};
use engine::kernels::Precision;
use engine::model::Model;
use engine::rng::Rng;
use engine::{Activations, Decoder, Params};
use serde::Serialize;

use super::DemoError;
use crate::world::sentiment::Sentiment;
use dpo::data::pack::{pack_sequences, sum_ranges};

/// Sequences per forward pass when scoring samples.
const SCORE_BATCH: usize = 64;

/// Sequences decoded together when sampling: more than the engine's default (16), since this model's
/// decode step is small enough that its fixed cost per step dominates. The samples do not depend on it.
const SAMPLE_BATCH: usize = 64;

/// The things every measurement needs: the model family, the reference weights, the tokenizer and the
/// ground truth.
pub struct World {
    pub decoder: Decoder,
    pub reference: Params,
    pub tokenizer: hf::Tokenizer,
    pub sentiment: Sentiment,
    pub eos_ids: Vec<u32>,
    /// Prepended to every prompt (the from-scratch model's `<|endoftext|>`); `None` when the tokenizer
    /// adds its own special tokens.
    pub bos: Option<u32>,
    /// The precision of every pass (the plan's).
    pub precision: Precision,
}

impl World {
    /// A prompt's token ids as the policies see them.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, DemoError> {
        let mut ids: Vec<u32> = self.bos.into_iter().collect();
        ids.extend(self.tokenizer.encode(text, self.bos.is_none())?);
        if ids.is_empty() {
            return Err(DemoError::EmptyPrompt { text: text.to_string() });
        }
        Ok(ids)
    }

    /// `params` as this world's passes read them.
    pub fn view<'a>(&self, params: &'a Params) -> Model<'a> {
        Model::new(params, None).with_precision(self.precision)
    }

    pub fn sampling(&self, max_new_tokens: usize) -> SamplingConfig {
        SamplingConfig { temperature: 1.0, max_new_tokens, eos_ids: self.eos_ids.clone(), ..Default::default() }
    }

    /// `n` samples of every prompt from `params`, prompt after prompt.
    pub fn sample(
        &self,
        params: &Params,
        prompts: &[Vec<u32>],
        n: usize,
        sampling: &SamplingConfig,
        seed: u64,
    ) -> Result<Vec<Generation>, DemoError> {
        Ok(generate_batched(&self.decoder, self.view(params), prompts, n, sampling, &mut Rng::new(seed), SAMPLE_BATCH)?)
    }

    /// Ground-truth rewards of `(prompt, completion)` pairs, on all cores: VADER's compound score of the
    /// prompt and completion as one text (special tokens dropped), so that "The acting was" + " not
    /// good" reads as negative.
    pub fn ground_truth_all(&self, items: &[(&[u32], &[u32])]) -> Result<Vec<f64>, DemoError> {
        let texts = items.iter().map(|(p, c)| self.text(p, c)).collect::<Result<Vec<_>, _>>()?;
        Ok(self.sentiment.score_all(&texts))
    }

    pub fn text(&self, prompt: &[u32], completion: &[u32]) -> Result<String, DemoError> {
        let ids: Vec<u32> = prompt.iter().chain(completion).copied().collect();
        Ok(self.tokenizer.decode(&ids, true)?)
    }

    /// Summed completion log-probs of each `(prompt, completion)` under `params`.
    pub fn sequence_logps(&self, params: &Params, items: &[(&[u32], &[u32])]) -> Result<Vec<f64>, DemoError> {
        let mut acts = Activations::default();
        let mut out = Vec::with_capacity(items.len());
        for chunk in items.chunks(SCORE_BATCH) {
            let (batch, ranges) = pack_sequences(chunk);
            let head = self.decoder.logprobs(self.view(params), &batch, &mut acts, false)?;
            out.extend(sum_ranges(&head.logp, &ranges));
        }
        Ok(out)
    }
}

/// Rewards of `(prompt, completion)` items: the ground truth, or a learned reward model.
pub type RewardOf<'a> = dyn Fn(&[(&[u32], &[u32])]) -> Result<Vec<f64>, DemoError> + 'a;

/// One measured point: a policy's mean reward and KL from the reference on the evaluation prompts.
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    /// Optimizer step (or N for Best-of-N) the point was measured at.
    pub step: u64,
    pub kl: f64,
    pub reward: f64,
    /// Standard error of the mean reward.
    pub reward_se: f64,
    /// Mean completion length in tokens.
    pub length: f64,
}

/// The held-out prompts and how they are sampled; the same seed for every policy, so differences
/// between methods are not differences in sampling luck.
pub struct Evaluator {
    pub prompts: Vec<Vec<u32>>,
    pub samples: usize,
    pub sampling: SamplingConfig,
    pub seed: u64,
    /// Samples and KL of the policies measured so far, by [`fingerprint`] of their weights.
    kept: Mutex<HashMap<u64, Arc<Sampled>>>,
}

/// A policy's evaluation samples: `[prompts * samples]` completions (prompt order) and their KL terms.
struct Sampled {
    gens: Vec<Generation>,
    /// `log pi(y) - log ref(y)` of each sample.
    kls: Vec<f64>,
}

/// A 64-bit hash of every weight's bits: the same policy measured twice is sampled once.
fn fingerprint(params: &Params) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for (name, t) in params.named() {
        name.hash(&mut h);
        t.shape.hash(&mut h);
        for x in &t.data {
            x.to_bits().hash(&mut h);
        }
    }
    h.finish()
}

impl Evaluator {
    pub fn new(prompts: Vec<Vec<u32>>, samples: usize, sampling: SamplingConfig, seed: u64) -> Self {
        Evaluator { prompts, samples, sampling, seed, kept: Mutex::new(HashMap::new()) }
    }

    /// The policy's samples and KL terms, drawn (and kept) on first use.
    fn sampled(&self, world: &World, params: &Params) -> Result<Arc<Sampled>, DemoError> {
        let key = fingerprint(params);
        if let Some(s) = self.kept.lock().expect("evaluator cache").get(&key) {
            return Ok(s.clone());
        }
        let gens = world.sample(params, &self.prompts, self.samples, &self.sampling, self.seed)?;
        let items: Vec<(&[u32], &[u32])> =
            gens.iter().map(|g| (&self.prompts[g.prompt_index][..], &g.tokens[..])).collect();
        let pi = world.sequence_logps(params, &items)?;
        let rf = world.sequence_logps(&world.reference, &items)?;
        let kls: Vec<f64> = pi.iter().zip(&rf).map(|(a, b)| a - b).collect();
        let s = Arc::new(Sampled { gens, kls });
        self.kept.lock().expect("evaluator cache").insert(key, s.clone());
        Ok(s)
    }

    /// Samples the policy and measures reward (the ground truth) and KL.
    pub fn evaluate(&self, world: &World, params: &Params, step: u64) -> Result<Point, DemoError> {
        self.evaluate_by(world, params, step, &|items| world.ground_truth_all(items))
    }

    /// Samples the policy and measures `reward` (the ground truth, or a learned reward model) and KL.
    pub fn evaluate_by(
        &self,
        world: &World,
        params: &Params,
        step: u64,
        reward: &RewardOf,
    ) -> Result<Point, DemoError> {
        let s = self.sampled(world, params)?;
        let items: Vec<(&[u32], &[u32])> =
            s.gens.iter().map(|g| (&self.prompts[g.prompt_index][..], &g.tokens[..])).collect();
        let rewards = reward(&items)?;
        let length = s.gens.iter().map(|g| g.tokens.len() as f64).sum::<f64>() / s.gens.len().max(1) as f64;
        Ok(Point { step, kl: mean(&s.kls), reward: mean(&rewards), reward_se: std_err(&rewards), length })
    }
}

pub fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.iter().sum::<f64>() / v.len() as f64
}

pub fn std_err(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return 0.0;
    }
    let m = mean(v);
    let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (v.len() - 1) as f64;
    (var / v.len() as f64).sqrt()
}
