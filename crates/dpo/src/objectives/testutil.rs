//! Test helpers: the parity fixtures, a finite-difference gradient check, synthetic batches, and reference
//! numbers for the losses the fixtures do not cover.

use serde::Deserialize;

use super::{combined, pair_loss, LossConfig, LossType, PairLogps, PromptLogps};

pub const PARITY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/parity");
pub const ARCHS: [&str; 4] = ["gpt2", "llama", "llama3", "neox"];

#[derive(Deserialize)]
struct Row {
    policy_chosen_logps: f64,
    policy_rejected_logps: f64,
    ref_chosen_logps: f64,
    ref_rejected_logps: f64,
    chosen_len: usize,
    rejected_len: usize,
}

/// One architecture's `expected/<arch>/logps.jsonl` and `losses.json`.
pub struct Fixture {
    pub arch: &'static str,
    pub pc: Vec<f64>,
    pub pr: Vec<f64>,
    pub rc: Vec<f64>,
    pub rr: Vec<f64>,
    pub lc: Vec<usize>,
    pub lr: Vec<usize>,
    pub losses: serde_json::Value,
}

impl Fixture {
    pub fn pair(&self) -> PairLogps<'_> {
        PairLogps {
            policy_chosen: &self.pc,
            policy_rejected: &self.pr,
            ref_chosen: Some(&self.rc),
            ref_rejected: Some(&self.rr),
            chosen_len: &self.lc,
            rejected_len: &self.lr,
            prompt: None,
            weights: None,
        }
    }
}

impl Fixture {
    /// The fixture without rows that repeat another row's chosen or rejected completion (the data set
    /// repeats some): sorting losses (AOT) have a kink where two rows tie, so finite differences there are
    /// not a derivative.
    pub fn distinct(&self) -> Fixture {
        let mut keep = vec![];
        for i in 0..self.pc.len() {
            if !keep.iter().any(|&j: &usize| self.pc[j] == self.pc[i] || self.pr[j] == self.pr[i]) {
                keep.push(i);
            }
        }
        let pick = |v: &[f64]| keep.iter().map(|&i| v[i]).collect::<Vec<_>>();
        Fixture {
            arch: self.arch,
            pc: pick(&self.pc),
            pr: pick(&self.pr),
            rc: pick(&self.rc),
            rr: pick(&self.rr),
            lc: keep.iter().map(|&i| self.lc[i]).collect(),
            lr: keep.iter().map(|&i| self.lr[i]).collect(),
            losses: serde_json::Value::Null,
        }
    }
}

pub fn fixtures() -> Vec<Fixture> {
    ARCHS
        .iter()
        .map(|&arch| {
            let dir = format!("{PARITY}/expected/{arch}");
            let text = std::fs::read_to_string(format!("{dir}/logps.jsonl")).expect("read logps.jsonl");
            let rows: Vec<Row> =
                text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect();
            let losses = serde_json::from_str(&std::fs::read_to_string(format!("{dir}/losses.json")).unwrap())
                .expect("parse losses.json");
            Fixture {
                arch,
                pc: rows.iter().map(|r| r.policy_chosen_logps).collect(),
                pr: rows.iter().map(|r| r.policy_rejected_logps).collect(),
                rc: rows.iter().map(|r| r.ref_chosen_logps).collect(),
                rr: rows.iter().map(|r| r.ref_rejected_logps).collect(),
                lc: rows.iter().map(|r| r.chosen_len).collect(),
                lr: rows.iter().map(|r| r.rejected_len).collect(),
                losses,
            }
        })
        .collect()
}

/// The settings the fixtures were made with (`losses.json` `_settings`).
pub fn golden_cfg() -> LossConfig {
    LossConfig { beta: 0.1, label_smoothing: 0.1, ..LossConfig::default() }
}

pub fn rel_err(got: f64, want: f64) -> f64 {
    (got - want).abs() / want.abs()
}

/// Checks `kind` against `losses.json` for every architecture; returns the largest relative error.
pub fn check_golden(kind: LossType) -> f64 {
    let mut worst = 0.0f64;
    for f in fixtures() {
        let want = f.losses[kind.name()].as_f64().unwrap_or_else(|| panic!("{} has no {kind}", f.arch));
        let got = pair_loss(kind, &golden_cfg(), &f.pair()).unwrap().loss;
        let e = rel_err(got, want);
        assert!(e < 1e-4, "{kind} on {}: {got} vs TRL {want} (relative error {e:.2e})", f.arch);
        worst = worst.max(e);
    }
    eprintln!("golden {kind}: max relative error {worst:.2e}");
    worst
}

/// Five-point central difference of `f` at `x` with step `h`.
pub fn central_diff(f: impl Fn(f64) -> f64, x: f64, h: f64) -> f64 {
    (-f(x + 2.0 * h) + 8.0 * f(x + h) - 8.0 * f(x - h) + f(x - 2.0 * h)) / (12.0 * h)
}

pub const FD_STEP: f64 = 1e-3;

pub fn assert_close_grad(what: &str, analytic: f64, fd: f64) {
    let err = (analytic - fd).abs();
    assert!(err <= 1e-6 * analytic.abs() + 1e-11, "{what}: analytic {analytic:.12e} vs finite difference {fd:.12e}");
}

/// Compares the analytic gradient of [`combined`] with central finite differences of its value, for every
/// policy chosen, rejected and (when given) prompt log-prob.
pub fn check_grad(losses: &[(LossType, f64)], cfg: &LossConfig, x: &PairLogps) {
    let g = combined(losses, cfg, x).unwrap();
    let n = x.policy_chosen.len();
    let pc = x.policy_chosen.to_vec();
    let pr = x.policy_rejected.to_vec();
    let pp = x.prompt.map(|p| p.logps.to_vec());
    let value = |pc: &[f64], pr: &[f64], pp: Option<&Vec<f64>>| {
        let prompt = x.prompt.map(|p| PromptLogps { logps: pp.unwrap(), len: p.len });
        combined(losses, cfg, &PairLogps { policy_chosen: pc, policy_rejected: pr, prompt, ..*x }).unwrap().loss
    };
    for i in 0..n {
        let fd = central_diff(
            |v| {
                let mut c = pc.clone();
                c[i] = v;
                value(&c, &pr, pp.as_ref())
            },
            pc[i],
            FD_STEP,
        );
        assert_close_grad(&format!("{losses:?} d/d policy_chosen[{i}]"), g.d_policy_chosen[i], fd);
        let fd = central_diff(
            |v| {
                let mut r = pr.clone();
                r[i] = v;
                value(&pc, &r, pp.as_ref())
            },
            pr[i],
            FD_STEP,
        );
        assert_close_grad(&format!("{losses:?} d/d policy_rejected[{i}]"), g.d_policy_rejected[i], fd);
        if let Some(p0) = &pp {
            let fd = central_diff(
                |v| {
                    let mut p = p0.clone();
                    p[i] = v;
                    value(&pc, &pr, Some(&p))
                },
                p0[i],
                FD_STEP,
            );
            assert_close_grad(&format!("{losses:?} d/d prompt[{i}]"), g.d_prompt[i], fd);
        }
    }
}

/// A deterministic synthetic batch: log-ratios uniform in `[-scale, scale]`, sums of a few dozen tokens.
pub struct Synthetic {
    pub pc: Vec<f64>,
    pub pr: Vec<f64>,
    pub rc: Vec<f64>,
    pub rr: Vec<f64>,
    pub lc: Vec<usize>,
    pub lr: Vec<usize>,
    pub prompt: Vec<f64>,
    pub prompt_len: Vec<usize>,
}

impl Synthetic {
    pub fn pair(&self) -> PairLogps<'_> {
        PairLogps {
            policy_chosen: &self.pc,
            policy_rejected: &self.pr,
            ref_chosen: Some(&self.rc),
            ref_rejected: Some(&self.rr),
            chosen_len: &self.lc,
            rejected_len: &self.lr,
            prompt: None,
            weights: None,
        }
    }
}

pub fn synthetic(n: usize, seed: u64, scale: f64) -> Synthetic {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut u = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut s = Synthetic {
        pc: vec![],
        pr: vec![],
        rc: vec![],
        rr: vec![],
        lc: vec![],
        lr: vec![],
        prompt: vec![],
        prompt_len: vec![],
    };
    for _ in 0..n {
        let lc = 1 + (u() * 40.0) as usize;
        let lr = 1 + (u() * 40.0) as usize;
        let rc = -(0.5 + 2.5 * u()) * lc as f64;
        let rr = -(0.5 + 2.5 * u()) * lr as f64;
        s.rc.push(rc);
        s.rr.push(rr);
        // Log-probs stay below 0, as real ones do (ORPO's log(1 - p) needs it).
        s.pc.push((rc + scale * (2.0 * u() - 1.0)).min(-0.05));
        s.pr.push((rr + scale * (2.0 * u() - 1.0)).min(-0.05));
        s.lc.push(lc);
        s.lr.push(lr);
        let pl = 1 + (u() * 20.0) as usize;
        s.prompt.push(-(0.5 + 3.0 * u()) * pl as f64);
        s.prompt_len.push(pl);
    }
    s
}

// Reference values for the losses that `losses.json` does not hold, on the gpt2 fixture (beta 0.1,
// label_smoothing 0.1 unless said otherwise), computed in f64 by the script at the end of this file: TRL 1.16's lines
// transcribed into Python with `math` only. They guard the Rust against slips, not against a misreading of
// TRL shared by both transcriptions; the TRL source lines are quoted in each loss's file.
pub const GPT2_SIGMOID_FORWARD_KL: f64 = 938489873882.8375;
pub const GPT2_SIGMOID_JS: f64 = 1.0269898125610089;
pub const GPT2_SIGMOID_ALPHA_05: f64 = 179646.82753220128;
pub const GPT2_SIGMOID_ALPHA_15: f64 = 0.7391631743753724;
pub const GPT2_AOT: f64 = 0.947101530370111;
pub const GPT2_AOT_UNPAIRED: f64 = 0.9105801086556085;
pub const GPT2_DISCOPOP: f64 = 1.1016394627081911;
pub const GPT2_SFT: f64 = 7.612079859994263;
pub const GPT2_CDPO: f64 = 0.9939400318564006;
pub const GPT2_SIMPO: f64 = 0.9292259645168438;
pub const GPT2_SIMPO_ALPHAPO: f64 = 0.9724320029460712;
pub const GPT2_ORPO: f64 = 7.6895131848643725;
pub const GPT2_KTO_KL: f64 = 9.97617737452189;
pub const GPT2_KTO: f64 = 0.5473224124189966;
pub const GPT2_APO_ZERO_UNPAIRED: f64 = 0.592798291780507;

// The script that printed the constants above (run with the path of expected/gpt2/logps.jsonl):
//
// # TRL 1.16 loss lines transcribed with `math` (f64), on expected/gpt2/logps.jsonl.
// import json, math, sys
// rows = [json.loads(l) for l in open(sys.argv[1])]
// pc = [r["policy_chosen_logps"] for r in rows]; pr = [r["policy_rejected_logps"] for r in rows]
// rc = [r["ref_chosen_logps"] for r in rows]; rr = [r["ref_rejected_logps"] for r in rows]
// lc = [r["chosen_len"] for r in rows]; lr = [r["rejected_len"] for r in rows]
// beta, ls = 0.1, 0.1
// def logsigmoid(x): return min(x, 0.0) - math.log1p(math.exp(-abs(x)))
// def sigmoid(x): return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))
// def mean(v): return sum(v) / len(v)
// def log1mexp(x): return math.log1p(-math.exp(x)) if x < -0.6931471805599453 else math.log(-math.expm1(x))
// cl = [a - b for a, b in zip(pc, rc)]; rl = [a - b for a, b in zip(pr, rr)]
// def sig_with(score):
//     return mean([-logsigmoid(beta * (score(c) - score(r))) for c, r in zip(cl, rl)])
// def alpha_score(a):
//     return lambda u: (math.exp(min((a - 1) * u, 80.0)) - 1.0) / (a - 1)
// out = {}
// out["SIGMOID_FORWARD_KL"] = sig_with(lambda u: 1 - math.exp(-u))
// out["SIGMOID_JS"] = sig_with(lambda u: math.log(2) + logsigmoid(u))
// out["SIGMOID_ALPHA_05"] = sig_with(alpha_score(0.5))
// out["SIGMOID_ALPHA_15"] = sig_with(alpha_score(1.5))
// def smooth(d): return -logsigmoid(beta * d) * (1 - ls) - logsigmoid(-beta * d) * ls
// lgr = sorted(a - b for a, b in zip(pc, pr)); rlgr = sorted(a - b for a, b in zip(rc, rr))
// out["AOT"] = mean([smooth(a - b) for a, b in zip(lgr, rlgr)])
// out["AOT_UNPAIRED"] = mean([smooth(a - b) for a, b in zip(sorted(cl), sorted(rl))])
// def disco(d):
//     logits = beta * d; m = sigmoid(logits / 0.05)
//     return -logsigmoid(logits) * (1 - m) + math.exp(-logits) * m
// out["DISCOPOP"] = mean([disco(c - r) for c, r in zip(cl, rl)])
// out["SFT"] = -sum(pc) / sum(lc)
// out["CDPO"] = mean([smooth(c - r) for c, r in zip(cl, rl)])
// def simpo(alpha):
//     res = []
//     for a, b, la, lb in zip(pc, pr, lc, lr):
//         ac, ar = a / la, b / lb
//         if alpha != 0:
//             ac, ar = (1 - math.exp(ac) ** (-alpha)) / alpha, (1 - math.exp(ar) ** (-alpha)) / alpha
//         logits = (ac - ar) - 0.5 / beta
//         res.append(-logsigmoid(beta * logits) * (1 - ls) - logsigmoid(-beta * logits) * ls)
//     return mean(res)
// out["SIMPO"] = simpo(0.0)
// out["SIMPO_ALPHAPO"] = simpo(0.25)
// ratio = []
// for a, b, la, lb in zip(pc, pr, lc, lr):
//     ac, ar = a / la, b / lb
//     log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
//     ratio.append(beta * logsigmoid(log_odds))
// out["ORPO"] = (-sum(pc) / sum(lc)) - mean(ratio)
// kl = max(mean([a - b for a, b in zip(rc, pc)]), 0.0)
// out["KTO_KL"] = kl
// chosen_losses = [1 - sigmoid(beta * (c - kl)) for c in cl]
// rejected_losses = [1 - sigmoid(beta * (kl - r)) for r in rl]
// out["KTO"] = mean([1.0 * x for x in chosen_losses] + [1.33 * x for x in rejected_losses])
// out["APO_ZERO_UNPAIRED"] = mean([1.0 * (1 - sigmoid(beta * c)) for c in cl] + [1.33 * sigmoid(beta * r) for r in rl])
// for k, v in out.items():
//     print(f"pub const GPT2_{k}: f64 = {v!r};")
