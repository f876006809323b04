//! AOT, alignment via optimal transport (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs
//! via Optimal Transport"): first-order stochastic dominance of the chosen over the rejected reward
//! distribution, made a 1-D optimal transport problem by sorting the batch. Rows are coupled through the
//! sort, so the per-row losses are indexed by sorted position.
//!
//! With `eps = label_smoothing`, `l(d) = -(1 - eps) logsigmoid(beta d) - eps logsigmoid(-beta d)` and
//! `l'(d) = beta (-(1 - eps) sigmoid(-beta d) + eps sigmoid(beta d))`:
//!
//! `aot` (paired): `h_i = (pc_i - pr_i)`, `g_i = (rc_i - rr_i)`, both sorted ascending, `d_k = h_(k) - g_(k)`;
//! the row `i` at sorted position `k` of `h` gets
//!
//! ```text
//! loss = mean_k l(d_k)
//! d loss / d policy_chosen_i = l'(d_k) / n        d loss / d policy_rejected_i = -l'(d_k) / n
//! ```
//!
//! `aot_unpaired`: the chosen log-ratios `u_c` and the rejected log-ratios `u_r` sorted separately,
//! `d_k = u_c(k) - u_r(k)`; the chosen row at position `k` of `u_c` gets `l'(d_k) / n`, the rejected row
//! at position `k` of `u_r` gets `-l'(d_k) / n`.
//!
//! TRL 1.16: `torch.sort(logratios)`, `torch.sort(ref_logratios)`, `delta = sorted - ref_sorted`,
//! `-F.logsigmoid(beta * delta) * (1 - ls) - F.logsigmoid(-beta * delta) * ls`; torch's sort passes the
//! gradient back to the unsorted positions, as here. Ties (a kink of the loss) get the gradient of the
//! stable order. Not combinable with WPO weights (TRL refuses too).

use super::math::{log_sigmoid, sigmoid};
use super::{Batch, LossConfig, LossSpec, RewardBasis, Term};

pub(super) const SPEC_PAIRED: LossSpec = LossSpec {
    name: "aot",
    help: "AOT (Melnyk et al. 2024), paired: sorts the batch's margins",
    needs_reference: true,
    per_pair: false,
    f_divergence: false,
    label_smoothing: true,
    weighting: false,
    reads_prompt: false,
    rewards: RewardBasis::SummedLogRatio,
    term: |cfg, b| Ok(term_paired(cfg, b)),
};

pub(super) const SPEC_UNPAIRED: LossSpec = LossSpec {
    name: "aot_unpaired",
    help: "AOT (Melnyk et al. 2024), unpaired: sorts chosen and rejected log-ratios apart",
    needs_reference: true,
    per_pair: false,
    f_divergence: false,
    label_smoothing: true,
    weighting: false,
    reads_prompt: false,
    rewards: RewardBasis::SummedLogRatio,
    term: |cfg, b| Ok(term_unpaired(cfg, b)),
};

/// Indices that sort `v` ascending (stable).
fn argsort(v: &[f64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    idx
}

/// `(l(d), l'(d))` of the smoothed sigmoid loss.
fn smoothed(beta: f64, eps: f64, d: f64) -> (f64, f64) {
    let z = beta * d;
    let l = -(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z);
    (l, beta * (-(1.0 - eps) * sigmoid(-z) + eps * sigmoid(z)))
}

/// Sorts `a` and `c` separately and pairs them by rank: `d_k = a_(k) - c_(k)`. Returns the sort orders of
/// `a` and `c`, and `(l(d_k), l'(d_k))` per rank.
fn by_rank(cfg: &LossConfig, a: &[f64], c: &[f64]) -> (Vec<usize>, Vec<usize>, Vec<(f64, f64)>) {
    let (ia, ic) = (argsort(a), argsort(c));
    let lk = ia.iter().zip(&ic).map(|(&i, &j)| smoothed(cfg.beta, cfg.label_smoothing, a[i] - c[j])).collect();
    (ia, ic, lk)
}

pub(super) fn term_paired(cfg: &LossConfig, b: &Batch) -> Term {
    let n = b.n;
    let h: Vec<f64> = (0..n).map(|i| b.x.policy_chosen[i] - b.x.policy_rejected[i]).collect();
    let g: Vec<f64> = (0..n).map(|i| b.ref_chosen[i] - b.ref_rejected[i]).collect();
    let (ih, _, lk) = by_rank(cfg, &h, &g);
    let mut t = Term { per_row: vec![0.0; n], d_chosen: vec![0.0; n], d_rejected: vec![0.0; n], d_prompt: None };
    for (k, &(l, dl)) in lk.iter().enumerate() {
        t.per_row[k] = l;
        // The reference's sorted log-ratios are constants; the policy row at rank k of h gets l'(d_k).
        t.d_chosen[ih[k]] = dl / n as f64;
        t.d_rejected[ih[k]] = -dl / n as f64;
    }
    t
}

pub(super) fn term_unpaired(cfg: &LossConfig, b: &Batch) -> Term {
    let n = b.n;
    let (ic, ir, lk) = by_rank(cfg, &b.chosen_ratio, &b.rejected_ratio);
    let mut t = Term { per_row: vec![0.0; n], d_chosen: vec![0.0; n], d_rejected: vec![0.0; n], d_prompt: None };
    for (k, &(l, dl)) in lk.iter().enumerate() {
        t.per_row[k] = l;
        t.d_chosen[ic[k]] = dl / n as f64;
        t.d_rejected[ir[k]] = -dl / n as f64;
    }
    t
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::{pair_loss, LossConfig, LossType};

    #[test]
    fn values_match_reference() {
        let f = fixtures();
        let x = f[0].pair();
        let got = pair_loss(LossType::Aot, &golden_cfg(), &x).unwrap().loss;
        assert!(rel_err(got, GPT2_AOT) < 1e-12, "aot {got} vs {GPT2_AOT}");
        let got = pair_loss(LossType::AotUnpaired, &golden_cfg(), &x).unwrap().loss;
        assert!(rel_err(got, GPT2_AOT_UNPAIRED) < 1e-12, "aot_unpaired {got} vs {GPT2_AOT_UNPAIRED}");
    }

    #[test]
    fn gradients_match_finite_differences() {
        for kind in [LossType::Aot, LossType::AotUnpaired] {
            for f in fixtures() {
                let d = f.distinct();
                assert!(d.pc.len() < f.pc.len());
                check_grad(&[(kind, 1.0)], &golden_cfg(), &d.pair());
            }
            let cfg = LossConfig { label_smoothing: 0.0, ..golden_cfg() };
            let s = synthetic(32, 19, 30.0);
            let x = s.pair();
            // Finite differences need every sort order to hold within the step.
            let c: Vec<f64> = (0..32).map(|i| s.pc[i] - s.rc[i]).collect();
            let r: Vec<f64> = (0..32).map(|i| s.pr[i] - s.rr[i]).collect();
            let h: Vec<f64> = (0..32).map(|i| s.pc[i] - s.pr[i]).collect();
            for v in [&c, &r, &h] {
                let o = super::argsort(v);
                assert!(o.windows(2).all(|w| v[w[1]] - v[w[0]] > 4.0 * FD_STEP));
            }
            check_grad(&[(kind, 1.0)], &cfg, &x);
        }
    }

    #[test]
    fn one_row_is_the_smoothed_sigmoid() {
        let f = &fixtures()[0];
        let x = super::super::PairLogps {
            policy_chosen: &f.pc[..1],
            policy_rejected: &f.pr[..1],
            ref_chosen: Some(&f.rc[..1]),
            ref_rejected: Some(&f.rr[..1]),
            chosen_len: &f.lc[..1],
            rejected_len: &f.lr[..1],
            ..Default::default()
        };
        let a = pair_loss(LossType::Aot, &golden_cfg(), &x).unwrap();
        let b = pair_loss(LossType::Cdpo, &golden_cfg(), &x).unwrap();
        assert!((a.loss - b.loss).abs() < 1e-14 && (a.d_policy_chosen[0] - b.d_policy_chosen[0]).abs() < 1e-15);
    }
}
