//! Stochastic gradient descent, as `torch.optim.SGD` with dampening 0 and no Nesterov momentum.
//!
//! With learning rate lr, L2 weight decay wd (decayed tensors only) and momentum mu:
//! ```text
//! g   <- g + wd p
//! mu != 0:  buf <- g at the first step, else mu buf + g;  g <- buf
//! p   <- p - lr g
//! ```
//! in the order of operations of `_single_tensor_sgd` on CPU: `grad.add(param, alpha=wd)` is
//! `fma(p, wd, g)`, `param.add_(grad, alpha=-lr)` is `fma(g, -lr, p)`. Measured against torch 2.15: bit for
//! bit.

use super::{for_chunks, multiversion};

pub(super) struct Scalars {
    weight_decay: Option<f32>,
    momentum: f32,
    neg_lr: f32,
    /// torch's momentum buffer does not exist before the first step and is then the gradient itself.
    first: bool,
}

impl Scalars {
    pub(super) fn new(momentum: f64, weight_decay: f64, lr: f64, first: bool) -> Self {
        Scalars {
            weight_decay: (weight_decay != 0.0).then_some(weight_decay as f32),
            momentum: momentum as f32,
            neg_lr: (-lr) as f32,
            first,
        }
    }
}

/// Updates `p` and, with momentum, `buf` (`momentum_buffer`; empty without) from `g`.
pub(super) fn update(p: &mut [f32], g: &[f32], buf: &mut [f32], s: &Scalars) {
    for_chunks(p, g, buf, &mut [], |p, g, buf, _| kernel(p, g, buf, s));
}

multiversion! {
    fn kernel(p: &mut [f32], g: &[f32], buf: &mut [f32], s: &Scalars) {
        let wd = s.weight_decay.unwrap_or(0.0);
        let decay = s.weight_decay.is_some();
        if buf.is_empty() {
            for (p, &g) in p.iter_mut().zip(g) {
                let g = if decay { p.mul_add(wd, g) } else { g };
                *p = g.mul_add(s.neg_lr, *p);
            }
        } else {
            for ((p, &g), b) in p.iter_mut().zip(g).zip(buf.iter_mut()) {
                let g = if decay { p.mul_add(wd, g) } else { g };
                // `buf.mul_(mu).add_(g, alpha=1)`: `fma(g, 1, mu buf)`, the same as one rounded addition.
                *b = if s.first { g } else { *b * s.momentum + g };
                *p = b.mul_add(s.neg_lr, *p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{assert_trajectory, trajectory};
    use super::super::OptimizerConfig;

    #[test]
    fn sgd_with_momentum_matches_torch() {
        // show(run(lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9)))
        #[rustfmt::skip]
        let want = [
            [-0.3746875, -0.25078124, -0.12515625, 0.00046875, 0.124375, 0.25, 0.49953124, 0.6251562, 0.75078124, -0.06203125, -0.000625, 0.0625],
            [-0.37443748, -0.25125, -0.1266875, 0.0013124999, 0.1245, 0.2490625, 0.50025, 0.6248125, 0.7528125, -0.061187502, -0.00049999997, 0.0615625],
            [-0.37597498, -0.25188282, -0.12687968, 0.0010453123, 0.1251375, 0.2501406, 0.5021578, 0.6220047, 0.75508595, -0.06145469, 0.00013750009, 0.06264062],
            [-0.3756475, -0.2532, -0.12668249, 0.0024474997, 0.12489499, 0.25141248, 0.50299, 0.6212575, 0.7552, -0.060052503, -0.000104999875, 0.063912496],
            [-0.37534386, -0.25301147, -0.12690626, 0.003390984, 0.12400462, 0.25182858, 0.5027395, 0.62092125, 0.75587636, -0.059109017, -0.0009953749, 0.06432859],
        ];
        let got = trajectory(OptimizerConfig::Sgd { momentum: 0.9, weight_decay: 0.0 });
        assert_trajectory("sgd momentum", &got, &want, 1e-6);
        assert_trajectory("sgd momentum (bits)", &got, &want, 0.0);
    }

    #[test]
    fn sgd_with_momentum_and_weight_decay_matches_torch() {
        // show(run(lambda ps: torch.optim.SGD(groups(ps, 0.1), lr=0.01, momentum=0.9)))
        #[rustfmt::skip]
        let want = [
            [-0.3743125, -0.25053126, -0.12503125, 0.00046875, 0.12425, 0.24975, 0.49953124, 0.6251562, 0.75078124, -0.06203125, -0.000625, 0.0625],
            [-0.37263885, -0.25004894, -0.12608744, 0.0013115624, 0.1239015, 0.24786301, 0.50025, 0.6248125, 0.7528125, -0.061187502, -0.00049999997, 0.0615625],
            [-0.37113655, -0.24864766, -0.12526004, 0.0010391744, 0.12352807, 0.24691573, 0.5021578, 0.6220047, 0.75508595, -0.06145469, 0.00013750009, 0.06264062],
            [-0.3682429, -0.2482471, -0.124200575, 0.0024361631, 0.122431956, 0.24647853, 0.50299, 0.6212575, 0.7552, -0.060052503, -0.000104999875, 0.063912496],
            [-0.36641625, -0.24703735, -0.12391212, 0.0033748718, 0.121035025, 0.24587905, 0.5027395, 0.62092125, 0.75587636, -0.059109017, -0.0009953749, 0.06432859],
        ];
        let got = trajectory(OptimizerConfig::Sgd { momentum: 0.9, weight_decay: 0.1 });
        assert_trajectory("sgd momentum wd (bits)", &got, &want, 0.0);
    }

    #[test]
    fn plain_sgd_with_weight_decay_matches_torch() {
        // show(run(lambda ps: torch.optim.SGD(groups(ps, 0.1), lr=0.01)))
        #[rustfmt::skip]
        let want = [
            [-0.3743125, -0.25053126, -0.12503125, 0.00046875, 0.12425, 0.24975, 0.49953124, 0.6251562, 0.75078124, -0.06203125, -0.000625, 0.0625],
            [-0.37387636, -0.2490927, -0.12603119, 0.0004678125, 0.1252515, 0.24831301, 0.50109375, 0.6245312, 0.75140625, -0.06203125, 0.000625, 0.0615625],
            [-0.37462974, -0.24834542, -0.1237781, -0.0009398409, 0.1253445, 0.24991181, 0.50203127, 0.62218744, 0.7509375, -0.0634375, 0.00109375, 0.06390625],
            [-0.37263048, -0.24878623, -0.123218045, 0.0006245387, 0.12446881, 0.25003698, 0.50171876, 0.62312496, 0.7496875, -0.061875, 0.00046875002, 0.06453125],
            [-0.3721016, -0.24775618, -0.12340733, 0.0009364141, 0.12356309, 0.2496307, 0.50109375, 0.62312496, 0.7503125, -0.0615625, -0.00031249996, 0.064375],
        ];
        let got = trajectory(OptimizerConfig::Sgd { momentum: 0.0, weight_decay: 0.1 });
        assert_trajectory("sgd wd (bits)", &got, &want, 0.0);
    }
}
