//! The activation memory of one full-parameter DPO step at the engine level (issue 12's memory target):
//! a random model of a preset shape, pairs of a shared prompt and two completions, the policy's forward
//! keeping activations for backward and its backward into every parameter, then the reference's forward
//! (keeping nothing) on the same buffers' shapes. No optimizer: its state does not depend on precision.
//!
//!     cargo run --release -p dpo-engine --example step_memory -- [ARCH] [PRECISION] [KEEP] [PAIRS] [PROMPT] [COMPLETION]
//!     (defaults: gpt2-small bf16 all 4 64 128; KEEP: all, layer-inputs, or all-f32: a bf16 pass that keeps
//!     its activations in f32, `Activations::keeping_f32`)
//!
//! Prints the activations the engine counts (`Activations::bytes_per_token`) and the peak resident set
//! (Linux `VmHWM`), which also holds the weights and their gradient (8 bytes a parameter) and whatever the
//! products allocate while they run. The DPO loss is a few scalars; its gradient is stood in for by a
//! fixed `dlogp` of the right shape, which costs the same.

use std::time::Instant;

use dpo_engine::kernels::{init_threads, Precision};
use dpo_engine::presets::{by_name, init_random};
use dpo_engine::rng::Rng;
use dpo_engine::{Activations, Batch, Decoder, Keep, Model, Params};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.to_string());
    let arch = arg(0, "gpt2-small");
    let precision: Precision = arg(1, "bf16").parse().expect("PRECISION: f32 or bf16");
    let (keep, keeping_f32) = match arg(2, "all").as_str() {
        "all" => (Keep::All, false),
        "layer-inputs" => (Keep::LayerInputs, false),
        "all-f32" => (Keep::All, true),
        k => panic!("unknown KEEP {k:?}: all, layer-inputs or all-f32"),
    };
    let num = |i: usize, default: &str| arg(i, default).parse::<usize>().expect("PAIRS PROMPT COMPLETION: integers");
    let (pairs, prompt, completion) = (num(3, "4"), num(4, "64"), num(5, "128"));
    let cfg = by_name(&arch).unwrap_or_else(|| panic!("unknown preset {arch:?}"));
    init_threads(0);

    let params = init_random(&cfg, 0.02, 0);
    let decoder = Decoder::new(cfg.clone());
    let mut rng = Rng::new(2);
    let mut ids = |len: usize| -> Vec<u32> { (0..len).map(|_| rng.below(cfg.vocab_size) as u32).collect() };
    let mut batch = Batch::default();
    for _ in 0..pairs {
        let (p, chosen, rejected) = (ids(prompt), ids(completion), ids(completion));
        batch.push_shared_prefix(&p, &[&chosen, &rejected]);
    }

    let t = Instant::now();
    let model = Model::new(&params, None).with_precision(precision);
    let mut acts = if keeping_f32 { Activations::default().keeping_f32() } else { Activations::default() };
    let out = decoder.logprobs(model, &batch, &mut acts, keep).expect("policy forward");
    let dlogp = vec![0.5f32; out.logp.len()];
    let mut grads = Params::zeros(&cfg);
    decoder.backward_logprobs(model, &batch, &mut acts, &dlogp, &mut grads).expect("policy backward");
    let mut reference = Activations::default();
    decoder.logprobs(model, &batch, &mut reference, Keep::None).expect("reference forward");
    let step_s = t.elapsed().as_secs_f64();

    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let n = batch.len() as u64;
    let counted = if keeping_f32 { Precision::F32 } else { precision };
    let kept = n * Activations::bytes_per_token(&cfg, keep, counted);
    let scoring = n * Activations::bytes_per_token(&cfg, Keep::None, precision);
    let weights = 8 * cfg.param_count();
    println!(
        "{arch} {precision} keep={} tokens={n}: activations {:.0} MiB (policy) + {:.0} MiB (reference), weights and \
         gradient {:.0} MiB; step {step_s:.1} s; peak RSS {:.0} MiB",
        arg(2, "all"),
        mib(kept),
        mib(scoring),
        mib(weights),
        peak_rss_mib()
    );
}

/// Peak resident set of this process (Linux `VmHWM`) in MiB; NaN where unavailable.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib =
        status.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok());
    kib.map_or(f64::NAN, |k| k / 1024.0)
}
