//! A packed batch: every sequence of a step laid end to end in one token stream, no padding.
//!
//! Attention structure is described by spans. Query token `i` of a span attends to the keys in
//! `ctx_start..ctx_end` (a context shared with another branch, such as a prompt) and causally to
//! `own_start..=i`. One prompt followed by its chosen completion and then its rejected completion is laid
//! out as three spans: `P` (own_start = P.start), `C` (own_start = P.start, so C sees P and itself), and `R`
//! (ctx = P, own_start = R.start, so R sees P and itself but never C). Positions are explicit per token, so
//! `R` continues counting from the end of `P`.
//!
//! Groups are disjoint ranges of the stream that no attention crosses; they are the unit of parallel work
//! in attention (one task per group and key/value head).
//!
//! The LM head is evaluated only at targets: `(position in the stream, token)` pairs. The hidden state at
//! `pos` predicts `token`. With a shared prompt the last prompt token is the source of two targets (the
//! first chosen and the first rejected token), which is why targets are not implied by the stream order.

use std::ops::Range;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub start: u32,
    pub end: u32,
    pub own_start: u32,
    pub ctx_start: u32,
    pub ctx_end: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    /// Index in the token stream of the hidden state that predicts `token`.
    pub pos: u32,
    pub token: u32,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    /// `[N]` token ids
    pub tokens: Vec<u32>,
    /// `[N]` position ids (rotary angle or learned-table row)
    pub positions: Vec<u32>,
    /// Cover `0..N` in order, each inside one group.
    pub spans: Vec<Span>,
    /// Disjoint, in order, covering `0..N`.
    pub groups: Vec<Range<u32>>,
    /// Where the LM head is evaluated.
    pub targets: Vec<Target>,
}

/// What [`Batch::push_sequence`] and [`Batch::push_shared_prefix`] return: where the targets of each
/// sequence ended up in `Batch::targets`.
pub type TargetRange = Range<usize>;

impl Batch {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Appends one independent sequence. Every token from index `first_target` on is a target (predicted
    /// from the token before it); `first_target >= 1`. Returns the range of its targets.
    pub fn push_sequence(&mut self, ids: &[u32], first_target: usize) -> TargetRange {
        let start = self.tokens.len() as u32;
        let n = ids.len() as u32;
        self.tokens.extend_from_slice(ids);
        self.positions.extend(0..n);
        self.spans.push(Span { start, end: start + n, own_start: start, ctx_start: start, ctx_end: start });
        self.groups.push(start..start + n);
        let t0 = self.targets.len();
        for (i, &tok) in ids.iter().enumerate().skip(first_target.max(1)) {
            self.targets.push(Target { pos: start + i as u32 - 1, token: tok });
        }
        t0..self.targets.len()
    }

    /// Appends a prompt once and several completions after it, each seeing the prompt and itself only.
    /// Every completion token is a target; the first is predicted from the last prompt token.
    /// Returns one target range per completion. `prompt` must not be empty.
    pub fn push_shared_prefix(&mut self, prompt: &[u32], completions: &[&[u32]]) -> Vec<TargetRange> {
        assert!(!prompt.is_empty(), "a shared prefix needs at least one prompt token");
        let p0 = self.tokens.len() as u32;
        let np = prompt.len() as u32;
        self.tokens.extend_from_slice(prompt);
        self.positions.extend(0..np);
        self.spans.push(Span { start: p0, end: p0 + np, own_start: p0, ctx_start: p0, ctx_end: p0 });
        let mut ranges = Vec::with_capacity(completions.len());
        for (k, c) in completions.iter().enumerate() {
            let s = self.tokens.len() as u32;
            let n = c.len() as u32;
            self.tokens.extend_from_slice(c);
            self.positions.extend(np..np + n);
            // The first completion continues the prompt's own causal run; later ones see it as context.
            let span = if k == 0 {
                Span { start: s, end: s + n, own_start: p0, ctx_start: p0, ctx_end: p0 }
            } else {
                Span { start: s, end: s + n, own_start: s, ctx_start: p0, ctx_end: p0 + np }
            };
            self.spans.push(span);
            let t0 = self.targets.len();
            for i in 0..n {
                let pos = if i == 0 { p0 + np - 1 } else { s + i - 1 };
                self.targets.push(Target { pos, token: c[i as usize] });
            }
            ranges.push(t0..self.targets.len());
        }
        self.groups.push(p0..self.tokens.len() as u32);
        ranges
    }

    /// Largest position id plus one (size of the rotary table needed).
    pub fn max_position(&self) -> usize {
        self.positions.iter().map(|&p| p as usize + 1).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_prefix_layout() {
        let mut b = Batch::default();
        b.push_sequence(&[9, 9], 1);
        let r = b.push_shared_prefix(&[1, 2, 3], &[&[4, 5], &[6]]);
        assert_eq!(b.tokens, vec![9, 9, 1, 2, 3, 4, 5, 6]);
        assert_eq!(b.positions, vec![0, 1, 0, 1, 2, 3, 4, 3]);
        assert_eq!(b.groups, vec![0..2, 2..8]);
        assert_eq!(r, vec![1..3, 3..4]);
        assert_eq!(b.targets[1], Target { pos: 4, token: 4 });
        assert_eq!(b.targets[2], Target { pos: 5, token: 5 });
        assert_eq!(b.targets[3], Target { pos: 4, token: 6 });
        assert_eq!(b.spans[3], Span { start: 7, end: 8, own_start: 7, ctx_start: 2, ctx_end: 5 });
        assert_eq!(b.max_position(), 5);
    }
}
