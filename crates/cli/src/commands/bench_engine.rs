//! `dpo bench-engine`: tokens/s of forward and forward+backward on a model shape with random weights,
//! next-token log-probs of every position through the fused head (the workload of
//! `shared/tools/torch_engine_bench.py`).

use std::time::Instant;

use anyhow::bail;
use engine::kernels::Bf16Kernel;
use engine::model::Model;
use engine::{presets, Activations, Batch, Decoder};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model shape: gpt2-small or smollm2-135m.
    #[arg(long, default_value = "gpt2-small")]
    arch: String,
    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Timed iterations (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 4)]
    iters: usize,
    #[command(flatten)]
    precision: super::precision::PrecisionFlag,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let Some(cfg) = presets::by_name(&a.arch) else {
        bail!("unknown --arch {:?}; use gpt2-small or smollm2-135m", a.arch);
    };
    if a.seq < 2 || a.batch == 0 {
        bail!("--seq must be at least 2 and --batch at least 1");
    }
    let params = presets::init_random(&cfg, 0.02, 0);
    let precision = a.precision.get();
    let view = Model::new(&params, None).with_precision(precision);
    let model = Decoder::new(cfg.clone());
    let mut rng = engine::rng::Rng::new(1);
    let mut batch = Batch::default();
    for _ in 0..a.batch {
        let ids: Vec<u32> = (0..a.seq).map(|_| rng.below(cfg.vocab_size) as u32).collect();
        batch.push_sequence(&ids, 1);
    }
    let mut acts = Activations::default();
    let mut grads = engine::Params::zeros(&cfg);
    let dlogp = vec![-1.0 / batch.targets.len() as f32; batch.targets.len()];

    let mut fwd = Vec::new();
    let mut fwd_bwd = Vec::new();
    for i in 0..=a.iters {
        let t = Instant::now();
        model.logprobs(view, &batch, &mut acts, false)?;
        let f = t.elapsed().as_secs_f64();
        let t = Instant::now();
        model.logprobs(view, &batch, &mut acts, true)?;
        model.backward_logprobs(view, &batch, &mut acts, &dlogp, &mut grads)?;
        let fb = t.elapsed().as_secs_f64();
        if i > 0 {
            fwd.push(f);
            fwd_bwd.push(fb);
        }
    }
    let tokens = (a.batch * a.seq) as f64;
    let flops = presets::forward_flops(&cfg, a.batch * a.seq, (a.seq as f64 + 1.0) / 2.0, batch.targets.len());
    let (f, fb) = (median(&mut fwd), median(&mut fwd_bwd));
    let line = serde_json::json!({
        "arch": a.arch,
        "batch": a.batch,
        "seq": a.seq,
        "threads": engine::kernels::num_threads(),
        "precision": precision.name(),
        "bf16_kernel": Bf16Kernel::detect().describe(),
        "fwd_tokens_per_s": round1(tokens / f),
        "fwd_bwd_tokens_per_s": round1(tokens / fb),
        "fwd_gflops": round1(flops / f / 1e9),
        "fwd_bwd_gflops": round1(3.0 * flops / fb / 1e9),
        "median_fwd_s": f,
        "median_fwd_bwd_s": fb,
    });
    println!("{line}");
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}
