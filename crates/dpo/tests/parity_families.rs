//! The families added as naming-table rows against what transformers and TRL computed on the public
//! fixtures of `tests/fixtures/more` (its README): log-probs within 1e-4, a 6-step DPO run within 1e-3 per
//! metric and 1e-2 on the weight change, save → load bit-identical, and greedy generation equal to the
//! argmax of the full forward.

mod common;

use dpo::data::Packing;
use engine::generate::{generate, SamplingConfig};
use engine::rng::Rng;
use engine::{Activations, Batch};

use common::{load, max_logp_error, run, score, scratch, trl_errors, trl_settings, MORE};

/// The families of `tests/fixtures/more` this build supports.
const ARCHS: [&str; 5] = ["phi3", "qwen3", "smollm3", "gptj", "gemma3"];

#[test]
fn logps_match_transformers_from_tokenized_and_text_rows() {
    for arch in ARCHS {
        let want = MORE.expected_logps(arch);
        let mut worst = 0.0f64;
        for (variant, policy) in [("policy", true), ("ref", false)] {
            let dir = MORE.model(arch, variant);
            for file in ["prefs.tokenized.jsonl", "prefs.jsonl"] {
                let ex = MORE.examples(file, &dir);
                for packing in [Packing::SharedPrompt, Packing::Separate] {
                    let err = max_logp_error(&score(&dir, &ex, packing), &want, policy);
                    assert!(err < 1e-4, "{arch}-{variant} {file} {packing:?}: max |logp error| {err:.2e}");
                    worst = worst.max(err);
                }
            }
        }
        println!("{arch}: worst |logp error| {worst:.2e} (policy and ref, text and token rows, both packings)");
    }
}

#[test]
fn six_steps_match_trl() {
    for arch in ARCHS {
        let out = scratch(&format!("families-trl-{arch}"));
        run(&trl_settings(MORE, arch, out.clone()));
        let (worst, rel) = trl_errors(MORE, arch, &out);
        println!("{arch}: worst metric error {:.2e} ({}); weight change relative error {rel:.2e}", worst.0, worst.1);
        assert!(worst.0 < 1e-3, "{arch}: {}", worst.1);
        assert!(rel < 1e-2, "{arch}: weight change differs from TRL's by {rel}");
        std::fs::remove_dir_all(&out).unwrap();
    }
}

/// Load, save, load: the saved directory holds the same HF tensors and gives bit-identical log-probs.
#[test]
fn save_and_reload_round_trip() {
    for arch in ARCHS {
        let dir = MORE.model(arch, "policy");
        let ex = MORE.examples("prefs.tokenized.jsonl", &dir);
        let before = score(&dir, &ex, Packing::SharedPrompt);
        let (_, _, m) = load(&dir);
        let out = scratch(&format!("families-roundtrip-{arch}"));
        hf::save_model(&out, &m.config, &m.params, Some(&dir)).unwrap();
        let (src, saved) = (hf::SafeTensors::open(&dir.join("model.safetensors")).unwrap(), load(&out).2);
        for (name, shape, data) in hf::to_hf_tensors(&saved.config, &saved.params) {
            let t = src.read_f32(&name).unwrap_or_else(|e| panic!("{arch}: {name}: {e}"));
            assert!(t.shape == shape && t.data == data, "{arch}: `{name}` differs from the source checkpoint");
        }
        assert_eq!(before, score(&out, &ex, Packing::SharedPrompt), "{arch}");
        std::fs::remove_dir_all(&out).unwrap();
    }
}

/// Greedy decoding with the KV cache picks, at every step, the argmax of a full forward over the sequence
/// so far, and reports that forward's log-prob.
#[test]
fn greedy_generation_matches_full_forward_argmax() {
    for arch in ARCHS {
        let (model, params, _) = load(&MORE.model(arch, "policy"));
        let (d, v) = (model.cfg.hidden, model.cfg.vocab_size);
        let prompts: Vec<Vec<u32>> = vec![vec![5], vec![17, 230, 41, 9, 300, 77, 12]];
        let gens = generate(&model, &params, &prompts, 1, &SamplingConfig::greedy(10), &mut Rng::new(0)).unwrap();
        for (g, prompt) in gens.iter().zip(&prompts) {
            assert_eq!(g.tokens.len(), 10, "{arch}");
            let mut seq = prompt.clone();
            for (step, (&t, &logp)) in g.tokens.iter().zip(&g.logps).enumerate() {
                let mut b = Batch::default();
                b.push_sequence(&seq, seq.len());
                let mut acts = Activations::default();
                model.forward(&params, &b, &mut acts, false).unwrap();
                let mut logits = vec![0.0; v];
                engine::kernels::logits_forward(
                    &mut logits,
                    &acts.hidden[(seq.len() - 1) * d..],
                    &params.head().data,
                    d,
                    v,
                );
                if let Some(b) = &params.b_head {
                    logits.iter_mut().zip(&b.data).for_each(|(l, b)| *l += b);
                }
                let best = (0..v).fold(0, |b, i| if logits[i] > logits[b] { i } else { b });
                // Equal, or a near-tie that rounding may order either way.
                assert!(
                    best == t as usize || logits[best] - logits[t as usize] < 1e-4,
                    "{arch} step {step}: the cached path chose {t}, the full forward {best}"
                );
                let max = logits[best];
                let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
                assert!((logp - (logits[t as usize] - lse)).abs() < 1e-4, "{arch} step {step}: logp {logp}");
                seq.push(t);
            }
        }
    }
}
