//! A model → a GGUF file llama.cpp runs: its architecture's metadata keys, llama.cpp's tensor names and
//! layouts, the tokenizer and chat template (see [`super::vocab`]).
//!
//! Architectures (llama.cpp's names):
//! - `llama` for Llama, Mistral and SmolLM2. llama.cpp rotates Q and K pairs `(2i, 2i+1)` of each head,
//!   transformers pairs `(i, i + hd/2)` (`rotate_half`); so, as llama.cpp's `convert_hf_to_gguf.py` does,
//!   the rows of `q_proj` and `k_proj` are permuted within each head: new row `2i + j` is old row
//!   `j * hd/2 + i`. Llama 3 rope scaling becomes the `rope_freqs.weight` factors.
//! - `qwen2`: the same tensors plus q/k/v biases; llama.cpp rotates Qwen2 NeoX-style, so no permutation.
//! - `gpt2`: fused `attn_qkv`, LayerNorm weights and biases, learned positions; HF's `Conv1D` weights
//!   (`[in, out]`) are transposed to `[out, in]`.
//!
//! Tensor types: 1-D tensors (norms, biases, rope factors) stay f32 as in llama.cpp's converter; 2-D
//! weights take the requested type, Q8_0 falling back to f16 for a row length that is not a multiple of 32.

use std::path::Path;

use engine::{NormKind, PositionKind, RopeScaling};

use super::format::{self, GgmlType, Tensor, Value};
use super::quant::{encode, Q8_0_BLOCK};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::peft::MergedModel;
use crate::tokenizer::Tokenizer;
use crate::weights::HfValues;

/// The weight type asked for (`--dtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufDtype {
    F32,
    F16,
    Bf16,
    Q8_0,
}

impl GgufDtype {
    /// llama.cpp's `general.file_type` (`llama_ftype`).
    fn file_type(self) -> u32 {
        match self {
            GgufDtype::F32 => 0,
            GgufDtype::F16 => 1,
            GgufDtype::Q8_0 => 7,
            GgufDtype::Bf16 => 32,
        }
    }

    fn matrix_type(self, row_len: usize) -> GgmlType {
        match self {
            GgufDtype::F32 => GgmlType::F32,
            GgufDtype::F16 => GgmlType::F16,
            GgufDtype::Bf16 => GgmlType::Bf16,
            GgufDtype::Q8_0 if row_len.is_multiple_of(Q8_0_BLOCK) => GgmlType::Q8_0,
            GgufDtype::Q8_0 => GgmlType::F16,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arch {
    Llama,
    Qwen2,
    Gpt2,
}

impl Arch {
    fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Gpt2 => "gpt2",
        }
    }
}

/// What was written: counts for the command's summary line.
#[derive(Clone, Debug)]
pub struct Exported {
    pub architecture: &'static str,
    pub tensors: usize,
    pub metadata: usize,
    pub bytes: u64,
}

/// Writes `model` (a base with its adapter merged in, or none) with `tok` from its directory as a GGUF
/// file at `out`, atomically. Tensors are made and encoded as the file reaches them ([`HfValues`]): a
/// block of rows at a time where llama.cpp's layout is the checkpoint's, whole where it is converted
/// (GPT-2's transposed weights, Llama's q/k rows paired for rotation), so a base read from its directory
/// is never held whole. Refused before anything is written when `out`'s file system lacks the room.
pub fn export_gguf(out: &Path, model: &MergedModel<'_>, tok: &Tokenizer, dtype: GgufDtype) -> Result<Exported> {
    let config = &model.config;
    let arch = match config.model_type.as_str() {
        "llama" | "mistral" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        "gpt2" => Arch::Gpt2,
        other => {
            return Err(Error::field(
                &config.path,
                "model_type",
                format!("`{other}` is not exported to GGUF (supported: llama, mistral, qwen2, gpt2)"),
            ))
        }
    };
    let mut metadata = vec![
        ("general.architecture".to_string(), Value::Str(arch.name().into())),
        ("general.name".to_string(), Value::Str(model_name(&model.dir))),
        ("general.file_type".to_string(), Value::U32(dtype.file_type())),
    ];
    if dtype == GgufDtype::Q8_0 {
        metadata.push(("general.quantization_version".to_string(), Value::U32(2)));
    }
    metadata.extend(hparams(arch, config)?);
    metadata.extend(super::vocab::metadata(&model.dir, tok, config.decoder.vocab_size)?);
    let values = HfValues::new(config, model)?;
    let plan = tensors(arch, config, &values.shapes, dtype)?;
    let heads: Vec<Tensor> = plan.iter().map(|(t, _)| t.clone()).collect();
    format::check(&metadata, &heads).map_err(|m| Error::dir(out, m))?;
    let need = heads.iter().map(|t| t.bytes().unwrap_or(0)).sum();
    crate::output::check_room(out, "the GGUF file", need)?;
    // An error making a tensor, returned as it is rather than as an I/O error of `out`.
    let mut carried = crate::atomic::Carried::default();
    let io = |e| Error::io(out, e);
    let written = crate::atomic::write_with(out, |w| {
        format::write(w, &metadata, &heads, |i, w| {
            let (head, how) = &plan[i];
            let made = match how {
                Make::Hf { index, conv1d, interleave } if !conv1d && !interleave && values.streams(*index) => {
                    // A block of whole rows at a time (a Q8_0 block never spans rows).
                    values.for_each_block(*index, &mut |block| w.write_all(&encode(head.ty, block)).map_err(io))
                }
                Make::Hf { index, conv1d, interleave } => values.whole(*index).and_then(|mut data| {
                    let shape = &values.shapes[*index].1;
                    if *conv1d {
                        data = transpose(&data, shape[0], shape[1]);
                    }
                    if *interleave {
                        data = rope_interleave(&data, config.decoder.head_dim, shape.get(1).copied().unwrap_or(1));
                    }
                    w.write_all(&encode(head.ty, &data)).map_err(io)
                }),
                Make::Values(v) => w.write_all(&encode(head.ty, v)).map_err(io),
            };
            made.map_err(|e| carried.carry(e))
        })
    });
    carried.result(out, written)?;
    let bytes = std::fs::metadata(out).map_err(|e| Error::io(out, e))?.len();
    Ok(Exported { architecture: arch.name(), tensors: heads.len(), metadata: metadata.len(), bytes })
}

/// How a GGUF tensor's values are made.
enum Make {
    /// From HF tensor `index` of [`HfValues`]: transposed from GPT-2's Conv1D `[in, out]`, its q/k rows
    /// paired for llama.cpp's rotation.
    Hf { index: usize, conv1d: bool, interleave: bool },
    /// Values of its own (Llama 3's rope factors).
    Values(Vec<f32>),
}

fn model_name(dir: &Path) -> String {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
}

/// `{arch}.*` hyperparameters.
fn hparams(arch: Arch, config: &ModelConfig) -> Result<Vec<(String, Value)>> {
    let c = &config.decoder;
    let a = arch.name();
    let u = |k: &str, v: usize| (format!("{a}.{k}"), Value::U32(v as u32));
    let mut md = vec![
        u("context_length", c.max_positions),
        u("embedding_length", c.hidden),
        u("block_count", c.n_layers),
        u("feed_forward_length", c.ffn_hidden),
        u("attention.head_count", c.n_heads),
    ];
    let unsupported = |what: &str| Error::field(&config.path, "model_type", format!("{what} is not exported to GGUF"));
    match (arch, c.norm, &c.positions) {
        (Arch::Gpt2, NormKind::LayerNorm { eps }, PositionKind::Learned) => {
            md.push((format!("{a}.attention.layer_norm_epsilon"), Value::F32(eps)));
        }
        (Arch::Llama | Arch::Qwen2, NormKind::RmsNorm { eps }, PositionKind::Rotary(rope)) => {
            md.push(u("attention.head_count_kv", c.n_kv_heads));
            md.push(u("attention.key_length", c.head_dim));
            md.push(u("attention.value_length", c.head_dim));
            md.push((format!("{a}.attention.layer_norm_rms_epsilon"), Value::F32(eps)));
            md.push((format!("{a}.rope.freq_base"), Value::F32(rope.theta)));
            md.push(u("rope.dimension_count", rope.rotary_dim));
            md.push(u("vocab_size", c.vocab_size));
            if let RopeScaling::Linear { factor } = rope.scaling {
                md.push((format!("{a}.rope.scaling.type"), Value::Str("linear".into())));
                md.push((format!("{a}.rope.scaling.factor"), Value::F32(factor)));
            }
            if rope.rotary_dim != c.head_dim {
                return Err(unsupported("partial rotary embedding"));
            }
        }
        _ => return Err(unsupported("this norm/position combination")),
    }
    Ok(md)
}

/// `(HF module, llama.cpp name)` rows.
type Renames = &'static [(&'static str, &'static str)];

/// llama.cpp's name for an HF tensor name, and whether its HF weight is `[in, out]` (GPT-2's Conv1D).
fn gguf_name(arch: Arch, hf: &str) -> Option<(String, bool)> {
    let (global, layer): (Renames, Renames) = match arch {
        Arch::Gpt2 => (
            &[
                ("transformer.wte", "token_embd"),
                ("transformer.wpe", "position_embd"),
                ("transformer.ln_f", "output_norm"),
                ("lm_head", "output"),
            ],
            &[
                ("ln_1", "attn_norm"),
                ("attn.c_attn", "attn_qkv"),
                ("attn.c_proj", "attn_output"),
                ("ln_2", "ffn_norm"),
                ("mlp.c_fc", "ffn_up"),
                ("mlp.c_proj", "ffn_down"),
            ],
        ),
        Arch::Llama | Arch::Qwen2 => (
            &[("model.embed_tokens", "token_embd"), ("model.norm", "output_norm"), ("lm_head", "output")],
            &[
                ("input_layernorm", "attn_norm"),
                ("self_attn.q_proj", "attn_q"),
                ("self_attn.k_proj", "attn_k"),
                ("self_attn.v_proj", "attn_v"),
                ("self_attn.o_proj", "attn_output"),
                ("post_attention_layernorm", "ffn_norm"),
                ("mlp.gate_proj", "ffn_gate"),
                ("mlp.up_proj", "ffn_up"),
                ("mlp.down_proj", "ffn_down"),
            ],
        ),
    };
    let (module, suffix) = hf.rsplit_once('.')?;
    if let Some((_, g)) = global.iter().find(|(h, _)| *h == module) {
        return Some((format!("{g}.{suffix}"), false));
    }
    let prefix = if arch == Arch::Gpt2 { "transformer.h." } else { "model.layers." };
    let (i, rest) = module.strip_prefix(prefix)?.split_once('.')?;
    let i: usize = i.parse().ok()?;
    let (_, g) = layer.iter().find(|(h, _)| *h == rest)?;
    let conv1d = arch == Arch::Gpt2 && suffix == "weight" && !rest.starts_with("ln_");
    Some((format!("blk.{i}.{g}.{suffix}"), conv1d))
}

/// Every GGUF tensor's name, `ne` and type, and how its values are made, for the HF tensors `shapes`.
fn tensors(
    arch: Arch,
    config: &ModelConfig,
    shapes: &[(String, Vec<usize>)],
    dtype: GgufDtype,
) -> Result<Vec<(Tensor, Make)>> {
    let c = &config.decoder;
    let mut out = Vec::new();
    for (index, (hf, shape)) in shapes.iter().enumerate() {
        let (name, conv1d) = gguf_name(arch, hf).ok_or_else(|| {
            Error::dir(&config.path, format!("tensor `{hf}` has no llama.cpp name for {}", arch.name()))
        })?;
        // Shape as PyTorch lays it out for llama.cpp: [rows (out), cols (in)].
        let mut shape = shape.clone();
        let conv1d = conv1d && shape.len() == 2;
        if conv1d {
            shape.swap(0, 1);
        }
        let interleave = arch == Arch::Llama && (name.ends_with("attn_q.weight") || name.ends_with("attn_k.weight"));
        let ty = match shape.as_slice() {
            [_, cols] => dtype.matrix_type(*cols),
            _ => GgmlType::F32,
        };
        let dims = shape.iter().rev().map(|d| *d as u64).collect();
        out.push((Tensor { name, dims, ty }, Make::Hf { index, conv1d, interleave }));
    }
    if let PositionKind::Rotary(rope) = &c.positions {
        if let RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_positions } = rope.scaling
        {
            let f = llama3_factors(
                rope.theta,
                rope.rotary_dim,
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_positions,
            );
            let head = Tensor { name: "rope_freqs.weight".into(), dims: vec![f.len() as u64], ty: GgmlType::F32 };
            out.push((head, Make::Values(f)));
        }
    }
    Ok(out)
}

/// `x [rows, cols]` → `[cols, rows]`.
fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; x.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = x[r * cols + c];
        }
    }
    t
}

/// Rows of a q/k projection `[heads * hd, cols]` from `rotate_half` order to llama.cpp's adjacent pairs:
/// within each head, new row `2i + j` is old row `j * hd/2 + i`.
pub(crate) fn rope_interleave(w: &[f32], hd: usize, cols: usize) -> Vec<f32> {
    let half = hd / 2;
    let mut out = vec![0f32; w.len()];
    for (src, dst) in w.chunks(hd * cols).zip(out.chunks_mut(hd * cols)) {
        for i in 0..half {
            for j in 0..2 {
                let (to, from) = (2 * i + j, j * half + i);
                dst[to * cols..(to + 1) * cols].copy_from_slice(&src[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}

/// Llama 3 rope scaling as per-frequency divisors (llama.cpp's `rope_freqs`): 1 for short wavelengths,
/// `factor` for long ones, a smooth blend between.
fn llama3_factors(theta: f32, dim: usize, factor: f32, low: f32, high: f32, original: usize) -> Vec<f32> {
    let (theta, factor, low, high, original) =
        (f64::from(theta), f64::from(factor), f64::from(low), f64::from(high), original as f64);
    let (low_wavelen, high_wavelen) = (original / low, original / high);
    (0..dim / 2)
        .map(|i| {
            let freq = 1.0 / theta.powf((2 * i) as f64 / dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let f = if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (original / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            f as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleave_pairs_halves_within_each_head() {
        // 2 heads of hd 4, one column: rows h*4 + r hold 10h + r.
        let w: Vec<f32> = (0..2).flat_map(|h| (0..4).map(move |r| (10 * h + r) as f32)).collect();
        assert_eq!(rope_interleave(&w, 4, 1), vec![0.0, 2.0, 1.0, 3.0, 10.0, 12.0, 11.0, 13.0]);
    }

    #[test]
    fn names_follow_llama_cpp() {
        assert_eq!(
            gguf_name(Arch::Llama, "model.layers.3.self_attn.q_proj.weight"),
            Some(("blk.3.attn_q.weight".into(), false))
        );
        assert_eq!(
            gguf_name(Arch::Qwen2, "model.layers.0.self_attn.k_proj.bias"),
            Some(("blk.0.attn_k.bias".into(), false))
        );
        assert_eq!(
            gguf_name(Arch::Gpt2, "transformer.h.1.attn.c_attn.weight"),
            Some(("blk.1.attn_qkv.weight".into(), true))
        );
        assert_eq!(gguf_name(Arch::Gpt2, "transformer.h.1.ln_2.bias"), Some(("blk.1.ffn_norm.bias".into(), false)));
        assert_eq!(gguf_name(Arch::Gpt2, "transformer.wpe.weight"), Some(("position_embd.weight".into(), false)));
        assert_eq!(gguf_name(Arch::Llama, "model.layers.x.mlp.up_proj.weight"), None);
    }

    #[test]
    fn llama3_factors_blend_between_the_limits() {
        let f = llama3_factors(500000.0, 64, 8.0, 1.0, 4.0, 8192);
        assert_eq!(f[0], 1.0);
        assert_eq!(*f.last().unwrap(), 8.0);
        assert!(f.windows(2).all(|w| w[0] <= w[1]));
    }
}
