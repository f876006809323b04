//! Per-token rewards with the KL penalty, generalized advantage estimation and whitening: pure functions of
//! one rollout's numbers (Ziegler et al. 2019, Stiennon et al. 2020; TRL's `PPOTrainer.compute_rewards`,
//! `compute_advantages` and `core.masked_whiten`).

/// Per-token rewards of one completion (TRL's `compute_rewards` with the `kl` (k1) penalty):
/// ```text
/// r_t = -kl_coef * (logp_t - ref_logp_t)        every completion token
/// r_T += score                                  the last token also gets the scalar reward
/// ```
/// Returns the rewards `[T]`, the sequence's KL estimate `sum_t (logp_t - ref_logp_t)` and its
/// non-score reward `sum_t -kl_coef (logp_t - ref_logp_t)`. An empty completion has no token to carry
/// the score: nothing is returned for it and both sums are 0.
pub fn kl_penalized_rewards(score: f64, logp: &[f32], ref_logp: &[f32], kl_coef: f64) -> (Vec<f64>, f64, f64) {
    debug_assert_eq!(logp.len(), ref_logp.len());
    let mut rewards: Vec<f64> = logp.iter().zip(ref_logp).map(|(&l, &r)| -kl_coef * (l as f64 - r as f64)).collect();
    let kl: f64 = logp.iter().zip(ref_logp).map(|(&l, &r)| l as f64 - r as f64).sum();
    let non_score: f64 = rewards.iter().sum();
    if let Some(last) = rewards.last_mut() {
        *last += score;
    }
    (rewards, kl, non_score)
}

/// Generalized advantage estimation (Schulman et al. 2016) over one completion, the episode ending after
/// its last token (no bootstrap value past it):
/// ```text
/// delta_t = r_t + gamma * V_{t+1} - V_t            V_T = 0
/// A_t     = delta_t + gamma * lam * A_{t+1}        A_T = 0
/// ```
/// Returns the advantages `[T]`; the value targets are `A_t + V_t` (before any whitening, as TRL).
pub fn gae(rewards: &[f64], values: &[f64], gamma: f64, lam: f64) -> Vec<f64> {
    debug_assert_eq!(rewards.len(), values.len());
    let n = rewards.len();
    let mut adv = vec![0.0; n];
    let mut last = 0.0;
    for t in (0..n).rev() {
        let next_value = if t + 1 < n { values[t + 1] } else { 0.0 };
        let delta = rewards[t] + gamma * next_value - values[t];
        last = delta + gamma * lam * last;
        adv[t] = last;
    }
    adv
}

/// Whitens in place: `(x - mean) / sqrt(var + 1e-8)` with the unbiased variance, over every value given
/// (TRL's `masked_whiten(x, mask, shift_mean=True)` over all completion tokens of the rollout). With fewer
/// than two values the variance is undefined (TRL raises); the values are only centred (to 0).
pub fn whiten(x: &mut [f64]) {
    let n = x.len();
    if n == 0 {
        return;
    }
    let mean = x.iter().sum::<f64>() / n as f64;
    if n < 2 {
        x.iter_mut().for_each(|v| *v -= mean);
        return;
    }
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1) as f64;
    let scale = 1.0 / (var + 1e-8).sqrt();
    x.iter_mut().for_each(|v| *v = (*v - mean) * scale);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn close(got: &[f64], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tol, "element {i}: got {g}, want {w} (all: {got:?})");
        }
    }

    #[test]
    fn rewards_carry_the_kl_penalty_and_the_score() {
        // logp - ref = [-1.0 - -1.5, -2.0 - -1.0, -0.5 - -0.5] = [0.5, -1.0, 0.0]
        // rewards    = -0.1 * that = [-0.05, 0.1, 0.0], plus the score 2.0 on the last token
        // KL         = 0.5 - 1.0 + 0.0 = -0.5; non-score reward = -0.05 + 0.1 + 0.0 = 0.05
        let (r, kl, non_score) = kl_penalized_rewards(2.0, &[-1.0, -2.0, -0.5], &[-1.5, -1.0, -0.5], 0.1);
        close(&r, &[-0.05, 0.1, 2.0], 1e-12);
        assert!((kl - -0.5).abs() < 1e-12 && (non_score - 0.05).abs() < 1e-12, "{kl} {non_score}");

        let (r, kl, non_score) = kl_penalized_rewards(2.0, &[], &[], 0.1);
        assert!(r.is_empty() && kl == 0.0 && non_score == 0.0);
    }

    #[test]
    fn gae_matches_hand_computation() {
        let (r, v) = ([-0.1, 0.2, 1.0], [0.5, 0.4, 0.3]);
        // gamma 1, lam 0.95:
        // t=2: delta = 1.0 + 0   - 0.3 =  0.7;  A = 0.7
        // t=1: delta = 0.2 + 0.3 - 0.4 =  0.1;  A = 0.1  + 0.95 * 0.7   = 0.765
        // t=0: delta = -0.1 + 0.4 - 0.5 = -0.2; A = -0.2 + 0.95 * 0.765 = 0.52675
        close(&gae(&r, &v, 1.0, 0.95), &[0.52675, 0.765, 0.7], 1e-12);
        // gamma 0.9, lam 0.5 (gamma * lam = 0.45):
        // t=2: delta = 1.0 - 0.3 = 0.7;                A = 0.7
        // t=1: delta = 0.2 + 0.9 * 0.3 - 0.4 = 0.07;   A = 0.07  + 0.45 * 0.7   =  0.385
        // t=0: delta = -0.1 + 0.9 * 0.4 - 0.5 = -0.24; A = -0.24 + 0.45 * 0.385 = -0.06675
        close(&gae(&r, &v, 0.9, 0.5), &[-0.06675, 0.385, 0.7], 1e-12);
        // lam 0 is the one-step TD error; gamma = lam = 1 is the return minus the value.
        close(&gae(&r, &v, 1.0, 0.0), &[-0.2, 0.1, 0.7], 1e-12);
        close(&gae(&r, &v, 1.0, 1.0), &[1.1 - 0.5, 1.2 - 0.4, 1.0 - 0.3], 1e-12);
        assert!(gae(&[], &[], 1.0, 0.95).is_empty());
    }

    #[test]
    fn whitening_matches_hand_computation() {
        // mean 2.5; unbiased variance ((1.5^2 + 0.5^2) * 2) / 3 = 5/3; scale 1 / sqrt(5/3 + 1e-8)
        // = sqrt(0.6) (to 3e-9 relative) = 0.7745966692: [-1.5, -0.5, 0.5, 1.5] * 0.7745966692
        let mut x = [1.0, 2.0, 3.0, 4.0];
        whiten(&mut x);
        close(&x, &[-1.1618950039, -0.3872983346, 0.3872983346, 1.1618950039], 1e-8);
        let mean: f64 = x.iter().sum::<f64>() / 4.0;
        let var: f64 = x.iter().map(|v| v * v).sum::<f64>() / 3.0;
        assert!(mean.abs() < 1e-12 && (var - 1.0).abs() < 1e-7);

        let mut one = [3.0];
        whiten(&mut one);
        assert_eq!(one, [0.0]);
        whiten(&mut []);
    }
}
