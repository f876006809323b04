//! Rate of the decode kernel (`linear_rows_forward`: a few rows, one new token per sequence, against a
//! weight read once per step) on the linears of a SmolLM2-135M decode step and its LM head, the weights
//! cycled over copies larger than the caches so that every call reads them from memory, as decoding does.
//! Prints the CPU, GFLOP/s and the weights' GB/s (the bound for a few rows is the memory's).
//! `cargo run --release -p dpo-engine --example decode_rows [threads]`

use std::time::Instant;

use dpo_engine::kernels::{init_threads, linear_rows_forward};

/// `model name` from /proc/cpuinfo (the first core's), or "unknown".
fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let line = info.lines().find(|l| l.starts_with("model name"));
    line.and_then(|l| l.split(':').nth(1)).map(|s| s.trim().to_string()).unwrap_or_else(|| "unknown".into())
}

fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    init_threads(threads);
    println!("{}, {} threads", cpu_model(), dpo_engine::kernels::num_threads());
    // (rows, in, out): q/k/v, o, gate/up, down, head of SmolLM2-135M; one row; a larger batch.
    let shapes = [(8, 576, 960), (8, 576, 576), (8, 576, 3072), (8, 1536, 576), (8, 576, 49152), (1, 576, 3072)];
    for (rows, inp, out) in shapes.into_iter().chain([(32, 576, 3072)]) {
        let x: Vec<f32> = (0..rows * inp).map(|i| ((i * 31) % 100) as f32 * 1e-2 - 0.5).collect();
        let copies = (256 << 20) / (4 * inp * out) + 1;
        let ws: Vec<Vec<f32>> = (0..copies)
            .map(|c| (0..inp * out).map(|i| ((i * 7919 + c) % 1000) as f32 * 1e-3 - 0.5).collect())
            .collect();
        let mut y = vec![0f32; rows * out];
        let iters = (2_000_000_000 / (2 * rows * inp * out)).clamp(20, 2000);
        let t = Instant::now();
        for i in 0..iters {
            linear_rows_forward(&mut y, &x, &ws[i % copies], None, rows, inp, out);
        }
        let dt = t.elapsed().as_secs_f64() / iters as f64;
        let gflops = 2.0 * (rows * inp * out) as f64 / dt / 1e9;
        let gbs = (4 * inp * out) as f64 / dt / 1e9;
        println!("rows {rows:2} x {inp:4} -> {out:5}: {:8.1} us  {gflops:6.1} GFLOP/s  {gbs:5.1} GB/s", dt * 1e6);
    }
}
