//! Key/value cache for incremental decoding: per layer, the keys and values of all positions
//! seen so far, before GQA head repetition.
//!
//! # Shapes
//! - keys and values `[batch, kv_heads, seen, head_dim]`.

use burn::tensor::Tensor;

/// Cached keys and values of one layer.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    kv: Option<(Tensor<4>, Tensor<4>)>,
}

impl LayerCache {
    /// Appends this step's keys and values and returns all of them.
    pub fn append(&mut self, k: Tensor<4>, v: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let (k, v) = match self.kv.take() {
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
            None => (k, v),
        };
        self.kv = Some((k.clone(), v.clone()));
        (k, v)
    }

    /// This cache (of one row) as `n` identical rows.
    pub fn repeat(&self, n: usize) -> LayerCache {
        LayerCache {
            kv: self
                .kv
                .as_ref()
                .map(|(k, v)| (k.clone().repeat_dim(0, n), v.clone().repeat_dim(0, n))),
        }
    }
}

/// The cache of a whole model.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// One entry per decoder block.
    pub layers: Vec<LayerCache>,
    /// Number of positions already in the cache.
    pub seen: usize,
}

impl KvCache {
    /// An empty cache for `layers` blocks.
    pub fn new(layers: usize) -> Self {
        KvCache {
            layers: vec![LayerCache::default(); layers],
            seen: 0,
        }
    }
}
