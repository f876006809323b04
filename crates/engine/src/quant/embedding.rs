//! A frozen model's token embedding and LM head held in bf16: as a bf16 pass reads them (the head's
//! copy in bf16, the lookups' rows in f32 for the tokens a run can meet), or, for a checkpoint stored in
//! bf16, whole (every row as the file holds it).
//!
//! Why: a reference model in a bf16 run keeps its block linears in bf16 (its products round them to
//! bf16 anyway); its token embedding, 154 MB in f32 for GPT-2, stayed f32 because the lookups read it
//! unrounded, as autocast does. The head (tied to the embedding, or a head of its own) only ever reads
//! it through bf16 products, and the lookups only the rows of the tokens in the data: so the table is
//! kept in bf16 for the head and in f32 for those rows alone. Passes through it give the log-probs of
//! the f32 table bit for bit; a token whose row was not kept is refused
//! ([`super::super::EngineError::TokenNotKept`]), never read rounded.
//!
//! A checkpoint whose tables are bf16 in the file (most published ones) loses nothing in bf16 at all:
//! its values widen to f32 exactly. Sampling from one, which may meet any token, keeps every row so
//! ([`FrozenEmbedding::whole`]): Llama-3-8B's two tables take 2.1 GB instead of 4.2.

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
    /// Where the lookups read.
    rows: Rows,
}

/// The rows a [`FrozenEmbedding`]'s lookups read.
#[derive(Debug)]
enum Rows {
    /// The f32 rows of a run's tokens.
    Kept {
        /// `[vocab]` the row of `rows` that holds each token's embedding; `u32::MAX` where none does.
        index: Vec<u32>,
        /// `[kept, d]` the f32 embeddings of the kept tokens.
        rows: Vec<f32>,
    },
    /// Every row, in bf16: the embedding's own `[vocab, d]` table, or (`None`) the head's, tied to it.
    Whole(Option<Matrix>),
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
        check_bf16_table(&head, vocab, d)?;
        Ok(FrozenEmbedding { vocab, d, head, rows: Rows::Kept { index, rows } })
    }

    /// Every row kept, in bf16: `head` (`[vocab, d]`) and the embedding's own table (`None`: tied to
    /// the head), both stored in bf16. Lossless only for tables the checkpoint holds in bf16 (the
    /// caller's to know); such a model looks up any token, so it generates.
    pub fn whole(head: Matrix, embedding: Option<Matrix>) -> Result<Self, QuantError> {
        let (vocab, d) = (head.rows(), head.cols());
        check_bf16_table(&head, vocab, d)?;
        if let Some(e) = &embedding {
            check_bf16_table(e, vocab, d)?;
        }
        Ok(FrozenEmbedding { vocab, d, head, rows: Rows::Whole(embedding) })
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

    /// The f32 embedding of `token`, if its row was kept in f32 (never for [`FrozenEmbedding::whole`]
    /// tables, which [`FrozenEmbedding::whole_rows`] gives).
    pub fn row(&self, token: u32) -> Option<&[f32]> {
        let Rows::Kept { index, rows } = &self.rows else { return None };
        let i = *index.get(token as usize)?;
        (i != u32::MAX).then(|| &rows[i as usize * self.d..(i as usize + 1) * self.d])
    }

    /// The bf16 table every lookup reads (the head's where tied), for [`FrozenEmbedding::whole`] tables.
    pub fn whole_rows(&self) -> Option<&Matrix> {
        match &self.rows {
            Rows::Whole(own) => Some(own.as_ref().unwrap_or(&self.head)),
            Rows::Kept { .. } => None,
        }
    }

    /// Whether every token can be looked up (the tables are [`FrozenEmbedding::whole`]): a model
    /// through them generates.
    pub fn is_whole(&self) -> bool {
        matches!(self.rows, Rows::Whole(_))
    }

    /// Tokens whose rows are kept.
    pub fn kept(&self) -> usize {
        match &self.rows {
            Rows::Kept { rows, .. } => rows.len() / self.d.max(1),
            Rows::Whole(_) => self.vocab,
        }
    }

    /// Bytes held: the bf16 head, and the f32 rows and the index, or the embedding's own bf16 table.
    pub fn bytes(&self) -> usize {
        self.head.bytes()
            + match &self.rows {
                Rows::Kept { index, rows } => 4 * rows.len() + 4 * index.len(),
                Rows::Whole(own) => own.as_ref().map_or(0, Matrix::bytes),
            }
    }

    /// [`FrozenEmbedding::bytes`] before building one: `kept` rows of a `[vocab, d]` table.
    pub fn estimate_bytes(vocab: usize, d: usize, kept: usize) -> usize {
        2 * vocab * d + 4 * kept * d + 4 * vocab
    }
}

impl crate::kernels::EmbeddingRows for FrozenEmbedding {
    fn has(&self, token: u32) -> bool {
        match &self.rows {
            Rows::Kept { .. } => self.row(token).is_some(),
            Rows::Whole(_) => (token as usize) < self.vocab,
        }
    }

    fn write(&self, token: u32, out: &mut [f32]) {
        match self.whole_rows() {
            Some(table) => table.widen_into(token as usize * self.d, out),
            None => out.copy_from_slice(self.row(token).expect("a lookup of a row not kept")),
        }
    }
}

/// Refuses a table that is not `[vocab, d]` in bf16.
fn check_bf16_table(m: &Matrix, vocab: usize, d: usize) -> Result<(), QuantError> {
    if (m.rows(), m.cols(), m.storage()) != (vocab, d, Storage::Bf16) {
        let got = m.rows() * m.cols();
        return Err(QuantError::Shape { rows: vocab, cols: d, want: vocab * d, got });
    }
    Ok(())
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

    #[test]
    fn whole_tables_look_up_every_row_as_stored() {
        use crate::kernels::EmbeddingRows;
        let (vocab, d) = (5, 4);
        let wte: Vec<f32> = (0..vocab * d).map(|i| bf16::round(0.3 + i as f32 / 7.0)).collect();
        let own: Vec<f32> = wte.iter().map(|v| -v).collect();
        let m = |w: &[f32]| Matrix::bf16_from(w.to_vec(), vocab, d).unwrap();
        for (e, head) in
            [(FrozenEmbedding::whole(m(&wte), None), &wte), (FrozenEmbedding::whole(m(&own), Some(m(&wte))), &own)]
        {
            let e = e.unwrap();
            assert!(e.is_whole() && e.kept() == vocab && e.row(1).is_none());
            assert_eq!(e.head().to_f32(), *head);
            assert_eq!(e.whole_rows().unwrap().to_f32(), wte);
            assert!(e.has(4) && !e.has(5));
            let mut out = vec![f32::NAN; d];
            e.write(3, &mut out);
            assert_eq!(out, wte[12..16]);
        }
        assert_eq!(FrozenEmbedding::whole(m(&own), Some(m(&wte))).unwrap().bytes(), 2 * 2 * vocab * d);
        // Both tables bf16 and of one shape.
        let f32_table = Matrix::new(wte.clone(), vocab, d, Storage::F32).unwrap();
        assert!(FrozenEmbedding::whole(f32_table, None).is_err());
        let short = Matrix::bf16_from(wte[..(vocab - 1) * d].to_vec(), vocab - 1, d).unwrap();
        assert!(FrozenEmbedding::whole(m(&wte), Some(short)).is_err());
    }
}
