//! A frozen base's block linears in their storage: the four weights of every layer (`w_qkv`, `w_o`,
//! `w_in`, `w_out`: nearly all of a decoder's parameters) as [`Matrix`]es, beside a [`Params`] that keeps
//! the rest (embeddings, norms, biases, head) in f32. A pass reads them through
//! [`crate::Model::with_frozen`]; such a base has no weight gradients (QLoRA trains an adapter on it).

use crate::config::DecoderConfig;
use crate::lora::Site;
use crate::params::{Params, Tensor};
use crate::presets::init_random_each;

use std::collections::BTreeSet;

use super::{FrozenEmbedding, Lookups, Matrix, QuantError, Storage};

/// One layer's four block linears, `[out, in]` each as in [`crate::LayerParams`].
#[derive(Clone, Debug, PartialEq)]
pub struct FrozenLayer {
    matrices: [Matrix; 4],
}

impl FrozenLayer {
    /// A layer's four weights (`w_qkv`, `w_o`, `w_in`, `w_out`), e.g. stored by a loader one tensor at a
    /// time as it reads a checkpoint; [`FrozenLinears::check`] (run by every pass) checks their shapes.
    pub fn new(w_qkv: Matrix, w_o: Matrix, w_in: Matrix, w_out: Matrix) -> Self {
        FrozenLayer { matrices: [w_qkv, w_o, w_in, w_out] }
    }

    /// The weight at `site`.
    pub fn get(&self, site: Site) -> &Matrix {
        &self.matrices[site_index(site)]
    }

    pub fn bytes(&self) -> usize {
        self.matrices.iter().map(Matrix::bytes).sum()
    }
}

/// Every layer's block linears of a frozen base.
#[derive(Clone, Debug, PartialEq)]
pub struct FrozenLinears {
    layers: Vec<FrozenLayer>,
}

/// Why a base's linears cannot be stored, naming the tensor.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("layers.{layer}.{tensor}: {source}")]
pub struct FrozenError {
    pub layer: usize,
    pub tensor: &'static str,
    #[source]
    pub source: QuantError,
}

/// Where a layer keeps the matrix of `site` (`Site::ALL` order).
fn site_index(site: Site) -> usize {
    match site {
        Site::Qkv => 0,
        Site::AttnOut => 1,
        Site::MlpIn => 2,
        Site::MlpOut => 3,
    }
}

/// The layer and site of a block linear's [`Params::named`] name (`layers.3.w_in`), if it is one.
fn linear_of(name: &str) -> Option<(usize, Site)> {
    let (layer, tensor) = name.strip_prefix("layers.")?.split_once('.')?;
    let site = Site::ALL.into_iter().find(|&s| tensor_name(s) == tensor)?;
    Some((layer.parse().ok()?, site))
}

/// The [`Params::named`] name of `site`'s weight within a layer.
fn tensor_name(site: Site) -> &'static str {
    match site {
        Site::Qkv => "w_qkv",
        Site::AttnOut => "w_o",
        Site::MlpIn => "w_in",
        Site::MlpOut => "w_out",
    }
}

impl FrozenLinears {
    /// The linears of every layer, in order.
    pub fn new(layers: Vec<FrozenLayer>) -> Self {
        FrozenLinears { layers }
    }

    /// Moves the block linears of `base` into `storage`, layer by layer, leaving those tensors in `base`
    /// empty (their shape kept, no data): the f32 copies are freed as each is stored, so converting needs
    /// one f32 matrix beyond the result at a time.
    pub fn take_from(base: &mut Params, storage: Storage) -> Result<Self, FrozenError> {
        let mut layers = Vec::with_capacity(base.layers.len());
        for (l, lp) in base.layers.iter_mut().enumerate() {
            let mut take = |site: Site| {
                let t = site.weight_mut(lp);
                let (rows, cols) = match t.shape[..] {
                    [rows, cols] => (rows, cols),
                    _ => (t.shape.first().copied().unwrap_or(0), t.shape.iter().skip(1).product()),
                };
                let data = std::mem::take(&mut t.data);
                Matrix::new(data, rows, cols, storage).map_err(|source| FrozenError {
                    layer: l,
                    tensor: tensor_name(site),
                    source,
                })
            };
            let [a, b, c, d] = Site::ALL;
            let matrices = [take(a)?, take(b)?, take(c)?, take(d)?];
            layers.push(FrozenLayer { matrices });
        }
        Ok(FrozenLinears { layers })
    }

    /// A random base as [`crate::presets::init_random`] draws it (the same values), with its block linears
    /// stored as they are drawn: the f32 set never exists, so a model larger than memory in f32 can be
    /// built (the returned `Params` holds the rest; its linear tensors are empty).
    pub fn init_random(
        cfg: &DecoderConfig,
        std: f32,
        seed: u64,
        storage: Storage,
    ) -> Result<(Params, Self), FrozenError> {
        let (params, linears, _) = Self::init_random_with_tables(cfg, std, seed, storage, None)?;
        Ok((params, linears))
    }

    /// [`FrozenLinears::init_random`], with the token embedding and head kept as a [`FrozenEmbedding`]
    /// for the lookups of `tokens` when given (a bf16 LoRA run's base), made as each table is drawn: the
    /// two f32 tables are never held together (the returned `Params`' `wte` and `lm_head` are then empty).
    pub fn init_random_with_tables(
        cfg: &DecoderConfig,
        std: f32,
        seed: u64,
        storage: Storage,
        tokens: Option<&BTreeSet<u32>>,
    ) -> Result<(Params, Self, Option<FrozenEmbedding>), FrozenError> {
        let mut slots: Vec<[Option<Matrix>; 4]> = (0..cfg.n_layers).map(|_| Default::default()).collect();
        let mut failed = None;
        let (vocab, d) = (cfg.vocab_size, cfg.hidden);
        let (mut lookups, mut head) = (None, None);
        let table_error = |source| FrozenError { layer: 0, tensor: "token embedding or head", source };
        let mut params = init_random_each(cfg, std, seed, |name, t: &mut Tensor| {
            let Some((layer, site)) = linear_of(name) else {
                let result = match (name, tokens) {
                    ("wte", Some(tokens)) if !cfg.tied_embeddings => {
                        Lookups::of(&std::mem::take(&mut t.data), vocab, d, tokens).map(|l| lookups = Some(l))
                    }
                    ("lm_head", Some(_)) => {
                        Matrix::bf16_from(std::mem::take(&mut t.data), vocab, d).map(|h| head = Some(h))
                    }
                    _ => Ok(()),
                };
                if let Err(source) = result {
                    failed.get_or_insert(table_error(source));
                }
                return;
            };
            let (rows, cols) = (t.shape[0], t.shape[1]);
            match Matrix::new(std::mem::take(&mut t.data), rows, cols, storage) {
                Ok(m) => slots[layer][site_index(site)] = Some(m),
                Err(source) => {
                    failed.get_or_insert(FrozenError { layer, tensor: tensor_name(site), source });
                }
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
        let tables = match (tokens, lookups, head) {
            (None, _, _) => None,
            (Some(_), Some(l), Some(h)) => Some(FrozenEmbedding::from_parts(l, h).map_err(table_error)?),
            (Some(tokens), _, _) => {
                let wte = std::mem::take(&mut params.wte.data);
                Some(FrozenEmbedding::new(wte, None, vocab, d, tokens).map_err(table_error)?)
            }
        };
        let layers = slots
            .into_iter()
            .map(|ms| FrozenLayer { matrices: ms.map(|m| m.expect("Params::named lists every block linear")) })
            .collect();
        Ok((params, FrozenLinears { layers }, tables))
    }

    /// The layer and site of a block linear's [`Params::named`] name (`layers.3.w_in`); `None` for any
    /// other tensor (embeddings, norms, biases, head), which a stored base keeps in f32.
    pub fn linear_of(name: &str) -> Option<(usize, Site)> {
        linear_of(name)
    }

    /// Builds the linears from per-layer `[w_qkv, w_o, w_in, w_out]` slots a loader filled in any order;
    /// `None` when a slot is empty (names the first one).
    pub fn from_slots(slots: Vec<[Option<Matrix>; 4]>) -> Result<Self, String> {
        let mut layers = Vec::with_capacity(slots.len());
        for (l, ms) in slots.into_iter().enumerate() {
            if let Some(i) = ms.iter().position(Option::is_none) {
                return Err(format!("layers.{l}.{} was never stored", tensor_name(Site::ALL[i])));
            }
            layers.push(FrozenLayer { matrices: ms.map(|m| m.expect("checked above")) });
        }
        Ok(FrozenLinears { layers })
    }

    /// Where [`Self::from_slots`] expects `site`'s matrix.
    pub fn slot_of(site: Site) -> usize {
        site_index(site)
    }

    /// Bytes the block linears of `cfg` take in `storage`: the memory estimate, before anything is built.
    pub fn estimate_bytes(cfg: &DecoderConfig, storage: Storage) -> usize {
        let per_layer: usize = Site::ALL
            .iter()
            .map(|&site| {
                let (inp, out) = site.dims(cfg);
                storage.bytes(inp * out)
            })
            .sum();
        cfg.n_layers * per_layer
    }

    /// Widens the linears back into `base`'s (emptied) tensors: for merging or exporting.
    pub fn restore_into(&self, base: &mut Params) {
        for (lp, fl) in base.layers.iter_mut().zip(&self.layers) {
            for (site, m) in Site::ALL.iter().zip(&fl.matrices) {
                site.weight_mut(lp).data = m.to_f32();
            }
        }
    }

    pub fn layers(&self) -> &[FrozenLayer] {
        &self.layers
    }

    /// Bytes the linears occupy.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(FrozenLayer::bytes).sum()
    }

    /// Checks the layer count and every matrix's shape against `cfg`; the error names the tensor.
    pub fn check(&self, cfg: &DecoderConfig) -> Result<(), String> {
        if self.layers.len() != cfg.n_layers {
            return Err(format!("{} frozen layers for a model of {} layers", self.layers.len(), cfg.n_layers));
        }
        for (l, fl) in self.layers.iter().enumerate() {
            for (&site, m) in Site::ALL.iter().zip(&fl.matrices) {
                let (inp, out) = site.dims(cfg);
                if (m.rows(), m.cols()) != (out, inp) {
                    let name = tensor_name(site);
                    return Err(format!("layers.{l}.{name} is [{}, {}], want [{out}, {inp}]", m.rows(), m.cols()));
                }
            }
        }
        Ok(())
    }
}
