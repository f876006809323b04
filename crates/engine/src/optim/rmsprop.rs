//! RMSprop (Hinton, Coursera lecture 6e), as `torch.optim.RMSprop` with `centered=False`: the optimizer
//! of the DPO paper (Rafailov et al. 2023, appendix B: RMSprop, lr 1e-6, linear warmup over 150 steps).
//!
//! With learning rate lr, L2 weight decay wd (decayed tensors only) and momentum mu:
//! ```text
//! g   <- g + wd p
//! v   <- alpha v + (1 - alpha) g^2
//! avg <- sqrt(v) + eps
//! mu > 0:  buf <- mu buf + g / avg;  p <- p - lr buf
//! mu = 0:  p <- p - lr g / avg
//! ```
//! in the order of operations of `_single_tensor_rmsprop` on CPU (the path torch takes for CPU tensors):
//! `grad.add(param, alpha=wd)` is `fma(p, wd, g)`, `addcmul_` is `fma((1 - alpha) g, g, alpha v)`,
//! `param.add_(buf, alpha=-lr)` is `fma(buf, -lr, p)`, `addcdiv_` is `p + ((-lr) g) / avg`. Measured against
//! torch 2.15: identical except through `torch.sqrt`, which uses MKL and is off by one ulp in about 0.7%
//! of elements; this module's square root is correctly rounded.

use super::{for_chunks, multiversion};

pub(super) struct Scalars {
    weight_decay: Option<f32>,
    alpha: f32,
    one_minus_alpha: f32,
    eps: f32,
    momentum: f32,
    neg_lr: f32,
}

impl Scalars {
    pub(super) fn new(alpha: f64, eps: f64, weight_decay: f64, momentum: f64, lr: f64) -> Self {
        Scalars {
            weight_decay: (weight_decay != 0.0).then_some(weight_decay as f32),
            alpha: alpha as f32,
            one_minus_alpha: (1.0 - alpha) as f32,
            eps: eps as f32,
            momentum: momentum as f32,
            neg_lr: (-lr) as f32,
        }
    }
}

/// Updates `p`, `v` (`square_avg`) and, with momentum, `buf` (`momentum_buffer`; empty without) from `g`.
pub(super) fn update(p: &mut [f32], g: &[f32], v: &mut [f32], buf: &mut [f32], s: &Scalars) {
    for_chunks(p, g, v, buf, |p, g, v, buf| kernel(p, g, v, buf, s));
}

multiversion! {
    fn kernel(p: &mut [f32], g: &[f32], v: &mut [f32], buf: &mut [f32], s: &Scalars) {
        let wd = s.weight_decay.unwrap_or(0.0);
        let decay = s.weight_decay.is_some();
        if buf.is_empty() {
            for ((p, &g), v) in p.iter_mut().zip(g).zip(v.iter_mut()) {
                let g = if decay { p.mul_add(wd, g) } else { g };
                let avg = average(g, v, s);
                *p += (s.neg_lr * g) / avg;
            }
        } else {
            for (((p, &g), v), b) in p.iter_mut().zip(g).zip(v.iter_mut()).zip(buf.iter_mut()) {
                let g = if decay { p.mul_add(wd, g) } else { g };
                let avg = average(g, v, s);
                *b = *b * s.momentum + g / avg;
                *p = b.mul_add(s.neg_lr, *p);
            }
        }
    }
}

/// Updates `v` and returns `sqrt(v) + eps`.
#[inline(always)]
fn average(g: f32, v: &mut f32, s: &Scalars) -> f32 {
    *v = (s.one_minus_alpha * g).mul_add(g, *v * s.alpha);
    v.sqrt() + s.eps
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{assert_trajectory, trajectory};
    use super::super::OptimizerConfig;

    // torch's own square root (MKL) is off by an ulp now and then, so these agree to ~1e-7, not to the bit.

    #[test]
    fn rmsprop_matches_torch() {
        // show(run(lambda ps: torch.optim.RMSprop(ps, lr=0.01)))
        #[rustfmt::skip]
        let want = [
            [-0.27500033, -0.34999987, -0.22499935, 0.09999979, 0.025000162, 0.25, 0.4000002, 0.72499937, 0.8499999, 0.037499793, -0.09999984, 0.0625],
            [-0.36480272, -0.24672043, -0.41908467, 0.09999979, 0.16677624, 0.050000414, 0.571726, 0.5459353, 0.9246002, 0.037499793, 0.041776232, -0.13749959],
            [-0.62722427, -0.24672043, -0.20962, -0.11319522, 0.21938218, 0.30758917, 0.669613, 0.27180052, 0.86933064, -0.17569521, 0.09438218, 0.12008916],
            [-0.4951711, -0.33921608, -0.17506112, 0.039940767, 0.15289669, 0.37284717, 0.63725173, 0.36832297, 0.75029564, -0.022559226, 0.027896687, 0.18534715],
            [-0.47880498, -0.27797472, -0.20787135, 0.069360055, 0.08879124, 0.35666654, 0.58272433, 0.36832297, 0.8016299, 0.0068600625, -0.036208764, 0.16916654],
        ];
        assert_trajectory("rmsprop", &trajectory(OptimizerConfig::rmsprop()), &want, 1e-6);
    }

    #[test]
    fn rmsprop_with_momentum_and_weight_decay_matches_torch() {
        // show(run(lambda ps: torch.optim.RMSprop(groups(ps, 0.1), lr=0.01, momentum=0.9)))
        #[rustfmt::skip]
        let want = [
            [-0.27500015, -0.34999982, -0.22499679, 0.0999998, 0.025000136, 0.15000041, 0.4000002, 0.72499937, 0.8499999, 0.037499797, -0.09999984, 0.0625],
            [-0.06079257, -0.36197412, -0.604389, 0.2380709, -0.029678093, -0.2155647, 0.39172643, 0.72593415, 1.1046, 0.21749943, -0.13822344, -0.1374996],
            [0.03861736, -0.27322236, -0.83123446, 0.17540567, -0.046032205, -0.4593463, 0.4784438, 0.45306128, 1.3930405, 0.24730392, -0.13721937, -0.14991029],
            [0.20851795, -0.25727725, -0.84554094, 0.25415108, -0.10903568, -0.49687564, 0.49811298, 0.38586003, 1.4470699, 0.4183226, -0.20310242, -0.092098705],
            [0.28004062, -0.17954285, -0.8206073, 0.2952084, -0.19329467, -0.4903209, 0.4524367, 0.35561946, 1.5227174, 0.5247003, -0.29685524, -0.08226412],
        ];
        let cfg = OptimizerConfig::RmsProp { alpha: 0.99, eps: 1e-8, weight_decay: 0.1, momentum: 0.9 };
        assert_trajectory("rmsprop momentum wd", &trajectory(cfg), &want, 1e-6);
    }
}
