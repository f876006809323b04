//! Frozen weights stored in bf16 where a bf16 run loses nothing by it: every block linear's product
//! rounds its weight to bf16 anyway, so a reference model (or a LoRA base) whose block linears are stored
//! in bf16 scores bit for bit as the f32 weights do in a bf16 pass, in half their memory; so does one
//! whose embedding keeps the data's rows alone and whose head is in bf16. On every fixture family.

mod common;

use dpo::data::Packing;
use dpo::scoring::{score_pairs, PairScore};
use dpo::train::reference::{freeze_tables, pair_tokens, ReferenceModel};
use engine::kernels::Precision;
use engine::model::Model;
use engine::quant::{FrozenLinears, Storage};
use engine::Decoder;

use common::{Fixtures, MORE, PARITY};

const FAMILIES: [(Fixtures, &str); 9] = [
    (PARITY, "gpt2"),
    (PARITY, "llama"),
    (PARITY, "llama3"),
    (PARITY, "neox"),
    (MORE, "phi3"),
    (MORE, "qwen3"),
    (MORE, "smollm3"),
    (MORE, "gptj"),
    (MORE, "gemma3"),
];

fn bits(scores: &[PairScore]) -> Vec<(u64, u64)> {
    scores.iter().map(|s| (s.chosen_logps.to_bits(), s.rejected_logps.to_bits())).collect()
}

#[test]
fn a_bf16_stored_reference_scores_bit_for_bit_as_its_f32_weights_in_bf16() {
    for (fx, arch) in FAMILIES {
        let dir = fx.model(arch, "ref");
        let examples = fx.examples("prefs.tokenized.jsonl", &dir);
        let m = hf::load_model(&dir).unwrap();
        let decoder = Decoder::new(m.config.decoder.clone());
        let score = |model: Model| score_pairs(&decoder, model, &examples, Packing::SharedPrompt, 5, |_| {}).unwrap();
        let f32_weights = score(Model::new(&m.params, None).with_precision(Precision::Bf16));

        let held =
            ReferenceModel::new(Decoder::new(m.config.decoder.clone()), m.params.clone(), Precision::Bf16).unwrap();
        let linears = held.linears.as_ref().expect("a bf16 reference stores its block linears");
        let f32_bytes = FrozenLinears::estimate_bytes(&m.config.decoder, Storage::F32);
        assert_eq!(2 * linears.bytes(), f32_bytes, "{arch}: the stored linears are not half the f32 ones");
        assert!(bits(&score(held.view(Precision::Bf16))) == bits(&f32_weights), "{arch}: the stored reference differs");

        // A LoRA base read into bf16 storage (`--base-dtype bf16`, a bf16 run's default) likewise.
        let (base, frozen) = hf::load_model_stored(&dir, Storage::Bf16).unwrap();
        let stored_base = dpo::train::setup::base_model(&base, Some(&frozen), None, Precision::Bf16);
        assert!(bits(&score(stored_base)) == bits(&f32_weights), "{arch}: the stored base differs");

        // A bf16 LoRA base (`dpo train`, and `dpo logps`/`eval`/`reward --adapter`) also keeps its embedding
        // for the data's tokens and its head in bf16: still the f32 weights' log-probs, bit for bit.
        // Made as the checkpoint is read (`hf::load_frozen_base`), or from the f32 tables once loaded.
        let tokens = pair_tokens(examples.iter());
        let (tabled, frozen, tables) = hf::load_frozen_base(&dir, Storage::Bf16, &tokens).unwrap();
        assert!(tabled.params.wte.data.is_empty() && tabled.params.lm_head.as_ref().is_none_or(|h| h.data.is_empty()));
        let view = dpo::train::setup::base_model(&tabled, Some(&frozen), None, Precision::Bf16).with_embedding(&tables);
        assert!(bits(&score(view)) == bits(&f32_weights), "{arch}: the base with frozen tables differs");
        let mut whole = m.clone();
        let after = freeze_tables(&mut whole.params, &m.config.decoder, &tokens).unwrap();
        assert!(after.head().to_f32() == tables.head().to_f32(), "{arch}: the heads differ");
        assert!(tokens.iter().all(|&t| after.row(t) == tables.row(t)), "{arch}: the lookups differ");
        // With its block linears in f32 (`--base-dtype f32`): the same tables, made as read, and the rest
        // of the model as `load_model` reads it.
        let (f32_linears, f32_tables) = hf::load_with_frozen_tables(&dir, &tokens).unwrap();
        assert!(f32_tables.head().to_f32() == tables.head().to_f32(), "{arch}: the heads differ (f32 linears)");
        assert!(tokens.iter().all(|&t| f32_tables.row(t) == tables.row(t)), "{arch}: the lookups differ (f32 linears)");
        for ((name, want), (_, got)) in whole.params.named().iter().zip(f32_linears.params.named()) {
            assert!(want.data == got.data, "{arch}: `{name}` differs from the f32 model's");
        }
        let view = dpo::train::setup::base_model(&f32_linears, None, None, Precision::Bf16).with_embedding(&f32_tables);
        assert!(bits(&score(view)) == bits(&f32_weights), "{arch}: the f32 base with frozen tables differs");

        // An f32 run keeps the f32 copy: nothing is stored.
        let f32_held =
            ReferenceModel::new(Decoder::new(m.config.decoder.clone()), m.params.clone(), Precision::F32).unwrap();
        assert!(f32_held.linears.is_none());
    }
}
