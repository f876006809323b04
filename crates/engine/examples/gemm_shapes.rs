//! GFLOP/s of the engine's matmul on the GEMM shapes of a GPT-2-small and a SmolLM2-135M training step
//! (forward, input gradient, weight gradient), to compare with the `gemm` crate's peak and with PyTorch.
//! `cargo run --release -p dpo-engine --example gemm_shapes`

use std::time::Instant;

use dpo_engine::kernels::{init_threads, matmul, Accumulate, Precision};

fn main() {
    init_threads(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let n = 1024;
    // (label, m, n, k, a_t, b_t)
    let shapes = [
        ("fwd  x W^T  [1024x768]x[768x3072]", n, 3072, 768, false, true),
        ("bwd  dy W   [1024x3072]x[3072x768]", n, 768, 3072, false, false),
        ("bwd  dy^T x [3072x1024]x[1024x768]", 3072, 768, n, true, false),
        ("head h W^T  [1024x768]x[768x50257]", n, 50257, 768, false, true),
        ("head dW     [50257x1024]x[1024x768]", 50257, 768, n, true, false),
        // SmolLM2-135M: hidden 576, fused q/k/v 960, fused gate/up 3072, MLP 1536; 1280 tokens (4 DPO pairs)
        ("smol qkv    [1280x576]x[576x960]", 1280, 960, 576, false, true),
        ("smol gate/up[1280x576]x[576x3072]", 1280, 3072, 576, false, true),
        ("smol down   [1280x1536]x[1536x576]", 1280, 576, 1536, false, true),
        ("smol dW up  [3072x1280]x[1280x576]", 3072, 576, 1280, true, false),
        ("smol head   [256x576]x[576x49152]", 256, 49152, 576, false, true),
    ];
    for (label, m, nn, k, a_t, b_t) in shapes {
        let a = vec![0.01f32; m * k];
        let b = vec![0.02f32; k * nn];
        let mut c = vec![0.0f32; m * nn];
        matmul(&mut c, &a, &b, m, nn, k, a_t, b_t, Accumulate::Overwrite, Precision::F32);
        let reps = 3;
        let t = Instant::now();
        for _ in 0..reps {
            matmul(&mut c, &a, &b, m, nn, k, a_t, b_t, Accumulate::Add, Precision::F32);
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        println!("{label}: {:.1} GFLOP/s", 2.0 * (m * nn * k) as f64 / s / 1e9);
    }
}
