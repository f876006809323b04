//! Win rates, the paper's other two measurements in miniature (Rafailov et al. 2023, sections 6.2-6.3):
//! on every held-out pair prompt, a policy's sample against the prompt's preferred completion (the
//! highest-reward of the SFT samples the held-out pairs came from, as TL;DR's reference summaries and
//! HH's chosen responses are the data's preferred answers), judged by the ground truth. Against the
//! sampling temperature (summarization, figure 2 right) and, at temperature 1, against the chosen
//! completion for every method (dialogue, figure 3). The arithmetic and the 95% Wilson interval are
//! [`dpo::winrate`].
//!
//! At temperature 0 every sample of a prompt is the same greedy completion, so it is drawn once: repeats
//! would be the same comparison counted again and would narrow the interval dishonestly.

use std::collections::BTreeMap;

use engine::Params;
use serde::Serialize;

use super::evaluate::World;
use super::DemoError;
use dpo::winrate::{Tally, WinRate};

/// The prompts and their preferred completions.
pub struct WinRateSet {
    pub prompts: Vec<Vec<u32>>,
    pub preferred: Vec<Vec<u32>>,
    /// Samples per prompt at a temperature above 0.
    pub samples: usize,
    pub max_new_tokens: usize,
    pub seed: u64,
}

/// One point of a win-rate curve.
#[derive(Clone, Debug, Serialize)]
pub struct TemperaturePoint {
    pub temperature: f64,
    #[serde(flatten)]
    pub rate: WinRate,
}

/// A method's win rate against the preferred completions, and which of its runs was measured.
#[derive(Clone, Debug, Serialize)]
pub struct MethodWinRate {
    /// The run ("beta=0.5", "kl_coef=0.2", "N=128").
    pub setting: String,
    #[serde(flatten)]
    pub rate: WinRate,
}

/// Win rates by method: `{method: [{temperature, win_rate, ci_low, ci_high, n, ...}]}` and
/// `{method: {setting, win_rate, ci_low, ci_high, n, ...}}`.
pub type VsTemperature = BTreeMap<String, Vec<TemperaturePoint>>;
pub type VsChosen = BTreeMap<String, MethodWinRate>;

impl WinRateSet {
    /// The tally of `completions[i]` (of prompt `prompt_of[i]`) against that prompt's preferred one.
    pub fn judge(&self, world: &World, completions: &[(usize, &[u32])]) -> Result<WinRate, DemoError> {
        let ours: Vec<(&[u32], &[u32])> = completions.iter().map(|&(p, c)| (&self.prompts[p][..], c)).collect();
        let theirs: Vec<(&[u32], &[u32])> =
            completions.iter().map(|&(p, _)| (&self.prompts[p][..], &self.preferred[p][..])).collect();
        let a = world.ground_truth_all(&ours)?;
        let b = world.ground_truth_all(&theirs)?;
        let identical: Vec<bool> = ours.iter().zip(&theirs).map(|(x, y)| x.1 == y.1).collect();
        Ok(Tally::from_scores(&a, &b, &identical).summary())
    }

    /// Samples `params` at `temperature` (once per prompt at 0, `samples` times otherwise) and judges the
    /// samples against the preferred completions. The seed is the same for every policy.
    pub fn at_temperature(&self, world: &World, params: &Params, temperature: f64) -> Result<WinRate, DemoError> {
        let n = if temperature == 0.0 { 1 } else { self.samples };
        let sampling =
            engine::generate::SamplingConfig { temperature: temperature as f32, ..world.sampling(self.max_new_tokens) };
        let seed = self.seed ^ temperature.to_bits();
        let gens = world.sample(params, &self.prompts, n, &sampling, seed)?;
        let items: Vec<(usize, &[u32])> = gens.iter().map(|g| (g.prompt_index, &g.tokens[..])).collect();
        self.judge(world, &items)
    }

    /// The curve of `params` over `temperatures`.
    pub fn curve(
        &self,
        world: &World,
        params: &Params,
        temperatures: &[f64],
    ) -> Result<Vec<TemperaturePoint>, DemoError> {
        temperatures
            .iter()
            .map(|&t| Ok(TemperaturePoint { temperature: t, rate: self.at_temperature(world, params, t)? }))
            .collect()
    }
}

/// A sentence on the paper's summarization claims (DPO's best win rate above PPO's; DPO stable as
/// the temperature rises while PPO degrades), from the curves and their intervals.
pub fn temperature_verdict(curves: &VsTemperature) -> String {
    let measured = |m: &str| curves.get(m).filter(|c| !c.is_empty());
    let (Some(dpo), Some(ppo)) = (measured("DPO"), measured("PPO")) else {
        return "DPO and PPO were not both measured, so the paper's temperature claims are not tested here.".into();
    };
    let best = |c: &[TemperaturePoint]| {
        c.iter().max_by(|a, b| a.rate.win_rate.total_cmp(&b.rate.win_rate)).cloned().expect("a measured curve")
    };
    let (bd, bp) = (best(dpo), best(ppo));
    let apart = |a: &WinRate, b: &WinRate| a.ci_low > b.ci_high || b.ci_low > a.ci_high;
    let best_sentence = format!(
        "Best win rate against the preferred completions: DPO {:.3} [{:.3}, {:.3}] at temperature {}, PPO {:.3} \
         [{:.3}, {:.3}] at temperature {} ({}).",
        bd.rate.win_rate,
        bd.rate.ci_low,
        bd.rate.ci_high,
        bd.temperature,
        bp.rate.win_rate,
        bp.rate.ci_low,
        bp.rate.ci_high,
        bp.temperature,
        if !apart(&bd.rate, &bp.rate) {
            "the 95% intervals overlap: no ordering beyond the intervals".to_string()
        } else if bd.rate.win_rate > bp.rate.win_rate {
            "DPO ahead beyond the intervals, as the paper finds".to_string()
        } else {
            "PPO ahead beyond the intervals, unlike the paper".to_string()
        }
    );
    let drop = |name: &str, c: &[TemperaturePoint]| {
        let (lo, hi) = (c.first().expect("a measured curve"), c.last().expect("a measured curve"));
        let d = hi.rate.win_rate - lo.rate.win_rate;
        let verdict = if apart(&lo.rate, &hi.rate) { "beyond the intervals" } else { "within the intervals" };
        format!(
            "{name} goes from {:.3} at temperature {} to {:.3} at {} ({d:+.3}, {verdict})",
            lo.rate.win_rate, lo.temperature, hi.rate.win_rate, hi.temperature
        )
    };
    format!("{best_sentence} {}; {}.", drop("DPO", dpo), drop("PPO", ppo))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(t: f64, w: usize, n: usize) -> TemperaturePoint {
        TemperaturePoint { temperature: t, rate: Tally { wins: w, ties: 0, losses: n - w }.summary() }
    }

    #[test]
    fn verdict_reads_the_intervals() {
        let mut c = VsTemperature::new();
        c.insert("DPO".into(), vec![point(0.0, 80, 100), point(1.0, 78, 100)]);
        c.insert("PPO".into(), vec![point(0.0, 50, 100), point(1.0, 20, 100)]);
        let v = temperature_verdict(&c);
        assert!(v.contains("DPO ahead beyond the intervals"), "{v}");
        assert!(v.contains("DPO goes from 0.800 at temperature 0 to 0.780 at 1 (-0.020, within the intervals)"), "{v}");
        assert!(v.contains("PPO goes from 0.500 at temperature 0 to 0.200 at 1 (-0.300, beyond the intervals)"), "{v}");
        c.insert("PPO".into(), vec![point(0.0, 76, 100), point(1.0, 70, 100)]);
        assert!(temperature_verdict(&c).contains("the 95% intervals overlap"));
        c.remove("PPO");
        assert!(temperature_verdict(&c).contains("not both measured"));
    }
}
