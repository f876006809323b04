use super::*;
use crate::kernels::threads::test_util::Rng;

/// A test operand stored `[rows, cols]` row-major, or `[cols, rows]` when `t`.
fn view(x: &[f32], rows: usize, cols: usize, t: bool) -> Mat {
    if t {
        Mat { ptr: x.as_ptr(), rs: 1, cs: rows }
    } else {
        Mat { ptr: x.as_ptr(), rs: cols, cs: 1 }
    }
}

/// `(A . B, |A| . |B|)` in f64, for operands given as views.
fn reference(a: Mat, b: Mat, m: usize, n: usize, k: usize) -> (Vec<f64>, Vec<f64>) {
    let mut c = vec![0.0f64; m * n];
    let mut s = vec![0.0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let (mut acc, mut abs) = (0.0f64, 0.0f64);
            for p in 0..k {
                // SAFETY: test views address their whole buffers.
                let (x, y) = unsafe { (*a.ptr.add(i * a.rs + p * a.cs), *b.ptr.add(p * b.rs + j * b.cs)) };
                acc += x as f64 * y as f64;
                abs += (x as f64 * y as f64).abs();
            }
            c[i * n + j] = acc;
            s[i * n + j] = abs;
        }
    }
    (c, s)
}

/// Runs one product through `sgemm` with `tasks` tasks and checks it against the f64 reference: the error
/// of each element is at most `1e-6 sqrt(k)` times the sum of the magnitudes it adds up. Returns C.
#[allow(clippy::too_many_arguments)]
fn check(rng: &mut Rng, m: usize, n: usize, k: usize, a_t: bool, b_t: bool, acc: bool, tasks: usize) -> Vec<f32> {
    let a = rng.vec(m * k, 1.0);
    let b = rng.vec(k * n, 1.0);
    let c0 = rng.vec(m * n, 1.0);
    let (av, bv) = (view(&a, m, k, a_t), view(&b, k, n, b_t));
    let mut c = if acc { c0.clone() } else { vec![f32::NAN; m * n] };
    // SAFETY: the views and C cover their buffers exactly.
    unsafe { sgemm(m, n, k, av, bv, c.as_mut_ptr(), n, acc, tasks) };
    let (want, abs) = reference(av, bv, m, n, k);
    for i in 0..m * n {
        let (w, s) = if acc { (want[i] + c0[i] as f64, abs[i] + c0[i].abs() as f64) } else { (want[i], abs[i]) };
        let tol = 1e-6 * ((k + 1) as f64).sqrt() * s.max(1e-30);
        assert!(
            (c[i] as f64 - w).abs() <= tol,
            "{m}x{n}x{k} a_t {a_t} b_t {b_t} acc {acc} tasks {tasks}: C[{}, {}] = {} want {w}",
            i / n,
            i % n,
            c[i]
        );
    }
    c
}

#[test]
fn matches_f64_reference_on_edges_and_transposes() {
    if !available() {
        eprintln!("no AVX-512F: sgemm not tested");
        return;
    }
    let mut rng = Rng::new(11);
    // Sizes around the micro-tile (8 x 48, or 8 x 32 for n = 30, 64, 100), the A sliver (16 rows) and the
    // k block (256), with every remainder of the f32 micro-kernel's loop unrolled by four.
    let shapes = [
        (33, 64, 40),
        (20, 100, 64),
        (16, 30, 9),
        (1, 1, 1),
        (1, 1, 300),
        (7, 47, 15),
        (8, 48, 16),
        (9, 49, 17),
        (17, 97, 255),
        (16, 96, 256),
        (15, 95, 257),
        (3, 200, 513),
        (41, 5, 70),
        (2, 1001, 33),
        (301, 517, 263),
    ];
    for (m, n, k) in shapes {
        for a_t in [false, true] {
            for b_t in [false, true] {
                for acc in [false, true] {
                    check(&mut rng, m, n, k, a_t, b_t, acc, 1);
                }
            }
        }
    }
}

#[test]
fn empty_dimensions() {
    if !available() {
        return;
    }
    let mut rng = Rng::new(12);
    for (m, n) in [(0, 5), (5, 0), (0, 0)] {
        check(&mut rng, m, n, 7, false, false, false, 2);
    }
    // k = 0: overwrite gives zeros, accumulate leaves C.
    for acc in [false, true] {
        let mut c = vec![3.0f32; 6];
        let e = Mat { ptr: [].as_ptr(), rs: 0, cs: 1 };
        // SAFETY: k = 0 reads nothing; C is [2, 3].
        unsafe { sgemm(2, 3, 0, e, e, c.as_mut_ptr(), 3, acc, 2) };
        assert_eq!(c, vec![if acc { 3.0 } else { 0.0 }; 6]);
    }
}

#[test]
fn strided_operands_and_row_stride() {
    if !available() {
        return;
    }
    // Neither stride 1 (the element-wise packing path), and C with a row stride wider than n.
    let (m, n, k) = (13, 50, 21);
    let mut rng = Rng::new(13);
    let a = rng.vec(m * k * 2, 1.0);
    let b = rng.vec(k * n * 3, 1.0);
    let av = Mat { ptr: a.as_ptr(), rs: 2 * k, cs: 2 };
    let bv = Mat { ptr: b.as_ptr(), rs: 3, cs: 3 * k };
    let ldc = n + 5;
    let mut c = vec![7.0f32; m * ldc];
    // SAFETY: the views stay inside `a` and `b`; C's rows of n floats stride ldc inside `c`.
    unsafe { sgemm(m, n, k, av, bv, c.as_mut_ptr(), ldc, false, 2) };
    let (want, abs) = reference(av, bv, m, n, k);
    for i in 0..m {
        for j in 0..n {
            let tol = 1e-6 * (k as f64).sqrt() * abs[i * n + j];
            assert!((c[i * ldc + j] as f64 - want[i * n + j]).abs() <= tol, "C[{i}, {j}]");
        }
        assert!(c[i * ldc + n..(i + 1) * ldc].iter().all(|&v| v == 7.0), "padding of row {i} written");
    }
}

#[test]
fn bitwise_identical_for_any_thread_count() {
    if !available() {
        return;
    }
    // Row splits (tall) and column splits (wide), with edges, more k blocks than one, accumulating.
    for (m, n, k) in [(301, 517, 263), (1000, 60, 300), (37, 2000, 300)] {
        for (a_t, b_t) in [(false, true), (true, false), (false, false)] {
            let runs: Vec<Vec<f32>> = [1, 2, 3, 4]
                .iter()
                .map(|&tasks| {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(tasks).build().unwrap();
                    pool.install(|| check(&mut Rng::new(14), m, n, k, a_t, b_t, true, tasks))
                })
                .collect();
            for r in &runs[1..] {
                assert!(r.iter().zip(&runs[0]).all(|(x, y)| x.to_bits() == y.to_bits()), "{m}x{n}x{k}");
            }
        }
    }
}

/// Accumulating a product over `k` in one call or in several calls over consecutive ranges of `k` (as a
/// weight gradient summed over the tokens of one batch, or of its pairs one at a time) gives the same bits:
/// every element is one FMA chain in `k` order from C's value.
#[test]
fn splitting_k_across_calls_changes_no_bit() {
    if !available() {
        return;
    }
    let (m, n) = (70, 100);
    for (k, cuts) in [(700, vec![0, 320, 640, 700]), (300, vec![0, 1, 257, 300]), (40, vec![0, 13, 40])] {
        let mut rng = Rng::new(15);
        // dW[m, n] += dY^T[m, k] . X[k, n], both stored token-major as in a linear layer's backward.
        let (dy, x, c0) = (rng.vec(k * m, 1.0), rng.vec(k * n, 1.0), rng.vec(m * n, 1.0));
        let run = |ranges: &[(usize, usize)]| {
            let mut c = c0.clone();
            for &(k0, k1) in ranges {
                let a = Mat { ptr: dy[k0 * m..].as_ptr(), rs: 1, cs: m };
                let b = Mat { ptr: x[k0 * n..].as_ptr(), rs: n, cs: 1 };
                // SAFETY: the views address rows k0..k1 of dy and x; C is [m, n].
                unsafe { sgemm(m, n, k1 - k0, a, b, c.as_mut_ptr(), n, true, 2) };
            }
            c
        };
        let whole = run(&[(0, k)]);
        let parts = run(&cuts.windows(2).map(|w| (w[0], w[1])).collect::<Vec<_>>());
        assert!(whole.iter().zip(&parts).all(|(x, y)| x.to_bits() == y.to_bits()), "k {k} cut at {cuts:?}");
    }
}

#[test]
fn tile_width_follows_padding() {
    assert_eq!(tile_vectors(768), 3);
    assert_eq!(tile_vectors(50257), 3);
    assert_eq!(tile_vectors(64), 2);
    assert_eq!(tile_vectors(100), 2);
    assert_eq!(tile_vectors(20), 2);
    assert_eq!(tile_vectors(96), 3);
}

#[test]
fn partitions_are_disjoint_and_cover_c() {
    for (m, n, tasks) in [(1024, 3072, 2), (3072, 768, 2), (50257, 768, 2), (5, 7, 4), (100, 1000, 3), (9, 9, 16)] {
        let parts = partition(m, n, tasks, AW, 48);
        assert!(!parts.is_empty() && parts.len() <= tasks);
        let mut seen = vec![0u8; m * n];
        for (rows, cols) in parts {
            for i in rows {
                for j in cols.clone() {
                    seen[i * n + j] += 1;
                }
            }
        }
        assert!(seen.iter().all(|&s| s == 1), "{m}x{n} on {tasks}");
    }
}
