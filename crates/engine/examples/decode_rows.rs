//! Rate of the decode kernel (`linear_rows_forward`: a few rows, one new token per sequence, against a
//! weight read once per step) on the linears of a SmolLM2-135M decode step and its LM head, the weights
//! cycled over copies larger than the caches so that every call reads them from memory, as decoding does.
//! Prints the CPU, GFLOP/s and the weights' GB/s (the bound for a few rows is the memory's), for f32
//! weights and for bf16 weights (read as they are stored, widened in registers).
//! `cargo run --release -p dpo-engine --example decode_rows [threads]`

use std::time::Instant;

use dpo_engine::kernels::{cpu_model, init_threads, linear_rows_forward, DecodeWeight};

fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    init_threads(threads);
    println!("{}, {} threads", cpu_model(), dpo_engine::kernels::num_threads());
    // (rows, in, out): q/k/v, o, gate/up, down, head of SmolLM2-135M; one row; larger batches.
    let shapes = [
        (8, 576, 960),
        (8, 576, 576),
        (8, 576, 3072),
        (8, 1536, 576),
        (8, 576, 49152),
        (1, 576, 3072),
        (16, 576, 3072),
    ];
    for (rows, inp, out) in shapes.into_iter().chain([(32, 576, 3072)]) {
        let x: Vec<f32> = (0..rows * inp).map(|i| ((i * 31) % 100) as f32 * 1e-2 - 0.5).collect();
        let ws: Vec<Vec<f32>> = weights(inp * out, 4, |i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5);
        let f32_us = time(&x, &ws, rows, inp, out);
        let ws: Vec<Vec<u16>> = weights(inp * out, 2, |i| ((i * 7919) % 1000) as u16 + 0x3c00);
        let bf16_us = time(&x, &ws, rows, inp, out);
        let flops = 2.0 * (rows * inp * out) as f64;
        for (name, us, bytes) in [("f32 ", f32_us, 4), ("bf16", bf16_us, 2)] {
            println!(
                "rows {rows:2} x {inp:4} -> {out:5} {name}: {us:8.1} us  {:6.1} GFLOP/s  {:5.1} GB/s",
                flops / us / 1e3,
                (bytes * inp * out) as f64 / us / 1e3
            );
        }
    }
}

/// Copies of a weight of `len` elements of `bytes` each, enough of them to pass 256 MiB.
fn weights<W>(len: usize, bytes: usize, value: impl Fn(usize) -> W) -> Vec<Vec<W>> {
    let copies = (256 << 20) / (bytes * len) + 1;
    (0..copies).map(|c| (0..len).map(|i| value(i + c)).collect()).collect()
}

/// Microseconds a call, the weights cycled: the best of five runs (the VMs these run on are shared).
fn time<W: DecodeWeight>(x: &[f32], ws: &[Vec<W>], rows: usize, inp: usize, out: usize) -> f64 {
    let mut y = vec![0f32; rows * out];
    let iters = (400_000_000 / (2 * rows * inp * out)).clamp(20, 400).max(ws.len());
    let run = |y: &mut [f32]| {
        let t = Instant::now();
        for i in 0..iters {
            linear_rows_forward(y, x, &ws[i % ws.len()], None, rows, inp, out);
        }
        t.elapsed().as_secs_f64() / iters as f64 * 1e6
    };
    (0..5).map(|_| run(&mut y)).fold(f64::INFINITY, f64::min)
}
