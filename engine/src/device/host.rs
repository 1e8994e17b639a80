//! The host implementation of [`Backend`]: [`LlamaModel`]'s burn tensors, through the CPU
//! kernels of [`crate::kernels`] (f32 on the flex backend) or burn's ops (other dtypes), the
//! same fused functions the training step uses ([`crate::train::fused`]).

use burn::tensor::{DType, Int, Tensor, TensorData};

use super::{AttnShape, Backend, Norm, Proj};
use crate::config::ModelConfig;
use crate::kernels;
use crate::model::attention::build_mask;
use crate::model::{KvCache, LlamaModel, Positions, RmsNorm};
use crate::train::fused;
use crate::train::proj::{lin_forward, lin_forward_shared};

/// RoPE tables of a batch in the forms the host paths use.
pub struct HostRope {
    rope: fused::Rope,
    batch: usize,
    len: usize,
}

impl LlamaModel {
    pub(super) fn norm_of(&self, which: Norm) -> &RmsNorm {
        match which {
            Norm::Input(i) => &self.layers[i].input_layernorm,
            Norm::Post(i) => &self.layers[i].post_attention_layernorm,
            Norm::Final => &self.norm,
        }
    }

    /// Whether the f32 CPU kernels run for this model.
    fn kernels_run(&self) -> bool {
        self.dtype == DType::F32 && kernels::available(&self.device)
    }

    /// The attention context: the CPU kernels when `cpu`, else burn's ops with the boolean
    /// mask (built here, with the layer's own window).
    pub(super) fn attn_ctx<'a>(
        &self,
        shape: AttnShape,
        segments: Option<&'a [u32]>,
        cpu: bool,
    ) -> fused::AttnCtx<'a> {
        let (b, t) = (shape.batch, shape.len);
        fused::AttnCtx {
            shape: kernels::attention::Shape {
                batch: b,
                len: t,
                hq: shape.hq,
                hkv: shape.hkv,
                d: shape.d,
            },
            segments,
            window: shape.window,
            scale: 1.0 / (shape.d as f64).sqrt(),
            mask: (!cpu)
                .then(|| build_mask(b, shape.hq, t, t, segments, shape.window, &[], &self.device)),
            cpu,
        }
    }

    /// RoPE on rows `[n, heads·d]` (`inverse`: its transpose, the gradient through it).
    pub(super) fn rope_rows(
        &self,
        x: Tensor<2>,
        heads: usize,
        tables: &HostRope,
        inverse: bool,
    ) -> Tensor<2> {
        let d = x.dims()[1] / heads;
        let ctx = fused::AttnCtx {
            shape: kernels::attention::Shape {
                batch: tables.batch,
                len: tables.len,
                hq: heads,
                hkv: heads,
                d,
            },
            segments: None,
            window: None,
            scale: 1.0,
            mask: None,
            cpu: self.kernels_run(),
        };
        fused::rope(x, heads, &ctx, &tables.rope, inverse)
    }

    pub(super) fn rows_tensor(&self, rows: &[usize]) -> Tensor<1, Int> {
        let v: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        Tensor::from_data(TensorData::new(v, [rows.len()]), &self.device)
    }
}

impl Backend for LlamaModel {
    type T = Tensor<2>;
    type Rope = HostRope;
    type Cache = KvCache;

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn new_cache(&self) -> KvCache {
        KvCache::new(self.config.num_hidden_layers)
    }

    fn cache_seen(cache: &KvCache) -> usize {
        cache.seen
    }

    fn cache_advance(cache: &mut KvCache, len: usize) {
        cache.seen += len;
    }

    fn cache_stack(&self, caches: &[&KvCache], n: usize, room: usize) -> Option<KvCache> {
        Some(KvCache::stack(caches, n, room))
    }

    fn rope_tables(&self, positions: &Positions) -> HostRope {
        let (cos, sin) = self.rope.tables(positions, &self.device);
        // Other dtypes multiply the tables in the compute dtype, as transformers does
        // (`cos.to(x.dtype)`); burn's CPU backend refuses mixed-dtype products.
        let (cos, sin) = if self.dtype == DType::F32 {
            (cos, sin)
        } else {
            (cos.cast(self.dtype), sin.cast(self.dtype))
        };
        let (cos_rows, sin_rows) = self.rope.rows(positions);
        let (batch, len) = positions.dims();
        HostRope {
            rope: fused::Rope {
                cos,
                sin,
                cos_rows,
                sin_rows,
            },
            batch,
            len,
        }
    }

    fn embed(&self, ids: &[u32]) -> Tensor<2> {
        let n = ids.len();
        let ids = self.ids_tensor(ids, 1, n);
        burn::tensor::module::embedding(self.embed_tokens.clone(), ids)
            .reshape([n, self.config.hidden_size])
    }

    fn norm(
        &self,
        which: Norm,
        x: Tensor<2>,
        pending: Option<Tensor<2>>,
    ) -> (Tensor<2>, Tensor<2>) {
        let norm = self.norm_of(which);
        if self.kernels_run() {
            return match pending {
                Some(p) => {
                    let (h, y, _) = fused::add_rmsnorm(&x, &p, &norm.weight, norm.eps);
                    (h, y)
                }
                None => {
                    let (y, _) = fused::rmsnorm(&x, &norm.weight, norm.eps);
                    (x, y)
                }
            };
        }
        // Other dtypes: transformers' LlamaRMSNorm (statistics in f32) on burn's ops.
        let h = match pending {
            Some(p) => x + p,
            None => x,
        };
        let [n, d] = h.dims();
        let y = norm.forward(h.clone().reshape([1, n, d])).reshape([n, d]);
        (h, y)
    }

    fn project(&self, layer: usize, which: &[Proj], x: &Tensor<2>) -> Vec<Tensor<2>> {
        let lin = |p: Proj| self.layers[layer].proj(p);
        match which {
            [a, b, c] => lin_forward_shared([lin(*a), lin(*b), lin(*c)], x, [None; 3])
                .into_iter()
                .map(|(y, _)| y)
                .collect(),
            [a, b] => lin_forward_shared([lin(*a), lin(*b)], x, [None; 2])
                .into_iter()
                .map(|(y, _)| y)
                .collect(),
            _ => which
                .iter()
                .map(|p| lin_forward(lin(*p), x, None).0)
                .collect(),
        }
    }

    fn rope(&self, x: Tensor<2>, heads: usize, tables: &HostRope) -> Tensor<2> {
        self.rope_rows(x, heads, tables, false)
    }

    fn attention(
        &self,
        layer: usize,
        q: Tensor<2>,
        k: Tensor<2>,
        v: Tensor<2>,
        shape: AttnShape,
        segments: Option<&[u32]>,
        cache: Option<&mut KvCache>,
    ) -> Tensor<2> {
        let Some(cache) = cache else {
            // The kernels read f32 flex storage, not autodiff-tracked tensors.
            let cpu = self.kernels_run() && kernels::host(&q).is_some();
            let ctx = self.attn_ctx(shape, segments, cpu);
            return fused::attention(&q, &k, &v, &ctx).0;
        };
        // Incremental decoding: the keys and values go into the cache (f32, in place);
        // the first call on an empty cache is the prompt's plain causal attention, later ones
        // attend from the new queries over everything cached.
        let AttnShape {
            batch: b,
            len: t,
            hq,
            hkv,
            d,
            window,
        } = shape;
        let rows = |x: &Tensor<2>| match kernels::host(x) {
            Some(h) => h.data().to_vec(),
            None => crate::weights::to_f32_vec(x.clone().into_data()),
        };
        let pads = &cache.pads;
        let layer = &mut cache.layers[layer];
        let prompt = layer.is_empty() && pads.is_empty();
        layer.append(&rows(&k), &rows(&v), b, t, hkv * d);
        if prompt {
            let cpu = self.kernels_run() && kernels::host(&q).is_some();
            let ctx = self.attn_ctx(shape, segments, cpu);
            return fused::attention(&q, &k, &v, &ctx).0;
        }
        assert!(segments.is_none(), "packing segments with a KV cache");
        let kv = kernels::attention::Cached {
            k: layer.keys(),
            v: layer.values(),
            cap: layer.cap(),
            len: layer.len(),
            pads,
        };
        let sh = kernels::attention::Shape {
            batch: b,
            len: t,
            hq,
            hkv,
            d,
        };
        let scale = 1.0 / (d as f32).sqrt();
        let o = kernels::attention::cached(&rows(&q), kv, sh, window, scale);
        let o = kernels::tensor(o, [b * t, hq * d], &self.device);
        if self.dtype == DType::F32 {
            o
        } else {
            o.cast(self.dtype)
        }
    }

    fn swiglu(&self, g: &Tensor<2>, u: &Tensor<2>) -> Tensor<2> {
        fused::swiglu(g, u)
    }

    fn target_logprobs(&self, hidden: &Tensor<2>, rows: &[usize], ids: &[u32]) -> Vec<f32> {
        let selected = hidden.clone().select(0, self.rows_tensor(rows));
        crate::weights::to_f32_vec(crate::eval::gather_logprobs(self, selected, ids).into_data())
    }

    fn row_logits(&self, hidden: &Tensor<2>, rows: &[usize]) -> Vec<f32> {
        let selected = hidden.clone().select(0, self.rows_tensor(rows));
        if rows.len() <= kernels::skinny::MAX_ROWS {
            // Decoding's few rows: the head read once (kernels::skinny), not packed.
            let head = self.lm_head_weight();
            let logits = kernels::matmul_sum(&[kernels::Term::nt(&selected, &head, 1.0)]);
            return crate::weights::to_f32_vec(logits.into_data());
        }
        let h = self.config.hidden_size;
        crate::weights::to_f32_vec(
            self.logits(selected.reshape([1, rows.len(), h]))
                .into_data(),
        )
    }

    fn without_adapter(&self) -> Self {
        LlamaModel::without_adapter(self)
    }
}
