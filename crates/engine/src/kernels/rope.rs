//! Rotary position embeddings with Hugging Face's numerics.
//!
//! The table reproduces `transformers`' `*RotaryEmbedding` step by step in f32: `inv_freq = 1 / theta^(2i /
//! rotary_dim)` (the exponent divided in f32, the power rounded to f32), the `linear` or `llama3` rescaling
//! with torch's operation order (`a / t` on a tensor is `t.reciprocal() * a` in torch), the angle as the
//! f32 product `pos * inv_freq`, and its cosine and sine rounded from f64. The rotation is
//! `x * cos + rotate_half(x) * sin`, with no fused multiply-add, as torch computes it.

use rayon::prelude::*;

use crate::config::{RopeConfig, RopeScaling, RopeStyle};

/// Cosines and sines of every position's rotation angles: `cos, sin: [max_pos, half]`,
/// `half = rotary_dim / 2`.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeTable {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub half: usize,
    pub style: RopeStyle,
}

/// HF's inverse frequencies `[rotary_dim / 2]` after rescaling, in f32.
pub(crate) fn inv_freq(cfg: &RopeConfig) -> Vec<f32> {
    let dim = cfg.rotary_dim;
    let base: Vec<f32> = (0..dim / 2)
        .map(|i| {
            // `torch.arange(0, dim, 2).float() / dim`, then `base ** e` in f32, then `1.0 / x`.
            let e = (2 * i) as f32 / dim as f32;
            let p = (cfg.theta as f64).powf(e as f64) as f32;
            1.0 / p
        })
        .collect();
    match cfg.scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|&f| f / factor).collect(),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_positions } => {
            // `_compute_llama3_parameters`; Python-float scalars are rounded to f32 where they meet a tensor.
            let old = original_max_positions as f64;
            let low_wavelen = (old / low_freq_factor as f64) as f32;
            let high_wavelen = (old / high_freq_factor as f64) as f32;
            let two_pi = (2.0 * std::f64::consts::PI) as f32;
            let denom = (high_freq_factor as f64 - low_freq_factor as f64) as f32;
            base.iter()
                .map(|&f| {
                    let wavelen = (1.0 / f) * two_pi;
                    let llama = if wavelen > low_wavelen { f / factor } else { f };
                    let smooth = ((1.0 / wavelen) * old as f32 - low_freq_factor) / denom;
                    let smoothed = (1.0 - smooth) * llama / factor + smooth * llama;
                    // `~(wavelen < high) & ~(wavelen > low)`
                    let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                    if medium {
                        smoothed
                    } else {
                        llama
                    }
                })
                .collect()
        }
    }
}

impl RopeTable {
    /// Floats of the table [`RopeTable::new`] builds for `max_pos` positions: cos and sin, `[max_pos,
    /// rotary_dim / 2]` each.
    pub fn floats(cfg: &RopeConfig, max_pos: usize) -> u64 {
        2 * max_pos as u64 * (cfg.rotary_dim / 2) as u64
    }

    /// The table for positions `0..max_pos`.
    pub fn new(cfg: &RopeConfig, max_pos: usize) -> Self {
        assert!(cfg.rotary_dim.is_multiple_of(2), "rotary dimension {} is odd", cfg.rotary_dim);
        let half = cfg.rotary_dim / 2;
        let inv = inv_freq(cfg);
        let mut cos = vec![0.0f32; max_pos * half];
        let mut sin = vec![0.0f32; max_pos * half];
        if half > 0 {
            cos.par_chunks_mut(half).zip(sin.par_chunks_mut(half)).enumerate().with_min_len(64).for_each(
                |(p, (c, s))| {
                    for ((c, s), &f) in c.iter_mut().zip(s.iter_mut()).zip(&inv) {
                        let angle = (p as f32 * f) as f64;
                        *c = angle.cos() as f32;
                        *s = angle.sin() as f32;
                    }
                },
            );
        }
        RopeTable { cos, sin, half, style: cfg.style }
    }

    /// Positions the table covers.
    pub fn max_pos(&self) -> usize {
        self.cos.len().checked_div(self.half).unwrap_or(usize::MAX)
    }
}

/// Rotates one head in place: pairs `(i, i + half)` or `(2i, 2i + 1)`, `sign = -1` for the inverse.
#[inline(always)]
fn rotate(x: &mut [f32], cos: &[f32], sin: &[f32], style: RopeStyle, inverse: bool) {
    let half = cos.len();
    match style {
        RopeStyle::Half => {
            let (x1, x2) = x[..2 * half].split_at_mut(half);
            for (((a, b), &c), &s) in x1.iter_mut().zip(x2.iter_mut()).zip(cos).zip(sin) {
                let (u, v) = (*a, *b);
                let s = if inverse { -s } else { s };
                *a = u * c - v * s;
                *b = v * c + u * s;
            }
        }
        RopeStyle::Interleaved => {
            for ((p, &c), &s) in x[..2 * half].chunks_exact_mut(2).zip(cos).zip(sin) {
                let (u, v) = (p[0], p[1]);
                let s = if inverse { -s } else { s };
                p[0] = u * c - v * s;
                p[1] = v * c + u * s;
            }
        }
    }
}

/// Rotates, in place, the first `rotary_dim = 2 * table.half` dimensions of `n_heads` heads of width
/// `head_dim` at columns `col0 + h * head_dim` of each row `r` (row `r` starts at `r * row_stride`; rows =
/// `positions.len()`), by the angles of `positions[r]`: `x1' = x1 cos - x2 sin`, `x2' = x2 cos + x1 sin`.
/// `inverse` rotates by the negative angle, which is the transpose and so the backward.
#[allow(clippy::too_many_arguments)]
pub fn rope_apply(
    x: &mut [f32],
    row_stride: usize,
    col0: usize,
    n_heads: usize,
    head_dim: usize,
    positions: &[u32],
    table: &RopeTable,
    inverse: bool,
) {
    let rows = positions.len();
    let half = table.half;
    if rows == 0 || n_heads == 0 || half == 0 {
        return;
    }
    assert!(2 * half <= head_dim, "rope_apply: rotary dimension {} exceeds head_dim {head_dim}", 2 * half);
    assert!(col0 + n_heads * head_dim <= row_stride, "rope_apply: heads extend past the row");
    assert!(x.len() >= (rows - 1) * row_stride + col0 + n_heads * head_dim, "rope_apply: x too short");
    let max_pos = table.max_pos();
    if let Some(p) = positions.iter().find(|&&p| p as usize >= max_pos) {
        panic!("rope_apply: position {p} outside the rotary table of {max_pos}");
    }
    let len = x.len().min(rows * row_stride);
    x[..len].par_chunks_mut(row_stride).zip(positions).with_min_len(16).for_each(|(row, &p)| {
        let p = p as usize;
        let (c, s) = (&table.cos[p * half..(p + 1) * half], &table.sin[p * half..(p + 1) * half]);
        for h in 0..n_heads {
            let o = col0 + h * head_dim;
            rotate(&mut row[o..o + head_dim], c, s, table.style, inverse);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::threads::test_util::*;

    fn cfg(rotary_dim: usize, style: RopeStyle, scaling: RopeScaling) -> RopeConfig {
        RopeConfig { theta: 10000.0, rotary_dim, style, scaling }
    }

    /// HF's `apply_rotary_pos_emb` in f64, from the table's angles, on one head.
    fn rotate64(x: &[f64], angles: &[f64], style: RopeStyle) -> Vec<f64> {
        let half = angles.len();
        let mut y = x.to_vec();
        for (i, &a) in angles.iter().enumerate() {
            let (i1, i2) = match style {
                RopeStyle::Half => (i, i + half),
                RopeStyle::Interleaved => (2 * i, 2 * i + 1),
            };
            y[i1] = x[i1] * a.cos() - x[i2] * a.sin();
            y[i2] = x[i2] * a.cos() + x[i1] * a.sin();
        }
        y
    }

    #[test]
    fn table_follows_hf_default_frequencies() {
        let t = RopeTable::new(&cfg(8, RopeStyle::Half, RopeScaling::None), 50);
        assert_eq!(t.half, 4);
        for p in [0usize, 1, 7, 49] {
            for i in 0..4 {
                let f = (1.0 / 10000f64.powf(2.0 * i as f64 / 8.0)) as f32;
                let a = (p as f32 * f) as f64;
                assert!((t.cos[p * 4 + i] as f64 - a.cos()).abs() < 1e-7);
                assert!((t.sin[p * 4 + i] as f64 - a.sin()).abs() < 1e-7);
            }
        }
        // exact values of the first frequency
        assert_eq!(t.cos[4], 1f64.cos() as f32);
        let lin = RopeTable::new(&cfg(8, RopeStyle::Half, RopeScaling::Linear { factor: 2.0 }), 5);
        assert_eq!(lin.sin[4], 0.5f64.sin() as f32);
    }

    #[test]
    fn llama3_scaling_matches_hf_formula() {
        // Llama 3.1 settings on a small table: head 64, theta 500000, factor 8, low 1, high 4, original 64
        // (so all three bands occur).
        let sc = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_positions: 64,
        };
        let c = RopeConfig { theta: 500000.0, rotary_dim: 64, style: RopeStyle::Half, scaling: sc };
        let got = inv_freq(&c);
        let (mut low, mut mid, mut high) = (0, 0, 0);
        for (i, &g) in got.iter().enumerate() {
            // The HF formula in f64.
            let f = 1.0 / 500000f64.powf(2.0 * i as f64 / 64.0);
            let wavelen = 2.0 * std::f64::consts::PI / f;
            let want = if wavelen < 64.0 / 4.0 {
                high += 1;
                f
            } else if wavelen > 64.0 / 1.0 {
                low += 1;
                f / 8.0
            } else {
                mid += 1;
                let s = (64.0 / wavelen - 1.0) / (4.0 - 1.0);
                (1.0 - s) * f / 8.0 + s * f
            };
            assert!((g as f64 - want).abs() <= 4e-7 * want, "inv_freq[{i}] = {g}, HF formula {want}");
        }
        assert!(low > 0 && mid > 0 && high > 0, "bands {low} {mid} {high}");
        // Two values worked out by hand: i = 0 is unchanged (wavelen 2 pi); i = 31 is divided by 8.
        assert_eq!(got[0], 1.0);
        let f31 = (1.0 / (500000f64.powf((62.0f32 / 64.0) as f64) as f32)) / 8.0;
        assert_eq!(got[31], f31);
    }

    #[test]
    fn rotation_matches_f64_and_inverse_undoes_it() {
        let mut rng = Rng::new(21);
        let (rows, n_heads, hd) = (6, 3, 8);
        let row_stride = 2 + n_heads * hd + 5;
        let col0 = 2;
        let positions = [0u32, 3, 1, 9, 9, 2];
        for style in [RopeStyle::Half, RopeStyle::Interleaved] {
            for rot in [8, 4] {
                // rot < hd: partial rotary (NeoX), the rest passes through.
                let t = RopeTable::new(&cfg(rot, style, RopeScaling::None), 10);
                let x = rng.vec(rows * row_stride, 1.0);
                let mut y = x.clone();
                rope_apply(&mut y, row_stride, col0, n_heads, hd, &positions, &t, false);
                let mut want = to_f64(&x);
                for (r, &p) in positions.iter().enumerate() {
                    let angles: Vec<f64> = (0..rot / 2)
                        .map(|i| (p as f32 * inv_freq(&cfg(rot, style, RopeScaling::None))[i]) as f64)
                        .collect();
                    for h in 0..n_heads {
                        let o = r * row_stride + col0 + h * hd;
                        let head = rotate64(&want[o..o + hd], &angles, style);
                        want[o..o + hd].copy_from_slice(&head);
                    }
                }
                assert_close("rope forward", &y, &want, 1e-5, 1.0);
                // The transpose: <R x, g> = <x, R^T g>.
                let g = rng.vec(rows * row_stride, 1.0);
                let mut rtg = g.clone();
                rope_apply(&mut rtg, row_stride, col0, n_heads, hd, &positions, &t, true);
                let lhs: f64 = y.iter().zip(&g).map(|(&a, &b)| a as f64 * b as f64).sum();
                let rhs: f64 = x.iter().zip(&rtg).map(|(&a, &b)| a as f64 * b as f64).sum();
                assert!((lhs - rhs).abs() < 1e-5 * lhs.abs().max(1.0));
                rope_apply(&mut y, row_stride, col0, n_heads, hd, &positions, &t, true);
                assert_close("rope inverse", &y, &to_f64(&x), 1e-5, 1.0);
            }
        }
    }
}
