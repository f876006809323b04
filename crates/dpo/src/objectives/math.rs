//! Scalar functions shared by the losses, written to stay finite where the naive forms overflow.

/// `log(sigmoid(x))`, as `torch.nn.functional.logsigmoid`: `min(x, 0) - log1p(exp(-|x|))`.
pub(crate) fn log_sigmoid(x: f64) -> f64 {
    x.min(0.0) - (-x.abs()).exp().ln_1p()
}

/// `sigmoid(x) = 1 / (1 + exp(-x))`, without overflow for large `|x|`.
pub(crate) fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// `log(1 - exp(x))` for `x < 0`, branching at `-ln 2` as TRL's ORPO `log1mexp` does.
pub(crate) fn log1mexp(x: f64) -> f64 {
    if x < -std::f64::consts::LN_2 {
        (-x.exp()).ln_1p()
    } else {
        (-x.exp_m1()).ln()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_at_the_extremes() {
        assert_eq!(log_sigmoid(1000.0), 0.0);
        assert_eq!(log_sigmoid(-1000.0), -1000.0);
        assert!((log_sigmoid(0.0) + std::f64::consts::LN_2).abs() < 1e-16);
        assert_eq!(sigmoid(1000.0), 1.0);
        assert_eq!(sigmoid(-1000.0), 0.0);
        assert!((sigmoid(0.3) + sigmoid(-0.3) - 1.0).abs() < 1e-16);
        for x in [-50.0, -3.0, -0.7, -0.69, -1e-3] {
            let naive = (1.0 - f64::exp(x)).ln();
            assert!((log1mexp(x) - naive).abs() <= 1e-9 * naive.abs() + 1e-20, "{x}");
        }
        // log(1 - exp(-1e-12)) = log(1e-12 - 5e-25 + ...), where the naive form loses every digit.
        assert!((log1mexp(-1e-12) - (1e-12f64).ln()).abs() < 1e-11);
    }
}
