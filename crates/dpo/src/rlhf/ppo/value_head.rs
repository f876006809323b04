//! The value head: one linear unit on the policy's final hidden states (the trunk is shared with the
//! policy, as in TRL's `AutoModelForCausalLMWithValueHead`), and its AdamW.

/// `V(h) = w . h + b` on a final hidden state `h` (after the final norm). The value of completion token
/// `t` is read at the hidden state that predicts it (the state before the token is emitted).
#[derive(Clone, Debug, PartialEq)]
pub struct ValueHead {
    /// `[d]`
    pub w: Vec<f32>,
    pub b: f32,
}

impl ValueHead {
    /// All zeros: the first rollouts' values are 0 and their advantages the discounted rewards-to-go
    /// (whitened). TRL initialises `nn.Linear(d, 1)` randomly; a zero start makes the value loss's
    /// gradient reach the trunk only as `w` is learnt, so it cannot disturb the policy's first steps.
    pub fn zeros(d: usize) -> Self {
        ValueHead { w: vec![0.0; d], b: 0.0 }
    }

    pub fn fill_zero(&mut self) {
        self.w.iter_mut().for_each(|x| *x = 0.0);
        self.b = 0.0;
    }

    /// Values at the given rows of `hidden` (`[N, d]`), summed in f64.
    pub fn values(&self, hidden: &[f32], rows: impl Iterator<Item = usize>) -> Vec<f64> {
        let d = self.w.len();
        rows.map(|r| {
            let h = &hidden[r * d..(r + 1) * d];
            self.b as f64 + h.iter().zip(&self.w).map(|(&h, &w)| h as f64 * w as f64).sum::<f64>()
        })
        .collect()
    }

    /// Backward of [`ValueHead::values`]: for each row and value gradient `g`, `grad.w += g h`,
    /// `grad.b += g` and `dhidden[row] += g w` (`dhidden`: `[N, d]`).
    pub fn backward(
        &self,
        hidden: &[f32],
        rows: impl Iterator<Item = usize>,
        dvalues: &[f64],
        grad: &mut ValueHead,
        dhidden: &mut [f32],
    ) {
        let d = self.w.len();
        let mut dw = vec![0.0f64; d];
        let mut db = 0.0f64;
        for (r, &g) in rows.zip(dvalues) {
            let h = &hidden[r * d..(r + 1) * d];
            for ((acc, &h), (dh, &w)) in dw.iter_mut().zip(h).zip(dhidden[r * d..(r + 1) * d].iter_mut().zip(&self.w)) {
                *acc += g * h as f64;
                *dh += (g * w as f64) as f32;
            }
            db += g;
        }
        grad.w.iter_mut().zip(&dw).for_each(|(a, &g)| *a += g as f32);
        grad.b += db as f32;
    }

    /// `sum g^2` over `w` and `b` (for the global gradient norm).
    pub fn sum_squares(&self) -> f64 {
        self.w.iter().map(|&x| x as f64 * x as f64).sum::<f64>() + self.b as f64 * self.b as f64
    }

    pub fn scale(&mut self, c: f32) {
        self.w.iter_mut().for_each(|x| *x *= c);
        self.b *= c;
    }

    pub fn is_finite(&self) -> bool {
        self.b.is_finite() && self.w.iter().all(|x| x.is_finite())
    }
}

/// AdamW for the value head with `torch.optim.AdamW`'s defaults (betas 0.9, 0.999, eps 1e-8) and no weight
/// decay (HF decays no 1-D tensor), the same optimizer and learning rate as the policy (TRL optimises both
/// in one optimizer). State in f64: the head is `d + 1` numbers, so exactness costs nothing.
#[derive(Clone, Debug)]
pub struct HeadAdam {
    m: Vec<f64>,
    v: Vec<f64>,
    steps: u64,
}

impl HeadAdam {
    const BETA1: f64 = 0.9;
    const BETA2: f64 = 0.999;
    const EPS: f64 = 1e-8;

    pub fn new(d: usize) -> Self {
        HeadAdam { m: vec![0.0; d + 1], v: vec![0.0; d + 1], steps: 0 }
    }

    pub fn step(&mut self, head: &mut ValueHead, grad: &ValueHead, lr: f64) {
        self.steps += 1;
        let t = self.steps as f64;
        let bc1 = 1.0 - Self::BETA1.powf(t);
        let bc2_sqrt = (1.0 - Self::BETA2.powf(t)).sqrt();
        let params = head.w.iter_mut().chain(std::iter::once(&mut head.b));
        let grads = grad.w.iter().chain(std::iter::once(&grad.b));
        for (((p, &g), m), v) in params.zip(grads).zip(&mut self.m).zip(&mut self.v) {
            let g = g as f64;
            *m = Self::BETA1 * *m + (1.0 - Self::BETA1) * g;
            *v = Self::BETA2 * *v + (1.0 - Self::BETA2) * g * g;
            *p = (*p as f64 - lr / bc1 * *m / (v.sqrt() / bc2_sqrt + Self::EPS)) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_backward() {
        let head = ValueHead { w: vec![1.0, -2.0], b: 0.5 };
        let hidden = [1.0, 1.0, 3.0, 0.5, -1.0, 2.0]; // [3, 2]
                                                      // row 2: 0.5 + (-1) * 1 + 2 * -2 = -4.5; row 0: 0.5 + 1 - 2 = -0.5
        assert_eq!(head.values(&hidden, [2, 0].into_iter()), vec![-4.5, -0.5]);
        let mut grad = ValueHead::zeros(2);
        let mut dh = vec![0.0f32; 6];
        head.backward(&hidden, [2, 0].into_iter(), &[2.0, -1.0], &mut grad, &mut dh);
        // w: 2 * [-1, 2] - [1, 1] = [-3, 3]; b: 2 - 1 = 1; dh row 2 = 2 w, row 0 = -w
        assert_eq!((grad.w.clone(), grad.b), (vec![-3.0, 3.0], 1.0));
        assert_eq!(dh, vec![-1.0, 2.0, 0.0, 0.0, 2.0, -4.0]);
    }

    #[test]
    fn adam_first_step_moves_by_lr() {
        // Adam's first step is lr * g / (|g| + eps'), i.e. lr * sign(g) for |g| >> eps.
        let mut head = ValueHead { w: vec![1.0, 1.0], b: 0.0 };
        let grad = ValueHead { w: vec![3.0, -0.5], b: 0.0 };
        HeadAdam::new(2).step(&mut head, &grad, 0.1);
        assert!((head.w[0] - 0.9).abs() < 1e-6 && (head.w[1] - 1.1).abs() < 1e-6 && head.b == 0.0, "{head:?}");
    }
}
