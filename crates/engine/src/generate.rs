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

use rayon::prelude::*;

use crate::batch::Batch;
use crate::config::{DecoderConfig, NormKind, PositionKind};
use crate::kernels::act::exp_f32;
use crate::kernels::{self as k, AttnDims, RopeTable};
use crate::model::bias;
use crate::model::{Decoder, EngineError};
use crate::params::{NormParams, Params};
use crate::rng::Rng;

/// Sequences decoded together by [`generate`].
pub const DEFAULT_MAX_BATCH: usize = 16;

/// Candidates sorted for top-p before falling back to sorting the whole vocabulary.
const TOP_P_PARTIAL: usize = 1024;

/// How tokens are drawn and when a sequence stops.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingConfig {
    /// Divides the logits; `0` (or less) is greedy decoding.
    pub temperature: f32,
    /// Keep the `k` most likely tokens (ties with the k-th kept too); `None` or `Some(0)`: no limit.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `p`; `None` or `p >= 1`:
    /// no limit. At least one token is always kept.
    pub top_p: Option<f32>,
    /// New tokens per sequence at most (EOS included).
    pub max_new_tokens: usize,
    /// A sequence stops after producing any of these.
    pub eos_ids: Vec<u32>,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig { temperature: 1.0, top_k: None, top_p: None, max_new_tokens: 64, eos_ids: Vec::new() }
    }
}

impl SamplingConfig {
    /// Greedy decoding of at most `max_new_tokens` tokens, no EOS.
    pub fn greedy(max_new_tokens: usize) -> Self {
        SamplingConfig { temperature: 0.0, max_new_tokens, ..Default::default() }
    }
}

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

/// Keys and values of one layer after rotary: `k`, `v: [len, n_kv_heads * head_dim]`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerCache {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// The key/value cache of one sequence: every position it has seen, every layer.
#[derive(Clone, Debug, PartialEq)]
pub struct KvCache {
    pub layers: Vec<LayerCache>,
    len: usize,
    kv_dim: usize,
}

impl KvCache {
    /// An empty cache with room for `capacity` positions.
    pub fn new(cfg: &DecoderConfig, capacity: usize) -> Self {
        let kv_dim = cfg.n_kv_heads * cfg.head_dim;
        let layer =
            || LayerCache { k: Vec::with_capacity(capacity * kv_dim), v: Vec::with_capacity(capacity * kv_dim) };
        KvCache { layers: (0..cfg.n_layers).map(|_| layer()).collect(), len: 0, kv_dim }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A copy with room for `capacity` positions (a plain `clone` keeps only the current length).
    pub fn clone_with_capacity(&self, capacity: usize) -> Self {
        let n = capacity.max(self.len) * self.kv_dim;
        let copy = |src: &Vec<f32>| {
            let mut v = Vec::with_capacity(n);
            v.extend_from_slice(src);
            v
        };
        KvCache {
            layers: self.layers.iter().map(|l| LayerCache { k: copy(&l.k), v: copy(&l.v) }).collect(),
            len: self.len,
            kv_dim: self.kv_dim,
        }
    }
}

/// Runs prefill and decode steps of one model (see the module doc).
pub struct Generator<'a> {
    model: &'a Decoder,
    params: &'a Params,
    /// Rotary table, grown when a sequence runs past it (rotary models extrapolate).
    rope: Option<RopeTable>,
}

impl<'a> Generator<'a> {
    pub fn new(model: &'a Decoder, params: &'a Params) -> Self {
        let rope = match model.cfg.positions {
            PositionKind::Rotary(r) => Some(RopeTable::new(&r, model.cfg.max_positions.max(1))),
            PositionKind::Learned => None,
        };
        Generator { model, params, rope }
    }

    fn cfg(&self) -> &DecoderConfig {
        &self.model.cfg
    }

    /// Makes positions `0..end` usable: refused beyond a learned table, a longer rotary table otherwise.
    fn ensure_positions(&mut self, end: usize) -> Result<(), EngineError> {
        match self.model.cfg.positions {
            PositionKind::Learned => check_learned(&self.model.cfg, end),
            PositionKind::Rotary(r) => {
                let have = self.rope.as_ref().map_or(0, RopeTable::max_pos);
                if have < end {
                    self.rope = Some(RopeTable::new(&r, end.max(2 * have)));
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
        self.check_tokens(prompt)?;
        self.ensure_positions(prompt.len())?;
        let (n, d) = (prompt.len(), self.cfg().hidden);
        let mut cache = KvCache::new(self.cfg(), capacity.max(n));
        let positions: Vec<u32> = (0..n as u32).collect();
        let x = self.trunk(prompt, &positions, &mut [&mut cache], true);
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
        self.check_tokens(tokens)?;
        let positions: Vec<u32> = caches.iter().map(|c| c.len() as u32).collect();
        let end = caches.iter().map(|c| c.len() + 1).max().unwrap_or(0);
        self.ensure_positions(end)?;
        let x = self.trunk(tokens, &positions, caches, false);
        Ok(self.logits(&x, tokens.len()))
    }

    /// Final norm and LM head on `rows` residual rows `[rows, d]`: logits `[rows, vocab]`.
    fn logits(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let cfg = self.cfg();
        let (d, v) = (cfg.hidden, cfg.vocab_size);
        let mut h = vec![0.0f32; rows * d];
        norm_rows(cfg.norm, &self.params.norm_f, &mut h, &x[..rows * d], rows, d);
        let mut logits = vec![0.0f32; rows * v];
        k::linear_rows_forward(&mut logits, &h, &self.params.head().data, bias(&self.params.b_head), rows, d, v);
        logits
    }

    /// The layers on `rows = tokens.len()` new tokens; appends their keys and values to the caches and
    /// returns the residual stream after the last layer `[rows, d]` (before the final norm).
    ///
    /// `prefill`: all rows belong to `caches[0]`, which is empty, and attend causally among themselves
    /// (GEMM projections, blocked attention). Otherwise row `b` is one new token of `caches[b]`.
    fn trunk(&self, tokens: &[u32], positions: &[u32], caches: &mut [&mut KvCache], prefill: bool) -> Vec<f32> {
        let cfg = self.cfg();
        let p = self.params;
        let rows = tokens.len();
        let (d, hd, nh, nkv) = (cfg.hidden, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads);
        let (qd, ad, mi, ff) = (cfg.qkv_dim(), cfg.attn_dim(), cfg.mlp_in_dim(), cfg.ffn_hidden);
        let kvd = nkv * hd;
        let dims = AttnDims { n_heads: nh, n_kv_heads: nkv, head_dim: hd, window: cfg.sliding_window };
        // The prompt's projections are GEMMs; a decode step's are row-independent (see the module doc).
        type Linear = fn(&mut [f32], &[f32], &[f32], Option<&[f32]>, usize, usize, usize);
        let linear: Linear = if prefill { k::linear_forward } else { k::linear_rows_forward };
        let mut seq = Batch::default();
        if prefill {
            seq.push_sequence(tokens, rows);
        }

        let mut x = vec![0.0f32; rows * d]; // [rows, d] residual stream
        k::embedding_forward(&mut x, &p.wte.data, tokens, p.wpe.as_ref().map(|t| &t.data[..]), positions, d);
        let mut h = vec![0.0f32; rows * d]; // [rows, d] norm output, then MLP output
        let mut qkv = vec![0.0f32; rows * qd]; // [rows, qkv_dim]
        let mut qk_pre = Vec::new(); // q and k heads before the q/k norm (qk_norm only)
        let mut attn = vec![0.0f32; rows * ad]; // [rows, n_heads * hd]
        let mut lse = vec![0.0f32; if prefill { rows * nh } else { 0 }];
        let mut o = vec![0.0f32; rows * d]; // [rows, d] attention output
        let mut mid = vec![0.0f32; rows * d]; // [rows, d] x + attention (sequential residual)
        let mut pre = vec![0.0f32; rows * mi]; // [rows, mlp_in]
        let mut act = vec![0.0f32; rows * ff]; // [rows, ff]
        for (l, lp) in p.layers.iter().enumerate() {
            norm_rows(cfg.norm, &lp.norm1, &mut h, &x, rows, d);
            linear(&mut qkv, &h, &lp.w_qkv.data, bias(&lp.b_qkv), rows, d, qd);
            if let (Some(wq), Some(wk)) = (&lp.q_norm, &lp.k_norm) {
                crate::head_norm::forward(cfg, &wq.data, &wk.data, &mut qkv, &mut qk_pre, rows);
            }
            if let Some(t) = self.rope.as_ref().filter(|_| cfg.rotary_in_layer(l)) {
                k::rope_apply(&mut qkv, qd, 0, nh, hd, positions, t, false);
                k::rope_apply(&mut qkv, qd, nh * hd, nkv, hd, positions, t, false);
            }
            for (r, row) in qkv.chunks_exact(qd).enumerate() {
                let c = &mut caches[if prefill { 0 } else { r }].layers[l];
                c.k.extend_from_slice(&row[nh * hd..nh * hd + kvd]);
                c.v.extend_from_slice(&row[nh * hd + kvd..nh * hd + 2 * kvd]);
            }
            if prefill {
                k::attention_forward(&mut attn, &mut lse, &qkv, &dims, &seq.spans, &seq.groups);
            } else {
                let keys: Vec<&[f32]> = caches.iter().map(|c| &c.layers[l].k[..]).collect();
                let values: Vec<&[f32]> = caches.iter().map(|c| &c.layers[l].v[..]).collect();
                k::decode_attention(&mut attn, &qkv, qd, &keys, &values, &dims);
            }
            linear(&mut o, &attn, &lp.w_o.data, bias(&lp.b_o), rows, ad, d);

            // MLP on norm2(x) (parallel residual, NeoX) or norm2(x + attention) (sequential).
            if cfg.parallel_residual {
                norm_rows(cfg.norm, lp.mlp_norm(), &mut h, &x, rows, d);
            } else {
                k::add3(&mut mid, &x, &o);
                norm_rows(cfg.norm, lp.mlp_norm(), &mut h, &mid, rows, d);
            }
            linear(&mut pre, &h, &lp.w_in.data, bias(&lp.b_in), rows, d, mi);
            crate::model::act_forward(cfg.mlp, &mut act, &pre, rows, ff);
            linear(&mut h, &act, &lp.w_out.data, bias(&lp.b_out), rows, ff, d);
            if cfg.parallel_residual {
                k::add_inplace(&mut x, &o);
            } else {
                std::mem::swap(&mut x, &mut mid);
            }
            k::add_inplace(&mut x, &h);
        }
        for c in caches.iter_mut() {
            c.len = c.layers[0].k.len() / kvd;
        }
        x
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

/// `log sum exp(l)` (NaN entries ignored in the maximum).
fn log_sum_exp(l: &[f32]) -> f32 {
    let m = max_logit(l);
    if !m.is_finite() {
        return m;
    }
    let mut acc = [0.0f32; 16];
    let mut chunks = l.chunks_exact(16);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += exp_f32(v - m);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&v| exp_f32(v - m)).sum();
    m + (acc.iter().sum::<f32>() + tail).ln()
}

/// Index of the first maximal logit (NaN never wins; 0 when all are NaN).
fn argmax(l: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in l.iter().enumerate() {
        if v > l[best] || l[best].is_nan() && !v.is_nan() {
            best = i;
        }
    }
    best
}

/// The tokens a draw may return with their unnormalised weights `exp((l - max) / T)`, after top-k and
/// top-p. Filtered lists are in descending order of logit (ties by index); an unfiltered list is the
/// whole vocabulary in index order. Needs `temperature > 0`.
fn candidates(logits: &[f32], cfg: &SamplingConfig) -> Vec<(u32, f32)> {
    let t = cfg.temperature;
    // Scaled as HF does (`scores / temperature` in f32); NaN never drawn.
    let z: Vec<f32> = logits.iter().map(|&l| if l.is_nan() { f32::NEG_INFINITY } else { l / t }).collect();
    let top_k = cfg.top_k.filter(|&k| k > 0 && k < z.len());
    let top_p = cfg.top_p.filter(|&p| p < 1.0);
    let mut cand: Vec<u32> = match top_k {
        Some(k) => {
            let mut s = z.clone();
            let (_, &mut kth, _) = s.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
            (0..z.len() as u32).filter(|&i| z[i as usize] >= kth).collect()
        }
        None => (0..z.len() as u32).collect(),
    };
    let m = cand.iter().map(|&i| z[i as usize]).fold(f32::NEG_INFINITY, f32::max);
    let weight = |i: u32| weight_from_max(z[i as usize], m);
    if let Some(p) = top_p {
        let desc = |a: &u32, b: &u32| z[*b as usize].total_cmp(&z[*a as usize]).then(a.cmp(b));
        let total: f64 = cand.iter().map(|&i| weight(i) as f64).sum();
        let goal = p as f64 * total;
        // Keep tokens, most likely first, while the mass before each is below `p`.
        let keep = |sorted: &[u32]| -> Option<usize> {
            let mut acc = 0.0f64;
            for (n, &i) in sorted.iter().enumerate() {
                if n > 0 && acc >= goal {
                    return Some(n);
                }
                acc += weight(i) as f64;
            }
            (acc >= goal).then_some(sorted.len())
        };
        // The kept set is a prefix of the sorted order: sort a leading part first and only sort
        // everything when that part does not hold the mass `p`.
        let mut kept = None;
        if cand.len() > TOP_P_PARTIAL {
            cand.select_nth_unstable_by(TOP_P_PARTIAL - 1, desc);
            cand[..TOP_P_PARTIAL].sort_unstable_by(desc);
            kept = keep(&cand[..TOP_P_PARTIAL]).filter(|&n| n < TOP_P_PARTIAL);
        }
        let n = kept.unwrap_or_else(|| {
            cand.sort_unstable_by(desc);
            keep(&cand).unwrap_or(cand.len())
        });
        cand.truncate(n.max(1));
    } else if top_k.is_some() {
        cand.sort_unstable_by(|a, b| z[*b as usize].total_cmp(&z[*a as usize]).then(a.cmp(b)));
    }
    cand.into_iter().map(|i| (i, weight(i))).collect()
}

/// `exp(z - m)` for the maximum `m`; with an infinite maximum, 1 for the entries equal to it (all of
/// them when every entry is `-inf`), 0 for the rest.
fn weight_from_max(z: f32, m: f32) -> f32 {
    if m.is_finite() {
        exp_f32(z - m)
    } else if z == m {
        1.0
    } else {
        0.0
    }
}

/// One draw from weighted items: the first whose cumulative weight exceeds `u * total`.
fn draw(items: impl Iterator<Item = (usize, f32)> + Clone, rng: &mut Rng) -> usize {
    let total: f64 = items.clone().map(|(_, w)| w as f64).sum();
    let u = rng.uniform() * total;
    let mut acc = 0.0f64;
    let mut last = 0;
    for (i, w) in items {
        acc += w as f64;
        if u < acc {
            return i;
        }
        if w > 0.0 {
            last = i;
        }
    }
    last
}

/// Largest logit, NaN ignored.
fn max_logit(l: &[f32]) -> f32 {
    l.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// Draws the next token from `logits [vocab]` by `cfg` (see the module doc). Returns the token and its
/// log-prob at temperature 1 without filtering. Consumes one `rng.uniform()` unless greedy.
pub fn sample_token(logits: &[f32], cfg: &SamplingConfig, rng: &mut Rng) -> (u32, f32) {
    let lse = log_sum_exp(logits);
    let filtered = cfg.top_k.is_some_and(|k| k > 0 && k < logits.len()) || cfg.top_p.is_some_and(|p| p < 1.0);
    let tok = if cfg.temperature > 0.0 && !filtered {
        // The whole vocabulary: no candidate list, one pass of exponentials.
        let (inv_t, m) = (1.0 / cfg.temperature, max_logit(logits));
        let w: Vec<f32> = if m.is_finite() {
            logits.iter().map(|&l| if l.is_nan() { 0.0 } else { exp_f32((l - m) * inv_t) }).collect()
        } else {
            logits.iter().map(|&l| weight_from_max(l, m)).collect()
        };
        draw(w.iter().copied().enumerate(), rng)
    } else if cfg.temperature > 0.0 {
        let cand = candidates(logits, cfg);
        draw(cand.into_iter().map(|(i, w)| (i as usize, w)), rng)
    } else {
        argmax(logits)
    };
    (tok as u32, logits[tok] - lse)
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
pub fn generate(
    model: &Decoder,
    params: &Params,
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
/// thread count.
///
/// Errors before any work on an empty prompt, a token outside the vocabulary, or (learned positions) a
/// prompt plus `max_new_tokens` longer than the position table.
pub fn generate_batched(
    model: &Decoder,
    params: &Params,
    prompts: &[Vec<u32>],
    n: usize,
    cfg: &SamplingConfig,
    rng: &mut Rng,
    max_batch: usize,
) -> Result<Vec<Generation>, EngineError> {
    let total = prompts.len() * n;
    let mut streams: Vec<Option<Rng>> = (0..total).map(|_| Some(Rng::new(rng.next_u64()))).collect();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RopeConfig, RopeScaling};
    use crate::model::Activations;
    use crate::presets::{self, init_random};

    /// GPT-2: learned positions, LayerNorm, tanh GELU, biases, tied head.
    fn gpt2_like() -> DecoderConfig {
        presets::tiny_gpt2()
    }

    /// Llama/Mistral/Qwen2: GQA, rotary with llama3 scaling, SwiGLU, RMSNorm, qkv bias, untied head,
    /// sliding window, and a rotary table shorter than the generated sequences (extended on the fly).
    fn llama_like() -> DecoderConfig {
        let scaling =
            RopeScaling::Llama3 { factor: 4.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_positions: 8 };
        DecoderConfig {
            head_dim: 8,
            max_positions: 8,
            positions: PositionKind::Rotary(RopeConfig { scaling, ..RopeConfig::half(500.0, 8) }),
            qkv_bias: true,
            sliding_window: Some(5),
            ..presets::tiny_llama()
        }
    }

    /// GPT-NeoX: partial rotary with linear scaling, parallel residual, erf GELU, untied head.
    fn neox_like() -> DecoderConfig {
        let scaling = RopeScaling::Linear { factor: 2.0 };
        DecoderConfig {
            positions: PositionKind::Rotary(RopeConfig { scaling, ..RopeConfig::half(10000.0, 4) }),
            ..presets::tiny_neox()
        }
    }

    /// GPT-J: interleaved partial rotary, parallel residual, tied head.
    fn gptj_like() -> DecoderConfig {
        presets::tiny_gptj()
    }

    fn families() -> Vec<(&'static str, DecoderConfig)> {
        vec![("gpt2", gpt2_like()), ("llama", llama_like()), ("neox", neox_like()), ("gptj", gptj_like())]
    }

    fn setup(cfg: &DecoderConfig, seed: u64) -> (Decoder, Params, Vec<Vec<u32>>) {
        let params = init_random(cfg, 0.4, seed);
        let mut r = Rng::new(seed + 100);
        let prompts =
            [1usize, 4, 7].iter().map(|&l| (0..l).map(|_| r.below(cfg.vocab_size) as u32).collect()).collect();
        (Decoder::new(cfg.clone()), params, prompts)
    }

    /// Full-forward logits `[vocab]` of the last position of `seq`.
    fn full_logits(m: &Decoder, p: &Params, seq: &[u32]) -> Vec<f32> {
        let mut b = Batch::default();
        b.push_sequence(seq, seq.len());
        let mut acts = Activations::default();
        m.forward(p, &b, &mut acts, false).unwrap();
        let (d, v) = (m.cfg.hidden, m.cfg.vocab_size);
        let mut out = vec![0.0; v];
        k::logits_forward(&mut out, &acts.hidden[(seq.len() - 1) * d..], &p.head().data, d, v);
        out
    }

    /// Full-forward log-probs of `tokens` after `prompt`.
    fn full_logps(m: &Decoder, p: &Params, prompt: &[u32], tokens: &[u32]) -> Vec<f32> {
        let mut b = Batch::default();
        let seq: Vec<u32> = prompt.iter().chain(tokens).copied().collect();
        b.push_sequence(&seq, prompt.len());
        m.logprobs(p, &b, &mut Activations::default(), false).unwrap().logp
    }

    #[test]
    fn greedy_matches_full_forward_argmax_in_every_family() {
        for (name, cfg) in families() {
            let (m, p, prompts) = setup(&cfg, 1);
            let sc = SamplingConfig::greedy(14);
            let gens = generate(&m, &p, &prompts, 1, &sc, &mut Rng::new(0)).unwrap();
            assert_eq!(gens.len(), prompts.len());
            let mut distinct = std::collections::HashSet::new();
            for (g, prompt) in gens.iter().zip(&prompts) {
                assert_eq!(g.tokens.len(), 14, "{name}");
                assert!(!g.finished);
                let mut seq = prompt.clone();
                for (s, &t) in g.tokens.iter().enumerate() {
                    let l = full_logits(&m, &p, &seq);
                    let best = argmax(&l);
                    // Equal, or a near-tie that rounding may order either way.
                    assert!(
                        best == t as usize || l[best] - l[t as usize] < 1e-4,
                        "{name}: step {s}: cache path chose {t}, full forward {best} ({} vs {})",
                        l[t as usize],
                        l[best]
                    );
                    distinct.insert(t);
                    seq.push(t);
                }
                let want = full_logps(&m, &p, prompt, &g.tokens);
                for (s, (a, b)) in g.logps.iter().zip(&want).enumerate() {
                    assert!((a - b).abs() < 1e-4, "{name}: logp {s}: {a} vs {b}");
                }
            }
            assert!(distinct.len() > 3, "{name}: a degenerate model makes the test weak");
        }
    }

    #[test]
    fn sampled_logps_match_full_forward() {
        for (name, cfg) in families() {
            let (m, p, prompts) = setup(&cfg, 2);
            let sc = SamplingConfig {
                temperature: 0.8,
                top_k: Some(20),
                top_p: Some(0.9),
                max_new_tokens: 12,
                eos_ids: vec![],
            };
            let gens = generate(&m, &p, &prompts, 3, &sc, &mut Rng::new(5)).unwrap();
            assert_eq!(gens.len(), 9);
            for (i, g) in gens.iter().enumerate() {
                assert_eq!(g.prompt_index, i / 3);
                let want = full_logps(&m, &p, &prompts[g.prompt_index], &g.tokens);
                assert_eq!(want.len(), g.logps.len());
                for (s, (a, b)) in g.logps.iter().zip(&want).enumerate() {
                    assert!((a - b).abs() < 1e-4, "{name}: logp {s}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn reproducible_across_batching_seeds_and_threads() {
        for (name, cfg) in families() {
            let (m, p, prompts) = setup(&cfg, 3);
            let sc = SamplingConfig { temperature: 1.0, top_p: Some(0.95), max_new_tokens: 10, ..Default::default() };
            let run = |batch: usize, seed: u64| {
                generate_batched(&m, &p, &prompts, 2, &sc, &mut Rng::new(seed), batch).unwrap()
            };
            let a = run(4, 9);
            assert_eq!(a, run(4, 9), "{name}: same seed");
            assert_eq!(a, run(1, 9), "{name}: one sequence per step");
            assert_eq!(a, run(16, 9), "{name}: all sequences in one step");
            assert_ne!(a, run(4, 10), "{name}: another seed");
            // Sample j of a prompt differs from sample j' (own streams).
            assert_ne!(a[0].tokens, a[1].tokens, "{name}");
            for threads in [1, 3] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                assert_eq!(a, pool.install(|| run(4, 9)), "{name}: {threads} threads");
            }
        }
    }

    #[test]
    fn caller_rng_advances_by_one_draw_per_sequence() {
        let (m, p, prompts) = setup(&gpt2_like(), 4);
        let mut r = Rng::new(1);
        generate(&m, &p, &prompts, 2, &SamplingConfig::greedy(2), &mut r).unwrap();
        let mut want = Rng::new(1);
        (0..6).for_each(|_| {
            want.next_u64();
        });
        assert_eq!(r, want);
    }

    #[test]
    fn top_k_one_is_greedy() {
        for (name, cfg) in families() {
            let (m, p, prompts) = setup(&cfg, 6);
            let greedy = generate(&m, &p, &prompts, 1, &SamplingConfig::greedy(8), &mut Rng::new(0)).unwrap();
            let k1 = SamplingConfig { temperature: 1.5, top_k: Some(1), max_new_tokens: 8, ..Default::default() };
            let sampled = generate(&m, &p, &prompts, 1, &k1, &mut Rng::new(77)).unwrap();
            assert_eq!(greedy, sampled, "{name}");
        }
    }

    fn kept(logits: &[f32], cfg: &SamplingConfig) -> Vec<u32> {
        candidates(logits, cfg).into_iter().map(|c| c.0).collect()
    }

    #[test]
    fn top_p_and_top_k_semantics() {
        let probs = [0.05f32, 0.5, 0.15, 0.3];
        let l: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
        let cfg = |k: Option<usize>, p: Option<f32>| SamplingConfig { top_k: k, top_p: p, ..Default::default() };
        assert_eq!(kept(&l, &cfg(None, Some(0.4))), vec![1]);
        assert_eq!(kept(&l, &cfg(None, Some(0.7))), vec![1, 3]);
        assert_eq!(kept(&l, &cfg(None, Some(0.85))), vec![1, 3, 2]);
        assert_eq!(kept(&l, &cfg(None, Some(0.97))), vec![1, 3, 2, 0]);
        assert_eq!(kept(&l, &cfg(None, Some(0.0))), vec![1], "at least one token");
        assert_eq!(kept(&l, &cfg(None, Some(1.0))), vec![0, 1, 2, 3], "p = 1 keeps all");
        assert_eq!(kept(&l, &cfg(None, None)), vec![0, 1, 2, 3]);
        assert_eq!(kept(&l, &cfg(Some(2), None)), vec![1, 3]);
        assert_eq!(kept(&l, &cfg(Some(0), None)), vec![0, 1, 2, 3], "k = 0 is no limit");
        // top-p acts on the top-k-renormalised distribution: 0.625, 0.375.
        assert_eq!(kept(&l, &cfg(Some(2), Some(0.6))), vec![1]);
        assert_eq!(kept(&l, &cfg(Some(2), Some(0.7))), vec![1, 3]);
        // Ties with the k-th logit are kept (HF: remove only `score < kth`).
        assert_eq!(kept(&[1.0, 3.0, 3.0, 0.0], &cfg(Some(1), None)), vec![1, 2]);
        // Temperature flattens before top-p: at T = 100 the four are near-uniform, 0.7 needs three.
        let hot = SamplingConfig { temperature: 100.0, top_p: Some(0.7), ..Default::default() };
        assert_eq!(kept(&l, &hot).len(), 3);

        // Frequencies: with p = 0.7, token 1 with 0.5/0.8, token 3 with 0.3/0.8, nothing else.
        let mut r = Rng::new(42);
        let c = cfg(None, Some(0.7));
        let draws = 20000;
        let mut counts = [0usize; 4];
        for _ in 0..draws {
            let (t, lp) = sample_token(&l, &c, &mut r);
            counts[t as usize] += 1;
            assert!((lp - probs[t as usize].ln()).abs() < 1e-5, "unfiltered log-prob");
        }
        assert_eq!(counts[0] + counts[2], 0);
        assert!((counts[1] as f64 / draws as f64 - 0.625).abs() < 0.015, "{counts:?}");
        // Without filters, all four at their probabilities.
        let mut counts = [0usize; 4];
        for _ in 0..draws {
            counts[sample_token(&l, &cfg(None, None), &mut r).0 as usize] += 1;
        }
        for (c, p) in counts.iter().zip(probs) {
            assert!((*c as f64 / draws as f64 - p as f64).abs() < 0.015, "{counts:?}");
        }
    }

    #[test]
    fn top_p_on_a_large_vocabulary_matches_a_full_sort() {
        let mut r = Rng::new(8);
        for (scale, p) in [(4.0, 0.9f32), (0.1, 0.99), (0.5, 0.5), (3.0, 0.999)] {
            let l: Vec<f32> = (0..5000).map(|_| r.normal() as f32 * scale).collect();
            let got = kept(&l, &SamplingConfig { top_p: Some(p), ..Default::default() });
            let mut order: Vec<usize> = (0..l.len()).collect();
            order.sort_by(|&a, &b| l[b].total_cmp(&l[a]));
            let m = l[order[0]] as f64;
            let w: Vec<f64> = order.iter().map(|&i| (l[i] as f64 - m).exp()).collect();
            let total: f64 = w.iter().sum();
            let mut acc = 0.0;
            let mut n = 0;
            while n < w.len() && (n == 0 || acc < p as f64 * total) {
                acc += w[n];
                n += 1;
            }
            assert_eq!(got.len(), n, "scale {scale}, p {p}");
            assert_eq!(got, order[..n].iter().map(|&i| i as u32).collect::<Vec<_>>());
        }
    }

    #[test]
    fn stops_at_eos() {
        let (m, p, prompts) = setup(&llama_like(), 7);
        let free = generate(&m, &p, &prompts, 1, &SamplingConfig::greedy(12), &mut Rng::new(0)).unwrap();
        let eos = free[1].tokens[4];
        let sc = SamplingConfig { eos_ids: vec![1000, eos], ..SamplingConfig::greedy(12) };
        let stopped = generate(&m, &p, &prompts, 1, &sc, &mut Rng::new(0)).unwrap();
        for (f, s) in free.iter().zip(&stopped) {
            match f.tokens.iter().position(|&t| t == eos) {
                Some(i) => {
                    assert_eq!(s.tokens, f.tokens[..=i], "EOS included, nothing after");
                    assert_eq!(s.logps, f.logps[..=i]);
                    assert!(s.finished);
                }
                None => {
                    assert_eq!(s, f);
                    assert!(!s.finished);
                }
            }
        }
        assert!(stopped[1].tokens.len() <= 5 && stopped[1].finished);
    }

    #[test]
    fn refuses_what_it_cannot_run() {
        let cfg = gpt2_like(); // 32 learned positions
        let (m, p, _) = setup(&cfg, 9);
        let prompt = vec![vec![1u32; 20]];
        // 20 + 13 - 1 = 32 positions fit; one more does not.
        assert!(generate(&m, &p, &prompt, 1, &SamplingConfig::greedy(13), &mut Rng::new(0)).is_ok());
        assert_eq!(
            generate(&m, &p, &prompt, 1, &SamplingConfig::greedy(14), &mut Rng::new(0)),
            Err(EngineError::PositionOutOfRange { position: 32, max: 32 })
        );
        let bad = vec![vec![1u32, 61]];
        assert!(matches!(
            generate(&m, &p, &bad, 1, &SamplingConfig::greedy(2), &mut Rng::new(0)),
            Err(EngineError::TokenOutOfRange { token: 61, .. })
        ));
        assert!(matches!(
            generate(&m, &p, &[vec![]], 1, &SamplingConfig::greedy(2), &mut Rng::new(0)),
            Err(EngineError::MalformedBatch(_))
        ));
        let none = generate(&m, &p, &prompt, 2, &SamplingConfig::greedy(0), &mut Rng::new(0)).unwrap();
        assert_eq!(none.len(), 2);
        assert!(none.iter().all(|g| g.tokens.is_empty() && !g.finished));
        assert!(generate(&m, &p, &prompt, 0, &SamplingConfig::greedy(3), &mut Rng::new(0)).unwrap().is_empty());
    }

    /// Decode throughput on the SmolLM2-135M shape with random weights:
    /// `cargo test --release -p dpo-engine generate::tests::decode_throughput -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn decode_throughput() {
        let cfg = crate::presets::smollm2_135m();
        let params = init_random(&cfg, 0.02, 0);
        let m = Decoder::new(cfg.clone());
        let mut r = Rng::new(1);
        let prompts: Vec<Vec<u32>> =
            (0..8).map(|_| (0..32).map(|_| r.below(cfg.vocab_size) as u32).collect()).collect();
        let new = 32;
        let sc = SamplingConfig { max_new_tokens: new, ..Default::default() };
        let t = std::time::Instant::now();
        let mut g = Generator::new(&m, &params);
        let mut caches: Vec<KvCache> = prompts.iter().map(|p| g.prefill(p, p.len() + new).unwrap().0).collect();
        let prefill = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        let mut tokens = vec![1u32; 8];
        let mut sampling = 0.0;
        for _ in 0..new {
            let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
            let logits = g.decode(&mut refs, &tokens).unwrap();
            let ts = std::time::Instant::now();
            for (tok, l) in tokens.iter_mut().zip(logits.chunks(cfg.vocab_size)) {
                *tok = sample_token(l, &sc, &mut r).0;
            }
            sampling += ts.elapsed().as_secs_f64();
        }
        let decode = t.elapsed().as_secs_f64();
        println!("sampling (one thread) {:.1} ms/step", 1000.0 * sampling / new as f64);
        println!(
            "smollm2-135m, 8 sequences, {} threads: prefill 8x32 tokens {:.2} s ({:.0} tok/s); decode {} steps {:.2} s = {:.1} tok/s ({:.1} ms/step)",
            k::num_threads(),
            prefill,
            256.0 / prefill,
            new,
            decode,
            (8 * new) as f64 / decode,
            1000.0 * decode / new as f64
        );
    }
}
