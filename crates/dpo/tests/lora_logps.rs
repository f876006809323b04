//! Log-probs of a base with a PEFT adapter on it (`tests/fixtures/more/lora`, PEFT 0.21) against what
//! PEFT computed: within 1e-4 per sequence, for the adapter applied in the forward pass and merged into
//! the base, from tokenized and text rows, with both packings.

mod common;

use std::path::Path;

use dpo::data::pack::sum_ranges;
use dpo::data::{pack_pairs, Example, Packing};
use engine::model::Model;
use engine::{Activations, Decoder};

use common::{jsonl, MORE};

/// Summed completion log-probs `(chosen, rejected, chosen_len, rejected_len)` of each pair under `model`.
fn score(decoder: &Decoder, model: Model, examples: &[Example], packing: Packing) -> Vec<(f64, f64, usize, usize)> {
    let mut acts = Activations::default();
    let mut out = Vec::new();
    for chunk in examples.chunks(5) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let packed = pack_pairs(&refs, packing);
        let head = decoder.logprobs(model, &packed.batch, &mut acts, false).unwrap();
        let (c, r) = (sum_ranges(&head.logp, &packed.chosen), sum_ranges(&head.logp, &packed.rejected));
        for i in 0..chunk.len() {
            out.push((c[i], r[i], packed.chosen[i].len(), packed.rejected[i].len()));
        }
    }
    out
}

/// Largest |got - PEFT's| over both sequences of every row; lengths must agree.
fn max_error(got: &[(f64, f64, usize, usize)], want_file: &Path) -> f64 {
    let want = jsonl(want_file);
    assert_eq!(got.len(), want.len());
    let mut worst = 0.0f64;
    for (g, w) in got.iter().zip(&want) {
        let f = |k: &str| w[k].as_f64().unwrap();
        let n = |k: &str| w[k].as_u64().unwrap() as usize;
        assert_eq!((g.2, g.3), (n("chosen_len"), n("rejected_len")));
        worst = worst.max((g.0 - f("policy_chosen_logps")).abs()).max((g.1 - f("policy_rejected_logps")).abs());
    }
    worst
}

#[test]
fn base_with_starting_adapter_matches_peft() {
    for arch in ["gpt2", "llama", "qwen3"] {
        let root = MORE.path(&format!("lora/{arch}"));
        let base_dir = root.join("base");
        let base = hf::load_model(&base_dir).unwrap();
        let adapter = hf::peft::load_adapter(&root.join("init_adapter"), &base.config).unwrap().adapter;
        let merged = hf::peft::merged_params(&base.params, &adapter, &base.config).unwrap();
        let decoder = Decoder::new(base.config.decoder.clone());
        let want = root.join("logps.jsonl");
        let (mut worst_adapter, mut worst_merged, mut base_only) = (0.0f64, 0.0f64, 0.0f64);
        for file in ["prefs.tokenized.jsonl", "prefs.jsonl"] {
            let ex = MORE.examples(file, &base_dir);
            for packing in [Packing::SharedPrompt, Packing::Separate] {
                let err = max_error(&score(&decoder, Model::new(&base.params, Some(&adapter)), &ex, packing), &want);
                assert!(err < 1e-4, "{arch} {file} {packing:?}: adapter in the forward: max |logp error| {err:.2e}");
                worst_adapter = worst_adapter.max(err);
                let err = max_error(&score(&decoder, Model::new(&merged, None), &ex, packing), &want);
                assert!(err < 1e-4, "{arch} {file} {packing:?}: merged: max |logp error| {err:.2e}");
                worst_merged = worst_merged.max(err);
                base_only = base_only.max(max_error(&score(&decoder, (&base.params).into(), &ex, packing), &want));
            }
        }
        // The adapter must matter, except llama's, which is PEFT's own initialisation (B zero).
        if arch == "llama" {
            assert!(base_only < 1e-4, "{arch}: B is zero, the base alone gives PEFT's numbers ({base_only:.2e})");
        } else {
            assert!(base_only > 1e-2, "{arch}: the base alone is within {base_only:.2e}: the test shows nothing");
        }
        println!(
            "{arch}: max |logp error| adapter {worst_adapter:.2e}, merged {worst_merged:.2e} (base alone: {base_only:.2e})"
        );
    }
}
