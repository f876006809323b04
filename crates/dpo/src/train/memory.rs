//! Peak memory of a training run, estimated before any weight is loaded, and the check that refuses a
//! run that would not fit.
//!
//! What a run holds at its peak (f32 throughout):
//!
//! ```text
//! weights     P per copy: the trained copy, the gradient, the optimizer's buffers (AdamW 2, RMSprop 1-2,
//!             SGD 0-1) and a reference model (a frozen copy, or --ref-model's); the loaded model is freed
//!             once copied
//! activations per token of the largest micro-batch, as the engine counts them
//!             (`engine::Activations::floats_per_token`): every layer's for backward (with gradient
//!             checkpointing, every layer's input and one layer's), plus one layer's for the reference
//!             forward where it has buffers of its own (KTO; a pair objective's reference forward runs on
//!             the policy's)
//! LM head     one block of logits (up to 1024 targets by a block of the vocabulary) and the targets' hidden
//!             rows and their gradient (`engine::kernels::head_scratch_floats`)
//! checkpoint  while a checkpoint is written: one block linear converted to the HF layout (weights and
//!             optimizer moments are written from their own buffers, tensor by tensor); a LoRA run's
//!             adapter and its moments
//! base        the program, the tokenizer, thread stacks and the data (a fixed allowance), and the rotary
//!             tables (`engine::kernels::RopeTable::floats`, per decoder)
//! merging     with --merge, after the run's state is freed: the adapter, what writing the merged model a
//!             block at a time holds (`hf::merge_transient_bytes`) and the program; the estimate is the
//!             larger of this, loading and the step
//! loading     a LoRA base stored as it is read (QLoRA, bf16, frozen tables): what it holds once read and
//!             what reading holds on the way (`hf::load_transient_bytes`: a block of the file, or a
//!             tensor GPT-2 or NeoX store in another layout, whole in f32) ([`load_bytes`]); the estimate
//!             is the larger of this and the step's peak
//! ```
//!
//! A bf16 run (`MemoryPlan::precision`) holds the reference model's block linears in bf16 (its products
//! round them to bf16 anyway), and a reference that scores known data its head in bf16 and the f32
//! embeddings of the data's tokens alone (`MemoryPlan::reference_lookups`); a LoRA base is stored in bf16
//! by default then, and keeps its embedding and head as that reference does, counted through
//! [`AdapterPlan::base_bytes`] ([`frozen_model_bytes`]). Its activations are counted as the
//! engine keeps them (`engine::Activations::bytes_per_token` with the precision: each layer's products in
//! bf16).
//!
//! Where pages are handed back (`MemoryPlan::hands_back`: the `dpo` binary's allocator on a kernel with
//! transparent huge pages, one backward per step), gradients and activations are not held whole at the
//! same time: the gradients are handed back after each optimizer step and written again by the next
//! backward, which hands each layer's activations back once done with them. The step then peaks at the
//! larger of backward's start (every activation; the LM head's gradient is written after the blocks') and
//! its last layer (every gradient, that layer's activations and the scratch): `MemoryEstimate::overlap` is
//! what that saves against holding both.
//!
//! A LoRA run ([`AdapterPlan`]) holds the base once (frozen: no gradient, no optimizer state, no copy; the
//! reference is the same base with the adapter off, or with a frozen copy of the starting adapter), and
//! the adapter A times over: trained, gradient, optimizer buffers, the frozen copy. Its activations add each
//! pair's `x A^T` (`r` floats per token, kept for backward); its checkpoints hold the adapter and its
//! moments, and `--merge` writes a merged model at the end, once the run's state is freed.
//!
//! Against the measured peak resident set (`crates/cli/tests/bad_input.rs`,
//! `memory_estimate_tracks_measured_peak`: GPT-2 shape, d = 256, 4 layers, micro-batches of 2000 tokens)
//! the estimate is 199.0 MiB for 179.5 MiB measured with pages handed back (212.0 for 212.8 without);
//! the test allows a factor 1.5 either way. On the tiny
//! fixture models the fixed allowance dominates (30 MiB estimated, 24 MiB measured).

use std::path::Path;

use engine::kernels::{head_scratch_floats, Precision, RopeTable};
use engine::optim::OptimizerConfig;
use engine::quant::{FrozenEmbedding, FrozenLinears, Storage};
use engine::{Activations, DecoderConfig, Keep, PositionKind};

use super::config::Objective;

/// Fixed allowance for the program itself, thread stacks, the tokenizer and the data (a run on the
/// fixture model peaks at about 20 MiB, of which 13 MiB are counted by the other terms).
pub const BASE_BYTES: u64 = 16 << 20;

/// The parts of an estimate, in bytes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MemoryEstimate {
    /// Parameters of the policy.
    pub params: u64,
    /// Weights, gradient, optimizer state and reference model together.
    pub weights: u64,
    /// Tokens in the largest micro-batch.
    pub batch_tokens: u64,
    /// Rows in that micro-batch.
    pub batch_rows: u64,
    pub activations: u64,
    /// What gradients and activations do not hold at the same time ([`MemoryPlan::hands_back`]).
    pub overlap: u64,
    pub head: u64,
    pub checkpoint: u64,
    pub base: u64,
    /// Loading a stored LoRA base ([`AdapterPlan::load_bytes`]) with the program: the peak when it is
    /// above the training step's; 0 otherwise counted in the weights.
    pub load: u64,
    /// `--merge`, once the run's state is freed ([`AdapterPlan::merge`]): the adapter read back, what the
    /// merge holds, and the program; 0 without.
    pub merge: u64,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.step().max(self.load).max(self.merge)
    }

    /// The training step's peak alone.
    pub fn step(&self) -> u64 {
        self.weights + self.activations + self.head + self.checkpoint + self.base - self.overlap
    }

    /// `estimated peak 1.2 GiB (weights, gradient and optimizer 600 MiB for 135M parameters, ...)`.
    pub fn summary(&self) -> String {
        format!(
            "estimated peak {} (weights, gradient, optimizer and reference {} for {} parameters; activations {} \
             for the largest micro-batch, {} rows and {} tokens{}; LM head {}; checkpoint writing {}; base {})",
            human(self.total()),
            human(self.weights),
            self.params,
            human(self.activations),
            self.batch_rows,
            self.batch_tokens,
            match self.overlap {
                0 => String::new(),
                o => format!(", less {} that gradients and activations do not hold at once", human(o)),
            },
            human(self.head),
            human(self.checkpoint),
            human(self.base)
        ) + &match self.load {
            0 => String::new(),
            l => format!("; loading the base {}", human(l)),
        } + &match self.merge {
            0 => String::new(),
            m => format!("; merging {}", human(m)),
        }
    }
}

/// How the run is set up, as far as memory goes.
pub struct MemoryPlan<'a> {
    pub policy: &'a DecoderConfig,
    pub optimizer: &'a OptimizerConfig,
    /// A reference model held in memory while training: `Some(config)` (the policy's for a frozen copy).
    pub reference: Option<&'a DecoderConfig>,
    /// In a bf16 run, the tokens whose embeddings a held reference keeps for its lookups (its head in
    /// bf16: `ReferenceModel::keep_lookups_of`); `None` where it keeps its whole embedding.
    pub reference_lookups: Option<u64>,
    /// The reference's forward runs on the buffers of the policy's training pass (pair objectives: it
    /// comes first in each chunk), so it adds only what its slot needs beyond the policy's; otherwise
    /// (KTO: it runs while the policy's activations are held) it has buffers of its own.
    pub reference_on_policy_buffers: bool,
    /// Tokens each row (pair, or prompt + completion) packs into, training and evaluation rows together.
    pub row_tokens: Vec<u64>,
    pub batch_size: usize,
    /// The training forward keeps each layer's input only (`engine::Keep::LayerInputs`).
    pub gradient_checkpointing: bool,
    /// A LoRA run: the adapter trained on the frozen policy; `None` trains every weight.
    pub adapter: Option<AdapterPlan>,
    /// The precision of the passes: a bf16 run holds a reference model's block linears in bf16.
    pub precision: Precision,
    /// Backward hands each spent layer's activations back to the kernel and the optimizer step the
    /// gradients (`engine::pages::hands_back_pages`), and each step runs one backward pass (no
    /// accumulation over micro-batches): the gradients then fill memory as the activations leave it.
    pub hands_back: bool,
}

/// Bytes of a model whose block linears are kept in `storage` and the rest of it in f32.
pub fn stored_model_bytes(cfg: &DecoderConfig, storage: Storage) -> u64 {
    let linears = FrozenLinears::estimate_bytes(cfg, Storage::F32) as u64 / 4;
    let rest = cfg.param_count() - linears;
    FrozenLinears::estimate_bytes(cfg, storage) as u64 + 4 * rest
}

/// [`stored_model_bytes`] of a frozen model that, with `lookups: Some(kept)`, holds its token embedding
/// and head as an `engine::quant::FrozenEmbedding` of `kept` rows (the head in bf16) instead of in f32.
pub fn frozen_model_bytes(cfg: &DecoderConfig, storage: Storage, lookups: Option<u64>) -> u64 {
    let stored = stored_model_bytes(cfg, storage);
    match lookups {
        Some(kept) => {
            let (v, d) = (cfg.vocab_size, cfg.hidden);
            let f32_tables = 4 * (v * d) as u64 * if cfg.tied_embeddings { 1 } else { 2 };
            stored - f32_tables + FrozenEmbedding::estimate_bytes(v, d, kept as usize) as u64
        }
        None => stored,
    }
}

/// How a reference model held beside the policy stores its block linears in a run of `precision`
/// (`crate::train::reference::ReferenceModel::new`).
pub fn reference_storage(precision: Precision) -> Storage {
    match precision {
        Precision::Bf16 => Storage::Bf16,
        Precision::F32 => Storage::F32,
    }
}

/// The adapter of a LoRA run, as far as memory goes.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AdapterPlan {
    /// Values in all `A` and `B` tensors.
    pub params: u64,
    /// Floats each token holds for the adapter in a training pass, as the engine counts them
    /// (`engine::Decoder::adapter_activation_floats_per_token`, with the run's `Keep`).
    pub kept_per_token: u64,
    /// The reference reads a frozen copy of the starting adapter (a run from `--adapter`).
    pub frozen_copy: bool,
    /// `--merge`: a merged model is written at the end, once the run's state is freed, a block at a time;
    /// the bytes that holds (`hf::merge_transient_bytes`).
    pub merge: Option<u64>,
    /// The reference is another model (`--ref-model`), held beside the base.
    pub reference_model: bool,
    /// Bytes of the frozen base when it is stored other than in f32 ([`frozen_model_bytes`]: its block
    /// linears in NF4 or bf16, its embedding and head as a bf16 run keeps them); `None` for an f32 base (4
    /// bytes a parameter).
    pub base_bytes: Option<u64>,
    /// Bytes while such a base is loaded ([`load_bytes`]); `None` where it is not read from a file (a
    /// random base: `dpo bench`) or held in f32.
    pub load_bytes: Option<u64>,
}

/// The peak of reading a frozen base stored as [`frozen_model_bytes`] counts it: what it holds once
/// read, and `transient`, what reading holds on the way (`hf::load_transient_bytes`: tensors are stored
/// a block of the file at a time, but a converted layout is held whole in f32 and converted).
pub fn load_bytes(cfg: &DecoderConfig, storage: Storage, lookups: Option<u64>, transient: u64) -> u64 {
    frozen_model_bytes(cfg, storage, lookups) + transient
}

fn optimizer_buffers(o: &OptimizerConfig) -> u64 {
    o.buffers() as u64
}

/// Bytes of the gradient of every parameter of `c`, and of what stays in memory of it between steps
/// where pages are handed back (`engine::pages::kept_by_release`: the small tensors).
fn gradient_bytes(c: &DecoderConfig) -> (u64, u64) {
    let (d, v) = (c.hidden, c.vocab_size);
    let layer = [c.qkv_dim() * d, d * c.attn_dim(), c.mlp_in_dim() * d, d * c.ffn_hidden];
    let mut large: Vec<usize> = std::iter::repeat_n(layer, c.n_layers).flatten().collect();
    large.push(v * d);
    if !c.tied_embeddings {
        large.push(v * d);
    }
    if matches!(c.positions, PositionKind::Learned) {
        large.push(c.max_positions * d);
    }
    let large_bytes: u64 = large.iter().map(|&n| 4 * n as u64).sum();
    let small = 4 * c.param_count() - large_bytes;
    let kept = large.iter().map(|&n| engine::pages::kept_by_release(4 * n as u64)).sum::<u64>() + small;
    (4 * c.param_count(), kept)
}

/// The estimate for `plan`.
pub fn estimate(plan: &MemoryPlan) -> MemoryEstimate {
    let c = plan.policy;
    let p = c.param_count();
    let k = optimizer_buffers(plan.optimizer);
    let storage = reference_storage(plan.precision);
    let reference_bytes = plan
        .reference
        .map_or(0, |r| frozen_model_bytes(r, storage, plan.reference_lookups.filter(|_| storage == Storage::Bf16)));
    let weights = match &plan.adapter {
        // Trained copy + gradient + optimizer buffers + reference (the loaded weights are freed once
        // copied into the trained set and the reference, before the first step).
        None => 4 * (2 + k) * p + reference_bytes,
        // The frozen base (also the reference's, unless another model is loaded as reference) + the
        // adapter trained, its gradient, its optimizer buffers and the frozen starting copy.
        Some(a) => {
            let separate_reference = if a.reference_model { reference_bytes } else { 0 };
            a.base_bytes.unwrap_or(4 * p) + separate_reference + 4 * (2 + k + a.frozen_copy as u64) * a.params
        }
    };
    let mut rows = plan.row_tokens.clone();
    rows.sort_unstable_by(|a, b| b.cmp(a));
    let largest = &rows[..plan.batch_size.min(rows.len())];
    let n: u64 = largest.iter().sum();
    let keep = Keep::for_backward(plan.gradient_checkpointing);
    // Bytes per token as the engine keeps them in this precision (a bf16 pass keeps each layer's products
    // in bf16); the adapter's `x A^T` stays f32 in every precision.
    let precision = plan.precision;
    let mut per_token =
        Activations::bytes_per_token(c, keep, precision) + 4 * plan.adapter.map_or(0, |a| a.kept_per_token);
    if let Some(r) = plan.reference {
        let own = Activations::bytes_per_token(r, Keep::None, precision);
        per_token += match plan.reference_on_policy_buffers {
            // A slot as large as the policy's comes out of the training pass's buffers.
            true => own.saturating_sub(Activations::bytes_per_token(c, Keep::None, precision)),
            false => own,
        };
    }
    let activations = n * per_token;
    // Gradients and activations at once: the whole of both, or where pages are handed back, the larger
    // of two moments: backward's start (every activation; the LM head's gradient comes after the
    // blocks', `engine::Decoder::backward_logprobs`) and the last layer's backward (every gradient, the
    // activations of one layer and the scratch).
    let overlap = match (&plan.adapter, plan.hands_back) {
        (None, true) => {
            let (grads, kept) = gradient_bytes(c);
            let handed_back = grads - kept;
            let released = n * Activations::released_per_layer_bytes_per_token(c, keep, precision);
            let start = activations;
            let end = handed_back + activations - (c.n_layers as u64 - 1) * released;
            handed_back + activations - start.max(end)
        }
        _ => 0,
    };
    let head = 4 * head_scratch_floats(n as usize, c.hidden, c.vocab_size);
    // The rotary tables: one, plus the full-attention layers' own (`global_layers`, Gemma 3).
    let rope = |c: &DecoderConfig| {
        let global = c.global_layers.as_ref().map_or(0, |g| 4 * RopeTable::floats(&g.rope, c.max_positions));
        global
            + match c.positions {
                PositionKind::Rotary(r) => 4 * RopeTable::floats(&r, c.max_positions),
                PositionKind::Learned => 0,
            }
    };
    MemoryEstimate {
        params: p,
        weights,
        batch_tokens: n,
        batch_rows: largest.len() as u64,
        activations,
        overlap,
        head,
        checkpoint: match &plan.adapter {
            // Weights and moments are written from their own buffers, one tensor at a time; a tensor whose
            // layout differs from transformers' (GPT-2's transposed Conv1D, NeoX's interleaved q/k/v) is
            // converted into a buffer of its own first: at most the largest block linear.
            None => 4 * c.hidden as u64 * c.qkv_dim().max(c.mlp_in_dim()) as u64,
            Some(a) => 4 * a.params * k.max(1),
        },
        base: BASE_BYTES + rope(c) + plan.reference.map(rope).unwrap_or(0),
        load: plan.adapter.and_then(|a| a.load_bytes).map_or(0, |l| l + BASE_BYTES),
        merge: plan.adapter.and_then(|a| a.merge.map(|m| m + 4 * a.params + BASE_BYTES)).unwrap_or(0),
    }
}

/// Estimates the run's peak memory, logs it, and refuses a run that would not fit in `max_memory` (or
/// the machine's available memory). `reference`: the reference model held while training, and the
/// tokens whose lookups it keeps ([`MemoryPlan::reference_lookups`]).
pub(super) fn check(
    cfg: &super::TrainConfig,
    policy: &DecoderConfig,
    reference: Option<(&DecoderConfig, Option<u64>)>,
    row_tokens: Vec<u64>,
    rows_in_flight: usize,
    adapter: Option<AdapterPlan>,
    log: &mut dyn FnMut(&str),
) -> Result<(), super::TrainError> {
    let opt = cfg.optimizer_config();
    let plan = MemoryPlan {
        policy,
        optimizer: &opt,
        reference: reference.map(|r| r.0),
        reference_lookups: reference.and_then(|r| r.1),
        row_tokens,
        batch_size: rows_in_flight,
        gradient_checkpointing: cfg.gradient_checkpointing,
        reference_on_policy_buffers: !matches!(cfg.objective, Objective::Kto(_)),
        adapter,
        precision: cfg.precision,
        hands_back: engine::pages::hands_back_pages() && cfg.grad_accum == 1 && rows_in_flight >= cfg.batch_size,
    };
    let est = estimate(&plan);
    let limit = match &cfg.max_memory {
        Some(m) => Some((m.0, "the --max-memory limit of")),
        None => available_memory().map(|b| (b, "the available memory (MemAvailable) of")),
    };
    let Some((limit, what)) = limit else {
        log(&format!("memory: {}", est.summary()));
        return Ok(());
    };
    log(&format!("memory: {}; limit {}", est.summary(), human(limit)));
    if est.total() <= limit {
        return Ok(());
    }
    let advice = if est.activations >= est.weights {
        "lower --batch-size, --micro-pairs or --max-length"
    } else if cfg.is_lora() {
        "use a smaller model, a lower --lora-r or fewer --lora-targets"
    } else {
        "train a LoRA adapter (--lora-r 16), use a smaller model, --precompute-ref (no reference model in memory) \
         or --optimizer sgd"
    };
    Err(super::TrainError::Memory(format!(
        "the run needs an estimated {} of memory, more than {what} {}: activations {} for the largest micro-batch \
         ({} rows, {} tokens), weights, gradient, optimizer and reference {}; {advice}, or pass --max-memory \
         SIZE to run anyway",
        human(est.total()),
        human(limit),
        human(est.activations),
        est.batch_rows,
        est.batch_tokens,
        human(est.weights),
    )))
}

/// Fixes glibc's mmap threshold at its default (128 KiB). glibc otherwise raises it to the size of each
/// mmap'd block freed (up to 32 MiB): once a stored base's f32 linears are freed after quantising (or any
/// large tensor is), later multi-MiB buffers come from the heap, whose freed holes stay resident, and the
/// peak grows past the estimate (`dpo bench --arch llama --lora-r 4 --quantize nf4`: 625 MB measured
/// against 221 MB estimated). With the threshold fixed, large buffers are mmap'd and returned when freed.
pub fn fix_allocator_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; it is called before any worker thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// `MemAvailable` of `/proc/meminfo`, in bytes (None where there is no such file).
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string(Path::new("/proc/meminfo")).ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Parses a size: bytes, or a number with a unit `K`, `M`, `G`, `T` (powers of 1024; `KiB`, `MB`,
/// `gb`, ... are read the same way).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|ch: char| !(ch.is_ascii_digit() || ch == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("{text:?} is not a size (e.g. 512MiB, 8GiB, 1T)"))?;
    let shift = match unit.trim().to_ascii_lowercase().trim_end_matches('b').trim_end_matches('i') {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(format!("{text:?}: unknown unit {unit:?}; use K, M, G or T (powers of 1024)")),
    };
    let bytes = value * (1u64 << shift) as f64;
    if !(bytes.is_finite() && bytes >= 1.0) {
        return Err(format!("{text:?} must be a positive size"));
    }
    Ok(bytes as u64)
}

/// `1.5 GiB`, `12.0 MiB`, `900 B`.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        let scale = (1u64 << shift) as f64;
        if b >= scale {
            return format!("{:.1} {unit}", b / scale);
        }
    }
    format!("{bytes} B")
}

#[cfg(test)]
#[path = "memory_tests.rs"]
mod tests;
