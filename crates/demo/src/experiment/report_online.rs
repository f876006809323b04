//! The online part of `report.md`: online and iterative DPO against offline DPO at equal KL, and the
//! ablations that say why they land where they do.

use std::fmt::Write as _;

use super::online_methods::{Variant, VARIANTS};
use super::report::Report;

impl Report {
    /// The online and iterative DPO section.
    pub(super) fn online_markdown(&self) -> String {
        let mut s = String::new();
        if self.frontier.is_empty() {
            return s;
        }
        let (o, it) = (&self.plan.online, &self.plan.iterative);
        s += "\n## Online and iterative DPO\n\n";
        let _ = writeln!(
            s,
            "Both label their pairs with the learned Bradley-Terry reward model (not the ground truth), best against \
             worst of {} samples per prompt from the current policy, and train the DPO loss at beta {}. Online DPO: \
             {} steps of {} prompts (lr {}). Iterative DPO: {} rounds of {} steps on pairs sampled from {} prompts \
             (lr {}, reference {}). Offline DPO: {} steps of {} pairs sampled once from the SFT model, at every beta.\n",
            o.samples,
            o.beta,
            o.steps.steps,
            o.steps.batch,
            o.steps.lr,
            it.rounds,
            it.steps.steps,
            it.prompts,
            it.steps.lr,
            if it.move_reference { "moved to each round's start" } else { "fixed (the SFT model)" },
            self.plan.dpo.steps,
            self.plan.dpo.batch
        );
        s += "![frontier judged by the learned reward model](frontier_learned.png)\n\n";
        s += "| method | points (KL: learned reward ± s.e.) |\n| --- | --- |\n";
        for (m, pts) in &self.frontier {
            let text: Vec<String> =
                pts.iter().map(|p| format!("{:.2}: {:.3} ± {:.3}", p.kl, p.reward, p.reward_se)).collect();
            let _ = writeln!(s, "| {m} | {} |", text.join("; "));
        }
        s += "\nAt equal KL (each online point against offline DPO's best point with no more KL, the SFT model at KL 0 included):\n\n";
        for line in &self.online_vs_offline {
            let _ = writeln!(s, "- {line}");
        }
        s += &self.ablation_markdown();
        s
    }

    /// The online DPO ablations: each variant's final point against offline DPO at equal KL (ground truth).
    pub(super) fn ablation_markdown(&self) -> String {
        let mut s = String::new();
        let variants: Vec<&Variant> =
            VARIANTS.iter().filter(|v| self.runs.iter().any(|r| r.method == v.method)).collect();
        if variants.len() < 2 {
            return s;
        }
        let _ = writeln!(
            s,
            "\n### Why online DPO is where it is: ablations\n\nOnline DPO as above, with one thing changed at a \
             time: the labels (the ground truth, which ranks offline DPO's pairs, instead of the learned reward \
             model) and the budget (offline DPO's {} steps of {} pairs instead of online DPO's {} steps of {}). \
             Same beta ({}), learning rate ({}), samples per prompt and prompts; offline DPO keeps its sweep of \
             every beta. Each variant's final point against offline DPO's best point with no more KL, by the \
             ground truth (± two standard errors of the evaluation noise), and against the upper concave \
             envelope of offline DPO's points at the same KL (the reward a mixture of two offline policies \
             reaches with no more KL; it does not depend on where the checkpoints fall):\n",
            self.plan.dpo.steps,
            self.plan.dpo.batch,
            self.plan.online.steps.steps,
            self.plan.online.steps.batch,
            self.plan.online.beta,
            self.plan.online.steps.lr,
        );
        s += "| variant | labels | steps x prompts | KL | reward | offline DPO at no more KL | difference | against offline DPO's concave envelope |\n";
        s += "| --- | --- | --- | ---: | ---: | --- | ---: | ---: |\n";
        for v in variants {
            let steps = v.steps(&self.plan);
            let Some(row) = self.equal_kl.iter().rfind(|r| r.method == v.method && r.judge == "ground truth") else {
                continue;
            };
            let (offline, diff) = match (row.offline_kl, row.offline_reward, row.difference, row.two_se) {
                (Some(k), Some(r), Some(d), Some(se)) => (format!("{r:.3} at KL {k:.2}"), format!("{d:+.3} ± {se:.3}")),
                _ => ("none".into(), "-".into()),
            };
            let envelope = row.envelope_difference.map_or("-".into(), |d| format!("{d:+.3}"));
            let _ = writeln!(
                s,
                "| {} | {} | {} x {} | {:.2} | {:.3} | {offline} | {diff} | {envelope} |",
                v.method,
                if v.ground_truth { "ground truth" } else { "learned reward model" },
                steps.steps,
                steps.batch,
                row.kl,
                row.reward
            );
        }
        s
    }
}
