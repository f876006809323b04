//! Unlikelihood training (Welleck et al. 2019, "Neural Text Generation with Unlikelihood Training",
//! Eq. 4), the DPO paper's Unlikelihood baseline (Rafailov et al. 2023, section 6): maximise the
//! likelihood of the chosen completion and minimise that of the rejected one, token by token. Unlike the
//! pairwise losses it reads per-token log-probs, not sequence sums, so it is not in the [`super::LOSSES`]
//! registry.
//!
//! With `l_t` the policy log-prob of target `t`, `p_t = exp(l_t)`, `C` the chosen targets and `R` the
//! rejected targets of a batch (each set at least 1 in the means), per batch:
//!
//! ```text
//! loss = -mean_{t in C} l_t  -  alpha * mean_{t in R} log(max(1 - p_t, MIN_COMPLEMENT))
//! d loss / d l_t = -1 / |C|                               t in C
//! d loss / d l_t = alpha * p_t / (1 - p_t) / |R|          t in R, 1 - p_t > MIN_COMPLEMENT
//! d loss / d l_t = 0                                      otherwise
//! ```
//!
//! Three departures from the bare formula keep it from wrecking the model (measured in `dpo demo`:
//! without them the KL to the reference passes 50 nats and the samples turn into broken words):
//! - the unlikelihood term starts where the rejected completion departs from the chosen one: the tokens
//!   the two share at the start are chosen tokens too ([`rejected_roles`]);
//! - it skips the EOS token, which ends every completion (pushing it down only teaches not to stop);
//! - `1 - p` is floored at [`MIN_COMPLEMENT`] (0.1), with zero gradient below the floor: a token the model
//!   is almost sure of (the rest of a word after its first BPE piece) is not a choice of the review's
//!   sentiment, and `p / (1 - p)` would otherwise let exactly those tokens dominate the step.
//!
//! `crate::train::UnlikelihoodWorkload` trains it in the one training loop (`dpo train --loss
//! unlikelihood`), which brings checkpoints, resume and the non-finite policy.

use serde::{Deserialize, Serialize};

/// The loss's name (`--loss unlikelihood`, alone).
pub const UNLIKELIHOOD: &str = "unlikelihood";

/// The floor of `1 - p` in the unlikelihood term.
pub const MIN_COMPLEMENT: f64 = 0.1;

/// Unlikelihood's setting.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnlikelihoodConfig {
    /// Weight of the unlikelihood term (the likelihood term has weight 1).
    pub alpha: f64,
}

impl Default for UnlikelihoodConfig {
    fn default() -> Self {
        UnlikelihoodConfig { alpha: 1.0 }
    }
}

/// What a target token contributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A chosen token: likelihood.
    Chosen,
    /// A rejected token after the shared start: unlikelihood.
    Rejected,
    /// A rejected token the chosen completion shares at the start, or its EOS: nothing.
    Skip,
}

/// The roles of a rejected completion's scored targets, which are its last `scored` tokens (the first is
/// unscored after an empty prompt): [`Role::Skip`] for the tokens it shares at its start with the chosen
/// completion and for EOS tokens, [`Role::Rejected`] for the rest.
pub fn rejected_roles(chosen: &[u32], rejected: &[u32], scored: usize, eos_ids: &[u32]) -> Vec<Role> {
    let unscored = rejected.len() - scored;
    let shared = common_prefix(chosen, rejected).saturating_sub(unscored);
    (0..scored)
        .map(|j| if j < shared || eos_ids.contains(&rejected[unscored + j]) { Role::Skip } else { Role::Rejected })
        .collect()
}

/// Tokens the two completions share at their start.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Loss and per-target gradient `d loss / d logp` of one batch, each target in the given role.
pub fn unlikelihood_loss(logp: &[f32], roles: &[Role], alpha: f64) -> (f64, Vec<f32>) {
    let n_rej = roles.iter().filter(|&&r| r == Role::Rejected).count().max(1) as f64;
    let n_cho = roles.iter().filter(|&&r| r == Role::Chosen).count().max(1) as f64;
    let mut loss = 0.0;
    let mut grad = vec![0.0f32; logp.len()];
    for (i, (&l, &role)) in logp.iter().zip(roles).enumerate() {
        let l = l as f64;
        match role {
            Role::Rejected => {
                let p = l.exp();
                let q = 1.0 - p;
                if q > MIN_COMPLEMENT {
                    loss -= alpha * q.ln() / n_rej;
                    grad[i] = (alpha * p / q / n_rej) as f32;
                } else {
                    loss -= alpha * MIN_COMPLEMENT.ln() / n_rej;
                }
            }
            Role::Chosen => {
                loss -= l / n_cho;
                grad[i] = (-1.0 / n_cho) as f32;
            }
            Role::Skip => {}
        }
    }
    (loss, grad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_and_gradient_match_finite_differences() {
        let logp = [-0.3f32, -2.0, -0.05, -1.2, -4.0, -0.01];
        let rej = [Role::Chosen, Role::Rejected, Role::Rejected, Role::Chosen, Role::Rejected, Role::Skip];
        let alpha = 0.7;
        let (loss, grad) = unlikelihood_loss(&logp, &rej, alpha);
        let want = -(-0.3f64 + -1.2) / 2.0
            - alpha / 3.0 * ((1.0 - (-2.0f64).exp()).ln() + 0.1f64.ln() + (1.0 - (-4.0f64).exp()).ln());
        assert!((loss - want).abs() < 1e-6, "{loss} vs {want}");
        assert_eq!(grad[5], 0.0);
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4, 5]), 2);
        for i in 0..logp.len() {
            let h = 1e-3f32;
            let mut a = logp;
            a[i] += h;
            let mut b = logp;
            b[i] -= h;
            let fd = (unlikelihood_loss(&a, &rej, alpha).0 - unlikelihood_loss(&b, &rej, alpha).0) / (2.0 * h as f64);
            assert!((fd - grad[i] as f64).abs() < 1e-3 * fd.abs().max(1.0), "{i}: {fd} vs {}", grad[i]);
        }
    }

    /// `loss = "unlikelihood"` is its own method, recorded in config.toml and read back as such (a resumed
    /// run names no loss), trained alone, with a non-negative alpha.
    #[test]
    fn the_loss_is_a_typed_objective_of_the_training_configuration() {
        use crate::train::config::Method;
        use crate::train::{Objective, TrainConfig};
        let parse = |text: &str, method| TrainConfig::from_layers(None, toml::from_str(text).unwrap(), method);
        let c = parse("loss = \"unlikelihood\"\nunlikelihood_alpha = 0.5", Method::Pairs).unwrap();
        assert_eq!(c.objective, Objective::Unlikelihood(UnlikelihoodConfig { alpha: 0.5 }));
        let text = c.to_toml();
        assert!(text.contains("method = \"unlikelihood\"") && text.contains("unlikelihood_alpha = 0.5"), "{text}");
        assert_eq!(parse(&text, Method::Pairs).unwrap(), c);
        let default = parse("method = \"unlikelihood\"", Method::Pairs).unwrap();
        assert_eq!(default.objective, Objective::Unlikelihood(UnlikelihoodConfig::default()));
        let e = parse("loss = \"unlikelihood,sigmoid\"", Method::Pairs).unwrap_err().to_string();
        assert!(e.contains("trained alone"), "{e}");
        let e = parse("loss = \"unlikelihood\"\nunlikelihood_alpha = -1.0", Method::Pairs).unwrap_err().to_string();
        assert!(e.contains("unlikelihood_alpha"), "{e}");
    }

    /// The shared start and EOS are skipped; an unscored first token (empty prompt) shifts the targets.
    #[test]
    fn rejected_roles_skip_the_shared_start_and_eos() {
        use Role::{Rejected as R, Skip as S};
        // chosen 1 2 3, rejected 1 2 4 5 0 (EOS 0), every token scored.
        assert_eq!(rejected_roles(&[1, 2, 3], &[1, 2, 4, 5, 0], 5, &[0]), [S, S, R, R, S]);
        // The first token unscored: the targets are 2 4 5 0, of which 2 is still shared.
        assert_eq!(rejected_roles(&[1, 2, 3], &[1, 2, 4, 5, 0], 4, &[0]), [S, R, R, S]);
        assert_eq!(rejected_roles(&[7], &[1, 2], 2, &[]), [R, R]);
    }
}
