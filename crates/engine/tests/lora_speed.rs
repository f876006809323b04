//! What a training step through a LoRA adapter on a frozen base costs against a full step, on GPT-2
//! small with a rank-16 adapter on every linear layer. A measurement, not a test (nothing is asserted
//! on time): `cargo test --release -p dpo-engine --test lora_speed -- --ignored --nocapture`
//! (`LORA_SPEED_BATCH`, `LORA_SPEED_SEQ`, `LORA_SPEED_ITERS` change the workload).

use std::time::Instant;

use dpo_engine::presets::{gpt2_small, init_random};
use dpo_engine::rng::Rng;
use dpo_engine::{Activations, Adapter, Batch, Decoder, Grads, LoraTarget, Model, Params, Site};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Median seconds of `iters` runs of `f` after one warm-up run.
fn median_s(iters: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..iters)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

#[test]
#[ignore = "a measurement: run with --ignored --nocapture"]
fn adapter_step_against_full_step() {
    let (batch, seq, iters) = (env("LORA_SPEED_BATCH", 4), env("LORA_SPEED_SEQ", 256), env("LORA_SPEED_ITERS", 3));
    let cfg = gpt2_small();
    let (m, p) = (Decoder::new(cfg.clone()), init_random(&cfg, 0.02, 0));
    let all_linear: Vec<LoraTarget> = Site::ALL
        .iter()
        .map(|&site| {
            let rows = 0..site.dims(&cfg).1;
            LoraTarget { module: format!("{site:?}"), site, rows, r: 16, scale: 2.0 }
        })
        .collect();
    let mut a = Adapter::zeros(&cfg, &vec![all_linear; cfg.n_layers], 0.0);
    a.init_peft(&mut Rng::new(1));
    let mut rng = Rng::new(2);
    let mut b = Batch::default();
    for _ in 0..batch {
        let ids: Vec<u32> = (0..seq).map(|_| rng.below(cfg.vocab_size) as u32).collect();
        b.push_sequence(&ids, 1);
    }
    let dlogp = vec![-1.0 / b.targets.len() as f32; b.targets.len()];
    let mut acts = Activations::default();
    let adapted = Model::new(&p, Some(&a));

    let fwd_base = median_s(iters, || drop(m.logprobs(&p, &b, &mut acts, false).unwrap()));
    let fwd_adapter = median_s(iters, || drop(m.logprobs(adapted, &b, &mut acts, false).unwrap()));
    let mut full = Params::zeros(&cfg);
    let step_full = median_s(iters, || {
        m.logprobs(&p, &b, &mut acts, true).unwrap();
        m.backward_logprobs(&p, &b, &mut acts, &dlogp, &mut full).unwrap();
    });
    let mut grads = a.zeros_like();
    let step_adapter = median_s(iters, || {
        m.logprobs(adapted, &b, &mut acts, true).unwrap();
        m.backward_logprobs(adapted, &b, &mut acts, &dlogp, Grads::Adapter(&mut grads)).unwrap();
    });
    println!(
        "gpt2-small batch {batch} seq {seq}, r 16 on all linears, median of {iters}: forward {fwd_base:.3} s \
         (through the adapter {fwd_adapter:.3} s); forward+backward full {step_full:.3} s, adapter with frozen \
         base {step_adapter:.3} s: {:.2}x cheaper",
        step_full / step_adapter
    );
}
