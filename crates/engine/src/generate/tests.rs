use super::sample::{argmax, candidates};
use super::*;
use crate::config::{RopeConfig, RopeScaling};
use crate::kernels::threads::test_util::assert_close;
use crate::model::Activations;
use crate::presets::{self, init_random};
use crate::rng::Rng;

/// GPT-2: learned positions, LayerNorm, tanh GELU, biases, tied head.
fn gpt2_like() -> DecoderConfig {
    presets::tiny_gpt2()
}

/// Llama/Mistral/Qwen2: GQA, rotary with llama3 scaling, SwiGLU, RMSNorm, qkv bias, untied head,
/// sliding window, and a rotary table shorter than the generated sequences (extended on the fly).
fn llama_like() -> DecoderConfig {
    let scaling =
        RopeScaling::Llama3 { factor: 4.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_positions: 8 };
    DecoderConfig {
        head_dim: 8,
        max_positions: 8,
        positions: PositionKind::Rotary(RopeConfig { scaling, ..RopeConfig::half(500.0, 8) }),
        qkv_bias: true,
        sliding_window: Some(5),
        ..presets::tiny_llama()
    }
}

/// GPT-NeoX: partial rotary with linear scaling, parallel residual, erf GELU, untied head.
fn neox_like() -> DecoderConfig {
    let scaling = RopeScaling::Linear { factor: 2.0 };
    DecoderConfig {
        positions: PositionKind::Rotary(RopeConfig { scaling, ..RopeConfig::half(10000.0, 4) }),
        ..presets::tiny_neox()
    }
}

/// GPT-J: interleaved partial rotary, parallel residual, tied head.
fn gptj_like() -> DecoderConfig {
    presets::tiny_gptj()
}

/// Qwen3 and SmolLM3: per-head q/k RMSNorm, and a layer without rotary.
fn qwen3_smollm3_like() -> DecoderConfig {
    DecoderConfig { qk_norm: true, layers_without_rope: vec![1], ..presets::tiny_llama() }
}

/// GPT-J as checkpoints have it: one norm per layer, no attention biases, a biased untied head.
fn gptj_hf_like() -> DecoderConfig {
    DecoderConfig {
        shared_norm: true,
        head_bias: true,
        qkv_bias: false,
        attn_out_bias: false,
        tied_embeddings: false,
        ..presets::tiny_gptj()
    }
}

fn families() -> Vec<(&'static str, DecoderConfig)> {
    vec![
        ("gpt2", gpt2_like()),
        ("llama", llama_like()),
        ("neox", neox_like()),
        ("gptj", gptj_like()),
        ("qwen3/smollm3", qwen3_smollm3_like()),
        ("gptj (hf)", gptj_hf_like()),
    ]
}

fn setup(cfg: &DecoderConfig, seed: u64) -> (Decoder, Params, Vec<Vec<u32>>) {
    let params = init_random(cfg, 0.4, seed);
    let mut r = Rng::new(seed + 100);
    let prompts = [1usize, 4, 7].iter().map(|&l| (0..l).map(|_| r.below(cfg.vocab_size) as u32).collect()).collect();
    (Decoder::new(cfg.clone()), params, prompts)
}

/// Full-forward logits `[vocab]` of the last position of `seq`.
fn full_logits(m: &Decoder, p: &Params, seq: &[u32]) -> Vec<f32> {
    let mut b = Batch::default();
    b.push_sequence(seq, seq.len());
    let mut acts = Activations::default();
    m.forward(p, &b, &mut acts, false).unwrap();
    let (d, v) = (m.cfg.hidden, m.cfg.vocab_size);
    let mut out = vec![0.0; v];
    k::logits_forward(&mut out, &acts.hidden[(seq.len() - 1) * d..], &p.head().data, d, v);
    if let Some(b) = &p.b_head {
        out.iter_mut().zip(&b.data).for_each(|(l, b)| *l += b);
    }
    out
}

/// Full-forward log-probs of `tokens` after `prompt`.
fn full_logps(m: &Decoder, p: &Params, prompt: &[u32], tokens: &[u32]) -> Vec<f32> {
    let mut b = Batch::default();
    let seq: Vec<u32> = prompt.iter().chain(tokens).copied().collect();
    b.push_sequence(&seq, prompt.len());
    m.logprobs(p, &b, &mut Activations::default(), false).unwrap().logp
}

#[test]
fn greedy_matches_full_forward_argmax_in_every_family() {
    for (name, cfg) in families() {
        let (m, p, prompts) = setup(&cfg, 1);
        let sc = SamplingConfig::greedy(14);
        let gens = generate(&m, &p, &prompts, 1, &sc, &mut Rng::new(0)).unwrap();
        assert_eq!(gens.len(), prompts.len());
        let mut distinct = std::collections::HashSet::new();
        for (g, prompt) in gens.iter().zip(&prompts) {
            assert_eq!(g.tokens.len(), 14, "{name}");
            assert!(!g.finished);
            let mut seq = prompt.clone();
            for (s, &t) in g.tokens.iter().enumerate() {
                let l = full_logits(&m, &p, &seq);
                let best = argmax(&l);
                // Equal, or a near-tie that rounding may order either way.
                assert!(
                    best == t as usize || l[best] - l[t as usize] < 1e-4,
                    "{name}: step {s}: cache path chose {t}, full forward {best} ({} vs {})",
                    l[t as usize],
                    l[best]
                );
                distinct.insert(t);
                seq.push(t);
            }
            let want = full_logps(&m, &p, prompt, &g.tokens);
            for (s, (a, b)) in g.logps.iter().zip(&want).enumerate() {
                assert!((a - b).abs() < 1e-4, "{name}: logp {s}: {a} vs {b}");
            }
        }
        assert!(distinct.len() > 3, "{name}: a degenerate model makes the test weak");
    }
}

#[test]
fn sampled_logps_match_full_forward() {
    for (name, cfg) in families() {
        let (m, p, prompts) = setup(&cfg, 2);
        let sc =
            SamplingConfig { temperature: 0.8, top_k: Some(20), top_p: Some(0.9), max_new_tokens: 12, eos_ids: vec![] };
        let gens = generate(&m, &p, &prompts, 3, &sc, &mut Rng::new(5)).unwrap();
        assert_eq!(gens.len(), 9);
        for (i, g) in gens.iter().enumerate() {
            assert_eq!(g.prompt_index, i / 3);
            let want = full_logps(&m, &p, &prompts[g.prompt_index], &g.tokens);
            assert_eq!(want.len(), g.logps.len());
            for (s, (a, b)) in g.logps.iter().zip(&want).enumerate() {
                assert!((a - b).abs() < 1e-4, "{name}: logp {s}: {a} vs {b}");
            }
        }
    }
}

#[test]
fn reproducible_across_batching_seeds_and_threads() {
    for (name, cfg) in families() {
        let (m, p, prompts) = setup(&cfg, 3);
        let sc = SamplingConfig { temperature: 1.0, top_p: Some(0.95), max_new_tokens: 10, ..Default::default() };
        let run =
            |batch: usize, seed: u64| generate_batched(&m, &p, &prompts, 2, &sc, &mut Rng::new(seed), batch).unwrap();
        let a = run(4, 9);
        assert_eq!(a, run(4, 9), "{name}: same seed");
        assert_eq!(a, run(1, 9), "{name}: one sequence per step");
        assert_eq!(a, run(16, 9), "{name}: all sequences in one step");
        assert_ne!(a, run(4, 10), "{name}: another seed");
        // Sample j of a prompt differs from sample j' (own streams).
        assert_ne!(a[0].tokens, a[1].tokens, "{name}");
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            assert_eq!(a, pool.install(|| run(4, 9)), "{name}: {threads} threads");
        }
    }
}

/// A model whose values are bf16 (a bf16 checkpoint's, widened), held in bf16 as `hf::load_with_bf16_tables`
/// holds it: block linears, embedding and head stored in bf16 (tied or not). It samples the tokens of its
/// f32 copy in every family, greedy and at temperature 1; the log-probs agree to f32 rounding (decode
/// steps give the same bits, `kernels::decode`'s test; a prompt's prefill runs its products a tile of
/// the stored weight at a time, which may sum in another order where the whole product is too small for
/// the blocked kernel).
#[test]
fn a_bf16_model_held_in_bf16_samples_as_its_f32_copy() {
    use crate::quant::{bf16, FrozenEmbedding, FrozenLinears, Matrix, Storage};
    for (name, cfg) in families() {
        let (m, mut p, prompts) = setup(&cfg, 4);
        for t in p.named_mut().into_iter().map(|(_, t)| t) {
            bf16::round_in_place(&mut t.data);
        }
        let mut stored = p.clone();
        let linears = FrozenLinears::take_from(&mut stored, Storage::Bf16).unwrap();
        let (vocab, d) = (cfg.vocab_size, cfg.hidden);
        let table = |t: &mut crate::params::Tensor| Matrix::bf16_from(std::mem::take(&mut t.data), vocab, d).unwrap();
        let own = (!cfg.tied_embeddings).then(|| table(&mut stored.wte));
        let head = match own {
            Some(_) => table(stored.lm_head.as_mut().unwrap()),
            None => table(&mut stored.wte),
        };
        let tables = FrozenEmbedding::whole(head, own).unwrap();
        let held = Model::new(&stored, None).with_frozen(&linears).with_embedding(&tables);
        for temperature in [0.0, 1.0] {
            let sc = SamplingConfig { temperature, top_p: Some(0.95), max_new_tokens: 10, ..Default::default() };
            let run = |model: Model<'_>| generate_batched(&m, model, &prompts, 2, &sc, &mut Rng::new(5), 4).unwrap();
            let (got, want) = (run(held), run(Model::new(&p, None)));
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g.tokens, w.tokens, "{name} at temperature {temperature}");
                let want: Vec<f64> = w.logps.iter().map(|&v| v as f64).collect();
                assert_close(&format!("{name} log-probs"), &g.logps, &want, 1e-5, 1.0);
            }
        }
    }
}

#[test]
fn caller_rng_advances_by_one_draw_per_sequence() {
    let (m, p, prompts) = setup(&gpt2_like(), 4);
    let mut r = Rng::new(1);
    generate(&m, &p, &prompts, 2, &SamplingConfig::greedy(2), &mut r).unwrap();
    let mut want = Rng::new(1);
    (0..6).for_each(|_| {
        want.next_u64();
    });
    assert_eq!(r, want);
}

#[test]
fn top_k_one_is_greedy() {
    for (name, cfg) in families() {
        let (m, p, prompts) = setup(&cfg, 6);
        let greedy = generate(&m, &p, &prompts, 1, &SamplingConfig::greedy(8), &mut Rng::new(0)).unwrap();
        let k1 = SamplingConfig { temperature: 1.5, top_k: Some(1), max_new_tokens: 8, ..Default::default() };
        let sampled = generate(&m, &p, &prompts, 1, &k1, &mut Rng::new(77)).unwrap();
        assert_eq!(greedy, sampled, "{name}");
    }
}

fn kept(logits: &[f32], cfg: &SamplingConfig) -> Vec<u32> {
    candidates(logits, cfg).into_iter().map(|c| c.0).collect()
}

#[test]
fn top_p_and_top_k_semantics() {
    let probs = [0.05f32, 0.5, 0.15, 0.3];
    let l: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
    let cfg = |k: Option<usize>, p: Option<f32>| SamplingConfig { top_k: k, top_p: p, ..Default::default() };
    assert_eq!(kept(&l, &cfg(None, Some(0.4))), vec![1]);
    assert_eq!(kept(&l, &cfg(None, Some(0.7))), vec![1, 3]);
    assert_eq!(kept(&l, &cfg(None, Some(0.85))), vec![1, 3, 2]);
    assert_eq!(kept(&l, &cfg(None, Some(0.97))), vec![1, 3, 2, 0]);
    assert_eq!(kept(&l, &cfg(None, Some(0.0))), vec![1], "at least one token");
    assert_eq!(kept(&l, &cfg(None, Some(1.0))), vec![0, 1, 2, 3], "p = 1 keeps all");
    assert_eq!(kept(&l, &cfg(None, None)), vec![0, 1, 2, 3]);
    assert_eq!(kept(&l, &cfg(Some(2), None)), vec![1, 3]);
    assert_eq!(kept(&l, &cfg(Some(0), None)), vec![0, 1, 2, 3], "k = 0 is no limit");
    // top-p acts on the top-k-renormalised distribution: 0.625, 0.375.
    assert_eq!(kept(&l, &cfg(Some(2), Some(0.6))), vec![1]);
    assert_eq!(kept(&l, &cfg(Some(2), Some(0.7))), vec![1, 3]);
    // Ties with the k-th logit are kept (HF: remove only `score < kth`).
    assert_eq!(kept(&[1.0, 3.0, 3.0, 0.0], &cfg(Some(1), None)), vec![1, 2]);
    // Temperature flattens before top-p: at T = 100 the four are near-uniform, 0.7 needs three.
    let hot = SamplingConfig { temperature: 100.0, top_p: Some(0.7), ..Default::default() };
    assert_eq!(kept(&l, &hot).len(), 3);

    // Frequencies: with p = 0.7, token 1 with 0.5/0.8, token 3 with 0.3/0.8, nothing else.
    let mut r = Rng::new(42);
    let c = cfg(None, Some(0.7));
    let draws = 20000;
    let mut counts = [0usize; 4];
    for _ in 0..draws {
        let (t, lp) = sample_token(&l, &c, &mut r);
        counts[t as usize] += 1;
        assert!((lp - probs[t as usize].ln()).abs() < 1e-5, "unfiltered log-prob");
    }
    assert_eq!(counts[0] + counts[2], 0);
    assert!((counts[1] as f64 / draws as f64 - 0.625).abs() < 0.015, "{counts:?}");
    // Without filters, all four at their probabilities.
    let mut counts = [0usize; 4];
    for _ in 0..draws {
        counts[sample_token(&l, &cfg(None, None), &mut r).0 as usize] += 1;
    }
    for (c, p) in counts.iter().zip(probs) {
        assert!((*c as f64 / draws as f64 - p as f64).abs() < 0.015, "{counts:?}");
    }
}

#[test]
fn top_p_on_a_large_vocabulary_matches_a_full_sort() {
    let mut r = Rng::new(8);
    for (scale, p) in [(4.0, 0.9f32), (0.1, 0.99), (0.5, 0.5), (3.0, 0.999)] {
        let l: Vec<f32> = (0..5000).map(|_| r.normal() as f32 * scale).collect();
        let got = kept(&l, &SamplingConfig { top_p: Some(p), ..Default::default() });
        let mut order: Vec<usize> = (0..l.len()).collect();
        order.sort_by(|&a, &b| l[b].total_cmp(&l[a]));
        let m = l[order[0]] as f64;
        let w: Vec<f64> = order.iter().map(|&i| (l[i] as f64 - m).exp()).collect();
        let total: f64 = w.iter().sum();
        let mut acc = 0.0;
        let mut n = 0;
        while n < w.len() && (n == 0 || acc < p as f64 * total) {
            acc += w[n];
            n += 1;
        }
        assert_eq!(got.len(), n, "scale {scale}, p {p}");
        assert_eq!(got, order[..n].iter().map(|&i| i as u32).collect::<Vec<_>>());
    }
}

#[test]
fn stops_at_eos() {
    let (m, p, prompts) = setup(&llama_like(), 7);
    let free = generate(&m, &p, &prompts, 1, &SamplingConfig::greedy(12), &mut Rng::new(0)).unwrap();
    let eos = free[1].tokens[4];
    let sc = SamplingConfig { eos_ids: vec![1000, eos], ..SamplingConfig::greedy(12) };
    let stopped = generate(&m, &p, &prompts, 1, &sc, &mut Rng::new(0)).unwrap();
    for (f, s) in free.iter().zip(&stopped) {
        match f.tokens.iter().position(|&t| t == eos) {
            Some(i) => {
                assert_eq!(s.tokens, f.tokens[..=i], "EOS included, nothing after");
                assert_eq!(s.logps, f.logps[..=i]);
                assert!(s.finished);
            }
            None => {
                assert_eq!(s, f);
                assert!(!s.finished);
            }
        }
    }
    assert!(stopped[1].tokens.len() <= 5 && stopped[1].finished);
}

#[test]
fn refuses_what_it_cannot_run() {
    let cfg = gpt2_like(); // 32 learned positions
    let (m, p, _) = setup(&cfg, 9);
    let prompt = vec![vec![1u32; 20]];
    // 20 + 13 - 1 = 32 positions fit; one more does not.
    assert!(generate(&m, &p, &prompt, 1, &SamplingConfig::greedy(13), &mut Rng::new(0)).is_ok());
    assert_eq!(
        generate(&m, &p, &prompt, 1, &SamplingConfig::greedy(14), &mut Rng::new(0)),
        Err(EngineError::PositionOutOfRange { position: 32, max: 32 })
    );
    let bad = vec![vec![1u32, 61]];
    assert!(matches!(
        generate(&m, &p, &bad, 1, &SamplingConfig::greedy(2), &mut Rng::new(0)),
        Err(EngineError::TokenOutOfRange { token: 61, .. })
    ));
    assert!(matches!(
        generate(&m, &p, &[vec![]], 1, &SamplingConfig::greedy(2), &mut Rng::new(0)),
        Err(EngineError::MalformedBatch(_))
    ));
    let none = generate(&m, &p, &prompt, 2, &SamplingConfig::greedy(0), &mut Rng::new(0)).unwrap();
    assert_eq!(none.len(), 2);
    assert!(none.iter().all(|g| g.tokens.is_empty() && !g.finished));
    assert!(generate(&m, &p, &prompt, 0, &SamplingConfig::greedy(3), &mut Rng::new(0)).unwrap().is_empty());
}

/// Decode throughput on the SmolLM2-135M shape with random weights:
/// `cargo test --release -p dpo-engine generate::tests::decode_throughput -- --ignored --nocapture`
#[test]
#[ignore]
fn decode_throughput() {
    let cfg = crate::presets::smollm2_135m();
    let params = init_random(&cfg, 0.02, 0);
    let m = Decoder::new(cfg.clone());
    let mut r = Rng::new(1);
    let prompts: Vec<Vec<u32>> = (0..8).map(|_| (0..32).map(|_| r.below(cfg.vocab_size) as u32).collect()).collect();
    let new = 32;
    let sc = SamplingConfig { max_new_tokens: new, ..Default::default() };
    let t = std::time::Instant::now();
    let mut g = Generator::new(&m, &params);
    let mut caches: Vec<KvCache> = prompts.iter().map(|p| g.prefill(p, p.len() + new).unwrap().0).collect();
    let prefill = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let mut tokens = vec![1u32; 8];
    let mut sampling = 0.0;
    for _ in 0..new {
        let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
        let logits = g.decode(&mut refs, &tokens).unwrap();
        let ts = std::time::Instant::now();
        for (tok, l) in tokens.iter_mut().zip(logits.chunks(cfg.vocab_size)) {
            *tok = sample_token(l, &sc, &mut r).0;
        }
        sampling += ts.elapsed().as_secs_f64();
    }
    let decode = t.elapsed().as_secs_f64();
    println!("sampling (one thread) {:.1} ms/step", 1000.0 * sampling / new as f64);
    println!(
        "smollm2-135m, 8 sequences, {} threads: prefill 8x32 tokens {:.2} s ({:.0} tok/s); decode {} steps {:.2} s = {:.1} tok/s ({:.1} ms/step)",
        k::num_threads(),
        prefill,
        256.0 / prefill,
        new,
        decode,
        (8 * new) as f64 / decode,
        1000.0 * decode / new as f64
    );
}
