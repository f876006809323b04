//! PPO's clipped objectives (Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7, and the
//! clipped value loss of OpenAI's PPO2 baseline), as TRL's `PPOTrainer.loss`: pure functions of per-token
//! numbers that return the loss (a mean over the tokens given) and its gradient.

/// The clipped surrogate and what TRL logs beside it.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyLoss {
    /// `mean_t max(-A_t r_t, -A_t clip(r_t, 1 - eps, 1 + eps))` with `r_t = exp(logp_t - old_logp_t)`
    pub loss: f64,
    /// `[T]` d loss / d logp_t
    pub grad: Vec<f64>,
    /// Fraction of tokens where the clipped term is the larger (TRL `ppo/policy/clipfrac`).
    pub clip_frac: f64,
    /// `0.5 * mean_t (logp_t - old_logp_t)^2` (TRL `ppo/policy/approxkl`).
    pub approx_kl: f64,
}

/// The clipped surrogate over the tokens given (the mean over all of them, TRL's `masked_mean`).
///
/// Gradient: with `r` inside `[1 - eps, 1 + eps]` both terms are `-A r` and the gradient is `-A r / T`;
/// outside it the clipped term is constant, so the gradient is `-A r / T` where the unclipped term is the
/// larger and 0 where the clipped one is (PPO's "no incentive to move r further").
pub fn policy_loss(logp: &[f64], old_logp: &[f64], advantages: &[f64], clip_range: f64) -> PolicyLoss {
    debug_assert!(logp.len() == old_logp.len() && logp.len() == advantages.len());
    let n = logp.len();
    if n == 0 {
        return PolicyLoss { loss: 0.0, grad: Vec::new(), clip_frac: 0.0, approx_kl: 0.0 };
    }
    let inv_n = 1.0 / n as f64;
    let (lo, hi) = (1.0 - clip_range, 1.0 + clip_range);
    let (mut loss, mut clipped, mut sq) = (0.0, 0usize, 0.0);
    let mut grad = Vec::with_capacity(n);
    for ((&l, &o), &a) in logp.iter().zip(old_logp).zip(advantages) {
        let log_ratio = l - o;
        let ratio = log_ratio.exp();
        let unclipped = -a * ratio;
        let clipped_term = -a * ratio.clamp(lo, hi);
        loss += unclipped.max(clipped_term);
        sq += log_ratio * log_ratio;
        if clipped_term > unclipped {
            clipped += 1;
        }
        let inside = (lo..=hi).contains(&ratio);
        grad.push(if inside || unclipped >= clipped_term { unclipped * inv_n } else { 0.0 });
    }
    PolicyLoss { loss: loss * inv_n, grad, clip_frac: clipped as f64 * inv_n, approx_kl: 0.5 * sq * inv_n }
}

/// The clipped value loss and its clip fraction.
#[derive(Clone, Debug, PartialEq)]
pub struct ValueLoss {
    /// `0.5 * mean_t max((V_t - R_t)^2, (clip(V_t, V_old - c, V_old + c) - R_t)^2)`
    pub loss: f64,
    /// `[T]` d loss / d V_t
    pub grad: Vec<f64>,
    /// Fraction of tokens where the clipped term is the larger (TRL `ppo/val/clipfrac`).
    pub clip_frac: f64,
}

/// PPO2's clipped value loss over the tokens given: the new value may not gain by moving more than
/// `clip_range_value` away from the value the rollout saw.
///
/// Gradient: `(V_t - R_t) / T` where the unclipped term is the larger or `V_t` is inside the clip range
/// (where both terms agree), else 0.
pub fn value_loss(values: &[f64], old_values: &[f64], returns: &[f64], clip_range_value: f64) -> ValueLoss {
    debug_assert!(values.len() == old_values.len() && values.len() == returns.len());
    let n = values.len();
    if n == 0 {
        return ValueLoss { loss: 0.0, grad: Vec::new(), clip_frac: 0.0 };
    }
    let inv_n = 1.0 / n as f64;
    let (mut loss, mut clipped) = (0.0, 0usize);
    let mut grad = Vec::with_capacity(n);
    for ((&v, &o), &r) in values.iter().zip(old_values).zip(returns) {
        let (lo, hi) = (o - clip_range_value, o + clip_range_value);
        // `clamp` by hand: a rollout whose values are not finite (weights gone bad) must give a loss that
        // is not finite, which the loop reports, rather than a panic on NaN bounds.
        let v_clipped = if v < lo {
            lo
        } else if v > hi {
            hi
        } else {
            v
        };
        let unclipped = (v - r) * (v - r);
        let clipped_term = (v_clipped - r) * (v_clipped - r);
        loss += unclipped.max(clipped_term);
        if clipped_term > unclipped {
            clipped += 1;
        }
        let inside = (lo..=hi).contains(&v);
        grad.push(if inside || unclipped >= clipped_term { (v - r) * inv_n } else { 0.0 });
    }
    ValueLoss { loss: 0.5 * loss * inv_n, grad, clip_frac: clipped as f64 * inv_n }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::rng::Rng;

    #[track_caller]
    fn close(got: f64, want: f64, tol: f64, what: &str) {
        assert!((got - want).abs() <= tol, "{what}: got {got}, want {want}");
    }

    #[test]
    fn policy_loss_matches_hand_computation() {
        let new = [-1.0, -0.5, -2.0, -0.5, -2.0];
        let old = [-1.0, -1.0, -1.5, -1.0, -1.5];
        let adv = [1.0, 2.0, -1.0, -1.0, 2.0];
        let p = policy_loss(&new, &old, &adv, 0.2);
        // r = [1, e^0.5, e^-0.5, e^0.5, e^-0.5] = [1, 1.6487212707, 0.6065306597, 1.6487212707, 0.6065306597]
        // t0: A 1,  r 1:          -A r = -1,             -A clip = -1            -> -1          (inside)
        // t1: A 2,  r 1.6487:     -A r = -3.2974425414,  -A 1.2 = -2.4           -> -2.4        (clipped)
        // t2: A -1, r 0.6065:     -A r = 0.6065306597,   -A 0.8 = 0.8            -> 0.8         (clipped)
        // t3: A -1, r 1.6487:     -A r = 1.6487212707,   -A 1.2 = 1.2            -> 1.6487212707 (unclipped)
        // t4: A 2,  r 0.6065:     -A r = -1.2130613195,  -A 0.8 = -1.6           -> -1.2130613195 (unclipped)
        // loss = (-1 - 2.4 + 0.8 + 1.6487212707 - 1.2130613195) / 5 = -2.1643400488 / 5 = -0.4328680098
        close(p.loss, -0.4328680098, 1e-10, "loss");
        // grad = -A r / 5 on the unclipped tokens: [-0.2, 0, 0, 0.3297442541, -0.2426122639]
        for (i, want) in [-0.2, 0.0, 0.0, 0.3297442541, -0.2426122639].into_iter().enumerate() {
            close(p.grad[i], want, 1e-10, &format!("grad {i}"));
        }
        close(p.clip_frac, 0.4, 1e-15, "clip_frac"); // t1, t2
                                                     // approx KL = 0.5 * mean([0, 0.25, 0.25, 0.25, 0.25]) = 0.5 * 0.2 = 0.1
        close(p.approx_kl, 0.1, 1e-15, "approx_kl");

        let empty = policy_loss(&[], &[], &[], 0.2);
        assert_eq!((empty.loss, empty.clip_frac, empty.approx_kl), (0.0, 0.0, 0.0));
    }

    #[test]
    fn value_loss_matches_hand_computation() {
        let v = value_loss(&[0.9, 0.5, -0.5], &[0.8, 0.8, 0.0], &[2.0, 0.0, 0.0], 0.2);
        // t0: range [0.6, 1.0], clip(0.9) = 0.9:  (0.9 - 2)^2 = 1.21 both               -> 1.21 (inside)
        // t1: range [0.6, 1.0], clip(0.5) = 0.6:  (0.5)^2 = 0.25, (0.6)^2 = 0.36        -> 0.36 (clipped)
        // t2: range [-0.2, 0.2], clip(-0.5) = -0.2: (-0.5)^2 = 0.25, (-0.2)^2 = 0.04    -> 0.25 (unclipped)
        // loss = 0.5 * (1.21 + 0.36 + 0.25) / 3 = 0.5 * 1.82 / 3 = 0.3033333333
        close(v.loss, 0.3033333333, 1e-10, "loss");
        // grad = (V - R) / 3 where not clipped: [-1.1 / 3, 0, -0.5 / 3]
        for (i, want) in [-0.3666666667, 0.0, -0.1666666667].into_iter().enumerate() {
            close(v.grad[i], want, 1e-10, &format!("grad {i}"));
        }
        close(v.clip_frac, 1.0 / 3.0, 1e-15, "clip_frac");
    }

    /// The PPO loss `pg + vf_coef * vf` against central differences in every new log-prob and value, on
    /// random tokens of both branches of each clip (kept away from the kinks, where no derivative exists).
    #[test]
    fn gradients_match_finite_differences() {
        let (eps, eps_v, vf_coef) = (0.2, 0.2, 0.1);
        let mut rng = Rng::new(5);
        let mut u = |a: f64, b: f64| a + (b - a) * rng.uniform();
        let n = 64;
        let (mut new, mut old, mut adv, mut v, mut v_old, mut ret) = (vec![], vec![], vec![], vec![], vec![], vec![]);
        while new.len() < n {
            let (l, o, vv, vo) = (u(-3.0, -0.1), u(-3.0, -0.1), u(-2.0, 2.0), u(-2.0, 2.0));
            let r = (l - o).exp();
            let near_ratio_kink = (r - (1.0 - eps)).abs() < 1e-3 || (r - (1.0 + eps)).abs() < 1e-3;
            if near_ratio_kink || ((vv - vo).abs() - eps_v).abs() < 1e-3 {
                continue;
            }
            new.push(l);
            old.push(o);
            adv.push(u(-2.0, 2.0));
            v.push(vv);
            v_old.push(vo);
            ret.push(u(-2.0, 2.0));
        }
        let total = |new: &[f64], v: &[f64]| {
            policy_loss(new, &old, &adv, eps).loss + vf_coef * value_loss(v, &v_old, &ret, eps_v).loss
        };
        let p = policy_loss(&new, &old, &adv, eps);
        let vl = value_loss(&v, &v_old, &ret, eps_v);
        assert!(p.clip_frac > 0.1 && p.clip_frac < 0.9, "both policy branches covered: {}", p.clip_frac);
        assert!(vl.clip_frac > 0.1 && vl.clip_frac < 0.9, "both value branches covered: {}", vl.clip_frac);
        let h = 1e-6;
        for i in 0..n {
            let (mut up, mut down) = (new.clone(), new.clone());
            up[i] += h;
            down[i] -= h;
            let fd = (total(&up, &v) - total(&down, &v)) / (2.0 * h);
            close(p.grad[i], fd, 1e-8, &format!("d/dlogp {i}"));
            let (mut up, mut down) = (v.clone(), v.clone());
            up[i] += h;
            down[i] -= h;
            let fd = (total(&new, &up) - total(&new, &down)) / (2.0 * h);
            close(vf_coef * vl.grad[i], fd, 1e-8, &format!("d/dV {i}"));
        }
    }
}
