//! LoRA adapters (Hu et al., 2021) on the block's linear layers, in the engine's fused layout.
//!
//! ```text
//! y = x W^T + b + scale · (dropout(x) A^T) B^T      W: [out, in] frozen, A: [r, in], B: [rows, r]
//! ```
//! The engine fuses HF's projections (q/k/v into `w_qkv`, gate/up into `w_in`), so one HF module is a
//! block of rows of one fused weight: `q_proj` is rows `0..n_heads*hd` of [`Site::Qkv`], `up_proj` rows
//! `ff..2ff` of [`Site::MlpIn`], GPT-2's `c_attn` all of [`Site::Qkv`]. A [`LoraPair`] is one HF module's
//! adapter: it adds `scale · B A` to its rows only. `B`'s rows are in the engine's row order (`crates/hf`
//! permutes them where it permutes the weight's rows, e.g. GPT-NeoX's interleaved heads).
//!
//! An [`Adapter`] is a [`ParamSet`]: the optimizer, clipping, the non-finite check and checkpoints work
//! on it as on [`crate::Params`]; its gradient buffer is [`Adapter::zeros_like`].

use std::ops::Range;

use crate::config::DecoderConfig;
use crate::params::{ParamSet, Params, Tensor};
use crate::rng::Rng;

/// One of the four projections of a block, in the engine's fused layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Site {
    /// `w_qkv` `[qkv_dim, d]`
    Qkv,
    /// `w_o` `[d, attn_dim]`
    AttnOut,
    /// `w_in` `[mlp_in, d]` (gate rows, then up rows when gated)
    MlpIn,
    /// `w_out` `[d, ff]`
    MlpOut,
}

impl Site {
    pub const ALL: [Site; 4] = [Site::Qkv, Site::AttnOut, Site::MlpIn, Site::MlpOut];

    /// `(in, out)` of the site's fused weight `[out, in]`.
    pub fn dims(self, cfg: &DecoderConfig) -> (usize, usize) {
        match self {
            Site::Qkv => (cfg.hidden, cfg.qkv_dim()),
            Site::AttnOut => (cfg.attn_dim(), cfg.hidden),
            Site::MlpIn => (cfg.hidden, cfg.mlp_in_dim()),
            Site::MlpOut => (cfg.ffn_hidden, cfg.hidden),
        }
    }

    /// The site's weight in a layer of `p`.
    pub fn weight(self, p: &crate::params::LayerParams) -> &Tensor {
        match self {
            Site::Qkv => &p.w_qkv,
            Site::AttnOut => &p.w_o,
            Site::MlpIn => &p.w_in,
            Site::MlpOut => &p.w_out,
        }
    }

    /// Mutable [`Site::weight`].
    pub fn weight_mut(self, p: &mut crate::params::LayerParams) -> &mut Tensor {
        match self {
            Site::Qkv => &mut p.w_qkv,
            Site::AttnOut => &mut p.w_o,
            Site::MlpIn => &mut p.w_in,
            Site::MlpOut => &mut p.w_out,
        }
    }
}

/// Where one HF module's adapter sits: which fused weight, which of its rows, at what rank and scale.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraTarget {
    /// The module's path inside a layer as HF names it (`self_attn.q_proj`, `attn.c_attn`, `mlp.fc_in`):
    /// the key of the pair in checkpoints and in PEFT files.
    pub module: String,
    pub site: Site,
    /// Rows of the site's fused weight this module owns.
    pub rows: Range<usize>,
    pub r: usize,
    /// `alpha / r` (or `alpha / sqrt(r)` with rsLoRA).
    pub scale: f32,
}

/// One module's low-rank update `ΔW[rows] = scale · B A`.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraPair {
    pub target: LoraTarget,
    /// `[r, in]`
    pub a: Tensor,
    /// `[rows.len(), r]`
    pub b: Tensor,
}

/// The pairs of one layer (any order; each module at most once).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerAdapter {
    pub pairs: Vec<LoraPair>,
}

/// LoRA adapters on a decoder, one [`LayerAdapter`] per layer.
#[derive(Clone, Debug, PartialEq)]
pub struct Adapter {
    /// Dropout on the adapter's input `x` while training (PEFT's `lora_dropout`); 0 disables it.
    pub dropout: f32,
    pub layers: Vec<LayerAdapter>,
}

impl Adapter {
    /// All-zero adapter with the pairs `targets[l]` on layer `l` (shapes from `cfg`).
    pub fn zeros(cfg: &DecoderConfig, targets: &[Vec<LoraTarget>], dropout: f32) -> Self {
        let layers = targets
            .iter()
            .map(|ts| LayerAdapter {
                pairs: ts
                    .iter()
                    .map(|t| {
                        let (inp, _) = t.site.dims(cfg);
                        LoraPair {
                            a: Tensor::zeros(&[t.r, inp]),
                            b: Tensor::zeros(&[t.rows.len(), t.r]),
                            target: t.clone(),
                        }
                    })
                    .collect(),
            })
            .collect();
        Adapter { dropout, layers }
    }

    /// A gradient buffer (or optimizer-moment buffer) of the same layout, all zero.
    pub fn zeros_like(&self) -> Self {
        let mut g = self.clone();
        ParamSet::fill_zero(&mut g);
        g
    }

    /// PEFT's default initialisation: `A` Kaiming-uniform with `a = sqrt(5)` (uniform in
    /// `±1/sqrt(in)`), `B` zero, so the adapted model starts equal to the base.
    pub fn init_peft(&mut self, rng: &mut Rng) {
        for pair in self.layers.iter_mut().flat_map(|l| l.pairs.iter_mut()) {
            let fan_in = pair.a.shape[1];
            let bound = 1.0 / (fan_in as f64).sqrt();
            pair.a.data.iter_mut().for_each(|v| *v = ((2.0 * rng.uniform() - 1.0) * bound) as f32);
            pair.b.data.iter_mut().for_each(|v| *v = 0.0);
        }
    }

    /// The pairs of layer `layer` on `site`.
    pub fn pairs_at(&self, layer: usize, site: Site) -> impl Iterator<Item = &LoraPair> {
        self.layers.get(layer).into_iter().flat_map(move |l| l.pairs.iter().filter(move |p| p.target.site == site))
    }

    /// Adds every pair's `scale · B A` to its rows of `p`'s fused weights (PEFT's `merge_and_unload`).
    /// Sums are taken in f64 and rounded once per weight element.
    pub fn merge_into(&self, p: &mut Params) {
        for (layer, lp) in p.layers.iter_mut().enumerate() {
            for site in Site::ALL {
                self.merge_site(layer, site, &mut site.weight_mut(lp).data);
            }
        }
    }

    /// [`Adapter::merge_into`] for one fused weight `w` (`site` of `layer`, `[out, in]` row-major): a
    /// merged model written a tensor (or a block of rows, [`Adapter::merge_site_rows`]) at a time never
    /// holds a second copy of the base.
    pub fn merge_site(&self, layer: usize, site: Site, w: &mut [f32]) {
        self.merge_site_rows(layer, site, 0, w);
    }

    /// [`Adapter::merge_site`] for rows `first..` of the fused weight alone (`w` holds whole rows, as
    /// many as fit): a weight written a block of rows at a time is merged a block at a time, with the
    /// same bits.
    pub fn merge_site_rows(&self, layer: usize, site: Site, first: usize, w: &mut [f32]) {
        for pair in self.pairs_at(layer, site) {
            let t = &pair.target;
            let inp = pair.a.data.len() / t.r.max(1); // A: [r, in]
            let rows = first..first + w.len() / inp.max(1);
            // The pair's rows of the fused weight that `w` holds.
            let (lo, hi) = (t.rows.start.max(rows.start), t.rows.end.min(rows.end));
            for row in lo..hi {
                let i = row - t.rows.start;
                let b_row = &pair.b.data[i * t.r..(i + 1) * t.r]; // [r]
                let w_row = &mut w[(row - first) * inp..(row - first + 1) * inp]; // [in]
                for (j, w) in w_row.iter_mut().enumerate() {
                    let delta: f64 =
                        b_row.iter().enumerate().map(|(k, &b)| b as f64 * pair.a.data[k * inp + j] as f64).sum();
                    *w = (*w as f64 + t.scale as f64 * delta) as f32;
                }
            }
        }
    }

    /// Whether any pair of `layer` sits on `site` (a weight there is changed by a merge).
    pub fn touches(&self, layer: usize, site: Site) -> bool {
        self.pairs_at(layer, site).next().is_some()
    }
}

impl ParamSet for Adapter {
    /// `layers.{i}.{module}.lora_A`, `layers.{i}.{module}.lora_B`, layer by layer in pair order.
    fn named(&self) -> Vec<(String, &Tensor)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            for p in &l.pairs {
                out.push((format!("layers.{i}.{}.lora_A", p.target.module), &p.a));
                out.push((format!("layers.{i}.{}.lora_B", p.target.module), &p.b));
            }
        }
        out
    }

    fn named_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            for p in &mut l.pairs {
                let module = &p.target.module;
                out.push((format!("layers.{i}.{module}.lora_A"), &mut p.a));
                out.push((format!("layers.{i}.{module}.lora_B"), &mut p.b));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dims;

    fn cfg() -> DecoderConfig {
        DecoderConfig::llama(Dims {
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

    fn q_and_up(cfg: &DecoderConfig) -> Vec<LoraTarget> {
        vec![
            LoraTarget { module: "self_attn.q_proj".into(), site: Site::Qkv, rows: 0..8, r: 2, scale: 4.0 },
            LoraTarget {
                module: "mlp.up_proj".into(),
                site: Site::MlpIn,
                rows: cfg.ffn_hidden..2 * cfg.ffn_hidden,
                r: 2,
                scale: 4.0,
            },
        ]
    }

    #[test]
    fn shapes_names_and_peft_init() {
        let c = cfg();
        let mut a = Adapter::zeros(&c, &[q_and_up(&c), vec![]], 0.0);
        a.init_peft(&mut Rng::new(1));
        let names: Vec<String> = a.named().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "layers.0.self_attn.q_proj.lora_A",
                "layers.0.self_attn.q_proj.lora_B",
                "layers.0.mlp.up_proj.lora_A",
                "layers.0.mlp.up_proj.lora_B"
            ]
        );
        let q = &a.layers[0].pairs[0];
        assert_eq!((q.a.shape.clone(), q.b.shape.clone()), (vec![2, 8], vec![8, 2]));
        let bound = 1.0 / 8f32.sqrt();
        assert!(q.a.data.iter().all(|v| v.abs() <= bound) && q.a.data.iter().any(|&v| v != 0.0));
        assert!(q.b.data.iter().all(|&v| v == 0.0));
        assert_eq!(a.pairs_at(0, Site::MlpIn).count(), 1);
        assert_eq!(a.pairs_at(1, Site::MlpIn).count(), 0);
    }

    #[test]
    fn merge_adds_scaled_b_a_to_the_module_rows_only() {
        let c = cfg();
        let mut a = Adapter::zeros(&c, &[q_and_up(&c), vec![]], 0.0);
        let up = &mut a.layers[0].pairs[1];
        up.a.data.iter_mut().enumerate().for_each(|(i, v)| *v = i as f32 * 0.01);
        up.b.data.iter_mut().enumerate().for_each(|(i, v)| *v = 1.0 - i as f32 * 0.1);
        let mut p = Params::zeros(&c);
        a.merge_into(&mut p);
        let w = &p.layers[0].w_in;
        let (d, ff) = (c.hidden, c.ffn_hidden);
        assert!(w.data[..ff * d].iter().all(|&v| v == 0.0), "gate rows untouched");
        let (row, col) = (3, 5);
        let up = &a.layers[0].pairs[1];
        let want = 4.0 * (up.b.data[row * 2] * up.a.data[col] + up.b.data[row * 2 + 1] * up.a.data[d + col]);
        assert!((w.data[(ff + row) * d + col] - want).abs() < 1e-6);
        assert!(p.layers[1].w_in.data.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn merging_a_block_of_rows_at_a_time_gives_the_whole_merges_bits() {
        let c = cfg();
        let mut a = Adapter::zeros(&c, &[q_and_up(&c), vec![]], 0.0);
        a.init_peft(&mut Rng::new(3));
        let mut rng = Rng::new(4);
        for p in a.layers.iter_mut().flat_map(|l| l.pairs.iter_mut()) {
            p.b.data.iter_mut().for_each(|v| *v = rng.uniform() as f32 - 0.5);
        }
        let mut whole = Params::zeros(&c);
        whole.layers[0].w_in.data.iter_mut().enumerate().for_each(|(i, v)| *v = (i % 7) as f32 * 0.1);
        let base = whole.layers[0].w_in.data.clone();
        a.merge_site(0, Site::MlpIn, &mut whole.layers[0].w_in.data);
        assert!(whole.layers[0].w_in.data != base && a.touches(0, Site::MlpIn) && !a.touches(1, Site::MlpIn));
        // Blocks of 5 rows: one straddles row 12, where the pair's rows start; the last is shorter.
        let d = c.hidden;
        let mut blocks = base.clone();
        for (k, block) in blocks.chunks_mut(5 * d).enumerate() {
            a.merge_site_rows(0, Site::MlpIn, 5 * k, block);
        }
        assert_eq!(blocks, whole.layers[0].w_in.data);
    }
}
