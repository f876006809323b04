//! `dpo bench`: DPO training throughput and peak memory of the real trainer (AdamW, sigmoid loss, a
//! reference model or precomputed reference log-probs) on a model shape with random weights and synthetic
//! rows of fixed lengths. Arguments match `shared/tools/trl_bench.py`, so the two run back to back.

use std::sync::Arc;
use std::time::Instant;

use anyhow::bail;
use dpo::data::{Example, Packing};
use dpo::objectives::{LossConfig, LossType};
use dpo::scoring::score_pairs;
use dpo::train::checkpoint::TrainerState;
use dpo::train::memory::{self, AdapterPlan, MemoryPlan};
use dpo::train::reference::{freeze_tables, pair_tokens, ReferenceModel};
use dpo::train::{PairObjective, PairWorkload, Reference, TrainConfig, Trained, Trainer, Workload};
use engine::kernels::{Bf16Kernel, Precision};
use engine::model::Model;
use engine::optim::{Optimizer, ScheduleKind};
use engine::quant::{FrozenLinears, Storage};
use engine::rng::Rng;
use engine::ParamSet;
use engine::{presets, Adapter, Decoder, DecoderConfig, Keep};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model shape: gpt2 (GPT-2 small, 124M, vocabulary 50257), llama (SmolLM2-135M shape), smollm2-360m,
    /// smollm2-1.7b or llama3-8b.
    #[arg(long, default_value = "gpt2")]
    arch: String,
    /// Preference pairs per optimizer step.
    #[arg(long, default_value_t = 4)]
    pairs: usize,
    /// Prompt tokens per row.
    #[arg(long, default_value_t = 64)]
    prompt: usize,
    /// Tokens of each completion (chosen and rejected), EOS included.
    #[arg(long, default_value_t = 128)]
    completion: usize,
    /// Optimizer steps; the first is a warm-up and not counted in the median.
    #[arg(long, default_value_t = 6)]
    steps: usize,
    /// Score the reference once before training and hold no reference model while training
    /// (trl_bench.py's --precompute).
    #[arg(long, alias = "precompute")]
    precompute_ref: bool,
    /// Pairs pushed through forward and backward at once (0: all pairs of the step), as `dpo train
    /// --micro-pairs`: less activation memory for the same step.
    #[arg(long, default_value_t = 0)]
    micro_pairs: usize,
    /// Keep only each layer's input and recompute the layer in backward, as `dpo train
    /// --gradient-checkpointing`: about one extra forward per step for the activation memory of one layer.
    #[arg(long)]
    gradient_checkpointing: bool,

    /// Compute the prompt twice, once per completion, as TRL does (to measure what prefix sharing saves).
    #[arg(long)]
    no_prefix_sharing: bool,
    /// Train a LoRA adapter of rank R on every linear layer (alpha 2R, no dropout: trl_bench.py's --lora R)
    /// on the frozen model; the reference is the model with the adapter off.
    #[arg(long, value_name = "R")]
    lora_r: Option<usize>,
    /// Store the frozen base's block linears in 4-bit NF4 (QLoRA; bitsandbytes' code book, blocks of 64,
    /// dequantised on the fly): with --lora-r only.
    #[arg(long, value_parser = ["nf4"])]
    quantize: Option<String>,
    /// With --quantize nf4: quantise the absmax scales too (bitsandbytes' double quantisation).
    #[arg(long)]
    double_quant: bool,
    /// Store the frozen base's block linears in bf16 (with --lora-r; f32 by default, bf16 with --precision
    /// bf16, as `dpo train` holds a LoRA base).
    #[arg(long, value_parser = ["f32", "bf16"])]
    base_dtype: Option<String>,
    #[command(flatten)]
    precision: super::precision::PrecisionFlag,
}

/// The shape as an HF configuration (model type, naming), so that PEFT's target rules resolve on it.
fn hf_config(cfg: &DecoderConfig) -> anyhow::Result<hf::ModelConfig> {
    let json = if matches!(cfg.positions, engine::PositionKind::Learned) {
        serde_json::json!({"model_type": "gpt2", "vocab_size": cfg.vocab_size, "n_embd": cfg.hidden,
            "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_positions": cfg.max_positions})
    } else {
        serde_json::json!({"model_type": "llama", "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden,
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads, "intermediate_size": cfg.ffn_hidden,
            "max_position_embeddings": cfg.max_positions, "tie_word_embeddings": cfg.tied_embeddings})
    };
    let mut m = hf::config_from_json(json, std::path::Path::new("<bench shape>"))?;
    m.decoder = cfg.clone();
    Ok(m)
}

/// A LoRA adapter of rank `r` (alpha 2r) on every linear layer, initialised as PEFT does.
fn all_linear_adapter(cfg: &DecoderConfig, r: usize) -> anyhow::Result<Adapter> {
    let model = hf_config(cfg)?;
    let config = hf::peft::fresh_config(r, 2.0 * r as f64, 0.0, false, &["all-linear".to_string()], &model)?;
    let targets = hf::peft::resolve_targets(&config, &model)?;
    let mut adapter = Adapter::zeros(cfg, &targets, 0.0);
    adapter.init_peft(&mut Rng::new(2));
    Ok(adapter)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let Some(cfg) = presets::by_name(&a.arch) else {
        bail!(
            "unknown --arch {:?}; use gpt2 (GPT-2 small), llama (SmolLM2-135M shape), smollm2-360m, smollm2-1.7b or \
             llama3-8b",
            a.arch
        );
    };
    let precision = a.precision.get();
    let storage = match (a.quantize.as_deref(), a.base_dtype.as_deref()) {
        (Some(_), Some("bf16")) => bail!("--quantize nf4 and --base-dtype bf16 both store the base; pick one"),
        (Some(_), _) => Storage::Nf4 { double_quant: a.double_quant },
        (None, Some("bf16")) => Storage::Bf16,
        (None, Some(_)) => Storage::F32,
        // A bf16 pass rounds a LoRA base's weights to bf16 anyway (`dpo train`'s default then).
        (None, None) if a.lora_r.is_some() && precision == Precision::Bf16 => Storage::Bf16,
        (None, None) => Storage::F32,
    };
    if storage != Storage::F32 && a.lora_r.is_none() {
        bail!("--quantize and --base-dtype store a frozen base: they need --lora-r (the trained part stays f32)");
    }
    if a.double_quant && a.quantize.is_none() {
        bail!("--double-quant applies to --quantize nf4");
    }
    if a.lora_r == Some(0) {
        bail!("--lora-r must be at least 1");
    }
    if a.pairs == 0 || a.steps < 2 || a.completion < 1 || a.prompt < 1 {
        bail!("--pairs, --prompt and --completion must be at least 1, --steps at least 2");
    }
    let t_setup = Instant::now();
    // Synthetic rows as trl_bench.py makes them: random ids, completions ending with EOS (id 0).
    let mut rng = Rng::new(1);
    let mut ids = |k: usize| (0..k).map(|_| 2 + rng.below(cfg.vocab_size - 2) as u32).collect::<Vec<u32>>();
    let examples: Vec<Example> = (0..a.pairs * a.steps)
        .map(|i| {
            let mut c = ids(a.completion - 1);
            c.push(0);
            let mut r = ids(a.completion - 1);
            r.push(0);
            Example::new(format!("row {}", i + 1), ids(a.prompt), c, r)
        })
        .collect();
    let decoder = Decoder::new(cfg.clone());
    // A stored base is drawn tensor by tensor: its block linears never exist whole in f32.
    // As `dpo train` holds a bf16 LoRA run's base: the embedding's rows of the data's tokens, the head in bf16.
    let tables_of = (a.lora_r.is_some() && precision == Precision::Bf16).then(|| pair_tokens(examples.iter()));
    let (params, frozen, embedding) = match (storage, &tables_of) {
        (Storage::F32, None) => (presets::init_random(&cfg, 0.02, 0), None, None),
        (Storage::F32, Some(tokens)) => {
            let mut p = presets::init_random(&cfg, 0.02, 0);
            let e = freeze_tables(&mut p, &cfg, tokens)?;
            (p, None, Some(e))
        }
        (s, tokens) => {
            let (p, f, e) = FrozenLinears::init_random_with_tables(&cfg, 0.02, 0, s, tokens.as_ref())?;
            (p, Some(f), e)
        }
    };
    // The stored linears and tables, and the rest of the model (norms, and the tables of an f32 run) in f32.
    let stored_bytes = frozen.as_ref().map(|f| f.bytes()).unwrap_or(0) + embedding.as_ref().map_or(0, |e| e.bytes());
    let base_bytes = (stored_bytes > 0).then(|| (stored_bytes + 4 * ParamSet::numel(&params)) as u64);
    let mut base = Model::new(&params, None).with_precision(precision);
    if let Some(f) = &frozen {
        base = base.with_frozen(f);
    }
    if let Some(e) = &embedding {
        base = base.with_embedding(e);
    }
    let packing = if a.no_prefix_sharing { Packing::Separate } else { Packing::SharedPrompt };
    let adapter = a.lora_r.map(|r| all_linear_adapter(&cfg, r)).transpose()?;
    let reference = match (a.precompute_ref, &adapter) {
        // A new adapter's reference is the base with the adapter off (TRL's with a PEFT model).
        (true, Some(_)) => Reference::Cached(score_pairs(&decoder, base, &examples, packing, a.pairs, |_| {})?),
        (false, Some(_)) => Reference::PolicyBase(None),
        (true, None) => {
            let r = presets::init_random(&cfg, 0.02, 1);
            let r = Model::new(&r, None).with_precision(precision);
            Reference::Cached(score_pairs(&decoder, r, &examples, packing, a.pairs, |_| {})?)
        }
        (false, None) => {
            let mut r = ReferenceModel::new(Decoder::new(cfg.clone()), presets::init_random(&cfg, 0.02, 1), precision)?;
            // As `dpo train` holds it: in bf16, the embeddings of the rows' tokens alone.
            r.keep_lookups_of(&pair_tokens(examples.iter()))?;
            Reference::Model(Arc::new(r))
        }
    };
    let objective = PairObjective { losses: vec![(LossType::Sigmoid, 1.0)], cfg: LossConfig::default() };
    let workload = PairWorkload {
        examples: &examples,
        reference: &reference,
        objective: &objective,
        packing,
        micro_pairs: a.micro_pairs,
    };
    // The trainer's own step: rows in file order, one micro-batch of `pairs` per step, AdamW at a
    // constant 1e-6, the global norm clipped to 1.
    let train_cfg = TrainConfig {
        batch_size: a.pairs,
        no_shuffle: true,
        max_steps: Some(a.steps as u64),
        scheduler: ScheduleKind::Constant,
        gradient_checkpointing: a.gradient_checkpointing,
        precision,
        ..Default::default()
    };
    let (trained, base) = match adapter {
        Some(adapter) => (Trained::Adapter(adapter), Some(base)),
        None => (Trained::Full(params), None),
    };
    let optimizer = Optimizer::new(train_cfg.optimizer_config(), &trained);
    let state = TrainerState { step: 0, epoch: 0, cursor: 0, num_tokens: 0, skipped_steps: 0 };
    let mut trainer = Trainer::new(&train_cfg, decoder, trained, base, optimizer, state, workload.rows())?;
    let setup_s = t_setup.elapsed().as_secs_f64();
    let lookups = Some(pair_tokens(examples.iter()).len() as u64).filter(|_| precision == Precision::Bf16);
    let estimate = estimated_peak(&cfg, &a, trainer.trained.adapter(), base_bytes, lookups, &train_cfg);

    let mut times = Vec::new();
    // Data parallelism (`mpirun -np N dpo bench`): seconds and bytes of each step's gradient sum.
    let mut comm = Vec::new();
    // CPU seconds of this process per step (all its threads): the work, whatever else the machine runs.
    let mut cpu = Vec::new();
    for step in 0..a.steps {
        let (c0, u0) = (dpo::dist::comm_stats(), dpo::io::process_cpu_s());
        let out = trainer.step(&workload)?;
        let (c1, u1) = (dpo::dist::comm_stats(), dpo::io::process_cpu_s());
        let (s, update) = (out.secs, out.update_secs);
        eprintln!("step {}/{}: {s:.3} s (clip + AdamW + zeroing {update:.3} s)", step + 1, a.steps);
        if step > 0 {
            times.push(s);
            comm.push((c1.sum_s - c0.sum_s, c1.wait_s - c0.wait_s, c1.bytes - c0.bytes));
            cpu.push(u1 - u0);
        }
    }
    times.sort_by(|x, y| x.total_cmp(y));
    let med = times[times.len() / 2];
    comm.sort_by(|x, y| x.0.total_cmp(&y.0));
    let (comm_s, wait_s, comm_bytes) = comm.get(comm.len() / 2).copied().unwrap_or_default();
    cpu.sort_by(|x, y| x.total_cmp(y));
    let cpu_s = cpu.get(cpu.len() / 2).copied().unwrap_or_default();
    let tokens = (a.pairs * 2 * (a.prompt + a.completion)) as f64;
    let gflop = step_flops(&cfg, &a) / 1e9;
    let line = serde_json::json!({
        "tool": "dpo",
        "arch": a.arch,
        "threads": engine::kernels::num_threads(),
        "ranks": dpo::dist::world().size(),
        "comm_s_per_step": (comm_s * 1e4).round() / 1e4,
        "comm_wait_s_per_step": (wait_s * 1e4).round() / 1e4,
        "comm_bytes_per_step_per_rank": comm_bytes,
        "pairs_per_step": a.pairs,
        "prompt": a.prompt,
        "completion": a.completion,
        "precompute_ref": a.precompute_ref,
        "prefix_sharing": !a.no_prefix_sharing,
        "micro_pairs": a.micro_pairs,
        "lora_r": a.lora_r,
        "base_storage": format!("{storage:?}"),
        "precision": precision.name(),
        "bf16_kernel": Bf16Kernel::detect().describe(),
        "gradient_checkpointing": a.gradient_checkpointing,
        "median_step_s": (med * 1000.0).round() / 1000.0,
        "median_step_cpu_s": (cpu_s * 1000.0).round() / 1000.0,
        "pairs_per_s": ((a.pairs as f64 / med) * 1000.0).round() / 1000.0,
        "tokens_per_s": (tokens / med * 10.0).round() / 10.0,
        "step_gflop": gflop.round(),
        "gflop_per_s": (gflop / med * 10.0).round() / 10.0,
        "setup_s": (setup_s * 10.0).round() / 10.0,
        "peak_rss_mb": peak_rss_mb(),
        "estimated_peak_mb": estimate >> 20,
    });
    println!("{line}");
    Ok(())
}

/// Model FLOPs of one optimizer step (the standard count: a backward costs twice its forward): the policy's
/// forward and backward on every row, and the reference model's forward unless it was precomputed. The
/// head's recomputation of the logits in the backward is real work but not counted, nor is gradient
/// checkpointing's second forward of the blocks (the same step costs more time, not more model FLOPs).
fn step_flops(cfg: &engine::DecoderConfig, a: &Args) -> f64 {
    let (p, c) = (a.prompt as f64, a.completion as f64);
    let (rows, targets) = if a.no_prefix_sharing {
        (vec![(p + c, (p + c + 1.0) / 2.0); 2], 2 * a.completion)
    } else {
        // Prompt tokens see the prompt so far; completion tokens see the prompt and their own completion.
        let keys = p * (p + 1.0) / 2.0 + 2.0 * (c * p + c * (c + 1.0) / 2.0);
        (vec![(p + 2.0 * c, keys / (p + 2.0 * c))], 2 * a.completion)
    };
    let forward: f64 = rows.iter().map(|&(n, keys)| presets::forward_flops(cfg, n as usize, keys, 0)).sum::<f64>()
        + presets::forward_flops(cfg, 0, 0.0, targets);
    // Forward, backward (twice a forward; input gradients only, half of it, on a frozen base with an
    // adapter), and the reference's forward unless precomputed.
    let backward = if a.lora_r.is_some() { 1.0 } else { 2.0 };
    let passes = 1.0 + backward + if a.precompute_ref { 0.0 } else { 1.0 };
    passes * forward * a.pairs as f64
}

/// The trainer's own estimate of this run's peak memory (`dpo train`'s, before it loads anything).
fn estimated_peak(
    cfg: &DecoderConfig,
    a: &Args,
    adapter: Option<&Adapter>,
    base_bytes: Option<u64>,
    reference_lookups: Option<u64>,
    train: &TrainConfig,
) -> u64 {
    let opt = train.optimizer_config();
    let row = if a.no_prefix_sharing { 2 * (a.prompt + a.completion) } else { a.prompt + 2 * a.completion };
    let keep = Keep::for_backward(a.gradient_checkpointing);
    let adapter = adapter.map(|ad| AdapterPlan {
        params: ad.numel() as u64,
        kept_per_token: Decoder::new(cfg.clone()).adapter_activation_floats_per_token(ad, keep),
        base_bytes,
        ..AdapterPlan::default()
    });
    let in_flight = if a.micro_pairs > 0 { a.micro_pairs.min(a.pairs) } else { a.pairs };
    let plan = MemoryPlan {
        policy: cfg,
        optimizer: &opt,
        reference: (!a.precompute_ref).then_some(cfg),
        reference_lookups,
        reference_on_policy_buffers: true,
        row_tokens: vec![row as u64; a.pairs],
        batch_size: in_flight,
        gradient_checkpointing: a.gradient_checkpointing,
        adapter,
        precision: train.precision,
        hands_back: engine::pages::hands_back_pages() && in_flight == a.pairs,
    };
    memory::estimate(&plan).total()
}

/// Peak resident set size of this process (Linux `VmHWM`), in MiB; 0 where unavailable.
fn peak_rss_mb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}
