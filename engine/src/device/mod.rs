//! One engine, two devices. The decoder's forward pass is written once ([`forward`]) against
//! a small set of fused operations — the [`Backend`] trait: embedding gather, RMSNorm with the
//! residual add folded in, projections (frozen base, NF4 or dense, plus LoRA), RoPE, causal
//! attention with GQA / sliding window / packing segments and a KV cache, SwiGLU, and the LM
//! head's log-probabilities at chosen rows. [`crate::LlamaModel`] implements it on the host
//! (the CPU kernels of [`crate::kernels`] on burn's flex backend), [`crate::cuda::CudaModel`]
//! on an NVIDIA GPU (kernels compiled by NVRTC, products through cuBLASLt).
//!
//! Rows are tokens: activations are `[batch·len, features]` matrices throughout.

mod host;
mod host_train;
mod train;

pub use train::{Grads, ProjGrads, TrainBackend};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::Positions;

/// Where the model runs, as `--device` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// The host CPU (burn's flex backend and fedtune's CPU kernels).
    Cpu,
    /// NVIDIA GPU `N` (`cuda` or `cuda:N`).
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" | "flex" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => n.parse().map(Device::Cuda).map_err(|_| {
                    Error::Invalid(format!("--device {s}: expected cuda:N with N a GPU index"))
                }),
                None => Err(Error::Invalid(format!(
                    "--device {s}: unknown device (cpu, cuda, cuda:N)"
                ))),
            },
        }
    }
}

/// Which RMSNorm of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Norm {
    /// `model.layers.{i}.input_layernorm`.
    Input(usize),
    /// `model.layers.{i}.post_attention_layernorm`.
    Post(usize),
    /// `model.norm`.
    Final,
}

/// Which projection of a block, in Hugging Face order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proj {
    /// `self_attn.q_proj`.
    Q,
    /// `self_attn.k_proj`.
    K,
    /// `self_attn.v_proj`.
    V,
    /// `self_attn.o_proj`.
    O,
    /// `mlp.gate_proj`.
    Gate,
    /// `mlp.up_proj`.
    Up,
    /// `mlp.down_proj`.
    Down,
}

impl Proj {
    /// The seven projections in Hugging Face order (the order of [`Proj::index`]).
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// Position in [`Proj::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Module path inside a block (`self_attn.q_proj`).
    pub fn path(self) -> &'static str {
        match self {
            Proj::Q => "self_attn.q_proj",
            Proj::K => "self_attn.k_proj",
            Proj::V => "self_attn.v_proj",
            Proj::O => "self_attn.o_proj",
            Proj::Gate => "mlp.gate_proj",
            Proj::Up => "mlp.up_proj",
            Proj::Down => "mlp.down_proj",
        }
    }
}

/// The attention call of one layer.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    /// Sequences.
    pub batch: usize,
    /// New tokens per sequence.
    pub len: usize,
    /// Query heads.
    pub hq: usize,
    /// Key/value heads.
    pub hkv: usize,
    /// Head dimension.
    pub d: usize,
    /// Sliding window of this layer.
    pub window: Option<usize>,
}

impl AttnShape {
    /// Layer `layer`'s attention over `batch` sequences of `len` new tokens, with that
    /// layer's own sliding window.
    pub fn of_layer(cfg: &ModelConfig, layer: usize, batch: usize, len: usize) -> Self {
        AttnShape {
            batch,
            len,
            hq: cfg.num_attention_heads,
            hkv: cfg.num_key_value_heads,
            d: cfg.head_dim,
            window: cfg.sliding_window.get(layer).copied().flatten(),
        }
    }
}

/// The fused operations a device provides, over the model's weights on that device.
pub trait Backend {
    /// A `[rows, cols]` activation on the device.
    type T: Clone;
    /// RoPE tables of one batch.
    type Rope;
    /// A KV cache for incremental decoding.
    type Cache;

    /// The model's configuration.
    fn config(&self) -> &ModelConfig;
    /// An empty KV cache.
    fn new_cache(&self) -> Self::Cache;
    /// Positions already held by `cache`.
    fn cache_seen(cache: &Self::Cache) -> usize;
    /// Marks `len` more positions as held (after every layer appended them).
    fn cache_advance(cache: &mut Self::Cache, len: usize);
    /// `caches` (of one row each) as one batch: each repeated `n` times, in order, for rows
    /// that continue those prompts together; shorter prompts are left-padded and their padding
    /// hidden from every query. Decoding such a batch needs explicit per-row positions (each
    /// row's own length). `None` where the device does not do it (the GPU stacks caches of
    /// one length only; decoding then stacks each prompt's rows alone, or goes row by row).
    /// `room`: positions to reserve per row for what follows.
    fn cache_stack(
        &self,
        _caches: &[&Self::Cache],
        _n: usize,
        _room: usize,
    ) -> Option<Self::Cache> {
        None
    }
    /// RoPE tables for `positions`.
    fn rope_tables(&self, positions: &Positions) -> Self::Rope;
    /// Embedding rows of `ids` `[n, hidden]`.
    fn embed(&self, ids: &[u32]) -> Self::T;
    /// `(h, norm(h))` with `h = x + pending` (or `x`).
    fn norm(&self, which: Norm, x: Self::T, pending: Option<Self::T>) -> (Self::T, Self::T);
    /// The projections `which` of `layer` applied to `x` (they share it: q/k/v, gate/up).
    fn project(&self, layer: usize, which: &[Proj], x: &Self::T) -> Vec<Self::T>;
    /// RoPE on rows `[n, heads·d]`.
    fn rope(&self, x: Self::T, heads: usize, tables: &Self::Rope) -> Self::T;
    /// Causal attention of `layer` on rotated rows; with a cache, `k`/`v` are appended first
    /// and the queries are the last `len` positions.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: usize,
        q: Self::T,
        k: Self::T,
        v: Self::T,
        shape: AttnShape,
        segments: Option<&[u32]>,
        cache: Option<&mut Self::Cache>,
    ) -> Self::T;
    /// `silu(g) ⊙ u`.
    fn swiglu(&self, g: &Self::T, u: &Self::T) -> Self::T;
    /// `log p(ids[i])` under the LM head at row `rows[i]` of `hidden`.
    fn target_logprobs(&self, hidden: &Self::T, rows: &[usize], ids: &[u32]) -> Vec<f32>;
    /// Logits `[rows.len(), vocab]` (row-major, f32) at `rows` of `hidden`.
    fn row_logits(&self, hidden: &Self::T, rows: &[usize]) -> Vec<f32>;
    /// The same model without its LoRA adapter (sharing the base weights).
    fn without_adapter(&self) -> Self
    where
        Self: Sized;
}

/// The decoder's forward pass: final hidden states `[batch·len, hidden]` (after the last
/// norm) of `ids` (`[batch, len]` row-major).
pub fn forward<B: Backend>(
    m: &B,
    ids: &[u32],
    batch: usize,
    len: usize,
    positions: &Positions,
    segments: Option<&[u32]>,
    mut cache: Option<&mut B::Cache>,
) -> B::T {
    let cfg = m.config();
    assert_eq!(ids.len(), batch * len, "forward: ids are [batch, len]");
    let (hq, hkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    let tables = m.rope_tables(positions);
    let mut x = m.embed(ids);
    let mut pending: Option<B::T> = None;
    for li in 0..cfg.num_hidden_layers {
        let (xin, n1) = m.norm(Norm::Input(li), x, pending.take());
        let mut qkv = m.project(li, &[Proj::Q, Proj::K, Proj::V], &n1).into_iter();
        drop(n1);
        let (q, k, v) = match (qkv.next(), qkv.next(), qkv.next()) {
            (Some(q), Some(k), Some(v)) => (q, k, v),
            _ => unreachable!("three projections asked"),
        };
        let q = m.rope(q, hq, &tables);
        let k = m.rope(k, hkv, &tables);
        let shape = AttnShape::of_layer(cfg, li, batch, len);
        let o = m.attention(li, q, k, v, shape, segments, cache.as_deref_mut());
        let attn = m.project(li, &[Proj::O], &o).remove(0);
        drop(o);
        let (h, n2) = m.norm(Norm::Post(li), xin, Some(attn));
        let mut gu = m.project(li, &[Proj::Gate, Proj::Up], &n2).into_iter();
        drop(n2);
        let (g, u) = match (gu.next(), gu.next()) {
            (Some(g), Some(u)) => (g, u),
            _ => unreachable!("two projections asked"),
        };
        let act = m.swiglu(&g, &u);
        drop((g, u));
        pending = Some(m.project(li, &[Proj::Down], &act).remove(0));
        x = h;
    }
    if let Some(c) = cache {
        B::cache_advance(c, len);
    }
    m.norm(Norm::Final, x, pending).1
}
