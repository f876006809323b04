//! The global gradient norm and clipping by it, as `torch.nn.utils.clip_grad_norm_` (what HF Trainer calls
//! with `max_grad_norm`, default 1.0).

use super::{multiversion, CHUNK};
use crate::params::ParamSet;
use rayon::prelude::*;

/// `sqrt(sum g^2)` over every tensor of `grads`, squares summed in f64 (exact per term, so the result is
/// the true norm to f64 rounding). The sum runs over fixed chunks, added in order: the same on any number
/// of threads. Finite exactly when every gradient is finite (f32 squares cannot overflow an f64 sum).
///
/// torch sums in f32 (`_foreach_norm` per tensor, then the norm of those norms), so its value, as HF logs it
/// under `grad_norm`, is this one rounded to f32 give or take a few f32 ulps of summation error.
pub fn global_grad_norm<G: ParamSet + ?Sized>(grads: &G) -> f64 {
    grads.named().iter().map(|(_, t)| sum_squares(&t.data)).sum::<f64>().sqrt()
}

/// Scales `grads` so that their global norm is at most `max_norm` and returns the norm before clipping.
///
/// As torch: the norm is taken as f32, `clip_coef = max_norm / (total_norm + 1e-6)` is evaluated in f32 as
/// `(1 / (total_norm + 1e-6)) * max_norm` (`Tensor.__rtruediv__` is a reciprocal and a product), clamped to
/// at most 1, and every gradient is multiplied by it in f32. Multiplying by 1 changes nothing, so gradients
/// are only touched when the coefficient is below 1, or NaN (a NaN norm makes every gradient NaN in torch
/// too; check [`grads_finite`] first).
pub fn clip_grad_norm<G: ParamSet + ?Sized>(grads: &mut G, max_norm: f64) -> f64 {
    let (norm, coef) = clip_coefficient(grads, max_norm);
    if let Some(coef) = coef {
        for (_, t) in grads.named_mut() {
            t.data.par_chunks_mut(CHUNK).for_each(|c| c.iter_mut().for_each(|x| *x *= coef));
        }
    }
    norm
}

/// The global norm of `grads` and the factor [`clip_grad_norm`] multiplies them by (`None` when it leaves
/// them alone), without scaling them: for [`super::Optimizer::step_and_clear`], which scales each chunk as
/// it updates from it.
pub fn clip_coefficient<G: ParamSet + ?Sized>(grads: &G, max_norm: f64) -> (f64, Option<f32>) {
    let norm = global_grad_norm(grads);
    let coef = (1.0f32 / (norm as f32 + 1e-6f32)) * max_norm as f32;
    (norm, (coef < 1.0 || coef.is_nan()).then_some(coef))
}

/// Whether every gradient is finite (no NaN, no infinity).
pub fn grads_finite<G: ParamSet + ?Sized>(grads: &G) -> bool {
    grads.named().iter().all(|(_, t)| t.data.par_chunks(CHUNK).all(|c| c.iter().all(|x| x.is_finite())))
}

/// Sum of squares in f64 over fixed chunks, partial sums added in chunk order.
fn sum_squares(x: &[f32]) -> f64 {
    if x.len() <= CHUNK {
        return chunk_sum_squares(x);
    }
    let parts: Vec<f64> = x.par_chunks(CHUNK).map(chunk_sum_squares).collect();
    parts.iter().sum()
}

fn chunk_sum_squares(x: &[f32]) -> f64 {
    let mut acc = [0.0f64; 8];
    lanes_sum_squares(x, &mut acc);
    acc.iter().sum()
}

multiversion! {
    /// Adds `x[i]^2` into lane `i % 8` of `acc` (eight independent sums, so the loop vectorises).
    fn lanes_sum_squares(x: &[f32], acc: &mut [f64; 8]) {
        let chunks = x.chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += v as f64 * v as f64;
            }
        }
        for (a, &v) in acc.iter_mut().zip(rest) {
            *a += v as f64 * v as f64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::tiny_grads;
    use super::*;
    use crate::params::Params;

    // ps = [torch.nn.Parameter(x) for x in init()]        (harness in `optim::test_util`)
    // for k, p in enumerate(ps): p.grad = grad(1, k, p.numel()).reshape(p.shape) * 8
    // n = torch.nn.utils.clip_grad_norm_(ps, max_norm); print(n.item(), torch.cat([p.grad.flatten() for p in ps]))
    fn grads() -> Params {
        let mut g = tiny_grads(1);
        g.named_mut().into_iter().for_each(|(_, t)| t.data.iter_mut().for_each(|x| *x *= 8.0));
        g
    }

    fn flat(g: &Params) -> Vec<f32> {
        g.named().iter().flat_map(|(_, t)| t.data.iter().copied()).collect()
    }

    #[test]
    fn clipping_matches_torch() {
        let torch_norm = 1.3404756784439087; // both max_norm 1.0 and 100.0
        #[rustfmt::skip]
        let clipped = [-0.18650083f32, 0.4662521, 0.093250416, -0.27975124, 0.37300166, 0.0, 0.27975124, -0.093250416, -0.4662521, -0.27975124, 0.37300166, 0.0];

        let mut g = grads();
        let norm = clip_grad_norm(&mut g, 1.0);
        assert!((norm - torch_norm).abs() <= 1e-6 * torch_norm, "norm {norm} torch {torch_norm}");
        for (i, (got, want)) in flat(&g).into_iter().zip(clipped).enumerate() {
            assert!((got - want).abs() <= 1e-6 * want.abs(), "element {i}: {got} torch {want}");
        }

        // Below the threshold nothing changes.
        let mut g = grads();
        let norm = clip_grad_norm(&mut g, 100.0);
        assert!((norm - torch_norm).abs() <= 1e-6 * torch_norm);
        assert!(g == grads());
        assert_eq!(global_grad_norm(&g), norm);
    }

    #[test]
    fn non_finite_gradients_are_reported() {
        let mut g = grads();
        assert!(grads_finite(&g));
        g.norm_f.weight.data[1] = f32::INFINITY;
        assert!(!grads_finite(&g));
        assert_eq!(global_grad_norm(&g), f64::INFINITY);
        g.norm_f.weight.data[1] = f32::NAN;
        assert!(!grads_finite(&g) && global_grad_norm(&g).is_nan());
    }

    #[test]
    fn norm_is_exact_in_f64() {
        // 3-4-5 over two tensors and several chunks: sqrt(9 n + 16 n) = 5 sqrt(n).
        let mut g = tiny_grads(1);
        let n = 3 * CHUNK + 5;
        g.wte = crate::params::Tensor { shape: vec![n], data: vec![3.0; n] };
        g.norm_f.weight.data = vec![4.0; n];
        g.norm_f.bias = None;
        assert_eq!(global_grad_norm(&g), 5.0 * (n as f64).sqrt());
    }
}
