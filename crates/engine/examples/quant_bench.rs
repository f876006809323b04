//! Speed of the frozen-weight products by storage: `y = x W^T` and `dx = dy W` on a `[out, in]` weight.
//!
//!     cargo run --release -p dpo-engine --example quant_bench [-- OUT IN N]   (default 2048 2048 256)
//!
//! Prints, per storage and product, the median of several runs in GFLOP/s (`2 N in out` flops per
//! product) of wall time, and in GFLOP per second of CPU time that the process's threads ran (from
//! `/proc/self/task/*/schedstat`, Linux): on a shared machine the wall figure depends on what else runs,
//! the CPU-time one much less (it still includes the pool's brief spinning and cache contention).
//! Run with `RAYON_NUM_THREADS=1` for one core's figure.

use std::time::Instant;

use dpo_engine::kernels::{init_threads, Accumulate, Precision};
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
    println!("{:<12} {:>8} {:>22} {:>22}", "storage", "MiB", "forward GFLOP/s", "input-grad GFLOP/s");
    println!("{:<12} {:>8} {:>22} {:>22}", "", "", "wall / per CPU-s", "wall / per CPU-s");
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
        let fwd = median_secs(|| m.linear_forward(&mut y, &x, None, n, Precision::F32));
        let bwd = median_secs(|| m.linear_input_grad(&mut dx, &dy, n, Accumulate::Overwrite, Precision::F32));
        let mib = m.bytes() as f64 / (1 << 20) as f64;
        let rate = |(wall, cpu): (f64, f64)| format!("{:.1} / {:.1}", flops / wall / 1e9, flops / cpu / 1e9);
        println!("{name:<12} {mib:>8.2} {:>22} {:>22}", rate(fwd), rate(bwd));
    }
}

/// Median wall time and median CPU time (seconds) of 15 runs after 3 warm-up runs.
fn median_secs(mut f: impl FnMut()) -> (f64, f64) {
    for _ in 0..3 {
        f();
    }
    let (mut wall, mut cpu): (Vec<f64>, Vec<f64>) = (0..15)
        .map(|_| {
            let (s, c) = (Instant::now(), cpu_secs());
            f();
            (s.elapsed().as_secs_f64(), cpu_secs() - c)
        })
        .unzip();
    wall.sort_by(f64::total_cmp);
    cpu.sort_by(f64::total_cmp);
    (wall[wall.len() / 2], cpu[cpu.len() / 2])
}

/// Seconds all of this process's threads have run on a CPU (NaN where /proc is missing).
fn cpu_secs() -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return f64::NAN };
    let ns: u64 = tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    ns as f64 * 1e-9
}
