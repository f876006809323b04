use dpo_engine::kernels::{init_threads, matmul};
use std::time::Instant;
fn cpu_ns() -> u64 {
    let mut t = 0;
    for e in std::fs::read_dir("/proc/self/task").unwrap() {
        let p = e.unwrap().path().join("schedstat");
        if let Ok(s) = std::fs::read_to_string(p) {
            t += s.split_whitespace().next().unwrap().parse::<u64>().unwrap();
        }
    }
    t
}
fn main() {
    let threads: usize = std::env::var("T").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    init_threads(threads);
    let args: Vec<String> = std::env::args().collect();
    let sel = args.get(1).cloned().unwrap_or_default();
    let secs: f64 = std::env::var("SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(1.0);
    let shapes: Vec<(&str, usize, usize, usize, bool, bool)> = vec![
        ("fwd", 1024, 3072, 768, false, true),
        ("dx", 1024, 768, 3072, false, false),
        ("dW", 3072, 768, 1024, true, false),
        ("headfwd1024", 1024, 50257, 768, false, true),
        ("headdW1024", 50257, 768, 1024, true, false),
        ("headfwd256", 256, 50257, 768, false, true),
        ("headdh256", 256, 768, 50257, false, false),
        ("headdW256", 50257, 768, 256, true, false),
        ("qkv", 1024, 2304, 768, false, true),
        ("proj", 1024, 768, 768, false, true),
        ("small64", 64, 64, 64, false, true),
        ("small128", 128, 128, 128, false, false),
        ("small256", 256, 256, 256, false, true),
        ("m1", 1, 3072, 768, false, true),
        ("m4", 4, 3072, 768, false, true),
        ("m16", 16, 768, 768, false, true),
        ("m32", 32, 768, 768, false, true),
        ("att", 128, 256, 64, false, true),
        ("att2", 128, 64, 256, false, false),
    ];
    for (label, m, nn, k, a_t, b_t) in shapes {
        if !sel.is_empty() && !sel.split(',').any(|s| s == label) {
            continue;
        }
        let a: Vec<f32> = (0..m * k).map(|i| ((i % 7) as f32) * 0.01).collect();
        let b: Vec<f32> = (0..k * nn).map(|i| ((i % 5) as f32) * 0.01).collect();
        let mut c = vec![0.0f32; m * nn];
        matmul(&mut c, &a, &b, m, nn, k, a_t, b_t, false);
        let flop = 2.0 * (m * nn * k) as f64;
        let reps = ((secs * 3e10 / 8.0 / flop) as usize).clamp(1, 1000000);
        let (mut best, mut bestcpu) = (0.0f64, 0.0f64);
        for _ in 0..8 {
            let t = Instant::now();
            let c0 = cpu_ns();
            for _ in 0..reps {
                matmul(&mut c, &a, &b, m, nn, k, a_t, b_t, true);
            }
            let s = t.elapsed().as_secs_f64() / reps as f64;
            let cs = (cpu_ns() - c0) as f64 * 1e-9 / reps as f64 / threads as f64;
            best = best.max(flop / s / 1e9);
            bestcpu = bestcpu.max(flop / cs / 1e9);
        }
        let pr = dpo_engine::kernels::sgemm::prof_take();
        let tot = (pr[0] + pr[1] + pr[2]) as f64;
        println!(
            "   packB {:.1}% packA {:.1}% kernel {:.1}%",
            100.0 * pr[0] as f64 / tot,
            100.0 * pr[1] as f64 / tot,
            100.0 * pr[2] as f64 / tot
        );
        println!("{label:12} {m}x{nn}x{k}: {best:.1} GFLOP/s (cpu {bestcpu:.1})");
    }
}
