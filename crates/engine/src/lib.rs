//! The engine: a decoder-only transformer family with hand-written forward and backward passes on the
//! `gemm` crate. It knows tokens, positions, attention spans and per-token log-probs; it knows nothing of
//! files, tokenizers or preferences.

pub mod batch;
pub mod config;
pub mod generate;
mod head_norm;
pub mod kernels;
pub mod lora;
pub mod model;
pub mod optim;
pub mod pages;
pub mod params;
pub mod presets;
pub mod quant;
pub mod rng;
pub mod scalar_head;

pub use batch::{Batch, Span, Target};
pub use config::*;
pub use lora::{Adapter, LayerAdapter, LoraPair, LoraTarget, Site};
pub use model::{Activations, Decoder, EngineError, Grads, HeadOutput, Keep, Model, PendingEmbeddingGrads};
pub use params::{LayerParams, NormParams, ParamSet, Params, Tensor};
pub use scalar_head::ScalarHead;
