use super::*;
use crate::kernels::precision::Bf16Kernel;
use crate::kernels::threads::test_util::*;

thread_local! {
    /// Test-only switch: bf16 products started on this thread skip the bf16 kernel (the emulation
    /// runs), so that both paths can be compared in one test without touching other tests' threads.
    pub(crate) static EMULATE_BF16: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn naive(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, a_t: bool, b_t: bool) -> Vec<f64> {
    let mut c = vec![0.0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            for p in 0..k {
                let av = if a_t { a[p * m + i] } else { a[i * k + p] };
                let bv = if b_t { b[j * k + p] } else { b[p * n + j] };
                s += av as f64 * bv as f64;
            }
            c[i * n + j] = s;
        }
    }
    c
}

#[test]
fn matmul_all_transposes_and_accumulate() {
    let mut rng = Rng::new(5);
    // The last shape is above the parallel threshold.
    for (m, n, k) in [(1, 1, 1), (3, 5, 7), (17, 33, 9), (70, 90, 80)] {
        for a_t in [false, true] {
            for b_t in [false, true] {
                for acc in [Accumulate::Overwrite, Accumulate::Add] {
                    let a = rng.vec(m * k, 1.0);
                    let b = rng.vec(k * n, 1.0);
                    let c0 = rng.vec(m * n, 1.0);
                    let add = acc == Accumulate::Add;
                    let mut c = if add { c0.clone() } else { vec![f32::NAN; m * n] };
                    matmul(&mut c, &a, &b, m, n, k, a_t, b_t, acc, Precision::F32);
                    let mut want = naive(&a, &b, m, n, k, a_t, b_t);
                    if add {
                        want.iter_mut().zip(&c0).for_each(|(w, &c)| *w += c as f64);
                    }
                    assert_close(&format!("matmul {m}x{n}x{k} {a_t} {b_t} {acc:?}"), &c, &want, 1e-5, 1.0);
                }
            }
        }
    }
    // k = 0: overwrite gives zeros, accumulate leaves C.
    let mut c = vec![f32::NAN; 6];
    matmul(&mut c, &[], &[], 2, 3, 0, false, false, Accumulate::Overwrite, Precision::F32);
    assert_eq!(c, vec![0.0; 6]);
}

#[test]
fn matmul_cols_reads_and_writes_column_blocks() {
    // C = cols 3..3+n of a [m, 11] matrix; A = cols 2..2+k of a [m, 9] matrix (or cols 1..1+m of a
    // [k, 9] one, transposed); B likewise inside [k, 13] (or [n, 13]).
    let mut rng = Rng::new(12);
    let (m, n, k, alpha) = (6, 5, 4, 0.5f32);
    for a_t in [false, true] {
        for b_t in [false, true] {
            for acc in [Accumulate::Overwrite, Accumulate::Add] {
                let a_rows = if a_t { k } else { m };
                let b_rows = if b_t { n } else { k };
                let (a_wide, b_wide) = (rng.vec(a_rows * 9, 1.0), rng.vec(b_rows * 13, 1.0));
                let a_col = if a_t { 1 } else { 2 };
                let take = |w: &[f32], ld: usize, col: usize, rows: usize, cols: usize| -> Vec<f32> {
                    (0..rows).flat_map(|i| w[i * ld + col..i * ld + col + cols].to_vec()).collect()
                };
                let a = take(&a_wide, 9, a_col, a_rows, if a_t { m } else { k });
                let b = take(&b_wide, 13, 2, b_rows, if b_t { k } else { n });
                let c0 = rng.vec(m * 11, 1.0);
                let mut c = c0.clone();
                let (av, bv) = (Cols { data: &a_wide, ld: 9, col: a_col }, Cols { data: &b_wide, ld: 13, col: 2 });
                matmul_cols(&mut c, 11, 3, av, a_t, bv, b_t, (m, n, k), alpha, acc, Precision::F32);
                let prod = naive(&a, &b, m, n, k, a_t, b_t);
                let mut want: Vec<f64> = c0.iter().map(|&v| v as f64).collect();
                for i in 0..m {
                    for j in 0..n {
                        let keep = if acc == Accumulate::Add { want[i * 11 + 3 + j] } else { 0.0 };
                        want[i * 11 + 3 + j] = keep + alpha as f64 * prod[i * n + j];
                    }
                }
                assert_close(&format!("matmul_cols {a_t} {b_t} {acc:?}"), &c, &want, 1e-5, 1.0);
            }
        }
    }
}

#[test]
#[should_panic(expected = "outside")]
fn matmul_cols_refuses_a_block_past_the_row() {
    let (a, b) = (vec![1.0f32; 8], vec![1.0f32; 8]);
    let mut c = vec![0.0f32; 8];
    matmul_cols(
        &mut c,
        4,
        3,
        Cols::all(&a, 2),
        false,
        Cols::all(&b, 2),
        false,
        (4, 2, 2),
        1.0,
        Accumulate::Add,
        Precision::F32,
    );
}

#[test]
fn matmul_is_bitwise_the_same_on_one_and_two_threads() {
    // Large enough for the parallel path (and, on AVX-512 CPUs, the crate's own kernels).
    let (m, n, k) = (301, 517, 263);
    let mut rng = Rng::new(9);
    for prec in Precision::ALL {
        for (a_t, b_t) in [(false, true), (true, false), (false, false), (true, true)] {
            let a = rng.vec(m * k, 1.0);
            let b = rng.vec(k * n, 1.0);
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                pool.install(|| {
                    let mut c = vec![f32::NAN; m * n];
                    matmul(&mut c, &a, &b, m, n, k, a_t, b_t, Accumulate::Overwrite, prec);
                    c
                })
            };
            let (c1, c2) = (run(1), run(2));
            assert!(c1.iter().zip(&c2).all(|(x, y)| x.to_bits() == y.to_bits()), "{prec} {a_t} {b_t}");
            let (a, b) = if prec == Precision::Bf16 { (rounded(&a), rounded(&b)) } else { (a, b) };
            assert_close("matmul 301x517x263", &c1, &naive(&a, &b, m, n, k, a_t, b_t), 1e-4, 1.0);
        }
    }
}

fn rounded(x: &[f32]) -> Vec<f32> {
    use crate::quant::bf16::{from_f32, to_f32};
    x.iter().map(|&v| to_f32(from_f32(v))).collect()
}

/// The f32 rounding of a bf16 product is that of an f32 one (the rounded operands and their products
/// are exact in f32): relative to `max(|C|, 1)`, `2e-6 sqrt(k + 1)` holds the random-walk error of `k`
/// f32 additions (`2^-24 sqrt(k)` per unit of partial sum, which grows to about `sqrt(k) / 3` here)
/// with room, and is ~100x below what a missed rounding (`2^-9` per operand) would leave.
fn bf16_tolerance(k: usize) -> f64 {
    2e-6 * ((k + 1) as f64).sqrt()
}

/// `matmul` in bf16 on each path: the bf16 kernel, the emulation (`EMULATE_BF16`: the f32 kernel rounding
/// as it packs), and the `gemm` crate on rounded copies (shapes too thin or small for the kernels):
/// every one within the bound of the f64 product of the rounded operands, so they agree with each other
/// within f32 reassociation (not bitwise: `vdpbf16ps` groups the sums by pairs).
#[test]
fn matmul_bf16_on_every_path() {
    let mut rng = Rng::new(15);
    let native = Bf16Kernel::detect() != Bf16Kernel::Emulated;
    if !native {
        eprintln!("no AVX512_BF16 on this CPU: only the emulated bf16 paths are tested");
    }
    let mut differs = false;
    for (m, n, k) in [(3, 5, 7), (17, 33, 9), (70, 90, 80), (40, 100, 1), (33, 64, 41)] {
        for (a_t, b_t) in [(false, false), (false, true), (true, false), (true, true)] {
            for acc in [Accumulate::Overwrite, Accumulate::Add] {
                let (a, b, c0) = (rng.vec(m * k, 1.0), rng.vec(k * n, 1.0), rng.vec(m * n, 1.0));
                let mut want = naive(&rounded(&a), &rounded(&b), m, n, k, a_t, b_t);
                if acc == Accumulate::Add {
                    want.iter_mut().zip(&c0).for_each(|(w, &c)| *w += c as f64);
                }
                let run = |emulate: bool| {
                    let mut c = if acc == Accumulate::Add { c0.clone() } else { vec![f32::NAN; m * n] };
                    EMULATE_BF16.set(emulate);
                    matmul(&mut c, &a, &b, m, n, k, a_t, b_t, acc, Precision::Bf16);
                    EMULATE_BF16.set(false);
                    c
                };
                let (c_native, c_emulated) = (run(false), run(true));
                let what = format!("bf16 {m}x{n}x{k} {a_t} {b_t} {acc:?}");
                assert_close(&format!("{what} native"), &c_native, &want, bf16_tolerance(k), 1.0);
                assert_close(&format!("{what} emulated"), &c_emulated, &want, bf16_tolerance(k), 1.0);
                differs |= c_native.iter().zip(&c_emulated).any(|(x, y)| x.to_bits() != y.to_bits());
            }
        }
    }
    assert!(differs || !native, "the emulation switch changed no bit: it did not reach the kernel choice");
    // k = 0: overwrite gives zeros, accumulate leaves C.
    for acc in [Accumulate::Overwrite, Accumulate::Add] {
        let mut c = vec![2.0f32; 6];
        matmul(&mut c, &[], &[], 2, 3, 0, false, false, acc, Precision::Bf16);
        assert_eq!(c, vec![if acc == Accumulate::Add { 2.0 } else { 0.0 }; 6]);
    }
}

/// `matmul_cols` in bf16 on column blocks of wider matrices: with `alpha = 1` on the kernels, with
/// `alpha != 1` on the `gemm` crate's rounded copies; the columns around C's block are left alone.
#[test]
fn matmul_cols_bf16_on_column_blocks() {
    let mut rng = Rng::new(16);
    let (m, n, k, c_ld, c_col) = (40, 64, 41, 70, 3);
    for alpha in [1.0f32, 0.5] {
        for (a_t, b_t) in [(false, true), (true, false)] {
            let (a_rows, a_cols) = if a_t { (k, m) } else { (m, k) };
            let (b_rows, b_cols) = if b_t { (n, k) } else { (k, n) };
            let (a_wide, b_wide) = (rng.vec(a_rows * (a_cols + 4), 1.0), rng.vec(b_rows * (b_cols + 6), 1.0));
            let take = |w: &[f32], ld: usize, col: usize, rows: usize, cols: usize| -> Vec<f32> {
                (0..rows).flat_map(|i| w[i * ld + col..i * ld + col + cols].to_vec()).collect()
            };
            let a = take(&a_wide, a_cols + 4, 2, a_rows, a_cols);
            let b = take(&b_wide, b_cols + 6, 5, b_rows, b_cols);
            let (av, bv) =
                (Cols { data: &a_wide, ld: a_cols + 4, col: 2 }, Cols { data: &b_wide, ld: b_cols + 6, col: 5 });
            let c0 = rng.vec(m * c_ld, 1.0);
            let mut c = c0.clone();
            matmul_cols(&mut c, c_ld, c_col, av, a_t, bv, b_t, (m, n, k), alpha, Accumulate::Add, Precision::Bf16);
            let prod = naive(&rounded(&a), &rounded(&b), m, n, k, a_t, b_t);
            let mut want: Vec<f64> = c0.iter().map(|&v| v as f64).collect();
            for i in 0..m {
                for j in 0..n {
                    want[i * c_ld + c_col + j] += alpha as f64 * prod[i * n + j];
                }
            }
            assert_close(&format!("bf16 cols alpha {alpha} {a_t} {b_t}"), &c, &want, bf16_tolerance(k), 1.0);
        }
    }
}

#[test]
fn linear_forward_and_backward() {
    let mut rng = Rng::new(6);
    for (rows, i, o) in [(4, 3, 5), (300, 20, 70)] {
        let x = rng.vec(rows * i, 1.0);
        let w = rng.vec(o * i, 1.0);
        let b = rng.vec(o, 1.0);
        let mut y = vec![f32::NAN; rows * o];
        linear_forward(&mut y, &x, &w, Some(&b), rows, i, o, Precision::F32);
        let mut want = naive(&x, &w, rows, o, i, false, true);
        for r in 0..rows {
            for j in 0..o {
                want[r * o + j] += b[j] as f64;
            }
        }
        assert_close("linear forward", &y, &want, 1e-5, 1.0);
        let mut y2 = vec![f32::NAN; rows * o];
        linear_forward(&mut y2, &x, &w, None, rows, i, o, Precision::F32);
        assert_close("linear forward no bias", &y2, &naive(&x, &w, rows, o, i, false, true), 1e-5, 1.0);

        let dy = rng.vec(rows * o, 1.0);
        let mut dx = vec![1.0f32; rows * i];
        let mut dw = vec![2.0f32; o * i];
        let mut db = vec![3.0f32; o];
        let dims = LinearDims { rows, inp: i, out: o };
        let grads = LinearGrads { w: Some(&mut dw), b: Some(&mut db) };
        linear_backward(Some(&mut dx), Accumulate::Add, grads, &dy, &x, &w, dims, Precision::F32);
        let gx: Vec<f64> = naive(&dy, &w, rows, i, o, false, false).iter().map(|v| v + 1.0).collect();
        let gw: Vec<f64> = naive(&dy, &x, o, i, rows, true, false).iter().map(|v| v + 2.0).collect();
        let gb: Vec<f64> = (0..o).map(|j| 3.0 + (0..rows).map(|r| dy[r * o + j] as f64).sum::<f64>()).collect();
        assert_close("linear dx", &dx, &gx, 1e-5, 1.0);
        assert_close("linear dw", &dw, &gw, 1e-5, 1.0);
        assert_close("linear db", &db, &gb, 1e-5, 1.0);
        let mut dx2 = vec![f32::NAN; rows * i];
        let no_grads = LinearGrads { w: None, b: None };
        linear_backward(Some(&mut dx2), Accumulate::Overwrite, no_grads, &dy, &x, &w, dims, Precision::F32);
        assert_close("linear dx overwrite", &dx2, &naive(&dy, &w, rows, i, o, false, false), 1e-5, 1.0);
    }
}

#[test]
fn adds() {
    let mut rng = Rng::new(8);
    for n in [5, 3 * CHUNK + 1] {
        let a = rng.vec(n, 1.0);
        let b = rng.vec(n, 1.0);
        let mut c = vec![0.0; n];
        add3(&mut c, &a, &b);
        let mut a2 = a.clone();
        add_inplace(&mut a2, &b);
        for i in 0..n {
            assert_eq!(c[i], a[i] + b[i]);
            assert_eq!(a2[i], a[i] + b[i]);
        }
    }
}
