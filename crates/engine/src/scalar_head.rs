//! One linear unit on a decoder's final hidden states: the score of a reward model and the value head of
//! PPO (transformers' `AutoModelForSequenceClassification` with one label, whose layer is `score`).
//!
//! ```text
//! v(h) = w · h + b                      h: [d] a final hidden state (after the final norm)
//! ```
//! Sums are taken in f64 and rounded once. `w` is `[1, d]` (torch's `nn.Linear(d, 1).weight`), so the
//! optimizer decays it as HF decays `score.weight`; `b` (`[1]`) never decays. A caller that must not
//! decay `w` (PPO's value head) passes weight decay 0.

use crate::params::{ParamSet, Tensor};

/// `score.weight` `[1, d]` and `score.bias` `[1]`.
#[derive(Clone, Debug, PartialEq)]
pub struct ScalarHead {
    /// `[1, d]`
    pub w: Tensor,
    /// `[1]`
    pub b: Tensor,
}

impl ScalarHead {
    /// Tensor names, as transformers names the layer.
    pub const WEIGHT: &'static str = "score.weight";
    pub const BIAS: &'static str = "score.bias";

    /// All zeros (also the gradient buffer of a head of width `d`).
    pub fn zeros(d: usize) -> Self {
        ScalarHead { w: Tensor::zeros(&[1, d]), b: Tensor::zeros(&[1]) }
    }

    /// A head with weights `w` (`[d]` values) and bias `b`.
    pub fn new(w: Vec<f32>, b: f32) -> Self {
        ScalarHead { w: Tensor { shape: vec![1, w.len()], data: w }, b: Tensor { shape: vec![1], data: vec![b] } }
    }

    /// The hidden size `d` this head reads.
    pub fn width(&self) -> usize {
        self.w.data.len()
    }

    /// The bias as a number.
    pub fn bias(&self) -> f32 {
        self.b.data[0]
    }

    /// `w · hidden[r] + b` for each row `r` of `hidden` (`[N, d]`), in f64.
    pub fn forward(&self, hidden: &[f32], rows: impl IntoIterator<Item = usize>) -> Vec<f64> {
        let d = self.width();
        rows.into_iter()
            .map(|r| {
                let h = &hidden[r * d..(r + 1) * d]; // [d]
                self.w.data.iter().zip(h).map(|(&w, &x)| w as f64 * x as f64).sum::<f64>() + self.bias() as f64
            })
            .collect()
    }

    /// Backward of [`ScalarHead::forward`]: for each row `r` with value gradient `g` (in row order),
    /// `grad.w += g hidden[r]`, `grad.b += g` (both summed in f64, then added once) and
    /// `dhidden[r] += g w` (`dhidden`: `[N, d]`).
    pub fn backward(
        &self,
        hidden: &[f32],
        rows: impl IntoIterator<Item = usize>,
        dvalues: &[f64],
        grad: &mut ScalarHead,
        dhidden: &mut [f32],
    ) {
        let d = self.width();
        let mut dw = vec![0.0f64; d]; // [d]
        let mut db = 0.0f64;
        for (r, &g) in rows.into_iter().zip(dvalues) {
            let h = &hidden[r * d..(r + 1) * d]; // [d]
            let dh = &mut dhidden[r * d..(r + 1) * d]; // [d]
            for ((acc, &h), (dh, &w)) in dw.iter_mut().zip(h).zip(dh.iter_mut().zip(&self.w.data)) {
                *acc += g * h as f64;
                *dh += (g * w as f64) as f32;
            }
            db += g;
        }
        grad.w.data.iter_mut().zip(&dw).for_each(|(a, &g)| *a += g as f32);
        grad.b.data[0] += db as f32;
    }
}

impl ParamSet for ScalarHead {
    fn named(&self) -> Vec<(String, &Tensor)> {
        vec![(Self::WEIGHT.into(), &self.w), (Self::BIAS.into(), &self.b)]
    }

    fn named_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        vec![(Self::WEIGHT.into(), &mut self.w), (Self::BIAS.into(), &mut self.b)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::applies_weight_decay;

    #[test]
    fn forward_and_backward() {
        let head = ScalarHead::new(vec![1.0, -2.0], 0.5);
        let hidden = [1.0, 1.0, 3.0, 0.5, -1.0, 2.0]; // [3, 2]
                                                      // row 2: 0.5 + (-1) * 1 + 2 * -2 = -4.5; row 0: 0.5 + 1 - 2 = -0.5
        assert_eq!(head.forward(&hidden, [2, 0]), vec![-4.5, -0.5]);
        let mut grad = ScalarHead::zeros(2);
        let mut dh = vec![0.0f32; 6];
        head.backward(&hidden, [2, 0], &[2.0, -1.0], &mut grad, &mut dh);
        // w: 2 * [-1, 2] - [1, 1] = [-3, 3]; b: 2 - 1 = 1; dh row 2 = 2 w, row 0 = -w
        assert_eq!((grad.w.data.clone(), grad.bias()), (vec![-3.0, 3.0], 1.0));
        assert_eq!(dh, vec![-1.0, 2.0, 0.0, 0.0, 2.0, -4.0]);
        // Gradients accumulate.
        head.backward(&hidden, [1], &[1.0], &mut grad, &mut dh);
        assert_eq!((grad.w.data.clone(), grad.bias()), (vec![0.0, 3.5], 2.0));
    }

    #[test]
    fn names_shapes_and_decay_follow_transformers() {
        let head = ScalarHead::zeros(4);
        let named: Vec<(String, Vec<usize>)> = head.named().into_iter().map(|(n, t)| (n, t.shape.clone())).collect();
        assert_eq!(named, [("score.weight".to_string(), vec![1, 4]), ("score.bias".to_string(), vec![1])]);
        assert!(applies_weight_decay(&head.w.shape) && !applies_weight_decay(&head.b.shape));
        assert_eq!(ParamSet::numel(&head), 5);
    }
}
