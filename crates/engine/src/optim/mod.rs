//! Optimizers (AdamW, RMSprop, SGD), gradient clipping and learning-rate schedules, with PyTorch's
//! arithmetic element for element.
//!
//! Every update is the one `torch.optim` performs on f32 tensors, in the same order of operations and with
//! the same fused multiply-adds, and every scalar (bias corrections, `1 - lr * wd`, step sizes) is computed
//! in f64 and rounded to f32 once, as Python floats are. The per-optimizer files say which torch code path
//! they reproduce and how closely (AdamW and SGD bit for bit; RMSprop to torch's square root, which is MKL's
//! and not correctly rounded).
//!
//! The optimizer holds state only for the tensors it was given ([`Optimizer::with_trainable`]); frozen
//! tensors are neither read nor written. Weight decay follows HF Trainer: biases and norm weights (every
//! 1-D tensor) never decay, matrices and embeddings do ([`applies_weight_decay`]).
//!
//! Updates are elementwise, so splitting a tensor into chunks for rayon cannot change a result: a step is
//! bit-identical on any number of threads.

mod adamw;
mod clip;
mod rmsprop;
pub mod schedule;
mod sgd;

pub use clip::{clip_grad_norm, global_grad_norm, grads_finite};
pub use schedule::{lr_at, ScheduleKind, UnknownSchedule};

use crate::params::{Params, Tensor};
use rayon::prelude::*;

/// Elements per parallel task; tensors up to this size are updated on the calling thread.
const CHUNK: usize = 1 << 14;

/// Defines `fn $name(args)` whose body is compiled twice, for the x86-64 baseline and for AVX2+FMA, and
/// picks the second at run time when the CPU has it. The updates use `f32::mul_add` where torch's kernels
/// fuse; without FMA in the target that is a libm call per element, with it one vector instruction.
/// (A local copy of `kernels::act::multiversion`, so this module does not depend on kernel internals.)
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn inner($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn fast($($arg: $ty),*) {
                inner($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: the running CPU has the features `fast` was compiled for.
                return unsafe { fast($($arg),*) };
            }
            inner($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// Which optimizer, with its hyperparameters (f64, as torch's Python floats; rounded to f32 where torch
/// rounds them). The learning rate is not here: it changes every step and is passed to [`Optimizer::step`].
#[derive(Clone, Debug, PartialEq)]
pub enum OptimizerConfig {
    /// `torch.optim.AdamW`: Adam with decoupled weight decay (`p *= 1 - lr * wd` before the update).
    AdamW { beta1: f64, beta2: f64, eps: f64, weight_decay: f64 },
    /// `torch.optim.RMSprop` (not centered), the DPO paper's optimizer; weight decay is L2 (`g += wd p`).
    RmsProp { alpha: f64, eps: f64, weight_decay: f64, momentum: f64 },
    /// `torch.optim.SGD` with optional momentum (dampening 0, no Nesterov); weight decay is L2.
    Sgd { momentum: f64, weight_decay: f64 },
}

impl OptimizerConfig {
    /// HF `TrainingArguments` defaults: betas (0.9, 0.999), eps 1e-8, weight decay 0.
    pub fn adamw() -> Self {
        OptimizerConfig::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }

    /// `torch.optim.RMSprop` defaults: alpha 0.99, eps 1e-8, no weight decay, no momentum.
    pub fn rmsprop() -> Self {
        OptimizerConfig::RmsProp { alpha: 0.99, eps: 1e-8, weight_decay: 0.0, momentum: 0.0 }
    }

    /// `torch.optim.SGD` defaults: no momentum, no weight decay.
    pub fn sgd() -> Self {
        OptimizerConfig::Sgd { momentum: 0.0, weight_decay: 0.0 }
    }

    /// The same optimizer with weight decay `wd` (HF `weight_decay`; applied to 2-D tensors only).
    pub fn with_weight_decay(mut self, wd: f64) -> Self {
        match &mut self {
            OptimizerConfig::AdamW { weight_decay, .. }
            | OptimizerConfig::RmsProp { weight_decay, .. }
            | OptimizerConfig::Sgd { weight_decay, .. } => *weight_decay = wd,
        }
        self
    }

    /// `adamw`, `rmsprop` or `sgd`.
    pub fn name(&self) -> &'static str {
        match self {
            OptimizerConfig::AdamW { .. } => "adamw",
            OptimizerConfig::RmsProp { .. } => "rmsprop",
            OptimizerConfig::Sgd { .. } => "sgd",
        }
    }

    /// Per-tensor state buffers, named as in torch's `optimizer.state[p]`.
    fn buffer_kinds(&self) -> &'static [&'static str] {
        match *self {
            OptimizerConfig::AdamW { .. } => &["exp_avg", "exp_avg_sq"],
            OptimizerConfig::RmsProp { momentum, .. } if momentum > 0.0 => &["square_avg", "momentum_buffer"],
            OptimizerConfig::RmsProp { .. } => &["square_avg"],
            OptimizerConfig::Sgd { momentum, .. } if momentum != 0.0 => &["momentum_buffer"],
            OptimizerConfig::Sgd { .. } => &[],
        }
    }
}

/// Whether weight decay applies to a tensor of this shape: HF Trainer decays no bias and no norm weight
/// (`get_decay_parameter_names`); among the engine's tensors those are exactly the 1-D ones, while
/// embeddings, projections and the LM head (2-D) decay. The same rule holds for all three optimizers, as
/// HF puts the same two parameter groups into whichever optimizer it builds.
pub fn applies_weight_decay(shape: &[usize]) -> bool {
    shape.len() >= 2
}

/// An optimizer's state for a checkpoint: the number of steps taken and every buffer, named
/// `{kind}.{tensor}` (`exp_avg.layers.0.w_qkv`), in a fixed order. Write the tensors to safetensors and
/// the step count next to them; [`Optimizer::restore`] checks names and shapes on the way back.
#[derive(Clone, Debug, PartialEq)]
pub struct OptimizerState {
    pub steps: u64,
    pub buffers: Vec<(String, Tensor)>,
}

/// Why an optimizer state does not fit the parameters it is restored for.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum OptimError {
    #[error("optimizer state has no buffer `{0}`")]
    Missing(String),
    #[error("optimizer state buffer `{name}` has shape {got:?}, but its parameter has shape {want:?}")]
    Shape { name: String, got: Vec<usize>, want: Vec<usize> },
    #[error("optimizer state buffer `{name}` has shape {shape:?} but holds {len} values")]
    Length { name: String, shape: Vec<usize>, len: usize },
    #[error("optimizer state buffer `{0}` belongs to no trained parameter of this {1} optimizer")]
    Unexpected(String, &'static str),
    #[error("optimizer state holds buffer `{0}` twice")]
    Duplicate(String),
}

/// One trained tensor: where it is in [`Params::named`], whether it decays, and its buffers
/// (in the order of [`OptimizerConfig::buffer_kinds`]).
#[derive(Clone, Debug)]
struct Slot {
    name: String,
    index: usize,
    shape: Vec<usize>,
    decay: bool,
    buffers: Vec<Vec<f32>>,
}

/// An optimizer over (a chosen subset of) a decoder's parameters.
#[derive(Clone, Debug)]
pub struct Optimizer {
    cfg: OptimizerConfig,
    slots: Vec<Slot>,
    steps: u64,
}

impl Optimizer {
    /// An optimizer that trains every tensor of `params`, with zeroed state.
    pub fn new(cfg: OptimizerConfig, params: &Params) -> Self {
        Self::with_trainable(cfg, params, |_| true)
    }

    /// An optimizer that trains the tensors whose canonical name `trainable` accepts; the others are
    /// frozen: never read, never written, and without state.
    pub fn with_trainable(cfg: OptimizerConfig, params: &Params, trainable: impl Fn(&str) -> bool) -> Self {
        let kinds = cfg.buffer_kinds().len();
        let slots = params
            .named()
            .into_iter()
            .enumerate()
            .filter(|(_, (name, _))| trainable(name))
            .map(|(index, (name, t))| Slot {
                name,
                index,
                shape: t.shape.clone(),
                decay: applies_weight_decay(&t.shape),
                buffers: vec![vec![0.0; t.numel()]; kinds],
            })
            .collect();
        Optimizer { cfg, slots, steps: 0 }
    }

    /// Rebuilds the optimizer [`Optimizer::state`] saved, training every tensor of `params`.
    pub fn restore(cfg: OptimizerConfig, params: &Params, state: OptimizerState) -> Result<Self, OptimError> {
        Self::restore_with_trainable(cfg, params, |_| true, state)
    }

    /// Rebuilds a saved optimizer that trains the tensors `trainable` accepts. Every buffer those tensors
    /// need must be present once with the tensor's shape, and no other buffer may be; errors name it.
    pub fn restore_with_trainable(
        cfg: OptimizerConfig,
        params: &Params,
        trainable: impl Fn(&str) -> bool,
        state: OptimizerState,
    ) -> Result<Self, OptimError> {
        let mut opt = Self::with_trainable(cfg, params, trainable);
        let mut given: std::collections::HashMap<String, Tensor> = std::collections::HashMap::new();
        for (name, t) in state.buffers {
            if t.data.len() != t.shape.iter().product::<usize>() {
                return Err(OptimError::Length { name, shape: t.shape, len: t.data.len() });
            }
            if given.contains_key(&name) {
                return Err(OptimError::Duplicate(name));
            }
            given.insert(name, t);
        }
        let kinds = opt.cfg.buffer_kinds();
        for slot in &mut opt.slots {
            for (kind, buf) in kinds.iter().zip(&mut slot.buffers) {
                let name = format!("{kind}.{}", slot.name);
                let t = given.remove(&name).ok_or_else(|| OptimError::Missing(name.clone()))?;
                if t.shape != slot.shape {
                    return Err(OptimError::Shape { name, got: t.shape, want: slot.shape.clone() });
                }
                *buf = t.data;
            }
        }
        if let Some(name) = given.into_keys().min() {
            return Err(OptimError::Unexpected(name, opt.cfg.name()));
        }
        opt.steps = state.steps;
        Ok(opt)
    }

    /// A copy of the state, for a checkpoint: buffers kind by kind, each in canonical tensor order.
    pub fn state(&self) -> OptimizerState {
        let mut buffers = Vec::new();
        for (k, kind) in self.cfg.buffer_kinds().iter().enumerate() {
            for slot in &self.slots {
                let t = Tensor { shape: slot.shape.clone(), data: slot.buffers[k].clone() };
                buffers.push((format!("{kind}.{}", slot.name), t));
            }
        }
        OptimizerState { steps: self.steps, buffers }
    }

    pub fn config(&self) -> &OptimizerConfig {
        &self.cfg
    }

    /// Optimizer steps taken so far (torch's `state["step"]`); the next step's bias correction uses one more.
    pub fn steps_taken(&self) -> u64 {
        self.steps
    }

    /// Canonical names of the tensors this optimizer trains, in order.
    pub fn trained(&self) -> impl Iterator<Item = &str> {
        self.slots.iter().map(|s| s.name.as_str())
    }

    /// One update of every trained tensor of `params` from the same tensor of `grads` at learning rate `lr`
    /// (f64, as torch's `group["lr"]`: step sizes are formed in f64 and rounded once). `params` and `grads`
    /// must have the layout the optimizer was built for (a programming error otherwise, so it panics).
    /// Gradients are used as given: clip them and check them with [`grads_finite`] first.
    pub fn step(&mut self, params: &mut Params, grads: &Params, lr: f64) {
        self.steps += 1;
        let t = self.steps;
        let mut ps = params.named_mut();
        let gs = grads.named();
        assert_eq!(ps.len(), gs.len(), "optimizer step: params and grads have different layouts");
        for slot in &mut self.slots {
            let (pname, p) = &mut ps[slot.index];
            let (gname, g) = &gs[slot.index];
            assert!(
                *pname == slot.name && *gname == slot.name && p.shape == slot.shape && g.shape == slot.shape,
                "optimizer step: tensor `{}` {:?} expected, params have `{pname}` {:?}, grads `{gname}` {:?}",
                slot.name,
                slot.shape,
                p.shape,
                g.shape
            );
            let (p, g) = (&mut p.data[..], &g.data[..]);
            // Buffers in the order of `buffer_kinds`; an absent one is an empty slice.
            let mut bufs = slot.buffers.iter_mut().map(|b| &mut b[..]);
            let mut next = || bufs.next().unwrap_or_default();
            match self.cfg {
                OptimizerConfig::AdamW { beta1, beta2, eps, weight_decay } => {
                    let wd = if slot.decay { weight_decay } else { 0.0 };
                    let s = adamw::Scalars::new(beta1, beta2, eps, wd, lr, t);
                    adamw::update(p, g, next(), next(), &s);
                }
                OptimizerConfig::RmsProp { alpha, eps, weight_decay, momentum } => {
                    let wd = if slot.decay { weight_decay } else { 0.0 };
                    let s = rmsprop::Scalars::new(alpha, eps, wd, momentum, lr);
                    rmsprop::update(p, g, next(), next(), &s);
                }
                OptimizerConfig::Sgd { momentum, weight_decay } => {
                    let wd = if slot.decay { weight_decay } else { 0.0 };
                    let s = sgd::Scalars::new(momentum, wd, lr, t == 1);
                    sgd::update(p, g, next(), &s);
                }
            }
        }
    }
}

/// Runs `f(p, g, a, b)` on matching chunks of the four slices, in parallel when they are longer than one
/// chunk. `a` and `b` are optimizer buffers as long as `p`, or empty where the optimizer has none (`f`
/// then gets empty chunks).
fn for_chunks(
    p: &mut [f32],
    g: &[f32],
    a: &mut [f32],
    b: &mut [f32],
    f: impl Fn(&mut [f32], &[f32], &mut [f32], &mut [f32]) + Sync,
) {
    let n = p.len();
    assert!(g.len() == n && (a.is_empty() || a.len() == n) && (b.is_empty() || b.len() == n));
    if n <= CHUNK {
        return f(p, g, a, b);
    }
    fn split(s: &mut [f32], tasks: usize) -> Vec<&mut [f32]> {
        if s.is_empty() {
            (0..tasks).map(|_| Default::default()).collect()
        } else {
            s.chunks_mut(CHUNK).collect()
        }
    }
    let tasks = n.div_ceil(CHUNK);
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(split(a, tasks))
        .zip(split(b, tasks))
        .for_each(|(((p, g), a), b)| f(p, g, a, b));
}

/// The fixture of the comparisons with torch, shared by the optimizer files.
///
/// The expected numbers next to each test come from torch 2.15 (`/root/.cache/dpo-reference-venv`) with
/// this harness, whose inputs are dyadic fractions so that Rust and Python start from the same bits:
/// ```python
/// import torch, numpy as np
/// def init(): return [torch.tensor([(i - 3) / 8 for i in range(6)]).reshape(2, 3),
///                     torch.tensor([(i + 4) / 8 for i in range(3)]), torch.tensor([(i - 1) / 16 for i in range(3)])]
/// def grad(t, k, n): return torch.tensor([(((i * 7 + t * 3 + k * 5) % 11) - 5) / 64 for i in range(n)])
/// def run(make, init=init, lrs=(0.01, 0.02, 0.03, 0.02, 0.01)):
///     ps = [torch.nn.Parameter(x) for x in init()]; opt = make(ps); out = []
///     for t, lr in enumerate(lrs, 1):
///         for k, p in enumerate(ps): p.grad = grad(t, k, p.numel()).reshape(p.shape)
///         for grp in opt.param_groups: grp["lr"] = lr
///         opt.step(); out.append(torch.cat([p.detach().flatten() for p in ps]))
///     return out
/// # HF Trainer's groups: the matrix decays, the 1-D tensors do not
/// def groups(ps, wd): return [{"params": ps[:1], "weight_decay": wd}, {"params": ps[1:], "weight_decay": 0.0}]
/// def show(out):
///     for row in out: print(", ".join(str(np.float32(x)) for x in row.numpy()) + ",")
/// ```
#[cfg(test)]
pub(crate) mod test_util {
    use super::*;
    use crate::params::NormParams;

    /// Learning rates of the five steps (`lrs` above).
    pub const LRS: [f64; 5] = [0.01, 0.02, 0.03, 0.02, 0.01];

    fn tensor(shape: &[usize], f: impl Fn(usize) -> f32) -> Tensor {
        let n = shape.iter().product();
        Tensor { shape: shape.to_vec(), data: (0..n).map(f).collect() }
    }

    /// `init()`: `wte` [2, 3], `norm_f.weight` [3], `norm_f.bias` [3] (canonical order).
    pub fn tiny_params() -> Params {
        Params {
            wte: tensor(&[2, 3], |i| (i as f32 - 3.0) / 8.0),
            wpe: None,
            layers: vec![],
            norm_f: NormParams {
                weight: tensor(&[3], |i| (i as f32 + 4.0) / 8.0),
                bias: Some(tensor(&[3], |i| (i as f32 - 1.0) / 16.0)),
            },
            lm_head: None,
            b_head: None,
        }
    }

    /// `grad(t, k, n)` for every tensor `k` of [`tiny_params`] at step `t` (from 1).
    pub fn tiny_grads(t: usize) -> Params {
        grads_like(&tiny_params(), t)
    }

    /// `grad(t, k, n)` for every tensor `k` of `p`'s layout at step `t`.
    pub fn grads_like(p: &Params, t: usize) -> Params {
        let mut g = p.clone();
        for (k, (_, x)) in g.named_mut().into_iter().enumerate() {
            for (i, v) in x.data.iter_mut().enumerate() {
                *v = ((i * 7 + t * 3 + k * 5) % 11) as f32 / 64.0 - 5.0 / 64.0;
            }
        }
        g
    }

    /// Parameters after each of five steps with [`LRS`], flattened in canonical order (`run(...)` above).
    pub fn trajectory(cfg: OptimizerConfig) -> Vec<Vec<f32>> {
        trajectory_from(cfg, tiny_params())
    }

    /// [`trajectory`] from other initial parameters (`run(..., init=...)`).
    pub fn trajectory_from(cfg: OptimizerConfig, mut p: Params) -> Vec<Vec<f32>> {
        let mut opt = Optimizer::new(cfg, &p);
        (1..=5)
            .map(|t| {
                let g = grads_like(&p, t);
                opt.step(&mut p, &g, LRS[t - 1]);
                p.named().iter().flat_map(|(_, x)| x.data.iter().copied()).collect()
            })
            .collect()
    }

    /// Every value within `rel` of torch's, relative to `max(|want|, 1e-3)` (values cross zero).
    /// `rel = 0` asks for identical bits.
    #[track_caller]
    pub fn assert_trajectory(what: &str, got: &[Vec<f32>], want: &[[f32; 12]; 5], rel: f64) {
        for (step, (g, w)) in got.iter().zip(want).enumerate() {
            for (i, (&g, &w)) in g.iter().zip(w).enumerate() {
                let err = (g as f64 - w as f64).abs() / (w as f64).abs().max(1e-3);
                let ok = if rel == 0.0 { g.to_bits() == w.to_bits() } else { err <= rel };
                assert!(ok, "{what}: step {} element {i}: got {g:e}, torch {w:e} (error {err:.2e})", step + 1);
            }
        }
    }

    /// SplitMix64 values uniform in `[-scale, scale)`, for tests that need many numbers.
    pub fn fill(data: &mut [f32], seed: u64, scale: f32) {
        let mut s = seed ^ 0x9E37_79B9_7F4A_7C15;
        for v in data {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            *v = ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::fill;
    use super::*;
    use crate::config::{DecoderConfig, Dims, NormKind};

    /// A GPT-2-like decoder (LayerNorm, biases, learned positions) small enough for tests, whose `wte`
    /// spans several chunks so that steps run in parallel.
    fn gpt2_tiny() -> DecoderConfig {
        DecoderConfig::gpt2(Dims {
            vocab_size: 700,
            hidden: 64,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 4,
            head_dim: 16,
            ffn_hidden: 256,
            max_positions: 32,
        })
    }

    fn random_params(cfg: &DecoderConfig, seed: u64, scale: f32) -> Params {
        let mut p = Params::zeros(cfg);
        for (k, (_, t)) in p.named_mut().into_iter().enumerate() {
            fill(&mut t.data, seed * 1000 + k as u64, scale);
        }
        p
    }

    fn configs() -> Vec<OptimizerConfig> {
        vec![
            OptimizerConfig::adamw().with_weight_decay(0.1),
            OptimizerConfig::rmsprop(),
            OptimizerConfig::RmsProp { alpha: 0.99, eps: 1e-8, weight_decay: 0.01, momentum: 0.9 },
            OptimizerConfig::sgd(),
            OptimizerConfig::Sgd { momentum: 0.9, weight_decay: 0.01 },
        ]
    }

    /// `steps` steps from `opt`, gradient `t` drawn from seed `t`.
    fn run(opt: &mut Optimizer, p: &mut Params, cfg: &DecoderConfig, steps: std::ops::Range<u64>) {
        for t in steps {
            let g = random_params(cfg, 100 + t, 0.05);
            opt.step(p, &g, 1e-3 * (1.0 + t as f64));
        }
    }

    #[test]
    fn weight_decay_skips_biases_and_norm_weights_by_name() {
        // HF Trainer decays no parameter named like a bias or a norm; in canonical names those are the norms
        // (`norm1`, `norm2`, `norm_f`) and the biases (`.bias`, `b_*`), and exactly the 1-D tensors.
        let hf_rule = |name: &str| {
            let last = name.rsplit('.').next().unwrap_or(name);
            !(name.contains("norm") || last == "bias" || last.starts_with("b_"))
        };
        let llama = DecoderConfig { norm: NormKind::RmsNorm { eps: 1e-5 }, tied_embeddings: false, ..gpt2_tiny() };
        for cfg in [gpt2_tiny(), llama] {
            let p = Params::zeros(&cfg);
            for (name, t) in p.named() {
                assert_eq!(applies_weight_decay(&t.shape), hf_rule(&name), "{name} {:?}", t.shape);
            }
            let decayed: Vec<String> =
                p.named().into_iter().filter(|(_, t)| applies_weight_decay(&t.shape)).map(|(n, _)| n).collect();
            assert!(decayed.iter().any(|n| n == "wte") && decayed.iter().any(|n| n == "layers.1.w_out"));
        }
        let names: Vec<String> = Params::zeros(&gpt2_tiny()).named().into_iter().map(|(n, _)| n).collect();
        for n in ["wpe", "layers.0.b_qkv", "layers.0.norm1.weight", "norm_f.bias"] {
            assert!(names.iter().any(|x| x == n), "fixture lacks {n}");
        }
    }

    #[test]
    fn frozen_tensors_are_untouched_and_hold_no_state() {
        let cfg = gpt2_tiny();
        let p0 = random_params(&cfg, 1, 0.5);
        for ocfg in configs() {
            let mut p = p0.clone();
            let mut opt = Optimizer::with_trainable(ocfg.clone(), &p, |n| n.starts_with("layers.1."));
            run(&mut opt, &mut p, &cfg, 0..2);
            for ((name, before), (_, after)) in p0.named().into_iter().zip(p.named()) {
                assert_eq!(before == after, !name.starts_with("layers.1."), "{} {name}", ocfg.name());
            }
            assert!(opt.trained().all(|n| n.starts_with("layers.1.")));
            assert!(opt.state().buffers.iter().all(|(n, _)| n.contains(".layers.1.")));
        }
    }

    #[test]
    fn restored_state_continues_bit_for_bit() {
        let cfg = gpt2_tiny();
        let p0 = random_params(&cfg, 2, 0.5);
        for ocfg in configs() {
            let mut p_straight = p0.clone();
            let mut straight = Optimizer::new(ocfg.clone(), &p_straight);
            run(&mut straight, &mut p_straight, &cfg, 0..5);

            let mut p = p0.clone();
            let mut first = Optimizer::new(ocfg.clone(), &p);
            run(&mut first, &mut p, &cfg, 0..3);
            let state = first.state();
            assert_eq!(state.steps, 3);
            drop(first);
            let mut resumed = Optimizer::restore(ocfg.clone(), &p, state).expect("restore");
            assert_eq!(resumed.steps_taken(), 3);
            run(&mut resumed, &mut p, &cfg, 3..5);

            assert!(p == p_straight, "{ocfg:?}: resumed parameters differ");
            assert!(resumed.state() == straight.state(), "{ocfg:?}: resumed state differs");
        }
    }

    #[test]
    fn state_names_follow_torch() {
        let p = test_util::tiny_params();
        let names =
            |cfg| -> Vec<String> { Optimizer::new(cfg, &p).state().buffers.into_iter().map(|(n, _)| n).collect() };
        assert_eq!(
            names(OptimizerConfig::adamw()),
            [
                "exp_avg.wte",
                "exp_avg.norm_f.weight",
                "exp_avg.norm_f.bias",
                "exp_avg_sq.wte",
                "exp_avg_sq.norm_f.weight",
                "exp_avg_sq.norm_f.bias"
            ]
        );
        let rms_momentum = OptimizerConfig::RmsProp { alpha: 0.99, eps: 1e-8, weight_decay: 0.0, momentum: 0.5 };
        assert_eq!(names(rms_momentum).len(), 6);
        assert_eq!(names(OptimizerConfig::rmsprop())[0], "square_avg.wte");
        assert!(names(OptimizerConfig::sgd()).is_empty());
        assert_eq!(names(OptimizerConfig::Sgd { momentum: 0.9, weight_decay: 0.0 })[2], "momentum_buffer.norm_f.bias");
    }

    #[test]
    fn restore_names_every_mismatch() {
        let p = test_util::tiny_params();
        let cfg = OptimizerConfig::adamw();
        let good = Optimizer::new(cfg.clone(), &p).state();
        let restore = |f: &dyn Fn(&mut OptimizerState)| {
            let mut s = good.clone();
            f(&mut s);
            Optimizer::restore(cfg.clone(), &p, s).err()
        };
        assert_eq!(restore(&|_| {}), None);

        let err = restore(&|s| s.buffers.retain(|(n, _)| n != "exp_avg_sq.norm_f.weight")).unwrap();
        assert_eq!(err, OptimError::Missing("exp_avg_sq.norm_f.weight".into()));

        let err = restore(&|s| s.buffers[0].1 = Tensor::zeros(&[3, 2])).unwrap();
        assert_eq!(err, OptimError::Shape { name: "exp_avg.wte".into(), got: vec![3, 2], want: vec![2, 3] });
        assert!(err.to_string().contains("`exp_avg.wte`"), "{err}");

        let err = restore(&|s| {
            s.buffers[1].1.data.pop();
        })
        .unwrap();
        assert!(matches!(err, OptimError::Length { ref name, len: 2, .. } if name == "exp_avg.norm_f.weight"));

        let err = restore(&|s| s.buffers.push(("exp_avg.lm_head".into(), Tensor::zeros(&[2, 3])))).unwrap();
        assert_eq!(err, OptimError::Unexpected("exp_avg.lm_head".into(), "adamw"));

        let err = restore(&|s| {
            let dup = s.buffers[2].clone();
            s.buffers.push(dup)
        })
        .unwrap();
        assert_eq!(err, OptimError::Duplicate("exp_avg.norm_f.bias".into()));

        // A state of all tensors does not fit an optimizer that trains some of them, and vice versa.
        let only_wte = |n: &str| n == "wte";
        let err = Optimizer::restore_with_trainable(cfg.clone(), &p, only_wte, good.clone()).err().unwrap();
        assert!(matches!(err, OptimError::Unexpected(..)), "{err}");
        let partial = Optimizer::with_trainable(cfg.clone(), &p, only_wte).state();
        let err = Optimizer::restore(cfg.clone(), &p, partial.clone()).err().unwrap();
        assert_eq!(err, OptimError::Missing("exp_avg.norm_f.weight".into()));
        assert!(Optimizer::restore_with_trainable(cfg, &p, only_wte, partial).is_ok());
    }

    #[test]
    fn steps_are_identical_on_one_and_two_threads() {
        let cfg = gpt2_tiny();
        assert!(Params::zeros(&cfg).wte.numel() > 2 * CHUNK, "wte must span several chunks");
        let p0 = random_params(&cfg, 3, 0.5);
        for ocfg in configs() {
            let on = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
                pool.install(|| {
                    let mut p = p0.clone();
                    let mut opt = Optimizer::new(ocfg.clone(), &p);
                    run(&mut opt, &mut p, &cfg, 0..3);
                    let mut g = random_params(&cfg, 7, 3.0);
                    let norm = clip_grad_norm(&mut g, 1.0);
                    (p, opt.state(), norm, g)
                })
            };
            let (one, two) = (on(1), on(2));
            assert!(one.0 == two.0 && one.1 == two.1, "{ocfg:?}: params or state depend on the thread count");
            assert_eq!(one.2.to_bits(), two.2.to_bits(), "grad norm depends on the thread count");
            assert!(one.3 == two.3, "clipped grads depend on the thread count");
        }
    }
}
