//! The random model and batch the gradient tests of several files share.

use dpo_engine::presets::init_random;
use dpo_engine::rng::Rng;
use dpo_engine::{Batch, DecoderConfig, Params};

/// Three sequences of different lengths (longer than Gemma's window of 3), targets after the first token.
pub fn batch(cfg: &DecoderConfig) -> Batch {
    let mut r = Rng::new(7);
    let mut b = Batch::default();
    for len in [11, 6, 9] {
        let ids: Vec<u32> = (0..len).map(|_| r.below(cfg.vocab_size) as u32).collect();
        b.push_sequence(&ids, 1);
    }
    b
}

/// Random weights, the 1-D tensors (norm scales, biases) perturbed so that every gradient is non-trivial.
pub fn params(cfg: &DecoderConfig) -> Params {
    let mut p = init_random(cfg, 0.3, 3);
    let mut r = Rng::new(11);
    for (_, t) in p.named_mut() {
        if t.shape.len() == 1 {
            t.data.iter_mut().for_each(|x| *x += 0.2 * r.normal() as f32);
        }
    }
    p
}
