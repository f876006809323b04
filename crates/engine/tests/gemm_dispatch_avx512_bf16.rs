//! CPU dispatch of bf16 products forced by `DPO_GEMM=avx512_bf16` (set before the first product; this
//! file is its own test binary, one test, so no other test sees the variable): on a CPU with AVX512_BF16
//! bf16 products run on `vdpbf16ps` even where AMX tiles are there, and compute the product of the
//! bf16-rounded operands, grouped otherwise than the f32 kernel on those operands; elsewhere the switch
//! changes nothing (the emulation).

use dpo_engine::kernels::{matmul, Accumulate, Bf16Kernel, Precision};
use dpo_engine::quant::bf16::{from_f32, to_f32};

#[test]
fn avx512_bf16_switch_selects_vdpbf16ps_ahead_of_amx() {
    std::env::set_var("DPO_GEMM", "avx512_bf16");
    #[cfg(target_arch = "x86_64")]
    let vdp = std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512bf16");
    #[cfg(not(target_arch = "x86_64"))]
    let vdp = false;
    let want = if vdp { Bf16Kernel::Avx512Bf16 } else { Bf16Kernel::Emulated };
    assert_eq!(Bf16Kernel::detect(), want);
    if !vdp {
        eprintln!("no AVX512_BF16 on this CPU: only the kernel choice is tested");
        return;
    }
    // Above the kernels' size thresholds; the f64 product of the rounded operands, and the f32 one.
    let (m, n, k) = (70, 96, 301);
    let value = |i: usize| ((i * 7919 % 1000) as f32 - 500.0) / 317.0;
    let a: Vec<f32> = (0..m * k).map(value).collect();
    let b: Vec<f32> = (0..k * n).map(|i| value(i + 13)).collect();
    let round = |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| to_f32(from_f32(x))).collect() };
    let (ra, rb) = (round(&a), round(&b));
    let (mut c16, mut c32) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
    matmul(&mut c16, &a, &b, m, n, k, false, false, Accumulate::Overwrite, Precision::Bf16);
    matmul(&mut c32, &ra, &rb, m, n, k, false, false, Accumulate::Overwrite, Precision::F32);
    for i in 0..m {
        for j in 0..n {
            let (mut want, mut abs) = (0.0f64, 0.0f64);
            for p in 0..k {
                let prod = ra[i * k + p] as f64 * rb[p * n + j] as f64;
                want += prod;
                abs += prod.abs();
            }
            // The f32 sums' rounding: the bound of the kernel tests.
            let tol = 1e-6 * ((k + 1) as f64).sqrt() * abs;
            let got = c16[i * n + j] as f64;
            assert!((got - want).abs() <= tol, "C[{i}, {j}] = {got} want {want}");
        }
    }
    // Pair-wise sums, not the emulation's one FMA per k.
    assert!(c16.iter().zip(&c32).any(|(x, y)| x.to_bits() != y.to_bits()), "the emulation ran");
}
