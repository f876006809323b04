//! Tests of `memory.rs`: the estimate's terms against the sizes they stand for.

use engine::{MlpKind, NormKind};

use super::*;

/// An f32 run of `c` with a frozen reference copy, rows of 10, 30 and 20 tokens, one row a batch, nothing
/// else: each test changes what it is about.
fn plan_of<'a>(c: &'a DecoderConfig, o: &'a OptimizerConfig) -> MemoryPlan<'a> {
    MemoryPlan {
        policy: c,
        optimizer: o,
        reference: Some(c),
        reference_lookups: None,
        reference_on_policy_buffers: false,
        row_tokens: vec![10, 30, 20],
        batch_size: 1,
        gradient_checkpointing: false,
        adapter: None,
        precision: Precision::F32,
        hands_back: false,
    }
}

fn cfg(mlp: MlpKind, norm: NormKind, positions: PositionKind, tied: bool) -> DecoderConfig {
    DecoderConfig {
        norm,
        mlp,
        positions,
        attn_out_bias: false,
        tied_embeddings: tied,
        ..DecoderConfig::gpt2(engine::Dims {
            vocab_size: 50,
            hidden: 16,
            n_layers: 3,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 4,
            ffn_hidden: 24,
            max_positions: 32,
        })
    }
}

#[test]
fn sizes_parse_and_print() {
    assert_eq!(parse_size("512MiB"), Ok(512 << 20));
    assert_eq!(parse_size("8G"), Ok(8 << 30));
    assert_eq!(parse_size("1.5 gb"), Ok(3 << 29));
    assert_eq!(parse_size("4096"), Ok(4096));
    assert!(parse_size("lots").unwrap_err().contains("not a size"));
    assert!(parse_size("3 parsecs").unwrap_err().contains("unknown unit"));
    assert_eq!(human(3 << 29), "1.5 GiB");
    assert_eq!(human(100), "100 B");
}

#[test]
fn estimate_scales_with_the_batch() {
    let c = cfg(MlpKind::GeluTanh, NormKind::LayerNorm { eps: 1e-5 }, PositionKind::Learned, true);
    let o = OptimizerConfig::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
    let plan = |batch_size| MemoryPlan { batch_size, ..plan_of(&c, &o) };
    let (one, two) = (estimate(&plan(1)), estimate(&plan(2)));
    assert_eq!((one.batch_tokens, two.batch_tokens, two.batch_rows), (30, 50, 2));
    assert_eq!(two.activations * 30, one.activations * 50);
    // Trained copy, gradient, two AdamW moments and the f32 reference.
    assert_eq!(one.weights, 4 * 5 * c.param_count());
}

/// A LoRA run holds the base once and the adapter four times (AdamW): a model refused for full
/// training fits with an adapter.
#[test]
fn an_adapter_run_holds_the_base_once() {
    let c = cfg(MlpKind::GeluTanh, NormKind::LayerNorm { eps: 1e-5 }, PositionKind::Learned, true);
    let o = OptimizerConfig::adamw();
    let adapter = AdapterPlan { params: 1000, kept_per_token: 16, ..AdapterPlan::default() };
    let plan = |adapter| MemoryPlan { adapter, batch_size: 1, ..plan_of(&c, &o) };
    let (full, lora) = (estimate(&plan(None)), estimate(&plan(Some(adapter))));
    let p = c.param_count();
    assert_eq!(lora.weights, 4 * (p + 4 * 1000));
    assert_eq!(lora.activations, full.activations + 4 * 30 * 16);
    assert_eq!(lora.checkpoint, 4 * 1000 * 2);
    // The full run: the trained copy, its gradient, two moments and the reference, five copies of the
    // model where the LoRA run holds one (and its adapter four times).
    assert_eq!(full.weights, 4 * 5 * p);
    assert!(lora.total() < full.total() - 3 * 4 * p);
    let from_adapter = estimate(&plan(Some(AdapterPlan { frozen_copy: true, merge: Some(4 * p / 3), ..adapter })));
    assert_eq!(from_adapter.weights, 4 * (p + 5 * 1000));
    assert_eq!(from_adapter.checkpoint, 4 * 1000 * 2);
    assert_eq!(from_adapter.merge, 4 * p / 3 + 4 * 1000 + BASE_BYTES);
    assert_eq!(from_adapter.total(), from_adapter.merge.max(from_adapter.step()));
    let quantized = estimate(&plan(Some(AdapterPlan { base_bytes: Some(p), ..adapter })));
    assert_eq!(quantized.weights, p + 4 * 4 * 1000);
}

/// The base a bf16 LoRA run holds (block linears in bf16, the embedding's rows of the data's tokens,
/// the head in bf16, the rest in f32) is the size [`frozen_model_bytes`] says, tied head or not.
#[test]
fn a_frozen_base_is_the_size_estimated() {
    for tied in [true, false] {
        let c = cfg(MlpKind::SwiGlu, NormKind::RmsNorm { eps: 1e-5 }, PositionKind::Learned, tied);
        let mut params = engine::presets::init_random(&c, 0.02, 1);
        let linears = FrozenLinears::take_from(&mut params, Storage::Bf16).unwrap();
        let tokens = std::collections::BTreeSet::from([0, 3, 7, 8]);
        let tables = crate::train::reference::freeze_tables(&mut params, &c, &tokens).unwrap();
        let held = linears.bytes() + tables.bytes() + 4 * engine::ParamSet::numel(&params);
        assert_eq!(held as u64, frozen_model_bytes(&c, Storage::Bf16, Some(4)), "tied {tied}");
        let whole = stored_model_bytes(&c, Storage::Bf16);
        assert!(
            frozen_model_bytes(&c, Storage::Bf16, Some(4)) < whole
                && frozen_model_bytes(&c, Storage::Bf16, None) == whole
        );
    }
}

/// Loading a stored base holds what reading holds on the way beside what is already stored: the
/// estimate is the larger of that and the step. A converted tensor held whole (a GPT-2-like layout of a
/// large vocabulary) with short rows makes loading the peak.
#[test]
fn loading_a_stored_base_is_counted_where_it_is_the_peak() {
    let c = DecoderConfig {
        vocab_size: 2_000_000,
        ..cfg(MlpKind::SwiGlu, NormKind::RmsNorm { eps: 1e-5 }, PositionKind::Learned, false)
    };
    let (v, d) = (c.vocab_size as u64, c.hidden as u64);
    let frozen = frozen_model_bytes(&c, Storage::Bf16, Some(4));
    let transient = 8 * v * d;
    assert_eq!(load_bytes(&c, Storage::Bf16, Some(4), transient), frozen + transient);

    let o = OptimizerConfig::adamw();
    let adapter = |load_bytes| AdapterPlan {
        params: 1000,
        kept_per_token: 8,
        base_bytes: Some(frozen),
        load_bytes,
        ..AdapterPlan::default()
    };
    let plan = |load| MemoryPlan { adapter: Some(adapter(load)), batch_size: 1, ..plan_of(&c, &o) };
    let step = estimate(&plan(None));
    assert_eq!(step.load, 0);
    // Read a block at a time, loading is below the step.
    let streamed = estimate(&plan(Some(load_bytes(&c, Storage::Bf16, Some(4), 12 << 20))));
    assert_eq!(streamed.total(), step.total());
    let loading = estimate(&plan(Some(load_bytes(&c, Storage::Bf16, Some(4), transient))));
    assert_eq!(loading.load, frozen + transient + BASE_BYTES);
    assert!(loading.load > step.total(), "the test's shape should make loading the peak: {step:?} {loading:?}");
    assert_eq!(loading.total(), loading.load);
    assert!(loading.summary().contains("loading the base"), "{}", loading.summary());
}

#[test]
fn gradient_checkpointing_counts_layer_inputs_only() {
    let c = cfg(MlpKind::SwiGlu, NormKind::RmsNorm { eps: 1e-5 }, PositionKind::Learned, false);
    let o = OptimizerConfig::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
    let plan = |gradient_checkpointing| MemoryPlan { gradient_checkpointing, batch_size: 2, ..plan_of(&c, &o) };
    let (kept, checkpointed) = (estimate(&plan(false)), estimate(&plan(true)));
    let reference = Activations::bytes_per_token(&c, Keep::None, Precision::F32);
    let want = 50 * (Activations::bytes_per_token(&c, Keep::LayerInputs, Precision::F32) + reference);
    assert_eq!(checkpointed.activations, want);
    assert!(checkpointed.activations < kept.activations);
    assert_eq!(checkpointed.weights, kept.weights);
}

/// A bf16 run holds the reference's block linears in bf16 (the weights shrink by two bytes for each of
/// their values) and keeps the policy's products in bf16 (the activations shrink as the engine says).
#[test]
fn a_bf16_run_counts_the_reference_linears_at_two_bytes() {
    let c = cfg(MlpKind::SwiGlu, NormKind::RmsNorm { eps: 1e-5 }, PositionKind::Learned, false);
    let o = OptimizerConfig::adamw();
    let plan = |precision| MemoryPlan { precision, batch_size: 2, ..plan_of(&c, &o) };
    let (f32_run, bf16_run) = (estimate(&plan(Precision::F32)), estimate(&plan(Precision::Bf16)));
    let linears = FrozenLinears::estimate_bytes(&c, Storage::F32) as u64 / 4;
    assert!(linears > 0);
    assert_eq!(f32_run.weights - bf16_run.weights, 2 * linears);
    assert_eq!(stored_model_bytes(&c, Storage::F32), 4 * c.param_count());
    let per_token =
        |p| Activations::bytes_per_token(&c, Keep::All, p) + Activations::bytes_per_token(&c, Keep::None, p);
    assert_eq!(bf16_run.activations, 50 * per_token(Precision::Bf16));
    assert_eq!(f32_run.activations, 50 * per_token(Precision::F32));
    // An f32 pass recomputes its attention outputs and keeps one layer's: on 3 layers it holds less than
    // a bf16 pass, which keeps them (in bf16); on the depth of real models, more.
    assert!(bf16_run.activations > f32_run.activations);
    let deep = DecoderConfig { n_layers: 12, ..c.clone() };
    let deep_plan = |precision| MemoryPlan { precision, batch_size: 2, ..plan_of(&deep, &o) };
    assert!(estimate(&deep_plan(Precision::Bf16)).activations < estimate(&deep_plan(Precision::F32)).activations);
    // A pair objective's reference forward runs on the policy's buffers: its slot adds nothing.
    let shared = estimate(&MemoryPlan { reference_on_policy_buffers: true, ..plan(Precision::Bf16) });
    assert_eq!(shared.activations, 50 * Activations::bytes_per_token(&c, Keep::All, Precision::Bf16));
    let no_reference = estimate(&MemoryPlan { reference: None, ..plan(Precision::Bf16) });
    // The trained copy, its gradient and two moments (the loaded weights are freed once copied).
    assert_eq!(no_reference.weights, 4 * 4 * c.param_count());
}
/// A bf16 reference that keeps its data's lookups alone holds a bf16 head and those rows instead of
/// its f32 tables; handing pages back makes the estimate the larger of backward's start and its last
/// layer, never more than holding both whole.
#[test]
fn kept_lookups_and_pages_handed_back_lower_the_estimate() {
    for c in [engine::presets::gpt2_small(), engine::presets::llama3_8b()] {
        let tied = c.tied_embeddings;
        let o = OptimizerConfig::adamw();
        let plan = |reference_lookups, hands_back| MemoryPlan {
            reference_lookups,
            reference_on_policy_buffers: true,
            row_tokens: vec![400; 4],
            batch_size: 4,
            precision: Precision::Bf16,
            hands_back,
            ..plan_of(&c, &o)
        };
        let whole = estimate(&plan(None, false));
        let kept = estimate(&plan(Some(7), false));
        let (v, d) = (c.vocab_size as u64, c.hidden as u64);
        let tables = 4 * v * d * if tied { 1 } else { 2 };
        assert_eq!(whole.weights - kept.weights, tables - (2 * v * d + 4 * 7 * d + 4 * v), "tied {tied}");
        let back = estimate(&plan(None, true));
        assert!(back.overlap > 0 && back.total() < whole.total(), "tied {tied}");
        // At least every weight but the gradient, plus the larger of the gradient and the activations.
        let grads = 4 * c.param_count();
        assert!(back.total() >= whole.total() - grads.min(whole.activations), "tied {tied}");
    }
}
