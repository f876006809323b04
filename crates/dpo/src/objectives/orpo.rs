//! ORPO, monolithic preference optimisation without a reference model (Hong et al. 2024, "ORPO:
//! Monolithic Preference Optimization without Reference Model", Eqs. 4-7): the NLL of the chosen
//! sequence plus `lambda` times the log-sigmoid of the log odds ratio of chosen over rejected.
//!
//! As TRL 1.16's `ORPOTrainer` (`trl/experimental/orpo`), with `lambda = beta` (`ORPOConfig.beta`, 0.1),
//! `a_c = pc / L_c`, `a_r = pr / L_r` the average completion log-probs, and
//! `log1mexp(a) = log(1 - exp(a))`:
//!
//! ```text
//! lo_i  = (a_c - a_r) - (log1mexp(a_c) - log1mexp(a_r))           the log odds ratio
//! nll   = -(sum_i pp_i + sum_i pc_i) / (sum_i Lp_i + sum_i L_c,i)  mean over the batch's chosen tokens
//! loss  = nll - beta * mean_i logsigmoid(lo_i)
//! d lo / d a_c = 1 / (1 - exp(a_c))            d lo / d a_r = -1 / (1 - exp(a_r))
//! d loss / d policy_chosen_i   = -1 / N - beta * sigmoid(-lo_i) / (1 - exp(a_c)) / (n L_c,i)
//! d loss / d policy_rejected_i =          beta * sigmoid(-lo_i) / (1 - exp(a_r)) / (n L_r,i)
//! d loss / d prompt_i          = -1 / N
//! ```
//!
//! TRL's NLL (`cross_entropy_loss(all_logits[:len_chosen], labels[:len_chosen])`, labels = input ids) covers
//! the prompt tokens too ("orpo chosen nll loss is computed over the full prompt and response"): `pp_i`,
//! `Lp_i` are the sum and count of the predicted prompt tokens ([`super::PromptLogps`]). Without them the
//! NLL covers the chosen completion only (as CPO's and DPO's `sft`), which differs from TRL when prompts are
//! present. The odds-ratio part reads average completion log-probs (`average_log_prob=True`).

use super::math::{log1mexp, log_sigmoid, sigmoid};
use super::simpo::averages;
use super::{Batch, LossConfig, LossSpec, ObjectiveError, RewardBasis, Term};

pub(super) const SPEC: LossSpec = LossSpec {
    name: "orpo",
    help: "ORPO (Hong et al. 2024), reference-free: NLL of prompt and chosen + beta * odds-ratio loss",
    needs_reference: false,
    per_pair: false,
    f_divergence: false,
    label_smoothing: false,
    weighting: false,
    reads_prompt: true,
    rewards: RewardBasis::Average,
    term,
};

pub(super) fn term(cfg: &LossConfig, b: &Batch) -> Result<Term, ObjectiveError> {
    let (n, beta) = (b.n, cfg.beta);
    let (ac, ar) = averages(b, "orpo")?;
    let mut tokens: usize = b.x.chosen_len.iter().sum();
    let mut sum: f64 = b.x.policy_chosen.iter().sum();
    if let Some(p) = b.x.prompt {
        tokens += p.len.iter().sum::<usize>();
        sum += p.logps.iter().sum::<f64>();
    }
    let nt = tokens as f64; // > 0: every chosen length is >= 1 here
    let nll = -sum / nt;
    let mut t = Term {
        per_row: Vec::with_capacity(n),
        d_chosen: Vec::with_capacity(n),
        d_rejected: Vec::with_capacity(n),
        d_prompt: b.x.prompt.map(|_| vec![-1.0 / nt; n]),
    };
    for i in 0..n {
        let lo = (ac[i] - ar[i]) - (log1mexp(ac[i]) - log1mexp(ar[i]));
        t.per_row.push(nll - beta * log_sigmoid(lo));
        let g = -beta * sigmoid(-lo) / n as f64; // d loss / d lo_i
        let dac = -1.0 / ac[i].exp_m1(); // 1 / (1 - exp(a_c))
        let dar = 1.0 / ar[i].exp_m1(); // -1 / (1 - exp(a_r))
        t.d_chosen.push(-1.0 / nt + g * dac / b.x.chosen_len[i] as f64);
        t.d_rejected.push(g * dar / b.x.rejected_len[i] as f64);
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::{pair_loss, LossType, PairLogps, PromptLogps};

    /// gpt2 fixture without prompts, lambda = beta = 0.1: `nll - 0.1 * mean(logsigmoid(log_odds))`.
    #[test]
    fn value_matches_reference() {
        let f = &fixtures()[0];
        let x = PairLogps { ref_chosen: None, ref_rejected: None, ..f.pair() };
        let got = pair_loss(LossType::Orpo, &golden_cfg(), &x).unwrap().loss;
        assert!(rel_err(got, GPT2_ORPO) < 1e-12, "{got} vs {GPT2_ORPO}");
    }

    #[test]
    fn prompt_tokens_join_the_nll() {
        let f = &fixtures()[0];
        let pp = vec![-3.0; f.pc.len()];
        let pl = vec![2usize; f.pc.len()];
        let x = PairLogps { prompt: Some(PromptLogps { logps: &pp, len: &pl }), ..f.pair() };
        let with = pair_loss(LossType::Orpo, &golden_cfg(), &x).unwrap();
        let without = pair_loss(LossType::Orpo, &golden_cfg(), &f.pair()).unwrap();
        let tokens: usize = f.lc.iter().sum();
        let nll_with = -(f.pc.iter().sum::<f64>() - 3.0 * 24.0) / (tokens + 48) as f64;
        let nll_without = -f.pc.iter().sum::<f64>() / tokens as f64;
        assert!(((with.loss - without.loss) - (nll_with - nll_without)).abs() < 1e-12);
        assert_eq!(with.d_prompt.len(), 24);
        // Other losses leave the prompt's gradient at zero.
        assert!(pair_loss(LossType::Sigmoid, &golden_cfg(), &x).unwrap().d_prompt.iter().all(|&d| d == 0.0));
    }

    #[test]
    fn gradient_matches_finite_differences() {
        for f in fixtures() {
            check_grad(&[(LossType::Orpo, 1.0)], &golden_cfg(), &f.pair());
        }
        // Average log-probs near 0, where log(1 - exp(a)) is steep, and prompts in the NLL.
        let s = synthetic(32, 17, 30.0);
        let lc: Vec<usize> = s.lc.iter().map(|l| l * 40).collect();
        let x = PairLogps {
            chosen_len: &lc,
            prompt: Some(PromptLogps { logps: &s.prompt, len: &s.prompt_len }),
            ..s.pair()
        };
        check_grad(&[(LossType::Orpo, 1.0)], &golden_cfg(), &x);
    }
}
