//! AdamW (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization"), as `torch.optim.AdamW`.
//!
//! At step t (from 1), with learning rate lr and, for decayed tensors, weight decay wd:
//! ```text
//! p     <- p * (1 - lr wd)
//! m     <- lerp(m, g, 1 - b1)                 = m + (1 - b1)(g - m)
//! v     <- b2 v + (1 - b2) g^2
//! denom <- sqrt(v) / sqrt(1 - b2^t) + eps
//! p     <- p - (lr / (1 - b1^t)) m / denom
//! ```
//! The order of operations is that of torch's CPU kernels: the fused kernel
//! (`aten/src/ATen/native/cpu/FusedAdamKernel.cpp`, `AdamW(fused=True)`, the default of HF
//! `TrainingArguments` with torch >= 2.8, so of TRL) and `_single_tensor_adam` (`foreach=False`). The lerp is
//! `fma(1 - b1, g - m, m)` (or `fma((1 - b1) - 1, g - m, g)` when `1 - b1 >= 0.5`, torch's other branch),
//! the second moment `fma((1 - b2) g, g, b2 v)`, the last line `p + ((-step_size) m) / denom`; scalars are
//! Python floats (f64) rounded to f32 once. The fused kernel runs 8-lane vectors over the first `n - n % 8`
//! elements of a tensor and a scalar loop over the last `n % 8`, which its compiler contracted the other
//! way, `fma(v, b2, ((1 - b2) g) g)`; this module does the same. Measured against torch 2.15 on this
//! AVX-512 machine (tensors of 3 to 40000 elements, with and without weight decay, both lerp branches):
//! bit-identical to the fused kernel. `foreach=False` differs from it by an ulp here and there (its
//! `torch.sqrt` is MKL's, which is not correctly rounded).

use super::{for_chunks, multiversion};

/// One step's scalars for one tensor, each rounded to f32 as torch rounds it.
pub(super) struct Scalars {
    /// `1 - lr wd`, or `None` when the tensor does not decay (torch then skips the multiplication).
    decay: Option<f32>,
    /// Lerp coefficient and base: `fma(coeff, g - m, base)` with base `m` when `|1 - b1| < 0.5`,
    /// else coefficient `(1 - b1) - 1` and base `g` (torch's `lerp`, exact at both ends).
    coeff: f32,
    base_is_grad: bool,
    beta2: f32,
    one_minus_beta2: f32,
    bias_correction2_sqrt: f32,
    eps: f32,
    neg_step_size: f32,
}

impl Scalars {
    pub(super) fn new(beta1: f64, beta2: f64, eps: f64, weight_decay: f64, lr: f64, step: u64) -> Self {
        // torch keeps `step` as a float tensor and evaluates `beta ** step` with C's pow.
        let t = step as f64;
        let bias_correction1 = 1.0 - beta1.powf(t);
        let bias_correction2 = 1.0 - beta2.powf(t);
        let step_size = lr / bias_correction1;
        let w = (1.0 - beta1) as f32;
        let small = w.abs() < 0.5;
        Scalars {
            decay: (weight_decay != 0.0).then_some((1.0 - lr * weight_decay) as f32),
            coeff: if small { w } else { w - 1.0 },
            base_is_grad: !small,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            bias_correction2_sqrt: bias_correction2.sqrt() as f32,
            eps: eps as f32,
            neg_step_size: (-step_size) as f32,
        }
    }
}

/// Width of the fused kernel's vectors: elements past the last multiple of it take its scalar loop.
const LANES: usize = 8;

/// Updates `p`, `m` (`exp_avg`) and `v` (`exp_avg_sq`) in place from `g`.
pub(super) fn update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &Scalars) {
    let body = p.len() - p.len() % LANES;
    let (p, p_tail) = p.split_at_mut(body);
    let (g, g_tail) = g.split_at(body);
    let (m, m_tail) = m.split_at_mut(body);
    let (v, v_tail) = v.split_at_mut(body);
    for_chunks(p, g, m, v, |p, g, m, v| kernel(p, g, m, v, s));
    for (((p, &g), m), v) in p_tail.iter_mut().zip(g_tail).zip(m_tail).zip(v_tail) {
        let p0 = s.decay.map_or(*p, |d| *p * d);
        *p = step::<true>(p0, g, m, v, s);
    }
}

multiversion! {
    fn kernel(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &Scalars) {
        let elems = p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut());
        match s.decay {
            Some(d) => {
                for (((p, &g), m), v) in elems {
                    *p = step::<false>(*p * d, g, m, v, s);
                }
            }
            None => {
                for (((p, &g), m), v) in elems {
                    *p = step::<false>(*p, g, m, v, s);
                }
            }
        }
    }
}

/// One element, `p` already decayed. `TAIL`: the fused kernel's scalar loop (see the module comment).
#[inline(always)]
fn step<const TAIL: bool>(p: f32, g: f32, m: &mut f32, v: &mut f32, s: &Scalars) -> f32 {
    let base = if s.base_is_grad { g } else { *m };
    let m1 = s.coeff.mul_add(g - *m, base);
    let v1 = if TAIL {
        v.mul_add(s.beta2, s.one_minus_beta2 * g * g)
    } else {
        (s.one_minus_beta2 * g).mul_add(g, *v * s.beta2)
    };
    *m = m1;
    *v = v1;
    let denom = v1.sqrt() / s.bias_correction2_sqrt + s.eps;
    p + (s.neg_step_size * m1) / denom
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{assert_trajectory, trajectory, trajectory_from};
    use super::super::OptimizerConfig;
    use crate::params::{NormParams, Params, Tensor};

    // Bit-identical to torch's fused kernel (the TRL default); with `foreach=False` torch differs from these
    // by at most 4e-9. These tensors are shorter than 8, so all of them take the kernel's scalar loop; the
    // vector body is checked in `adamw_vector_body_and_tail_match_torch`.

    #[test]
    fn adamw_matches_torch() {
        // show(run(lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.0, fused=True)))
        #[rustfmt::skip]
        let want = [
            [-0.365, -0.26, -0.13499999, 0.009999998, 0.115, 0.25, 0.49, 0.635, 0.76, -0.052500002, -0.009999998, 0.0625],
            [-0.35967326, -0.26382995, -0.15268752, 0.02340116, 0.116052635, 0.23511727, 0.49587125, 0.6276779, 0.7779715, -0.03909884, -0.008947366, 0.047617264],
            [-0.3733932, -0.2682708, -0.1540557, 0.020825129, 0.12059303, 0.24267761, 0.5085315, 0.6067172, 0.79495656, -0.04167487, -0.004406975, 0.055177603],
            [-0.37138996, -0.27574965, -0.15279701, 0.028781326, 0.11910867, 0.25035566, 0.51349276, 0.6022653, 0.7955826, -0.033718675, -0.005891332, 0.062855646],
            [-0.3696689, -0.27495074, -0.1540657, 0.033589907, 0.115157224, 0.25268415, 0.5123122, 0.6003838, 0.7985844, -0.028910095, -0.00984278, 0.065184146],
        ];
        let got = trajectory(OptimizerConfig::adamw());
        assert_trajectory("adamw", &got, &want, 1e-6);
        assert_trajectory("adamw (bits)", &got, &want, 0.0);
    }

    #[test]
    fn adamw_decays_only_the_matrix_as_torch() {
        // show(run(lambda ps: torch.optim.AdamW(groups(ps, 0.1), lr=0.01, fused=True)))
        #[rustfmt::skip]
        let want = [
            [-0.364625, -0.25975, -0.134875, 0.009999998, 0.114875, 0.24975, 0.49, 0.635, 0.76, -0.052500002, -0.009999998, 0.0625],
            [-0.35856903, -0.26306048, -0.15229279, 0.023381159, 0.11569789, 0.23436779, 0.49587125, 0.6276779, 0.7779715, -0.03909884, -0.008947366, 0.047617264],
            [-0.37121326, -0.26671213, -0.15320408, 0.020734984, 0.11989119, 0.24122502, 0.5085315, 0.6067172, 0.79495656, -0.04167487, -0.004406975, 0.055177603],
            [-0.3684676, -0.27365756, -0.151639, 0.028649712, 0.11816705, 0.24842063, 0.51349276, 0.6022653, 0.7955826, -0.033718675, -0.005891332, 0.062855646],
            [-0.36637807, -0.272585, -0.15275605, 0.033429645, 0.11409744, 0.2505007, 0.5123122, 0.6003838, 0.7985844, -0.028910095, -0.00984278, 0.065184146],
        ];
        let got = trajectory(OptimizerConfig::adamw().with_weight_decay(0.1));
        assert_trajectory("adamw wd", &got, &want, 1e-6);
        assert_trajectory("adamw wd (bits)", &got, &want, 0.0);
    }

    #[test]
    fn adamw_with_large_one_minus_beta1_uses_torch_lerp_branch() {
        // torch's lerp switches to `g - (g - m)(1 - w)` for weights of 0.5 and more.
        // show(run(lambda ps: torch.optim.AdamW(ps, lr=0.01, betas=(0.3, 0.999), weight_decay=0.0, fused=True)))
        #[rustfmt::skip]
        let want = [
            [-0.365, -0.26, -0.13499999, 0.009999997, 0.115, 0.25, 0.49, 0.635, 0.76, -0.052500002, -0.009999997, 0.0625],
            [-0.36889264, -0.25440237, -0.15768556, 0.016528768, 0.12576923, 0.22824831, 0.5052966, 0.6184613, 0.7741432, -0.04597123, 0.0007692324, 0.040748313],
            [-0.40249196, -0.25151634, -0.14005442, -0.0075255632, 0.13774563, 0.25452384, 0.5248853, 0.5808703, 0.77448463, -0.07002556, 0.012745642, 0.06702385],
            [-0.3896693, -0.26385376, -0.13127737, 0.010466954, 0.1310235, 0.26931223, 0.5247451, 0.5869572, 0.757896, -0.052033044, 0.0060235034, 0.08181224],
            [-0.38501388, -0.25597537, -0.13498409, 0.017913911, 0.12019485, 0.26923433, 0.51626176, 0.58797246, 0.76348484, -0.044586085, -0.0048051435, 0.08173435],
        ];
        let got = trajectory(OptimizerConfig::AdamW { beta1: 0.3, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 });
        assert_trajectory("adamw beta1 0.3 (bits)", &got, &want, 0.0);
    }

    #[test]
    fn adamw_vector_body_and_tail_match_torch() {
        // 20 = 16 + 4 and 11 = 8 + 3 elements: both the fused kernel's vectors and its scalar loop.
        // def init2(): return [torch.tensor([(i - 9) / 16 for i in range(20)]).reshape(4, 5),
        //                      torch.tensor([(i + 3) / 16 for i in range(11)])]
        // show(run(lambda ps: torch.optim.AdamW(groups(ps, 0.1), lr=0.01, fused=True), init2)[-1:])
        #[rustfmt::skip]
        let want = [
            -0.55219644f32, -0.5203427, -0.4624532, -0.338207, -0.31947866, -0.2450148, -0.15554969, -0.11156499,
            -0.08652419, 0.048345488, 0.013965899, 0.12913746, 0.16099104, 0.2188806, 0.34312683, 0.36185515,
            0.43631896, 0.52578413, 0.56976885, 0.5948096, 0.19981222, 0.22538386, 0.36108443, 0.32679975,
            0.4428311, 0.47504926, 0.53343433, 0.6585899, 0.67765725, 0.7526841, 0.8429695,
        ];
        let tensor = |shape: &[usize], f: &dyn Fn(usize) -> f32| {
            let n = shape.iter().product();
            Tensor { shape: shape.to_vec(), data: (0..n).map(f).collect() }
        };
        let p = Params {
            wte: tensor(&[4, 5], &|i| (i as f32 - 9.0) / 16.0),
            wpe: None,
            layers: vec![],
            norm_f: NormParams { weight: tensor(&[11], &|i| (i as f32 + 3.0) / 16.0), bias: None },
            lm_head: None,
            b_head: None,
        };
        let got = trajectory_from(OptimizerConfig::adamw().with_weight_decay(0.1), p);
        for (i, (g, w)) in got[4].iter().zip(want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "element {i}: got {g:e}, torch {w:e}");
        }
    }
}
