//! GGUF, llama.cpp's model file: a writer and reader of the container ([`format`], [`read`]), tensor
//! encodings ([`quant`]: f32, f16, bf16, Q8_0), the tokenizer's metadata ([`vocab`]), and a Hugging Face
//! model → GGUF export for llama.cpp's `llama`, `qwen2` and `gpt2` architectures ([`export`]).

pub mod export;
pub mod format;
pub mod quant;
pub mod read;
pub mod vocab;

pub use export::{export_gguf, Exported, GgufDtype};
pub use format::{GgmlType, Value, ValueType};
pub use read::{parse, GgufFile, TensorInfo};
