use super::double_quant::{DYNAMIC_MAP, STATS_BLOCK};
use super::*;
use crate::kernels::threads::test_util::Rng;

/// Largest gap between neighbouring NF4 values (between -1 and -0.6961928).
fn max_code_gap() -> f32 {
    NF4_CODE.windows(2).map(|w| w[1] - w[0]).fold(0.0, f32::max)
}

/// The value of element `e` read straight from the packed bytes (the definition, for the SIMD path).
fn reference_value(q: &Nf4, e: usize) -> f32 {
    let byte = q.packed()[e / 2];
    let nib = if e.is_multiple_of(2) { byte >> 4 } else { byte & 15 };
    NF4_CODE[nib as usize] * q.scales().get(e / BLOCK)
}

#[test]
fn code_book_is_bitsandbytes_nf4() {
    assert_eq!(NF4_CODE.len(), 16);
    assert!(NF4_CODE.windows(2).all(|w| w[0] < w[1]), "sorted");
    assert_eq!((NF4_CODE[0], NF4_CODE[7], NF4_CODE[15]), (-1.0, 0.0, 1.0));
    // Spot values as bitsandbytes prints them (4 decimals): -0.6962, 0.0796, 0.7230.
    assert_eq!(format!("{:.4} {:.4} {:.4}", NF4_CODE[1], NF4_CODE[8], NF4_CODE[14]), "-0.6962 0.0796 0.7230");
    assert_eq!(max_code_gap(), NF4_CODE[1] - NF4_CODE[0]);
}

#[test]
fn nibbles_pack_first_value_high() {
    let q = Nf4::quantize(&[1.0, -1.0, 0.0], false).unwrap();
    // 1.0 -> 15 (high nibble), -1.0 -> 0 (low); 0.0 -> 7, then the pad nibble, also 0.0's 7.
    assert_eq!(q.packed(), &[0xF0, 0x77]);
    assert_eq!(q.scales(), &Scales::F32(vec![1.0]));
    let mut out = [0.0; 3];
    q.dequantize_into(0, &mut out);
    assert_eq!(out, [1.0, -1.0, 0.0]);
}

#[test]
fn ties_go_to_the_lower_code_and_zero_blocks_stay_zero() {
    // absmax 1: scaled values are the values themselves, each midpoint exactly.
    let mut v = vec![1.0f32];
    v.extend((0..15).map(|i| (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0));
    let q = Nf4::quantize(&v, false).unwrap();
    for i in 0..15 {
        let e = i + 1;
        let byte = q.packed()[e / 2];
        let nib = if e.is_multiple_of(2) { byte >> 4 } else { byte & 15 };
        assert_eq!(nib as usize, i, "midpoint {i} rounds down");
    }
    let z = Nf4::quantize(&[0.0; 70], true).unwrap();
    let mut out = [1.0; 70];
    z.dequantize_into(0, &mut out);
    assert!(out.iter().all(|&x| x == 0.0));
}

#[test]
fn round_trip_error_is_within_half_the_largest_gap() {
    let mut rng = Rng::new(1);
    let half_gap = max_code_gap() / 2.0;
    for (len, scale) in [(64 * 40, 1.0), (1000, 0.02), (77, 300.0)] {
        let v = rng.vec(len, scale);
        let q = Nf4::quantize(&v, false).unwrap();
        let mut out = vec![0.0; len];
        q.dequantize_into(0, &mut out);
        for (e, (&x, &y)) in v.iter().zip(&out).enumerate() {
            let absmax = q.scales().get(e / BLOCK);
            // Half a gap of scaled error, plus the f32 roundings of the scaling and of code * absmax.
            let bound = absmax * half_gap * (1.0 + 1e-6) + absmax * 1e-7;
            assert!((x - y).abs() <= bound, "{len}/{e}: {x} -> {y}, bound {bound}");
        }
        // And every value takes its nearest code (the bound per interval, not just the largest gap).
        for (e, &x) in v.iter().enumerate() {
            let absmax = q.scales().get(e / BLOCK);
            let best = NF4_CODE.iter().map(|c| (x - c * absmax).abs()).fold(f32::INFINITY, f32::min);
            assert!((x - out[e]).abs() <= best + absmax * 1e-6, "{e}: not the nearest code");
        }
    }
}

#[test]
fn double_quant_recovers_absmax_within_the_dynamic_map_resolution() {
    let mut rng = Rng::new(2);
    // 600 blocks: three second-level blocks, the last partial.
    let v: Vec<f32> = (0..600 * BLOCK).map(|i| rng.uniform() * (1.0 + (i / BLOCK % 7) as f32)).collect();
    let plain = Nf4::quantize(&v, false).unwrap();
    let double = Nf4::quantize(&v, true).unwrap();
    assert_eq!(plain.packed(), double.packed(), "the nibbles do not depend on how absmax is stored");
    let (Scales::F32(absmax), Scales::Double(dq)) = (plain.scales(), double.scales()) else { panic!() };
    assert_eq!(dq.len(), 600);
    assert_eq!(dq.scales().len(), 3);
    let mean = (absmax.iter().map(|&a| a as f64).sum::<f64>() / 600.0) as f32;
    assert_eq!(dq.offset(), mean);
    // The map's largest gap is at its ends (-0.9930 .. -0.9789); half of it, times the block's scale.
    let half_gap = DYNAMIC_MAP.windows(2).map(|w| w[1] - w[0]).fold(0.0, f32::max) / 2.0;
    for (b, &a) in absmax.iter().enumerate() {
        let scale = dq.scales()[b / STATS_BLOCK];
        let bound = scale * half_gap * (1.0 + 1e-5) + a * 1e-6;
        assert!((dq.get(b) - a).abs() <= bound, "block {b}: {a} -> {}", dq.get(b));
    }
    assert_eq!(double.bytes(), 600 * BLOCK / 2 + 600 + 3 * 4 + 4);
    assert_eq!(plain.bytes(), 600 * BLOCK / 2 + 600 * 4);
}

#[test]
fn dequantize_any_range_matches_the_definition() {
    // The SIMD path takes even starts and runs of >= 32 inside a block; odd starts, short runs and block
    // crossings go through the portable loop. Both must give the defining value bit for bit.
    let mut rng = Rng::new(3);
    let v = rng.vec(64 * 9 + 13, 2.0);
    for double in [false, true] {
        let q = Nf4::quantize(&v, double).unwrap();
        for (start, len) in [(0, v.len()), (1, 100), (64, 64), (96, 300), (33, 31), (v.len() - 5, 5)] {
            let mut out = vec![f32::NAN; len];
            q.dequantize_into(start, &mut out);
            for (i, &y) in out.iter().enumerate() {
                assert_eq!(y.to_bits(), reference_value(&q, start + i).to_bits(), "{start}+{i}");
            }
        }
    }
}

#[test]
fn nf4_rejects_what_it_cannot_store() {
    assert_eq!(Nf4::quantize(&[1.0, f32::NAN], false), Err(QuantError::NonFinite { index: 1 }));
    let e = Matrix::new(vec![0.0; 5], 2, 3, Storage::Nf4 { double_quant: false }).unwrap_err();
    assert_eq!(e, QuantError::Shape { rows: 2, cols: 3, want: 6, got: 5 });
    let e = Nf4::from_parts(100, vec![0; 49], Scales::F32(vec![1.0; 2])).unwrap_err();
    assert_eq!(e, QuantError::Length { what: "packed nibbles", want: 50, got: 49 });
}

#[test]
fn bf16_rounds_to_nearest_even() {
    let one = 0x3F80u16;
    assert_eq!(bf16::from_f32(1.0), one);
    // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to the even mantissa (1.0).
    assert_eq!(bf16::from_f32(1.0 + 1.0 / 256.0), one);
    // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6: rounds up to even.
    assert_eq!(bf16::from_f32(1.0 + 3.0 / 256.0), one + 2);
    assert_eq!(bf16::from_f32(1.0 + 1.0 / 256.0 + 1e-6), one + 1);
    assert_eq!(bf16::from_f32(-2.0), 0xC000);
    assert_eq!(bf16::from_f32(f32::MAX), 0x7F80, "rounds past the largest bf16 to infinity");
    assert_eq!(bf16::from_f32(f32::NAN), 0x7FC0);
    assert_eq!(bf16::to_f32(0x3FC0), 1.5);
    let mut rng = Rng::new(4);
    let v = rng.vec(1000, 3.0);
    let m = Matrix::new(v.clone(), 10, 100, Storage::Bf16).unwrap();
    assert_eq!(m.bytes(), 2000);
    let w = m.to_f32();
    for (&x, &y) in v.iter().zip(&w) {
        assert_eq!(y, bf16::to_f32(bf16::from_f32(x)));
        assert!((x - y).abs() <= x.abs() / 256.0, "within half a bf16 ulp");
    }
}

/// `sum_k x[i, k] w[j, k]` in f64, and the sum of the magnitudes of its terms.
fn reference_xwt(x: &[f32], w: &[f32], n: usize, out: usize, inp: usize) -> (Vec<f64>, Vec<f64>) {
    let mut y = vec![0.0; n * out];
    let mut mag = vec![0.0; n * out];
    for i in 0..n {
        for j in 0..out {
            for k in 0..inp {
                let t = x[i * inp + k] as f64 * w[j * inp + k] as f64;
                y[i * out + j] += t;
                mag[i * out + j] += t.abs();
            }
        }
    }
    (y, mag)
}

/// The error bound of an f32 dot product of length `k` accumulated in any order with FMAs (each
/// partial sum rounded once): `k * u * sum |terms|`, `u = 2^-24`, plus `u * |start value|` when the sum
/// starts from a stored value, plus one rounding of the result.
fn assert_within_dot_bound(what: &str, got: &[f32], want: &[f64], mag: &[f64], start: &[f64], k: usize) {
    let u = f32::EPSILON as f64 / 2.0;
    for (i, &g) in got.iter().enumerate() {
        let bound = (k as f64 + 1.0) * u * (mag[i] + start[i].abs()) + u * want[i].abs();
        let err = (g as f64 - want[i]).abs();
        assert!(err <= bound, "{what}[{i}]: {g} vs {} (error {err:e} > bound {bound:e})", want[i]);
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    return super::simd::avx512();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

fn on_two_threads(f: impl FnOnce() + Send) {
    rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap().install(f)
}

/// Whether the tiled product `[m, k] . [k, n]` (tiles of `tile` columns) and the f32 one on the whole
/// weight both run on the crate's AVX-512 kernel, whose results do not depend on how the columns are cut
/// (mirrors `kernels::matmul::use_sgemm`: at least 4 rows, 32 columns and 2^15 multiply-adds).
fn same_kernel_as_f32(m: usize, n: usize, k: usize, tile: usize) -> bool {
    let sgemm = |cols: usize| m >= 4 && cols >= 32 && m * cols * k > 1 << 15;
    let last = n - (n.div_ceil(tile) - 1) * tile;
    avx512() && sgemm(n) && sgemm(tile.min(n)) && sgemm(last)
}

fn storages() -> [Storage; 4] {
    [Storage::F32, Storage::Bf16, Storage::Nf4 { double_quant: false }, Storage::Nf4 { double_quant: true }]
}

#[test]
fn linear_forward_is_the_product_with_the_widened_weight() {
    let mut rng = Rng::new(5);
    // Shapes: a real tiling (several tiles), a width that is not a multiple of 64, decode (n = 1).
    for (n, out, inp) in [(37, 300, 256), (9, 70, 100), (1, 130, 64)] {
        let w = rng.vec(out * inp, 0.5);
        let x = rng.vec(n * inp, 1.0);
        let b = rng.vec(out, 1.0);
        for storage in storages() {
            let m = Matrix::new(w.clone(), out, inp, storage).unwrap();
            let wf = m.to_f32();
            let (mut want, mag) = reference_xwt(&x, &wf, n, out, inp);
            let mut y = vec![f32::NAN; n * out];
            m.linear_forward(&mut y, &x, None, n, Precision::F32);
            let zero = vec![0.0; n * out];
            assert_within_dot_bound(&format!("{storage:?} {n}x{out}x{inp}"), &y, &want, &mag, &zero, inp);
            // With a bias the products add to it.
            let start: Vec<f64> = (0..n * out).map(|i| b[i % out] as f64).collect();
            want.iter_mut().zip(&start).for_each(|(w, s)| *w += s);
            let mut yb = vec![f32::NAN; n * out];
            m.linear_forward(&mut yb, &x, Some(&b), n, Precision::F32);
            assert_within_dot_bound(&format!("{storage:?} bias"), &yb, &want, &mag, &start, inp);
            // Tiling adds no rounding: on two threads (fixed tiles) the first shape's tiles and the whole
            // weight run on the same kernel, and the result is the f32 path's on the widened weight.
            on_two_threads(|| {
                let same = same_kernel_as_f32(n, out, inp, tile_len(out, inp, 16));
                assert!(same || n != 37 || !avx512(), "the bitwise case must run on AVX-512 CPUs");
                if same {
                    let f = Matrix::new(wf.clone(), out, inp, Storage::F32).unwrap();
                    let (mut yq, mut yf) = (vec![f32::NAN; n * out], vec![f32::NAN; n * out]);
                    m.linear_forward(&mut yq, &x, Some(&b), n, Precision::F32);
                    f.linear_forward(&mut yf, &x, Some(&b), n, Precision::F32);
                    assert_eq!(bits(&yq), bits(&yf), "{storage:?}: bitwise");
                }
            });
        }
    }
}

#[test]
fn linear_input_grad_is_the_product_with_the_widened_weight() {
    let mut rng = Rng::new(6);
    for (n, out, inp) in [(37, 256, 300), (9, 100, 70), (1, 64, 130)] {
        let w = rng.vec(out * inp, 0.5);
        let dy = rng.vec(n * out, 1.0);
        let dx0 = rng.vec(n * inp, 1.0);
        // dx = dy . W: the reference as x . (W^T)^T with W^T laid out [inp, out].
        let transpose = |w: &[f32]| -> Vec<f32> { (0..inp * out).map(|i| w[(i % out) * inp + i / out]).collect() };
        for storage in storages() {
            let m = Matrix::new(w.clone(), out, inp, storage).unwrap();
            let wt = transpose(&m.to_f32());
            let (mut want, mag) = reference_xwt(&dy, &wt, n, inp, out);
            let mut dx = vec![f32::NAN; n * inp];
            m.linear_input_grad(&mut dx, &dy, n, Accumulate::Overwrite, Precision::F32);
            let zero = vec![0.0; n * inp];
            assert_within_dot_bound(&format!("{storage:?} {n}x{out}x{inp}"), &dx, &want, &mag, &zero, out);
            let start: Vec<f64> = dx0.iter().map(|&v| v as f64).collect();
            want.iter_mut().zip(&start).for_each(|(w, s)| *w += s);
            let mut dxa = dx0.clone();
            m.linear_input_grad(&mut dxa, &dy, n, Accumulate::Add, Precision::F32);
            assert_within_dot_bound(&format!("{storage:?} +="), &dxa, &want, &mag, &start, out);
            on_two_threads(|| {
                let same = same_kernel_as_f32(n, inp, out, tile_len(inp, out, BLOCK));
                assert!(same || n != 37 || !avx512(), "the bitwise case must run on AVX-512 CPUs");
                if same {
                    let f = Matrix::new(m.to_f32(), out, inp, Storage::F32).unwrap();
                    let (mut dxq, mut dxf) = (dx0.clone(), dx0.clone());
                    m.linear_input_grad(&mut dxq, &dy, n, Accumulate::Add, Precision::F32);
                    f.linear_input_grad(&mut dxf, &dy, n, Accumulate::Add, Precision::F32);
                    assert_eq!(bits(&dxq), bits(&dxf), "{storage:?}: bitwise");
                }
            });
        }
    }
}

/// In a bf16 product a bf16 weight is used as stored (packed from its bits where the bf16 kernel runs,
/// widened tile by tile elsewhere): within the f32 bound of the product of the rounded operands, and
/// bitwise the bf16 product with the widened weight stored in f32 wherever both run on the same AVX-512
/// kernel. Forward with and without bias, input gradient overwriting and accumulating.
#[test]
fn bf16_products_of_a_bf16_weight_are_those_of_the_widened_weight() {
    let mut rng = Rng::new(9);
    let round = |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| bf16::to_f32(bf16::from_f32(x))).collect() };
    for (n, out, inp) in [(37, 300, 256), (9, 70, 101), (1, 130, 64)] {
        let m = Matrix::new(rng.vec(out * inp, 0.5), out, inp, Storage::Bf16).unwrap();
        let wf = m.to_f32();
        let f = Matrix::new(wf.clone(), out, inp, Storage::F32).unwrap();
        let (x, b, dy, dx0) = (rng.vec(n * inp, 1.0), rng.vec(out, 1.0), rng.vec(n * out, 1.0), rng.vec(n * inp, 1.0));
        on_two_threads(|| {
            let (want, mag) = reference_xwt(&round(&x), &wf, n, out, inp);
            let start: Vec<f64> = (0..n * out).map(|i| b[i % out] as f64).collect();
            let want: Vec<f64> = want.iter().zip(&start).map(|(w, s)| w + s).collect();
            let (mut y, mut yf) = (vec![f32::NAN; n * out], vec![f32::NAN; n * out]);
            m.linear_forward(&mut y, &x, Some(&b), n, Precision::Bf16);
            f.linear_forward(&mut yf, &x, Some(&b), n, Precision::Bf16);
            assert_within_dot_bound(&format!("bf16 {n}x{out}x{inp}"), &y, &want, &mag, &start, inp);
            let mut y0 = vec![f32::NAN; n * out];
            m.linear_forward(&mut y0, &x, None, n, Precision::Bf16);
            let shifted: Vec<f64> = want.iter().zip(&start).map(|(w, s)| w - s).collect();
            assert_within_dot_bound("bf16 no bias", &y0, &shifted, &mag, &vec![0.0; n * out], inp);

            let wt: Vec<f32> = (0..inp * out).map(|i| wf[(i % out) * inp + i / out]).collect(); // [inp, out]
            let (want, mag) = reference_xwt(&round(&dy), &wt, n, inp, out);
            let start: Vec<f64> = dx0.iter().map(|&v| v as f64).collect();
            let want: Vec<f64> = want.iter().zip(&start).map(|(w, s)| w + s).collect();
            let (mut dx, mut dxf) = (dx0.clone(), dx0.clone());
            m.linear_input_grad(&mut dx, &dy, n, Accumulate::Add, Precision::Bf16);
            f.linear_input_grad(&mut dxf, &dy, n, Accumulate::Add, Precision::Bf16);
            assert_within_dot_bound("bf16 dx +=", &dx, &want, &mag, &start, out);
            let mut dxo = vec![f32::NAN; n * inp];
            m.linear_input_grad(&mut dxo, &dy, n, Accumulate::Overwrite, Precision::Bf16);
            let shifted: Vec<f64> = want.iter().zip(&start).map(|(w, s)| w - s).collect();
            assert_within_dot_bound("bf16 dx =", &dxo, &shifted, &mag, &vec![0.0; n * inp], out);

            let same = same_kernel_as_f32(n, out, inp, tile_len(out, inp, 16))
                && same_kernel_as_f32(n, inp, out, tile_len(inp, out, BLOCK));
            assert!(same || n != 37 || !avx512(), "the bitwise case must run on AVX-512 CPUs");
            if same {
                assert_eq!(bits(&y), bits(&yf), "{n}x{out}x{inp} forward: bitwise");
                assert_eq!(bits(&dx), bits(&dxf), "{n}x{out}x{inp} input grad: bitwise");
            }
        });
    }
}

#[test]
fn decode_rows_are_the_row_kernel_on_the_widened_weight() {
    let mut rng = Rng::new(8);
    // 1100 rows of 128: widened by three parallel tasks of 513 rows.
    let (out, inp) = (1100, 128);
    let w = rng.vec(out * inp, 0.5);
    let b = rng.vec(out, 1.0);
    let x = rng.vec(3 * inp, 1.0);
    for storage in storages() {
        let m = Matrix::new(w.clone(), out, inp, storage).unwrap();
        let wf = m.to_f32();
        let mut want = vec![f32::NAN; 3 * out];
        crate::kernels::linear_rows_forward(&mut want, &x, &wf, Some(&b), 3, inp, out);
        let mut got = vec![f32::NAN; 3 * out];
        m.linear_rows_forward(&mut got, &x, Some(&b), 3);
        assert_eq!(bits(&got), bits(&want), "{storage:?}");
        // One row alone gives that row of the batch.
        let mut one = vec![f32::NAN; out];
        m.linear_rows_forward(&mut one, &x[inp..2 * inp], Some(&b), 1);
        assert_eq!(bits(&one), bits(&want[out..2 * out]), "{storage:?}: row independence");
    }
}

#[test]
fn products_do_not_depend_on_the_thread_count() {
    let (n, out, inp) = (40, 320, 192);
    let mut rng = Rng::new(7);
    let m = Matrix::new(rng.vec(out * inp, 1.0), out, inp, Storage::Nf4 { double_quant: true }).unwrap();
    let x = rng.vec(n * inp, 1.0);
    let dy = rng.vec(n * out, 1.0);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let mut y = vec![0.0; n * out];
            m.linear_forward(&mut y, &x, None, n, Precision::F32);
            let mut dx = vec![0.0; n * inp];
            m.linear_input_grad(&mut dx, &dy, n, Accumulate::Overwrite, Precision::F32);
            (y, dx)
        })
    };
    let (a, b) = (run(1), run(3));
    assert_eq!(bits(&a.0), bits(&b.0), "forward");
    assert_eq!(bits(&a.1), bits(&b.1), "input grad");
}

#[test]
fn memory_is_the_stored_bytes() {
    let (out, inp) = (256, 512);
    let w = vec![0.25f32; out * inp];
    let bytes = |s| Matrix::new(w.clone(), out, inp, s).unwrap().bytes();
    assert_eq!(bytes(Storage::F32), 4 * out * inp);
    assert_eq!(bytes(Storage::Bf16), 2 * out * inp);
    // 4.5 bits per weight; 4.127 with double quantisation (2048 blocks: 8 second-level scales).
    assert_eq!(bytes(Storage::Nf4 { double_quant: false }), out * inp / 2 + 4 * out * inp / 64);
    assert_eq!(bytes(Storage::Nf4 { double_quant: true }), out * inp / 2 + out * inp / 64 + 8 * 4 + 4);
    // The estimate without building: the same figures, odd sizes included.
    for (rows, cols) in [(out, inp), (3, 37), (1, 64 * 300 + 5)] {
        let w = vec![0.5f32; rows * cols];
        for s in storages() {
            assert_eq!(Matrix::new(w.clone(), rows, cols, s).unwrap().bytes(), s.bytes(rows * cols), "{s:?}");
        }
    }
}

/// A weight built from pieces of any length (a checkpoint read a block at a time) is the weight stored
/// whole: pieces that cut NF4 blocks and rows anywhere, an odd length and a partial last block.
#[test]
fn a_matrix_built_from_pieces_is_the_matrix_stored_whole() {
    let (rows, cols) = (7, 45); // 315 values: 4 whole NF4 blocks and 59 more
    let w = Rng::new(7).vec(rows * cols, 2.0);
    let cuts: [&[usize]; 4] = [&[315], &[1, 63, 64, 100, 87], &[64, 64, 64, 64, 59], &[200, 0, 115]];
    for storage in storages() {
        let whole = Matrix::new(w.clone(), rows, cols, storage).unwrap();
        for pieces in cuts {
            let mut b = MatrixBuilder::new(rows, cols, storage);
            let mut at = 0;
            for &n in pieces {
                b.push(&w[at..at + n]).unwrap();
                at += n;
            }
            assert_eq!(b.finish().unwrap(), whole, "{storage:?} in pieces {pieces:?}");
        }
        // Too few values, or too many, are refused; so is a non-finite one where it is quantised.
        let mut b = MatrixBuilder::new(rows, cols, storage);
        b.push(&w[..300]).unwrap();
        assert_eq!(b.finish(), Err(QuantError::Shape { rows, cols, want: 315, got: 300 }));
        let mut b = MatrixBuilder::new(rows, cols, storage);
        b.push(&w[..300]).unwrap();
        assert_eq!(b.push(&w[..16]), Err(QuantError::Shape { rows, cols, want: 315, got: 316 }));
        if storage != Storage::F32 {
            let mut b = MatrixBuilder::new(rows, cols, storage);
            b.push(&w[..100]).unwrap();
            assert_eq!(b.push(&[1.0, f32::NAN]), Err(QuantError::NonFinite { index: 101 }), "{storage:?}");
        }
    }
}

/// Lookups gathered from pieces cutting rows anywhere are those of the whole table.
#[test]
fn lookups_gathered_from_pieces_are_those_of_the_whole_table() {
    let (vocab, d) = (11, 5);
    let wte: Vec<f32> = (0..vocab * d).map(|i| i as f32 * 0.25 - 3.0).collect();
    let tokens = std::collections::BTreeSet::from([0, 3, 4, 10, 40]);
    let whole = Lookups::of(&wte, vocab, d, &tokens).unwrap();
    for pieces in [&[55][..], &[1, 2, 3, 4, 5, 40], &[5; 11], &[17, 0, 38]] {
        let mut g = Lookups::gather(vocab, d, &tokens);
        let mut at = 0;
        for &n in pieces {
            g.push(&wte[at..at + n]).unwrap();
            at += n;
        }
        assert_eq!(g.finish().unwrap(), whole, "pieces {pieces:?}");
    }
    let mut g = Lookups::gather(vocab, d, &tokens);
    g.push(&wte[..50]).unwrap();
    assert_eq!(g.push(&wte[..6]).unwrap_err(), QuantError::Shape { rows: 11, cols: 5, want: 55, got: 56 });
    assert_eq!(g.finish().unwrap_err(), QuantError::Shape { rows: 11, cols: 5, want: 55, got: 50 });
}
