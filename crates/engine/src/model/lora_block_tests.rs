use super::*;
use crate::batch::Batch;
use crate::lora::LoraTarget;
use crate::model::{Activations, Decoder, Model};
use crate::presets::{init_random, tiny_gpt2, tiny_llama};
use crate::rng::Rng;

#[test]
fn dropout_keeps_one_minus_p_scaled_and_the_same_mask_in_backward() {
    let (p, len) = (0.25f32, 100_000);
    let x = vec![1.0f32; len];
    let d = Dropout::new(p, 7, 3);
    let mut out = vec![f32::NAN; len];
    d.apply(0, &x, &mut out);
    let kept = out.iter().filter(|&&v| v != 0.0).count() as f64 / len as f64;
    assert!((kept - 0.75).abs() < 0.01, "kept {kept}");
    assert!(out.iter().all(|&v| v == 0.0 || v == 1.0 / (1.0 - p)));
    // Backward's mask is the forward's: dx += g ⊙ mask / (1 - p) with g = 1 gives the same vector.
    let mut dx = vec![0.0f32; len];
    d.apply_add(0, &x, &mut dx);
    assert_eq!(dx, out);
    // Another pair, layer or seed draws another mask.
    for other in [(d, 1), (Dropout::new(p, 7, 4), 0), (Dropout::new(p, 8, 3), 0)] {
        let mut o = vec![0.0f32; len];
        other.0.apply(other.1, &x, &mut o);
        let same = o.iter().zip(&out).filter(|(a, b)| (**a == 0.0) == (**b == 0.0)).count() as f64 / len as f64;
        assert!(same < 0.7, "masks agree on {same} of the elements");
    }
}

/// Floats held by the adapter's buffers in `acts`.
fn held(acts: &Activations) -> u64 {
    let u: usize = acts.layers.iter().flat_map(|l| &l.lora.u).map(Vec::len).sum();
    let s = &acts.scratch.lora;
    (u + s.xd.len() + s.du.len() + s.dxd.len() + s.v.len()) as u64
}

#[test]
fn floats_per_token_is_what_the_adapter_holds() {
    for (cfg, dropout) in [(tiny_gpt2(), 0.0), (tiny_llama(), 0.1)] {
        let targets: Vec<LoraTarget> = Site::ALL
            .iter()
            .enumerate()
            .map(|(i, &site)| {
                let rows = 0..site.dims(&cfg).1;
                LoraTarget { module: format!("m{i}"), site, rows, r: 2 + i, scale: 1.0 }
            })
            .collect();
        let mut a = Adapter::zeros(&cfg, &vec![targets; cfg.n_layers], dropout);
        a.init_peft(&mut Rng::new(1));
        let (m, p) = (Decoder::new(cfg.clone()), init_random(&cfg, 0.1, 3));
        let mut b = Batch::default();
        b.push_sequence(&[1, 2, 3, 4, 5], 1);
        b.push_sequence(&[6, 7, 8], 1);
        let n = b.len() as u64;
        let model = Model::new(&p, Some(&a)).with_dropout_seed(4);

        let mut acts = Activations::default();
        m.forward(model, &b, &mut acts, false).unwrap();
        assert_eq!(held(&acts), n * m.adapter_activation_floats_per_token(&a, false), "{cfg:?}");

        let mut acts = Activations::default();
        let out = m.logprobs(model, &b, &mut acts, true).unwrap();
        let mut grads = a.zeros_like();
        m.backward_logprobs(model, &b, &mut acts, &vec![1.0; out.logp.len()], &mut grads).unwrap();
        assert_eq!(held(&acts), n * m.adapter_activation_floats_per_token(&a, true), "{cfg:?}");
    }
}
