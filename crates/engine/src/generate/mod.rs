//! Text generation: batched sampling with a key/value cache.
//!
//! A prompt is prefilled in one causal pass (all its tokens, the training kernels: GEMM projections and
//! the blocked attention), which leaves its keys and values after rotary in a [`KvCache`] and the logits
//! of its last position. Decode steps then feed one token for each of `B` sequences at once: the
//! projections are `[B, d] x W^T` products and each query row attends to its own sequence's cache
//! ([`crate::kernels::decode_attention`]). Finished sequences leave the batch and waiting prompts are
//! prefilled into the free places (continuous batching).
//!
//! Reproducibility: every sequence draws from its own [`Rng`], split off the caller's generator before
//! anything runs; a prompt is always prefilled alone; and decode steps use the row-independent kernels
//! of [`crate::kernels::decode`]. So a sequence's tokens depend on the seed, the prompt and the sample's
//! index only: not on the thread count, the batch size or which other sequences share its steps.
//!
//! Sampling follows Hugging Face's `generate`: logits divided by the temperature, then top-k (keep every
//! token whose scaled logit is at least the k-th largest), then top-p (keep the smallest set of most
//! likely tokens whose probability reaches `top_p`, at least one), then one draw. Temperature 0 is
//! greedy (the first maximal logit). The log-prob reported for each token is under the model's own
//! distribution (temperature 1, no filtering), which is what KL estimates need.

mod batched;
mod kv_cache;
mod sample;
#[cfg(test)]
mod tests;

pub use batched::{generate, generate_batched, Generation, DEFAULT_MAX_BATCH};
pub use kv_cache::{KvCache, LayerCache};
pub use sample::{sample_token, SamplingConfig};

use crate::batch::Batch;
use crate::config::{DecoderConfig, NormKind, PositionKind};
use crate::kernels as k;
use crate::model::{bias, Attend, Decoder, EngineError, LayerActs, Model, Ropes, Scratch};
use crate::params::NormParams;
#[cfg(test)]
use crate::params::Params; // the tests' `use super::*`

/// Runs prefill and decode steps of one model (see the module doc).
pub struct Generator<'a> {
    model: &'a Decoder,
    /// The weights: a base and, optionally, a LoRA adapter on it (never with dropout: generation is not
    /// a training pass).
    params: Model<'a>,
    /// Rotary table, grown when a sequence runs past it (rotary models extrapolate).
    rope: Option<Ropes>,
}

impl<'a> Generator<'a> {
    pub fn new(model: &'a Decoder, params: impl Into<Model<'a>>) -> Self {
        let rope = Ropes::new(&model.cfg, model.cfg.max_positions.max(1));
        Generator { model, params: params.into(), rope }
    }

    fn cfg(&self) -> &DecoderConfig {
        &self.model.cfg
    }

    /// Makes positions `0..end` usable: refused beyond a learned table, a longer rotary table otherwise
    /// (and refused for weights that cannot generate: a frozen embedding's).
    fn ensure_positions(&mut self, end: usize) -> Result<(), EngineError> {
        self.params.check_generates()?;
        match self.model.cfg.positions {
            PositionKind::Learned => check_learned(&self.model.cfg, end),
            PositionKind::Rotary(_) => {
                let have = self.rope.as_ref().map_or(0, Ropes::max_pos);
                if have < end {
                    self.rope = Ropes::new(&self.model.cfg, end.max(2 * have));
                }
                Ok(())
            }
        }
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<(), EngineError> {
        let vocab = self.cfg().vocab_size;
        match tokens.iter().enumerate().find(|(_, &t)| t as usize >= vocab) {
            Some((index, &token)) => Err(EngineError::TokenOutOfRange { token, index, vocab }),
            None => Ok(()),
        }
    }

    /// Runs `prompt` (positions `0..len`) through the model in one causal pass. Returns its cache, with
    /// room reserved for `capacity` positions, and the logits `[vocab]` of its last position.
    pub fn prefill(&mut self, prompt: &[u32], capacity: usize) -> Result<(KvCache, Vec<f32>), EngineError> {
        if prompt.is_empty() {
            return Err(EngineError::MalformedBatch("an empty prompt: generation needs at least one token".into()));
        }
        self.params.check(self.cfg())?;
        self.check_tokens(prompt)?;
        self.ensure_positions(prompt.len())?;
        let (n, d) = (prompt.len(), self.cfg().hidden);
        let mut cache = KvCache::new(self.cfg(), capacity.max(n));
        let positions: Vec<u32> = (0..n as u32).collect();
        let x = self.trunk(prompt, &positions, &mut [&mut cache], true)?;
        let logits = self.logits(&x[(n - 1) * d..], 1);
        Ok((cache, logits))
    }

    /// One decode step: `tokens[b]` is appended to sequence `b` (at position `caches[b].len()`).
    /// Returns the next-token logits `[B, vocab]`.
    pub fn decode(&mut self, caches: &mut [&mut KvCache], tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        if caches.len() != tokens.len() {
            return Err(EngineError::MalformedBatch(format!(
                "{} tokens for {} sequences in a decode step",
                tokens.len(),
                caches.len()
            )));
        }
        if let Some(c) = caches.iter().find(|c| c.is_empty() || c.layers.len() != self.cfg().n_layers) {
            return Err(EngineError::MalformedBatch(format!(
                "a decode step needs prefilled caches of {} layers (got {} layers, {} positions)",
                self.cfg().n_layers,
                c.layers.len(),
                c.len()
            )));
        }
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        self.params.check(self.cfg())?;
        self.check_tokens(tokens)?;
        let positions: Vec<u32> = caches.iter().map(|c| c.len() as u32).collect();
        let end = caches.iter().map(|c| c.len() + 1).max().unwrap_or(0);
        self.ensure_positions(end)?;
        let x = self.trunk(tokens, &positions, caches, false)?;
        Ok(self.logits(&x, tokens.len()))
    }

    /// Final norm and LM head on `rows` residual rows `[rows, d]`: logits `[rows, vocab]`.
    fn logits(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let cfg = self.cfg();
        let (d, v) = (cfg.hidden, cfg.vocab_size);
        let mut h = vec![0.0f32; rows * d];
        let p = self.params.base;
        norm_rows(cfg.norm, &p.norm_f, &mut h, &x[..rows * d], rows, d);
        let mut logits = vec![0.0f32; rows * v];
        match self.params.head_weight() {
            k::HeadWeight::F32(w) => k::linear_rows_forward(&mut logits, &h, w, bias(&p.b_head), rows, d, v),
            k::HeadWeight::Stored(m) => m.linear_rows_forward(&mut logits, &h, bias(&p.b_head), rows),
        }
        logits
    }

    /// The blocks on `rows = tokens.len()` new tokens; appends their keys and values to the caches and
    /// returns the residual stream after the last block `[rows, d]` (before the final norm).
    ///
    /// `prefill`: all rows belong to `caches[0]`, which is empty, and attend causally among themselves
    /// ([`Attend::Packed`]: GEMM projections, blocked attention). Otherwise row `b` is one new token of
    /// `caches[b]` ([`Attend::Cached`]).
    fn trunk(
        &self,
        tokens: &[u32],
        positions: &[u32],
        caches: &mut [&mut KvCache],
        prefill: bool,
    ) -> Result<Vec<f32>, EngineError> {
        let cfg = self.cfg();
        let p = self.params.base;
        let (rows, d) = (tokens.len(), cfg.hidden);
        let mut seq = Batch::default();
        if prefill {
            seq.push_sequence(tokens, rows);
        }
        let (mut la, mut scratch) = (LayerActs::default(), Scratch::default());
        la.x = vec![0.0f32; rows * d]; // [rows, d] residual stream
        self.params.embed(cfg, &mut la.x, tokens, positions)?;
        let mut out = vec![0.0f32; rows * d]; // [rows, d] the next block's input
        for l in 0..p.layers.len() {
            let attend = if prefill {
                Attend::Packed { batch: &seq, cache: Some(&mut caches[0].layers[l]) }
            } else {
                Attend::Cached { caches: &mut *caches, layer: l, positions }
            };
            let rope = self.model.block_rope(self.rope.as_ref(), l);
            let adapter = self.params.layer_lora(l, false);
            self.model.block_forward(self.params.layer(l), l, adapter, &mut la, &mut scratch, rope, attend, &mut out);
            std::mem::swap(&mut la.x, &mut out);
        }
        for c in caches.iter_mut() {
            c.sync_len();
        }
        Ok(la.x)
    }
}

/// `out = norm(x)` row by row (the statistics are not kept).
fn norm_rows(kind: NormKind, np: &NormParams, out: &mut [f32], x: &[f32], rows: usize, d: usize) {
    let (mut mean, mut rstd) = (vec![0.0f32; rows], vec![0.0f32; rows]);
    crate::model::norm_forward(kind, np, out, &mut mean, &mut rstd, x, rows, d);
}

/// Positions `0..end` against a learned position table.
fn check_learned(cfg: &DecoderConfig, end: usize) -> Result<(), EngineError> {
    if matches!(cfg.positions, PositionKind::Learned) && end > cfg.max_positions {
        return Err(EngineError::PositionOutOfRange { position: end - 1, max: cfg.max_positions });
    }
    Ok(())
}
