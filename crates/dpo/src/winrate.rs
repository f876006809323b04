//! Win rates: how often a judge prefers policy A's completion of a prompt to B's (another policy's
//! sample, or a dataset's chosen completion), as in the DPO paper's summarization and dialogue
//! experiments (Rafailov et al. 2023, section 6.2: "win rate against reference completions").
//!
//! Each prompt is one comparison: a win, a tie or a loss for A. Ties count half, so the win rate is
//! `(wins + ties / 2) / n`, and a policy against itself is at 0.5 whatever the judge.
//!
//! The interval is the 95% Wilson score interval of that tie-halved rate with `n` trials. Why Wilson:
//! - each comparison's outcome `X` is 0, 1/2 or 1 with mean `p`, and `Var X <= p (1 - p)` (equality only
//!   without ties), so the binomial interval's variance is an upper bound: with ties the interval is
//!   conservative, never too narrow;
//! - unlike the normal (Wald) interval it stays within [0, 1] and does not collapse to a point at a win
//!   rate of 0 or 1 (small `n`, a clearly better policy), and its coverage is close to nominal already
//!   at a few dozen comparisons (Brown, Cai & DasGupta 2001);
//! - unlike a bootstrap it is deterministic and needs no resampling seed, so the same comparisons give
//!   the same interval in every run and test.
//!
//! Across seeds, [`mean_interval`] gives the mean of per-seed rates with a Student-t interval.

use serde::Serialize;

/// The 97.5% quantile of the standard normal distribution: a two-sided 95% interval.
pub const Z95: f64 = 1.959_963_984_540_054;

/// One comparison's result, for A.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Win,
    Tie,
    Loss,
}

/// The judge's verdict on one prompt: A's score against B's. Two identical completions tie whatever
/// their scores (a judge cannot prefer one of two copies of the same text; batched scoring may differ
/// in the last bit), and so do equal scores.
pub fn outcome(a_score: f64, b_score: f64, identical: bool) -> Outcome {
    if identical || a_score == b_score {
        Outcome::Tie
    } else if a_score > b_score {
        Outcome::Win
    } else {
        Outcome::Loss
    }
}

/// Wins, ties and losses of A over a set of comparisons.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub wins: usize,
    pub ties: usize,
    pub losses: usize,
}

impl Tally {
    pub fn add(&mut self, o: Outcome) {
        match o {
            Outcome::Win => self.wins += 1,
            Outcome::Tie => self.ties += 1,
            Outcome::Loss => self.losses += 1,
        }
    }

    /// The tally of A's scores against B's, comparison by comparison; `identical[i]` says whether the
    /// two completions of comparison `i` are the same tokens.
    pub fn from_scores(a: &[f64], b: &[f64], identical: &[bool]) -> Tally {
        let mut t = Tally::default();
        for ((&x, &y), &same) in a.iter().zip(b).zip(identical) {
            t.add(outcome(x, y, same));
        }
        t
    }

    pub fn n(&self) -> usize {
        self.wins + self.ties + self.losses
    }

    /// `(wins + ties / 2) / n`; NaN with no comparison.
    pub fn win_rate(&self) -> f64 {
        if self.n() == 0 {
            return f64::NAN;
        }
        (self.wins as f64 + 0.5 * self.ties as f64) / self.n() as f64
    }

    /// The 95% Wilson score interval of [`Tally::win_rate`] (see the module doc); (0, 1) with no
    /// comparison.
    pub fn interval95(&self) -> (f64, f64) {
        wilson(self.win_rate(), self.n(), Z95)
    }

    /// The win rate, its tally and interval, as reported.
    pub fn summary(&self) -> WinRate {
        let (ci_low, ci_high) = self.interval95();
        WinRate {
            win_rate: self.win_rate(),
            wins: self.wins,
            ties: self.ties,
            losses: self.losses,
            n: self.n(),
            ci_low,
            ci_high,
        }
    }
}

/// A win rate as `dpo win-rate` prints it and the demo's report holds it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct WinRate {
    pub win_rate: f64,
    pub wins: usize,
    pub ties: usize,
    pub losses: usize,
    pub n: usize,
    pub ci_low: f64,
    pub ci_high: f64,
}

/// The Wilson score interval of a proportion `p` from `n` trials at normal quantile `z`:
/// `(p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)`.
pub fn wilson(p: f64, n: usize, z: f64) -> (f64, f64) {
    if n == 0 || !p.is_finite() {
        return (0.0, 1.0);
    }
    let n = n as f64;
    let z2 = z * z;
    let denom = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denom;
    let half = z / denom * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// Mean of per-seed values and its 95% Student-t interval (`t_{0.975, k-1} s / sqrt(k)`); with one
/// value the interval is that value's own (none across seeds): `(mean, mean)`.
pub fn mean_interval(values: &[f64]) -> (f64, f64, f64) {
    let k = values.len();
    if k == 0 {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let m = values.iter().sum::<f64>() / k as f64;
    if k == 1 {
        return (m, m, m);
    }
    let s2 = values.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / (k - 1) as f64;
    let half = t975(k - 1) * (s2 / k as f64).sqrt();
    (m, m - half, m + half)
}

/// The 97.5% quantile of Student's t with `df` degrees of freedom (tabulated to 30, then the normal's).
pub fn t975(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::INFINITY,
        d if d <= 30 => T[d - 1],
        _ => Z95,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) {
        assert!((a - b).abs() < tol, "{a} vs {b}");
    }

    #[test]
    fn ties_count_half() {
        let t = Tally { wins: 3, ties: 2, losses: 5 };
        assert_eq!(t.n(), 10);
        close(t.win_rate(), 0.4, 1e-15);
        let all_ties = Tally { wins: 0, ties: 7, losses: 0 };
        assert_eq!(all_ties.win_rate(), 0.5);
        assert!(Tally::default().win_rate().is_nan());
        assert_eq!(Tally::default().interval95(), (0.0, 1.0));
    }

    #[test]
    fn outcomes_from_scores() {
        // Identical completions tie even when batched scoring gave them different last bits.
        let t = Tally::from_scores(
            &[1.0, 0.5, 0.2, 0.3, 0.3000001],
            &[0.0, 0.5, 0.9, 0.3, 0.3],
            &[false, false, false, false, true],
        );
        assert_eq!(t, Tally { wins: 1, ties: 3, losses: 1 });
        assert_eq!(outcome(2.0, 1.0, true), Outcome::Tie);
        assert_eq!(outcome(f64::NAN, 1.0, false), Outcome::Loss);
    }

    /// Hand-computed with z = 1.959964, z² = 3.841459:
    /// 7 wins, 2 ties, 1 loss: p = 0.8, n = 10; z²/n = 0.3841459, denominator 1.3841459;
    /// centre = (0.8 + 0.1920729) / 1.3841459 = 0.7167402;
    /// half = 1.959964 / 1.3841459 * sqrt(0.016 + 0.0096036) = 1.4160015 * 0.1600113 = 0.2265777;
    /// interval (0.4901625, 0.9433178).
    #[test]
    fn wilson_against_hand_computed_numbers() {
        let t = Tally { wins: 7, ties: 2, losses: 1 };
        let (lo, hi) = t.interval95();
        close(lo, 0.490_162_5, 1e-6);
        close(hi, 0.943_317_8, 1e-6);
        // p = 0 with n = 20: (0, (z²/n) / (1 + z²/n)) = (0, 0.1920729 / 1.1920729) = (0, 0.1611252).
        let (lo, hi) = wilson(0.0, 20, Z95);
        assert_eq!(lo, 0.0);
        close(hi, 0.161_125_2, 1e-6);
        // The interval narrows like 1/sqrt(n) for large n (ratio 1.9973 from n = 1000 to 4000) and holds p.
        let w = |n| {
            let (a, b) = wilson(0.6, n, Z95);
            assert!(a < 0.6 && 0.6 < b);
            b - a
        };
        close(w(1000) / w(4000), 1.997_247, 1e-5);
    }

    /// A policy against itself at temperature 0: the same greedy completion on both sides of every
    /// prompt, so every comparison ties and the rate is exactly 0.5.
    #[test]
    fn self_match_is_one_half() {
        let scores = [0.3, -1.2, 0.7, 0.0];
        let t = Tally::from_scores(&scores, &scores, &[true; 4]);
        assert_eq!(t, Tally { wins: 0, ties: 4, losses: 0 });
        let s = t.summary();
        assert_eq!(s.win_rate, 0.5);
        assert!(s.ci_low < 0.5 && s.ci_high > 0.5);
    }

    #[test]
    fn mean_interval_across_seeds() {
        // Mean 0.6, s = 0.1, k = 3: half = 4.303 * 0.1 / sqrt(3) = 0.248434.
        let (m, lo, hi) = mean_interval(&[0.5, 0.6, 0.7]);
        close(m, 0.6, 1e-12);
        close(hi - m, 0.248_434, 1e-5);
        close(m - lo, 0.248_434, 1e-5);
        assert_eq!(mean_interval(&[0.4]), (0.4, 0.4, 0.4));
        assert_eq!(t975(100), Z95);
    }
}
