//! `dpo demo`: the DPO paper's controlled sentiment experiment (Rafailov et al. 2023, section 6.1,
//! figure 2 left), end to end and offline:
//!
//! ```text
//! 1. world      reviews -> BPE tokenizer -> GPT-2 from scratch -> train_sft           (sft.rs)
//! 2. pairs      held-out prompts -> 4 SFT samples each -> all pairs ranked by VADER   (pairs.rs)
//! 3. methods    DPO (several beta), Preferred-FT, Unlikelihood                        (methods.rs)
//!               reward model, PPO (learned and true reward), Best-of-N               (rlhf_methods.rs)
//! 4. measure    reward and KL(pi||ref) on held-out prompts at points of every run    (evaluate.rs)
//!               implicit reward vs reward model accuracy, DPO gradient weight
//! 5. report     report.md, report.json, frontier.png, gradient_weight.png            (report.rs)
//! ```
//!
//! Every setting is in [`Plan`]; `--quick` and `--model` only pick another plan.

mod evaluate;
mod methods;
mod online_methods;
mod pairs;
mod plan;
mod report;
mod report_online;
mod rlhf_methods;
mod seeds;
mod sft;
mod winrates;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

pub use evaluate::Point;
pub use methods::MethodRun;
pub use plan::{ModelShape, Plan, PpoPlan, Steps, METHODS};
pub use report::Report;

use engine::Decoder;

use crate::world::corpus;
use crate::world::sentiment::Sentiment;
use dpo::scoring::score_pairs;
use evaluate::{Evaluator, World};
use methods::Ctx;
use report::{PairStats, RewardAccuracy};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Train(#[from] dpo::train::TrainError),
    #[error(transparent)]
    Model(#[from] hf::Error),
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("interrupted")]
    Interrupted,
    #[error(transparent)]
    World(#[from] crate::world::WorldError),
    #[error("the plan: {0}")]
    Plan(String),
    #[error("the {run} run wrote no final model")]
    NoFinalModel { run: &'static str },
    #[error("{method}: the loss is not finite at step {step}")]
    NonFinite { method: &'static str, step: u64 },
    #[error("prompt {text:?} encodes to no tokens")]
    EmptyPrompt { text: String },
    #[error("the SFT samples gave no pair with different rewards")]
    NoPairs,
    #[error("{method}: {reason}")]
    Method { method: String, reason: String },
    #[error("report.json: {0}")]
    Json(#[from] serde_json::Error),
}

impl DemoError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        DemoError::Io { path: path.to_path_buf(), source }
    }
}

/// What to run.
#[derive(Clone, Debug, Default)]
pub struct DemoOptions {
    pub output: PathBuf,
    pub quick: bool,
    /// Run on this checkpoint instead of pretraining the built-in model.
    pub model: Option<PathBuf>,
    /// Only these methods (names in [`plan::METHODS`]); empty: all.
    pub methods: Vec<String>,
    /// Plan settings to change (`dpo.lr=1e-4`), applied in order.
    pub set: Vec<String>,
    /// The precision of every pass (the plan's `precision`), before `set` is applied.
    pub precision: Option<engine::kernels::Precision>,
    /// Repeat the experiment with this many seeds (the plan's seed, then the next ones); 0 or 1: once.
    pub seeds: usize,
}

impl DemoOptions {
    pub fn plan(&self) -> Result<Plan, DemoError> {
        let mut plan = match (&self.model, self.quick) {
            (Some(_), q) => Plan::for_model(q),
            (None, true) => Plan::quick(),
            (None, false) => Plan::full(),
        };
        if let Some(p) = self.precision {
            plan.precision = p;
        }
        for s in &self.set {
            plan.set(s).map_err(DemoError::Plan)?;
        }
        plan.restrict(&self.methods).map_err(DemoError::Plan)?;
        Ok(plan)
    }
}

pub(crate) mod jsonl {
    use super::DemoError;
    use std::path::Path;

    /// Writes one JSON value per line (atomically), creating the directory.
    pub fn write(path: &Path, rows: &[serde_json::Value]) -> Result<(), DemoError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| DemoError::io(dir, e))?;
        }
        let mut text = String::new();
        for r in rows {
            text += &r.to_string();
            text.push('\n');
        }
        dpo::io::write_atomic(path, text.as_bytes()).map_err(|e| DemoError::io(path, e))
    }
}

/// Seeds of the experiment's independent random streams, derived from the plan's seed.
fn seed_of(plan: &Plan, stream: u64) -> u64 {
    plan.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ stream
}

/// Runs the whole experiment into `opts.output` and returns (and writes) the report. With `opts.seeds`
/// above 1 the first seed runs there and seed `s` in `OUTPUT/seeds/seed-s`, and the first seed's report
/// gets the summaries of all and the aggregates across them (`seeds.rs`).
pub fn run(opts: &DemoOptions, stop: &AtomicBool, log: &mut dyn FnMut(&str)) -> Result<Report, DemoError> {
    let plan = opts.plan()?;
    if opts.seeds <= 1 {
        return run_seed(opts, plan, &opts.output, stop, log);
    }
    let mut reports = Vec::with_capacity(opts.seeds);
    for k in 0..opts.seeds as u64 {
        let seed = plan.seed.wrapping_add(k);
        let (dir, rel) = if k == 0 {
            (opts.output.clone(), ".".to_string())
        } else {
            let rel = format!("seeds/seed-{seed}");
            (opts.output.join(&rel), rel)
        };
        log(&format!("=== seed {seed} ({} of {}) in {}", k + 1, opts.seeds, dir.display()));
        let report = run_seed(opts, Plan { seed, ..plan.clone() }, &dir, stop, log)?;
        reports.push((rel, report));
    }
    let results: Vec<seeds::SeedResult> = reports.iter().map(|(rel, r)| seeds::summarize(r, rel.clone())).collect();
    let across = seeds::aggregate(&results);
    for o in &across.orderings {
        log(&format!("      {}", o.sentence));
    }
    let mut report = reports.swap_remove(0).1;
    report.seeds = Some(results);
    report.across_seeds = Some(across);
    report.write(&opts.output)?;
    Ok(report)
}

/// One seed's experiment (`plan.seed`) into `out`.
fn run_seed(
    opts: &DemoOptions,
    plan: Plan,
    out: &Path,
    stop: &AtomicBool,
    log: &mut dyn FnMut(&str),
) -> Result<Report, DemoError> {
    let t_all = Instant::now();
    let cpu_all = dpo::io::process_cpu_s();
    let out = out.to_path_buf();
    std::fs::create_dir_all(&out).map_err(|e| DemoError::io(&out, e))?;
    let mut seconds: Vec<(String, f64)> = Vec::new();
    let mut cpu_seconds: Vec<(String, f64)> = Vec::new();
    let mut gaps: Vec<String> = Vec::new();
    let (mut lap, mut cpu_lap) = (Instant::now(), cpu_all);
    // Wall and CPU time (this process, all threads) of each part: on a shared machine the CPU time is the
    // figure that says where the work goes.
    let mut take_lap = |name: &str, seconds: &mut Vec<(String, f64)>| {
        seconds.push((name.to_string(), lap.elapsed().as_secs_f64()));
        let cpu = dpo::io::process_cpu_s();
        cpu_seconds.push((name.to_string(), cpu - cpu_lap));
        lap = Instant::now();
        cpu_lap = cpu;
    };

    // 1. The SFT model: pretrained here, or the given checkpoint.
    let sft_dir = match &opts.model {
        Some(dir) => {
            log(&format!("[1/5] using {} as the SFT and reference model (no pretraining)", dir.display()));
            dir.clone()
        }
        None => {
            log(&format!("[1/5] world and SFT model (plan {})", plan.name));
            sft::pretrain(&plan, &out, stop, log)?
        }
    };
    let model = hf::load_model(&sft_dir)?;
    let tokenizer = hf::load_tokenizer(&sft_dir)?;
    let eos_ids: Vec<u32> = if model.config.eos_token_ids.is_empty() {
        tokenizer.eos_id().into_iter().collect()
    } else {
        model.config.eos_token_ids.clone()
    };
    let bos = if opts.model.is_none() { Some(sft::EOT_ID) } else { None };
    let world = World {
        decoder: Decoder::new(model.config.decoder.clone()),
        reference: model.params.clone(),
        tokenizer,
        sentiment: Sentiment::new(),
        eos_ids,
        bos,
        precision: plan.precision,
    };
    take_lap("SFT model", &mut seconds);

    // 2. Prompts (held out from the pretraining reviews) and pairs.
    let n = plan.train_prompts + plan.heldout_pair_prompts + plan.eval_prompts;
    let texts = corpus::prompts(seed_of(&plan, 1), n);
    let prompts = texts.iter().map(|t| world.encode_prompt(t)).collect::<Result<Vec<_>, _>>()?;
    let (train_prompts, rest) = prompts.split_at(plan.train_prompts);
    let (heldout_prompts, eval_prompts) = rest.split_at(plan.heldout_pair_prompts);
    log(&format!(
        "[2/5] sampling {} x {} completions for training pairs, {} x {} for held-out pairs",
        train_prompts.len(),
        plan.samples_per_prompt,
        heldout_prompts.len(),
        plan.samples_per_prompt
    ));
    let k = plan.samples_per_prompt;
    let train_set =
        pairs::sample_pairs(&world, &model.params, train_prompts, k, plan.max_new_tokens, seed_of(&plan, 2), "train")?;
    let heldout_set = pairs::sample_pairs(
        &world,
        &model.params,
        heldout_prompts,
        k,
        plan.max_new_tokens,
        seed_of(&plan, 3),
        "held-out",
    )?;
    if train_set.pairs.is_empty() || heldout_set.pairs.is_empty() {
        return Err(DemoError::NoPairs);
    }
    let pairs_path = out.join("data").join("pairs.jsonl");
    pairs::write_pairs(&pairs_path, &train_set.pairs)?;
    pairs::write_pairs(&out.join("data").join("heldout_pairs.jsonl"), &heldout_set.pairs)?;
    let train_pairs = train_set.examples();
    let heldout_pairs = heldout_set.examples();
    let pair_stats = PairStats {
        train_pairs: train_pairs.len(),
        heldout_pairs: heldout_pairs.len(),
        ties_skipped: train_set.ties + heldout_set.ties,
        sample_reward: train_set.sample_reward,
    };
    log(&format!(
        "      {} training pairs, {} held-out pairs ({} ties skipped); SFT sample reward {:.3}",
        pair_stats.train_pairs, pair_stats.heldout_pairs, pair_stats.ties_skipped, pair_stats.sample_reward
    ));
    take_lap("pairs", &mut seconds);

    let evaluator = Evaluator::new(
        eval_prompts.to_vec(),
        plan.eval_samples,
        world.sampling(plan.max_new_tokens),
        seed_of(&plan, 4),
    );
    let sft_point = evaluator.evaluate(&world, &model.params, 0)?;
    log(&format!(
        "      SFT model: reward {:.3} ± {:.3}, KL {:.3}",
        sft_point.reward, sft_point.reward_se, sft_point.kl
    ));

    let ctx = Ctx {
        plan: &plan,
        out: &out,
        world: &world,
        evaluator: &evaluator,
        model_cfg: &model.config,
        sft_dir: &sft_dir,
        pairs_path: &pairs_path,
        pairs: &train_pairs,
        stop,
    };
    let mut runs: Vec<MethodRun> = Vec::new();
    let mut reward_accuracy = Vec::new();
    let mut gradient_weight = Vec::new();
    let report_point = |r: &MethodRun, log: &mut dyn FnMut(&str)| {
        let pts: Vec<String> =
            r.points.iter().map(|p| format!("{}: KL {:.2} R {:.3}", p.step, p.kl, p.reward)).collect();
        log(&format!(
            "      {} {}: {} ({:.0}s train, {:.0}s eval)",
            r.method,
            r.setting,
            pts.join("; "),
            r.train_s,
            r.eval_s
        ));
    };

    // 3. Methods. DPO first, then the likelihood baselines, then the RLHF baselines.
    let ref_scores = score_pairs(
        &world.decoder,
        world.view(&model.params),
        &heldout_pairs,
        dpo::data::Packing::SharedPrompt,
        64,
        |_| {},
    )?;
    for &beta in &plan.dpo_betas {
        log(&format!("[3/5] DPO beta={beta}"));
        let (r, params) = methods::dpo(&ctx, beta, log)?;
        report_point(&r, log);
        let acc = methods::implicit_reward_accuracy(&world, &params, &ref_scores, &heldout_pairs)?;
        reward_accuracy.push(RewardAccuracy { scorer: format!("DPO {} implicit reward", r.setting), accuracy: acc });
        gradient_weight
            .push((r.setting.clone(), methods::gradient_weights(&out.join(r.dir.clone().unwrap_or_default()))));
        runs.push(r);
    }
    take_lap("DPO", &mut seconds);
    if plan.preferred_ft.steps > 0 {
        log("[3/5] Preferred-FT");
        let r = methods::preferred_ft(&ctx, log)?;
        report_point(&r, log);
        runs.push(r);
    }
    if plan.unlikelihood.steps > 0 {
        log("[3/5] Unlikelihood");
        let r = methods::unlikelihood(&ctx, log)?;
        report_point(&r, log);
        runs.push(r);
    }
    take_lap("Preferred-FT and Unlikelihood", &mut seconds);

    if opts.model.is_some()
        && opts.methods.is_empty()
        && plan.ppo.kl_coefs_learned.is_empty()
        && plan.ppo.kl_coefs_true.is_empty()
    {
        gaps.push(format!(
            "PPO is not run by plan `{}` (a PPO run on a real checkpoint takes far longer than this demo's budget)",
            plan.name
        ));
    }
    let learned = rlhf_methods::run_all(&ctx, &model.params, &heldout_pairs, &mut runs, &mut reward_accuracy, log)?;
    for r in runs.iter().filter(|r| r.method.starts_with("PPO") || r.method == "Best-of-N") {
        report_point(r, log);
    }
    take_lap("reward model, PPO and Best-of-N", &mut seconds);

    // Online and iterative DPO, labelled by the learned reward model, and the frontier it judges.
    let mut frontier = online_methods::Frontier::new();
    let mut online_vs_offline = Vec::new();
    let mut equal_kl = Vec::new();
    if let Some(rm) = &learned {
        let run_online = |v: &online_methods::Variant, log: &mut dyn FnMut(&str)| {
            let steps = v.steps(&plan);
            let labels = if v.ground_truth { "the ground truth" } else { "the learned reward model" };
            log(&format!(
                "[4/5] {} beta={}, {} steps of {} (labels: {labels})",
                v.method, plan.online.beta, steps.steps, steps.batch
            ));
            let r = online_methods::online_dpo(&ctx, rm, v, train_prompts, log)?;
            report_point(&r, log);
            Ok::<_, DemoError>(r)
        };
        if plan.online.steps.steps > 0 {
            runs.push(run_online(&online_methods::VARIANTS[0], log)?);
        }
        if plan.iterative.rounds > 0 {
            log(&format!("[4/5] iterative DPO, {} rounds (labels: the learned reward model)", plan.iterative.rounds));
            let r = online_methods::iterative_dpo(&ctx, rm, train_prompts, log)?;
            report_point(&r, log);
            runs.push(r);
        }
        take_lap("online and iterative DPO", &mut seconds);
        // The ablations: which of the labels and the budget keeps online DPO from offline DPO's frontier.
        if plan.online.steps.steps > 0 && plan.online.ablations {
            for v in &online_methods::VARIANTS[1..] {
                runs.push(run_online(v, log)?);
            }
        }
        if runs.iter().any(|r| online_methods::is_online(&r.method)) {
            frontier = online_methods::frontier(&ctx, rm, &runs)?;
            equal_kl = online_comparison(&sft_point, &runs, &frontier);
            online_vs_offline = online_methods::equal_kl_sentences(&equal_kl);
            for line in &online_vs_offline {
                log(&format!("      {line}"));
            }
        }
        take_lap("online DPO ablations, learned-RM frontier", &mut seconds);
    }

    // Win rates against the preferred completion of each held-out pair prompt.
    let wr_set = winrates::WinRateSet {
        prompts: heldout_prompts.to_vec(),
        preferred: heldout_set.preferred.iter().map(|(c, _)| c.clone()).collect(),
        samples: plan.win_rate_samples.max(1),
        max_new_tokens: plan.max_new_tokens,
        seed: seed_of(&plan, 5),
    };
    let (win_rate_vs_temperature, win_rate_vs_chosen) =
        win_rates(&plan, &out, &world, &model.params, &wr_set, &runs, learned.as_ref(), log)?;
    let win_rate_verdict = winrates::temperature_verdict(&win_rate_vs_temperature);
    take_lap("win rates", &mut seconds);

    // 4-5. Report.
    let checks = report::checks(&sft_point, &runs);
    let verdict = report::verdict(&runs);
    let sft_model = sft_dir.strip_prefix(&out).unwrap_or(&sft_dir).display().to_string();
    let bf16_kernel = (plan.precision == engine::kernels::Precision::Bf16)
        .then(|| engine::kernels::Bf16Kernel::detect().describe().into());
    let mut report = Report {
        plan,
        bf16_kernel,
        sft_model,
        sft: sft_point,
        pairs: pair_stats,
        runs,
        reward_accuracy,
        gradient_weight,
        win_rate_vs_temperature,
        win_rate_vs_chosen,
        win_rate_verdict,
        frontier,
        online_vs_offline,
        equal_kl,
        checks,
        verdict,
        gaps,
        seconds,
        total_s: 0.0,
        cpu_seconds,
        total_cpu_s: 0.0,
        seeds: None,
        across_seeds: None,
    };
    report.total_s = t_all.elapsed().as_secs_f64();
    report.total_cpu_s = dpo::io::process_cpu_s() - cpu_all;
    log("[5/5] writing report.md, report.json, frontier.png, gradient_weight.png");
    report.write(&out)?;
    Ok(report)
}

/// Each method's representative run: the one whose last point has the highest reward on the evaluation
/// prompts (not the win-rate prompts), as (setting, final weights' directory).
fn representative(runs: &[MethodRun], out: &Path, method: &str) -> Option<(String, PathBuf)> {
    let best = runs
        .iter()
        .filter(|r| r.method == method && r.dir.is_some())
        .filter_map(|r| r.last().map(|p| (r, p.reward)))
        .max_by(|a, b| a.1.total_cmp(&b.1))?
        .0;
    let dir = out.join(best.dir.as_ref()?);
    let last = match method {
        "Iterative DPO" => dpo::train::iterative::round_dir(&dir, best.points.len()).join("run").join("final"),
        _ => dir.join("final"),
    };
    Some((best.setting.clone(), last))
}

/// Online and iterative DPO against offline DPO at equal KL, under the learned reward model (the
/// frontier) and the ground truth (the runs' points).
/// Offline DPO's points include its start, the SFT model at KL 0.
fn online_comparison(
    sft: &Point,
    runs: &[MethodRun],
    frontier: &online_methods::Frontier,
) -> Vec<online_methods::EqualKl> {
    let offline_rm: Vec<&Point> =
        frontier.iter().filter(|(k, _)| k.starts_with("DPO ") || *k == "SFT").flat_map(|(_, v)| v.iter()).collect();
    let names = online_methods::online_method_names();
    let online_rm: Vec<(&str, &[Point])> =
        names.iter().filter_map(|m| frontier.get(*m).map(|v| (*m, &v[..]))).collect();
    let offline_gt: Vec<&Point> =
        runs.iter().filter(|r| r.method == "DPO").flat_map(|r| r.points.iter()).chain([sft]).collect();
    let online_gt: Vec<(&str, &[Point])> = runs
        .iter()
        .filter(|r| online_methods::is_online(&r.method))
        .map(|r| (r.method.as_str(), &r.points[..]))
        .collect();
    let mut rows = online_methods::equal_kl("learned reward model", &online_rm, &offline_rm);
    rows.extend(online_methods::equal_kl("ground truth", &online_gt, &offline_gt));
    rows
}

/// The win rates of the methods that ran: DPO, PPO, Preferred-FT and SFT against the temperature, and
/// every method (with Best-of-N's largest N under the learned reward model) at temperature 1.
#[allow(clippy::too_many_arguments)]
fn win_rates(
    plan: &Plan,
    out: &Path,
    world: &World,
    sft: &engine::Params,
    set: &winrates::WinRateSet,
    runs: &[MethodRun],
    learned: Option<&rlhf_methods::LearnedRm>,
    log: &mut dyn FnMut(&str),
) -> Result<(winrates::VsTemperature, winrates::VsChosen), DemoError> {
    let mut vs_t = winrates::VsTemperature::new();
    let mut vs_c = winrates::VsChosen::new();
    let temps = &plan.win_rate_temperatures;
    if temps.is_empty() {
        return Ok((vs_t, vs_c));
    }
    log(&format!("[5/5] win rates against the preferred completions, temperatures {temps:?}"));
    let mut policies: Vec<(String, String, engine::Params)> = vec![("SFT".into(), "reference".into(), sft.clone())];
    for method in ["DPO", "PPO", "PPO-GT", "Preferred-FT", "Unlikelihood", "Online DPO", "Iterative DPO"] {
        if let Some((setting, dir)) = representative(runs, out, method) {
            policies.push((method.into(), setting, hf::load_model(&dir)?.params));
        }
    }
    for (method, setting, params) in &policies {
        let curve = if ["SFT", "DPO", "PPO", "Preferred-FT"].contains(&method.as_str()) {
            let c = set.curve(world, params, temps)?;
            let text: Vec<String> = c.iter().map(|p| format!("T={} {:.3}", p.temperature, p.rate.win_rate)).collect();
            log(&format!("      {method} {setting}: {}", text.join(", ")));
            vs_t.insert(method.clone(), c.clone());
            c
        } else {
            Vec::new()
        };
        let rate = match curve.iter().find(|p| p.temperature == 1.0) {
            Some(p) => p.rate,
            None => set.at_temperature(world, params, 1.0)?,
        };
        vs_c.insert(method.clone(), winrates::MethodWinRate { setting: setting.clone(), rate });
    }
    if let (Some(rm), Some(&n)) = (learned, plan.bon_ns.iter().max()) {
        let kept = rm.best_of_n(world, sft, &set.prompts, n, &world.sampling(set.max_new_tokens), set.seed ^ 0xB0B0)?;
        let items: Vec<(usize, &[u32])> = kept.iter().enumerate().map(|(p, c)| (p, &c[..])).collect();
        let rate = set.judge(world, &items)?;
        log(&format!("      Best-of-{n} (learned reward model): {:.3}", rate.win_rate));
        vs_c.insert(format!("Best-of-{n}"), winrates::MethodWinRate { setting: format!("N={n}"), rate });
    }
    Ok((vs_t, vs_c))
}
