//! Token (and learned position) embedding lookup and its scatter-add backward.

use rayon::prelude::*;

use super::act::rows_per_task;

/// `out[i] = wte[tokens[i]] (+ wpe[positions[i]])`. `out: [N, d]`, `wte: [V, d]`, `wpe: [P, d]`.
///
/// Panics if a token or position is outside its table (callers validate ids against the vocabulary).
pub fn embedding_forward(
    out: &mut [f32],
    wte: &[f32],
    tokens: &[u32],
    wpe: Option<&[f32]>,
    positions: &[u32],
    d: usize,
) {
    assert_eq!(out.len(), tokens.len() * d, "embedding_forward: out is not [N, d]");
    if d == 0 {
        return;
    }
    let table = F32Rows { wte, d };
    if let Some(t) = tokens.iter().find(|&&t| !table.has(t)) {
        panic!("embedding_forward: token id {t} outside the vocabulary of {}", wte.len() / d);
    }
    // Every token has a row (checked above): nothing to refuse.
    let _ = embedding_forward_rows(out, &table, tokens, wpe, positions, d);
}

/// A token embedding table as a lookup reads it: an f32 table, or one kept otherwise
/// (`crate::quant::FrozenEmbedding`: some rows only, or every row in bf16).
pub trait EmbeddingRows: Sync {
    /// Whether `token` has a row.
    fn has(&self, token: u32) -> bool;

    /// Writes the row of `token` (one that [`EmbeddingRows::has`]) into `out` (`[d]`).
    fn write(&self, token: u32, out: &mut [f32]);
}

/// The rows of an f32 table `[V, d]`.
struct F32Rows<'a> {
    wte: &'a [f32],
    d: usize,
}

impl EmbeddingRows for F32Rows<'_> {
    fn has(&self, token: u32) -> bool {
        (token as usize) < self.wte.len() / self.d
    }

    fn write(&self, token: u32, out: &mut [f32]) {
        let t = token as usize;
        out.copy_from_slice(&self.wte[t * self.d..(t + 1) * self.d]);
    }
}

/// [`embedding_forward`] reading each token's row from `rows`. A token without a row is refused,
/// `Err((index, token))` of the first, before anything is written.
pub fn embedding_forward_rows(
    out: &mut [f32],
    rows: &impl EmbeddingRows,
    tokens: &[u32],
    wpe: Option<&[f32]>,
    positions: &[u32],
    d: usize,
) -> Result<(), (usize, u32)> {
    let n = tokens.len();
    assert_eq!(out.len(), n * d, "embedding_forward: out is not [N, d]");
    if d == 0 {
        return Ok(());
    }
    if let Some(i) = tokens.iter().position(|&t| !rows.has(t)) {
        return Err((i, tokens[i]));
    }
    if let Some(wpe) = wpe {
        assert_eq!(positions.len(), n, "embedding_forward: positions and tokens differ in length");
        let max = wpe.len() / d;
        if let Some(p) = positions.iter().find(|&&p| p as usize >= max) {
            panic!("embedding_forward: position {p} outside the position table of {max}");
        }
    }
    out.par_chunks_mut(d).enumerate().with_min_len(rows_per_task(d)).for_each(|(i, o)| {
        rows.write(tokens[i], o);
        if let Some(wpe) = wpe {
            let p = positions[i] as usize;
            o.iter_mut().zip(&wpe[p * d..(p + 1) * d]).for_each(|(o, &v)| *o += v);
        }
    });
    Ok(())
}

/// Backward of [`embedding_forward`]: `dwte[tokens[i]] += dout[i]`, `dwpe[positions[i]] += dout[i]`.
/// Rows are added in stream order (repeated ids accumulate deterministically).
pub fn embedding_backward(
    dwte: &mut [f32],
    dwpe: Option<&mut [f32]>,
    dout: &[f32],
    tokens: &[u32],
    positions: &[u32],
    d: usize,
) {
    let n = tokens.len();
    assert_eq!(dout.len(), n * d, "embedding_backward: dout is not [N, d]");
    if d == 0 {
        return;
    }
    // A scatter-add of N x d values: memory-bound and small next to any GEMM, so one thread.
    let scatter = |table: &mut [f32], ids: &[u32], what: &str| {
        let rows = table.len() / d;
        for (g, &id) in dout.chunks_exact(d).zip(ids) {
            let id = id as usize;
            assert!(id < rows, "embedding_backward: {what} {id} outside the table of {rows}");
            table[id * d..(id + 1) * d].iter_mut().zip(g).for_each(|(t, &g)| *t += g);
        }
    };
    scatter(dwte, tokens, "token id");
    if let Some(dwpe) = dwpe {
        assert_eq!(positions.len(), n, "embedding_backward: positions and tokens differ in length");
        scatter(dwpe, positions, "position");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::threads::test_util::*;

    #[test]
    fn lookup_and_scatter_add() {
        let mut rng = Rng::new(9);
        let (v, p, d) = (7, 5, 6);
        let wte = rng.vec(v * d, 1.0);
        let wpe = rng.vec(p * d, 1.0);
        let tokens = [3u32, 1, 3, 6, 0, 3];
        let positions = [0u32, 1, 2, 0, 1, 4];
        let n = tokens.len();
        let mut out = vec![f32::NAN; n * d];
        embedding_forward(&mut out, &wte, &tokens, Some(&wpe), &positions, d);
        let mut out_nopos = vec![f32::NAN; n * d];
        embedding_forward(&mut out_nopos, &wte, &tokens, None, &positions, d);
        for i in 0..n {
            for j in 0..d {
                let t = tokens[i] as usize * d + j;
                assert_eq!(out[i * d + j], wte[t] + wpe[positions[i] as usize * d + j]);
                assert_eq!(out_nopos[i * d + j], wte[t]);
            }
        }
        let dout = rng.vec(n * d, 1.0);
        let mut dwte = vec![1.0f32; v * d];
        let mut dwpe = vec![2.0f32; p * d];
        embedding_backward(&mut dwte, Some(&mut dwpe), &dout, &tokens, &positions, d);
        let mut gte = vec![1.0f64; v * d];
        let mut gpe = vec![2.0f64; p * d];
        for i in 0..n {
            for j in 0..d {
                gte[tokens[i] as usize * d + j] += dout[i * d + j] as f64;
                gpe[positions[i] as usize * d + j] += dout[i * d + j] as f64;
            }
        }
        assert_close("dwte", &dwte, &gte, 1e-6, 1.0);
        assert_close("dwpe", &dwpe, &gpe, 1e-6, 1.0);
    }

    #[test]
    #[should_panic(expected = "outside the vocabulary")]
    fn token_outside_vocabulary_is_reported() {
        let mut out = vec![0.0; 2];
        embedding_forward(&mut out, &[0.0; 4], &[2], None, &[0], 2);
    }
}
