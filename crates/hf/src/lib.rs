//! Hugging Face model directories for the DPO trainer.
//!
//! - [`config`]: `config.json` (transformers 4.x and 5 layouts) → [`engine::DecoderConfig`].
//! - [`safetensors`]: a validating reader (memory-mapped, F64/F32/F16/BF16 → f32, sharded checkpoints) and
//!   an atomic f32 writer.
//! - [`naming`]: one row of HF tensor names per checkpoint layout, and the plan that walks the engine's
//!   parameter names through it.
//! - [`weights`]: HF tensors ↔ [`engine::Params`] by that plan (loading, checking, saving).
//! - [`tokenizer`]: `tokenizer.json`, special tokens and the chat template (sandboxed minijinja).
//! - [`peft`]: PEFT LoRA adapter directories ↔ [`engine::Adapter`], target resolution, merged models.
//! - [`hub_cache`]: models and datasets by hub id (`org/name[@revision]`) from the local Hugging Face cache.
//! - [`atomic`]: writing files and directories under a temporary name, renamed into place when complete.
//! - [`output`]: the guard on outputs: never one of the command's inputs, a model replaced only when asked.
//! - [`model_dir`]: loading a whole directory and saving a trained model that transformers reads back.
//! - [`gguf`]: llama.cpp's GGUF file: writer, reader, and the export of a model with its tokenizer.
//! - [`stored`]: loading a frozen base with its block linears stored (NF4/bf16) tensor by tensor (QLoRA).
//!
//! Every error is an [`Error`] naming the file, tensor or JSON field at fault.

pub mod atomic;
pub mod config;
pub mod error;
pub mod gguf;
pub mod hub_cache;
pub mod model_dir;
pub mod naming;
pub mod output;
pub mod peft;
pub mod safetensors;
pub mod stored;
pub mod tokenizer;
pub mod weights;

pub use config::{config_from_json, parse_config, supported_model_types, Family, ModelConfig, FAMILIES};
pub use error::{Error, Result};
pub use model_dir::{load_config, load_model, load_tokenizer, load_tokenizer_if_present, save_model, HfModel};
pub use naming::Naming;
pub use safetensors::{Checkpoint, Dtype, SafeTensors, TensorInfo};
pub use stored::{load_frozen_base, load_model_stored, load_with_bf16_tables, load_with_frozen_tables};
pub use tokenizer::{ChatMessage, SpecialToken, Tokenizer};
pub use weights::{
    check_params, load_params, load_params_file, load_transient_bytes, merge_transient_bytes, params_from_checkpoint,
    stored_dtype, to_hf_tensors, weights_bytes,
};
