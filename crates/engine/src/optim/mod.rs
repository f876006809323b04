//! Optimizers (AdamW, RMSprop, SGD), gradient clipping and learning-rate schedules, with PyTorch's
//! arithmetic element for element.
//!
//! Every update is the one `torch.optim` performs on f32 tensors, in the same order of operations and with
//! the same fused multiply-adds, and every scalar (bias corrections, `1 - lr * wd`, step sizes) is computed
//! in f64 and rounded to f32 once, as Python floats are. The per-optimizer files say which torch code path
//! they reproduce and how closely (AdamW and SGD bit for bit; RMSprop to torch's square root, which is MKL's
//! and not correctly rounded).
//!
//! The optimizer works on a [`ParamSet`] (a decoder's parameters, a scalar head, or both as one set) and
//! holds state only for the tensors it was given ([`Optimizer::with_trainable`]); frozen tensors are
//! neither read nor written. Weight decay follows HF Trainer: biases and norm weights (every
//! 1-D tensor) never decay, matrices and embeddings do ([`applies_weight_decay`]).
//!
//! Updates are elementwise, so splitting a tensor into chunks for rayon cannot change a result: a step is
//! bit-identical on any number of threads.

mod adamw;
mod clip;
mod rmsprop;
pub mod schedule;
mod sgd;

pub use clip::{clip_coefficient, clip_grad_norm, global_grad_norm, grads_finite};
pub use schedule::{lr_at, ScheduleKind, UnknownSchedule};

use crate::pages;
use crate::params::{ParamSet, Tensor};
use rayon::prelude::*;

/// Elements per parallel task; tensors up to this size are updated on the calling thread.
const CHUNK: usize = 1 << 14;

/// Defines `fn $name(args)` whose body is compiled three times, for the x86-64 baseline, for AVX2+FMA and
/// for AVX-512, and picks the widest the CPU has at run time (same bits: elementwise updates, and
/// `mul_add` is fused whatever the width). The updates use `f32::mul_add` where torch's kernels
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
            #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
            unsafe fn widest($($arg: $ty),*) {
                inner($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the running CPU has the features `widest` was compiled for.
                return unsafe { widest($($arg),*) };
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

    /// Floats of optimizer state per trained parameter (AdamW 2, RMSprop 1 or 2, SGD 0 or 1).
    pub fn buffers(&self) -> usize {
        self.buffer_kinds().len()
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

/// One trained tensor: where it is in [`ParamSet::named`], whether it decays, and its buffers
/// (in the order of [`OptimizerConfig::buffer_kinds`]).
#[derive(Clone, Debug)]
struct Slot {
    name: String,
    index: usize,
    shape: Vec<usize>,
    decay: bool,
    buffers: Vec<Vec<f32>>,
}

/// An optimizer over (a chosen subset of) a parameter set.
#[derive(Clone, Debug)]
pub struct Optimizer {
    cfg: OptimizerConfig,
    slots: Vec<Slot>,
    steps: u64,
}

impl Optimizer {
    /// An optimizer that trains every tensor of `params`, with zeroed state.
    pub fn new(cfg: OptimizerConfig, params: &impl ParamSet) -> Self {
        Self::with_trainable(cfg, params, |_| true)
    }

    /// An optimizer that trains the tensors whose name `trainable` accepts; the others are frozen: never
    /// read, never written, and without state. Names must be unique (a programming error otherwise).
    pub fn with_trainable(cfg: OptimizerConfig, params: &impl ParamSet, trainable: impl Fn(&str) -> bool) -> Self {
        let kinds = cfg.buffers();
        let named = params.named();
        let mut seen = std::collections::HashSet::new();
        if let Some((name, _)) = named.iter().find(|(n, _)| !seen.insert(n.as_str())) {
            panic!("optimizer: the parameter set names `{name}` twice");
        }
        let slots = named
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
    pub fn restore(cfg: OptimizerConfig, params: &impl ParamSet, state: OptimizerState) -> Result<Self, OptimError> {
        Self::restore_with_trainable(cfg, params, |_| true, state)
    }

    /// Rebuilds a saved optimizer that trains the tensors `trainable` accepts. Every buffer those tensors
    /// need must be present once with the tensor's shape, and no other buffer may be; errors name it.
    pub fn restore_with_trainable(
        cfg: OptimizerConfig,
        params: &impl ParamSet,
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
        let buffers =
            self.buffers().map(|(name, shape, data)| (name, Tensor { shape: shape.to_vec(), data: data.to_vec() }));
        OptimizerState { steps: self.steps, buffers: buffers.collect() }
    }

    /// The buffers of [`Optimizer::state`], named and ordered as there, borrowed: what a checkpoint writes
    /// without copying the optimizer's state (two copies of the model for AdamW).
    pub fn buffers(&self) -> impl Iterator<Item = (String, &[usize], &[f32])> + '_ {
        self.cfg.buffer_kinds().iter().enumerate().flat_map(move |(k, kind)| {
            self.slots.iter().map(move |slot| (format!("{kind}.{}", slot.name), &slot.shape[..], &slot.buffers[k][..]))
        })
    }

    pub fn config(&self) -> &OptimizerConfig {
        &self.cfg
    }

    /// Optimizer steps taken so far (torch's `state["step"]`); the next step's bias correction uses one more.
    pub fn steps_taken(&self) -> u64 {
        self.steps
    }

    /// Names of the tensors this optimizer trains, in order.
    pub fn trained(&self) -> impl Iterator<Item = &str> {
        self.slots.iter().map(|s| s.name.as_str())
    }

    /// One update of every trained tensor of `params` from the same tensor of `grads` at learning rate `lr`
    /// (f64, as torch's `group["lr"]`: step sizes are formed in f64 and rounded once). `params` and `grads`
    /// must have the layout the optimizer was built for (a programming error otherwise, so it panics).
    /// Gradients are used as given: clip them and check them with [`grads_finite`] first.
    pub fn step<P: ParamSet + ?Sized, G: ParamSet + ?Sized>(&mut self, params: &mut P, grads: &G, lr: f64) {
        self.steps += 1;
        let (cfg, t) = (self.cfg.clone(), self.steps);
        let mut ps = params.named_mut();
        let gs = grads.named();
        assert_eq!(ps.len(), gs.len(), "optimizer step: params and grads have different layouts");
        for slot in &mut self.slots {
            let ((pname, p), (gname, g)) = (&mut ps[slot.index], &gs[slot.index]);
            slot.check(pname, p, gname, g);
            let (p, g) = (&mut p.data[..], &g.data[..]);
            // Buffers in the order of `buffer_kinds`; an absent one is an empty slice.
            let mut bufs = slot.buffers.iter_mut().map(|b| &mut b[..]);
            let (a, b) = (bufs.next().unwrap_or_default(), bufs.next().unwrap_or_default());
            update(&cfg, slot.decay, lr, t, p, g, a, b);
        }
    }

    /// [`Optimizer::step`] with the clipping before it and the zeroing after it in the same pass: each
    /// chunk of a gradient is multiplied by `coef` (when given: [`clip_coefficient`]'s, as
    /// [`clip_grad_norm`] would have scaled it), used for the update, then set to zero. The same bits as
    /// scaling, stepping and zeroing one after the other, in one pass over the gradients instead of three
    /// (each a read or write of the whole model: ~3% of a GPT-2 bf16 step). Gradients of tensors the
    /// optimizer does not train are zeroed too. A gradient on huge pages is zeroed by handing its pages
    /// back ([`pages::release`]: its blocks to the process's pool): it holds no memory until the next
    /// backward writes it.
    pub fn step_and_clear<P: ParamSet + ?Sized, G: ParamSet + ?Sized>(
        &mut self,
        params: &mut P,
        grads: &mut G,
        lr: f64,
        coef: Option<f32>,
    ) {
        self.steps += 1;
        #[cfg(target_os = "linux")]
        pages::pool::settle();
        let (cfg, t) = (self.cfg.clone(), self.steps);
        let mut ps = params.named_mut();
        let mut gs = grads.named_mut();
        assert_eq!(ps.len(), gs.len(), "optimizer step: params and grads have different layouts");
        let mut trained = vec![false; gs.len()];
        for slot in &mut self.slots {
            trained[slot.index] = true;
            let ((pname, p), (gname, g)) = (&mut ps[slot.index], &mut gs[slot.index]);
            slot.check(pname, p, gname, g);
            let (p, g) = (&mut p.data[..], &mut g.data[..]);
            let mut bufs = slot.buffers.iter_mut().map(|b| &mut b[..]);
            let (a, b) = (bufs.next().unwrap_or_default(), bufs.next().unwrap_or_default());
            let decay = slot.decay;
            // A gradient on huge pages hands its pages back after the update (`pages::release`);
            // any other is zeroed chunk by chunk as the update leaves it.
            let hand_back = pages::hands_back(g);
            for_chunks_mut(p, g, a, b, |p, g, a, b| {
                if let Some(coef) = coef {
                    g.iter_mut().for_each(|x| *x *= coef);
                }
                update(&cfg, decay, lr, t, p, g, a, b);
                if !hand_back {
                    g.fill(0.0);
                }
            });
            if hand_back {
                pages::release(g);
            }
        }
        for (_, g) in gs.iter_mut().zip(trained).filter(|(_, t)| !t).map(|(g, _)| g) {
            pages::release(&mut g.data);
        }
    }
}

impl Slot {
    /// Checks that `params`' tensor `pname` and `grads`' `gname` are this slot's, with its shape (a
    /// layout other than the optimizer was built for is a programming error: it panics).
    fn check(&self, pname: &str, p: &Tensor, gname: &str, g: &Tensor) {
        assert!(
            pname == self.name && gname == self.name && p.shape == self.shape && g.shape == self.shape,
            "optimizer step: tensor `{}` {:?} expected, params have `{pname}` {:?}, grads `{gname}` {:?}",
            self.name,
            self.shape,
            p.shape,
            g.shape
        );
    }
}

/// One update of `p` from `g` with the optimizer buffers `a` and `b` (empty where the optimizer has
/// fewer), for a tensor that decays or not, at step `t`. Element by element: any split of the slices
/// (at multiples of [`CHUNK`]) gives the same bits.
#[allow(clippy::too_many_arguments)]
fn update(cfg: &OptimizerConfig, decay: bool, lr: f64, t: u64, p: &mut [f32], g: &[f32], a: &mut [f32], b: &mut [f32]) {
    match *cfg {
        OptimizerConfig::AdamW { beta1, beta2, eps, weight_decay } => {
            let wd = if decay { weight_decay } else { 0.0 };
            adamw::update(p, g, a, b, &adamw::Scalars::new(beta1, beta2, eps, wd, lr, t));
        }
        OptimizerConfig::RmsProp { alpha, eps, weight_decay, momentum } => {
            let wd = if decay { weight_decay } else { 0.0 };
            rmsprop::update(p, g, a, b, &rmsprop::Scalars::new(alpha, eps, wd, momentum, lr));
        }
        OptimizerConfig::Sgd { momentum, weight_decay } => {
            let wd = if decay { weight_decay } else { 0.0 };
            sgd::update(p, g, a, &sgd::Scalars::new(momentum, wd, lr, t == 1));
        }
    }
}

/// [`for_chunks`] with the gradient writable (a fused step scales and zeroes it).
fn for_chunks_mut(
    p: &mut [f32],
    g: &mut [f32],
    a: &mut [f32],
    b: &mut [f32],
    f: impl Fn(&mut [f32], &mut [f32], &mut [f32], &mut [f32]) + Sync,
) {
    let n = g.len();
    zip_chunks(p, n, g.par_chunks_mut(CHUNK), a, b, f)
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
    if p.len() <= CHUNK {
        check_lengths(p.len(), g.len(), a, b);
        return f(p, g, a, b);
    }
    zip_chunks(p, g.len(), g.par_chunks(CHUNK), a, b, f)
}

/// `f` on the [`CHUNK`]-long pieces of `p`, of the gradient (`g`, `g_len` values, read or written) and of
/// the optimizer buffers `a` and `b` (or empty pieces where there is no such buffer), in parallel.
fn zip_chunks<G: IndexedParallelIterator>(
    p: &mut [f32],
    g_len: usize,
    g: G,
    a: &mut [f32],
    b: &mut [f32],
    f: impl Fn(&mut [f32], G::Item, &mut [f32], &mut [f32]) + Sync,
) {
    let n = p.len();
    check_lengths(n, g_len, a, b);
    let tasks = n.div_ceil(CHUNK);
    p.par_chunks_mut(CHUNK)
        .zip(g)
        .zip(split_chunks(a, tasks))
        .zip(split_chunks(b, tasks))
        .for_each(|(((p, g), a), b)| f(p, g, a, b));
}

/// The gradient and the optimizer buffers (or empty ones) are as long as the parameter: a layout other
/// than the optimizer was built for is a programming error.
fn check_lengths(n: usize, g_len: usize, a: &[f32], b: &[f32]) {
    assert!(g_len == n && (a.is_empty() || a.len() == n) && (b.is_empty() || b.len() == n));
}

/// `s` in chunks of [`CHUNK`], or `tasks` empty slices where the optimizer has no such buffer.
fn split_chunks(s: &mut [f32], tasks: usize) -> Vec<&mut [f32]> {
    if s.is_empty() {
        (0..tasks).map(|_| Default::default()).collect()
    } else {
        s.chunks_mut(CHUNK).collect()
    }
}

#[cfg(test)]
pub(crate) mod test_util;

#[cfg(test)]
mod tests;
