//! Drawing the next token from logits: temperature, top-k, top-p, one draw (see [`super`]'s doc).

use crate::kernels::act::exp_f32;
use crate::rng::Rng;

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
pub(super) fn argmax(l: &[f32]) -> usize {
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
pub(super) fn candidates(logits: &[f32], cfg: &SamplingConfig) -> Vec<(u32, f32)> {
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
