//! CPU time of one layer's attention (forward, then backward) in f32 and in bf16 products, on the bench's
//! batch (4 pairs of a 64-token prompt and two 128-token completions, prompt shared) and a preset's heads,
//! on one thread. CPU time of the process's threads (`/proc/self/task/*/schedstat`, which advances by scheduler
//! ticks: each figure is the mean over `RUNS` calls), the best of 5 such means: on a machine others load,
//! close to what a quiet machine's wall clock would say.
//! `cargo run --release -p dpo-engine --example attention_time -- [ARCH] [RUNS]` (defaults gpt2-small 20)

use dpo_engine::kernels::{attention_backward, attention_forward, init_threads, AttnDims, Precision};
use dpo_engine::presets::by_name;
use dpo_engine::rng::Rng;
use dpo_engine::Batch;

/// Nanoseconds all this process's threads have run (the work runs on the pool's thread, not the caller).
fn thread_ns() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0 };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
        .sum()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arch = args.first().cloned().unwrap_or_else(|| "gpt2-small".into());
    let runs: usize = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(20);
    let cfg = by_name(&arch).unwrap_or_else(|| panic!("unknown preset {arch:?}"));
    init_threads(1);
    let dims = AttnDims {
        n_heads: cfg.n_heads,
        n_kv_heads: cfg.n_kv_heads,
        head_dim: cfg.head_dim,
        window: cfg.sliding_window,
    };
    let mut rng = Rng::new(3);
    let mut batch = Batch::default();
    for _ in 0..4 {
        let mut ids = |n: usize| (0..n).map(|_| rng.below(cfg.vocab_size) as u32).collect::<Vec<u32>>();
        let (p, c, r) = (ids(64), ids(128), ids(128));
        batch.push_shared_prefix(&p, &[&c, &r]);
    }
    let n = batch.len();
    let (nh, hd) = (dims.n_heads, dims.head_dim);
    let qkv: Vec<f32> = (0..n * dims.qkv_dim()).map(|_| (rng.uniform() * 2.0 - 1.0) as f32).collect();
    let dout: Vec<f32> = (0..n * nh * hd).map(|_| (rng.uniform() * 2.0 - 1.0) as f32).collect();
    for precision in Precision::ALL {
        let (mut fwd, mut bwd) = (u64::MAX, u64::MAX);
        let (mut out, mut lse, mut dqkv) = (vec![0.0; n * nh * hd], vec![0.0; n * nh], vec![0.0; qkv.len()]);
        for _ in 0..5 {
            let t0 = thread_ns();
            for _ in 0..runs {
                attention_forward(&mut out, &mut lse, &qkv, &dims, &batch.spans, &batch.groups, precision);
            }
            let t1 = thread_ns();
            for _ in 0..runs {
                let (spans, groups) = (&batch.spans, &batch.groups);
                attention_backward(&mut dqkv, &dout, &out, &lse, &qkv, &dims, spans, groups, precision);
            }
            let t2 = thread_ns();
            fwd = fwd.min((t1 - t0) / runs as u64);
            bwd = bwd.min((t2 - t1) / runs as u64);
        }
        println!(
            "{arch} {n} tokens, {precision}: attention forward {:.2} ms, backward {:.2} ms (one layer, one thread)",
            fwd as f64 / 1e6,
            bwd as f64 / 1e6
        );
    }
}
