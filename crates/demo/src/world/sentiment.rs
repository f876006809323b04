//! The ground-truth reward of the sentiment experiment: VADER's compound score (Hutto & Gilbert
//! 2014), a lexicon-and-rules sentiment model, in place of the paper's learned IMDb classifier. It
//! needs no weights or download (the `vader_sentiment` crate embeds its lexicon), is deterministic,
//! and is cheap enough to score every sample of every method.

use vader_sentiment::SentimentIntensityAnalyzer;

/// Scores text in [-1, 1]: below -0.05 reads as negative, above 0.05 as positive (VADER's own cut-offs).
pub struct Sentiment {
    // Holds only references to the crate's lexicon, which is parsed once per process on first use.
    analyzer: SentimentIntensityAnalyzer<'static>,
}

impl Default for Sentiment {
    fn default() -> Self {
        Self::new()
    }
}

impl Sentiment {
    pub fn new() -> Self {
        Sentiment { analyzer: SentimentIntensityAnalyzer::new() }
    }

    /// VADER's compound score of `text`; 0 for text without sentiment words (or empty text).
    pub fn score(&self, text: &str) -> f64 {
        self.analyzer.polarity_scores(text).get("compound").copied().unwrap_or(0.0)
    }

    /// Scores many texts on all cores, in order.
    pub fn score_all(&self, texts: &[String]) -> Vec<f64> {
        use rayon::prelude::*;
        texts.par_iter().map(|t| self.score(t)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::corpus::{labelled_reviews, prompts, Tone};
    use super::*;

    #[test]
    fn clear_cases() {
        let s = Sentiment::new();
        assert!(s.score("This movie was absolutely wonderful, I loved it!") > 0.5);
        assert!(s.score("The film was terrible and boring, a complete waste of time.") < -0.5);
        assert!(s.score("The film runs two hours and was shot in Lisbon.").abs() < 0.05);
        assert_eq!(s.score(""), 0.0);
        // Negation flips: "not good" is negative.
        assert!(s.score("The acting was not good.") < 0.0);
    }

    #[test]
    fn odd_input_does_not_panic() {
        // Model samples can be any text; VADER must take all of it.
        let s = Sentiment::new();
        for t in [
            " ",
            "!!!",
            "?",
            "but",
            "but but",
            "a",
            "not",
            "never so this",
            "at least",
            "kind of",
            "😀 great",
            "\u{0}x",
        ] {
            let v = s.score(t);
            assert!((-1.0..=1.0).contains(&v), "{t:?}: {v}");
        }
        let mut rng = engine::rng::Rng::new(3);
        let words =
            ["never", "so", "this", "without", "doubt", "at", "least", "but", "good", "bad", "!", "kind", "of", "very"];
        for _ in 0..2000 {
            let n = rng.below(8);
            let t: Vec<&str> = (0..n).map(|_| words[rng.below(words.len())]).collect();
            let v = s.score(&t.join(" "));
            assert!((-1.0..=1.0).contains(&v));
        }
    }

    #[test]
    fn corpus_tones_score_in_order() {
        let s = Sentiment::new();
        let rs = labelled_reviews(21, 5000);
        let mean = |tone: Tone| {
            let v: Vec<f64> = rs.iter().filter(|r| r.tone == tone).map(|r| s.score(&r.text)).collect();
            v.iter().sum::<f64>() / v.len() as f64
        };
        let means: Vec<f64> = Tone::ALL.iter().map(|&t| mean(t)).collect();
        eprintln!("mean VADER score per tone (strong neg .. strong pos): {means:.3?}");
        assert!(means[0] < -0.5 && means[4] > 0.5, "{means:?}");
        assert!(means[1] < -0.1 && means[3] > 0.1, "{means:?}");
        assert!(means.windows(2).all(|w| w[0] < w[1]), "{means:?}");
        assert!(means[2].abs() < 0.25, "{means:?}");
        // Overall the corpus is balanced, so the SFT model starts near the middle of the reward range.
        let all = rs.iter().map(|r| s.score(&r.text)).sum::<f64>() / rs.len() as f64;
        assert!(all.abs() < 0.15, "{all}");
    }

    #[test]
    fn leads_and_prompts_are_neutral() {
        let s = Sentiment::new();
        for r in labelled_reviews(4, 3000) {
            let lead: Vec<&str> = r.text.split_whitespace().take(r.neutral_words).collect();
            assert_eq!(s.score(&lead.join(" ")), 0.0, "{}", r.text);
        }
        for p in prompts(4, 1000) {
            assert_eq!(s.score(&p), 0.0, "{p}");
        }
    }

    #[test]
    fn cost_per_call() {
        let s = Sentiment::new();
        let texts = super::super::corpus::reviews(2, 2000);
        s.score(&texts[0]); // parses the lexicon
        let t = std::time::Instant::now();
        let total: f64 = texts.iter().map(|x| s.score(x)).sum();
        let us = t.elapsed().as_secs_f64() * 1e6 / texts.len() as f64;
        eprintln!("VADER: {us:.1} us per review (one thread), checksum {total:.3}");
        // Generous bound: scoring must never dominate a training step.
        assert!(us < 2000.0, "{us} us per call");
    }
}
