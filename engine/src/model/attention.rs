//! Multi-head self-attention with grouped KV heads (GQA), RoPE, optional q/k/v biases and an
//! optional sliding window, as transformers' `LlamaAttention` / `Qwen2Attention` /
//! `MistralAttention`: `softmax(q·kᵀ/√d + mask)·v`, then `o_proj`.
//!
//! # Shapes
//! - input `[batch, seq, hidden]` → q `[batch, heads, seq, d]`, k/v `[batch, kv_heads, seq, d]`
//!   → output `[batch, seq, hidden]`.

use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Device, Tensor, TensorData};

use crate::config::ModelConfig;
use crate::error::Result;
use crate::kernels::attention::segment;
use crate::model::rope::RotaryEmbedding;
use crate::model::{Linear, Loader};
use crate::train::ops::repeat_kv;

/// Self-attention of one decoder block.
#[derive(Debug, Clone)]
pub struct Attention {
    /// `q_proj` `[heads·d, hidden]`.
    pub q_proj: Linear,
    /// `k_proj` `[kv_heads·d, hidden]`.
    pub k_proj: Linear,
    /// `v_proj` `[kv_heads·d, hidden]`.
    pub v_proj: Linear,
    /// `o_proj` `[hidden, heads·d]`.
    pub o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// Sliding window of this layer, if any.
    pub sliding_window: Option<usize>,
}

/// Which keys each query may see, beyond causality.
#[derive(Debug, Clone, Copy)]
pub struct MaskSpec<'a> {
    /// Per-token segment ids `[batch·seq]` of the current tokens: a query sees only keys of its
    /// own segment (packing). `0` marks padding, which no query sees.
    pub segments: Option<&'a [u32]>,
}

impl Attention {
    /// Loads `{prefix}.{q,k,v,o}_proj`.
    pub fn load(
        loader: &Loader<'_>,
        prefix: &str,
        cfg: &ModelConfig,
        sliding_window: Option<usize>,
    ) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (nq, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let lin = |name: &str, out, inp, bias| {
            Linear::load(loader, &format!("{prefix}.{name}"), out, inp, bias)
        };
        Ok(Attention {
            q_proj: lin("q_proj", nq * d, h, cfg.qkv_bias)?,
            k_proj: lin("k_proj", nkv * d, h, cfg.qkv_bias)?,
            v_proj: lin("v_proj", nkv * d, h, cfg.qkv_bias)?,
            o_proj: lin("o_proj", h, nq * d, cfg.o_bias)?,
            heads: nq,
            kv_heads: nkv,
            head_dim: d,
            sliding_window,
        })
    }

    /// Applies attention. `cos`/`sin` come from [`RotaryEmbedding::tables`].
    pub fn forward(
        &self,
        x: Tensor<3>,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
        mask: MaskSpec<'_>,
    ) -> Tensor<3> {
        let [b, t, _] = x.dims();
        let (d, nq, nkv) = (self.head_dim, self.heads, self.kv_heads);
        let q = self
            .q_proj
            .forward(x.clone())
            .reshape([b, t, nq, d])
            .swap_dims(1, 2);
        let k = self
            .k_proj
            .forward(x.clone())
            .reshape([b, t, nkv, d])
            .swap_dims(1, 2);
        let v = self
            .v_proj
            .forward(x)
            .reshape([b, t, nkv, d])
            .swap_dims(1, 2);
        let q = RotaryEmbedding::apply(q, cos, sin);
        let k = RotaryEmbedding::apply(k, cos, sin);
        let tk = k.dims()[2];
        let k = repeat_kv(k, nq / nkv);
        let v = repeat_kv(v, nq / nkv);
        let explicit = mask.segments.is_some() || self.sliding_window.is_some_and(|w| w < tk);
        let bool_mask = explicit.then(|| {
            build_mask(
                b,
                nq,
                t,
                tk,
                mask.segments,
                self.sliding_window,
                &[],
                &q.device(),
            )
        });
        let options = AttentionModuleOptions {
            scale: Some(1.0 / (d as f64).sqrt()),
            softcap: None,
            is_causal: !explicit,
        };
        let out = attention(q, k, v, bool_mask, None, options);
        let out = out.swap_dims(1, 2).reshape([b, t, nq * d]);
        self.o_proj.forward(out)
    }
}

/// Builds the boolean mask (`true` = hidden) for `tq` queries that are the last `tq` of `tk`
/// positions: causal, within-segment, within the sliding window, and past each row's leading
/// padding (`pads[row]` keys; empty = none).
#[allow(clippy::too_many_arguments)]
pub(crate) fn build_mask(
    b: usize,
    heads: usize,
    tq: usize,
    tk: usize,
    segments: Option<&[u32]>,
    window: Option<usize>,
    pads: &[usize],
    device: &Device,
) -> Tensor<4, Bool> {
    let offset = tk - tq;
    let mut m = vec![false; b * tq * tk];
    for bi in 0..b {
        for qi in 0..tq {
            let qpos = qi + offset;
            for ki in 0..tk {
                let mut hide = ki > qpos || pads.get(bi).is_some_and(|&p| ki < p);
                if let Some(w) = window {
                    hide |= qpos - ki.min(qpos) >= w;
                }
                if let Some(seg) = segments {
                    // Segments describe the current tokens only (no cache with packing); a
                    // query also sees its shared prefix's segment (kernels::attention::segment).
                    let sq = seg[bi * tq + qi];
                    let sk = seg[bi * tk + ki];
                    let prefix = segment::prefix(sq);
                    hide |= sk == 0 || (sq != sk && (prefix == 0 || sk != prefix));
                    // A padding query sees only itself so that its softmax row stays finite.
                    if sq == 0 {
                        hide = ki != qpos;
                    }
                }
                m[(bi * tq + qi) * tk + ki] = hide;
            }
        }
    }
    Tensor::<4, Bool>::from_data(TensorData::new(m, [b, 1, tq, tk]), device)
        .expand([b, heads, tq, tk])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_prefix_segments_see_the_prompt_and_themselves() {
        // A prompt of two tokens, then a one-token and a two-token continuation, then padding.
        let c1 = segment::with_prefix(2, 1);
        let c2 = segment::with_prefix(3, 1);
        let seg = [1, 1, c1, c2, c2, 0];
        let mask = build_mask(1, 1, 6, 6, Some(&seg), None, &[], &Device::flex());
        let hidden: Vec<bool> = mask.into_data().try_to_vec::<bool>().unwrap();
        let seen = |q: usize| -> Vec<usize> { (0..6).filter(|&k| !hidden[q * 6 + k]).collect() };
        assert_eq!(seen(1), vec![0, 1]);
        assert_eq!(seen(2), vec![0, 1, 2]);
        assert_eq!(seen(3), vec![0, 1, 3]);
        assert_eq!(seen(4), vec![0, 1, 3, 4]);
        assert_eq!(seen(5), vec![5]);
    }
}
