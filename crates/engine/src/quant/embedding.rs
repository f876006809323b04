//! A frozen model's token embedding held as a bf16 pass reads it: the LM head's copy in bf16, the
//! lookups' rows in f32 for the tokens a run can meet.
//!
//! Why: a reference model in a bf16 run keeps its block linears in bf16 (its products round them to
//! bf16 anyway); its token embedding, 154 MB in f32 for GPT-2, stayed f32 because the lookups read it
//! unrounded, as autocast does. The head (tied to the embedding, or a head of its own) only ever reads
//! it through bf16 products, and the lookups only the rows of the tokens in the data: so the table is
//! kept in bf16 for the head and in f32 for those rows alone. Passes through it give the log-probs of
//! the f32 table bit for bit; a token whose row was not kept is refused
//! ([`super::super::EngineError::TokenNotKept`]), never read rounded.

use std::collections::BTreeSet;

use super::{Matrix, QuantError, Storage};

/// The f32 embeddings of the tokens a run can meet: the lookup half of a [`FrozenEmbedding`], taken from
/// the f32 table before the table goes (`hf::load_model_stored` keeps these rows of an untied embedding
/// and drops the rest as it is read).
#[derive(Debug, PartialEq)]
pub struct Lookups {
    vocab: usize,
    d: usize,
    /// `[vocab]` the row of `rows` that holds each token's embedding; `u32::MAX` where none does.
    index: Vec<u32>,
    /// `[kept, d]` the f32 embeddings of the kept tokens.
    rows: Vec<f32>,
}

impl Lookups {
    /// The rows of `tokens` in `wte` (`[vocab, d]`); ids at or beyond the vocabulary are left out (the
    /// lookup refuses them anyway).
    pub fn of(wte: &[f32], vocab: usize, d: usize, tokens: &BTreeSet<u32>) -> Result<Self, QuantError> {
        let mut gather = Self::gather(vocab, d, tokens);
        gather.push(wte)?;
        gather.finish()
    }

    /// [`Lookups::of`] a table whose values arrive in pieces, in order ([`Gather::push`]).
    pub fn gather(vocab: usize, d: usize, tokens: &BTreeSet<u32>) -> Gather {
        let mut index = vec![u32::MAX; vocab];
        let kept: Vec<usize> = tokens.iter().map(|&t| t as usize).filter(|&t| t < vocab).collect();
        for (i, &t) in kept.iter().enumerate() {
            index[t] = i as u32;
        }
        Gather { lookups: Lookups { vocab, d, index, rows: vec![0.0; kept.len() * d] }, pushed: 0 }
    }
}

/// A [`Lookups`] being gathered from its table's values (`[vocab, d]`, row-major) pushed in order: the
/// kept rows are copied as they pass, the rest is never held.
#[derive(Debug)]
pub struct Gather {
    lookups: Lookups,
    pushed: usize,
}

impl Gather {
    /// The next `values` of the table. Fails on more values than the table holds.
    pub fn push(&mut self, values: &[f32]) -> Result<(), QuantError> {
        let Lookups { vocab, d, index, rows } = &mut self.lookups;
        let (start, end) = (self.pushed, self.pushed + values.len());
        if end > *vocab * *d {
            return Err(QuantError::Shape { rows: *vocab, cols: *d, want: *vocab * *d, got: end });
        }
        // The rows `values` overlaps (none of a table of empty rows).
        let row_of = |at: usize| at.checked_div(*d).unwrap_or(0);
        let (first, last) = (row_of(start), row_of((end + *d).saturating_sub(1)));
        for token in first..last {
            let Some(i) = index.get(token).filter(|&&i| i != u32::MAX) else { continue };
            // The part of the token's row inside `values`.
            let (lo, hi) = ((token * *d).max(start), ((token + 1) * *d).min(end));
            let at = *i as usize * *d + lo - token * *d;
            rows[at..at + hi - lo].copy_from_slice(&values[lo - start..hi - start]);
        }
        self.pushed = end;
        Ok(())
    }

    /// The lookups; fails unless the whole table was pushed.
    pub fn finish(self) -> Result<Lookups, QuantError> {
        let Lookups { vocab, d, .. } = self.lookups;
        if self.pushed != vocab * d {
            return Err(QuantError::Shape { rows: vocab, cols: d, want: vocab * d, got: self.pushed });
        }
        Ok(self.lookups)
    }
}

/// A frozen model's token embedding and LM head weight (see the module documentation).
#[derive(Debug)]
pub struct FrozenEmbedding {
    vocab: usize,
    d: usize,
    /// `[vocab, d]` the LM head's weight in bf16: the tied embedding, or the model's own head.
    head: Matrix,
    /// `[vocab]` the row of `rows` that holds each token's embedding; `u32::MAX` where none does.
    index: Vec<u32>,
    /// `[kept, d]` the f32 embeddings of the kept tokens.
    rows: Vec<f32>,
}

impl FrozenEmbedding {
    /// Keeps `wte` (`[vocab, d]`) for lookups of `tokens` ([`Lookups::of`]) and `head` (`[vocab, d]`,
    /// `None` when tied to `wte`) in bf16. Both tables are consumed: the f32 one the head is made of is
    /// handed back as it is converted ([`Matrix::bf16_from`]), the other once its rows are copied.
    pub fn new(
        wte: Vec<f32>,
        head: Option<Vec<f32>>,
        vocab: usize,
        d: usize,
        tokens: &BTreeSet<u32>,
    ) -> Result<Self, QuantError> {
        let lookups = Lookups::of(&wte, vocab, d, tokens)?;
        let head = match head {
            Some(h) => {
                drop(wte);
                h
            }
            None => wte,
        };
        Self::from_parts(lookups, Matrix::bf16_from(head, vocab, d)?)
    }

    /// The lookups of [`Lookups::of`] and a `[vocab, d]` head stored in bf16.
    pub fn from_parts(lookups: Lookups, head: Matrix) -> Result<Self, QuantError> {
        let Lookups { vocab, d, index, rows } = lookups;
        if (head.rows(), head.cols(), head.storage()) != (vocab, d, Storage::Bf16) {
            let got = head.rows() * head.cols();
            return Err(QuantError::Shape { rows: vocab, cols: d, want: vocab * d, got });
        }
        Ok(FrozenEmbedding { vocab, d, head, index, rows })
    }

    /// The LM head's weight `[vocab, d]`, in bf16.
    pub fn head(&self) -> &Matrix {
        &self.head
    }

    pub fn vocab(&self) -> usize {
        self.vocab
    }

    pub fn hidden(&self) -> usize {
        self.d
    }

    /// The f32 embedding of `token`, if its row was kept.
    pub fn row(&self, token: u32) -> Option<&[f32]> {
        let i = *self.index.get(token as usize)?;
        (i != u32::MAX).then(|| &self.rows[i as usize * self.d..(i as usize + 1) * self.d])
    }

    /// Tokens whose rows are kept.
    pub fn kept(&self) -> usize {
        self.rows.len() / self.d.max(1)
    }

    /// Bytes held: the bf16 head, the f32 rows and the index.
    pub fn bytes(&self) -> usize {
        self.head.bytes() + 4 * self.rows.len() + 4 * self.index.len()
    }

    /// [`FrozenEmbedding::bytes`] before building one: `kept` rows of a `[vocab, d]` table.
    pub fn estimate_bytes(vocab: usize, d: usize, kept: usize) -> usize {
        2 * vocab * d + 4 * kept * d + 4 * vocab
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::bf16;

    #[test]
    fn keeps_the_rows_of_its_tokens_and_the_head_in_bf16() {
        let (vocab, d) = (7, 3);
        let wte: Vec<f32> = (0..vocab * d).map(|i| 0.1 + i as f32 / 3.0).collect();
        let tokens = BTreeSet::from([1, 4, 9]);
        let e = FrozenEmbedding::new(wte.clone(), None, vocab, d, &tokens).unwrap();
        assert_eq!(e.kept(), 2, "token 9 is outside the vocabulary");
        assert_eq!(e.row(4), Some(&wte[12..15]));
        assert_eq!(e.row(1), Some(&wte[3..6]));
        assert_eq!(e.row(0), None);
        assert_eq!(e.row(9), None);
        let rounded: Vec<f32> = wte.iter().map(|&v| bf16::to_f32(bf16::from_f32(v))).collect();
        assert_eq!(e.head().to_f32(), rounded);
        assert_eq!(e.bytes(), FrozenEmbedding::estimate_bytes(vocab, d, 2));
        let own_head: Vec<f32> = (0..vocab * d).map(|i| -(i as f32)).collect();
        let e = FrozenEmbedding::new(wte.clone(), Some(own_head.clone()), vocab, d, &tokens).unwrap();
        assert_eq!(e.head().to_f32(), own_head);
        assert_eq!(e.row(4), Some(&wte[12..15]));
        assert!(FrozenEmbedding::new(wte[1..].to_vec(), None, vocab, d, &tokens).is_err());
    }
}
