//! Best-of-N sampling (rejection sampling against a reward): draw `n` completions of each prompt from
//! the policy and keep the one the reward scores highest. The DPO paper's strongest baseline on
//! summarization and dialogue (Rafailov et al. 2023, section 6.1, "Best of N"), with no training at all;
//! its cost is `n` samples and `n` reward evaluations per prompt.

use engine::generate::{generate, Generation, SamplingConfig};
use engine::model::Model;
use engine::rng::Rng;
use engine::{Decoder, EngineError};

/// Why a Best-of-N run failed: sampling, the scorer, or what the scorer returned.
#[derive(Debug, thiserror::Error)]
pub enum BestOfNError<E> {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("scoring completions: {0}")]
    Scorer(E),
    #[error("the scorer returned {got} scores for {want} completions")]
    ScoreCount { got: usize, want: usize },
    #[error("the scorer returned NaN for sample {sample} of prompt {prompt}")]
    NotANumber { prompt: usize, sample: usize },
}

/// Scores `(prompt, completion)` token sequences, one score each (a reward model's
/// [`crate::rlhf::reward::RewardModel::score`], or any other reward).
pub type Scorer<'a, E> = dyn FnMut(&[(&[u32], &[u32])]) -> Result<Vec<f64>, E> + 'a;

/// The kept completion of one prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct BestOfN {
    /// The highest-scoring sample (its tokens, EOS included when produced, its log-probs under the policy).
    pub best: Generation,
    /// Which of the `n` samples it is.
    pub index: usize,
    /// Its score.
    pub score: f64,
    /// `[n]` the scores of all samples, in sampling order.
    pub scores: Vec<f64>,
}

/// Samples `n` completions of every prompt with [`generate`] (same seed, same samples as `dpo generate`)
/// and keeps, per prompt, the first one with the highest score. `score` receives all
/// `(prompt, completion)` pairs at once, prompt by prompt, completions with their EOS token when they
/// produced one (as a reward model trained on TRL-tokenized pairs saw them), and returns one score each.
/// `model` is the policy's weights as its prefill reads them (its precision).
pub fn best_of_n<E>(
    policy: &Decoder,
    model: Model<'_>,
    prompts: &[Vec<u32>],
    n: usize,
    sampling: &SamplingConfig,
    score: &mut Scorer<'_, E>,
    rng: &mut Rng,
) -> Result<Vec<BestOfN>, BestOfNError<E>> {
    if n == 0 || prompts.is_empty() {
        return Ok(Vec::new());
    }
    let gens = generate(policy, model, prompts, n, sampling, rng)?;
    let pairs: Vec<(&[u32], &[u32])> = gens.iter().map(|g| (&prompts[g.prompt_index][..], &g.tokens[..])).collect();
    let scores = score(&pairs).map_err(BestOfNError::Scorer)?;
    if scores.len() != gens.len() {
        return Err(BestOfNError::ScoreCount { got: scores.len(), want: gens.len() });
    }
    let mut out = Vec::with_capacity(prompts.len());
    for (prompt, (samples, scores)) in gens.chunks_exact(n).zip(scores.chunks_exact(n)).enumerate() {
        if let Some(sample) = scores.iter().position(|s| s.is_nan()) {
            return Err(BestOfNError::NotANumber { prompt, sample });
        }
        let index = first_best(scores).unwrap_or(0);
        out.push(BestOfN { best: samples[index].clone(), index, score: scores[index], scores: scores.to_vec() });
    }
    Ok(out)
}

/// The index of the first highest score (ties go to the earlier sample; `None` for none): Best-of-N's
/// pick, online DPO's chosen completion, the demo's preferred one.
pub fn first_best(scores: &[f64]) -> Option<usize> {
    (0..scores.len()).reduce(|best, i| if scores[i] > scores[best] { i } else { best })
}

/// The index of the last lowest score (ties go to the later sample): online DPO's rejected completion.
pub fn last_worst(scores: &[f64]) -> Option<usize> {
    (0..scores.len()).rev().reduce(|worst, i| if scores[i] < scores[worst] { i } else { worst })
}

/// The KL divergence of the Best-of-N policy from the policy it samples, `log n - (n - 1) / n` nats
/// (Stiennon et al. 2020, appendix G.3; Hilton & Gao 2022). Exact when the reward has no ties (a
/// continuous score), an upper bound otherwise (Beirami et al. 2024); it is what DPO-versus-Best-of-N
/// comparisons put on their KL axis. 0 for `n <= 1`; it grows like `log n` (1.84 nats at n = 16).
pub fn best_of_n_kl(n: usize) -> f64 {
    if n <= 1 {
        return 0.0;
    }
    let n = n as f64;
    n.ln() - (n - 1.0) / n
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;
    use engine::presets::init_random;
    use engine::{DecoderConfig, Params};

    fn setup() -> (Decoder, Params, Vec<Vec<u32>>) {
        let cfg = DecoderConfig::gpt2(engine::Dims {
            vocab_size: 32,
            hidden: 16,
            n_layers: 2,
            n_heads: 2,
            n_kv_heads: 2,
            head_dim: 8,
            ffn_hidden: 32,
            max_positions: 64,
        });
        let params = init_random(&cfg, 0.5, 11);
        let prompts = vec![vec![1, 2, 3], vec![4], vec![5, 6, 7, 8, 9]];
        (Decoder::new(cfg), params, prompts)
    }

    fn sampling() -> SamplingConfig {
        SamplingConfig { temperature: 1.0, max_new_tokens: 6, eos_ids: vec![0], ..Default::default() }
    }

    /// A reward that likes token 7 in the completion and dislikes length.
    fn reward(pairs: &[(&[u32], &[u32])]) -> Result<Vec<f64>, Infallible> {
        Ok(pairs.iter().map(|(_, c)| c.iter().filter(|&&t| t == 7).count() as f64 - 0.01 * c.len() as f64).collect())
    }

    #[test]
    fn picks_the_highest_scoring_sample() {
        let (m, p, prompts) = setup();
        let n = 8;
        let all = generate(&m, &p, &prompts, n, &sampling(), &mut Rng::new(3)).unwrap();
        let mut calls = 0;
        let mut scorer = |pairs: &[(&[u32], &[u32])]| {
            calls += 1;
            reward(pairs)
        };
        let got = best_of_n(&m, (&p).into(), &prompts, n, &sampling(), &mut scorer, &mut Rng::new(3)).unwrap();
        assert_eq!(calls, 1);
        assert_eq!(got.len(), prompts.len());
        for (i, b) in got.iter().enumerate() {
            let samples = &all[i * n..(i + 1) * n];
            let pairs: Vec<(&[u32], &[u32])> = samples.iter().map(|g| (&prompts[i][..], &g.tokens[..])).collect();
            let want = reward(&pairs).unwrap();
            assert_eq!(b.scores, want);
            let max = want.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            assert_eq!(b.score, max);
            assert_eq!(b.index, want.iter().position(|&s| s == max).unwrap(), "the first of equal maxima");
            assert_eq!(b.best, samples[b.index]);
            assert_eq!(b.best.prompt_index, i);
        }
        // The samples differ, so the choice is not trivial.
        assert!(got.iter().any(|b| b.scores.iter().any(|&s| s != b.score)));
    }

    #[test]
    fn one_sample_is_plain_sampling() {
        let (m, p, prompts) = setup();
        let plain = generate(&m, &p, &prompts, 1, &sampling(), &mut Rng::new(21)).unwrap();
        let mut rng = Rng::new(21);
        let got = best_of_n(&m, (&p).into(), &prompts, 1, &sampling(), &mut reward, &mut rng).unwrap();
        assert_eq!(got.iter().map(|b| b.best.clone()).collect::<Vec<_>>(), plain);
        assert!(got.iter().all(|b| b.index == 0 && b.scores.len() == 1));
        let mut after = Rng::new(21);
        (0..prompts.len()).for_each(|_| {
            after.next_u64();
        });
        assert_eq!(rng, after, "the caller's generator advances as generate's does");
    }

    #[test]
    fn scorer_failures_are_reported() {
        let (m, p, prompts) = setup();
        let s = sampling();
        let mut short = |_: &[(&[u32], &[u32])]| Ok::<_, Infallible>(vec![1.0]);
        let err = best_of_n(&m, (&p).into(), &prompts, 2, &s, &mut short, &mut Rng::new(0)).unwrap_err();
        assert!(matches!(err, BestOfNError::ScoreCount { got: 1, want: 6 }), "{err}");
        let mut nan = |x: &[(&[u32], &[u32])]| {
            Ok::<_, Infallible>((0..x.len()).map(|i| if i == 3 { f64::NAN } else { 0.0 }).collect())
        };
        let err = best_of_n(&m, (&p).into(), &prompts, 2, &s, &mut nan, &mut Rng::new(0)).unwrap_err();
        assert!(matches!(err, BestOfNError::NotANumber { prompt: 1, sample: 1 }), "{err}");
        let mut failing = |_: &[(&[u32], &[u32])]| Err::<Vec<f64>, _>("no reward model");
        let err = best_of_n(&m, (&p).into(), &prompts, 2, &s, &mut failing, &mut Rng::new(0)).unwrap_err();
        assert_eq!(err.to_string(), "scoring completions: no reward model");
        assert!(best_of_n(&m, (&p).into(), &[vec![]], 2, &s, &mut reward, &mut Rng::new(0)).is_err(), "empty prompt");
    }

    /// Ties: the first highest, the last lowest; nothing for no scores.
    #[test]
    fn first_best_and_last_worst_break_ties_by_position() {
        assert_eq!(first_best(&[0.1, 0.7, 0.7, 0.1]), Some(1));
        assert_eq!(last_worst(&[0.1, 0.7, 0.7, 0.1]), Some(3));
        assert_eq!((first_best(&[0.5, 0.5]), last_worst(&[0.5, 0.5])), (Some(0), Some(1)));
        assert_eq!((first_best(&[]), last_worst(&[])), (None, None));
    }

    #[test]
    fn kl_of_best_of_n() {
        assert_eq!(best_of_n_kl(0), 0.0);
        assert_eq!(best_of_n_kl(1), 0.0);
        assert!((best_of_n_kl(2) - (2f64.ln() - 0.5)).abs() < 1e-15);
        assert!((best_of_n_kl(4) - 0.636_294_361_119_890_6).abs() < 1e-12);
        assert!((best_of_n_kl(16) - 1.835_088_722_239_781).abs() < 1e-12);
        assert!((best_of_n_kl(128) - (128f64.ln() - 127.0 / 128.0)).abs() < 1e-12);
        assert!((1..64).all(|n| best_of_n_kl(n + 1) > best_of_n_kl(n)), "increasing in n");

        // Against the definition: for a continuous reward the best-of-n rank u = F(r) has density
        // n u^(n-1) on [0, 1], so KL = integral of n u^(n-1) log(n u^(n-1)) du.
        for n in [2usize, 5, 16] {
            let steps = 200_000;
            let kl: f64 = (0..steps)
                .map(|i| {
                    let u = (i as f64 + 0.5) / steps as f64;
                    let q = n as f64 * u.powi(n as i32 - 1);
                    q * q.ln() / steps as f64
                })
                .sum();
            assert!((kl - best_of_n_kl(n)).abs() < 1e-6, "n = {n}: {kl} vs {}", best_of_n_kl(n));
        }
    }
}
