//! Every setting of the experiment in one place: the world (corpus, tokenizer, model shape), the data
//! (prompts, samples per prompt), and each method's sweep. `--quick` and `--model` differ from the full
//! run only here.

use engine::kernels::Precision;
use serde::{Deserialize, Serialize};

/// The small GPT-2 trained from scratch as the SFT (and reference) model.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelShape {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub positions: usize,
}

/// A training run's optimizer settings (AdamW, linear decay, the trainer's defaults otherwise).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Steps {
    pub lr: f64,
    /// Pairs (or sequences) per optimizer step.
    pub batch: usize,
    pub steps: u64,
    /// Points of the run evaluated (evenly spaced checkpoints, the last one the final weights).
    pub evals: u64,
}

impl Steps {
    /// Checkpoint spacing that gives `evals` evaluation points.
    pub fn save_every(&self) -> u64 {
        (self.steps / self.evals.max(1)).max(1)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PpoPlan {
    /// KL coefficients of the runs against the learned reward model.
    pub kl_coefs_learned: Vec<f64>,
    /// KL coefficients of the runs against the ground-truth reward (the paper's "PPO-GT").
    pub kl_coefs_true: Vec<f64>,
    pub lr: f64,
    pub steps: usize,
    pub rollout_prompts: usize,
    pub minibatch: usize,
    pub ppo_epochs: usize,
    /// Points of each run evaluated.
    pub evals: usize,
}

/// Online DPO (`dpo train --online`), labelled by the learned reward model.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OnlinePlan {
    pub beta: f64,
    /// `batch` prompts per step, `samples` completions each (one pair per prompt).
    pub steps: Steps,
    pub samples: usize,
    /// Also run the ablations of `online_methods::VARIANTS`: online DPO labelled by the ground truth, and
    /// online DPO for offline DPO's pair-steps (`dpo.steps` x `dpo.batch`), each label source at each budget.
    #[serde(default)]
    pub ablations: bool,
}

/// Iterative DPO (`dpo iterate`), labelled by the learned reward model.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IterativePlan {
    pub beta: f64,
    pub rounds: usize,
    /// Training prompts sampled in every round (the first this many).
    pub prompts: usize,
    pub samples: usize,
    /// Steps of every round's DPO run.
    pub steps: Steps,
    pub move_reference: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    pub name: String,
    pub seed: u64,
    /// Reviews the SFT model is pretrained on (unused with `--model`).
    pub corpus_size: usize,
    pub vocab_size: usize,
    pub shape: ModelShape,
    pub sft: Steps,
    /// Prompts whose sampled pairs train the methods.
    pub train_prompts: usize,
    /// Prompts whose sampled pairs are held out (reward-model and implicit-reward accuracy).
    pub heldout_pair_prompts: usize,
    /// Samples per prompt; every pair of them with different ground-truth rewards becomes a pair.
    pub samples_per_prompt: usize,
    /// Held-out prompts on which every policy is evaluated, and samples per prompt there.
    pub eval_prompts: usize,
    pub eval_samples: usize,
    pub max_new_tokens: usize,
    pub dpo_betas: Vec<f64>,
    pub dpo: Steps,
    pub preferred_ft: Steps,
    pub unlikelihood: Steps,
    /// Weight of the unlikelihood term.
    pub unlikelihood_alpha: f64,
    pub reward_model: Steps,
    pub ppo: PpoPlan,
    pub bon_ns: Vec<usize>,
    pub online: OnlinePlan,
    pub iterative: IterativePlan,
    /// Sampling temperatures of the win rates against the preferred completions (empty: none measured).
    #[serde(default)]
    pub win_rate_temperatures: Vec<f64>,
    /// Samples per held-out pair prompt at each temperature above 0 (one at temperature 0).
    #[serde(default)]
    pub win_rate_samples: usize,
    /// The precision of every model pass of the experiment (`dpo demo --precision`): training, sampling's
    /// prefill, scoring, the reward model, PPO.
    #[serde(with = "dpo::precision::by_name", default)]
    pub precision: Precision,
}

impl Plan {
    /// `dpo demo`: the whole sweep, sized to finish within ten minutes on two cores.
    pub fn full() -> Self {
        Plan {
            name: "full".into(),
            seed: 1,
            corpus_size: 24_000,
            vocab_size: 768,
            shape: ModelShape { layers: 4, hidden: 128, heads: 4, positions: 64 },
            sft: Steps { lr: 3e-3, batch: 64, steps: 500, evals: 1 },
            train_prompts: 600,
            heldout_pair_prompts: 100,
            samples_per_prompt: 4,
            eval_prompts: 96,
            eval_samples: 4,
            max_new_tokens: 40,
            dpo_betas: vec![0.05, 0.1, 0.5, 1.0, 5.0],
            dpo: Steps { lr: 2e-4, batch: 32, steps: 120, evals: 3 },
            preferred_ft: Steps { lr: 1e-4, batch: 32, steps: 120, evals: 3 },
            unlikelihood: Steps { lr: 1e-4, batch: 32, steps: 120, evals: 3 },
            unlikelihood_alpha: 1.0,
            reward_model: Steps { lr: 1e-3, batch: 32, steps: 150, evals: 1 },
            ppo: PpoPlan {
                kl_coefs_learned: vec![0.05, 0.2, 0.5],
                kl_coefs_true: vec![0.05, 0.2],
                lr: 3e-4,
                steps: 45,
                rollout_prompts: 32,
                minibatch: 32,
                ppo_epochs: 2,
                evals: 3,
            },
            bon_ns: vec![1, 2, 4, 8, 16, 32, 64, 128],
            online: OnlinePlan {
                beta: 0.5,
                steps: Steps { lr: 2e-4, batch: 32, steps: 60, evals: 3 },
                samples: 2,
                ablations: true,
            },
            iterative: IterativePlan {
                beta: 0.5,
                rounds: 3,
                prompts: 320,
                samples: 2,
                steps: Steps { lr: 2e-4, batch: 32, steps: 20, evals: 1 },
                move_reference: false,
            },
            win_rate_temperatures: vec![0.0, 0.25, 0.5, 0.75, 1.0],
            win_rate_samples: 2,
            precision: Precision::F32,
        }
    }

    /// `dpo demo --quick`: every method once, on a smaller world, within two minutes.
    pub fn quick() -> Self {
        let f = Plan::full();
        Plan {
            name: "quick".into(),
            corpus_size: 12_000,
            vocab_size: 512,
            shape: ModelShape { layers: 2, hidden: 128, heads: 4, positions: 64 },
            sft: Steps { lr: 3e-3, batch: 64, steps: 300, evals: 1 },
            train_prompts: 160,
            heldout_pair_prompts: 40,
            eval_prompts: 48,
            eval_samples: 2,
            dpo_betas: vec![0.1, 1.0],
            dpo: Steps { lr: 2e-4, batch: 32, steps: 60, evals: 2 },
            preferred_ft: Steps { lr: 2e-4, batch: 32, steps: 40, evals: 1 },
            unlikelihood: Steps { lr: 1e-4, batch: 32, steps: 40, evals: 1 },
            reward_model: Steps { lr: 1e-3, batch: 32, steps: 60, evals: 1 },
            ppo: PpoPlan {
                kl_coefs_learned: vec![0.1],
                kl_coefs_true: vec![0.1],
                steps: 16,
                rollout_prompts: 24,
                minibatch: 24,
                evals: 2,
                ..f.ppo.clone()
            },
            bon_ns: vec![1, 4, 16],
            online: OnlinePlan {
                beta: 0.5,
                steps: Steps { lr: 2e-4, batch: 16, steps: 16, evals: 2 },
                samples: 2,
                ablations: false,
            },
            iterative: IterativePlan {
                rounds: 2,
                prompts: 64,
                steps: Steps { lr: 2e-4, batch: 16, steps: 6, evals: 1 },
                ..f.iterative.clone()
            },
            win_rate_samples: 1,
            ..f
        }
    }

    /// `dpo demo --model DIR`: the same experiment on a given checkpoint (no pretraining), with fewer
    /// steps and settings, since a real model's step costs far more than the built-in one's.
    pub fn for_model(quick: bool) -> Self {
        let base = if quick { Plan::quick() } else { Plan::full() };
        let scale = |s: &Steps, steps: u64| Steps { steps, evals: 1, ..s.clone() };
        Plan {
            name: if quick { "model-quick" } else { "model" }.into(),
            // 10 steps of 8 pairs need no more than 48 prompts' pairs (up to 6 per prompt).
            train_prompts: base.train_prompts.min(if quick { 48 } else { 96 }),
            // The held-out pair prompts are also the win-rate prompts: the quick plan samples every policy
            // on 16 of them, at 4 temperatures, so that it finishes in minutes on a 135M checkpoint.
            heldout_pair_prompts: base.heldout_pair_prompts.min(if quick { 16 } else { 32 }),
            win_rate_temperatures: if quick { vec![0.0, 0.25, 0.5, 1.0] } else { base.win_rate_temperatures.clone() },
            eval_prompts: base.eval_prompts.min(32),
            eval_samples: 2,
            max_new_tokens: 32,
            dpo_betas: vec![0.1, 0.5],
            dpo: Steps { lr: 2e-5, batch: 8, ..scale(&base.dpo, if quick { 10 } else { 40 }) },
            preferred_ft: Steps { lr: 2e-5, batch: 8, ..scale(&base.preferred_ft, if quick { 10 } else { 40 }) },
            unlikelihood: Steps { lr: 1e-5, batch: 8, ..scale(&base.unlikelihood, if quick { 10 } else { 40 }) },
            reward_model: Steps { lr: 1e-5, batch: 8, ..scale(&base.reward_model, if quick { 10 } else { 40 }) },
            ppo: PpoPlan { kl_coefs_learned: vec![], kl_coefs_true: vec![], ..base.ppo.clone() },
            bon_ns: if quick { vec![1, 4, 8] } else { vec![1, 4, 16] },
            online: OnlinePlan {
                steps: Steps { lr: 2e-5, batch: 8, ..scale(&base.online.steps, if quick { 4 } else { 16 }) },
                ablations: false,
                ..base.online.clone()
            },
            iterative: IterativePlan {
                rounds: 2,
                prompts: 32,
                steps: Steps { lr: 2e-5, batch: 8, ..scale(&base.iterative.steps, if quick { 4 } else { 8 }) },
                ..base.iterative.clone()
            },
            ..base
        }
    }
}

/// The methods `--methods` can pick.
pub const METHODS: &[&str] =
    &["dpo", "preferred-ft", "unlikelihood", "ppo", "ppo-gt", "bon", "online", "iterative", "win-rate"];

impl Plan {
    /// Keeps only the named methods (from [`METHODS`]); the others' sweeps are emptied.
    pub fn restrict(&mut self, keep: &[String]) -> Result<(), String> {
        if let Some(bad) = keep.iter().find(|m| !METHODS.contains(&m.as_str())) {
            return Err(format!("unknown method `{bad}`; choose from {}", METHODS.join(", ")));
        }
        let off = |m: &str| !keep.is_empty() && !keep.iter().any(|k| k == m);
        if off("dpo") {
            self.dpo_betas.clear();
        }
        if off("preferred-ft") {
            self.preferred_ft.steps = 0;
        }
        if off("unlikelihood") {
            self.unlikelihood.steps = 0;
        }
        if off("ppo") {
            self.ppo.kl_coefs_learned.clear();
        }
        if off("ppo-gt") {
            self.ppo.kl_coefs_true.clear();
        }
        if off("bon") {
            self.bon_ns.clear();
        }
        if off("online") {
            self.online.steps.steps = 0;
            self.online.ablations = false;
        }
        if off("iterative") {
            self.iterative.rounds = 0;
        }
        if off("win-rate") {
            self.win_rate_temperatures.clear();
        }
        Ok(())
    }

    /// Sets one setting by its dotted path in the plan's JSON form (`dpo.lr=1e-4`,
    /// `dpo_betas=[0.1,1]`, `ppo.kl_coefs_true=[0.05]`); the value is JSON, or a string.
    pub fn set(&mut self, assignment: &str) -> Result<(), String> {
        let (path, value) = assignment.split_once('=').ok_or_else(|| format!("`{assignment}`: expected KEY=VALUE"))?;
        let value: serde_json::Value =
            serde_json::from_str(value).unwrap_or_else(|_| serde_json::Value::String(value.to_string()));
        let mut root = serde_json::to_value(&*self).map_err(|e| e.to_string())?;
        let mut node = &mut root;
        for key in path.split('.') {
            node = node
                .as_object_mut()
                .and_then(|o| o.get_mut(key))
                .ok_or_else(|| format!("`{path}`: no such plan setting (see report.json's `plan`)"))?;
        }
        *node = value;
        *self = serde_json::from_value(root).map_err(|e| format!("`{assignment}`: {e}"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_and_restrict() {
        let mut p = Plan::quick();
        p.set("dpo.lr=0.0002").unwrap();
        p.set("dpo_betas=[0.5]").unwrap();
        assert_eq!((p.dpo.lr, p.dpo_betas.clone()), (0.0002, vec![0.5]));
        assert!(p.set("dpo.nope=1").is_err());
        assert!(p.set("dpo.lr=\"x\"").is_err());
        p.restrict(&["dpo".into(), "bon".into()]).unwrap();
        assert!(p.ppo.kl_coefs_true.is_empty() && p.unlikelihood.steps == 0 && !p.bon_ns.is_empty());
        assert!(p.restrict(&["sft".into()]).is_err());
    }

    /// `dpo demo --precision bf16` and `--set precision=bf16` give the plan (report.json's) its precision;
    /// an unknown one is refused.
    #[test]
    fn the_precision_is_a_plan_setting() {
        assert_eq!(Plan::quick().precision, Precision::F32);
        let opts = super::super::DemoOptions { quick: true, precision: Some(Precision::Bf16), ..Default::default() };
        assert_eq!(opts.plan().unwrap().precision, Precision::Bf16);
        let mut p = Plan::full();
        p.set("precision=bf16").unwrap();
        assert_eq!(p.precision, Precision::Bf16);
        assert!(serde_json::to_string(&p).unwrap().contains("\"precision\":\"bf16\""));
        assert!(p.set("precision=fp16").unwrap_err().contains("unknown precision `fp16`"));
    }
}
