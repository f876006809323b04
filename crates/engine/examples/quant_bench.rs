//! Speed of the frozen-weight products by storage: `y = x W^T` and `dx = dy W` on a `[out, in]` weight.
//!
//!     cargo run --release -p dpo-engine --example quant_bench [-- OUT IN N]   (default 2048 2048 256)
//!
//! Prints the median of several runs per storage in GFLOP/s (`2 N in out` flops per product).

use std::time::Instant;

use dpo_engine::kernels::{init_threads, Accumulate};
use dpo_engine::quant::{Matrix, Storage};

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("OUT IN N as integers")).collect();
    let (out, inp, n) = match args[..] {
        [o, i, n] => (o, i, n),
        [] => (2048, 2048, 256),
        _ => panic!("usage: quant_bench [OUT IN N]"),
    };
    init_threads(0);
    let mut state = 1u64;
    let mut next = || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 40) as f32 / (1u32 << 24) as f32 - 0.5) * 0.1
    };
    let w: Vec<f32> = (0..out * inp).map(|_| next()).collect();
    let x: Vec<f32> = (0..n * inp).map(|_| next()).collect();
    let dy: Vec<f32> = (0..n * out).map(|_| next()).collect();
    let flops = 2.0 * (n * inp * out) as f64;
    println!("W [{out}, {inp}], N = {n}, {} threads", rayon::current_num_threads());
    println!("{:<16} {:>10} {:>16} {:>16}", "storage", "MiB", "forward GFLOP/s", "input-grad GFLOP/s");
    let storages = [
        ("f32", Storage::F32),
        ("bf16", Storage::Bf16),
        ("nf4", Storage::Nf4 { double_quant: false }),
        ("nf4+double", Storage::Nf4 { double_quant: true }),
    ];
    for (name, storage) in storages {
        let m = Matrix::new(w.clone(), out, inp, storage).unwrap();
        let mut y = vec![0.0; n * out];
        let mut dx = vec![0.0; n * inp];
        let fwd = median_secs(|| m.linear_forward(&mut y, &x, None, n));
        let bwd = median_secs(|| m.linear_input_grad(&mut dx, &dy, n, Accumulate::Overwrite));
        let mib = m.bytes() as f64 / (1 << 20) as f64;
        println!("{name:<16} {mib:>10.2} {:>16.1} {:>16.1}", flops / fwd / 1e9, flops / bwd / 1e9);
    }
}

/// Median wall time of 9 runs after 2 warm-up runs.
fn median_secs(mut f: impl FnMut()) -> f64 {
    for _ in 0..2 {
        f();
    }
    let mut t: Vec<f64> = (0..9)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}
