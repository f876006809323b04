//! Learning-rate schedules, as the `transformers` schedulers HF Trainer builds from `lr_scheduler_type`.
//!
//! [`lr_at`] is the rate optimizer step `step` (0-based) uses: `base_lr * lambda(step)`, with `lambda` the
//! schedule's lambda from `transformers/optimization.py`, because `LambdaLR` applies `lambda(0)` when it is
//! built and the Trainer calls `lr_scheduler.step()` after every `optimizer.step()`.
//!
//! What HF Trainer logs as `learning_rate` at global step k+1 (after optimizer step k): transformers 5.x
//! reads `lr_scheduler.get_last_lr()` right after `optimizer.step()` and before `lr_scheduler.step()`
//! (`trainer.py`, "get learning rate before update"), so it logs the rate the step used, `lr_at(k)`. (Older
//! versions read it inside `_maybe_log_save_evaluate`, after the scheduler had stepped: `lr_at(k + 1)`.)
//!
//! `warmup_steps` is a step count; HF turns a `warmup_ratio` (or a `warmup_steps` below 1) into
//! `ceil(total_steps * ratio)` (`TrainingArguments.get_warmup_steps`).

use std::f64::consts::PI;
use std::fmt;
use std::str::FromStr;

/// The shape of the schedule after warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScheduleKind {
    /// `get_constant_schedule_with_warmup` (HF `constant_with_warmup`): linear warmup from 0, then
    /// constant. HF's `constant` ignores `warmup_steps` altogether; it is this with `warmup_steps = 0`.
    Constant,
    /// `get_linear_schedule_with_warmup`: linear warmup, then linear decay to 0 at `total_steps`.
    Linear,
    /// `get_cosine_schedule_with_warmup` with `num_cycles = 0.5`: linear warmup, then half a cosine down
    /// to 0 at `total_steps` (and, as in transformers, back up after it).
    Cosine,
}

/// A schedule name that is not one of `constant`, `constant_with_warmup`, `linear`, `cosine`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown learning-rate schedule `{0}` (expected constant, linear or cosine)")]
pub struct UnknownSchedule(pub String);

impl FromStr for ScheduleKind {
    type Err = UnknownSchedule;

    /// `constant`, `linear`, `cosine`; also HF's `constant_with_warmup` for `constant`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "constant" | "constant_with_warmup" => Ok(ScheduleKind::Constant),
            "linear" => Ok(ScheduleKind::Linear),
            "cosine" => Ok(ScheduleKind::Cosine),
            _ => Err(UnknownSchedule(s.to_string())),
        }
    }
}

impl fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ScheduleKind::Constant => "constant",
            ScheduleKind::Linear => "linear",
            ScheduleKind::Cosine => "cosine",
        })
    }
}

/// The learning rate of optimizer step `step` (0-based), which is also what HF Trainer logs for it.
/// Same f64 operations as transformers' lambdas, so the same bits.
pub fn lr_at(kind: ScheduleKind, base_lr: f64, warmup_steps: u64, total_steps: u64, step: u64) -> f64 {
    base_lr * factor(kind, warmup_steps, total_steps, step)
}

fn factor(kind: ScheduleKind, warmup: u64, total: u64, step: u64) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    // Python ints: `num_training_steps - num_warmup_steps` may be negative, and is then clamped to 1.
    let decay_steps = (total as i128 - warmup as i128).max(1) as f64;
    match kind {
        ScheduleKind::Constant => 1.0,
        ScheduleKind::Linear => py_max0((total as i128 - step as i128) as f64 / decay_steps),
        ScheduleKind::Cosine => {
            let progress = (step - warmup) as f64 / decay_steps;
            let num_cycles = 0.5;
            py_max0(0.5 * (1.0 + (PI * num_cycles * 2.0 * progress).cos()))
        }
    }
}

/// Python's `max(0.0, x)`: `x` only when `x > 0.0`.
fn py_max0(x: f64) -> f64 {
    if x > 0.0 {
        x
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // from transformers import get_scheduler
    // def lrs(name, warmup, total, n=12, base=5e-4):
    //     opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    //     s = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total); out = []
    //     for _ in range(n): out.append(opt.param_groups[0]["lr"]); opt.step(); s.step()
    //     return out
    #[track_caller]
    fn check(kind: ScheduleKind, warmup: u64, total: u64, want: [f64; 12]) {
        for (step, want) in want.into_iter().enumerate() {
            let got = lr_at(kind, 5e-4, warmup, total, step as u64);
            assert!(
                (got - want).abs() <= 1e-15 * want.abs(),
                "{kind} warmup {warmup} total {total} step {step}: {got:e}, transformers {want:e}"
            );
        }
    }

    #[test]
    fn constant_matches_transformers() {
        // lrs("constant", 0, 10)
        check(ScheduleKind::Constant, 0, 10, [0.0005; 12]);
        // lrs("constant_with_warmup", 3, 10)
        #[rustfmt::skip]
        check(ScheduleKind::Constant, 3, 10, [0.0, 0.00016666666666666666, 0.0003333333333333333, 0.0005, 0.0005, 0.0005, 0.0005, 0.0005, 0.0005, 0.0005, 0.0005, 0.0005]);
    }

    #[test]
    fn linear_matches_transformers() {
        // lrs("linear", 3, 10)
        #[rustfmt::skip]
        check(ScheduleKind::Linear, 3, 10, [0.0, 0.00016666666666666666, 0.0003333333333333333, 0.0005, 0.00042857142857142855, 0.00035714285714285714, 0.0002857142857142857, 0.00021428571428571427, 0.00014285714285714284, 7.142857142857142e-05, 0.0, 0.0]);
        // lrs("linear", 0, 7)
        #[rustfmt::skip]
        check(ScheduleKind::Linear, 0, 7, [0.0005, 0.00042857142857142855, 0.00035714285714285714, 0.0002857142857142857, 0.00021428571428571427, 0.00014285714285714284, 7.142857142857142e-05, 0.0, 0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn cosine_matches_transformers() {
        // lrs("cosine", 3, 10)
        #[rustfmt::skip]
        check(ScheduleKind::Cosine, 3, 10, [0.0, 0.00016666666666666666, 0.0003333333333333333, 0.0005, 0.00047524221697560476, 0.0004058724504646834, 0.0003056302334890786, 0.00019436976651092142, 9.412754953531663e-05, 2.4757783024395242e-05, 0.0, 2.4757783024395215e-05]);
        // lrs("cosine", 0, 7): past the end the cosine rises again, as in transformers
        #[rustfmt::skip]
        check(ScheduleKind::Cosine, 0, 7, [0.0005, 0.00047524221697560476, 0.0004058724504646834, 0.0003056302334890786, 0.00019436976651092142, 9.412754953531663e-05, 2.4757783024395242e-05, 0.0, 2.4757783024395215e-05, 9.412754953531657e-05, 0.00019436976651092137, 0.0003056302334890786]);
        // lrs("cosine", 4, 3): warmup longer than training
        #[rustfmt::skip]
        check(ScheduleKind::Cosine, 4, 3, [0.0, 0.000125, 0.00025, 0.000375, 0.0005, 0.0, 0.0005, 0.0, 0.0005, 0.0, 0.0005, 0.0]);
    }

    #[test]
    fn names_round_trip() {
        for kind in [ScheduleKind::Constant, ScheduleKind::Linear, ScheduleKind::Cosine] {
            assert_eq!(kind.to_string().parse::<ScheduleKind>(), Ok(kind));
        }
        assert_eq!("constant_with_warmup".parse::<ScheduleKind>(), Ok(ScheduleKind::Constant));
        let err = "cosine_with_restarts".parse::<ScheduleKind>().unwrap_err();
        assert_eq!(err, UnknownSchedule("cosine_with_restarts".into()));
        assert!(err.to_string().contains("`cosine_with_restarts`"));
    }
}
