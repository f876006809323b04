//! `dpo demo --seeds N`: the whole experiment repeated with seeds `seed, seed + 1, ...` (each seed its
//! own corpus, SFT model, pairs, runs and evaluation samples), and what holds across them.
//!
//! Every seed's report is summarised into a few numbers per method ([`SeedResult`]); across seeds each
//! number gets its mean, the standard error of that mean (`s / sqrt(k)`, `s` the standard deviation
//! across the `k` seeds) and the 95% Student-t interval `mean ± t_{0.975, k-1} s / sqrt(k)`
//! ([`dpo::winrate::mean_interval`]). An ordering (A ahead of B) is judged on the per-seed differences
//! A - B, so that what every seed shares (its SFT model, its prompts) cancels: it holds beyond the
//! interval when the difference's t interval excludes 0. The criterion for online against
//! offline DPO, "more than two standard errors across seeds", is reported beside it; with 3 seeds the
//! t interval (4.30 standard errors) is the stricter one.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::evaluate::std_err;
use super::online_methods::{online_method_names, EqualKl};
use super::report::Report;
use dpo::winrate::mean_interval;

/// `{method: {metric: value}}`.
pub type Metrics = BTreeMap<String, BTreeMap<String, f64>>;

/// One seed's experiment, summarised.
#[derive(Clone, Debug, Serialize)]
pub struct SeedResult {
    pub seed: u64,
    /// Its output directory, relative to the top one ("." for the first seed).
    pub dir: String,
    pub total_s: f64,
    /// Per method: `best_reward` (ground truth, the highest over the method's points) and `kl_at_best`,
    /// `win_rate_vs_chosen` (temperature 1), `best_win_rate_vs_temperature`; the online methods'
    /// `final_minus_offline_at_equal_kl` and `final_minus_offline_envelope` under each judge, and the KL of
    /// the offline point the first was compared with (`offline_kl_compared`: 0 when only the SFT model had
    /// no more KL).
    pub metrics: Metrics,
}

/// A number across seeds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Across {
    pub mean: f64,
    /// Standard error of the mean across seeds (0 with one seed).
    pub se: f64,
    /// 95% Student-t interval (the mean itself with one seed).
    pub ci_low: f64,
    pub ci_high: f64,
    /// The per-seed values, in seed order.
    pub values: Vec<f64>,
}

impl Across {
    pub fn of(values: &[f64]) -> Across {
        let (mean, ci_low, ci_high) = mean_interval(values);
        Across { mean, se: std_err(values), ci_low, ci_high, values: values.to_vec() }
    }
}

/// An ordering tested across seeds: `a`'s `metric` against `b`'s, by the per-seed differences.
#[derive(Clone, Debug, Serialize)]
pub struct Ordering {
    pub a: String,
    pub b: String,
    pub metric: String,
    /// `a - b` per seed where both were measured.
    pub difference: Across,
    /// "A ahead", "B ahead" (the t interval of the difference excludes 0) or "no ordering".
    pub beyond_interval: String,
    /// Whether |mean difference| > 2 standard errors across seeds (the criterion), and which way.
    pub beyond_two_se: String,
    pub sentence: String,
}

/// The across-seed aggregates: `{method: {metric: Across}}` and the orderings.
#[derive(Clone, Debug, Serialize)]
pub struct AcrossSeeds {
    pub seeds: Vec<u64>,
    pub interval: String,
    pub metrics: BTreeMap<String, BTreeMap<String, Across>>,
    pub orderings: Vec<Ordering>,
}

/// The orderings the report tests: (A, B, metric). Best-of-N's name is the seeds' largest N.
fn orderings_tested(bon: &str) -> Vec<(String, String, &'static str)> {
    let mut v = vec![
        ("DPO".to_string(), "PPO".to_string(), "best_win_rate_vs_temperature"),
        ("DPO".into(), bon.to_string(), "win_rate_vs_chosen"),
        ("DPO".into(), "PPO".into(), "best_reward"),
        ("DPO".into(), "PPO-GT".into(), "best_reward"),
    ];
    for m in online_method_names() {
        for judge in ["ground truth", "learned reward model"] {
            v.push((m.into(), "offline DPO".into(), equal_kl_metric(judge)));
            v.push((m.into(), "offline DPO".into(), envelope_metric(judge)));
        }
    }
    // The ablations against each other (ground truth): each contrast changes one thing, the labels or the
    // budget, so its difference is that cause's share of online DPO's gap to offline DPO at equal KL.
    let gt = equal_kl_metric("ground truth");
    for (a, b) in ABLATION_CONTRASTS {
        v.push((a.to_string(), b.to_string(), gt));
    }
    v
}

/// (A, B): A is B with one cause of the online-offline difference removed.
pub const ABLATION_CONTRASTS: [(&str, &str); 4] = [
    ("Online DPO (GT labels)", "Online DPO"),
    ("Online DPO (offline budget)", "Online DPO"),
    ("Online DPO (GT labels, offline budget)", "Online DPO (offline budget)"),
    ("Online DPO (GT labels, offline budget)", "Online DPO (GT labels)"),
];

/// The final point against offline DPO's concave envelope at its KL ([`EqualKl::envelope_difference`]).
fn envelope_metric(judge: &str) -> &'static str {
    if judge == "ground truth" {
        "final_minus_offline_envelope (ground truth)"
    } else {
        "final_minus_offline_envelope (learned reward model)"
    }
}

fn equal_kl_metric(judge: &str) -> &'static str {
    if judge == "ground truth" {
        "final_minus_offline_at_equal_kl (ground truth)"
    } else {
        "final_minus_offline_at_equal_kl (learned reward model)"
    }
}

/// The numbers of one seed's report that the aggregate compares.
pub fn summarize(report: &Report, dir: String) -> SeedResult {
    let mut metrics = Metrics::new();
    // Best-of-N's points are its Ns; the others' their checkpoints. A method's best over all its runs.
    for r in &report.runs {
        if let Some(best) = r.points.iter().max_by(|a, b| a.reward.total_cmp(&b.reward)) {
            let m = metrics.entry(r.method.clone()).or_default();
            if m.get("best_reward").is_none_or(|&p| best.reward > p) {
                m.insert("best_reward".into(), best.reward);
                m.insert("kl_at_best".into(), best.kl);
            }
        }
    }
    let mut put = |m: &str, k: &str, v: f64| {
        if v.is_finite() {
            metrics.entry(m.to_string()).or_default().insert(k.to_string(), v);
        }
    };
    put("SFT", "best_reward", report.sft.reward);
    for (m, w) in &report.win_rate_vs_chosen {
        put(m, "win_rate_vs_chosen", w.rate.win_rate);
    }
    for (m, curve) in &report.win_rate_vs_temperature {
        let best = curve.iter().map(|p| p.rate.win_rate).fold(f64::NEG_INFINITY, f64::max);
        put(m, "best_win_rate_vs_temperature", best);
    }
    // Each online method's final point against offline DPO's best with no more KL.
    for m in online_method_names() {
        for judge in ["ground truth", "learned reward model"] {
            let last = report.equal_kl.iter().rfind(|r| r.method == m && r.judge == judge);
            if let Some(EqualKl { difference: Some(d), offline_kl: Some(kl), .. }) = last {
                put(m, equal_kl_metric(judge), *d);
                // KL 0 is the SFT model: offline DPO had no point with that little KL.
                put(m, &format!("offline_kl_compared ({judge})"), *kl);
            }
            if let Some(EqualKl { envelope_difference: Some(d), .. }) = last {
                put(m, envelope_metric(judge), *d);
            }
        }
    }
    SeedResult { seed: report.plan.seed, dir, total_s: report.total_s, metrics }
}

/// Means and intervals of every (method, metric) measured in at least one seed, and the orderings.
pub fn aggregate(results: &[SeedResult]) -> AcrossSeeds {
    let mut metrics: BTreeMap<String, BTreeMap<String, Across>> = BTreeMap::new();
    let mut keys: Vec<(&String, &String)> =
        results.iter().flat_map(|r| r.metrics.iter().flat_map(|(m, v)| v.keys().map(move |k| (m, k)))).collect();
    keys.sort();
    keys.dedup();
    let value = |r: &SeedResult, m: &str, k: &str| r.metrics.get(m).and_then(|v| v.get(k)).copied();
    for (m, k) in keys {
        let values: Vec<f64> = results.iter().filter_map(|r| value(r, m, k)).collect();
        metrics.entry(m.clone()).or_default().insert(k.clone(), Across::of(&values));
    }
    // Best-of-N at its largest N ("Best-of-128"): the name every seed shares.
    let bon = results
        .iter()
        .flat_map(|r| r.metrics.keys())
        .filter_map(|m| m.strip_prefix("Best-of-").and_then(|n| n.parse::<usize>().ok()))
        .max()
        .map(|n| format!("Best-of-{n}"))
        .unwrap_or_else(|| "Best-of-N".into());
    let mut orderings = Vec::new();
    for (a, b, metric) in orderings_tested(&bon) {
        let diffs: Vec<f64> = results
            .iter()
            .filter_map(|r| {
                if b == "offline DPO" {
                    // The metric is already the difference to offline DPO.
                    value(r, &a, metric)
                } else {
                    Some(value(r, &a, metric)? - value(r, &b, metric)?)
                }
            })
            .collect();
        if !diffs.is_empty() {
            orderings.push(ordering(&a, &b, metric, &diffs));
        }
    }
    AcrossSeeds {
        seeds: results.iter().map(|r| r.seed).collect(),
        interval: "mean across seeds, standard error s/sqrt(k), 95% Student-t interval mean ± t(0.975, k-1) s/sqrt(k)"
            .into(),
        metrics,
        orderings,
    }
}

/// Judges one ordering from its per-seed differences `a - b`.
pub fn ordering(a: &str, b: &str, metric: &str, diffs: &[f64]) -> Ordering {
    let d = Across::of(diffs);
    let k = diffs.len();
    let beyond_interval = if k < 2 {
        "no ordering (one seed: no interval across seeds)".to_string()
    } else if d.ci_low > 0.0 {
        format!("{a} ahead")
    } else if d.ci_high < 0.0 {
        format!("{b} ahead")
    } else {
        "no ordering".to_string()
    };
    let beyond_two_se = if k < 2 {
        "no ordering (one seed)".to_string()
    } else if d.mean > 2.0 * d.se {
        format!("{a} ahead")
    } else if d.mean < -2.0 * d.se {
        format!("{b} ahead")
    } else {
        "no ordering".to_string()
    };
    let per_seed: Vec<String> = diffs.iter().map(|x| format!("{x:+.3}")).collect();
    let sentence = format!(
        "{a} − {b}, {metric}: {:+.3} ± {:.3} (s.e.) over {k} seed(s) [{}], 95% t interval [{:+.3}, {:+.3}]: {beyond_interval} beyond the interval{}.",
        d.mean,
        d.se,
        per_seed.join(", "),
        d.ci_low,
        d.ci_high,
        if beyond_two_se != beyond_interval && k >= 2 {
            format!(" ({} by two standard errors)", beyond_two_se)
        } else {
            String::new()
        }
    );
    Ordering {
        a: a.into(),
        b: b.into(),
        metric: metric.into(),
        difference: d,
        beyond_interval,
        beyond_two_se,
        sentence,
    }
}

/// The report's "Across seeds" section.
pub fn markdown(results: &[SeedResult], across: &AcrossSeeds) -> String {
    let mut s = String::from("\n## Across seeds\n\n");
    let dirs: Vec<String> =
        results.iter().map(|r| format!("seed {} in `{}` ({:.0} s)", r.seed, r.dir, r.total_s)).collect();
    let _ = writeln!(
        s,
        "The whole experiment (corpus, SFT model, pairs, every run, evaluation and win-rate samples) repeated over \
         {} seeds: {}. The sections above are the first seed's. Each figure below: the mean across seeds, its \
         standard error and its 95% Student-t interval (t(0.975, k-1) s/sqrt(k); with few seeds the t quantile \
         is large: 12.71 for 2 seeds, 4.30 for 3). An ordering is judged on the per-seed differences. \
         Online and iterative DPO are compared by their final point against offline DPO's best point with no \
         more KL (`offline_kl_compared`: where that is 0, offline DPO had no point with so little KL and the \
         comparison is with the SFT model, not with offline DPO at equal KL).\n",
        results.len(),
        dirs.join(", ")
    );
    s += "### Orderings\n\n";
    let (held, not_held): (Vec<&Ordering>, Vec<&Ordering>) =
        across.orderings.iter().partition(|o| o.beyond_interval.ends_with("ahead"));
    s += "Hold beyond the 95% interval across seeds:\n\n";
    if held.is_empty() {
        s += "- none\n";
    }
    for o in held {
        let _ = writeln!(s, "- {}", o.sentence);
    }
    s += "\nDo not hold beyond the interval:\n\n";
    if not_held.is_empty() {
        s += "- none\n";
    }
    for o in not_held {
        let _ = writeln!(s, "- {}", o.sentence);
    }
    s += "\n### Per method\n\n| method | metric | mean ± s.e. | 95% t interval | per seed |\n| --- | --- | ---: | --- | --- |\n";
    for (m, ks) in &across.metrics {
        for (k, a) in ks {
            let per: Vec<String> = a.values.iter().map(|v| format!("{v:.3}")).collect();
            let _ = writeln!(
                s,
                "| {m} | {k} | {:.3} ± {:.3} | [{:.3}, {:.3}] | {} |",
                a.mean,
                a.se,
                a.ci_low,
                a.ci_high,
                per.join(", ")
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(seed: u64, pairs: &[(&str, &str, f64)]) -> SeedResult {
        let mut metrics = Metrics::new();
        for &(m, k, v) in pairs {
            metrics.entry(m.into()).or_default().insert(k.into(), v);
        }
        SeedResult { seed, dir: ".".into(), total_s: 1.0, metrics }
    }

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-9, "{a} vs {b}");
    }

    /// Hand-computed: values 0.5, 0.6, 0.7: mean 0.6, s = 0.1, s.e. = 0.1 / sqrt(3) = 0.0577350,
    /// half-width 4.303 * 0.0577350 = 0.2484338.
    #[test]
    fn across_seeds_arithmetic() {
        let a = Across::of(&[0.5, 0.6, 0.7]);
        close(a.mean, 0.6);
        close(a.se, 0.057_735_026_918_962_58);
        close(a.ci_high - a.mean, 4.303 * 0.057_735_026_918_962_58);
        close(a.mean - a.ci_low, 4.303 * 0.057_735_026_918_962_58);
        let one = Across::of(&[0.4]);
        assert_eq!((one.mean, one.se, one.ci_low, one.ci_high), (0.4, 0.0, 0.4, 0.4));
    }

    /// Differences 0.10, 0.12, 0.14: mean 0.12, s = 0.02, s.e. 0.011547, t half-width 0.049688: A ahead
    /// both ways. Differences 0.02, 0.10, 0.06: mean 0.06, s = 0.04, s.e. 0.023094, half-width 0.099374:
    /// beyond two standard errors (0.046188) but not beyond the t interval.
    #[test]
    fn orderings_follow_the_differences() {
        let o = ordering("DPO", "PPO", "best_reward", &[0.10, 0.12, 0.14]);
        assert_eq!((o.beyond_interval.as_str(), o.beyond_two_se.as_str()), ("DPO ahead", "DPO ahead"));
        close(o.difference.ci_low, 0.12 - 4.303 * 0.02 / 3f64.sqrt());
        let o = ordering("DPO", "PPO", "best_reward", &[0.02, 0.10, 0.06]);
        assert_eq!((o.beyond_interval.as_str(), o.beyond_two_se.as_str()), ("no ordering", "DPO ahead"));
        assert!(o.sentence.contains("(DPO ahead by two standard errors)"), "{}", o.sentence);
        let o = ordering("Online DPO", "offline DPO", "m", &[-0.3, -0.2, -0.25]);
        assert_eq!(o.beyond_interval, "offline DPO ahead");
        assert!(ordering("a", "b", "m", &[0.5]).beyond_interval.starts_with("no ordering (one seed"));
    }

    /// The aggregate pairs each seed's A with the same seed's B, skips seeds where one is missing, and
    /// finds Best-of-N under its largest N.
    #[test]
    fn aggregate_pairs_seeds() {
        let gt = "final_minus_offline_at_equal_kl (ground truth)";
        let r = aggregate(&[
            seed(
                1,
                &[
                    ("DPO", "win_rate_vs_chosen", 0.6),
                    ("Best-of-16", "win_rate_vs_chosen", 0.8),
                    ("Online DPO", gt, 0.01),
                ],
            ),
            seed(
                2,
                &[
                    ("DPO", "win_rate_vs_chosen", 0.7),
                    ("Best-of-16", "win_rate_vs_chosen", 0.8),
                    ("Online DPO", gt, -0.03),
                ],
            ),
            seed(3, &[("DPO", "win_rate_vs_chosen", 0.5)]),
        ]);
        assert_eq!(r.seeds, vec![1, 2, 3]);
        assert_eq!(r.metrics["DPO"]["win_rate_vs_chosen"].values, vec![0.6, 0.7, 0.5]);
        let bon = r.orderings.iter().find(|o| o.b == "Best-of-16").unwrap();
        assert_eq!(bon.difference.values.len(), 2);
        close(bon.difference.mean, -0.15);
        let online = r.orderings.iter().find(|o| o.a == "Online DPO" && o.metric == gt).unwrap();
        assert_eq!(online.difference.values, vec![0.01, -0.03]);
        assert_eq!(online.beyond_interval, "no ordering");
        // Orderings whose methods no seed measured are left out.
        assert!(!r.orderings.iter().any(|o| o.b == "PPO-GT"));
    }

    /// The ablations: each variant against offline DPO is its own equal-KL difference; a contrast between
    /// two variants is the per-seed difference of those differences. By hand: GT labels - learned labels
    /// at the online budget, per seed 0.05 - (-0.02) = 0.07, 0.04 - (-0.04) = 0.08, 0.07 - 0.01 = 0.06:
    /// mean 0.07, s = 0.01, s.e. 0.005774, beyond two s.e. and beyond the t interval (half-width 0.024841).
    #[test]
    fn ablation_contrasts_are_differences_of_equal_kl_differences() {
        let gt = "final_minus_offline_at_equal_kl (ground truth)";
        let seeds: Vec<SeedResult> = [(-0.02, 0.05, 0.00), (-0.04, 0.04, 0.01), (0.01, 0.07, -0.01)]
            .iter()
            .zip(1..)
            .map(|(&(online, gt_labels, budget), k)| {
                seed(
                    k,
                    &[
                        ("Online DPO", gt, online),
                        ("Online DPO (GT labels)", gt, gt_labels),
                        ("Online DPO (offline budget)", gt, budget),
                    ],
                )
            })
            .collect();
        let r = aggregate(&seeds);
        let find = |a: &str, b: &str| r.orderings.iter().find(|o| o.a == a && o.b == b && o.metric == gt).unwrap();
        let labels = find("Online DPO (GT labels)", "Online DPO");
        for (v, want) in labels.difference.values.iter().zip([0.07, 0.08, 0.06]) {
            close(*v, want);
        }
        close(labels.difference.mean, 0.07);
        close(labels.difference.se, 0.01 / 3f64.sqrt());
        assert_eq!(labels.beyond_interval, "Online DPO (GT labels) ahead");
        assert_eq!(labels.beyond_two_se, "Online DPO (GT labels) ahead");
        // The variant against offline DPO: its own values, 0.05, 0.04, 0.07, ahead beyond the interval.
        let vs_offline = find("Online DPO (GT labels)", "offline DPO");
        assert_eq!(vs_offline.difference.values, vec![0.05, 0.04, 0.07]);
        assert_eq!(vs_offline.beyond_interval, "Online DPO (GT labels) ahead");
        let budget = find("Online DPO (offline budget)", "Online DPO");
        close(budget.difference.mean, (0.02 + 0.05 - 0.02) / 3.0);
        // The variant not run (GT labels at the offline budget) has no ordering.
        assert!(!r.orderings.iter().any(|o| o.a == "Online DPO (GT labels, offline budget)"));
    }
}
