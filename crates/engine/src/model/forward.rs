//! The trunk and the LM head, forward: embeddings, the blocks, the final norm, log-probs at the targets.

use super::acts::{fit, Activations, HeadOutput, Keep};
use super::block::Attend;
use super::{bias, norm_forward, Decoder, EngineError, Model};
use crate::batch::Batch;
use crate::kernels as k;

impl Decoder {
    /// Runs the trunk of `model` (a `&Params`, or a [`Model`] with an adapter): fills `acts.hidden`
    /// (`[N, d]`, after the final norm). What it keeps for [`Decoder::backward`] is `keep` (a `bool`:
    /// [`Keep::All`] or [`Keep::None`]); a pass that keeps something applies the adapter's dropout if
    /// [`Model::dropout_seed`] is set. With [`Keep::None`], one set of buffers serves every layer.
    pub fn forward<'m>(
        &self,
        model: impl Into<Model<'m>>,
        b: &Batch,
        acts: &mut Activations,
        keep: impl Into<Keep>,
    ) -> Result<(), EngineError> {
        let (model, keep) = (model.into(), keep.into());
        self.check_batch(b)?;
        model.check(&self.cfg)?;
        let p = model.base;
        let cfg = &self.cfg;
        let (n, d) = (b.len(), cfg.hidden);
        let extended = self.extended_rope(b);
        let rope = extended.as_ref().or(self.rope.as_ref());
        acts.n = n;
        acts.prepare_layers(keep, cfg.n_layers, model.precision);
        acts.dropout_seed = model.dropout_seed;
        let train = keep != Keep::None;

        // The residual stream lives in each layer's `x`: layer l writes its output straight into layer
        // l+1's slot. With `Keep::None` there is one slot, and its input and `x_final` swap roles each
        // layer. Buffers are reused from call to call, so a training step allocates nothing large.
        fit(&mut acts.layers[0].x, n * d);
        model.embed(cfg, &mut acts.layers[0].x, &b.tokens, &b.positions)?;
        let n_layers = p.layers.len();
        for l in 0..n_layers {
            let lp = model.layer(l);
            let to_next_slot = train && l + 1 < n_layers;
            let mut out = if to_next_slot {
                std::mem::take(&mut acts.layers[l + 1].x)
            } else {
                std::mem::take(&mut acts.x_final)
            };
            fit(&mut out, n * d);
            let attend = Attend::Packed { batch: b, cache: None };
            let rope = self.block_rope(rope, l);
            let adapter = model.layer_lora(l, train);
            let s = &mut acts.scratch;
            match keep {
                Keep::LayerInputs => {
                    // The block runs in the one slot: the input moves in for it and back out after, and
                    // the slot's other buffers hold this layer's activations until the next block.
                    std::mem::swap(&mut acts.layers[l].x, &mut acts.work.x);
                    self.block_forward(lp, l, adapter, &mut acts.work, s, rope, attend, &mut out);
                    if acts.kept_bf16 {
                        // What backward reads, as a layer of a `Keep::All` pass keeps it in bf16.
                        acts.work.round_products();
                    }
                    std::mem::swap(&mut acts.layers[l].x, &mut acts.work.x);
                    acts.work_layer = Some(l);
                }
                Keep::All if acts.kept_bf16 => {
                    // The block runs on the pass's f32 products (lent by `work`), kept in bf16 after it:
                    // the block's output, computed from the f32 values, is that of an f32-keeping pass.
                    let la = &mut acts.layers[l];
                    la.swap_products(&mut acts.work);
                    self.block_forward(lp, l, adapter, la, s, rope, attend, &mut out);
                    la.narrow_products();
                    la.swap_products(&mut acts.work);
                }
                Keep::All if acts.recomputes_attention => {
                    // The block writes its attention outputs into the pass's one set (lent by `work`),
                    // which the next block overwrites: backward recomputes them.
                    let la = &mut acts.layers[l];
                    la.swap_attention_outputs(&mut acts.work);
                    self.block_forward(lp, l, adapter, la, s, rope, attend, &mut out);
                    la.swap_attention_outputs(&mut acts.work);
                }
                Keep::All => self.block_forward(lp, l, adapter, &mut acts.layers[l], s, rope, attend, &mut out),
                Keep::None => self.block_forward(lp, l, adapter, &mut acts.layers[0], s, rope, attend, &mut out),
            }
            if to_next_slot {
                acts.layers[l + 1].x = out;
            } else if l + 1 < n_layers {
                acts.x_final = std::mem::replace(&mut acts.layers[0].x, out);
            } else {
                acts.x_final = out;
            }
        }
        fit(&mut acts.hidden, n * d);
        let s = &mut acts.scratch;
        fit(&mut s.stat_a, n);
        fit(&mut s.stat_b, n);
        norm_forward(cfg.norm, &p.norm_f, &mut acts.hidden, &mut s.stat_a, &mut s.stat_b, &acts.x_final, n, d);
        acts.end_pass();
        Ok(())
    }

    /// Log-probs at the batch's targets from `acts.hidden` (after [`Decoder::forward`]).
    pub fn head_forward<'m>(&self, model: impl Into<Model<'m>>, b: &Batch, acts: &mut Activations) -> HeadOutput {
        let model = model.into();
        let p = model.base;
        let t = b.targets.len();
        let mut out = HeadOutput { logp: vec![0.0; t], logit_sum: vec![0.0; t] };
        fit(&mut acts.head_lse, t);
        // A pass for backward keeps `E_p[W]` per target: the backward's input gradient comes from it, one
        // product here instead of one on recomputed logits there (`Decoder::backward_logprobs`).
        let for_backward = acts.kept != Keep::None;
        fit(&mut acts.head_expect, if for_backward { t * self.cfg.hidden } else { 0 });
        k::logprob_head_forward(
            &mut out.logp,
            &mut acts.head_lse,
            Some(&mut out.logit_sum),
            for_backward.then_some(&mut acts.head_expect[..]),
            &acts.hidden,
            model.head_weight(),
            bias(&p.b_head),
            &b.targets,
            self.cfg.hidden,
            self.cfg.vocab_size,
            model.precision,
        );
        out
    }

    /// Forward through trunk and head: per-target log-probs.
    pub fn logprobs<'m>(
        &self,
        model: impl Into<Model<'m>>,
        b: &Batch,
        acts: &mut Activations,
        keep: impl Into<Keep>,
    ) -> Result<HeadOutput, EngineError> {
        let model = model.into();
        self.forward(model, b, acts, keep)?;
        Ok(self.head_forward(model, b, acts))
    }
}
