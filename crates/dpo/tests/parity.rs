//! The engine against what PyTorch/transformers computed on the parity fixtures
//! (`tests/fixtures/parity`, see its README for the tolerances held here).

mod common;

use dpo::data::{pack::sum_ranges, pack_pairs, Packing};
use engine::{Activations, Params};

use common::{load, max_logp_error, read_json, score, PARITY};

const ARCHS: [&str; 4] = ["gpt2", "llama", "llama3", "neox"];

#[test]
fn logps_match_transformers_from_tokenized_and_text_rows() {
    for arch in ARCHS {
        let want = PARITY.expected_logps(arch);
        for (variant, policy) in [("policy", true), ("ref", false), ("policy-legacy", true)] {
            let dir = PARITY.model(arch, variant);
            for file in ["prefs.tokenized.jsonl", "prefs.jsonl"] {
                let ex = PARITY.examples(file, &dir);
                for packing in [Packing::SharedPrompt, Packing::Separate] {
                    let err = max_logp_error(&score(&dir, &ex, packing), &want, policy);
                    println!("{arch}-{variant} {file} {packing:?}: max |logp error| = {err:.2e}");
                    assert!(err < 2e-4, "{arch}-{variant} {file} {packing:?}: {err}");
                }
            }
        }
    }
}

/// Gradient of the mean sigmoid DPO loss (beta 0.1) over the first 8 rows, as `expected/<arch>/grads.*`
/// defines it, against PyTorch's, per tensor by HF name.
#[test]
fn dpo_gradients_match_pytorch() {
    let beta = 0.1f64;
    for arch in ARCHS {
        let dir = PARITY.model(arch, "policy");
        let (model, params, hfm) = load(&dir);
        let ex = PARITY.examples("prefs.tokenized.jsonl", &dir)[..8].to_vec();
        let refs = score(&PARITY.model(arch, "ref"), &ex, Packing::SharedPrompt);

        let packed = pack_pairs(&ex.iter().collect::<Vec<_>>(), Packing::SharedPrompt);
        let mut acts = Activations::default();
        let head = model.logprobs(&params, &packed.batch, &mut acts, true).unwrap();
        let (pc, pr) = (sum_ranges(&head.logp, &packed.chosen), sum_ranges(&head.logp, &packed.rejected));
        let n = ex.len() as f64;
        let mut dlogp = vec![0.0f32; head.logp.len()];
        let mut loss = 0.0;
        for i in 0..ex.len() {
            let delta = (pc[i] - refs[i].chosen_logps) - (pr[i] - refs[i].rejected_logps);
            loss += softplus(-beta * delta) / n;
            // d/d(chosen logp) of -log sigmoid(beta * delta) / n; the rejected side has the opposite sign.
            let g = -beta * sigmoid(-beta * delta) / n;
            packed.chosen[i].clone().for_each(|t| dlogp[t] = g as f32);
            packed.rejected[i].clone().for_each(|t| dlogp[t] = -g as f32);
        }
        let want_loss = read_json(&PARITY.path(&format!("expected/{arch}/grads.json")))["loss"].as_f64().unwrap();
        assert!((loss - want_loss).abs() < 1e-4 * want_loss.abs(), "{arch}: loss {loss} vs {want_loss}");

        let mut grads = Params::zeros(&model.cfg);
        model.backward_logprobs(&params, &packed.batch, &mut acts, &dlogp, &mut grads).unwrap();
        let got = hf::to_hf_tensors(&hfm.config, &grads);
        let want = hf::SafeTensors::open(&PARITY.path(&format!("expected/{arch}/grads.safetensors"))).unwrap();
        assert_eq!(got.len(), want.tensors().len(), "{arch}: tensor count");
        let mut worst = (0.0f64, String::new());
        for (name, shape, data) in &got {
            // transformers 5 saves NeoX's output layer as `embed_out`; the fixture's gradients call it `lm_head`.
            let key = if name == "embed_out.weight" { "lm_head.weight" } else { name.as_str() };
            let w = want.read_f32(key).unwrap_or_else(|e| panic!("{arch}: {name}: {e}"));
            let (wshape, wdata) = (&w.shape, &w.data);
            assert_eq!(shape, wshape, "{arch}: {name} shape");
            let diff: f64 = data.iter().zip(wdata).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum::<f64>().sqrt();
            let norm: f64 = wdata.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().sqrt();
            let rel = diff / norm.max(1e-30);
            if rel > worst.0 {
                worst = (rel, name.clone());
            }
            assert!(rel < 1e-4, "{arch}: {name}: relative gradient error {rel:.2e}");
        }
        println!(
            "{arch}: loss {loss:.6} (torch {want_loss:.6}), worst relative gradient error {:.2e} on {}",
            worst.0, worst.1
        );
    }
}

/// Load, save, load: the saved directory gives bit-identical log-probs.
#[test]
fn save_and_reload_round_trip() {
    for arch in ARCHS {
        let dir = PARITY.model(arch, "policy");
        let ex = PARITY.examples("prefs.tokenized.jsonl", &dir);
        let before = score(&dir, &ex, Packing::SharedPrompt);
        let (_, _, m) = load(&dir);
        let out = std::env::temp_dir().join(format!("dpo-roundtrip-{arch}-{}", std::process::id()));
        hf::save_model(&out, &m.config, &m.params, Some(&dir)).unwrap();
        let after = score(&out, &ex, Packing::SharedPrompt);
        assert_eq!(before, after, "{arch}");
        std::fs::remove_dir_all(&out).unwrap();
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}
