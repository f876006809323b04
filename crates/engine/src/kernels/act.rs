//! Elementwise activations (GELU in both forms, SwiGLU) and the vector helpers the other kernels share:
//! a branch-free `exp` that the compiler vectorises, lane-parallel sums, and [`multiversion!`], which
//! compiles a hot loop again for AVX2+FMA and for AVX-512 and picks the widest copy the CPU runs (the crate
//! is built for the x86-64 baseline, SSE2, where these loops are 2-4x slower).

use rayon::prelude::*;

/// Elements per parallel task of an elementwise kernel (small inputs run on the calling thread).
pub(crate) const CHUNK: usize = 1 << 14;

/// Whether the running CPU has AVX2 and FMA (cached by std after the first query).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// Whether the CPU has AVX-512F (and BW, VL), the widest variant [`multiversion!`] compiles.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        has_avx2()
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
    })
}

/// Defines `fn $name(args) -> ret` whose body is compiled three times, for the baseline, for AVX2+FMA and
/// for AVX-512, and dispatches at run time. Arguments are plain identifiers (no patterns); the body becomes
/// an inner `#[inline(always)]` function, so everything it calls that is `#[inline(always)]` is compiled
/// with the variant's features. The variants give the same bits: the bodies spell out their lanes (16
/// accumulators, fixed reduction trees) and the compiler does not fuse or reorder f32 arithmetic, so the
/// vector width changes only how many lanes one instruction carries.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn inner($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                inner($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                inner($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            if $crate::kernels::act::has_avx512() {
                // SAFETY: the CPU supports the features `avx512` was compiled for.
                return unsafe { avx512($($arg),*) };
            }
            #[cfg(target_arch = "x86_64")]
            if $crate::kernels::act::has_avx2() {
                // SAFETY: the CPU supports the features `avx2` was compiled for.
                return unsafe { avx2($($arg),*) };
            }
            inner($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// `e^x` in f32, branch-free so loops over it vectorise. Cephes' `expf` reduction and polynomial: relative
/// error below 2e-7 on `[-87, 88]`; inputs below -87.3 give ~1e-38 (not 0), above 88 give `e^88`; NaN
/// propagates.
#[inline(always)]
#[allow(clippy::excessive_precision)] // Cephes' coefficients, as published
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_375; // ln 2, high part (exact in few bits)
    const C2: f32 = -2.121_944_4e-4; // ln 2 - C1
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer held in the low bits
    let x = if x < -87.3 { -87.3 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * C1 - n * C2;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let y = p * r * r + r + 1.0;
    // 2^n from the integer in the low mantissa bits of `t`: (bits - bits(MAGIC) + 127) << 23.
    let scale = f32::from_bits((t.to_bits().wrapping_sub(0x4B40_0000 - 127)) << 23);
    y * scale
}

/// `1 / (1 + e^-x)`.
#[inline(always)]
pub(crate) fn sigmoid_f32(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-x))
}

/// Sum with 16 independent accumulators (vectorisable; also more accurate than a serial sum).
#[inline(always)]
pub(crate) fn sum_lanes(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    let mut tail = 0.0f32;
    for &v in chunks.remainder() {
        tail += v;
    }
    reduce16(&acc) + tail
}

/// Dot product with 16 independent accumulators.
#[inline(always)]
pub(crate) fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 16];
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for ((a, &u), &v) in acc.iter_mut().zip(x).zip(y) {
            *a += u * v;
        }
    }
    let mut tail = 0.0f32;
    for (&x, &y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    reduce16(&acc) + tail
}

/// Maximum (NaN-ignoring) with 16 lanes; `-inf` for an empty slice.
#[inline(always)]
pub(crate) fn max_lanes(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in acc.iter().chain(chunks.remainder()) {
        m = if v > m { v } else { m };
    }
    m
}

#[inline(always)]
fn reduce16(acc: &[f32; 16]) -> f32 {
    let mut s8 = [0.0f32; 8];
    for (l, s) in s8.iter_mut().enumerate() {
        *s = acc[l] + acc[l + 8];
    }
    let s4 = [s8[0] + s8[4], s8[1] + s8[5], s8[2] + s8[6], s8[3] + s8[7]];
    (s4[0] + s4[2]) + (s4[1] + s4[3])
}

/// Runs `f` over matching chunks of `out` and `x`, in parallel when the input is large.
fn par_map(out: &mut [f32], x: &[f32], f: fn(&mut [f32], &[f32])) {
    assert_eq!(out.len(), x.len(), "activation: output and input lengths differ");
    if out.len() <= CHUNK {
        f(out, x);
    } else {
        out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, x)| f(o, x));
    }
}

/// Runs `f` over matching chunks of `dx`, `dout` and `x`, in parallel when the input is large.
fn par_map2(dx: &mut [f32], dout: &[f32], x: &[f32], f: fn(&mut [f32], &[f32], &[f32])) {
    assert!(dx.len() == x.len() && dout.len() == x.len(), "activation backward: lengths differ");
    if dx.len() <= CHUNK {
        f(dx, dout, x);
    } else {
        dx.par_chunks_mut(CHUNK)
            .zip(dout.par_chunks(CHUNK))
            .zip(x.par_chunks(CHUNK))
            .for_each(|((dx, dy), x)| f(dx, dy, x));
    }
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;

multiversion! {
    fn gelu_tanh_fwd_k(out: &mut [f32], x: &[f32]) {
        // 0.5 x (1 + tanh u) = x sigmoid(2u), which stays accurate where tanh u is close to -1.
        for (o, &x) in out.iter_mut().zip(x) {
            let u = SQRT_2_OVER_PI * (x + GELU_C * x * x * x);
            *o = x / (1.0 + exp_f32(-2.0 * u));
        }
    }
}

multiversion! {
    fn gelu_tanh_bwd_k(dx: &mut [f32], dout: &[f32], x: &[f32]) {
        // d/dx [x s(2u)] = s + 2 x s (1 - s) u',  u' = sqrt(2/pi) (1 + 3c x^2)
        for ((g, &dy), &x) in dx.iter_mut().zip(dout).zip(x) {
            let x2 = x * x;
            let u = SQRT_2_OVER_PI * (x + GELU_C * x2 * x);
            let s = 1.0 / (1.0 + exp_f32(-2.0 * u));
            let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * x2);
            *g = dy * (s + 2.0 * x * s * (1.0 - s) * du);
        }
    }
}

/// `out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))` (GPT-2's `gelu_new`). `[n]`
pub fn gelu_tanh_forward(out: &mut [f32], x: &[f32]) {
    par_map(out, x, gelu_tanh_fwd_k);
}

/// `dx = dout * gelu_tanh'(x)` (overwrites `dx`). `[n]`
pub fn gelu_tanh_backward(dx: &mut [f32], dout: &[f32], x: &[f32]) {
    par_map2(dx, dout, x, gelu_tanh_bwd_k);
}

/// The standard normal CDF `Phi(x) = erfc(-x / sqrt 2) / 2` and `exp(-x^2 / 2)`, branch-free.
///
/// `erfc(z) = t exp(-z^2 + P(t))`, `t = 1 / (1 + z / 2)`, is Numerical Recipes' `erfcc` (relative error
/// below 1.2e-7 for every argument), so the negative tail keeps its relative accuracy where `1 + erf` would
/// cancel. `exp(-x^2 / 2)` is taken of the exactly rounded f32 square, with the square's rounding error
/// folded into the second factor, so large `|x|` loses nothing to the rounding of `x^2`. Relative error
/// below 5e-7 (PyTorch's vectorised CPU `erf` has 1.5e-7 absolute error).
#[inline(always)]
#[allow(clippy::excessive_precision)] // coefficients as published
fn normal_cdf(x: f32) -> (f32, f32) {
    let a = x.abs();
    let a = if a > 20.0 { 20.0 } else { a }; // Phi is 0 or 1 in f32 beyond; keeps the split finite
                                             // a^2 = sq + err exactly (Veltkamp split; no FMA needed)
    let sq = a * a;
    let c = 4097.0 * a;
    let hi = c - (c - a);
    let lo = a - hi;
    let err = ((hi * hi - sq) + 2.0 * hi * lo) + lo * lo;
    let t = 1.0 / (1.0 + 0.5 * std::f32::consts::FRAC_1_SQRT_2 * a);
    let mut p = 0.170_872_77f32;
    p = p * t - 0.822_152_23;
    p = p * t + 1.488_515_87;
    p = p * t - 1.135_203_98;
    p = p * t + 0.278_868_07;
    p = p * t - 0.186_288_06;
    p = p * t + 0.096_784_18;
    p = p * t + 0.374_091_96;
    p = p * t + 1.000_023_68;
    p = p * t - 1.265_512_23;
    let gauss = exp_f32(-0.5 * sq); // exact argument
    let tail = 0.5 * t * gauss * exp_f32(p - 0.5 * err); // Phi(-|x|)
    let cdf = if x >= 0.0 { 1.0 - tail } else { tail };
    (cdf, gauss * exp_f32(-0.5 * err))
}

multiversion! {
    fn gelu_erf_fwd_k(out: &mut [f32], x: &[f32]) {
        for (o, &x) in out.iter_mut().zip(x) {
            *o = x * normal_cdf(x).0;
        }
    }
}

multiversion! {
    fn gelu_erf_bwd_k(dx: &mut [f32], dout: &[f32], x: &[f32]) {
        // d/dx [x Phi(x)] = Phi(x) + x phi(x),  phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        for ((g, &dy), &x) in dx.iter_mut().zip(dout).zip(x) {
            let (cdf, gauss) = normal_cdf(x);
            *g = dy * (cdf + x * (INV_SQRT_2PI * gauss));
        }
    }
}

/// `out = 0.5 x (1 + erf(x / sqrt 2))` (exact GELU, GPT-NeoX). `[n]`
pub fn gelu_erf_forward(out: &mut [f32], x: &[f32]) {
    par_map(out, x, gelu_erf_fwd_k);
}

/// `dx = dout * gelu'(x)` (overwrites `dx`). `[n]`
pub fn gelu_erf_backward(dx: &mut [f32], dout: &[f32], x: &[f32]) {
    par_map2(dx, dout, x, gelu_erf_bwd_k);
}

multiversion! {
    fn swiglu_fwd_row(out: &mut [f32], gate: &[f32], up: &[f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = g * sigmoid_f32(g) * u;
        }
    }
}

multiversion! {
    fn swiglu_bwd_row(dgate: &mut [f32], dup: &mut [f32], dout: &[f32], gate: &[f32], up: &[f32]) {
        // out = g s(g) u:  d/du = g s;  d/dg = u s (1 + g (1 - s))
        for ((((dg, du), &dy), &g), &u) in
            dgate.iter_mut().zip(dup.iter_mut()).zip(dout).zip(gate).zip(up)
        {
            let s = sigmoid_f32(g);
            *du = dy * g * s;
            *dg = dy * u * s * (1.0 + g * (1.0 - s));
        }
    }
}

/// Rows per parallel task for a row-wise kernel with `cols` elements per row.
pub(crate) fn rows_per_task(cols: usize) -> usize {
    (CHUNK / cols.max(1)).max(1)
}

/// `out = silu(gate) * up` (Llama's MLP), `out: [rows, ff]`, `gate_up: [rows, 2 ff]` (gate columns
/// `0..ff`, up columns `ff..2ff`).
pub fn swiglu_forward(out: &mut [f32], gate_up: &[f32], rows: usize, ff: usize) {
    assert!(out.len() == rows * ff && gate_up.len() == rows * 2 * ff, "swiglu_forward: shapes");
    if ff == 0 {
        return;
    }
    out.par_chunks_mut(ff)
        .zip(gate_up.par_chunks(2 * ff))
        .with_min_len(rows_per_task(ff))
        .for_each(|(o, gu)| swiglu_fwd_row(o, &gu[..ff], &gu[ff..]));
}

/// Backward of [`swiglu_forward`]: `d_gate_up: [rows, 2 ff]` is overwritten.
pub fn swiglu_backward(d_gate_up: &mut [f32], dout: &[f32], gate_up: &[f32], rows: usize, ff: usize) {
    gated_backward("swiglu_backward", d_gate_up, dout, gate_up, rows, ff, |dg, du, dy, gate, up| {
        swiglu_bwd_row(dg, du, dy, gate, up)
    });
}

/// The row loop of a gated MLP's backward: per row, `row(d_gate, d_up, dout, gate, up)` with
/// `d_gate, d_up, dout, gate, up: [ff]`, rows in parallel.
fn gated_backward(
    name: &str,
    d_gate_up: &mut [f32],
    dout: &[f32],
    gate_up: &[f32],
    rows: usize,
    ff: usize,
    row: impl Fn(&mut [f32], &mut [f32], &[f32], &[f32], &[f32]) + Sync,
) {
    assert!(
        d_gate_up.len() == rows * 2 * ff && dout.len() == rows * ff && gate_up.len() == rows * 2 * ff,
        "{name}: shapes"
    );
    if ff == 0 {
        return;
    }
    d_gate_up
        .par_chunks_mut(2 * ff)
        .zip(dout.par_chunks(ff))
        .zip(gate_up.par_chunks(2 * ff))
        .with_min_len(rows_per_task(ff))
        .for_each(|((dgu, dy), gu)| {
            let (dg, du) = dgu.split_at_mut(ff);
            let (gate, up) = gu.split_at(ff);
            row(dg, du, dy, gate, up);
        });
}

/// `out = gelu_tanh(gate) * up` (Gemma's MLP), `out: [rows, ff]`, `gate_up: [rows, 2 ff]` (gate columns
/// `0..ff`, up columns `ff..2ff`).
pub fn geglu_tanh_forward(out: &mut [f32], gate_up: &[f32], rows: usize, ff: usize) {
    assert!(out.len() == rows * ff && gate_up.len() == rows * 2 * ff, "geglu_tanh_forward: shapes");
    if ff == 0 {
        return;
    }
    out.par_chunks_mut(ff).zip(gate_up.par_chunks(2 * ff)).with_min_len(rows_per_task(ff)).for_each(|(o, gu)| {
        gelu_tanh_fwd_k(o, &gu[..ff]);
        o.iter_mut().zip(&gu[ff..]).for_each(|(o, &u)| *o *= u);
    });
}

/// Backward of [`geglu_tanh_forward`]: `d_gate_up: [rows, 2 ff]` is overwritten.
pub fn geglu_tanh_backward(d_gate_up: &mut [f32], dout: &[f32], gate_up: &[f32], rows: usize, ff: usize) {
    gated_backward("geglu_tanh_backward", d_gate_up, dout, gate_up, rows, ff, |dg, du, dy, gate, up| {
        // out = gelu(g) u:  d/du = gelu(g);  d/dg = u gelu'(g). `du` first holds dy * u.
        du.iter_mut().zip(dy).zip(up).for_each(|((d, &y), &u)| *d = y * u);
        gelu_tanh_bwd_k(dg, du, gate);
        gelu_tanh_fwd_k(du, gate);
        du.iter_mut().zip(dy).for_each(|(d, &y)| *d *= y);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::threads::test_util::*;

    fn gelu_tanh64(x: f64) -> f64 {
        0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
    }
    fn gelu_erf64(x: f64) -> f64 {
        0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
    }
    fn silu64(x: f64) -> f64 {
        x / (1.0 + (-x).exp())
    }
    fn deriv(f: impl Fn(f64) -> f64, x: f64) -> f64 {
        let h = 1e-5;
        (f(x + h) - f(x - h)) / (2.0 * h)
    }

    #[test]
    fn exp_matches_std() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let e = (exp_f32(x) as f64 - (x as f64).exp()).abs() / (x as f64).exp();
            worst = worst.max(e);
            x += 0.001_37;
        }
        assert!(worst < 3e-7, "exp relative error {worst:e}");
        assert!(exp_f32(f32::NEG_INFINITY) < 1e-37);
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(0.0), 1.0);
    }

    #[test]
    fn lane_reductions() {
        let mut rng = Rng::new(1);
        for n in [0, 1, 15, 16, 17, 100] {
            let a = rng.vec(n, 1.0);
            let b = rng.vec(n, 1.0);
            let s: f64 = a.iter().map(|&v| v as f64).sum();
            let d: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            assert!((sum_lanes(&a) as f64 - s).abs() < 1e-5);
            assert!((dot_lanes(&a, &b) as f64 - d).abs() < 1e-5);
            let m = a.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max_lanes(&a), m);
        }
    }

    fn check_elementwise(
        n: usize,
        fwd: fn(&mut [f32], &[f32]),
        bwd: fn(&mut [f32], &[f32], &[f32]),
        f64f: fn(f64) -> f64,
        name: &str,
    ) {
        let mut rng = Rng::new(7);
        let x: Vec<f32> = (0..n).map(|_| rng.uniform() * 6.0).collect();
        let dy = rng.vec(n, 1.0);
        let mut out = vec![0.0; n];
        fwd(&mut out, &x);
        let want: Vec<f64> = x.iter().map(|&v| f64f(v as f64)).collect();
        assert_close(&format!("{name} forward"), &out, &want, 1e-5, 1e-3);
        let mut dx = vec![f32::NAN; n];
        bwd(&mut dx, &dy, &x);
        let want: Vec<f64> = x.iter().zip(&dy).map(|(&v, &g)| g as f64 * deriv(f64f, v as f64)).collect();
        assert_close(&format!("{name} backward"), &dx, &want, 1e-4, 1e-3);
    }

    #[test]
    fn gelu_tanh_matches_f64() {
        for n in [37, 3 * CHUNK + 5] {
            check_elementwise(n, gelu_tanh_forward, gelu_tanh_backward, gelu_tanh64, "gelu_tanh");
        }
        // Far tails: exact zero / identity limits, no NaN.
        let x = [-100.0f32, -20.0, 20.0, 100.0];
        let mut out = [0.0; 4];
        gelu_tanh_forward(&mut out, &x);
        assert!(out[0].abs() < 1e-30 && out[1].abs() < 1e-30);
        assert_eq!(&out[2..], &[20.0, 100.0]);
    }

    #[test]
    fn normal_cdf_is_accurate_in_both_tails() {
        let mut worst = 0.0f64;
        let mut x = -13.0f32;
        while x < 8.0 {
            let want = 0.5 * libm::erfc(-(x as f64) / std::f64::consts::SQRT_2);
            let gauss = (-0.5 * x as f64 * x as f64).exp();
            let (cdf, g) = normal_cdf(x);
            worst = worst.max((cdf as f64 - want).abs() / want);
            worst = worst.max((g as f64 - gauss).abs() / gauss);
            x += 0.00037;
        }
        assert!(worst < 5e-7, "normal_cdf relative error {worst:e}");
        assert!(normal_cdf(f32::NAN).0.is_nan());
        assert_eq!(normal_cdf(f32::INFINITY).0, 1.0);
    }

    #[test]
    fn gelu_erf_matches_f64() {
        for n in [37, 3 * CHUNK + 5] {
            check_elementwise(n, gelu_erf_forward, gelu_erf_backward, gelu_erf64, "gelu_erf");
        }
    }

    #[test]
    fn swiglu_matches_f64() {
        let mut rng = Rng::new(3);
        for (rows, ff) in [(3, 5), (70, 300)] {
            let gu: Vec<f32> = (0..rows * 2 * ff).map(|_| rng.uniform() * 5.0).collect();
            let dy = rng.vec(rows * ff, 1.0);
            let mut out = vec![0.0; rows * ff];
            swiglu_forward(&mut out, &gu, rows, ff);
            let mut want = vec![0.0f64; rows * ff];
            let mut dwant = vec![0.0f64; rows * 2 * ff];
            for r in 0..rows {
                for j in 0..ff {
                    let g = gu[r * 2 * ff + j] as f64;
                    let u = gu[r * 2 * ff + ff + j] as f64;
                    let d = dy[r * ff + j] as f64;
                    want[r * ff + j] = silu64(g) * u;
                    dwant[r * 2 * ff + j] = d * u * deriv(silu64, g);
                    dwant[r * 2 * ff + ff + j] = d * silu64(g);
                }
            }
            assert_close("swiglu forward", &out, &want, 1e-5, 1e-3);
            let mut dgu = vec![f32::NAN; rows * 2 * ff];
            swiglu_backward(&mut dgu, &dy, &gu, rows, ff);
            assert_close("swiglu backward", &dgu, &dwant, 1e-4, 1e-3);
        }
    }
}
