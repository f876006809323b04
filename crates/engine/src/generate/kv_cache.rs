//! The key/value cache of a sequence being decoded.

use crate::config::DecoderConfig;

/// Keys and values of one layer after rotary: `k`, `v: [len, n_kv_heads * head_dim]`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerCache {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// The key/value cache of one sequence: every position it has seen, every layer.
#[derive(Clone, Debug, PartialEq)]
pub struct KvCache {
    pub layers: Vec<LayerCache>,
    len: usize,
    kv_dim: usize,
}

impl KvCache {
    /// An empty cache with room for `capacity` positions.
    pub fn new(cfg: &DecoderConfig, capacity: usize) -> Self {
        let kv_dim = cfg.n_kv_heads * cfg.head_dim;
        let layer =
            || LayerCache { k: Vec::with_capacity(capacity * kv_dim), v: Vec::with_capacity(capacity * kv_dim) };
        KvCache { layers: (0..cfg.n_layers).map(|_| layer()).collect(), len: 0, kv_dim }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Takes the length from the keys held (after a block appended to every layer).
    pub(super) fn sync_len(&mut self) {
        self.len = self.layers[0].k.len() / self.kv_dim;
    }

    /// A copy with room for `capacity` positions (a plain `clone` keeps only the current length).
    pub fn clone_with_capacity(&self, capacity: usize) -> Self {
        let n = capacity.max(self.len) * self.kv_dim;
        let copy = |src: &Vec<f32>| {
            let mut v = Vec::with_capacity(n);
            v.extend_from_slice(src);
            v
        };
        KvCache {
            layers: self.layers.iter().map(|l| LayerCache { k: copy(&l.k), v: copy(&l.v) }).collect(),
            len: self.len,
            kv_dim: self.kv_dim,
        }
    }
}
