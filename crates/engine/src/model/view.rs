//! What a pass reads ([`Model`]: the base and, optionally, a LoRA adapter on it) and where its backward
//! accumulates ([`Grads`]: every parameter, or the adapter alone on a frozen base).

use crate::config::DecoderConfig;
use crate::kernels::{self as k, Precision};
use crate::lora::{Adapter, LayerAdapter};
use crate::params::{LayerParams, Params, Tensor};
use crate::quant::{FrozenEmbedding, FrozenLinears};

use super::linear::LayerView;
use super::lora_block::{Dropout, LayerLora};
use super::EngineError;

/// What a pass reads: the base and, optionally, an adapter on it (`None` = the base alone: the reference
/// of a fresh adapter, "adapter off").
///
/// `dropout_seed` turns on the adapter's dropout (`Adapter::dropout`, PEFT's `lora_dropout` on the
/// adapter's input) in a forward pass that keeps activations for backward (`keep`): a training pass. Give
/// every such pass its own seed (step and micro-batch); backward regenerates the same masks from the seed
/// the forward recorded. Passes without `keep` (scoring, evaluation) and generation never drop.
///
/// `frozen`: the base's block linears stored below f32 (QLoRA's NF4, or bf16); they replace the four
/// linear weights of `base`'s layers, whose tensors are then empty. Such a base is frozen: only
/// [`Grads::Adapter`] may be asked of it.
///
/// `embedding`: a frozen model's token embedding and head kept in bf16 ([`FrozenEmbedding`]): as a bf16
/// pass reads them (the head in bf16, the lookups' rows in f32 for the tokens of a run's data), or
/// whole, for a checkpoint that stores them in bf16; they replace `base`'s `wte` and head, which are
/// then empty. Such a model scores and, under an adapter, trains it ([`Grads::Adapter`]); it has no
/// full gradients, and generates only through whole tables (a sampled token's row may not be kept).
///
/// `precision`: the arithmetic of the block linears' and the LM head's products, forward and backward
/// ([`Precision::Bf16`]: autocast's bf16). Attention's and the adapter's products stay f32.
#[derive(Clone, Copy)]
pub struct Model<'a> {
    pub base: &'a Params,
    pub adapter: Option<&'a Adapter>,
    pub dropout_seed: Option<u64>,
    pub frozen: Option<&'a FrozenLinears>,
    pub embedding: Option<&'a FrozenEmbedding>,
    pub precision: Precision,
}

impl<'a> Model<'a> {
    /// The base with `adapter` on it (none: the base alone), without dropout, in f32.
    pub fn new(base: &'a Params, adapter: Option<&'a Adapter>) -> Self {
        Model { base, adapter, dropout_seed: None, frozen: None, embedding: None, precision: Precision::F32 }
    }

    /// This view with the token embedding and head read from `embedding` (taken from `base`).
    pub fn with_embedding(self, embedding: &'a FrozenEmbedding) -> Self {
        Model { embedding: Some(embedding), ..self }
    }

    /// Refuses generation through a [`FrozenEmbedding`] that keeps some rows only: a sampled token's
    /// row may not be kept.
    pub(crate) fn check_generates(&self) -> Result<(), EngineError> {
        match self.embedding {
            Some(e) if !e.is_whole() => Err(EngineError::FrozenMismatch(
                "generation through a frozen embedding, which keeps only the rows of a run's data: it scores them \
                 and trains an adapter on them only"
                    .into(),
            )),
            _ => Ok(()),
        }
    }

    /// `x[N, d]` = the embeddings of `tokens` at `positions` (the position table's rows added, the
    /// embedding scaled where the family scales it): the first block's input. A token whose row a frozen
    /// embedding did not keep is refused.
    pub(crate) fn embed(
        &self,
        cfg: &DecoderConfig,
        x: &mut [f32],
        tokens: &[u32],
        positions: &[u32],
    ) -> Result<(), EngineError> {
        let (p, d) = (self.base, cfg.hidden);
        let wpe = p.wpe.as_ref().map(|t| &t.data[..]);
        match self.embedding {
            Some(e) => k::embedding_forward_rows(x, e, tokens, wpe, positions, d)
                .map_err(|(index, token)| EngineError::TokenNotKept { token, index })?,
            None => k::embedding_forward(x, &p.wte.data, tokens, wpe, positions, d),
        }
        if let Some(scale) = super::embedding_scale(cfg) {
            x.iter_mut().for_each(|v| *v *= scale);
        }
        Ok(())
    }

    /// The LM head's weight as the head kernels read it: the frozen embedding's bf16 head, or the base's.
    pub(crate) fn head_weight(&self) -> crate::kernels::HeadWeight<'a> {
        match self.embedding {
            Some(e) => crate::kernels::HeadWeight::Stored(e.head()),
            None => crate::kernels::HeadWeight::F32(&self.base.head().data),
        }
    }

    /// This view with its products in `precision`.
    pub fn with_precision(self, precision: Precision) -> Self {
        Model { precision, ..self }
    }

    /// This view with the base's block linears read from `frozen` ([`FrozenLinears::take_from`] `base`).
    pub fn with_frozen(self, frozen: &'a FrozenLinears) -> Self {
        Model { frozen: Some(frozen), ..self }
    }

    /// Layer `l` of the base as the block reads it.
    pub(crate) fn layer(&self, l: usize) -> LayerView<'a> {
        LayerView {
            params: &self.base.layers[l],
            frozen: self.frozen.map(|f| &f.layers()[l]),
            precision: self.precision,
        }
    }

    /// This view with the adapter's dropout drawn from `seed` in training passes.
    pub fn with_dropout_seed(self, seed: u64) -> Self {
        Model { dropout_seed: Some(seed), ..self }
    }

    /// The adapter of layer `l` as the block applies it; dropout only when `train` and a seed was given.
    pub(crate) fn layer_lora(&self, l: usize, train: bool) -> Option<LayerLora<'a>> {
        let adapter = self.adapter?;
        let layer = adapter.layers.get(l).filter(|la| !la.pairs.is_empty())?;
        let dropout = match self.dropout_seed {
            Some(seed) if train && adapter.dropout > 0.0 => Some(Dropout::new(adapter.dropout, seed, l)),
            _ => None,
        };
        Some(LayerLora { adapter: layer, dropout })
    }

    /// Checks that the adapter fits `cfg` (a pair's shapes, its rows inside its site, one entry per
    /// layer) before any kernel reads it.
    pub(crate) fn check(&self, cfg: &DecoderConfig) -> Result<(), EngineError> {
        if let Some(frozen) = self.frozen {
            frozen.check(cfg).map_err(EngineError::FrozenMismatch)?;
        }
        if let Some(e) = self.embedding {
            if (e.vocab(), e.hidden()) != (cfg.vocab_size, cfg.hidden) {
                return Err(EngineError::FrozenMismatch(format!(
                    "a frozen embedding of {} x {} for a model of {} x {}",
                    e.vocab(),
                    e.hidden(),
                    cfg.vocab_size,
                    cfg.hidden
                )));
            }
        }
        let Some(adapter) = self.adapter else { return Ok(()) };
        if adapter.layers.len() != cfg.n_layers {
            return Err(EngineError::AdapterMismatch(format!(
                "{} adapter layers for a model of {} layers",
                adapter.layers.len(),
                cfg.n_layers
            )));
        }
        if !(0.0..1.0).contains(&adapter.dropout) {
            return Err(EngineError::AdapterMismatch(format!("dropout {} is outside [0, 1)", adapter.dropout)));
        }
        for (l, layer) in adapter.layers.iter().enumerate() {
            for (i, pair) in layer.pairs.iter().enumerate() {
                let t = &pair.target;
                let (inp, out) = t.site.dims(cfg);
                let name = format!("layers.{l}.{}", t.module);
                if t.rows.start > t.rows.end || t.rows.end > out {
                    return Err(EngineError::AdapterMismatch(format!(
                        "{name}: rows {:?} are outside the {out} outputs of {:?}",
                        t.rows, t.site
                    )));
                }
                if pair.a.shape != [t.r, inp] || pair.a.data.len() != t.r * inp {
                    return Err(EngineError::AdapterMismatch(format!(
                        "{name}.lora_A is {:?}, want [{}, {inp}]",
                        pair.a.shape, t.r
                    )));
                }
                if pair.b.shape != [t.rows.len(), t.r] || pair.b.data.len() != t.rows.len() * t.r {
                    return Err(EngineError::AdapterMismatch(format!(
                        "{name}.lora_B is {:?}, want [{}, {}]",
                        pair.b.shape,
                        t.rows.len(),
                        t.r
                    )));
                }
                if layer.pairs[..i].iter().any(|p| p.target.module == t.module) {
                    return Err(EngineError::AdapterMismatch(format!("{name} appears twice")));
                }
            }
        }
        Ok(())
    }
}

impl<'a> From<&'a Params> for Model<'a> {
    fn from(base: &'a Params) -> Self {
        Model::new(base, None)
    }
}

/// Where backward accumulates (`+=`): every parameter of the base, or the adapter alone (the base frozen:
/// its weight gradients are never computed, which skips the weight-gradient GEMMs, and no base-sized
/// gradient buffer exists). A pass through an adapter takes [`Grads::Adapter`]; [`Grads::Full`] with an
/// adapter is refused ([`EngineError::FullGradsWithAdapter`]) rather than silently dropping its part.
pub enum Grads<'a> {
    Full(&'a mut Params),
    Adapter(&'a mut Adapter),
}

impl<'a> From<&'a mut Params> for Grads<'a> {
    fn from(g: &'a mut Params) -> Self {
        Grads::Full(g)
    }
}

/// A `&mut Params` held in a variable (`if let Some(g) = &mut grads`) passes as itself.
impl<'a, 'b> From<&'a mut &'b mut Params> for Grads<'a> {
    fn from(g: &'a mut &'b mut Params) -> Self {
        Grads::Full(g)
    }
}

impl<'a> From<&'a mut Adapter> for Grads<'a> {
    fn from(g: &'a mut Adapter) -> Self {
        Grads::Adapter(g)
    }
}

/// The embedding tables' gradients (`wte`, `wpe`), about to be accumulated into: pages handed back by
/// the last optimizer step are replaced by pooled ones, zeroed ([`crate::pages::reuse_zeroed`]).
pub(crate) fn embedding_grads(g: &mut Params) -> (&mut [f32], Option<&mut [f32]>) {
    crate::pages::reuse_zeroed(&mut g.wte.data);
    if let Some(t) = g.wpe.as_mut() {
        crate::pages::reuse_zeroed(&mut t.data);
    }
    (&mut g.wte.data, g.wpe.as_mut().map(|t| &mut t.data[..]))
}

/// Where one block's backward accumulates (see [`Grads`]).
pub(crate) enum LayerGrads<'g> {
    Full(&'g mut LayerParams),
    Adapter(&'g mut LayerAdapter),
}

impl LayerGrads<'_> {
    /// Before the block's backward accumulates into a full layer's gradients: their pages handed back
    /// by the last optimizer step are replaced by pooled ones, zeroed ([`crate::pages::reuse_zeroed`]).
    /// An adapter's gradients are too small to be handed back.
    pub(crate) fn reuse_pages(&mut self) {
        if let LayerGrads::Full(g) = self {
            for t in [&mut g.w_qkv, &mut g.w_o, &mut g.w_in, &mut g.w_out] {
                crate::pages::reuse_zeroed(&mut t.data);
            }
        }
    }
}

impl Grads<'_> {
    /// Checks this target against the model the pass read: full gradients need the base alone, adapter
    /// gradients an adapter of the same layout (modules, ranks, shapes).
    pub(crate) fn check(&self, model: &Model) -> Result<(), EngineError> {
        match (self, model.adapter) {
            (Grads::Full(_), _) if model.frozen.is_some() || model.embedding.is_some() => {
                Err(EngineError::FullGradsOfFrozenBase)
            }
            (Grads::Full(_), None) => Ok(()),
            (Grads::Full(_), Some(_)) => Err(EngineError::FullGradsWithAdapter),
            (Grads::Adapter(_), None) => {
                Err(EngineError::AdapterMismatch("adapter gradients were asked of a pass without an adapter".into()))
            }
            (Grads::Adapter(g), Some(a)) => {
                let same = |x: &Tensor, y: &Tensor| x.shape == y.shape && x.data.len() == y.data.len();
                let same_layout = g.layers.len() == a.layers.len()
                    && g.layers.iter().zip(&a.layers).all(|(gl, al)| {
                        gl.pairs.len() == al.pairs.len()
                            && gl
                                .pairs
                                .iter()
                                .zip(&al.pairs)
                                .all(|(gp, ap)| gp.target == ap.target && same(&gp.a, &ap.a) && same(&gp.b, &ap.b))
                    });
                if same_layout {
                    Ok(())
                } else {
                    Err(EngineError::AdapterMismatch(
                        "the gradient buffer's layout differs from the adapter's (build it with Adapter::zeros_like)"
                            .into(),
                    ))
                }
            }
        }
    }

    /// The base's gradient buffer, if the base is trained.
    pub(crate) fn base(&mut self) -> Option<&mut Params> {
        match self {
            Grads::Full(g) => Some(g),
            Grads::Adapter(_) => None,
        }
    }

    /// Layer `l`'s part.
    pub(crate) fn layer(&mut self, l: usize) -> LayerGrads<'_> {
        match self {
            Grads::Full(g) => LayerGrads::Full(&mut g.layers[l]),
            Grads::Adapter(g) => LayerGrads::Adapter(&mut g.layers[l]),
        }
    }
}
