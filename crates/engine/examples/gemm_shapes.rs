//! GFLOP/s of the engine's matmul, in f32 and in bf16, on the GEMM shapes of a GPT-2-small and a
//! SmolLM2-135M/360M training step (forward, input gradient, weight gradient), to compare with the `gemm`
//! crate's peak, with PyTorch, and with the f32 FMA peak it prints first (measured in the same run: the VM's
//! clock moves by 10% between minutes). Prints the CPU and the kernel bf16 products run on (`DPO_GEMM=avx512_bf16`
//! or `portable` forces a slower one). Beside the wall-clock rate, the rate per core of CPU time the
//! process's threads got (Linux's `/proc/self/task/*/schedstat`): on a machine others load, that one is
//! close to the quiet machine's wall-clock rate, as long as the cores are not oversubscribed to the point
//! of thrashing the caches.
//! `cargo run --release -p dpo-engine --example gemm_shapes [label filter]`

use std::time::Instant;

use dpo_engine::kernels::{cpu_model, init_threads, matmul, Accumulate, Bf16Kernel, Precision};

/// Nanoseconds of CPU time all this process's threads have run (0 where `/proc` does not say).
fn cpu_ns() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0 };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
        .sum()
}

/// GFLOP/s of independent 512-bit FMAs on `threads` threads at once, no memory operands: the f32 ceiling
/// the kernel's rates are a share of (the clock under a full AVX-512 load included). `None` without AVX-512F.
fn fma_peak(threads: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        /// Multiply-adds of 12 chains (two FMA units of 4-cycle latency need at least 8 in flight).
        #[target_feature(enable = "avx512f")]
        unsafe fn chains(iters: usize) -> f32 {
            let (b, c) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
            let mut acc = [_mm512_set1_ps(1.0); 12];
            for _ in 0..iters {
                for x in acc.iter_mut() {
                    *x = _mm512_fmadd_ps(*x, b, c);
                }
            }
            acc.iter().map(|&x| _mm512_reduce_add_ps(x)).sum()
        }
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return None;
        }
        let iters = 40_000_000;
        let t = Instant::now();
        let sum: f32 = std::thread::scope(|s| {
            // SAFETY: AVX-512F was detected above.
            let runs: Vec<_> = (0..threads).map(|_| s.spawn(move || unsafe { chains(iters) })).collect();
            runs.into_iter().map(|r| r.join().unwrap_or(0.0)).sum()
        });
        let flop = (threads * iters * 12 * 16 * 2) as f64;
        std::hint::black_box(sum);
        Some(flop / t.elapsed().as_secs_f64() / 1e9)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = threads;
        None
    }
}

fn main() {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    init_threads(threads);
    let filter = std::env::args().nth(1).unwrap_or_default();
    println!("CPU: {} ({threads} threads); bf16 kernel: {}", cpu_model(), Bf16Kernel::detect().describe());
    if let Some(peak) = fma_peak(threads) {
        println!("f32 FMA peak: {peak:.1} GFLOP/s (independent 512-bit FMAs on {threads} threads, no loads)");
    }
    let n = 1024;
    // (label, m, n, k, a_t, b_t)
    let shapes = [
        ("fwd  x W^T  [1024x768]x[768x3072]", n, 3072, 768, false, true),
        ("bwd  dy W   [1024x3072]x[3072x768]", n, 768, 3072, false, false),
        ("bwd  dy^T x [3072x1024]x[1024x768]", 3072, 768, n, true, false),
        // The LM head by vocabulary blocks (`kernels::head`: 1024 targets by 4096 columns): logits, the forward's
        // E_p[W], the weight gradient's block.
        ("head h W^T  [1024x768]x[768x4096]", n, 4096, 768, false, true),
        ("head E_p[W] [1024x4096]x[4096x768]", n, 768, 4096, false, false),
        ("head dW     [4096x1024]x[1024x768]", 4096, 768, n, true, false),
        // SmolLM2-135M: hidden 576, fused q/k/v 960, fused gate/up 3072, MLP 1536; 1280 tokens (4 DPO pairs)
        ("smol qkv    [1280x576]x[576x960]", 1280, 960, 576, false, true),
        ("smol gate/up[1280x576]x[576x3072]", 1280, 3072, 576, false, true),
        ("smol down   [1280x1536]x[1536x576]", 1280, 576, 1536, false, true),
        ("smol dW up  [3072x1280]x[1280x576]", 3072, 576, 1280, true, false),
        ("smol head   [1024x576]x[576x4096]", n, 4096, 576, false, true),
        // SmolLM2-360M: hidden 960, fused q/k/v 1600 (15 + 5 + 5 heads of 64), fused gate/up 5120, MLP 2560
        ("360m qkv    [1280x960]x[960x1600]", 1280, 1600, 960, false, true),
        ("360m gate/up[1280x960]x[960x5120]", 1280, 5120, 960, false, true),
        ("360m down   [1280x2560]x[2560x960]", 1280, 960, 2560, false, true),
        ("360m dx up  [1280x5120]x[5120x960]", 1280, 960, 5120, false, false),
        ("360m dW up  [5120x1280]x[1280x960]", 5120, 960, 1280, true, false),
        ("360m head   [1024x960]x[960x4096]", n, 4096, 960, false, true),
    ];
    println!(
        "{:<38} {:>12} {:>12} {:>7} {:>16} {:>16}",
        "shape", "f32 GFLOP/s", "bf16 GFLOP/s", "ratio", "f32 per CPU-s", "bf16 per CPU-s"
    );
    for (label, m, nn, k, a_t, b_t) in shapes.into_iter().filter(|s| s.0.contains(filter.as_str())) {
        let a: Vec<f32> = (0..m * k).map(|i| 0.01 + (i % 97) as f32 * 1e-4).collect();
        let b: Vec<f32> = (0..k * nn).map(|i| 0.02 - (i % 89) as f32 * 1e-4).collect();
        let mut c = vec![0.0f32; m * nn];
        // The best of a few runs: the machine may be shared, and the best run is the kernel's rate. Per CPU
        // second: GFLOP per second of CPU time the threads ran, best run.
        let rate = |prec: Precision, c: &mut [f32]| {
            matmul(c, &a, &b, m, nn, k, a_t, b_t, Accumulate::Overwrite, prec);
            let reps = 5;
            let (mut best, mut best_cpu) = (f64::MAX, f64::MAX);
            for _ in 0..reps {
                let (t, cpu) = (Instant::now(), cpu_ns());
                matmul(c, &a, &b, m, nn, k, a_t, b_t, Accumulate::Add, prec);
                best = best.min(t.elapsed().as_secs_f64());
                best_cpu = best_cpu.min((cpu_ns() - cpu) as f64 * 1e-9);
            }
            let flop = 2.0 * (m * nn * k) as f64 / 1e9;
            (flop / best, flop / best_cpu)
        };
        let ((f32_rate, f32_cpu), (bf16_rate, bf16_cpu)) =
            (rate(Precision::F32, &mut c), rate(Precision::Bf16, &mut c));
        println!(
            "{label:<38} {f32_rate:>12.1} {bf16_rate:>12.1} {:>6.2}x {f32_cpu:>16.1} {bf16_cpu:>16.1}",
            bf16_rate / f32_rate
        );
    }
}
