//! One micro-batch across the ranks: rank `r` runs the contiguous share [`share_of`] of its rows with
//! the gradient scaled by the share's weight in the loss's mean, and the ranks' metrics are combined
//! into the micro-batch's (weighted means, in rank order). `--batch-size` stays the pairs of the whole
//! micro-batch, so the run's mathematics does not depend on the number of ranks.

use std::collections::BTreeMap;
use std::ops::Range;

use engine::model::{Grads, Model};
use engine::Decoder;

use super::world;
use crate::train::{BatchOutcome, TrainError, Workload, Workspace};

/// A share's weight in a micro-batch's mean: the batch's loss, gradient and metrics are the
/// weighted means of its shares'.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SplitWeight {
    /// Weight in the loss (and in every metric not in `metrics`): the share's pairs, or its tokens when
    /// the loss is a mean over tokens.
    pub loss: f64,
    /// Metrics that are means over something else (e.g. `logits/chosen`, over chosen tokens).
    pub metrics: BTreeMap<String, f64>,
}

/// The rows `rank` of `size` takes of `n`: contiguous, the first `n % size` ranks one more than the rest.
pub fn share_of(n: usize, rank: usize, size: usize) -> Range<usize> {
    let (q, r) = (n / size, n % size);
    let start = rank * q + rank.min(r);
    start..start + q + usize::from(rank < r)
}

/// [`Workload::run`] of `rows` on this rank's share of them (all of them with one process), with the
/// metrics, token count and finiteness of the whole of `rows`, the same on every rank. The gradient
/// added into `grads` is this share's part of the batch's (the ranks' parts sum to it, see
/// [`super::reduce_grads`]). A workload whose loss is not a weighted mean over rows
/// ([`Workload::split_weight`] `None`) runs whole on rank 0; the others add nothing.
pub fn run_share(
    workload: &dyn Workload,
    decoder: &Decoder,
    model: Model<'_>,
    grads: Option<(Grads<'_>, f64)>,
    rows: &[usize],
    ws: &mut Workspace,
) -> Result<BatchOutcome, TrainError> {
    let w = world();
    let (rank, size) = (w.rank(), w.size());
    if size == 1 || rows.is_empty() {
        return workload.run(decoder, model, grads, rows, ws);
    }
    let weights: Option<Vec<SplitWeight>> =
        (0..size).map(|r| workload.split_weight(&rows[share_of(rows.len(), r, size)])).collect();
    let (mine, factor, weight) = match &weights {
        Some(ws) => {
            let total: f64 = ws.iter().map(|s| s.loss).sum();
            let me = &ws[rank];
            let factor = if total > 0.0 { me.loss / total } else { 0.0 };
            (&rows[share_of(rows.len(), rank, size)], factor, me.clone())
        }
        None if rank == 0 => (rows, 1.0, SplitWeight { loss: 1.0, ..Default::default() }),
        None => (&rows[..0], 0.0, SplitWeight::default()),
    };
    let out = if mine.is_empty() {
        None
    } else {
        Some(workload.run(decoder, model, grads.map(|(g, s)| (g, s * factor)), mine, ws)?)
    };
    let parts = w.all_gather_bytes(&encode(out.as_ref(), &weight));
    combine(&parts)
}

/// A rank's outcome as bytes: `ran`, `finite`, tokens, then each metric's name, value and weight.
fn encode(out: Option<&BatchOutcome>, weight: &SplitWeight) -> Vec<u8> {
    let mut b = Vec::new();
    let Some(out) = out else { return vec![0] };
    b.push(1);
    b.push(out.finite as u8);
    b.extend(out.num_tokens.to_le_bytes());
    b.extend((out.metrics.len() as u32).to_le_bytes());
    for (k, v) in &out.metrics {
        let wk = weight.metrics.get(k).copied().unwrap_or(weight.loss);
        b.extend((k.len() as u32).to_le_bytes());
        b.extend(k.as_bytes());
        b.extend(v.to_bits().to_le_bytes());
        b.extend(wk.to_bits().to_le_bytes());
    }
    b
}

/// Reads what [`encode`] wrote.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        head.try_into().expect("split at N")
    }
    fn u32(&mut self) -> usize {
        u32::from_le_bytes(self.take()) as usize
    }
    fn f64(&mut self) -> f64 {
        f64::from_bits(u64::from_le_bytes(self.take()))
    }
}

/// The micro-batch's outcome from the ranks' (in rank order): metrics are weighted means over the ranks
/// that ran rows, tokens their sum, finite when every rank's loss was.
fn combine(parts: &[Vec<u8>]) -> Result<BatchOutcome, TrainError> {
    let mut finite = true;
    let mut num_tokens = 0u64;
    // name -> (sum of weight * value, sum of weights, first value)
    let mut sums: BTreeMap<String, (f64, f64, f64)> = BTreeMap::new();
    for part in parts {
        let mut r = Reader(part);
        if r.take::<1>()[0] == 0 {
            continue;
        }
        finite &= r.take::<1>()[0] == 1;
        num_tokens += u64::from_le_bytes(r.take());
        for _ in 0..r.u32() {
            let len = r.u32();
            let (name, rest) = r.0.split_at(len);
            r.0 = rest;
            let name = String::from_utf8_lossy(name).into_owned();
            let (v, wk) = (r.f64(), r.f64());
            let e = sums.entry(name).or_insert((0.0, 0.0, v));
            if wk != 0.0 {
                e.0 += wk * v;
                e.1 += wk;
            }
        }
    }
    let metrics = sums.into_iter().map(|(k, (s, w, first))| (k, if w != 0.0 { s / w } else { first })).collect();
    Ok(BatchOutcome { metrics, num_tokens, finite })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_the_rows_in_order() {
        for n in 0..12 {
            for size in 1..5 {
                let shares: Vec<_> = (0..size).map(|r| share_of(n, r, size)).collect();
                assert_eq!(shares[0].start, 0);
                assert_eq!(shares[size - 1].end, n);
                for pair in shares.windows(2) {
                    assert_eq!(pair[0].end, pair[1].start);
                    assert!(pair[0].len() >= pair[1].len() && pair[0].len() <= pair[1].len() + 1);
                }
            }
        }
    }

    #[test]
    fn metrics_combine_as_weighted_means() {
        let out = |loss: f64, logit: f64, tokens| BatchOutcome {
            metrics: [("loss".to_string(), loss), ("logits/chosen".to_string(), logit)].into(),
            num_tokens: tokens,
            finite: true,
        };
        let weight = |pairs: f64, chosen: f64| SplitWeight {
            loss: pairs,
            metrics: [("logits/chosen".to_string(), chosen)].into(),
        };
        let parts = [
            encode(Some(&out(1.0, 2.0, 10)), &weight(3.0, 30.0)),
            encode(None, &SplitWeight::default()),
            encode(Some(&out(2.0, 4.0, 5)), &weight(1.0, 10.0)),
        ];
        let got = combine(&parts).unwrap();
        assert_eq!(got.num_tokens, 15);
        assert!(got.finite);
        assert!((got.metrics["loss"] - 1.25).abs() < 1e-15);
        assert!((got.metrics["logits/chosen"] - 2.5).abs() < 1e-15);
        let nan = BatchOutcome { finite: false, ..out(f64::NAN, 0.0, 1) };
        let got = combine(&[encode(Some(&nan), &weight(1.0, 1.0)), parts[0].clone()]).unwrap();
        assert!(!got.finite && got.metrics["loss"].is_nan());
    }
}
