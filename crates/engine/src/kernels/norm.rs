//! LayerNorm and RMSNorm over the last dimension, with their backward.
//!
//! Rows are independent, so forwards and the input gradient run in parallel over rows. Per-row statistics
//! are f32, as PyTorch's are, but summed over 16 lanes (more accurate than a serial sum). Parameter
//! gradients are summed row after row in row order, with the columns split across threads: results
//! depend neither on the thread count nor on whether the rows came in one call or several (a batch's
//! pairs pushed through one at a time accumulate the same bits).

use rayon::prelude::*;

use super::act::{dot_lanes, multiversion, rows_per_task, sum_lanes};

/// `sum (x - m)^2` over 16 lanes.
#[inline(always)]
fn sq_dev_sum(x: &[f32], m: f32) -> f32 {
    let mut acc = [0.0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += (v - m) * (v - m);
        }
    }
    let mut tail = 0.0f32;
    for &v in chunks.remainder() {
        tail += (v - m) * (v - m);
    }
    sum_lanes(&acc) + tail
}

multiversion! {
    /// One LayerNorm row; returns `(mean, rstd)`.
    fn ln_fwd_row(out: &mut [f32], x: &[f32], w: &[f32], b: &[f32], eps: f32) -> (f32, f32) {
        let d = x.len() as f32;
        let mean = sum_lanes(x) / d;
        let var = sq_dev_sum(x, mean) / d;
        let rstd = 1.0 / (var + eps).sqrt();
        for (((o, &x), &w), &b) in out.iter_mut().zip(x).zip(w).zip(b) {
            *o = (x - mean) * rstd * w + b;
        }
        (mean, rstd)
    }
}

multiversion! {
    /// One LayerNorm row backward: `dx += ...`.
    fn ln_bwd_row(
        dx: &mut [f32],
        dy: &[f32],
        x: &[f32],
        w: &[f32],
        mean: f32,
        rstd: f32,
    ) {
        let d = x.len() as f32;
        // a = mean(g), b = mean(g * xhat) with g = dy * w, xhat = (x - mean) * rstd
        let mut acc_a = [0.0f32; 16];
        let mut acc_b = [0.0f32; 16];
        let (mut ta, mut tb) = (0.0f32, 0.0f32);
        let n16 = x.len() / 16 * 16;
        for ((dy, x), w) in dy[..n16].chunks_exact(16).zip(x[..n16].chunks_exact(16)).zip(w[..n16].chunks_exact(16)) {
            for l in 0..16 {
                let g = dy[l] * w[l];
                acc_a[l] += g;
                acc_b[l] += g * ((x[l] - mean) * rstd);
            }
        }
        for j in n16..x.len() {
            let g = dy[j] * w[j];
            ta += g;
            tb += g * ((x[j] - mean) * rstd);
        }
        let a = (sum_lanes(&acc_a) + ta) / d;
        let b = (sum_lanes(&acc_b) + tb) / d;
        for j in 0..x.len() {
            let xhat = (x[j] - mean) * rstd;
            let g = dy[j] * w[j];
            dx[j] += rstd * (g - a - xhat * b);
        }
    }
}

multiversion! {
    /// One RMSNorm row; returns `rstd`.
    fn rms_fwd_row(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) -> f32 {
        let ms = dot_lanes(x, x) / x.len() as f32;
        let rstd = 1.0 / (ms + eps).sqrt();
        for ((o, &x), &w) in out.iter_mut().zip(x).zip(w) {
            *o = w * (x * rstd);
        }
        rstd
    }
}

multiversion! {
    /// One RMSNorm row backward: `dx += ...`.
    fn rms_bwd_row(dx: &mut [f32], dy: &[f32], x: &[f32], w: &[f32], rstd: f32) {
        let d = x.len() as f32;
        // b = mean(g * xhat) = rstd * mean(dy * w * x)
        let mut acc = [0.0f32; 16];
        let mut tail = 0.0f32;
        let n16 = x.len() / 16 * 16;
        for ((dy, x), w) in dy[..n16].chunks_exact(16).zip(x[..n16].chunks_exact(16)).zip(w[..n16].chunks_exact(16)) {
            for l in 0..16 {
                acc[l] += dy[l] * w[l] * x[l];
            }
        }
        for j in n16..x.len() {
            tail += dy[j] * w[j] * x[j];
        }
        let b = (sum_lanes(&acc) + tail) * rstd / d;
        for j in 0..x.len() {
            let xhat = x[j] * rstd;
            dx[j] += rstd * (dy[j] * w[j] - xhat * b);
        }
    }
}

/// `dw[j] += sum_i dy[i, j] * xhat(i, j)` and, with `db`, `db[j] += sum_i dy[i, j]`, row after row; the
/// columns are split across threads (each thread reads only its columns of every row).
fn param_grads(
    dw: &mut [f32],
    db: Option<&mut [f32]>,
    dy: &[f32],
    d: usize,
    xhat: impl Fn(usize, usize) -> f32 + Sync,
) {
    let rows = dy.len() / d;
    let block = d.div_ceil(super::threads::num_threads()).next_multiple_of(16).max(16);
    let column_block = |c0: usize, dw: &mut [f32], db: Option<&mut [f32]>| {
        let w = dw.len();
        for i in 0..rows {
            let g = &dy[i * d + c0..i * d + c0 + w];
            for (j, (o, &g)) in dw.iter_mut().zip(g).enumerate() {
                *o += g * xhat(i, c0 + j);
            }
        }
        if let Some(db) = db {
            for i in 0..rows {
                db.iter_mut().zip(&dy[i * d + c0..i * d + c0 + w]).for_each(|(o, &g)| *o += g);
            }
        }
    };
    match db {
        Some(db) => dw.par_chunks_mut(block).zip(db.par_chunks_mut(block)).enumerate().for_each(|(bi, (w, b))| {
            column_block(bi * block, w, Some(b));
        }),
        None => dw.par_chunks_mut(block).enumerate().for_each(|(bi, w)| column_block(bi * block, w, None)),
    }
}

/// `out = (x - mean) / sqrt(var + eps) * w + b` per row (biased variance, as torch), saving `mean` and
/// `rstd = 1 / sqrt(var + eps)` `[rows]` for the backward. `x, out: [rows, d]`, `w, b: [d]`.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_forward(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    x: &[f32],
    w: &[f32],
    b: &[f32],
    rows: usize,
    d: usize,
    eps: f32,
) {
    assert!(
        out.len() == rows * d && x.len() == rows * d && mean.len() == rows && rstd.len() == rows,
        "layer_norm_forward: shapes"
    );
    assert!(w.len() == d && b.len() == d, "layer_norm_forward: parameter shapes");
    if d == 0 {
        return;
    }
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .with_min_len(rows_per_task(d))
        .for_each(|((o, x), (m, r))| {
            (*m, *r) = ln_fwd_row(o, x, w, b, eps);
        });
}

/// Backward of [`layer_norm_forward`]: `dx += `, `dw += `, `db += `.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_backward(
    dx: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
    dout: &[f32],
    x: &[f32],
    mean: &[f32],
    rstd: &[f32],
    w: &[f32],
    rows: usize,
    d: usize,
) {
    // The activations' shapes are checked by the input half.
    assert!(w.len() == d && dw.len() == d && db.len() == d, "layer_norm_backward: parameter shapes");
    layer_norm_input_grad(dx, dout, x, mean, rstd, w, rows, d);
    if d == 0 || rows == 0 {
        return;
    }
    param_grads(dw, Some(db), dout, d, |i, j| (x[i * d + j] - mean[i]) * rstd[i]);
}

/// The input half of [`layer_norm_backward`]: `dx += ` only, for a frozen norm (no weight gradients).
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_input_grad(
    dx: &mut [f32],
    dout: &[f32],
    x: &[f32],
    mean: &[f32],
    rstd: &[f32],
    w: &[f32],
    rows: usize,
    d: usize,
) {
    assert!(
        dx.len() == rows * d
            && dout.len() == rows * d
            && x.len() == rows * d
            && mean.len() == rows
            && rstd.len() == rows
            && w.len() == d,
        "layer_norm_input_grad: shapes"
    );
    if d == 0 || rows == 0 {
        return;
    }
    dx.par_chunks_mut(d)
        .zip(dout.par_chunks(d))
        .zip(x.par_chunks(d))
        .zip(mean.par_iter().zip(rstd.par_iter()))
        .with_min_len(rows_per_task(d))
        .for_each(|(((dx, dy), x), (&m, &r))| ln_bwd_row(dx, dy, x, w, m, r));
}

/// `out = w * (x / sqrt(mean(x^2) + eps))` per row (HF `LlamaRMSNorm`), saving `rstd` `[rows]`.
pub fn rms_norm_forward(out: &mut [f32], rstd: &mut [f32], x: &[f32], w: &[f32], rows: usize, d: usize, eps: f32) {
    assert!(out.len() == rows * d && x.len() == rows * d && rstd.len() == rows, "rms_norm_forward: shapes");
    assert!(w.len() == d, "rms_norm_forward: parameter shape");
    if d == 0 {
        return;
    }
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .zip(rstd.par_iter_mut())
        .with_min_len(rows_per_task(d))
        .for_each(|((o, x), r)| *r = rms_fwd_row(o, x, w, eps));
}

/// Backward of [`rms_norm_forward`]: `dx += `, `dw += `.
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_backward(
    dx: &mut [f32],
    dw: &mut [f32],
    dout: &[f32],
    x: &[f32],
    rstd: &[f32],
    w: &[f32],
    rows: usize,
    d: usize,
) {
    // The activations' shapes are checked by the input half.
    assert!(w.len() == d && dw.len() == d, "rms_norm_backward: parameter shapes");
    rms_norm_input_grad(dx, dout, x, rstd, w, rows, d);
    if d == 0 || rows == 0 {
        return;
    }
    param_grads(dw, None, dout, d, |i, j| x[i * d + j] * rstd[i]);
}

/// The input half of [`rms_norm_backward`]: `dx += ` only, for a frozen norm (no weight gradient).
pub fn rms_norm_input_grad(dx: &mut [f32], dout: &[f32], x: &[f32], rstd: &[f32], w: &[f32], rows: usize, d: usize) {
    assert!(
        dx.len() == rows * d && dout.len() == rows * d && x.len() == rows * d && rstd.len() == rows && w.len() == d,
        "rms_norm_input_grad: shapes"
    );
    if d == 0 || rows == 0 {
        return;
    }
    dx.par_chunks_mut(d)
        .zip(dout.par_chunks(d))
        .zip(x.par_chunks(d))
        .zip(rstd.par_iter())
        .with_min_len(rows_per_task(d))
        .for_each(|(((dx, dy), x), &r)| rms_bwd_row(dx, dy, x, w, r));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::threads::test_util::*;

    /// f64 LayerNorm of one row.
    fn ln64(x: &[f64], w: &[f64], b: &[f64], eps: f64) -> Vec<f64> {
        let d = x.len() as f64;
        let m = x.iter().sum::<f64>() / d;
        let v = x.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / d;
        let r = 1.0 / (v + eps).sqrt();
        x.iter().zip(w).zip(b).map(|((x, w), b)| (x - m) * r * w + b).collect()
    }

    fn rms64(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
        let d = x.len() as f64;
        let r = 1.0 / (x.iter().map(|v| v * v).sum::<f64>() / d + eps).sqrt();
        x.iter().zip(w).map(|(x, w)| w * x * r).collect()
    }

    /// Central difference of `loss` w.r.t. `v[i]`.
    fn fd1(v: &mut [f64], i: usize, loss: &dyn Fn(&[f64]) -> f64) -> f64 {
        let h = 1e-6 * v[i].abs().max(1.0);
        let o = v[i];
        v[i] = o + h;
        let p = loss(v);
        v[i] = o - h;
        let m = loss(v);
        v[i] = o;
        (p - m) / (2.0 * h)
    }

    type RowFn<'a> = dyn Fn(&[f64], &[Vec<f64>]) -> Vec<f64> + 'a;

    /// Finite-difference gradients of `sum(dy * f(row))` for a row-wise `f`: w.r.t. each input element
    /// (only its own row changes) and w.r.t. each parameter vector in `params` (all rows).
    fn fd_rowwise(x: &[f64], dy: &[f64], d: usize, params: &[Vec<f64>], f: &RowFn<'_>) -> (Vec<f64>, Vec<Vec<f64>>) {
        let row_loss = |r: &[f64], g: &[f64], p: &[Vec<f64>]| f(r, p).iter().zip(g).map(|(y, g)| y * g).sum::<f64>();
        let mut gx = vec![0.0; x.len()];
        for (r, (xr, g)) in x.chunks(d).zip(dy.chunks(d)).enumerate() {
            let mut xr = xr.to_vec();
            for j in 0..d {
                gx[r * d + j] = fd1(&mut xr, j, &|v| row_loss(v, g, params));
            }
        }
        let gp = (0..params.len())
            .map(|k| {
                let mut pk = params[k].clone();
                (0..pk.len())
                    .map(|j| {
                        fd1(&mut pk, j, &|v| {
                            let mut p = params.to_vec();
                            p[k] = v.to_vec();
                            x.chunks(d).zip(dy.chunks(d)).map(|(r, g)| row_loss(r, g, &p)).sum()
                        })
                    })
                    .collect()
            })
            .collect();
        (gx, gp)
    }

    fn plus(v: &[f64], c: f64) -> Vec<f64> {
        v.iter().map(|g| g + c).collect()
    }

    #[test]
    fn layer_norm_matches_f64_and_finite_differences() {
        let mut rng = Rng::new(11);
        for (rows, d) in [(3, 7), (5, 40), (300, 70)] {
            let eps = 1e-5f32;
            let x: Vec<f32> = (0..rows * d).map(|i| rng.uniform() * 2.0 + (i % 3) as f32).collect();
            let w: Vec<f32> = (0..d).map(|_| 1.0 + rng.uniform() * 0.5).collect();
            let b = rng.vec(d, 0.5);
            let dy = rng.vec(rows * d, 1.0);
            let (mut out, mut mean, mut rstd) = (vec![0.0; rows * d], vec![0.0; rows], vec![0.0; rows]);
            layer_norm_forward(&mut out, &mut mean, &mut rstd, &x, &w, &b, rows, d, eps);
            let (x64, dy64) = (to_f64(&x), to_f64(&dy));
            let p = vec![to_f64(&w), to_f64(&b)];
            let want: Vec<f64> = x64.chunks(d).flat_map(|r| ln64(r, &p[0], &p[1], eps as f64)).collect();
            assert_close("layer_norm forward", &out, &want, 1e-5, 1e-2);

            // Gradients accumulate onto what is there.
            let mut dx = vec![0.5f32; rows * d];
            let mut dw = vec![0.25f32; d];
            let mut db = vec![-0.25f32; d];
            layer_norm_backward(&mut dx, &mut dw, &mut db, &dy, &x, &mean, &rstd, &w, rows, d);
            let (gx, gp) = fd_rowwise(&x64, &dy64, d, &p, &|r, p| ln64(r, &p[0], &p[1], eps as f64));
            assert_close("layer_norm dx", &dx, &plus(&gx, 0.5), 1e-4, 1e-2);
            assert_close_norm("layer_norm dw", &dw, &plus(&gp[0], 0.25), 1e-5);
            assert_close_norm("layer_norm db", &db, &plus(&gp[1], -0.25), 1e-5);
        }
    }

    #[test]
    fn rms_norm_matches_f64_and_finite_differences() {
        let mut rng = Rng::new(12);
        for (rows, d) in [(3, 7), (4, 33), (300, 70)] {
            let eps = 1e-6f32;
            let x = rng.vec(rows * d, 2.0);
            let w: Vec<f32> = (0..d).map(|_| 1.0 + rng.uniform() * 0.5).collect();
            let dy = rng.vec(rows * d, 1.0);
            let (mut out, mut rstd) = (vec![0.0; rows * d], vec![0.0; rows]);
            rms_norm_forward(&mut out, &mut rstd, &x, &w, rows, d, eps);
            let (x64, dy64) = (to_f64(&x), to_f64(&dy));
            let p = vec![to_f64(&w)];
            let want: Vec<f64> = x64.chunks(d).flat_map(|r| rms64(r, &p[0], eps as f64)).collect();
            assert_close("rms_norm forward", &out, &want, 1e-5, 1e-2);

            let mut dx = vec![0.5f32; rows * d];
            let mut dw = vec![0.25f32; d];
            rms_norm_backward(&mut dx, &mut dw, &dy, &x, &rstd, &w, rows, d);
            let (gx, gp) = fd_rowwise(&x64, &dy64, d, &p, &|r, p| rms64(r, &p[0], eps as f64));
            assert_close("rms_norm dx", &dx, &plus(&gx, 0.5), 1e-4, 1e-2);
            assert_close_norm("rms_norm dw", &dw, &plus(&gp[0], 0.25), 1e-5);
        }
    }
}
