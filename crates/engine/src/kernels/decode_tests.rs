//! Tests of `decode.rs`: the decode linear against a naive product and one row at a time, bf16 weights against
//! their widened copy, decode attention against a naive one.

use super::*;
use crate::kernels::threads::test_util::*;

#[test]
fn linear_rows_matches_naive_and_is_row_independent() {
    let mut rng = Rng::new(11);
    for (rows, din, dout) in [(1, 3, 5), (3, 37, 10), (5, 64, 33), (8, 100, 301), (7, 8, 4), (16, 64, 10), (19, 24, 9)]
    {
        let x = rng.vec(rows * din, 1.0);
        let w = rng.vec(dout * din, 1.0);
        let b = rng.vec(dout, 1.0);
        let mut y = vec![0.0; rows * dout];
        linear_rows_forward(&mut y, &x, &w, Some(&b), rows, din, dout);
        let want: Vec<f64> = (0..rows * dout)
            .map(|i| {
                let (r, c) = (i / dout, i % dout);
                b[c] as f64 + (0..din).map(|k| x[r * din + k] as f64 * w[c * din + k] as f64).sum::<f64>()
            })
            .collect();
        assert_close("linear_rows", &y, &want, 1e-5, 1.0);
        // The vector tiles compute exactly the portable dot product.
        for (i, &v) in y.iter().enumerate() {
            let (r, c) = (i / dout, i % dout);
            assert_eq!(v, dot8(&w[c * din..(c + 1) * din], &x[r * din..(r + 1) * din]) + b[c], "({r}, {c})");
        }
        // Each row alone gives the same bits.
        for r in 0..rows {
            let mut y1 = vec![0.0; dout];
            linear_rows_forward(&mut y1, &x[r * din..(r + 1) * din], &w, Some(&b), 1, din, dout);
            assert_eq!(y1, y[r * dout..(r + 1) * dout], "row {r} of ({rows}, {din}, {dout})");
        }
    }
}

#[test]
fn bf16_weights_give_the_bits_of_their_widened_copy() {
    use crate::quant::bf16::{from_f32, to_f32};
    let mut rng = Rng::new(12);
    // Every path: 1 row (AVX2 tiles), pairs of rows with an odd one left, up to four pairs and more;
    // inner sizes with and without a tail past the chunks of eight; column counts off the tiles of four.
    for (rows, din, dout) in [(1, 64, 9), (2, 37, 10), (3, 576, 33), (8, 100, 301), (9, 8, 4), (5, 7, 6), (17, 40, 13)]
    {
        let x = rng.vec(rows * din, 1.0);
        let w: Vec<u16> = rng.vec(dout * din, 1.0).into_iter().map(from_f32).collect();
        let wide: Vec<f32> = w.iter().map(|&h| to_f32(h)).collect();
        let b = rng.vec(dout, 1.0);
        let (mut y, mut want) = (vec![f32::NAN; rows * dout], vec![f32::NAN; rows * dout]);
        linear_rows_forward(&mut y, &x, &w, Some(&b), rows, din, dout);
        linear_rows_forward(&mut want, &x, &wide, Some(&b), rows, din, dout);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&y), bits(&want), "({rows}, {din}, {dout})");
        for r in 0..rows {
            let mut y1 = vec![f32::NAN; dout];
            linear_rows_forward(&mut y1, &x[r * din..(r + 1) * din], &w, Some(&b), 1, din, dout);
            assert_eq!(bits(&y1), bits(&y[r * dout..(r + 1) * dout]), "row {r} of ({rows}, {din}, {dout})");
        }
    }
}

#[test]
fn decode_attention_matches_naive_with_gqa_and_window() {
    let mut rng = Rng::new(3);
    let (nh, nkv, hd) = (4, 2, 8);
    for window in [None, Some(3)] {
        let dims = AttnDims { n_heads: nh, n_kv_heads: nkv, head_dim: hd, window };
        let lens = [1usize, 5, 9];
        let qs = nh * hd + 7; // a stride wider than the query heads
        let q = rng.vec(lens.len() * qs, 1.0);
        let ks: Vec<Vec<f32>> = lens.iter().map(|&l| rng.vec(l * nkv * hd, 1.0)).collect();
        let vs: Vec<Vec<f32>> = lens.iter().map(|&l| rng.vec(l * nkv * hd, 1.0)).collect();
        let kr: Vec<&[f32]> = ks.iter().map(|v| &v[..]).collect();
        let vr: Vec<&[f32]> = vs.iter().map(|v| &v[..]).collect();
        let mut out = vec![0.0; lens.len() * nh * hd];
        decode_attention(&mut out, &q, qs, &kr, &vr, &dims);
        let mut want = vec![0.0f64; out.len()];
        for (b, &len) in lens.iter().enumerate() {
            let lo = window.map_or(0, |w: usize| len.saturating_sub(w));
            for h in 0..nh {
                let kv = h / (nh / nkv);
                let sc: Vec<f64> = (lo..len)
                    .map(|j| {
                        (0..hd)
                            .map(|c| q[b * qs + h * hd + c] as f64 * ks[b][j * nkv * hd + kv * hd + c] as f64)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|s| (s - m).exp()).sum();
                for c in 0..hd {
                    want[(b * nh + h) * hd + c] =
                        (lo..len).map(|j| (sc[j - lo] - m).exp() / z * vs[b][j * nkv * hd + kv * hd + c] as f64).sum();
                }
            }
        }
        assert_close("decode_attention", &out, &want, 1e-5, 1.0);
    }
}
