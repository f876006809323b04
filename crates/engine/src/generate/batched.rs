//! Continuous batching: many prompts, many samples each, decoded together.

use rayon::prelude::*;

use crate::model::{Decoder, EngineError, Model};
use crate::rng::Rng;

use super::sample::{sample_token, SamplingConfig};
use super::{check_learned, Generator, KvCache};

/// Sequences decoded together by [`generate`].
pub const DEFAULT_MAX_BATCH: usize = 16;

/// One sampled continuation.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// Index of the prompt in the caller's list.
    pub prompt_index: usize,
    /// The new tokens, the EOS token included when one was produced.
    pub tokens: Vec<u32>,
    /// `[tokens]` log-prob of each token under the model at temperature 1 without top-k/top-p.
    pub logps: Vec<f32>,
    /// Whether the sequence ended with an EOS token (rather than at `max_new_tokens`).
    pub finished: bool,
}

/// Appends a drawn token; returns whether the sequence has stopped.
fn record(g: &mut Generation, tok: u32, logp: f32, cfg: &SamplingConfig) -> bool {
    g.tokens.push(tok);
    g.logps.push(logp);
    if cfg.eos_ids.contains(&tok) {
        g.finished = true;
    }
    g.finished || g.tokens.len() >= cfg.max_new_tokens
}

/// [`generate_batched`] with [`DEFAULT_MAX_BATCH`] sequences per decode step.
pub fn generate<'a>(
    model: &'a Decoder,
    params: impl Into<Model<'a>>,
    prompts: &[Vec<u32>],
    n: usize,
    cfg: &SamplingConfig,
    rng: &mut Rng,
) -> Result<Vec<Generation>, EngineError> {
    generate_batched(model, params, prompts, n, cfg, rng, DEFAULT_MAX_BATCH)
}

/// A sequence being decoded.
struct Active {
    index: usize,
    rng: Rng,
    out: Generation,
    cache: KvCache,
    next: u32,
}

/// `n` continuations of every prompt, `prompts.len() * n` in all, in prompt order (prompt 0's samples,
/// then prompt 1's, ...). Decodes up to `max_batch` sequences per step (at least the `n` of one
/// prompt). Draws one `u64` from `rng` per sequence; the output does not depend on `max_batch` or the
/// thread count. `params`: the base (`&Params`) or a [`Model`] with a LoRA adapter on it.
///
/// Errors before any work on an empty prompt, a token outside the vocabulary, (learned positions) a
/// prompt plus `max_new_tokens` longer than the position table, or an adapter that does not fit.
pub fn generate_batched<'a>(
    model: &'a Decoder,
    params: impl Into<Model<'a>>,
    prompts: &[Vec<u32>],
    n: usize,
    cfg: &SamplingConfig,
    rng: &mut Rng,
    max_batch: usize,
) -> Result<Vec<Generation>, EngineError> {
    let total = prompts.len() * n;
    let mut streams: Vec<Option<Rng>> = (0..total).map(|_| Some(Rng::new(rng.next_u64()))).collect();
    let params = params.into();
    params.check(&model.cfg)?;
    let mut gen = Generator::new(model, params);
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(EngineError::MalformedBatch(format!(
                "prompt {i} is empty: generation needs at least one prompt token"
            )));
        }
        gen.check_tokens(p)?;
        // The last sampled token is never fed back, so the positions used are 0..len + new - 1.
        check_learned(&model.cfg, p.len() + cfg.max_new_tokens.saturating_sub(1))?;
    }
    let empty =
        |index: usize| Generation { prompt_index: index / n.max(1), tokens: vec![], logps: vec![], finished: false };
    let mut done: Vec<Option<Generation>> = vec![None; total];
    if cfg.max_new_tokens == 0 {
        return Ok((0..total).map(empty).collect());
    }
    let vocab = model.cfg.vocab_size;
    let mut active: Vec<Active> = Vec::new();
    let mut next_prompt = 0;
    loop {
        // Admit waiting prompts while their samples fit.
        while next_prompt < prompts.len() && (active.is_empty() || active.len() + n <= max_batch) {
            let prompt = &prompts[next_prompt];
            let capacity = prompt.len() + cfg.max_new_tokens - 1;
            let (cache, logits) = gen.prefill(prompt, capacity)?;
            let mut cache = Some(cache);
            for j in 0..n {
                let index = next_prompt * n + j;
                let mut rng = streams[index].take().expect("one stream per sequence");
                let mut out = empty(index);
                let (tok, logp) = sample_token(&logits, cfg, &mut rng);
                if record(&mut out, tok, logp, cfg) {
                    done[index] = Some(out);
                    continue;
                }
                // The last sample takes the prefilled cache, the others a copy.
                let c = if j + 1 == n { cache.take() } else { None };
                let cache = c.unwrap_or_else(|| cache.as_ref().expect("cache kept").clone_with_capacity(capacity));
                active.push(Active { index, rng, out, cache, next: tok });
            }
            next_prompt += 1;
        }
        if active.is_empty() {
            if next_prompt >= prompts.len() {
                break;
            }
            continue;
        }
        let tokens: Vec<u32> = active.iter().map(|a| a.next).collect();
        let logits = {
            let mut caches: Vec<&mut KvCache> = active.iter_mut().map(|a| &mut a.cache).collect();
            gen.decode(&mut caches, &tokens)?
        };
        let stopped: Vec<bool> = active
            .par_iter_mut()
            .zip(logits.par_chunks(vocab))
            .map(|(a, l)| {
                let (tok, logp) = sample_token(l, cfg, &mut a.rng);
                a.next = tok;
                record(&mut a.out, tok, logp, cfg)
            })
            .collect();
        let mut still = Vec::with_capacity(active.len());
        for (a, s) in active.into_iter().zip(stopped) {
            if s {
                done[a.index] = Some(a.out);
            } else {
                still.push(a);
            }
        }
        active = still;
    }
    Ok(done.into_iter().map(|g| g.expect("every sequence finished")).collect())
}
