//! The trunk and the LM head, backward: from per-target log-prob gradients (or a gradient on the final
//! hidden states) to every parameter's gradient, or (frozen base, [`Grads::Adapter`]) to the adapter's.

use crate::batch::Batch;
use crate::kernels as k;

use super::acts::{fit, Activations, Keep, PendingEmbeddingGrads};
use super::block::Attend;
use super::view::embedding_grads;
use super::{bias, bias_mut, embedding_scale, norm_backward, norm_forward, Decoder, EngineError, Grads, Model};

impl Decoder {
    /// Backward from per-target log-prob gradients: accumulates into `grads` (`+=`): a `&mut Params`, or
    /// [`Grads::Adapter`] for a pass through an adapter on a frozen base. `model` is the one the forward
    /// read. It consumes the forward: each layer's activations are handed back as backward leaves it
    /// (`crate::pages`), and another backward needs another forward.
    pub fn backward_logprobs<'m, 'g>(
        &self,
        model: impl Into<Model<'m>>,
        b: &Batch,
        acts: &mut Activations,
        dlogp: &[f32],
        grads: impl Into<Grads<'g>>,
    ) -> Result<(), EngineError> {
        self.backward_logprobs_inner(model.into(), b, acts, dlogp, &mut grads.into(), None)
    }

    /// [`Decoder::backward_logprobs`], holding the embedding lookups' gradient back in `pending` (added
    /// to `grads` by [`PendingEmbeddingGrads::apply`]) instead of adding it now. With a frozen base there
    /// is no embedding gradient and nothing is held back.
    pub fn backward_logprobs_deferred<'m, 'g>(
        &self,
        model: impl Into<Model<'m>>,
        b: &Batch,
        acts: &mut Activations,
        dlogp: &[f32],
        grads: impl Into<Grads<'g>>,
        pending: &mut PendingEmbeddingGrads,
    ) -> Result<(), EngineError> {
        self.backward_logprobs_inner(model.into(), b, acts, dlogp, &mut grads.into(), Some(pending))
    }

    fn backward_logprobs_inner(
        &self,
        model: Model,
        b: &Batch,
        acts: &mut Activations,
        dlogp: &[f32],
        grads: &mut Grads,
        pending: Option<&mut PendingEmbeddingGrads>,
    ) -> Result<(), EngineError> {
        grads.check(&model)?;
        self.check_head_gradient(b, acts, dlogp)?;
        let mut dhidden = std::mem::take(&mut acts.dhidden);
        crate::pages::reuse(&mut dhidden);
        dhidden.clear();
        dhidden.resize(b.len() * self.cfg.hidden, 0.0);
        let result = if self.head_input_grad_from_expect(model, b, acts, dlogp, &mut dhidden) {
            // The head's input gradient came from the forward's `E_p[W]`; its weight gradient (a trained
            // head) comes after the blocks' backward, from logits recomputed then: the `[vocab, d]` gradient
            // is not written while every layer's activations are still held, the step's peak.
            // A tied embedding takes the head's part before the lookups' (`PendingEmbeddingGrads`): the
            // lookups are held back until the head's is in, as a split batch holds them.
            let mut own = PendingEmbeddingGrads::default();
            let held = match pending {
                Some(p) => p,
                None => &mut own,
            };
            let hidden = std::mem::take(&mut acts.hidden);
            let result = self.backward_inner(model, b, acts, &dhidden, grads, Some(held));
            acts.hidden = hidden;
            if result.is_ok() {
                self.head_backward_recomputed(model, b, acts, dlogp, grads, None);
                if let Some(g) = grads.base() {
                    own.apply(g);
                }
            }
            crate::pages::discard(&mut acts.hidden);
            result
        } else {
            self.head_backward_recomputed(model, b, acts, dlogp, grads, Some(&mut dhidden));
            self.backward_inner(model, b, acts, &dhidden, grads, pending)
        };
        crate::pages::discard(&mut dhidden);
        acts.dhidden = dhidden;
        result
    }

    /// `dhidden += d(logp)/d(hidden) · dlogp` from the `E_p[W]` the forward kept
    /// ([`Activations::head_expect`]), if it kept it for these targets: then `true`, and only the head
    /// weights' gradient is left to [`Decoder::head_backward_recomputed`].
    fn head_input_grad_from_expect(
        &self,
        model: Model,
        b: &Batch,
        acts: &Activations,
        dlogp: &[f32],
        dhidden: &mut [f32],
    ) -> bool {
        let d = self.cfg.hidden;
        if acts.head_expect.len() != dlogp.len() * d {
            return false;
        }
        let (targets, vocab, w) = (&b.targets, self.cfg.vocab_size, model.head_weight());
        k::logprob_head_input_grad(dhidden, dlogp, &acts.head_expect, w, targets, d, vocab, model.precision);
        true
    }

    fn check_head_gradient(&self, b: &Batch, acts: &Activations, dlogp: &[f32]) -> Result<(), EngineError> {
        if dlogp.len() != b.targets.len() || acts.head_lse.len() != b.targets.len() {
            return Err(EngineError::GradientLength { got: dlogp.len(), want: b.targets.len() });
        }
        Ok(())
    }

    /// The LM head's part of backward alone: `dhidden += d(logp)/d(hidden) · dlogp` (`[N, d]`) and the head
    /// weights' gradient into `grads` (none with a frozen base). For objectives that add their own
    /// gradient on the hidden states (a value head) before calling [`Decoder::backward`].
    pub fn head_backward<'m, 'g>(
        &self,
        model: impl Into<Model<'m>>,
        b: &Batch,
        acts: &Activations,
        dlogp: &[f32],
        grads: impl Into<Grads<'g>>,
        dhidden: &mut [f32],
    ) -> Result<(), EngineError> {
        let (model, mut grads) = (model.into(), grads.into());
        grads.check(&model)?;
        self.check_head_gradient(b, acts, dlogp)?;
        if dhidden.len() != b.len() * self.cfg.hidden {
            return Err(EngineError::MalformedBatch("dhidden must be [tokens, hidden]".into()));
        }
        if self.head_input_grad_from_expect(model, b, acts, dlogp, dhidden) {
            self.head_backward_recomputed(model, b, acts, dlogp, &mut grads, None);
        } else {
            self.head_backward_recomputed(model, b, acts, dlogp, &mut grads, Some(dhidden));
        }
        Ok(())
    }

    /// The head's backward on logits recomputed from `acts.hidden` and `acts.head_lse`: the head weights'
    /// gradient into `grads` (none with a frozen base) and, when given, `dhidden += d(logp)/d(hidden) ·
    /// dlogp`. Shapes checked by the callers.
    fn head_backward_recomputed(
        &self,
        model: Model,
        b: &Batch,
        acts: &Activations,
        dlogp: &[f32],
        grads: &mut Grads,
        dhidden: Option<&mut [f32]>,
    ) {
        let (dw_head, db_head) = match grads.base() {
            Some(g) => {
                let dw = match g.lm_head.as_mut() {
                    Some(t) => &mut t.data,
                    None => &mut g.wte.data,
                };
                // Handed back by the last optimizer step: pooled pages, zeroed, for the accumulation.
                crate::pages::reuse_zeroed(dw);
                (Some(&mut dw[..]), bias_mut(&mut g.b_head))
            }
            None => (None, None),
        };
        if dw_head.is_none() && dhidden.is_none() {
            return;
        }
        k::logprob_head_backward(
            dhidden,
            dw_head,
            db_head,
            dlogp,
            &acts.head_lse,
            &acts.hidden,
            model.head_weight(),
            bias(&model.base.b_head),
            &b.targets,
            self.cfg.hidden,
            self.cfg.vocab_size,
            model.precision,
        );
    }

    /// Backward from a gradient on the final hidden states (`[N, d]`): accumulates into `grads`.
    /// Needs a forward with [`Keep::All`] or [`Keep::LayerInputs`] of the same `model` on the same batch.
    pub fn backward<'m, 'g>(
        &self,
        model: impl Into<Model<'m>>,
        b: &Batch,
        acts: &mut Activations,
        dhidden: &[f32],
        grads: impl Into<Grads<'g>>,
    ) -> Result<(), EngineError> {
        let (model, mut grads) = (model.into(), grads.into());
        grads.check(&model)?;
        self.backward_inner(model, b, acts, dhidden, &mut grads, None)
    }

    fn backward_inner(
        &self,
        model: Model,
        b: &Batch,
        acts: &mut Activations,
        dhidden: &[f32],
        grads: &mut Grads,
        pending: Option<&mut PendingEmbeddingGrads>,
    ) -> Result<(), EngineError> {
        // The step's cycle of buffers starts here (`crate::pages::pool::start`).
        #[cfg(target_os = "linux")]
        crate::pages::pool::start();
        let cfg = &self.cfg;
        let (n, d) = (b.len(), cfg.hidden);
        let p = model.base;
        if acts.kept == Keep::None || acts.n != n {
            return Err(EngineError::MalformedBatch(
                "backward needs a forward with Keep::All or Keep::LayerInputs on the same batch (each such forward \
                 serves one backward)"
                    .into(),
            ));
        }
        let pairs = |l: usize| model.adapter.map_or(0, |a| a.layers[l].pairs.len());
        let other_adapter = match acts.kept {
            // Checkpointed: the slot holds one layer's adapter activations.
            Keep::LayerInputs => acts.work_layer.is_some_and(|l| acts.work.lora.u.len() != pairs(l)),
            Keep::All | Keep::None => acts.layers.iter().enumerate().any(|(l, la)| la.lora.u.len() != pairs(l)),
        };
        if other_adapter {
            return Err(EngineError::MalformedBatch("backward needs a forward through the same adapter".into()));
        }
        let extended = self.extended_rope(b);
        let rope = extended.as_ref().or(self.rope.as_ref());
        let s = &mut acts.scratch;
        fit(&mut s.dx, n * d);
        fit(&mut s.dh, n * d);
        fit(&mut s.dact, n * cfg.ffn_hidden);
        // An ungated MLP's `dpre` is the activation's buffer (`Decoder::block_backward`).
        fit(&mut s.dpre, if cfg.mlp_in_dim() == cfg.ffn_hidden { 0 } else { n * cfg.mlp_in_dim() });
        fit(&mut s.dattn, n * cfg.attn_dim());
        fit(&mut s.dqkv, n * cfg.qkv_dim());

        // Final norm: recompute its statistics, then dx = d norm_f / d x_final.
        s.dx.iter_mut().for_each(|v| *v = 0.0);
        norm_forward(cfg.norm, &p.norm_f, &mut s.h, &mut s.stat_a, &mut s.stat_b, &acts.x_final, n, d);
        norm_backward(
            cfg.norm,
            &p.norm_f,
            grads.base().map(|g| &mut g.norm_f),
            &mut s.dx,
            dhidden,
            &acts.x_final,
            &s.stat_a,
            &s.stat_b,
            n,
            d,
        );
        // The head and the final norm are done with the final hidden states and their input.
        crate::pages::discard(&mut acts.hidden);
        crate::pages::discard(&mut acts.x_final);

        // A recomputed block draws the adapter's dropout masks from the seed its forward had.
        let forward_model = Model { dropout_seed: acts.dropout_seed, ..model };
        // With a frozen base only the adapter is trained: backward stops at the lowest layer with pairs, and
        // that layer's input gradient (the embeddings' or a lower frozen layer's) is not computed.
        let lowest = match (grads.base(), model.adapter) {
            (None, Some(a)) => a.layers.iter().position(|l| !l.pairs.is_empty()).unwrap_or(cfg.n_layers),
            _ => 0,
        };
        let full = grads.base().is_some();
        for l in (lowest..cfg.n_layers).rev() {
            let rope = self.block_rope(rope, l);
            let (lp, adapter) = (model.layer(l), model.adapter.map(|a| &a.layers[l]));
            let input_grad = full || l > lowest;
            if acts.kept != Keep::LayerInputs {
                let la = &mut acts.layers[l];
                if acts.kept_bf16 {
                    // The layer's bf16 products, widened into the pass's f32 products for its backward.
                    la.swap_products(&mut acts.work);
                    la.widen_products();
                }
                if acts.recomputes_attention {
                    // The layer's attention outputs, recomputed into the pass's one set.
                    la.swap_attention_outputs(&mut acts.work);
                    let lora = forward_model.layer_lora(l, true);
                    self.recompute_attention_half(lp, l, lora, la, s, b);
                }
                let mut lg = grads.layer(l);
                lg.reuse_pages();
                self.block_backward(lp, l, adapter, lg, input_grad, b, la, s, rope);
                if acts.kept_bf16 {
                    la.swap_products(&mut acts.work);
                }
                if acts.recomputes_attention {
                    la.swap_attention_outputs(&mut acts.work);
                }
                // Spent: handed back while the gradients fill memory (`crate::pages`).
                la.discard();
                continue;
            }
            // Checkpointed: the layer's kept input moves into the slot for the block's backward (which
            // reads it) and back out after it.
            std::mem::swap(&mut acts.layers[l].x, &mut acts.work.x);
            if acts.work_layer != Some(l) {
                // Re-run the block from its input into the slot. Its output (layer l+1's input again)
                // goes to s.dh, which block_backward overwrites before reading; s.dx, the gradient carried
                // from layer to layer, is not touched by a forward.
                let mut out = std::mem::take(&mut s.dh);
                let attend = Attend::Packed { batch: b, cache: None };
                let lora = forward_model.layer_lora(l, true);
                self.block_forward(lp, l, lora, &mut acts.work, s, rope, attend, &mut out);
                if acts.kept_bf16 {
                    acts.work.round_products();
                }
                s.dh = out;
                acts.work_layer = Some(l);
            }
            let mut lg = grads.layer(l);
            lg.reuse_pages();
            self.block_backward(lp, l, adapter, lg, input_grad, b, &acts.work, s, rope);
            std::mem::swap(&mut acts.layers[l].x, &mut acts.work.x);
            crate::pages::discard(&mut acts.layers[l].x);
        }
        // Backward has consumed the forward: its activations are handed back, and another backward
        // needs another forward (as PyTorch frees the graph).
        acts.kept = Keep::None;
        // A frozen base has no embedding gradient.
        let Some(grads) = grads.base() else { return Ok(()) };
        if let Some(scale) = embedding_scale(cfg) {
            // The lookups' output was scaled: so is the gradient that reaches the table.
            s.dx.iter_mut().for_each(|v| *v *= scale);
        }
        match pending {
            Some(pe) => {
                pe.rows.extend_from_slice(&s.dx);
                pe.tokens.extend_from_slice(&b.tokens);
                pe.positions.extend_from_slice(&b.positions);
            }
            None => {
                let (wte, wpe) = embedding_grads(grads);
                k::embedding_backward(wte, wpe, &s.dx, &b.tokens, &b.positions, d)
            }
        }
        Ok(())
    }
}
