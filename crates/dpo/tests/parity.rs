//! The engine against what PyTorch/transformers computed on the parity fixtures
//! (`tests/fixtures/parity`, see its README for the tolerances held here).

use std::path::{Path, PathBuf};

use dpo::data::{load_pairs, pack::sum_ranges, pack_pairs, DataOptions, Example, Packing};
use dpo::scoring::{score_pairs, PairScore};
use engine::{Activations, Decoder, Params};

const ARCHS: [&str; 4] = ["gpt2", "llama", "llama3", "neox"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parity")
}

struct Expected {
    policy_chosen: f64,
    policy_rejected: f64,
    ref_chosen: f64,
    ref_rejected: f64,
    chosen_len: usize,
    rejected_len: usize,
}

fn expected_logps(arch: &str) -> Vec<Expected> {
    let text = std::fs::read_to_string(fixtures().join(format!("expected/{arch}/logps.jsonl"))).unwrap();
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let f = |k: &str| v[k].as_f64().unwrap();
            Expected {
                policy_chosen: f("policy_chosen_logps"),
                policy_rejected: f("policy_rejected_logps"),
                ref_chosen: f("ref_chosen_logps"),
                ref_rejected: f("ref_rejected_logps"),
                chosen_len: v["chosen_len"].as_u64().unwrap() as usize,
                rejected_len: v["rejected_len"].as_u64().unwrap() as usize,
            }
        })
        .collect()
}

fn load(dir: &Path) -> (Decoder, Params, hf::HfModel) {
    let m = hf::load_model(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    (Decoder::new(m.config.decoder.clone()), m.params.clone(), m)
}

fn examples(file: &str, model_dir: &Path) -> Vec<Example> {
    let tok = hf::load_tokenizer(model_dir).unwrap();
    let loaded = load_pairs(&fixtures().join("data").join(file), Some(&tok), &DataOptions::default()).unwrap();
    assert_eq!(loaded.stats.prompt_not_prefix, 0);
    loaded.examples
}

fn score(dir: &Path, ex: &[Example], packing: Packing) -> Vec<PairScore> {
    let (model, params, _) = load(dir);
    score_pairs(&model, &params, ex, packing, 5, |_| {}).unwrap()
}

/// Largest absolute difference between the engine's and transformers' sequence log-probs.
fn max_logp_error(got: &[PairScore], want: &[Expected], policy: bool) -> f64 {
    assert_eq!(got.len(), want.len());
    let mut worst = 0.0f64;
    for (g, w) in got.iter().zip(want) {
        let (c, r) = if policy { (w.policy_chosen, w.policy_rejected) } else { (w.ref_chosen, w.ref_rejected) };
        assert_eq!((g.chosen_len, g.rejected_len), (w.chosen_len, w.rejected_len));
        worst = worst.max((g.chosen_logps - c).abs()).max((g.rejected_logps - r).abs());
    }
    worst
}

#[test]
fn logps_match_transformers_from_tokenized_and_text_rows() {
    for arch in ARCHS {
        let want = expected_logps(arch);
        for (variant, policy) in [("policy", true), ("ref", false), ("policy-legacy", true)] {
            let dir = fixtures().join(format!("models/{arch}-{variant}"));
            for file in ["prefs.tokenized.jsonl", "prefs.jsonl"] {
                let ex = examples(file, &dir);
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
        let dir = fixtures().join(format!("models/{arch}-policy"));
        let (model, params, hfm) = load(&dir);
        let ex = examples("prefs.tokenized.jsonl", &dir)[..8].to_vec();
        let refs = score(&fixtures().join(format!("models/{arch}-ref")), &ex, Packing::SharedPrompt);

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
        let want_loss = read_json(&fixtures().join(format!("expected/{arch}/grads.json")))["loss"].as_f64().unwrap();
        assert!((loss - want_loss).abs() < 1e-4 * want_loss.abs(), "{arch}: loss {loss} vs {want_loss}");

        let mut grads = Params::zeros(&model.cfg);
        model.backward_logprobs(&params, &packed.batch, &mut acts, &dlogp, &mut grads).unwrap();
        let got = hf::to_hf_tensors(&hfm.config, &grads);
        let want = hf::SafeTensors::open(&fixtures().join(format!("expected/{arch}/grads.safetensors"))).unwrap();
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
        let dir = fixtures().join(format!("models/{arch}-policy"));
        let ex = examples("prefs.tokenized.jsonl", &dir);
        let before = score(&dir, &ex, Packing::SharedPrompt);
        let (_, _, m) = load(&dir);
        let out = std::env::temp_dir().join(format!("dpo-roundtrip-{arch}-{}", std::process::id()));
        hf::save_model(&out, &m.config, &m.params, Some(&dir)).unwrap();
        let after = score(&out, &ex, Packing::SharedPrompt);
        assert_eq!(before, after, "{arch}");
        std::fs::remove_dir_all(&out).unwrap();
    }
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}
