//! A frozen base read a block of the file at a time (`load_model_stored`, `load_frozen_base`,
//! `load_with_frozen_tables`) holds what reading the whole model and then storing it holds, and a merged
//! model written a block at a time (`save_merged`) is the merge of the whole base: tensors of several
//! 4 MiB blocks, rows that do not divide a block, stacked q/k/v and gate/up parts, tied and untied tables.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::{more, parity, TempDir};
use dpo_hf::peft::{fresh_config, merged_params, resolve_targets, save_merged, MergeBase};
use dpo_hf::safetensors::WriteDtype;
use dpo_hf::{config_from_json, load_frozen_base, load_model, load_model_stored, load_transient_bytes};
use dpo_hf::{load_with_frozen_tables, parse_config, save_model};
use engine::quant::{FrozenEmbedding, FrozenLinears, Storage};

/// The LoRA fixture's Llama with rows of 48 values (192 bytes: a 4 MiB block holds 21845.3 of them), a
/// 30000-token vocabulary (5.5 MiB tables) and gate/up of `ffn` rows each (12000: 2.2 MiB a part, 4.4 MiB
/// stacked), random weights written in f32.
fn large_llama(dir: &Path, tied: bool, ffn: usize) {
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(more("lora/llama/base/config.json")).unwrap()).unwrap();
    cfg["hidden_size"] = 48.into();
    cfg["head_dim"] = 12.into();
    cfg["vocab_size"] = 30000.into();
    cfg["intermediate_size"] = ffn.into();
    cfg["tie_word_embeddings"] = tied.into();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let config = config_from_json(cfg, &dir.join("config.json")).unwrap();
    let mut params = engine::Params::zeros(&config.decoder);
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    for (_, t) in params.named_mut() {
        for x in t.data.iter_mut() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *x = ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.3;
        }
    }
    dpo_hf::safetensors::write_f32(&dir.join("model.safetensors"), &dpo_hf::to_hf_tensors(&config, &params)).unwrap();
}

#[test]
fn a_base_read_a_block_at_a_time_is_the_base_read_whole_then_stored() {
    let tmp = TempDir::new("stored-blocks");
    let tokens = BTreeSet::from([0, 1, 21845, 21846, 29999, 40000]);
    for tied in [false, true] {
        let dir = tmp.path().join(format!("tied-{tied}"));
        large_llama(&dir, tied, 12000);
        let whole = load_model(&dir).unwrap();
        let (v, d) = (whole.config.decoder.vocab_size, whole.config.decoder.hidden);
        let head = whole.params.lm_head.as_ref().unwrap_or(&whole.params.wte).data.clone();
        let tables = FrozenEmbedding::new(whole.params.wte.data.clone(), Some(head), v, d, &tokens).unwrap();
        let same_tables = |got: &FrozenEmbedding| {
            assert_eq!(got.head().to_f32(), tables.head().to_f32(), "tied {tied}: the bf16 head");
            assert_eq!(got.kept(), 5, "tied {tied}");
            for t in &tokens {
                assert_eq!(got.row(*t), tables.row(*t), "tied {tied}: token {t}");
            }
        };
        let storages = [Storage::F32, Storage::Bf16, Storage::Nf4 { double_quant: false }];
        for storage in storages.into_iter().chain([Storage::Nf4 { double_quant: true }]) {
            let mut want = whole.params.clone();
            let linears = FrozenLinears::take_from(&mut want, storage).unwrap();
            let (model, got) = load_model_stored(&dir, storage).unwrap();
            assert!(got == linears, "tied {tied}, {storage:?}: the stored linears differ");
            assert!(model.params == want, "tied {tied}, {storage:?}: the other tensors differ");
            let (model, got, frozen) = load_frozen_base(&dir, storage, &tokens).unwrap();
            assert!(got == linears, "tied {tied}, {storage:?}: the stored linears differ beside frozen tables");
            assert!(
                model.params.wte.data.is_empty() && model.params.lm_head.as_ref().is_none_or(|h| h.data.is_empty())
            );
            same_tables(&frozen);
        }
        let (model, frozen) = load_with_frozen_tables(&dir, &tokens).unwrap();
        same_tables(&frozen);
        assert!(model.params.layers == whole.params.layers, "tied {tied}: f32 linears");
    }
}

/// What reading holds beyond what it keeps: one block of the file and its f32 values for a layout read
/// as stored (Llama), a converted tensor and its file copy where that is more (GPT-2's transposed
/// `c_fc` of a 768-wide model: 768 x 3072 values, 8 bytes each).
#[test]
fn a_merged_model_written_a_block_at_a_time_is_the_merge_of_the_whole_base() {
    let tmp = TempDir::new("stored-merge");
    let dir = tmp.path().join("base");
    // gate/up/down of 30000 rows (or columns): 5.5 MiB a part, two blocks of the file, a block's last row
    // (21845) inside them; two pieces of a million values from memory.
    large_llama(&dir, false, 30000);
    let base = load_model(&dir).unwrap();
    let targets = ["all-linear".to_string()];
    let cfg = fresh_config(4, 8.0, 0.0, false, &targets, &base.config).unwrap();
    let mut adapter = engine::Adapter::zeros(&base.config.decoder, &resolve_targets(&cfg, &base.config).unwrap(), 0.0);
    let mut rng = engine::rng::Rng::new(5);
    adapter.init_peft(&mut rng);
    for p in adapter.layers.iter_mut().flat_map(|l| l.pairs.iter_mut()) {
        p.b.data.iter_mut().for_each(|v| *v = (rng.uniform() as f32 - 0.5) * 0.2);
    }
    let merged = merged_params(&base.params, &adapter, &base.config).unwrap();
    let whole = tmp.path().join("whole");
    save_model(&whole, &base.config, &merged, Some(&dir)).unwrap();
    let weights = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    for (name, from) in [("loaded", MergeBase::Loaded(&base)), ("dir", MergeBase::Dir(&dir))] {
        let out = tmp.path().join(name);
        save_merged(&out, from, &adapter, WriteDtype::F32).unwrap();
        assert!(weights(&out) == weights(&whole), "{name}: not the bytes of the whole merge");
    }
}

/// A checkpoint stored in bf16 (written by `save_merged` in bf16 with an adapter that changes nothing),
/// read for sampling with its tables whole in bf16, holds every value the f32 reading of it holds: the
/// tables' rows and head as stored (tied or not), the linears too. An f32
/// checkpoint is refused, naming what it holds.
#[test]
fn a_bf16_checkpoint_read_with_bf16_tables_holds_its_values() {
    let tmp = TempDir::new("stored-bf16-tables");
    for tied in [false, true] {
        let f32_dir = tmp.path().join(format!("f32-tied-{tied}"));
        large_llama(&f32_dir, tied, 1000);
        let base = load_model(&f32_dir).unwrap();
        let no_change = engine::Adapter::zeros(&base.config.decoder, &vec![vec![]; base.config.decoder.n_layers], 0.0);
        let dir = tmp.path().join(format!("bf16-tied-{tied}"));
        save_merged(&dir, MergeBase::Dir(&f32_dir), &no_change, WriteDtype::Bf16).unwrap();
        let whole = load_model(&dir).unwrap();
        let (model, linears, tables) = dpo_hf::load_with_bf16_tables(&dir, Storage::Bf16).unwrap();
        let mut want = whole.params.clone();
        assert!(linears == FrozenLinears::take_from(&mut want, Storage::Bf16).unwrap(), "tied {tied}: linears");
        assert!(model.params.wte.data.is_empty() && model.params.lm_head.as_ref().is_none_or(|h| h.data.is_empty()));
        assert!(model.params.layers == want.layers, "tied {tied}: the other tensors");
        let head = whole.params.lm_head.as_ref().unwrap_or(&whole.params.wte);
        assert!(tables.is_whole() && tables.head().to_f32() == head.data, "tied {tied}: the head");
        assert!(tables.whole_rows().unwrap().to_f32() == whole.params.wte.data, "tied {tied}: the lookups");
        let err = dpo_hf::load_with_bf16_tables(&f32_dir, Storage::Bf16).unwrap_err().to_string();
        assert!(err.contains("stored in bf16") && err.contains("F32"), "{err}");
    }
}

#[test]
fn reading_holds_a_block_or_a_converted_tensor() {
    let block = 3 * dpo_hf::safetensors::BLOCK_BYTES as u64;
    let llama = parse_config(&parity("models/llama-policy/config.json")).unwrap();
    assert_eq!(load_transient_bytes(&llama), block);
    let path = parity("models/gpt2-policy/config.json");
    let mut raw: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(load_transient_bytes(&config_from_json(raw.clone(), &path).unwrap()), block);
    raw["n_embd"] = 768.into();
    raw["n_head"] = 12.into();
    assert_eq!(load_transient_bytes(&config_from_json(raw, &path).unwrap()), 8 * 768 * 3072);
}
