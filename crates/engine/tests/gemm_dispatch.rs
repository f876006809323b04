//! CPU dispatch of bf16 products, forced by the environment: with `DPO_GEMM=portable` (set before the
//! first product; this file is its own test binary, one test, so no other test sees the variable) bf16
//! products take the portable path, and give exactly the f32 product of the bf16-rounded operands.

use dpo_engine::kernels::{matmul, Accumulate, Bf16Kernel, Precision};
use dpo_engine::quant::bf16::{from_f32, to_f32};

#[test]
fn portable_switch_selects_the_emulation_and_its_numbers_are_the_f32_ones() {
    std::env::set_var("DPO_GEMM", "portable");
    assert_eq!(Bf16Kernel::detect(), Bf16Kernel::Emulated);
    // Above the kernels' size thresholds, so on AVX-512 CPUs it is the switch that picks the path.
    let (m, n, k) = (70, 96, 81);
    let value = |i: usize| ((i * 7919 % 1000) as f32 - 500.0) / 317.0;
    let a: Vec<f32> = (0..m * k).map(value).collect();
    let b: Vec<f32> = (0..k * n).map(|i| value(i + 13)).collect();
    let round = |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| to_f32(from_f32(x))).collect() };
    let (mut c16, mut c32) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
    matmul(&mut c16, &a, &b, m, n, k, false, false, Accumulate::Overwrite, Precision::Bf16);
    matmul(&mut c32, &round(&a), &round(&b), m, n, k, false, false, Accumulate::Overwrite, Precision::F32);
    assert!(c16.iter().zip(&c32).all(|(x, y)| x.to_bits() == y.to_bits()), "bf16 = f32 on rounded operands");
    // And the rounding happened: the f32 product of the unrounded operands differs.
    let mut c = vec![f32::NAN; m * n];
    matmul(&mut c, &a, &b, m, n, k, false, false, Accumulate::Overwrite, Precision::F32);
    assert!(c.iter().zip(&c16).any(|(x, y)| (x - y).abs() > 1e-3));
}
