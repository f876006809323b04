//! What a run trains: every weight of the decoder, or a LoRA adapter on a frozen base. The same type
//! holds the trained tensors and, with the same layout, their gradient buffer; as a [`ParamSet`] it is
//! what the optimizer, clipping, the non-finite check and checkpoints work on, so none of them holds a
//! full-size buffer in a LoRA run.

use engine::model::Grads;
use engine::{Adapter, DecoderConfig, ParamSet, Params, Tensor};

/// The trained tensors (or a gradient buffer of the same layout).
// A run holds two (the weights and the gradient): the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Trained {
    /// Every weight of the decoder.
    Full(Params),
    /// A LoRA adapter; the base it sits on is frozen and held elsewhere.
    Adapter(Adapter),
}

impl Trained {
    /// A zero gradient buffer of this layout.
    pub fn zeros_like(&self, cfg: &DecoderConfig) -> Self {
        match self {
            Trained::Full(_) => Trained::Full(Params::zeros(cfg)),
            Trained::Adapter(a) => Trained::Adapter(a.zeros_like()),
        }
    }

    /// Where a backward pass accumulates into this (gradient) buffer.
    pub fn grads(&mut self) -> Grads<'_> {
        match self {
            Trained::Full(p) => Grads::Full(p),
            Trained::Adapter(a) => Grads::Adapter(a),
        }
    }

    pub fn adapter(&self) -> Option<&Adapter> {
        match self {
            Trained::Adapter(a) => Some(a),
            Trained::Full(_) => None,
        }
    }
}

impl ParamSet for Trained {
    fn named(&self) -> Vec<(String, &Tensor)> {
        match self {
            Trained::Full(p) => ParamSet::named(p),
            Trained::Adapter(a) => a.named(),
        }
    }

    fn named_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        match self {
            Trained::Full(p) => ParamSet::named_mut(p),
            Trained::Adapter(a) => a.named_mut(),
        }
    }
}
