//! A Llama-family model whose weights live on the GPU, and its [`Backend`] implementation.
//!
//! Weights are read one tensor at a time from the checkpoint (memory-mapped safetensors or
//! GGUF), converted to the compute dtype on the host and copied to the device, so the host
//! never holds more than one tensor in f32. With NF4 (`--load-in-4bit`), projections are
//! quantised on the host with the same code as the CPU engine (bit-identical codes) and only
//! the codes and scales go to the device; each use dequantises into a transient buffer.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, DevicePtr};

use super::Gpu;
use super::ops::AttnGeom;
use super::tensor::{Dt, GTensor};
use crate::config::ModelConfig;
use crate::device::{AttnShape, Backend, Norm, Proj};
use crate::error::{Error, Result};
use crate::model::{BaseWeight, LlamaModel, Positions, RotaryEmbedding};
use crate::nf4::{Absmax, Nf4Tensor};
use crate::weights::{TensorSource, to_f32_vec};

/// NF4 codes and scales on the device.
pub struct Nf4Gpu {
    pub(crate) packed: CudaSlice<u8>,
    pub(crate) absmax: Option<CudaSlice<f32>>,
    pub(crate) codes2: Option<CudaSlice<u8>>,
    pub(crate) absmax2: Option<CudaSlice<f32>>,
    pub(crate) offset: f32,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
}

impl Nf4Gpu {
    /// Copies the codes and scales of `q` to the device.
    pub fn upload(gpu: &Gpu, q: &Nf4Tensor) -> Result<Self> {
        let (rows, cols) = q.shape;
        let packed = gpu.upload_u8(&q.packed)?;
        Ok(match &q.absmax {
            Absmax::F32(a) => Nf4Gpu {
                packed,
                absmax: Some(gpu.upload_f32(a)?),
                codes2: None,
                absmax2: None,
                offset: 0.0,
                rows,
                cols,
            },
            Absmax::Double {
                codes,
                absmax2,
                offset,
            } => Nf4Gpu {
                packed,
                absmax: None,
                codes2: Some(gpu.upload_u8(codes)?),
                absmax2: Some(gpu.upload_f32(absmax2)?),
                offset: *offset,
                rows,
                cols,
            },
        })
    }
}

/// A frozen projection weight on the device.
#[derive(Clone)]
pub enum GBase {
    /// `[out, in]` in the compute dtype.
    Dense(GTensor),
    /// NF4, dequantised on each use.
    Nf4(Arc<Nf4Gpu>),
}

/// LoRA factors on the device (compute dtype).
#[derive(Clone)]
pub struct GLora {
    /// `[r, in]`.
    pub a: GTensor,
    /// `[out, r]`.
    pub b: GTensor,
    /// `α/r` (or `α/√r`).
    pub scale: f32,
    /// Dropout probability on the LoRA input while training (0: none).
    pub dropout: f32,
    /// f32 master copies of `a` and `b` when the compute dtype is not f32 (mixed precision,
    /// as PEFT keeps adapter weights in f32): the optimiser updates these and `a`/`b` are
    /// refreshed from them.
    pub master: Option<(GTensor, GTensor)>,
    /// DoRA's magnitude `[1, out]`, f32 (PEFT's `lora_magnitude_vector`), when the adapter is
    /// weight-decomposed.
    pub magnitude: Option<GTensor>,
    /// DoRA's `(c, inv)` for the current factors and magnitude, computed on first use: every
    /// forward until they change (each decoded token, a recomputed block) reads it. A new
    /// cell replaces it whenever they change (clones keep the one of their own values).
    pub(super) dora_cache: Arc<std::sync::OnceLock<(GTensor, GTensor)>>,
}

impl GLora {
    /// The f32 factors (the masters in mixed precision).
    pub fn f32_factors(&self) -> (&GTensor, &GTensor) {
        self.master
            .as_ref()
            .map_or((&self.a, &self.b), |(a, b)| (a, b))
    }
}

/// One projection.
#[derive(Clone)]
pub struct GProj {
    /// Frozen weight.
    pub base: GBase,
    /// Bias `[1, out]`.
    pub bias: Option<GTensor>,
    /// Adapter.
    pub lora: Option<GLora>,
}

/// One decoder block.
#[derive(Clone)]
pub struct GLayer {
    /// `input_layernorm.weight` `[1, hidden]`.
    pub ln1: GTensor,
    /// `post_attention_layernorm.weight` `[1, hidden]`.
    pub ln2: GTensor,
    /// q, k, v, o, gate, up, down in that order.
    pub proj: [GProj; 7],
}

/// A Llama-family model on an NVIDIA GPU.
#[derive(Clone)]
pub struct CudaModel {
    /// The device.
    pub gpu: Arc<Gpu>,
    /// The validated configuration.
    pub config: ModelConfig,
    /// Compute dtype.
    pub dt: Dt,
    rope: RotaryEmbedding,
    pub(super) embed: GTensor,
    pub(super) layers: Vec<GLayer>,
    pub(super) norm: GTensor,
    pub(super) head: Option<GTensor>,
    /// A reward model's score head `[1, hidden]`, f32 (read on the host, trained in full).
    pub(super) score: Option<GTensor>,
}

/// Bytes the weights of `config` take on the device in `dt`, with NF4 projections when `nf4`
/// is `Some(double)` (4 bits a value plus the block scales).
pub fn weight_bytes(config: &ModelConfig, dt: Dt, nf4: Option<bool>) -> u64 {
    let (v, h, i) = (
        config.vocab_size as u64,
        config.hidden_size as u64,
        config.intermediate_size as u64,
    );
    let (q, kv) = (
        (config.num_attention_heads * config.head_dim) as u64,
        (config.num_key_value_heads * config.head_dim) as u64,
    );
    let e = dt.size() as u64;
    let proj = h * q + 2 * h * kv + q * h + 3 * h * i;
    let proj_bytes = match nf4 {
        None => proj * e,
        // Codes: half a byte a value; scales: one f32 per 64 values, or one byte per 64 plus
        // an f32 per 16 384 with double quantisation.
        Some(false) => proj / 2 + proj.div_ceil(64) * 4,
        Some(true) => proj / 2 + proj.div_ceil(64) + proj.div_ceil(64 * 256) * 4,
    };
    let biases = if config.qkv_bias { q + 2 * kv } else { 0 }
        + if config.o_bias { h } else { 0 }
        + if config.mlp_bias { 2 * i + h } else { 0 };
    let per_layer = proj_bytes + (2 * h + biases) * e;
    let head = if config.tie_word_embeddings { 0 } else { v * h };
    config.num_hidden_layers as u64 * per_layer + (v * h + head + h) * e
}

impl CudaModel {
    /// Loads the model from `source` straight to `gpu` in `dt`; with `nf4 = Some(double)`
    /// the projections are stored as NF4 (double-quantised scales when `double`). Fails
    /// before copying anything when the weights cannot fit in the GPU's free memory.
    pub fn load(
        source: &dyn TensorSource,
        config: ModelConfig,
        gpu: Arc<Gpu>,
        dt: Dt,
        nf4: Option<bool>,
    ) -> Result<Self> {
        let (v, h, i) = (
            config.vocab_size,
            config.hidden_size,
            config.intermediate_size,
        );
        let (nq, nkv, d) = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        );
        let need = weight_bytes(&config, dt, nf4);
        let free = gpu.free_bytes()?;
        if need > free {
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            return Err(Error::Device(format!(
                "{}: the weights need {:.2} GiB in {dt:?}{} on cuda:{}, which has {:.2} GiB free{}",
                source.path().display(),
                gib(need),
                if nf4.is_some() {
                    " with NF4 projections"
                } else {
                    ""
                },
                gpu.ordinal,
                gib(free),
                if nf4.is_none() {
                    "; --load-in-4bit or --dtype bf16 take less"
                } else {
                    ""
                }
            )));
        }
        let get = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            Ok(to_f32_vec(source.require(name, shape)?))
        };
        let up = |values: &[f32], r: usize, c: usize| gpu.upload(values, r, c, dt);
        let embed = up(&get("model.embed_tokens.weight", &[v, h])?, v, h)?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for li in 0..config.num_hidden_layers {
            let p = format!("model.layers.{li}");
            let shapes = [
                (nq * d, h, config.qkv_bias),
                (nkv * d, h, config.qkv_bias),
                (nkv * d, h, config.qkv_bias),
                (h, nq * d, config.o_bias),
                (i, h, config.mlp_bias),
                (i, h, config.mlp_bias),
                (h, i, config.mlp_bias),
            ];
            let mut proj = Vec::with_capacity(7);
            for (name, (out, inp, bias)) in Proj::ALL.map(Proj::path).iter().zip(shapes) {
                let w = get(&format!("{p}.{name}.weight"), &[out, inp])?;
                let base = match nf4 {
                    Some(double) => GBase::Nf4(Arc::new(Nf4Gpu::upload(
                        &gpu,
                        &crate::nf4::quantize(&w, out, inp, double),
                    )?)),
                    None => GBase::Dense(up(&w, out, inp)?),
                };
                let bias = if bias {
                    Some(up(&get(&format!("{p}.{name}.bias"), &[out])?, 1, out)?)
                } else {
                    None
                };
                proj.push(GProj {
                    base,
                    bias,
                    lora: None,
                });
            }
            layers.push(GLayer {
                ln1: up(&get(&format!("{p}.input_layernorm.weight"), &[h])?, 1, h)?,
                ln2: up(
                    &get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                    1,
                    h,
                )?,
                proj: proj
                    .try_into()
                    .map_err(|_| Error::Invalid("seven projections".into()))?,
            });
        }
        let norm = up(&get("model.norm.weight", &[h])?, 1, h)?;
        let head = if config.tie_word_embeddings {
            None
        } else {
            Some(up(&get("lm_head.weight", &[v, h])?, v, h)?)
        };
        Ok(CudaModel {
            rope: RotaryEmbedding::new(&config),
            gpu,
            config,
            dt,
            embed,
            layers,
            norm,
            head,
            score: None,
        })
    }

    /// A copy of a host model on the GPU, with the same values (NF4 projections keep their
    /// codes; the adapter comes along). Used to check the GPU against the host engine.
    pub fn from_host(model: &LlamaModel, gpu: Arc<Gpu>, dt: Dt) -> Result<Self> {
        let up = |t: &burn::tensor::Tensor<2>| -> Result<GTensor> {
            let [r, c] = t.dims();
            gpu.upload(&to_f32_vec(t.to_data()), r, c, dt)
        };
        let vec = |t: &burn::tensor::Tensor<1>| up(&t.clone().unsqueeze::<2>());
        let mut layers = Vec::with_capacity(model.layers.len());
        for l in &model.layers {
            let mut proj = Vec::with_capacity(7);
            for (_, lin) in l.projections() {
                let base = match &lin.base {
                    BaseWeight::Dense(w) => GBase::Dense(up(w)?),
                    BaseWeight::Half { .. } => GBase::Dense(up(&lin.weight())?),
                    BaseWeight::Nf4 { q, .. } => GBase::Nf4(Arc::new(Nf4Gpu::upload(&gpu, q)?)),
                };
                let lora = match &lin.lora {
                    Some(lw) => {
                        let master = |t: &burn::tensor::Tensor<2>| -> Result<GTensor> {
                            let [r, c] = t.dims();
                            gpu.upload(&to_f32_vec(t.to_data()), r, c, Dt::F32)
                        };
                        Some(GLora {
                            a: up(&lw.a)?,
                            b: up(&lw.b)?,
                            scale: lw.scale as f32,
                            dropout: lw.dropout as f32,
                            master: (dt != Dt::F32)
                                .then(|| Ok::<_, Error>((master(&lw.a)?, master(&lw.b)?)))
                                .transpose()?,
                            magnitude: lw.magnitude.as_ref().map(master).transpose()?,
                            dora_cache: Default::default(),
                        })
                    }
                    None => None,
                };
                proj.push(GProj {
                    base,
                    bias: lin.bias.as_ref().map(vec).transpose()?,
                    lora,
                });
            }
            layers.push(GLayer {
                ln1: vec(&l.input_layernorm.weight)?,
                ln2: vec(&l.post_attention_layernorm.weight)?,
                proj: proj
                    .try_into()
                    .map_err(|_| Error::Invalid("seven projections".into()))?,
            });
        }
        Ok(CudaModel {
            rope: RotaryEmbedding::new(&model.config),
            config: model.config.clone(),
            dt,
            embed: up(&model.embed_tokens)?,
            layers,
            norm: vec(&model.norm.weight)?,
            head: model.lm_head.as_ref().map(up).transpose()?,
            score: model
                .score
                .as_ref()
                .map(|t| gpu.upload(&to_f32_vec(t.to_data()), 1, t.dims()[1], Dt::F32))
                .transpose()?,
            gpu,
        })
    }

    pub(super) fn proj_shape(&self, li: usize, pi: usize) -> (usize, usize) {
        match &self.layers[li].proj[pi].base {
            GBase::Dense(w) => (w.rows, w.cols),
            GBase::Nf4(q) => (q.rows, q.cols),
        }
    }

    /// The LM head's weight `[vocab, hidden]` (the embedding when tied).
    pub(crate) fn head(&self) -> &GTensor {
        self.head.as_ref().unwrap_or(&self.embed)
    }

    /// Projection `p` of block `layer`.
    pub(crate) fn proj(&self, layer: usize, p: Proj) -> &GProj {
        &self.layers[layer].proj[p.index()]
    }

    /// Rows of logits per chunk of the LM head: about 256 MiB of f32 logits.
    pub(crate) fn head_chunk(&self) -> usize {
        ((256usize << 20) / (4 * self.config.vocab_size.max(1))).clamp(16, 8192)
    }

    fn apply(&self, p: &GProj, x: &GTensor) -> GTensor {
        let g = &self.gpu;
        let dense;
        let w = match &p.base {
            GBase::Dense(w) => w,
            GBase::Nf4(q) => {
                dense = g.nf4_dequant(q, self.dt);
                &dense
            }
        };
        let mut y = match &p.lora {
            None => g.matmul_sum(&[(x, false, w, true, 1.0)], self.dt),
            Some(l) => {
                let u = g
                    .matmul_sum(&[(x, false, &l.a, true, 1.0)], self.dt)
                    .unwrap_or_else(|e| panic!("{e}"));
                g.matmul_sum(
                    &[(x, false, w, true, 1.0), (&u, false, &l.b, true, l.scale)],
                    self.dt,
                )
            }
        }
        .unwrap_or_else(|e| panic!("{e}"));
        // DoRA: c ⊙ (x·Wᵀ + s·u·Bᵀ).
        if let Some((c, _)) = self.dora_factor(p, w) {
            g.scale_cols(&mut y, &c, 0.0);
        }
        if let Some(b) = &p.bias {
            g.add_bias(&mut y, b);
        }
        y
    }
}

/// RoPE tables of a batch on the device (f32 `[n, d]`).
pub struct GRope {
    pub(super) cos: CudaSlice<f32>,
    pub(super) sin: CudaSlice<f32>,
}

/// A KV cache on the device: per layer, keys and values `[batch·cap, hkv·d]` (sequence `b`
/// at rows `b·cap..`), grown by doubling.
pub struct GCache {
    layers: Vec<Option<(GTensor, GTensor)>>,
    cap: usize,
    seen: usize,
}

impl Backend for CudaModel {
    type T = GTensor;
    type Rope = GRope;
    type Cache = GCache;

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn new_cache(&self) -> GCache {
        GCache {
            layers: vec![None; self.layers.len()],
            cap: 0,
            seen: 0,
        }
    }

    fn cache_seen(cache: &GCache) -> usize {
        cache.seen
    }

    fn cache_advance(cache: &mut GCache, len: usize) {
        cache.seen += len;
    }

    /// Stacks caches of one length only (no padding mask in the GPU's attention): a GRPO
    /// group's rows, which share their prompt, decode as one batch.
    fn cache_stack(&self, caches: &[&GCache], n: usize, room: usize) -> Option<GCache> {
        let seen = caches.first()?.seen;
        let filled = |c: &GCache| c.seen == seen && c.layers.iter().all(Option::is_some);
        if n == 0 || !caches.iter().all(|c| filled(c)) {
            return None;
        }
        let g = &self.gpu;
        let rows = caches.len() * n;
        let cap = (seen + room).next_power_of_two().max(64);
        let layers = (0..self.layers.len())
            .map(|l| {
                let stack = |pick: &dyn Fn(&(GTensor, GTensor)) -> &GTensor| {
                    let first = pick(caches[0].layers[l].as_ref().expect("checked"));
                    let out = g.alloc(rows * cap, first.cols, first.dt);
                    for (i, c) in caches.iter().enumerate() {
                        let src = pick(c.layers[l].as_ref().expect("checked"));
                        for r in 0..n {
                            g.copy_rows(src, 0, seen, &out, (i * n + r) * cap);
                        }
                    }
                    out
                };
                Some((stack(&|kv| &kv.0), stack(&|kv| &kv.1)))
            })
            .collect();
        Some(GCache { layers, cap, seen })
    }

    fn rope_tables(&self, positions: &Positions) -> GRope {
        let (cos, sin) = self.rope.rows(positions);
        let up = |v: &[f32]| self.gpu.upload_f32(v).unwrap_or_else(|e| panic!("{e}"));
        GRope {
            cos: up(&cos),
            sin: up(&sin),
        }
    }

    fn embed(&self, ids: &[u32]) -> GTensor {
        self.gpu
            .embed(&self.embed, ids)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn norm(&self, which: Norm, x: GTensor, pending: Option<GTensor>) -> (GTensor, GTensor) {
        let w = match which {
            Norm::Input(i) => &self.layers[i].ln1,
            Norm::Post(i) => &self.layers[i].ln2,
            Norm::Final => &self.norm,
        };
        let eps = self.config.rms_norm_eps as f32;
        let (h, y, _) = self.gpu.rmsnorm(&x, pending.as_ref(), w, eps, false);
        (h.unwrap_or(x), y)
    }

    fn project(&self, layer: usize, which: &[Proj], x: &GTensor) -> Vec<GTensor> {
        which
            .iter()
            .map(|p| self.apply(&self.layers[layer].proj[p.index()], x))
            .collect()
    }

    fn rope(&self, x: GTensor, heads: usize, t: &GRope) -> GTensor {
        self.gpu.rope(x, heads, &t.cos, &t.sin, false)
    }

    fn attention(
        &self,
        layer: usize,
        q: GTensor,
        k: GTensor,
        v: GTensor,
        s: AttnShape,
        segments: Option<&[u32]>,
        cache: Option<&mut GCache>,
    ) -> GTensor {
        let g = &self.gpu;
        let kv_w = s.hkv * s.d;
        let scale = 1.0 / (s.d as f32).sqrt();
        let window = s.window.unwrap_or(0);
        let run = |kp: u64, vp: u64, tk: usize, k_bs: usize| {
            let geom = AttnGeom {
                batch: s.batch,
                tq: s.len,
                tk,
                hq: s.hq,
                hkv: s.hkv,
                d: s.d,
                k_bs,
                k_rs: kv_w,
                window,
            };
            g.attention(&q, kp, vp, geom, segments, scale, false)
                .unwrap_or_else(|e| panic!("{e}"))
                .0
        };
        let Some(c) = cache else {
            return run(k.ptr(), v.ptr(), s.len, s.len * kv_w);
        };
        let need = c.seen + s.len;
        if need > c.cap || c.layers[layer].is_none() {
            // Grow every layer's storage together (each layer appends in turn).
            let cap = need.next_power_of_two().max(64).max(c.cap);
            if cap > c.cap {
                for slot in c.layers.iter_mut().flatten() {
                    let grow = |old: &GTensor| {
                        let new = g.alloc(s.batch * cap, kv_w, old.dt);
                        for b in 0..s.batch {
                            g.copy_strided(
                                old.row_ptr(b * c.cap),
                                kv_w,
                                new.row_ptr(b * cap),
                                kv_w,
                                c.seen,
                                kv_w,
                                old.dt,
                            );
                        }
                        new
                    };
                    *slot = (grow(&slot.0), grow(&slot.1));
                }
                c.cap = cap;
            }
            if c.layers[layer].is_none() {
                c.layers[layer] = Some((
                    g.alloc(s.batch * c.cap, kv_w, k.dt),
                    g.alloc(s.batch * c.cap, kv_w, v.dt),
                ));
            }
        }
        let (ck, cv) = c.layers[layer].as_ref().expect("allocated above");
        for b in 0..s.batch {
            g.copy_rows(&k, b * s.len, s.len, ck, b * c.cap + c.seen);
            g.copy_rows(&v, b * s.len, s.len, cv, b * c.cap + c.seen);
        }
        run(ck.ptr(), cv.ptr(), need, c.cap * kv_w)
    }

    fn swiglu(&self, g: &GTensor, u: &GTensor) -> GTensor {
        self.gpu.swiglu(g, u)
    }

    fn target_logprobs(&self, hidden: &GTensor, rows: &[usize], ids: &[u32]) -> Vec<f32> {
        let g = &self.gpu;
        assert_eq!(rows.len(), ids.len(), "one target per row");
        if rows.is_empty() {
            return Vec::new();
        }
        // Indices go up once and the log-probabilities come back once: no synchronisation
        // between chunks.
        let r32: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let up = |v: &[u32]| g.upload_u32(v).unwrap_or_else(|e| panic!("{e}"));
        let (rows_dev, ids_dev) = (up(&r32), up(ids));
        let out = g.alloc(1, rows.len(), Dt::F32);
        let (rp, ip) = (
            rows_dev.device_ptr(g.stream()).0,
            ids_dev.device_ptr(g.stream()).0,
        );
        let chunk = self.head_chunk();
        for start in (0..rows.len()).step_by(chunk) {
            let n = chunk.min(rows.len() - start);
            let h = g.gather_rows_dev(hidden, rp + 4 * start as u64, n);
            let logits = g
                .matmul_sum(&[(&h, false, self.head(), true, 1.0)], Dt::F32)
                .unwrap_or_else(|e| panic!("{e}"));
            g.target_logprobs_dev(&logits, ip + 4 * start as u64, out.ptr() + 4 * start as u64);
        }
        g.download(&out).unwrap_or_else(|e| panic!("{e}"))
    }

    fn row_logits(&self, hidden: &GTensor, rows: &[usize]) -> Vec<f32> {
        let g = &self.gpu;
        let r32: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let h = g
            .gather_rows(hidden, &r32)
            .unwrap_or_else(|e| panic!("{e}"));
        let logits = g
            .matmul_sum(&[(&h, false, self.head(), true, 1.0)], Dt::F32)
            .unwrap_or_else(|e| panic!("{e}"));
        g.download(&logits).unwrap_or_else(|e| panic!("{e}"))
    }

    fn without_adapter(&self) -> Self {
        let mut m = self.clone();
        m.detach_adapter();
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        ModelConfig::from_file(
            &std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../testdata/tiny-llama/model/config.json"),
        )
        .unwrap()
    }

    #[test]
    fn weight_bytes_count_every_tensor_of_the_tiny_model() {
        let c = tiny();
        // hidden 64, 4 heads / 2 KV heads of 16, MLP 160, 2 layers, vocab 49 152, tied.
        let proj = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 160;
        let dense = 2 * (proj + 2 * 64) + 49_152 * 64 + 64;
        assert_eq!(weight_bytes(&c, Dt::F32, None), 4 * dense as u64);
        assert_eq!(weight_bytes(&c, Dt::BF16, None), 2 * dense as u64);
        let nf4 = 2 * (proj / 2 + (proj / 64) * 4 + 2 * 64 * 2) + (49_152 * 64 + 64) * 2;
        assert_eq!(weight_bytes(&c, Dt::BF16, Some(false)), nf4 as u64);
        assert!(weight_bytes(&c, Dt::BF16, Some(true)) < weight_bytes(&c, Dt::BF16, Some(false)));
    }
}
