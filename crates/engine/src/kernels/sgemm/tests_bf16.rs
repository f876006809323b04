//! The bf16 kernels (`vdpbf16ps`, and AMX tiles where the CPU has them) against an f64 reference on the
//! bf16-rounded operands, their packing's rounding against `quant::bf16::from_f32` bit for bit, and their
//! determinism.
//!
//! Bound: both operands are exactly representable after rounding and their products are exact in f32,
//! so the only error left is the f32 rounding of the sums, as in the f32 kernel: each element is within
//! `1e-6 sqrt(k + 1)` times the sum of the magnitudes it adds up (about 16x the expected `2^-24 sqrt(k)`
//! random-walk error, the f32 kernel's bound). An error from a missed rounding or a wrong pairing is of
//! order `2^-9` relative, thousands of times larger.

use super::*;
use crate::kernels::threads::test_util::Rng;
use crate::quant::bf16::{from_f32, to_f32};

fn have_bf16() -> bool {
    if !avx512_bf16_available() {
        eprintln!("no AVX512_BF16 on this CPU: bf16 kernel not tested");
    }
    avx512_bf16_available()
}

fn have_amx() -> bool {
    if !amx_available() {
        eprintln!("no AMX-BF16 on this CPU (or the OS refused the tiles): AMX kernel not tested");
    }
    amx_available()
}

/// The bf16 kernels this CPU runs, as `bf16_gemm_on`'s `amx` flag.
fn kernels() -> Vec<bool> {
    let mut ks = vec![];
    if have_bf16() {
        ks.push(false);
    }
    if have_amx() {
        ks.push(true);
    }
    ks
}

/// A test operand stored `[rows, cols]` row-major, or `[cols, rows]` when `t`.
fn view<T>(x: &[T], rows: usize, cols: usize, t: bool) -> Mat<T> {
    if t {
        Mat { ptr: x.as_ptr(), rs: 1, cs: rows }
    } else {
        Mat { ptr: x.as_ptr(), rs: cols, cs: 1 }
    }
}

fn round(x: f32) -> f32 {
    to_f32(from_f32(x))
}

/// `(bf16(A) . bf16(B), |bf16(A)| . |bf16(B)|)` in f64.
fn reference(a: Mat, b: Mat, m: usize, n: usize, k: usize) -> (Vec<f64>, Vec<f64>) {
    let mut c = vec![0.0f64; m * n];
    let mut s = vec![0.0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let (mut acc, mut abs) = (0.0f64, 0.0f64);
            for p in 0..k {
                // SAFETY: test views address their whole buffers.
                let (x, y) = unsafe { (*a.ptr.add(i * a.rs + p * a.cs), *b.ptr.add(p * b.rs + j * b.cs)) };
                let prod = round(x) as f64 * round(y) as f64;
                acc += prod;
                abs += prod.abs();
            }
            c[i * n + j] = acc;
            s[i * n + j] = abs;
        }
    }
    (c, s)
}

/// Checks `c` (row stride `ldc`) against `c0 + reference` within the bound above.
#[allow(clippy::too_many_arguments)]
fn assert_within(what: &str, c: &[f32], ldc: usize, c0: Option<&[f32]>, a: Mat, b: Mat, m: usize, n: usize, k: usize) {
    let (want, abs) = reference(a, b, m, n, k);
    for i in 0..m {
        for j in 0..n {
            let base = c0.map_or(0.0, |c0| c0[i * ldc + j] as f64);
            let (w, s) = (want[i * n + j] + base, abs[i * n + j] + base.abs());
            let tol = 1e-6 * ((k + 1) as f64).sqrt() * s.max(1e-30);
            let got = c[i * ldc + j] as f64;
            assert!((got - w).abs() <= tol, "{what}: C[{i}, {j}] = {got} want {w} (tolerance {tol:e})");
        }
    }
}

/// One product of random operands through `bf16_gemm_on(amx)` on `tasks` tasks, checked; returns C.
#[allow(clippy::too_many_arguments)]
fn check(
    amx: bool,
    rng: &mut Rng,
    m: usize,
    n: usize,
    k: usize,
    a_t: bool,
    b_t: bool,
    acc: bool,
    tasks: usize,
) -> Vec<f32> {
    let (a, b, c0) = (rng.vec(m * k, 1.0), rng.vec(k * n, 1.0), rng.vec(m * n, 1.0));
    let (av, bv) = (view(&a, m, k, a_t), view(&b, k, n, b_t));
    let mut c = if acc { c0.clone() } else { vec![f32::NAN; m * n] };
    // SAFETY: the views and C cover their buffers exactly.
    unsafe { bf16_gemm_on(amx, m, n, k, av, bv, c.as_mut_ptr(), n, acc, tasks) };
    let what = format!("amx {amx} {m}x{n}x{k} a_t {a_t} b_t {b_t} acc {acc} tasks {tasks}");
    assert_within(&what, &c, n, acc.then_some(&c0), av, bv, m, n, k);
    c
}

#[test]
fn bf16_matches_f64_reference_on_edges_and_transposes() {
    let mut rng = Rng::new(21);
    // Around the micro-tiles (8 x 48, or 8 x 32; AMX 32 x 32 of 16 x 16 tiles, 32 values of k a tile),
    // the A sliver (16 rows; AMX 32), the k block (512 = 256 pairs), with odd k (a zero-padded last pair),
    // k = 1 and k = 2.
    let shapes = [
        (33, 64, 40),
        (20, 100, 63),
        (16, 30, 9),
        (1, 1, 1),
        (5, 49, 1),
        (9, 33, 2),
        (1, 1, 301),
        (7, 47, 15),
        (8, 48, 32),
        (9, 49, 33),
        (17, 97, 511),
        (16, 96, 512),
        (15, 95, 513),
        (3, 200, 1025),
        (41, 5, 70),
        (2, 1001, 33),
        (301, 517, 263),
        (32, 32, 32),
        (31, 33, 31),
        (48, 16, 64),
        (65, 31, 97),
        (64, 64, 1537),
    ];
    for amx in kernels() {
        for (m, n, k) in shapes {
            for a_t in [false, true] {
                for b_t in [false, true] {
                    for acc in [false, true] {
                        check(amx, &mut rng, m, n, k, a_t, b_t, acc, 1);
                    }
                }
            }
        }
    }
}

#[test]
fn bf16_really_rounds_its_operands() {
    // The same product in f32 differs from the bf16 one by far more than the bound: the kernel is not
    // computing on unrounded operands.
    let (m, n, k) = (20, 50, 64);
    let mut rng = Rng::new(22);
    let (a, b) = (rng.vec(m * k, 1.0), rng.vec(k * n, 1.0));
    for amx in kernels() {
        let (mut c16, mut c32) = (vec![0.0f32; m * n], vec![0.0f32; m * n]);
        let (av, bv) = (view(&a, m, k, false), view(&b, k, n, false));
        // SAFETY: contiguous operands and C.
        unsafe {
            bf16_gemm_on(amx, m, n, k, av, bv, c16.as_mut_ptr(), n, false, 1);
            sgemm(m, n, k, av, bv, c32.as_mut_ptr(), n, false, 1);
        }
        let worst = c16.iter().zip(&c32).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(worst > 1e-3, "amx {amx}: bf16 and f32 products differ by only {worst}");
    }
}

#[test]
fn bf16_empty_dimensions_and_k_zero() {
    let mut rng = Rng::new(23);
    for amx in kernels() {
        for (m, n) in [(0, 5), (5, 0), (0, 0)] {
            check(amx, &mut rng, m, n, 7, false, false, false, 2);
        }
        for acc in [false, true] {
            let mut c = vec![3.0f32; 6];
            let e = Mat::<f32> { ptr: [].as_ptr(), rs: 0, cs: 1 };
            // SAFETY: k = 0 reads nothing; C is [2, 3].
            unsafe { bf16_gemm_on(amx, 2, 3, 0, e, e, c.as_mut_ptr(), 3, acc, 2) };
            assert_eq!(c, vec![if acc { 3.0 } else { 0.0 }; 6]);
        }
    }
}

#[test]
fn bf16_strided_operands_and_column_block_of_c() {
    // Neither stride 1 (the element-wise packing), and C a block of columns of a wider matrix (as
    // `matmul_cols` writes one LoRA module's columns): the columns around it are left alone.
    let (m, n, k, ldc, col) = (13, 50, 21, 61, 5);
    let mut rng = Rng::new(24);
    let (a, b) = (rng.vec(m * k * 2, 1.0), rng.vec(k * n * 3, 1.0));
    let av = Mat { ptr: a.as_ptr(), rs: 2 * k, cs: 2 };
    let bv = Mat { ptr: b.as_ptr(), rs: 3, cs: 3 * k };
    for (amx, acc) in kernels().into_iter().flat_map(|amx| [(amx, false), (amx, true)]) {
        let c0 = rng.vec(m * ldc, 1.0);
        let mut c = c0.clone();
        // SAFETY: the views stay inside `a` and `b`; C's rows of n floats from `col` stride ldc inside `c`.
        unsafe { bf16_gemm_on(amx, m, n, k, av, bv, c.as_mut_ptr().add(col), ldc, acc, 2) };
        let base = acc.then(|| c0[col..].to_vec());
        assert_within("strided", &c[col..], ldc, base.as_deref(), av, bv, m, n, k);
        for i in 0..m {
            let row = i * ldc;
            assert_eq!(c[row..row + col], c0[row..row + col], "row {i} before the block");
            assert_eq!(c[row + col + n..row + ldc], c0[row + col + n..row + ldc], "row {i} after the block");
        }
    }
}

#[test]
fn bf16_bitwise_identical_for_any_thread_count() {
    for amx in kernels() {
        for (m, n, k) in [(301, 517, 263), (1000, 60, 700), (37, 2000, 300), (100, 1000, 1100), (40, 2100, 1100)] {
            for (a_t, b_t) in [(false, true), (true, false), (false, false)] {
                let runs: Vec<Vec<f32>> = [1, 2, 3, 4]
                    .iter()
                    .map(|&tasks| {
                        let pool = rayon::ThreadPoolBuilder::new().num_threads(tasks).build().unwrap();
                        pool.install(|| check(amx, &mut Rng::new(25), m, n, k, a_t, b_t, true, tasks))
                    })
                    .collect();
                for r in &runs[1..] {
                    let same = r.iter().zip(&runs[0]).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "amx {amx} {m}x{n}x{k}");
                }
            }
        }
    }
}

/// As the f32 kernel's `splitting_k_across_calls_changes_no_bit`, for cuts at even `k` (a pair is one
/// step of the chain, so an odd cut regroups one pair): the `vdpbf16ps` kernel (AMX sums tiles of 32).
#[test]
fn bf16_splitting_k_at_even_offsets_changes_no_bit() {
    if !have_bf16() {
        return;
    }
    let (m, n) = (70, 100);
    for (k, cuts) in [(1400, vec![0, 640, 1280, 1400]), (301, vec![0, 2, 258, 301]), (40, vec![0, 14, 40])] {
        let mut rng = Rng::new(26);
        let (dy, x, c0) = (rng.vec(k * m, 1.0), rng.vec(k * n, 1.0), rng.vec(m * n, 1.0));
        let run = |ranges: &[(usize, usize)]| {
            let mut c = c0.clone();
            for &(k0, k1) in ranges {
                let a = Mat { ptr: dy[k0 * m..].as_ptr(), rs: 1, cs: m };
                let b = Mat { ptr: x[k0 * n..].as_ptr(), rs: n, cs: 1 };
                // SAFETY: the views address rows k0..k1 of dy and x; C is [m, n].
                unsafe { bf16_gemm_on(false, m, n, k1 - k0, a, b, c.as_mut_ptr(), n, true, 2) };
            }
            c
        };
        let whole = run(&[(0, k)]);
        let parts = run(&cuts.windows(2).map(|w| (w[0], w[1])).collect::<Vec<_>>());
        assert!(whole.iter().zip(&parts).all(|(x, y)| x.to_bits() == y.to_bits()), "k {k} cut at {cuts:?}");
    }
}

#[test]
fn bf16_stored_operand_gives_the_bits_of_its_widened_copy() {
    // B as bf16 bits (a stored weight) or as those values widened to f32: the same packed words.
    let (m, n, k) = (45, 130, 299);
    let mut rng = Rng::new(27);
    let x = rng.vec(m * k, 1.0);
    let w16: Vec<u16> = rng.vec(n * k, 1.0).iter().map(|&v| from_f32(v)).collect();
    let w32: Vec<f32> = w16.iter().map(|&h| to_f32(h)).collect();
    for (amx, b_t) in kernels().into_iter().flat_map(|amx| [(amx, false), (amx, true)]) {
        let (mut c16, mut c32) = (vec![0.0f32; m * n], vec![0.0f32; m * n]);
        // SAFETY: contiguous operands and C.
        unsafe {
            let a = view(&x, m, k, false);
            bf16_gemm_on(amx, m, n, k, a, view(&w16, k, n, b_t), c16.as_mut_ptr(), n, false, 2);
            bf16_gemm_on(amx, m, n, k, a, view(&w32, k, n, b_t), c32.as_mut_ptr(), n, false, 2);
        }
        assert!(c16.iter().zip(&c32).all(|(x, y)| x.to_bits() == y.to_bits()), "amx {amx} b_t {b_t}");
    }
}

/// Special values and random bit patterns: NaNs of both signs and any payload, infinities, zeros,
/// denormals, the largest finite values (which round to infinity), ties either way.
fn special_values() -> Vec<f32> {
    let mut bits = vec![
        0x7FC0_0000u32,
        0xFFC0_0000,
        0x7F80_0001,
        0xFF80_0001,
        0x7FFF_FFFF,
        0x7F80_0000,
        0xFF80_0000,
        0,
        0x8000_0000,
        1,
        0x8000_0001,
        0x0000_8000,
        0x0001_8000,
        0x007F_FFFF,
        0x807F_FFFF,
        0x7F7F_FFFF,
        0xFF7F_FFFF,
        0x7F7F_7FFF,
        0x3F80_8000,
        0x3F81_8000,
        0x3F80_8001,
        0xBF80_7FFF,
    ];
    let mut rng = Rng::new(28);
    bits.extend((0..2000).map(|_| rng.next_u64() as u32));
    bits.into_iter().map(f32::from_bits).collect()
}

#[test]
fn packing_rounds_exactly_as_from_f32() {
    if !have_bf16() {
        return;
    }
    let v = special_values();
    let kc = 2 * 16; // one transpose block of pairs
    let w = v.len() / kc;
    // Both vector layouts (pairs of rows, and pairs along k with a transpose) and the element-wise one.
    for (sx, sp) in [(1, w), (kc, 1), (2, 2 * w)] {
        let mut src = vec![0.0f32; (w * sx).max(kc * sp) + w * sx + kc * sp];
        for x in 0..w {
            for p in 0..kc {
                src[x * sx + p * sp] = v[x * kc + p];
            }
        }
        for x0 in (0..w).step_by(AW) {
            let lanes = AW.min(w - x0);
            let mut dst = vec![0u32; kc / 2 * AW];
            let s = pack::Src { ptr: src[x0 * sx..].as_ptr(), sx, sp };
            // SAFETY: the source holds `lanes x kc` elements at these strides; dst holds kc / 2 steps.
            unsafe { bf16::pack_pairs::<AW, f32>(dst.as_mut_ptr(), s, lanes, kc) };
            for x in 0..lanes {
                for p in 0..kc {
                    let want = from_f32(v[(x0 + x) * kc + p]);
                    let word = dst[p / 2 * AW + x];
                    let got = if p % 2 == 0 { word as u16 } else { (word >> 16) as u16 };
                    assert_eq!(got, want, "{:08x} packed at strides ({sx}, {sp})", v[(x0 + x) * kc + p].to_bits());
                }
            }
        }
    }
}

#[test]
fn rounding_in_place_matches_from_f32() {
    if !available() {
        return;
    }
    let v = special_values();
    let mut got = v[..v.len() - 5].to_vec(); // not a multiple of 16
                                             // SAFETY: `available` checked AVX-512F.
    let done = unsafe { round_to_bf16_in_place(&mut got) };
    assert_eq!(done, got.len() / 16 * 16);
    for (x, g) in v.iter().zip(&got[..done]) {
        assert_eq!(g.to_bits(), to_f32(from_f32(*x)).to_bits(), "{:08x}", x.to_bits());
    }
    assert_eq!(got[done..], v[done..got.len()], "the tail is left to the caller");
}

#[test]
fn f32_packing_with_rounding_matches_from_f32() {
    if !available() {
        return;
    }
    let v = special_values();
    let kc = 16;
    let w = v.len() / kc;
    for (sx, sp) in [(1, w), (kc, 1), (2, 2 * w)] {
        let mut src = vec![0.0f32; (w * sx).max(kc * sp) + w * sx + kc * sp];
        for x in 0..w {
            for p in 0..kc {
                src[x * sx + p * sp] = v[x * kc + p];
            }
        }
        for x0 in (0..w).step_by(AW) {
            let lanes = AW.min(w - x0);
            let mut dst = vec![0.0f32; kc * AW];
            let s = pack::Src { ptr: src[x0 * sx..].as_ptr(), sx, sp };
            // SAFETY: as above.
            unsafe { pack::pack::<AW, true>(dst.as_mut_ptr(), s, lanes, kc) };
            for x in 0..lanes {
                for p in 0..kc {
                    let x_ = v[(x0 + x) * kc + p];
                    let got = dst[p * AW + x].to_bits();
                    assert_eq!(got, (from_f32(x_) as u32) << 16, "{:08x} at strides ({sx}, {sp})", x_.to_bits());
                }
            }
        }
    }
}

#[test]
fn rounded_f32_product_matches_the_bf16_reference() {
    if !available() {
        return;
    }
    // The emulation on the f32 kernel: the same reference and bound as the bf16 kernel.
    let mut rng = Rng::new(29);
    for (m, n, k) in [(33, 64, 40), (9, 49, 17), (301, 517, 263)] {
        for (a_t, b_t) in [(false, true), (true, false)] {
            let (a, b) = (rng.vec(m * k, 1.0), rng.vec(k * n, 1.0));
            let (av, bv) = (view(&a, m, k, a_t), view(&b, k, n, b_t));
            let mut c = vec![f32::NAN; m * n];
            // SAFETY: the views and C cover their buffers exactly.
            unsafe { sgemm_rounded_to_bf16(m, n, k, av, bv, c.as_mut_ptr(), n, false, 2) };
            assert_within(&format!("rounded f32 {m}x{n}x{k}"), &c, n, None, av, bv, m, n, k);
        }
    }
}

#[test]
fn amx_a_tiles_round_exactly_as_from_f32_and_pad_with_zeros() {
    if !have_amx() {
        return;
    }
    let v = special_values();
    // Two halves (32 rows) and one (20); whole tiles (64 values of k) and a padded odd tail (37).
    for (w, kc) in [(32usize, 64usize), (20, 37), (32, 37)] {
        let tiles = kc.div_ceil(32);
        // Rows contiguous along k (the direct path), rows interleaved (pairs of rows and a transpose), and
        // neither stride 1.
        for (sx, sp) in [(kc, 1), (1, w), (2, 2 * w)] {
            let mut src = vec![0.0f32; w * sx + kc * sp];
            for x in 0..w {
                for p in 0..kc {
                    src[x * sx + p * sp] = v[(x * kc + p) % v.len()];
                }
            }
            let mut buf = vec![0xDEAD_BEEFu32; KC_MAX * 3 * AW + 16];
            let off = buf.as_ptr().align_offset(64);
            let dst = buf[off..].as_mut_ptr();
            let s = pack::Src { ptr: src.as_ptr(), sx, sp };
            // SAFETY: the source holds `w x kc` elements at these strides; dst is aligned and long enough.
            unsafe { amx::pack_a_tiles::<f32>(dst, s, w, kc) };
            let out = &buf[off..];
            for x in 0..w.div_ceil(16) * 16 {
                for p in 0..tiles * 32 {
                    let q = p / 2 % 16;
                    let word = out[(x / 16 * tiles + p / 32) * 256 + x % 16 * 16 + q];
                    let got = if p % 2 == 0 { word as u16 } else { (word >> 16) as u16 };
                    let want = if x < w && p < kc { from_f32(v[(x * kc + p) % v.len()]) } else { 0 };
                    assert_eq!(got, want, "row {x} k {p}, {w}x{kc} at strides ({sx}, {sp})");
                }
            }
        }
    }
}
