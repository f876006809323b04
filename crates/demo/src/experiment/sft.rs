//! Step 1: the world's SFT model. A BPE tokenizer is trained on generated reviews, a GPT-2-shaped model
//! is initialised from scratch and saved as a Hugging Face directory, and `train_sft` pretrains it on
//! the reviews (each one `BOS review EOS`). The result is the SFT policy every method starts from and the
//! reference every KL is measured against.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use serde_json::json;

use super::plan::Plan;
use super::{jsonl, DemoError};
use crate::world::{corpus, tokenizer};
use dpo::train::{train_sft, RunOptions, TrainConfig};

/// The token that opens and closes every sequence (GPT-2's `<|endoftext|>`).
pub const EOT_ID: u32 = 0;

/// `config.json` of the from-scratch model: GPT-2's layout, so transformers loads it too.
pub fn gpt2_config(plan: &Plan) -> serde_json::Value {
    let s = &plan.shape;
    json!({
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": plan.vocab_size,
        "n_embd": s.hidden,
        "n_layer": s.layers,
        "n_head": s.heads,
        "n_positions": s.positions,
        "n_inner": null,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "bos_token_id": EOT_ID,
        "eos_token_id": EOT_ID,
        "pad_token_id": EOT_ID,
        "tie_word_embeddings": true,
        "scale_attn_by_inverse_layer_idx": false,
        "dtype": "float32",
    })
}

/// Builds the tokenizer and the initial model, pretrains it, and returns the SFT model directory.
///
/// A previous run's SFT model in the same output directory is reused when it was built with the same
/// world settings (`runs/sft/world.json`), so re-running the methods does not pretrain again.
pub fn pretrain(plan: &Plan, out: &Path, stop: &AtomicBool, log: &mut dyn FnMut(&str)) -> Result<PathBuf, DemoError> {
    let run = out.join("runs").join("sft");
    let stamp_path = run.join("world.json");
    let mut stamp = json!({
        "seed": plan.seed, "corpus_size": plan.corpus_size, "vocab_size": plan.vocab_size,
        "shape": plan.shape, "sft": plan.sft,
    });
    // An f32 world keeps the stamp it had before precisions existed (its model is reused).
    if plan.precision != engine::kernels::Precision::F32 {
        stamp["precision"] = plan.precision.name().into();
    }
    let stamp = stamp.to_string();
    let final_dir = run.join("final");
    if final_dir.join("config.json").is_file() && std::fs::read_to_string(&stamp_path).ok().as_deref() == Some(&stamp) {
        log(&format!("reusing the SFT model in {} (same world settings)", final_dir.display()));
        return Ok(final_dir);
    }
    let reviews = corpus::reviews(plan.seed, plan.corpus_size);
    let tok_dir = out.join("tokenizer");
    tokenizer::build_tokenizer(&reviews, plan.vocab_size, &tok_dir)?;
    let tok = hf::load_tokenizer(&tok_dir)?;

    let init_dir = out.join("init");
    let cfg_path = init_dir.join("config.json");
    let cfg = hf::config_from_json(gpt2_config(plan), &cfg_path)?;
    // GPT-2's initialisation scale.
    let params = engine::presets::init_random(&cfg.decoder, 0.02, plan.seed);
    hf::save_model(&init_dir, &cfg, &params, Some(&tok_dir))?;

    // `BOS review EOS`, pre-tokenized: the BOS is the prompt, so the first word is scored too.
    let data = out.join("data").join("corpus.jsonl");
    let mut rows = Vec::with_capacity(reviews.len());
    let mut longest = 0;
    for r in &reviews {
        let mut ids = tok.encode(r, false)?;
        ids.push(EOT_ID);
        ids.truncate(plan.shape.positions - 1);
        longest = longest.max(ids.len());
        rows.push(json!({ "prompt_ids": [EOT_ID], "completion_ids": ids }));
    }
    jsonl::write(&data, &rows)?;
    log(&format!(
        "world: {} reviews, BPE vocabulary {}, longest review {} tokens; GPT-2 {} layers, d {}, {} heads, {} positions ({:.2}M parameters)",
        reviews.len(),
        plan.vocab_size,
        longest,
        plan.shape.layers,
        plan.shape.hidden,
        plan.shape.heads,
        plan.shape.positions,
        params.numel() as f64 / 1e6
    ));

    let cfg = TrainConfig {
        model: init_dir,
        data,
        output: run.clone(),
        lr: plan.sft.lr,
        batch_size: plan.sft.batch,
        max_steps: Some(plan.sft.steps),
        warmup_steps: plan.sft.steps / 20,
        scheduler: engine::optim::ScheduleKind::Cosine,
        save_every: 0,
        log_every: (plan.sft.steps / 5).max(1),
        seed: plan.seed,
        precision: plan.precision,
        ..Default::default()
    };
    let outcome = train_sft(&cfg, &RunOptions { overwrite: true, ..Default::default() }, stop, log)?;
    if outcome.interrupted {
        return Err(DemoError::Interrupted);
    }
    let final_dir = outcome.final_dir.ok_or(DemoError::NoFinalModel { run: "SFT" })?;
    dpo::io::write_atomic(&stamp_path, stamp.as_bytes()).map_err(|e| DemoError::io(&stamp_path, e))?;
    Ok(final_dir)
}
