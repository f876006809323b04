//! Parameters (and, with the same layout, their gradients) of one decoder.
//!
//! Every tensor is a flat row-major `Vec<f32>`. Linear weights are stored `[out, in]` (PyTorch's
//! `nn.Linear` layout) so that `y = x W^T`. The q/k/v projections are fused into one `[qkv_dim, d]`
//! matrix (rows: all query heads, then key heads, then value heads) and SwiGLU's gate and up projections
//! into one `[2 ff, d]` matrix, so each is one GEMM; `crates/hf` splits and joins HF tensors accordingly.

use crate::config::{DecoderConfig, NormKind, PositionKind};

/// A named, shaped, flat f32 buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn zeros(shape: &[usize]) -> Self {
        let n = shape.iter().product();
        Tensor { shape: shape.to_vec(), data: vec![0.0; n] }
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

/// A norm's scale and (LayerNorm only) shift.
#[derive(Clone, Debug, PartialEq)]
pub struct NormParams {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LayerParams {
    pub norm1: NormParams,
    /// `[qkv_dim, d]`
    pub w_qkv: Tensor,
    /// `[qkv_dim]`
    pub b_qkv: Option<Tensor>,
    /// `[hd]` per-head query norm (`qk_norm` only)
    pub q_norm: Option<Tensor>,
    /// `[hd]` per-head key norm (`qk_norm` only)
    pub k_norm: Option<Tensor>,
    /// `[d, n_heads * hd]`
    pub w_o: Tensor,
    pub b_o: Option<Tensor>,
    /// The MLP's norm; `None` when it shares `norm1` (`shared_norm`, GPT-J)
    pub norm2: Option<NormParams>,
    /// Norm of the attention output before the residual add (`post_norms`, Gemma)
    pub post_attn_norm: Option<NormParams>,
    /// Norm of the MLP output before the residual add (`post_norms`, Gemma)
    pub post_mlp_norm: Option<NormParams>,
    /// `[ff, d]` or `[2 ff, d]` for SwiGLU (gate rows, then up rows)
    pub w_in: Tensor,
    pub b_in: Option<Tensor>,
    /// `[d, ff]`
    pub w_out: Tensor,
    pub b_out: Option<Tensor>,
}

/// All parameters of a decoder; also used, zero-initialised, as the gradient accumulator.
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    /// `[vocab, d]`
    pub wte: Tensor,
    /// `[max_positions, d]`, learned positions only
    pub wpe: Option<Tensor>,
    pub layers: Vec<LayerParams>,
    pub norm_f: NormParams,
    /// `[vocab, d]`; `None` when the head is tied to `wte`
    pub lm_head: Option<Tensor>,
    /// `[vocab]` bias of the LM head (`head_bias`, GPT-J)
    pub b_head: Option<Tensor>,
}

impl LayerParams {
    /// The norm the MLP reads: `norm2`, or `norm1` when the two are shared.
    pub fn mlp_norm(&self) -> &NormParams {
        self.norm2.as_ref().unwrap_or(&self.norm1)
    }

    /// Mutable [`LayerParams::mlp_norm`] (in a gradient buffer: where the MLP's norm gradient goes).
    pub fn mlp_norm_mut(&mut self) -> &mut NormParams {
        self.norm2.as_mut().unwrap_or(&mut self.norm1)
    }
}

fn norm_zeros(cfg: &DecoderConfig) -> NormParams {
    let d = cfg.hidden;
    NormParams {
        weight: Tensor::zeros(&[d]),
        bias: match cfg.norm {
            NormKind::LayerNorm { .. } => Some(Tensor::zeros(&[d])),
            NormKind::RmsNorm { .. } | NormKind::RmsNormUnitOffset { .. } => None,
        },
    }
}

fn opt(on: bool, shape: &[usize]) -> Option<Tensor> {
    on.then(|| Tensor::zeros(shape))
}

impl Params {
    /// All-zero parameters with the shapes `cfg` implies (a gradient buffer, or a target to load into).
    pub fn zeros(cfg: &DecoderConfig) -> Self {
        let (d, v) = (cfg.hidden, cfg.vocab_size);
        let layer = || LayerParams {
            norm1: norm_zeros(cfg),
            w_qkv: Tensor::zeros(&[cfg.qkv_dim(), d]),
            b_qkv: opt(cfg.qkv_bias, &[cfg.qkv_dim()]),
            q_norm: opt(cfg.qk_norm, &[cfg.head_dim]),
            k_norm: opt(cfg.qk_norm, &[cfg.head_dim]),
            w_o: Tensor::zeros(&[d, cfg.attn_dim()]),
            b_o: opt(cfg.attn_out_bias, &[d]),
            norm2: (!cfg.shared_norm).then(|| norm_zeros(cfg)),
            post_attn_norm: cfg.post_norms.then(|| norm_zeros(cfg)),
            post_mlp_norm: cfg.post_norms.then(|| norm_zeros(cfg)),
            w_in: Tensor::zeros(&[cfg.mlp_in_dim(), d]),
            b_in: opt(cfg.mlp_bias, &[cfg.mlp_in_dim()]),
            w_out: Tensor::zeros(&[d, cfg.ffn_hidden]),
            b_out: opt(cfg.mlp_bias, &[d]),
        };
        Params {
            wte: Tensor::zeros(&[v, d]),
            wpe: opt(matches!(cfg.positions, PositionKind::Learned), &[cfg.max_positions, d]),
            layers: (0..cfg.n_layers).map(|_| layer()).collect(),
            norm_f: norm_zeros(cfg),
            lm_head: opt(!cfg.tied_embeddings, &[v, d]),
            b_head: opt(cfg.head_bias, &[v]),
        }
    }

    /// Weights of the LM head: `lm_head`, or `wte` when tied.
    pub fn head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.wte)
    }

    /// Every tensor with its canonical name, in a fixed order (the order of optimizer state and checkpoints).
    pub fn named(&self) -> Vec<(String, &Tensor)> {
        let mut out = Vec::new();
        visit(self, &mut |name, t| out.push((name, t)));
        out
    }

    /// Mutable counterpart of [`Params::named`], same order.
    pub fn named_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut out = Vec::new();
        visit_mut(self, &mut |name, t| out.push((name, t)));
        out
    }

    pub fn numel(&self) -> usize {
        ParamSet::numel(self)
    }

    /// Sets every value to zero, keeping the allocations (gradient buffers between steps).
    pub fn fill_zero(&mut self) {
        ParamSet::fill_zero(self)
    }
}

/// Named tensors that an optimizer, gradient clipping, the non-finite check and checkpoints work on,
/// whoever owns them: a decoder's [`Params`], a [`crate::ScalarHead`], or two sets side by side as a pair
/// `(A, B)` (A's tensors, then B's; `(&mut trunk, &mut head)` borrows two sets as one). This is llm.c's
/// one parameter view and candle's `Optimizer::new(vars)`.
///
/// Names are unique within a set and the order is fixed: together they key optimizer state and
/// checkpoints. A gradient buffer is a set of the same layout.
pub trait ParamSet {
    /// Every tensor with its name, in the set's fixed order.
    fn named(&self) -> Vec<(String, &Tensor)>;

    /// Mutable counterpart of [`ParamSet::named`], same order.
    fn named_mut(&mut self) -> Vec<(String, &mut Tensor)>;

    /// Values in all tensors.
    fn numel(&self) -> usize {
        self.named().iter().map(|(_, t)| t.numel()).sum()
    }

    /// Sets every value to zero, keeping the allocations (gradient buffers between steps).
    fn fill_zero(&mut self) {
        for (_, t) in self.named_mut() {
            t.data.iter_mut().for_each(|x| *x = 0.0);
        }
    }
}

impl ParamSet for Params {
    fn named(&self) -> Vec<(String, &Tensor)> {
        Params::named(self)
    }

    fn named_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        Params::named_mut(self)
    }
}

impl<A: ParamSet, B: ParamSet> ParamSet for (A, B) {
    fn named(&self) -> Vec<(String, &Tensor)> {
        let mut out = self.0.named();
        out.extend(self.1.named());
        out
    }

    fn named_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut out = self.0.named_mut();
        out.extend(self.1.named_mut());
        out
    }
}

impl<T: ParamSet + ?Sized> ParamSet for &mut T {
    fn named(&self) -> Vec<(String, &Tensor)> {
        (**self).named()
    }

    fn named_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        (**self).named_mut()
    }
}

/// Canonical names: `wte`, `wpe`, `layers.{i}.{norm1.weight,..,w_qkv,b_qkv,q_norm.weight,k_norm.weight,w_o,b_o,norm2..,post_attn_norm..,post_mlp_norm..,w_in,b_in,w_out,b_out}`,
/// `norm_f.weight`, `norm_f.bias`, `lm_head`, `b_head`.
macro_rules! visit_impl {
    ($name:ident, $($m:tt)*) => {
        fn $name<'a>(p: &'a $($m)* Params, f: &mut dyn FnMut(String, &'a $($m)* Tensor)) {
            fn norm<'a>(pre: &str, n: &'a $($m)* NormParams, f: &mut dyn FnMut(String, &'a $($m)* Tensor)) {
                f(format!("{pre}.weight"), & $($m)* n.weight);
                if let Some(b) = & $($m)* n.bias {
                    f(format!("{pre}.bias"), b);
                }
            }
            fn o<'a>(name: String, t: &'a $($m)* Option<Tensor>, f: &mut dyn FnMut(String, &'a $($m)* Tensor)) {
                if let Some(t) = t {
                    f(name, t);
                }
            }
            f("wte".into(), & $($m)* p.wte);
            o("wpe".into(), & $($m)* p.wpe, f);
            for (i, l) in (& $($m)* p.layers).into_iter().enumerate() {
                let pre = format!("layers.{i}");
                norm(&format!("{pre}.norm1"), & $($m)* l.norm1, f);
                f(format!("{pre}.w_qkv"), & $($m)* l.w_qkv);
                o(format!("{pre}.b_qkv"), & $($m)* l.b_qkv, f);
                o(format!("{pre}.q_norm.weight"), & $($m)* l.q_norm, f);
                o(format!("{pre}.k_norm.weight"), & $($m)* l.k_norm, f);
                f(format!("{pre}.w_o"), & $($m)* l.w_o);
                o(format!("{pre}.b_o"), & $($m)* l.b_o, f);
                if let Some(n2) = & $($m)* l.norm2 {
                    norm(&format!("{pre}.norm2"), n2, f);
                }
                if let Some(n) = & $($m)* l.post_attn_norm {
                    norm(&format!("{pre}.post_attn_norm"), n, f);
                }
                if let Some(n) = & $($m)* l.post_mlp_norm {
                    norm(&format!("{pre}.post_mlp_norm"), n, f);
                }
                f(format!("{pre}.w_in"), & $($m)* l.w_in);
                o(format!("{pre}.b_in"), & $($m)* l.b_in, f);
                f(format!("{pre}.w_out"), & $($m)* l.w_out);
                o(format!("{pre}.b_out"), & $($m)* l.b_out, f);
            }
            norm("norm_f", & $($m)* p.norm_f, f);
            o("lm_head".into(), & $($m)* p.lm_head, f);
            o("b_head".into(), & $($m)* p.b_head, f);
        }
    };
}
visit_impl!(visit,);
visit_impl!(visit_mut, mut);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::*;

    fn tiny() -> DecoderConfig {
        DecoderConfig {
            qkv_bias: true,
            tied_embeddings: true,
            ..DecoderConfig::llama(Dims {
                vocab_size: 10,
                hidden: 8,
                n_layers: 2,
                n_heads: 2,
                n_kv_heads: 1,
                head_dim: 4,
                ffn_hidden: 12,
                max_positions: 16,
            })
        }
    }

    #[test]
    fn shapes_follow_the_config() {
        let p = Params::zeros(&tiny());
        assert_eq!(p.layers[0].w_qkv.shape, vec![16, 8]);
        assert_eq!(p.layers[0].w_in.shape, vec![24, 8]);
        assert!(p.lm_head.is_none() && p.wpe.is_none());
        let names: Vec<String> = p.named().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names.first().unwrap(), "wte");
        assert!(names.contains(&"layers.1.b_qkv".to_string()));
        assert_eq!(names.len(), 1 + 2 * 7 + 1);
        assert_eq!(p.numel(), 10 * 8 + 2 * (8 + 16 * 8 + 16 + 8 * 8 + 8 + 24 * 8 + 8 * 12) + 8);
    }
}
