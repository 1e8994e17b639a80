//! One training forward and backward pass through the decoder, by hand (see [`super::ops`]).
//!
//! What each layer keeps for backward (per token): its input `x`, the two RMSNorm factors, the
//! rotated `q`/`k` and `v`, the attention output `o`, the residual `h`, the MLP's `gate` and `up`,
//! and the small `x·Aᵀ` of every LoRA branch. Normalised inputs, attention probabilities, and
//! the SwiGLU product are recomputed in backward. The LM head runs only on trained positions,
//! in chunks, and keeps one `[n_targets, hidden]` gradient direction instead of logits.
//!
//! Gradients flow only where something is trained: below the lowest trained layer nothing is
//! computed, and the first layer's input gradient is skipped unless the embedding is trained.

use std::collections::BTreeMap;

use burn::tensor::{Bool, IndexingUpdateOp, Int, Tensor, TensorData};

use super::proj::{LoraIn, input_grad, lin_backward, lin_forward, lin_forward_shared};
use super::{fused, ops};
use crate::kernels::{self, Term, matmul_sum};
use crate::model::{LlamaModel, Positions, RmsNorm};

/// Which parameters receive gradients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trainable {
    /// LoRA factors of every projection that has an adapter attached.
    pub lora: bool,
    /// Blocks whose own weights (projections, norms) are trained, `first..num_layers`.
    pub first_full_layer: Option<usize>,
    /// The final norm.
    pub final_norm: bool,
    /// The LM head (the embedding when tied).
    pub head: bool,
    /// The input embedding (full fine-tuning).
    pub embedding: bool,
}

impl Trainable {
    /// LoRA only.
    pub fn lora() -> Self {
        Trainable {
            lora: true,
            first_full_layer: None,
            final_norm: false,
            head: false,
            embedding: false,
        }
    }

    /// Everything (full fine-tuning).
    pub fn full() -> Self {
        Trainable {
            lora: false,
            first_full_layer: Some(0),
            final_norm: true,
            head: true,
            embedding: true,
        }
    }

    /// The last `n` blocks, the final norm and the head.
    pub fn last_layers(n: usize, num_layers: usize) -> Self {
        Trainable {
            lora: false,
            first_full_layer: Some(num_layers.saturating_sub(n)),
            final_norm: true,
            head: true,
            embedding: false,
        }
    }

    fn layer_full(&self, i: usize) -> bool {
        self.first_full_layer.is_some_and(|f| i >= f)
    }

    /// The lowest layer gradients must reach.
    fn lowest(&self, num_layers: usize) -> usize {
        if self.lora || self.embedding {
            0
        } else {
            self.first_full_layer.unwrap_or(num_layers)
        }
    }
}

/// A trained position: the flat index `row·len + t` whose hidden state predicts `id`, and the
/// sequence it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// Flat index of the predicting position.
    pub pos: usize,
    /// Target token.
    pub id: u32,
    /// Sequence index in the batch (for per-sequence losses such as DPO).
    pub seq: usize,
}

/// A batch ready for a training step.
#[derive(Debug, Clone)]
pub struct StepBatch {
    /// Ids `[batch·len]`.
    pub ids: Vec<u32>,
    /// Rows.
    pub batch: usize,
    /// Padded length.
    pub len: usize,
    /// Positions of the tokens.
    pub positions: Positions,
    /// Segment per token (packing; 0 = padding), or `None` for one sequence per row.
    pub segments: Option<Vec<u32>>,
    /// Trained positions.
    pub targets: Vec<Target>,
}

/// Gradients by parameter name: LoRA factors as `{module}.lora_A` / `.lora_B`, other weights
/// under their Hugging Face key. Vectors (norms, biases) are `[1, d]`.
pub type Grads = BTreeMap<String, Tensor<2>>;

struct LayerSaved {
    x: Tensor<2>,
    r1: Tensor<2>,
    /// Rotated queries `[n, hq·d]`.
    q: Tensor<2>,
    /// Rotated keys `[n, hkv·d]`.
    k: Tensor<2>,
    v: Tensor<2>,
    o: Tensor<2>,
    lse: Option<Vec<f32>>,
    h: Tensor<2>,
    r2: Tensor<2>,
    gate: Tensor<2>,
    up: Tensor<2>,
    lora: BTreeMap<&'static str, LoraIn>,
}

/// The state a forward pass leaves for backward.
pub struct Forward {
    layers: Vec<LayerSaved>,
    x_final: Tensor<2>,
    r_final: Tensor<2>,
    mask: Option<Tensor<4, Bool>>,
    rope: fused::Rope,
    batch: usize,
    len: usize,
    segments: Option<Vec<u32>>,
    window: Option<usize>,
    cpu: bool,
    /// `log p(target)` per target `[n_targets]`.
    pub target_logps: Tensor<1>,
    /// `dℓ/dh` per target `[n_targets, hidden]`.
    grad_dirs: Tensor<2>,
    /// Final hidden rows of the targets (kept only when the head is trained).
    target_hidden: Option<Tensor<2>>,
    rows: Tensor<1, Int>,
    ids: Tensor<1, Int>,
    targets: Vec<Target>,
}

/// Rows of logits computed at once in the LM head: about 96 MiB of f32 logits (512 rows for
/// SmolLM2's 49 152-token vocabulary, 196 for Llama 3's 128 256). Fewer, larger chunks stream
/// the embedding through the cache fewer times: 512 rows instead of 256 made the SmolLM2 step
/// 2% faster in 12 of 16 interleaved steps, for 70 MB more peak memory.
fn head_chunk(vocab: usize) -> usize {
    const LOGIT_BYTES: usize = 96 << 20;
    (LOGIT_BYTES / (4 * vocab.max(1))).clamp(64, 4096)
}

/// Boolean attention mask `[b, 1→heads, t, t]` (true = hidden): causal, within segment.
fn train_mask(
    batch: &StepBatch,
    heads: usize,
    window: Option<usize>,
    device: &burn::tensor::Device,
) -> Tensor<4, Bool> {
    let (b, t) = (batch.batch, batch.len);
    let mut m = vec![false; b * t * t];
    for bi in 0..b {
        for qi in 0..t {
            for ki in 0..t {
                let mut hide = ki > qi;
                if let Some(w) = window {
                    hide |= qi >= ki + w;
                }
                if let Some(seg) = &batch.segments {
                    let (sq, sk) = (seg[bi * t + qi], seg[bi * t + ki]);
                    hide |= sk == 0 || sq != sk;
                    if sq == 0 {
                        hide = ki != qi;
                    }
                }
                m[(bi * t + qi) * t + ki] = hide;
            }
        }
    }
    Tensor::<4, Bool>::from_data(TensorData::new(m, [b, 1, t, t]), device).expand([b, heads, t, t])
}

/// The residual stream `x (+ pending)` and its RMSNorm: `(stream, normalised, r)`. The
/// previous block's MLP output (`pending`) joins the stream in the norm's own pass.
fn residual_norm(
    x: Tensor<2>,
    pending: Option<Tensor<2>>,
    norm: &RmsNorm,
) -> (Tensor<2>, Tensor<2>, Tensor<2>) {
    match pending {
        Some(down) => fused::add_rmsnorm(&x, &down, &norm.weight, norm.eps),
        None => {
            let (y, r) = fused::rmsnorm(&x, &norm.weight, norm.eps);
            (x, y, r)
        }
    }
}

/// The forward pass. `dropout_seed` seeds LoRA dropout (None disables it).
pub fn forward(
    model: &LlamaModel,
    batch: &StepBatch,
    trainable: &Trainable,
    dropout_seed: Option<u64>,
) -> Forward {
    let cfg = &model.config;
    let (b, t) = (batch.batch, batch.len);
    let n = b * t;
    let (hq, hkv, d) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    let device = &model.device;
    let ids = model.ids_tensor(&batch.ids, b, t);
    let flat_ids = ids.clone().reshape([n]);
    let mut x = burn::tensor::module::embedding(model.embed_tokens.clone(), ids)
        .reshape([n, cfg.hidden_size]);
    let (cos, sin) = model.rope.tables(&batch.positions, device);
    let (cos_rows, sin_rows) = model.rope.rows(&batch.positions);
    let rope = fused::Rope {
        cos,
        sin,
        cos_rows,
        sin_rows,
    };
    let window = cfg.sliding_window.iter().flatten().next().copied();
    let cpu = kernels::available(device);
    let mask = (!cpu).then(|| train_mask(batch, hq, window, device));
    let ctx = fused::AttnCtx {
        shape: kernels::attention::Shape {
            batch: b,
            len: t,
            hq,
            hkv,
            d,
        },
        segments: batch.segments.as_deref(),
        window,
        scale: 1.0 / (d as f64).sqrt(),
        mask: mask.clone(),
        cpu,
    };
    let mut layers = Vec::with_capacity(model.layers.len());
    let lowest = trainable.lowest(model.layers.len());
    // `x + pending` is the residual stream entering the next block.
    let mut pending: Option<Tensor<2>> = None;
    for (li, layer) in model.layers.iter().enumerate() {
        let seed = |m: u64| {
            dropout_seed.map(|s| s ^ ((li as u64) << 8 | m).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        };
        let a = &layer.self_attn;
        let ln1 = &layer.input_layernorm;
        let (xin, n1, r1) = residual_norm(x, pending.take(), ln1);
        let [(q, lq), (k, lk), (v, lv)] = lin_forward_shared(
            [&a.q_proj, &a.k_proj, &a.v_proj],
            &n1,
            [seed(0), seed(1), seed(2)],
        );
        drop(n1);
        let q = fused::rope(q, hq, &ctx, &rope, false);
        let k = fused::rope(k, hkv, &ctx, &rope, false);
        let (o, lse) = fused::attention(&q, &k, &v, &ctx);
        let (attn, lo) = lin_forward(&a.o_proj, &o, seed(3));
        let m = &layer.mlp;
        let ln2 = &layer.post_attention_layernorm;
        let (h, n2, r2) = fused::add_rmsnorm(&xin, &attn, &ln2.weight, ln2.eps);
        drop(attn);
        let [(gate, lg), (up, lu)] =
            lin_forward_shared([&m.gate_proj, &m.up_proj], &n2, [seed(4), seed(5)]);
        drop(n2);
        let act = fused::swiglu(&gate, &up);
        let (down, ld) = lin_forward(&m.down_proj, &act, seed(6));
        drop(act);
        x = h.clone();
        if li >= lowest {
            let mut lora = BTreeMap::new();
            for (name, saved) in [
                ("q_proj", lq),
                ("k_proj", lk),
                ("v_proj", lv),
                ("o_proj", lo),
                ("gate_proj", lg),
                ("up_proj", lu),
                ("down_proj", ld),
            ] {
                if let Some(saved) = saved {
                    lora.insert(name, saved);
                }
            }
            layers.push(LayerSaved {
                x: xin,
                r1,
                q,
                k,
                v,
                o,
                lse,
                h,
                r2,
                gate,
                up,
                lora,
            });
        }
        pending = Some(down);
    }
    let (x, hidden, r_final) = residual_norm(x, pending, &model.norm);
    let rows_v: Vec<i64> = batch.targets.iter().map(|t| t.pos as i64).collect();
    let rows = Tensor::<1, Int>::from_data(TensorData::new(rows_v, [batch.targets.len()]), device);
    let target_h = hidden.select(0, rows.clone());
    let ids: Vec<u32> = batch.targets.iter().map(|t| t.id).collect();
    let chunk = head_chunk(model.config.vocab_size);
    let (target_logps, grad_dirs) =
        ops::target_logprobs_with_grad(&target_h, &model.lm_head_weight(), &ids, chunk);
    Forward {
        layers,
        x_final: x,
        r_final,
        mask,
        rope,
        batch: b,
        len: t,
        segments: batch.segments.clone(),
        window,
        cpu,
        target_logps,
        grad_dirs,
        target_hidden: trainable.head.then_some(target_h),
        rows,
        ids: flat_ids,
        targets: batch.targets.clone(),
    }
}

/// Gradient of the LM head for target rows with upstream `g` per row:
/// `dW = Σᵢ gᵢ·(e_{yᵢ} − pᵢ)ᵀ hᵢ` (logits recomputed chunk by chunk).
fn head_grad(model: &LlamaModel, h: &Tensor<2>, targets: &[Target], g: &Tensor<1>) -> Tensor<2> {
    let w = model.lm_head_weight();
    let [vocab, hidden] = w.dims();
    let device = h.device();
    let mut dw = Tensor::<2>::zeros([vocab, hidden], &device);
    let n = targets.len();
    let mut start = 0;
    let chunk = head_chunk(vocab);
    while start < n {
        let end = (start + chunk).min(n);
        let hc = h.clone().slice([start..end, 0..hidden]);
        let gc = g
            .clone()
            .narrow(0, start, end - start)
            .unsqueeze_dim::<2>(1);
        let p = burn::tensor::activation::softmax(matmul_sum(&[Term::nt(&hc, &w, 1.0)]), 1);
        // dlogits = g·(onehot − p)
        let idx: Vec<i64> = targets[start..end].iter().map(|t| t.id as i64).collect();
        let idx2 = Tensor::<2, Int>::from_data(TensorData::new(idx, [end - start, 1]), &device);
        let onehot = Tensor::<2>::zeros([end - start, vocab], &device).scatter(
            1,
            idx2,
            Tensor::ones([end - start, 1], &device),
            IndexingUpdateOp::Add,
        );
        let dlogits = (onehot - p) * gc;
        dw = dw + matmul_sum(&[Term::tn(&dlogits, &hc, 1.0)]);
        start = end;
    }
    dw
}

/// The backward pass for upstream gradients `d_logps` (one per target, `∂loss/∂log p`).
pub fn backward(model: &LlamaModel, fwd: Forward, d_logps: &[f32], trainable: &Trainable) -> Grads {
    let cfg = &model.config;
    let device = &model.device;
    let mut grads = Grads::new();
    let n_t = d_logps.len();
    let g = Tensor::<1>::from_data(TensorData::new(d_logps.to_vec(), [n_t]), device);
    if trainable.head
        && let Some(h) = &fwd.target_hidden
    {
        let key = if model.lm_head.is_some() {
            "lm_head.weight"
        } else {
            "model.embed_tokens.weight"
        };
        grads.insert(key.into(), head_grad(model, h, &fwd.targets, &g));
    }
    let d_rows = fwd.grad_dirs * g.unsqueeze_dim::<2>(1);
    let [n, hidden] = fwd.x_final.dims();
    let d_hidden = Tensor::<2>::zeros([n, hidden], device).select_assign(
        0,
        fwd.rows,
        d_rows,
        IndexingUpdateOp::Add,
    );
    let (mut dx, dw) = fused::rmsnorm_backward(
        &fwd.x_final,
        &fwd.r_final,
        &model.norm.weight,
        d_hidden,
        None,
        trainable.final_norm,
    );
    if let Some(dw) = dw {
        grads.insert("model.norm.weight".into(), dw.unsqueeze::<2>());
    }
    let (hq, hkv, d) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    let ctx = fused::AttnCtx {
        shape: kernels::attention::Shape {
            batch: fwd.batch,
            len: fwd.len,
            hq,
            hkv,
            d,
        },
        segments: fwd.segments.as_deref(),
        window: fwd.window,
        scale: 1.0 / (d as f64).sqrt(),
        mask: fwd.mask.clone(),
        cpu: fwd.cpu,
    };
    let lowest = trainable.lowest(model.layers.len());
    let mut saved_layers = fwd.layers;
    for li in (lowest..model.layers.len()).rev() {
        let s = saved_layers
            .pop()
            .expect("one saved state per trained layer");
        let layer = &model.layers[li];
        let full = trainable.layer_full(li);
        let lora = trainable.lora;
        // The projections' input gradient feeds the layers below, the embedding, and this
        // layer's own input-norm weight.
        let want_input_dx = li > lowest || trainable.embedding || full;
        let prefix = format!("model.layers.{li}");
        let bw = |lin, name: &str, x: &Tensor<2>, dy: Tensor<2>, grads: &mut Grads| {
            let module = name.rsplit('.').next().unwrap_or(name);
            lin_backward(
                lin,
                &format!("{prefix}.{name}"),
                x,
                s.lora.get(module),
                dy,
                lora,
                full,
                grads,
            )
        };
        // MLP
        let m = &layer.mlp;
        let act = fused::swiglu(&s.gate, &s.up);
        let down = bw(&m.down_proj, "mlp.down_proj", &act, dx.clone(), &mut grads);
        let da = input_grad(&[down], &act, true, &mut grads).expect("wanted");
        drop(act);
        let (dg, du) = fused::swiglu_backward(&s.gate, &s.up, da);
        let ln2 = &layer.post_attention_layernorm;
        let (n2, _) = fused::rmsnorm(&s.h, &ln2.weight, ln2.eps);
        let gate = bw(&m.gate_proj, "mlp.gate_proj", &n2, dg, &mut grads);
        let up = bw(&m.up_proj, "mlp.up_proj", &n2, du, &mut grads);
        let dn2 = input_grad(&[gate, up], &n2, true, &mut grads).expect("wanted");
        drop(n2);
        // dh = dx + the norm's input gradient, in one pass.
        let (dh, dw2) = fused::rmsnorm_backward(&s.h, &s.r2, &ln2.weight, dn2, Some(&dx), full);
        drop(dx);
        if let Some(dw) = dw2 {
            grads.insert(
                format!("{prefix}.post_attention_layernorm.weight"),
                dw.unsqueeze::<2>(),
            );
        }
        // Attention
        let a = &layer.self_attn;
        let o = bw(&a.o_proj, "self_attn.o_proj", &s.o, dh.clone(), &mut grads);
        let d_o = input_grad(&[o], &s.o, true, &mut grads).expect("wanted");
        let (dq, dk, dv) =
            fused::attention_backward(&s.q, &s.k, &s.v, &s.o, d_o, s.lse.as_deref(), &ctx);
        let dq = fused::rope(dq, hq, &ctx, &fwd.rope, true);
        let dk = fused::rope(dk, hkv, &ctx, &fwd.rope, true);
        let ln1 = &layer.input_layernorm;
        let (n1, _) = fused::rmsnorm(&s.x, &ln1.weight, ln1.eps);
        let parts = [
            bw(&a.q_proj, "self_attn.q_proj", &n1, dq, &mut grads),
            bw(&a.k_proj, "self_attn.k_proj", &n1, dk, &mut grads),
            bw(&a.v_proj, "self_attn.v_proj", &n1, dv, &mut grads),
        ];
        let dn1 = input_grad(&parts, &n1, want_input_dx, &mut grads);
        drop(n1);
        if let Some(dn1) = dn1 {
            let (dx_sum, dw1) =
                fused::rmsnorm_backward(&s.x, &s.r1, &ln1.weight, dn1, Some(&dh), full);
            if let Some(dw) = dw1 {
                grads.insert(
                    format!("{prefix}.input_layernorm.weight"),
                    dw.unsqueeze::<2>(),
                );
            }
            dx = dx_sum;
        } else {
            dx = dh;
        }
    }
    if trainable.embedding {
        let [vocab, _] = model.embed_tokens.dims();
        let de = Tensor::<2>::zeros([vocab, hidden], device).select_assign(
            0,
            fwd.ids,
            dx,
            IndexingUpdateOp::Add,
        );
        let key = "model.embed_tokens.weight".to_string();
        let total = match grads.remove(&key) {
            Some(head) => head + de,
            None => de,
        };
        grads.insert(key, total);
    }
    grads
}

#[cfg(test)]
mod tests {
    use super::head_chunk;

    #[test]
    fn head_chunks_hold_about_96_mib_of_logits() {
        assert_eq!(head_chunk(49_152), 512); // SmolLM2
        assert_eq!(head_chunk(128_256), 196); // Llama 3
        assert_eq!(head_chunk(1_000), 4096); // tiny test models: capped
        assert_eq!(head_chunk(10_000_000), 64); // floor
    }
}
