//! Tests of `attention.rs` (forward against a direct reference, backward against finite differences).

use super::*;
use crate::batch::Batch;
use crate::kernels::threads::test_util::*;

fn visible(s: &Span, i: usize, j: usize, window: Option<usize>) -> bool {
    let (cs, ce, os) = (s.ctx_start as usize, s.ctx_end as usize, s.own_start as usize);
    let w = window.unwrap_or(usize::MAX);
    if (cs..ce).contains(&j) {
        (i - os) + (ce - j) < w
    } else {
        (os..=i).contains(&j) && i - j < w
    }
}

/// f64 attention: `(out, lse)`.
fn naive_forward(qkv: &[f64], d: &AttnDims, spans: &[Span]) -> (Vec<f64>, Vec<f64>) {
    let (nh, hd, qd, rep) = (d.n_heads, d.head_dim, d.qkv_dim(), d.rep());
    let n = qkv.len() / qd;
    let scale = 1.0 / (hd as f64).sqrt();
    let (mut out, mut lse) = (vec![0.0; n * nh * hd], vec![0.0; n * nh]);
    for s in spans {
        for i in s.start as usize..s.end as usize {
            for h in 0..nh {
                let kv = h / rep;
                let q = &qkv[i * qd + h * hd..][..hd];
                let keys: Vec<usize> = (0..n).filter(|&j| visible(s, i, j, d.window)).collect();
                let sc: Vec<f64> = keys
                    .iter()
                    .map(|&j| {
                        scale * q.iter().zip(&qkv[j * qd + (nh + kv) * hd..][..hd]).map(|(a, b)| a * b).sum::<f64>()
                    })
                    .collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                lse[i * nh + h] = m + z.ln();
                for (&j, &x) in keys.iter().zip(&sc) {
                    let p = (x - m).exp() / z;
                    let v = &qkv[j * qd + (nh + d.n_kv_heads + kv) * hd..][..hd];
                    for c in 0..hd {
                        out[(i * nh + h) * hd + c] += p * v[c];
                    }
                }
            }
        }
    }
    (out, lse)
}

/// f64 gradient of `sum(dout * out)` w.r.t. qkv, analytically.
fn naive_backward(qkv: &[f64], dout: &[f64], d: &AttnDims, spans: &[Span]) -> Vec<f64> {
    let (nh, hd, qd, rep) = (d.n_heads, d.head_dim, d.qkv_dim(), d.rep());
    let n = qkv.len() / qd;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut g = vec![0.0; n * qd];
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    for s in spans {
        for i in s.start as usize..s.end as usize {
            for h in 0..nh {
                let kv = h / rep;
                let (qo, ko, vo) = (h * hd, (nh + kv) * hd, (nh + d.n_kv_heads + kv) * hd);
                let q = qkv[i * qd + qo..][..hd].to_vec();
                let go = &dout[(i * nh + h) * hd..][..hd];
                let keys: Vec<usize> = (0..n).filter(|&j| visible(s, i, j, d.window)).collect();
                let sc: Vec<f64> = keys.iter().map(|&j| scale * dot(&q, &qkv[j * qd + ko..][..hd])).collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                let p: Vec<f64> = sc.iter().map(|x| (x - m).exp() / z).collect();
                let dp: Vec<f64> = keys.iter().map(|&j| dot(go, &qkv[j * qd + vo..][..hd])).collect();
                let dd: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for (t, &j) in keys.iter().enumerate() {
                    let ds = p[t] * (dp[t] - dd);
                    for c in 0..hd {
                        g[i * qd + qo + c] += scale * ds * qkv[j * qd + ko + c];
                        g[j * qd + ko + c] += scale * ds * q[c];
                        g[j * qd + vo + c] += p[t] * go[c];
                    }
                }
            }
        }
    }
    g
}

/// Two groups: a plain sequence of `seq` tokens and a shared prefix (prompt, chosen, rejected).
fn layout(seq: usize, prompt: usize, chosen: usize, rejected: usize) -> Batch {
    let mut b = Batch::default();
    let ids = |n: usize| vec![1u32; n];
    b.push_sequence(&ids(seq), 1);
    b.push_shared_prefix(&ids(prompt), &[&ids(chosen), &ids(rejected)]);
    b
}

fn run(dims: AttnDims, b: &Batch, seed: u64) {
    let mut rng = Rng::new(seed);
    let n = b.len();
    let (nh, hd, qd) = (dims.n_heads, dims.head_dim, dims.qkv_dim());
    let qkv = rng.vec(n * qd, 1.5);
    let dout = rng.vec(n * nh * hd, 1.0);
    let (mut out, mut lse) = (vec![f32::NAN; n * nh * hd], vec![f32::NAN; n * nh]);
    attention_forward(&mut out, &mut lse, &qkv, &dims, &b.spans, &b.groups, Precision::F32);
    let (q64, g64) = (to_f64(&qkv), to_f64(&dout));
    let (want_out, want_lse) = naive_forward(&q64, &dims, &b.spans);
    assert_close("attention out", &out, &want_out, 1e-5, 1e-1);
    assert_close("attention lse", &lse, &want_lse, 1e-5, 1.0);
    let mut dqkv = vec![f32::NAN; n * qd];
    attention_backward(&mut dqkv, &dout, &out, &lse, &qkv, &dims, &b.spans, &b.groups, Precision::F32);
    let want = naive_backward(&q64, &g64, &dims, &b.spans);
    assert_close("attention dqkv", &dqkv, &want, 1e-4, 1e-1);
}

const GQA: AttnDims = AttnDims { n_heads: 4, n_kv_heads: 2, head_dim: 8, window: None };

#[test]
fn naive_backward_matches_finite_differences() {
    let dims = AttnDims { n_heads: 4, n_kv_heads: 2, head_dim: 4, window: Some(4) };
    let b = layout(5, 3, 3, 2);
    let mut rng = Rng::new(40);
    let qd = dims.qkv_dim();
    let qkv = to_f64(&rng.vec(b.len() * qd, 1.0));
    let dout = to_f64(&rng.vec(b.len() * 16, 1.0));
    let g = naive_backward(&qkv, &dout, &dims, &b.spans);
    let mut x = qkv.clone();
    for i in 0..x.len() {
        let o = x[i];
        x[i] = o + 1e-6;
        let p: f64 = naive_forward(&x, &dims, &b.spans).0.iter().zip(&dout).map(|(a, b)| a * b).sum();
        x[i] = o - 1e-6;
        let m: f64 = naive_forward(&x, &dims, &b.spans).0.iter().zip(&dout).map(|(a, b)| a * b).sum();
        x[i] = o;
        let fd = (p - m) / 2e-6;
        assert!((fd - g[i]).abs() < 1e-6 * g[i].abs().max(1.0), "element {i}: fd {fd}, analytic {}", g[i]);
    }
}

#[test]
fn gqa_two_groups_with_shared_prefix() {
    run(GQA, &layout(9, 6, 4, 3), 41);
}

#[test]
fn blocks_span_several_query_blocks() {
    // A 150-token sequence (three blocks), a prompt of 70 with completions of 80 and 66.
    run(GQA, &layout(150, 70, 80, 66), 42);
    run(AttnDims { n_heads: 3, n_kv_heads: 3, head_dim: 16, window: None }, &layout(130, 65, 64, 1), 43);
    run(AttnDims { n_heads: 6, n_kv_heads: 2, head_dim: 8, window: None }, &layout(1, 1, 1, 1), 44);
}

#[test]
fn sliding_window() {
    let dims = AttnDims { window: Some(7), ..GQA };
    run(dims, &layout(20, 9, 6, 8), 45);
    run(AttnDims { window: Some(70), ..GQA }, &layout(150, 70, 80, 66), 46);
    run(AttnDims { window: Some(1), ..GQA }, &layout(5, 3, 2, 2), 47);
}

#[test]
fn three_completions_and_untouched_rows() {
    let mut b = Batch::default();
    b.push_shared_prefix(&[1; 5], &[&[1; 3], &[1; 4], &[1; 2]]);
    b.push_sequence(&[1; 4], 1);
    run(GQA, &b, 48);
    // A group with no spans: its dqkv rows are zeroed, its outputs left alone.
    let dims = GQA;
    let qd = dims.qkv_dim();
    let mut rng = Rng::new(49);
    let qkv = rng.vec(4 * qd, 1.0);
    let spans = [Span { start: 0, end: 2, own_start: 0, ctx_start: 0, ctx_end: 0 }];
    let groups = [0..2, 2..4];
    let mut out = vec![7.0; 4 * 32];
    let mut lse = vec![7.0; 4 * 4];
    attention_forward(&mut out, &mut lse, &qkv, &dims, &spans, &groups, Precision::F32);
    assert!(out[64..].iter().all(|&v| v == 7.0) && lse[8..].iter().all(|&v| v == 7.0));
    let mut dqkv = vec![f32::NAN; 4 * qd];
    attention_backward(&mut dqkv, &vec![1.0; 4 * 32], &out, &lse, &qkv, &dims, &spans, &groups, Precision::F32);
    assert!(dqkv[2 * qd..].iter().all(|&v| v == 0.0) && dqkv.iter().all(|v| v.is_finite()));
}

#[test]
#[should_panic(expected = "not inside one group")]
fn span_reading_another_group_is_refused() {
    let dims = GQA;
    let spans = [Span { start: 2, end: 4, own_start: 0, ctx_start: 0, ctx_end: 0 }];
    let mut out = vec![0.0; 4 * 32];
    let mut lse = vec![0.0; 16];
    attention_forward(&mut out, &mut lse, &vec![0.0; 4 * dims.qkv_dim()], &dims, &spans, &[0..2, 2..4], Precision::F32);
}

/// `(out, lse, dqkv)` of one forward and backward in `precision` on a pool of `threads`.
fn pass(dims: &AttnDims, b: &Batch, qkv: &[f32], dout: &[f32], precision: Precision, threads: usize) -> [Vec<f32>; 3] {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    pool.install(|| {
        let n = b.len();
        let (mut out, mut lse) = (vec![f32::NAN; n * dims.n_heads * dims.head_dim], vec![f32::NAN; n * dims.n_heads]);
        attention_forward(&mut out, &mut lse, qkv, dims, &b.spans, &b.groups, precision);
        let mut dqkv = vec![f32::NAN; n * dims.qkv_dim()];
        attention_backward(&mut dqkv, dout, &out, &lse, qkv, dims, &b.spans, &b.groups, precision);
        [out, lse, dqkv]
    })
}

/// bf16 products (autocast's SDPA): within bf16 rounding of the f64 reference, not the f32 numbers, and the
/// same bits for any thread count.
#[test]
fn bf16_products_within_rounding_and_deterministic() {
    let dims = AttnDims { n_heads: 4, n_kv_heads: 2, head_dim: 64, window: None };
    let b = layout(150, 70, 80, 66);
    let mut rng = Rng::new(50);
    let (n, nh, hd) = (b.len(), dims.n_heads, dims.head_dim);
    let mut qkv = rng.vec(n * dims.qkv_dim(), 1.5);
    crate::quant::bf16::round_in_place(&mut qkv);
    let dout = rng.vec(n * nh * hd, 1.0);
    let [out, lse, dqkv] = pass(&dims, &b, &qkv, &dout, Precision::Bf16, 2);
    let (q64, g64) = (to_f64(&qkv), to_f64(&dout));
    let (want_out, want_lse) = naive_forward(&q64, &dims, &b.spans);
    // bf16 keeps 8 bits of mantissa: a relative rounding of 2^-9 per operand.
    assert_close_norm("bf16 attention out", &out, &want_out, 1e-2);
    assert_close_norm("bf16 attention lse", &lse, &want_lse, 1e-2);
    assert_close_norm("bf16 attention dqkv", &dqkv, &naive_backward(&q64, &g64, &dims, &b.spans), 2e-2);
    let f32_out = &pass(&dims, &b, &qkv, &dout, Precision::F32, 2)[0];
    assert_ne!(&out, f32_out, "bf16 attention gave the f32 numbers: its products were not rounded");
    for threads in [1, 3] {
        let again = pass(&dims, &b, &qkv, &dout, Precision::Bf16, threads);
        for (what, (a, b)) in ["out", "lse", "dqkv"].iter().zip(again.iter().zip([&out, &lse, &dqkv])) {
            assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "{what}: {threads} threads differ");
        }
    }
}
