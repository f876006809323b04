//! Tests of `head.rs` (forward and backward against f64 and finite differences, over several cuts of
//! targets and vocabulary), and the timing of those cuts (ignored).

use super::*;
use crate::kernels::threads::test_util::*;

/// f64 reference: per target, the logits row, its log-sum-exp and the log-prob.
#[allow(clippy::type_complexity)]
fn naive(
    hidden: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    targets: &[Target],
    d: usize,
    v: usize,
) -> (Vec<Vec<f64>>, Vec<f64>, Vec<f64>) {
    let mut rows = vec![];
    let (mut lse, mut lp) = (vec![], vec![]);
    for t in targets {
        let h = &hidden[t.pos as usize * d..][..d];
        let bias = |j: usize| b.map_or(0.0, |b| b[j] as f64);
        let row: Vec<f64> =
            (0..v).map(|j| bias(j) + (0..d).map(|k| h[k] as f64 * w[j * d + k] as f64).sum::<f64>()).collect();
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let l = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        lp.push(row[t.token as usize] - l);
        lse.push(l);
        rows.push(row);
    }
    (rows, lse, lp)
}

/// A head's inputs: `hidden: [n, d]`, `w: [v, d]` and the targets.
struct Head {
    hidden: Vec<f32>,
    w: Vec<f32>,
    targets: Vec<Target>,
    d: usize,
    v: usize,
}

impl Head {
    /// Random inputs, several targets on one position (a shared prompt's end).
    fn random(n: usize, d: usize, v: usize, nt: usize, seed: u64) -> Head {
        let mut rng = Rng::new(seed);
        let hidden = rng.vec(n * d, 1.0);
        let w = rng.vec(v * d, 1.0);
        let mut targets: Vec<Target> =
            (0..nt).map(|_| Target { pos: rng.below(n) as u32, token: rng.below(v) as u32 }).collect();
        targets[1].pos = targets[0].pos;
        targets[nt - 1].pos = targets[0].pos;
        Head { hidden, w, targets, d, v }
    }

    /// `(logp, lse, logit sum)` of [`head_forward_blocked`] with the bias `b`.
    fn forward(&self, b: Option<&[f32]>, blocks: Blocks, prec: Precision) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let nt = self.targets.len();
        let (mut lp, mut lse, mut sum) = (vec![0.0; nt], vec![0.0; nt], vec![0.0; nt]);
        let (h, w, t) = (&self.hidden, &self.w, &self.targets);
        let w = HeadWeight::F32(w);
        head_forward_blocked(&mut lp, &mut lse, Some(&mut sum), None, h, w, b, t, self.d, self.v, blocks, prec);
        (lp, lse, sum)
    }

    /// [`head_backward_blocked`] without a bias, into `dh` and (when given) `dw`.
    fn backward(
        &self,
        dh: Option<&mut [f32]>,
        dw: Option<&mut [f32]>,
        g: &[f32],
        lse: &[f32],
        blocks: Blocks,
        prec: Precision,
    ) {
        let (h, w, t) = (&self.hidden, HeadWeight::F32(&self.w), &self.targets);
        head_backward_blocked(dh, dw, None, g, lse, h, w, None, t, self.d, self.v, blocks, prec);
    }

    /// The f64 reference with the bias `b`: per target, the logits row, its log-sum-exp and the log-prob.
    #[allow(clippy::type_complexity)]
    fn naive(&self, b: Option<&[f32]>) -> (Vec<Vec<f64>>, Vec<f64>, Vec<f64>) {
        naive(&self.hidden, &self.w, b, &self.targets, self.d, self.v)
    }
}

/// Target chunks and vocabulary blocks the tests cut the work into: one of each, several targets and
/// one vocabulary block, one target and several blocks, uneven both ways.
const CUTS: [(usize, usize); 5] = [(HEAD_TARGETS, 1 << 20), (16, 1 << 20), (HEAD_TARGETS, 5), (1, 8), (7, 3)];

/// [`CUTS`] for a vocabulary of `v`.
fn cuts(v: usize) -> impl Iterator<Item = Blocks> {
    CUTS.into_iter().map(move |(targets, cols)| Blocks { targets, cols: cols.min(v) })
}

#[test]
fn forward_matches_f64_across_blocks() {
    let (n, d, v, nt) = (20, 16, 37, 45);
    let head = Head::random(n, d, v, nt, 31);
    let bias = Rng::new(36).vec(v, 1.0);
    for b in [None, Some(&bias[..])] {
        let (rows, lse_w, lp_w) = head.naive(b);
        let sum_w: Vec<f64> = rows.iter().map(|r| r.iter().sum()).collect();
        for blocks in cuts(v) {
            let (lp, lse, sum) = head.forward(b, blocks, Precision::F32);
            let what = format!("{blocks:?}, bias {}", b.is_some());
            assert_close(&format!("logp {what}"), &lp, &lp_w, 1e-5, 1.0);
            assert_close(&format!("lse {what}"), &lse, &lse_w, 1e-5, 1.0);
            assert_close(&format!("logit sum {what}"), &sum, &sum_w, 1e-5, 1.0);
        }
    }
    // the public entry point, more targets than one pass over the vocabulary
    let nt = HEAD_TARGETS + 9;
    let Head { hidden, w, targets, .. } = Head::random(n, d, v, nt, 32);
    let (_, _, lp_w) = naive(&hidden, &w, None, &targets, d, v);
    let (mut lp, mut lse) = (vec![0.0; nt], vec![0.0; nt]);
    logprob_head_forward(&mut lp, &mut lse, None, None, &hidden, &w, None, &targets, d, v, Precision::F32);
    assert_close("logp (public)", &lp, &lp_w, 1e-5, 1.0);
}

/// A head stored in bf16 (a frozen model's, `crate::quant::FrozenEmbedding`) gives in a bf16 pass the
/// bits of the f32 head it was rounded from, over several cuts of the vocabulary (each block a product
/// with a range of its rows: `Matrix::linear_forward_rows`); in an f32 pass, those of the rounded head.
#[test]
fn a_stored_bf16_head_reads_as_the_f32_head_rounded() {
    let (n, d, v, nt) = (20, 48, 1100, 45);
    let head = Head::random(n, d, v, nt, 37);
    let stored = Matrix::new(head.w.clone(), v, d, crate::quant::Storage::Bf16).unwrap();
    let rounded = Head { w: stored.to_f32(), ..Head::random(n, d, v, nt, 37) };
    let targets = head.targets.len();
    for cols in [512, 1024, v] {
        let blocks = Blocks { targets, cols };
        for (prec, expected) in [(Precision::Bf16, &head), (Precision::F32, &rounded)] {
            let (mut lp, mut lse, mut sum) = (vec![0.0; targets], vec![0.0; targets], vec![0.0; targets]);
            let (h, t, w) = (&head.hidden, &head.targets, HeadWeight::Stored(&stored));
            head_forward_blocked(&mut lp, &mut lse, Some(&mut sum), None, h, w, None, t, d, v, blocks, prec);
            let want = expected.forward(None, blocks, prec);
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                (bits(&lp), bits(&lse), bits(&sum)),
                (bits(&want.0), bits(&want.1), bits(&want.2)),
                "{cols} {prec}"
            );
        }
    }
}

/// The input gradient through a stored bf16 head (a LoRA base's frozen embedding): from the forward's
/// `E_p[W]` and from recomputed logits, over several cuts of the vocabulary (each block a product with a
/// range of its rows, `Matrix::linear_input_grad_rows`), it is in a bf16 pass that of the f32 head it was
/// rounded from, up to f32 summation order (bitwise where both run the same AVX-512 kernel).
#[test]
fn a_stored_bf16_head_gives_the_input_gradient_of_the_f32_head() {
    let (n, d, v, nt) = (20, 48, 1100, 45);
    let head = Head::random(n, d, v, nt, 38);
    let stored = Matrix::new(head.w.clone(), v, d, crate::quant::Storage::Bf16).unwrap();
    let g = Rng::new(39).vec(nt, 1.0);
    let prec = Precision::Bf16;
    for cols in [512, 1024, v] {
        let blocks = Blocks { targets: nt, cols };
        // dhidden of one weight, from `expect` and from recomputed logits.
        let grads = |w: HeadWeight| -> (Vec<f32>, Vec<f32>) {
            let (mut lp, mut lse, mut expect) = (vec![0.0; nt], vec![0.0; nt], vec![0.0; nt * d]);
            let (h, t) = (&head.hidden, &head.targets);
            head_forward_blocked(&mut lp, &mut lse, None, Some(&mut expect), h, w, None, t, d, v, blocks, prec);
            let mut from_expect = vec![0.0; n * d];
            logprob_head_input_grad(&mut from_expect, &g, &expect, w, t, d, v, prec);
            let mut recomputed = vec![0.0; n * d];
            head_backward_blocked(Some(&mut recomputed), None, None, &g, &lse, h, w, None, t, d, v, blocks, prec);
            (from_expect, recomputed)
        };
        let (want_e, want_r) = grads(HeadWeight::F32(&head.w));
        let (got_e, got_r) = grads(HeadWeight::Stored(&stored));
        assert_close(
            &format!("{cols}: from E_p[W]"),
            &got_e,
            &want_e.iter().map(|&x| x as f64).collect::<Vec<_>>(),
            1e-5,
            1.0,
        );
        assert_close(
            &format!("{cols}: recomputed"),
            &got_r,
            &want_r.iter().map(|&x| x as f64).collect::<Vec<_>>(),
            1e-5,
            1.0,
        );
        assert!(want_e.iter().any(|&x| x != 0.0), "a zero gradient makes the check vacuous");
    }
}

#[test]
fn blocks_stay_within_the_scratch_and_cover_the_vocabulary() {
    for (targets, vocab) in [(1, 50257), (256, 50257), (1024, 49152), (5000, 151936), (3, 100)] {
        let b = Blocks::for_targets(targets, vocab);
        assert!(b.targets >= 1 && b.targets <= HEAD_TARGETS.min(targets.max(1)));
        assert!(b.cols >= 1 && b.cols <= vocab);
        assert!(b.targets * b.cols <= BLOCK_FLOATS.max(b.targets * COLS_ALIGN), "{b:?}");
        assert!(b.cols == vocab || b.cols.is_multiple_of(COLS_ALIGN), "{b:?}");
        let covered: usize = vocab_blocks(vocab, b.cols).map(|(v0, v1)| v1 - v0).sum();
        assert_eq!(covered, vocab);
    }
}

#[test]
fn backward_matches_f64_and_finite_differences() {
    let (n, d, v, nt) = (9, 6, 11, 13);
    let head = Head::random(n, d, v, nt, 33);
    let Head { hidden, w, targets, .. } = &head;
    let mut rng = Rng::new(34);
    let mut g = rng.vec(nt, 1.0);
    g[3] = 0.0;
    let (mut lp, mut lse) = (vec![0.0; nt], vec![0.0; nt]);
    logprob_head_forward(&mut lp, &mut lse, None, None, hidden, w, None, targets, d, v, Precision::F32);
    // L = sum_t g_t logp_t, differentiated numerically in f64.
    let loss = |h: &[f64], w: &[f64]| -> f64 {
        targets
            .iter()
            .zip(&g)
            .map(|(t, &g)| {
                let hr = &h[t.pos as usize * d..][..d];
                let row: Vec<f64> = (0..v).map(|j| (0..d).map(|k| hr[k] * w[j * d + k]).sum()).collect();
                let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let l = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                g as f64 * (row[t.token as usize] - l)
            })
            .sum()
    };
    let (h64, w64) = (to_f64(hidden), to_f64(w));
    let fd = |v0: &[f64], f: &dyn Fn(&[f64]) -> f64| -> Vec<f64> {
        let mut v = v0.to_vec();
        (0..v.len())
            .map(|i| {
                let o = v[i];
                v[i] = o + 1e-6;
                let p = f(&v);
                v[i] = o - 1e-6;
                let m = f(&v);
                v[i] = o;
                (p - m) / 2e-6
            })
            .collect()
    };
    let gh: Vec<f64> = fd(&h64, &|h| loss(h, &w64)).iter().map(|x| x + 1.0).collect();
    let gw: Vec<f64> = fd(&w64, &|w| loss(&h64, w)).iter().map(|x| x - 1.0).collect();
    for blocks in cuts(v) {
        let mut dh = vec![1.0f32; n * d];
        let mut dw = vec![-1.0f32; v * d];
        head.backward(Some(&mut dh), Some(&mut dw), &g, &lse, blocks, Precision::F32);
        assert_close(&format!("dhidden {blocks:?}"), &dh, &gh, 1e-4, 1e-2);
        assert_close(&format!("dw {blocks:?}"), &dw, &gw, 1e-4, 1e-2);
        let mut dh2 = vec![1.0f32; n * d];
        head.backward(Some(&mut dh2), None, &g, &lse, blocks, Precision::F32);
        assert_eq!(dh, dh2);
        let mut dw2 = vec![-1.0f32; v * d];
        head.backward(None, Some(&mut dw2), &g, &lse, blocks, Precision::F32);
        assert_eq!(dw, dw2);
    }
}

/// The forward's `expect` is `softmax(logits) . W` per target (against f64, with a bias, over every cut:
/// the running sum is brought to each block's new max), and leaves the log-probs as they were.
#[test]
fn expect_is_the_softmax_mean_of_the_rows() {
    let (n, d, v, nt) = (20, 16, 37, 45);
    let head = Head::random(n, d, v, nt, 38);
    let bias = Rng::new(39).vec(v, 3.0);
    let (rows, lse_w, _) = head.naive(Some(&bias));
    let w = &head.w;
    let want: Vec<f64> = rows
        .iter()
        .zip(&lse_w)
        .flat_map(|(row, l)| {
            let p: Vec<f64> = row.iter().map(|x| (x - l).exp()).collect();
            (0..d).map(move |k| (0..v).map(|j| p[j] * w[j * d + k] as f64).sum::<f64>()).collect::<Vec<_>>()
        })
        .collect();
    for blocks in cuts(v) {
        let (mut lp, mut lse, mut expect) = (vec![0.0; nt], vec![0.0; nt], vec![0.0; nt * d]);
        let (h, w, t) = (&head.hidden, HeadWeight::F32(&head.w), &head.targets);
        let b = Some(&bias[..]);
        head_forward_blocked(&mut lp, &mut lse, None, Some(&mut expect), h, w, b, t, d, v, blocks, Precision::F32);
        assert_close(&format!("expect {blocks:?}"), &expect, &want, 1e-5, 1.0);
        let (lp_alone, lse_alone, _) = head.forward(b, blocks, Precision::F32);
        assert_eq!((lp, lse), (lp_alone, lse_alone), "{blocks:?}");
    }
}

/// A frozen head's input gradient from `expect` is the recomputing backward's, in f32 and in bf16 (where
/// both round the softmax's product operands to bf16, in other places: autocast's distance), over every
/// cut, with targets sharing positions and a zero gradient among them.
#[test]
fn input_grad_from_expect_matches_the_recomputing_backward() {
    let (n, d, v, nt) = (24, 32, 600, 40);
    let head = Head::random(n, d, v, nt, 40);
    let mut g = Rng::new(41).vec(nt, 1.0);
    g[5] = 0.0;
    for (prec, tol) in [(Precision::F32, 1e-5), (Precision::Bf16, 1e-2)] {
        for blocks in cuts(v).chain([Blocks { targets: 16, cols: 512 }]) {
            let (mut lp, mut lse, mut expect) = (vec![0.0; nt], vec![0.0; nt], vec![0.0; nt * d]);
            let (h, w, t) = (&head.hidden, HeadWeight::F32(&head.w), &head.targets);
            head_forward_blocked(&mut lp, &mut lse, None, Some(&mut expect), h, w, None, t, d, v, blocks, prec);
            let mut recomputed = vec![0.5f32; n * d];
            head.backward(Some(&mut recomputed), None, &g, &lse, blocks, prec);
            let mut from_expect = vec![0.5f32; n * d];
            logprob_head_input_grad(&mut from_expect, &g, &expect, &head.w, t, d, v, prec);
            let want: Vec<f64> = recomputed.iter().map(|&x| x as f64).collect();
            assert_close(&format!("dhidden {prec} {blocks:?}"), &from_expect, &want, tol, 1.0);
        }
    }
}

/// Wall time of the head's forward and backward (with `dW`) on GPT-2's head and the bench's 1024
/// targets, bf16 products, cut as before this module's vocabulary blocks (256 targets, the whole
/// vocabulary) and as now, interleaved call by call so that a virtual machine's changing speed falls on
/// every cut alike. A measurement, not a test:
/// `cargo test --release -p dpo-engine --lib head_cut_timing -- --ignored --nocapture`
#[test]
#[ignore]
fn head_cut_timing() {
    crate::kernels::init_threads(std::thread::available_parallelism().map_or(1, |n| n.get()));
    let (n, d, v, nt) = (1280, 768, 50257, 1024);
    let mut rng = Rng::new(7);
    let hidden = rng.vec(n * d, 1.0);
    let w = rng.vec(v * d, 0.05);
    let targets: Vec<Target> = (0..nt).map(|i| Target { pos: (i + 256) as u32, token: rng.below(v) as u32 }).collect();
    let head = Head { hidden, w, targets, d, v };
    let g = rng.vec(nt, 1.0);
    let cut = |targets, cols| Blocks { targets, cols };
    let cuts =
        [cut(256, v), Blocks::for_targets(nt, v), cut(1024, 2048), cut(1024, 1024), cut(1024, 1536), cut(512, 2048)];
    let mut best = vec![(f64::INFINITY, f64::INFINITY); cuts.len()];
    let (mut dh, mut dw) = (vec![0.0; n * d], vec![0.0; v * d]);
    for _ in 0..5 {
        for (i, &blocks) in cuts.iter().enumerate() {
            let start = std::time::Instant::now();
            let (_, lse, _) = head.forward(None, blocks, Precision::Bf16);
            let forward = start.elapsed().as_secs_f64();
            head.backward(Some(&mut dh), Some(&mut dw), &g, &lse, blocks, Precision::Bf16);
            let backward = start.elapsed().as_secs_f64() - forward;
            best[i] = (best[i].0.min(forward), best[i].1.min(backward));
        }
    }
    for (b, (f, bw)) in cuts.iter().zip(best) {
        println!("{:5} targets x {:5} columns: forward {f:.3} s, backward {bw:.3} s (best of 5)", b.targets, b.cols);
    }
}

#[test]
fn logits_forward_is_a_plain_product() {
    let Head { hidden, w, .. } = Head::random(3, 5, 7, 2, 35);
    let mut out = vec![0.0; 3 * 7];
    logits_forward(&mut out, &hidden, &w, 5, 7);
    let want: Vec<f64> = (0..3)
        .flat_map(|r| {
            let (h, w) = (&hidden, &w);
            (0..7).map(move |j| (0..5).map(|k| h[r * 5 + k] as f64 * w[j * 5 + k] as f64).sum())
        })
        .collect();
    assert_close("logits", &out, &want, 1e-5, 1.0);
}
