//! The fixture of the comparisons with torch, shared by the optimizer files.
//!
//! The expected numbers next to each test come from torch 2.15 (the venv of `../shared/tools/reference-venv.sh`) with
//! this harness, whose inputs are dyadic fractions so that Rust and Python start from the same bits:
//! ```python
//! import torch, numpy as np
//! def init(): return [torch.tensor([(i - 3) / 8 for i in range(6)]).reshape(2, 3),
//!                     torch.tensor([(i + 4) / 8 for i in range(3)]), torch.tensor([(i - 1) / 16 for i in range(3)])]
//! def grad(t, k, n): return torch.tensor([(((i * 7 + t * 3 + k * 5) % 11) - 5) / 64 for i in range(n)])
//! def run(make, init=init, lrs=(0.01, 0.02, 0.03, 0.02, 0.01)):
//!     ps = [torch.nn.Parameter(x) for x in init()]; opt = make(ps); out = []
//!     for t, lr in enumerate(lrs, 1):
//!         for k, p in enumerate(ps): p.grad = grad(t, k, p.numel()).reshape(p.shape)
//!         for grp in opt.param_groups: grp["lr"] = lr
//!         opt.step(); out.append(torch.cat([p.detach().flatten() for p in ps]))
//!     return out
//! # HF Trainer's groups: the matrix decays, the 1-D tensors do not
//! def groups(ps, wd): return [{"params": ps[:1], "weight_decay": wd}, {"params": ps[1:], "weight_decay": 0.0}]
//! def show(out):
//!     for row in out: print(", ".join(str(np.float32(x)) for x in row.numpy()) + ",")
//! ```

use super::*;
use crate::params::{NormParams, Params};

/// Learning rates of the five steps (`lrs` above).
pub const LRS: [f64; 5] = [0.01, 0.02, 0.03, 0.02, 0.01];

fn tensor(shape: &[usize], f: impl Fn(usize) -> f32) -> Tensor {
    let n = shape.iter().product();
    Tensor { shape: shape.to_vec(), data: (0..n).map(f).collect() }
}

/// `init()`: `wte` [2, 3], `norm_f.weight` [3], `norm_f.bias` [3] (canonical order).
pub fn tiny_params() -> Params {
    Params {
        wte: tensor(&[2, 3], |i| (i as f32 - 3.0) / 8.0),
        wpe: None,
        layers: vec![],
        norm_f: NormParams {
            weight: tensor(&[3], |i| (i as f32 + 4.0) / 8.0),
            bias: Some(tensor(&[3], |i| (i as f32 - 1.0) / 16.0)),
        },
        lm_head: None,
        b_head: None,
    }
}

/// `grad(t, k, n)` for every tensor `k` of [`tiny_params`] at step `t` (from 1).
pub fn tiny_grads(t: usize) -> Params {
    grads_like(&tiny_params(), t)
}

/// `grad(t, k, n)` for every tensor `k` of `p`'s layout at step `t`.
pub fn grads_like(p: &Params, t: usize) -> Params {
    let mut g = p.clone();
    for (k, (_, x)) in g.named_mut().into_iter().enumerate() {
        for (i, v) in x.data.iter_mut().enumerate() {
            *v = ((i * 7 + t * 3 + k * 5) % 11) as f32 / 64.0 - 5.0 / 64.0;
        }
    }
    g
}

/// Parameters after each of five steps with [`LRS`], flattened in canonical order (`run(...)` above).
pub fn trajectory(cfg: OptimizerConfig) -> Vec<Vec<f32>> {
    trajectory_from(cfg, tiny_params())
}

/// [`trajectory`] from other initial parameters (`run(..., init=...)`).
pub fn trajectory_from(cfg: OptimizerConfig, mut p: Params) -> Vec<Vec<f32>> {
    let mut opt = Optimizer::new(cfg, &p);
    (1..=5)
        .map(|t| {
            let g = grads_like(&p, t);
            opt.step(&mut p, &g, LRS[t - 1]);
            p.named().iter().flat_map(|(_, x)| x.data.iter().copied()).collect()
        })
        .collect()
}

/// Every value within `rel` of torch's, relative to `max(|want|, 1e-3)` (values cross zero).
/// `rel = 0` asks for identical bits.
#[track_caller]
pub fn assert_trajectory(what: &str, got: &[Vec<f32>], want: &[[f32; 12]; 5], rel: f64) {
    for (step, (g, w)) in got.iter().zip(want).enumerate() {
        for (i, (&g, &w)) in g.iter().zip(w).enumerate() {
            let err = (g as f64 - w as f64).abs() / (w as f64).abs().max(1e-3);
            let ok = if rel == 0.0 { g.to_bits() == w.to_bits() } else { err <= rel };
            assert!(ok, "{what}: step {} element {i}: got {g:e}, torch {w:e} (error {err:.2e})", step + 1);
        }
    }
}

/// SplitMix64 values uniform in `[-scale, scale)`, for tests that need many numbers.
pub fn fill(data: &mut [f32], seed: u64, scale: f32) {
    let mut s = seed ^ 0x9E37_79B9_7F4A_7C15;
    for v in data {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        *v = ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale;
    }
}
