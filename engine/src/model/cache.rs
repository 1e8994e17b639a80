//! Key/value cache for incremental decoding on the host: per layer, the keys and values of all
//! positions seen so far, before GQA head repetition, in f32 whatever the model's dtype.
//!
//! # Layout
//! - keys and values `[batch, cap, kv_heads·head_dim]`: sequence `b`'s position `p` is row
//!   `b·cap + p`, as the projections produce them; `cap` grows by doubling, so appending a
//!   token copies only that token (not the whole cache, as concatenating tensors did). Rows of
//!   a stacked batch are left-padded with zeros to the same length ([`KvCache::pads`] says how
//!   many per row).

/// Cached keys and values of one layer.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    k: Vec<f32>,
    v: Vec<f32>,
    batch: usize,
    width: usize,
    cap: usize,
    len: usize,
}

impl LayerCache {
    /// Appends `t` new positions of each of `batch` sequences: `k`/`v` rows `[batch·t, width]`.
    ///
    /// # Panics
    /// When the batch or the width differs from what the cache holds.
    pub fn append(&mut self, k: &[f32], v: &[f32], batch: usize, t: usize, width: usize) {
        assert_eq!(
            k.len(),
            batch * t * width,
            "cache append: keys are [batch·t, width]"
        );
        assert_eq!(v.len(), k.len(), "cache append: values are shaped as keys");
        if self.len == 0 && self.cap == 0 {
            (self.batch, self.width) = (batch, width);
        }
        assert!(
            self.batch == batch && self.width == width,
            "cache append: [{batch}, {width}] onto a cache of [{}, {}]",
            self.batch,
            self.width
        );
        if self.len + t > self.cap {
            self.grow((self.len + t).max(2 * self.cap));
        }
        for b in 0..batch {
            let dst = (b * self.cap + self.len) * width;
            let src = b * t * width;
            self.k[dst..dst + t * width].copy_from_slice(&k[src..src + t * width]);
            self.v[dst..dst + t * width].copy_from_slice(&v[src..src + t * width]);
        }
        self.len += t;
    }

    /// Room for `cap` positions per sequence, the filled rows kept.
    fn grow(&mut self, cap: usize) {
        let w = self.width;
        let mut k = vec![0f32; self.batch * cap * w];
        let mut v = vec![0f32; self.batch * cap * w];
        for b in 0..self.batch {
            let (src, dst) = (b * self.cap * w, b * cap * w);
            k[dst..dst + self.len * w].copy_from_slice(&self.k[src..src + self.len * w]);
            v[dst..dst + self.len * w].copy_from_slice(&self.v[src..src + self.len * w]);
        }
        (self.k, self.v, self.cap) = (k, v, cap);
    }

    /// Keys `[batch, cap, width]`.
    pub fn keys(&self) -> &[f32] {
        &self.k
    }

    /// Values `[batch, cap, width]`.
    pub fn values(&self) -> &[f32] {
        &self.v
    }

    /// Positions held per sequence (rows past [`LayerCache::len`] are unused).
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Positions filled per sequence.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing was appended yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The caches of `parts` (one sequence each, all filled, of one width) as one batch: each
    /// repeated `n` times and left-padded with zeros to the longest, in order; `extra` more
    /// positions reserved per sequence.
    pub fn stack(parts: &[&LayerCache], n: usize, extra: usize) -> LayerCache {
        let longest = parts.iter().map(|p| p.len).max().unwrap_or(0);
        let width = parts.first().map_or(0, |p| p.width);
        assert!(
            parts.iter().all(|p| p.batch == 1 && p.width == width),
            "cache stack: parts of one sequence and one width"
        );
        let cap = longest + extra;
        let mut out = LayerCache {
            k: vec![0f32; parts.len() * n * cap * width],
            v: vec![0f32; parts.len() * n * cap * width],
            batch: parts.len() * n,
            width,
            cap,
            len: longest,
        };
        for (i, p) in parts.iter().enumerate() {
            let filled = p.len * width;
            for r in 0..n {
                let dst = ((i * n + r) * cap + longest - p.len) * width;
                out.k[dst..dst + filled].copy_from_slice(&p.k[..filled]);
                out.v[dst..dst + filled].copy_from_slice(&p.v[..filled]);
            }
        }
        out
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
    /// (the padding recorded in [`KvCache::pads`]), with room for `extra` more positions.
    pub fn stack(parts: &[&KvCache], n: usize, extra: usize) -> KvCache {
        let seen = parts.iter().map(|p| p.seen).max().unwrap_or(0);
        let layers = (0..parts.first().map_or(0, |p| p.layers.len()))
            .map(|l| {
                let of_layer: Vec<&LayerCache> = parts.iter().map(|p| &p.layers[l]).collect();
                LayerCache::stack(&of_layer, n, extra)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_grow_in_place_and_stacks_pad_on_the_left() {
        let mut c = LayerCache::default();
        // Two sequences, width 2: one position, then two more (the capacity doubles).
        c.append(&[1.0, 2.0, 3.0, 4.0], &[-1.0, -2.0, -3.0, -4.0], 2, 1, 2);
        c.append(
            &[5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0],
            &[0.0; 8],
            2,
            2,
            2,
        );
        assert_eq!((c.len(), c.cap()), (3, 3));
        let cap = c.cap();
        assert_eq!(&c.keys()[..6], &[1.0, 2.0, 5.0, 6.0, 7.0, 8.0]);
        assert_eq!(
            &c.keys()[cap * 2..cap * 2 + 6],
            &[3.0, 4.0, 9.0, 10.0, 11.0, 12.0]
        );
        assert_eq!(&c.values()[..2], &[-1.0, -2.0]);
        // Stacking a one-position cache with a two-position one, each twice.
        let mut a = LayerCache::default();
        a.append(&[1.0, 1.0], &[2.0, 2.0], 1, 1, 2);
        let mut b = LayerCache::default();
        b.append(&[3.0, 3.0, 4.0, 4.0], &[5.0, 5.0, 6.0, 6.0], 1, 2, 2);
        let s = LayerCache::stack(&[&a, &b], 2, 1);
        assert_eq!((s.len(), s.cap()), (2, 3));
        let row = |r: usize| &s.keys()[r * 6..r * 6 + 4];
        assert_eq!(row(0), &[0.0, 0.0, 1.0, 1.0]);
        assert_eq!(row(1), &[0.0, 0.0, 1.0, 1.0]);
        assert_eq!(row(3), &[3.0, 3.0, 4.0, 4.0]);
        let mut kv = KvCache::new(1);
        kv.layers[0] = a;
        kv.seen = 1;
        let mut kv2 = KvCache::new(1);
        kv2.layers[0] = b;
        kv2.seen = 2;
        assert_eq!(KvCache::stack(&[&kv, &kv2], 2, 0).pads, vec![1, 1, 0, 0]);
        assert!(KvCache::stack(&[&kv2, &kv2], 3, 0).pads.is_empty());
    }
}
