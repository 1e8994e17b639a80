//! Key/value cache for incremental decoding: per layer, the keys and values of all positions
//! seen so far, before GQA head repetition.
//!
//! # Shapes
//! - keys and values `[batch, kv_heads, seen, head_dim]`; rows of a stacked batch are
//!   left-padded with zeros to the same `seen` ([`KvCache::pads`] says how many per row).

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

    /// The caches of `parts` (one row each, all filled) as one batch: each repeated `n`
    /// times and left-padded with zeros to the longest, in order.
    pub fn stack(parts: &[&LayerCache], n: usize) -> LayerCache {
        let filled: Vec<&(Tensor<4>, Tensor<4>)> =
            parts.iter().filter_map(|p| p.kv.as_ref()).collect();
        if filled.len() != parts.len() || parts.is_empty() {
            return LayerCache::default();
        }
        let longest = filled.iter().map(|(k, _)| k.dims()[2]).max().unwrap_or(0);
        let pad = |t: &Tensor<4>| {
            let [b, h, len, d] = t.dims();
            let t = t.clone().repeat_dim(0, n);
            if len == longest {
                return t;
            }
            let zeros = Tensor::<4>::zeros([b * n, h, longest - len, d], (&t.device(), t.dtype()));
            Tensor::cat(vec![zeros, t], 2)
        };
        let (ks, vs): (Vec<_>, Vec<_>) = filled.iter().map(|(k, v)| (pad(k), pad(v))).unzip();
        LayerCache {
            kv: Some((Tensor::cat(ks, 0), Tensor::cat(vs, 0))),
        }
    }
}

/// The cache of a whole model.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// One entry per decoder block.
    pub layers: Vec<LayerCache>,
    /// Number of positions already in the cache (padding included).
    pub seen: usize,
    /// Per row, the leading positions that are padding, which no query sees (rows of
    /// different prompts decoded as one batch); empty when no row is padded.
    pub pads: Vec<usize>,
}

impl KvCache {
    /// An empty cache for `layers` blocks.
    pub fn new(layers: usize) -> Self {
        KvCache {
            layers: vec![LayerCache::default(); layers],
            seen: 0,
            pads: Vec::new(),
        }
    }

    /// `parts` (caches of one row each, every layer filled) as one batch of
    /// `parts.len()·n` rows: each repeated `n` times, in order, and left-padded to the longest
    /// (the padding recorded in [`KvCache::pads`]).
    pub fn stack(parts: &[&KvCache], n: usize) -> KvCache {
        let seen = parts.iter().map(|p| p.seen).max().unwrap_or(0);
        let layers = (0..parts.first().map_or(0, |p| p.layers.len()))
            .map(|l| {
                let of_layer: Vec<&LayerCache> = parts.iter().map(|p| &p.layers[l]).collect();
                LayerCache::stack(&of_layer, n)
            })
            .collect();
        let pads: Vec<usize> = parts
            .iter()
            .flat_map(|p| std::iter::repeat_n(seen - p.seen, n))
            .collect();
        KvCache {
            layers,
            seen,
            pads: if pads.iter().any(|&p| p > 0) {
                pads
            } else {
                Vec::new()
            },
        }
    }
}
