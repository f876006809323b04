//! One QLoRA DPO step at the engine level, for the memory target of issue 11: a random base of a preset
//! shape whose block linears are stored as they are drawn (NF4 by default), a rank-r adapter on every
//! linear, gradient checkpointing, and one pair: the policy's forward (keeping only layer inputs) and
//! backward into the adapter, the reference (the adapter off) forward, and an AdamW update of the adapter.
//!
//!     cargo run --release -p dpo-engine --example qlora_step -- [ARCH] [STORAGE] [PROMPT] [COMPLETION] [R]
//!     (defaults: smollm2-1.7b nf4 128 384 16; STORAGE: nf4, nf4-dq, bf16, f32)
//!
//! Prints the base's stored size, the seconds of setup and of the step, and the peak resident set
//! (Linux `VmHWM`). The DPO loss itself is a few scalars; its gradient is stood in for by a fixed
//! `dlogp` of the right shape, which costs the same.

use std::time::Instant;

use dpo_engine::kernels::init_threads;
use dpo_engine::model::Model;
use dpo_engine::optim::{Optimizer, OptimizerConfig};
use dpo_engine::presets::{by_name, init_random};
use dpo_engine::quant::{FrozenLinears, Storage};
use dpo_engine::rng::Rng;
use dpo_engine::{Activations, Adapter, Batch, Decoder, Keep, LoraTarget, Site};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.to_string());
    let arch = arg(0, "smollm2-1.7b");
    let storage = match arg(1, "nf4").as_str() {
        "nf4" => Storage::Nf4 { double_quant: false },
        "nf4-dq" => Storage::Nf4 { double_quant: true },
        "bf16" => Storage::Bf16,
        "f32" => Storage::F32,
        s => panic!("unknown storage {s:?}: nf4, nf4-dq, bf16 or f32"),
    };
    let num = |i: usize, default: &str| arg(i, default).parse::<usize>().expect("PROMPT COMPLETION R: integers");
    let (prompt, completion, r) = (num(2, "128"), num(3, "384"), num(4, "16"));
    let cfg = by_name(&arch).unwrap_or_else(|| panic!("unknown preset {arch:?}"));
    init_threads(0);

    let t0 = Instant::now();
    let (base, frozen) = if storage == Storage::F32 {
        (init_random(&cfg, 0.02, 0), None)
    } else {
        let (p, f) = FrozenLinears::init_random(&cfg, 0.02, 0, storage).expect("a finite random base");
        (p, Some(f))
    };
    // PEFT's "all-linear": every fused weight, whole (one pair per site: the same rank-r shapes per row).
    let targets: Vec<Vec<LoraTarget>> = (0..cfg.n_layers)
        .map(|_| {
            Site::ALL
                .iter()
                .map(|&site| LoraTarget {
                    module: format!("{site:?}"),
                    site,
                    rows: 0..site.dims(&cfg).1,
                    r,
                    scale: 2.0,
                })
                .collect()
        })
        .collect();
    let mut adapter = Adapter::zeros(&cfg, &targets, 0.0);
    adapter.init_peft(&mut Rng::new(1));
    let mut optimizer = Optimizer::new(OptimizerConfig::adamw(), &adapter);
    let decoder = Decoder::new(cfg.clone());
    // One pair without prompt sharing: chosen and rejected, prompt + completion each, targets on completions.
    let mut rng = Rng::new(2);
    let mut batch = Batch::default();
    for _ in 0..2 {
        let ids: Vec<u32> = (0..prompt + completion).map(|_| rng.below(cfg.vocab_size) as u32).collect();
        batch.push_sequence(&ids, prompt);
    }
    let setup_s = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    let policy = Model::new(&base, Some(&adapter));
    let policy = frozen.as_ref().map_or(policy, |f| policy.with_frozen(f));
    let mut acts = Activations::default();
    let out = decoder.logprobs(policy, &batch, &mut acts, Keep::LayerInputs).expect("policy forward");
    let dlogp = vec![0.5f32; out.logp.len()];
    let mut grads = adapter.zeros_like();
    decoder.backward_logprobs(policy, &batch, &mut acts, &dlogp, &mut grads).expect("adapter backward");
    let reference = Model::new(&base, None);
    let reference = frozen.as_ref().map_or(reference, |f| reference.with_frozen(f));
    decoder.logprobs(reference, &batch, &mut acts, Keep::None).expect("reference forward");
    optimizer.step(&mut adapter, &grads, 1e-4);
    let step_s = t1.elapsed().as_secs_f64();

    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    let linears = frozen.as_ref().map_or(0, FrozenLinears::bytes);
    let rest: usize = dpo_engine::ParamSet::named(&base).iter().map(|(_, t)| 4 * t.data.len()).sum();
    println!(
        "{arch} {storage:?} r={r} tokens={}: linears {:.2} GiB + f32 rest {:.2} GiB; setup {setup_s:.1} s, step {step_s:.1} s; peak RSS {:.2} GiB",
        batch.len(),
        gib(linears),
        gib(rest),
        peak_rss_gib()
    );
}

/// Peak resident set of this process (Linux `VmHWM`) in GiB; NaN where unavailable.
fn peak_rss_gib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib =
        status.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok());
    kib.map_or(f64::NAN, |k| k / (1u64 << 20) as f64)
}
