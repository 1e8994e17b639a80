//! One training forward and backward pass through the decoder, by hand, written once for
//! every device against [`TrainBackend`] (the host's CPU kernels, or the GPU's).
//!
//! What each layer keeps for backward (per token): its input `x`, the two RMSNorm factors, the
//! rotated `q`/`k` and `v`, the attention output `o`, the residual `h`, the MLP's `gate` and `up`,
//! and the small `x·Aᵀ` of every LoRA branch. Normalised inputs, attention probabilities, and
//! the SwiGLU product are recomputed in backward. The LM head runs only on trained positions,
//! in chunks, and keeps one `[n_targets, hidden]` gradient direction instead of logits.
//! With gradient checkpointing ([`StepOptions::gradient_checkpointing`]) a block keeps only its
//! input, and backward recomputes the block's forward (same dropout masks) just before its
//! backward, so activations of one block are alive at a time.
//!
//! Gradients flow only where something is trained: below the lowest trained layer nothing is
//! computed, and the first layer's input gradient is skipped unless the embedding is trained.

use crate::device::{AttnShape, Norm, Proj, ProjGrads, TrainBackend};
use crate::model::Positions;

pub use crate::device::Grads;

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
    /// Nothing: a forward pass without gradients (reference and old log-probabilities,
    /// rewards, evaluation).
    pub fn nothing() -> Self {
        Trainable {
            lora: false,
            ..Trainable::lora()
        }
    }

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

    /// Whether weights (not only LoRA factors) are trained.
    pub fn trains_weights(&self) -> bool {
        self.first_full_layer.is_some() || self.final_norm || self.head || self.embedding
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
    /// Tokens of the batch that are not padding (what tokens/s counts).
    pub real_tokens: usize,
}

impl StepBatch {
    /// The same rows as an evaluation batch (trained positions as its mask), for passes
    /// without gradients over a step's rows (a preference loss's reference).
    ///
    /// # Panics
    /// On a batch whose rows share prefixes (`batches::shared_prefix`: a target is not always
    /// the token after its position there).
    pub fn token_batch(&self) -> crate::eval::TokenBatch {
        assert!(
            self.segments.as_ref().is_none_or(|s| s
                .iter()
                .all(|&g| crate::kernels::attention::segment::prefix(g) == 0)),
            "token_batch of a batch with shared prefixes"
        );
        let mut mask = vec![0u8; self.ids.len()];
        for t in &self.targets {
            mask[t.pos + 1] = 1;
        }
        crate::eval::TokenBatch {
            ids: self.ids.clone(),
            mask,
            batch: self.batch,
            len: self.len,
        }
    }
}

const QKV: [Proj; 3] = [Proj::Q, Proj::K, Proj::V];
const GATE_UP: [Proj; 2] = [Proj::Gate, Proj::Up];

/// What one layer's forward keeps for its backward.
struct LayerSaved<B: TrainBackend> {
    /// The residual stream entering the block.
    x: B::T,
    r1: B::Rms,
    /// Rotated queries `[n, hq·d]`.
    q: B::T,
    /// Rotated keys `[n, hkv·d]`.
    k: B::T,
    v: B::T,
    o: B::T,
    lse: B::Lse,
    /// The residual stream after attention.
    h: B::T,
    r2: B::Rms,
    gate: B::T,
    up: B::T,
    qkv_in: Vec<Option<B::Saved>>,
    o_in: Vec<Option<B::Saved>>,
    gate_up_in: Vec<Option<B::Saved>>,
    down_in: Vec<Option<B::Saved>>,
}

/// The state a forward pass leaves for backward.
pub struct Forward<B: TrainBackend> {
    layers: Vec<Kept<B>>,
    x_final: B::T,
    r_final: B::Rms,
    rope: B::Rope,
    batch: usize,
    len: usize,
    segments: Option<Vec<u32>>,
    dropout_seed: Option<u64>,
    /// The loss scale backward multiplies the upstream gradients by.
    loss_scale: f32,
    /// `log p(target)` per target (empty when [`StepOptions::hidden_head`]).
    pub target_logps: Vec<f32>,
    /// The entropy of the distribution at each target (with [`StepOptions::entropy`]).
    pub target_entropy: Option<Vec<f32>>,
    /// `1 / temperature` of the head's logits ([`StepOptions::temperature`]).
    inv_temperature: f32,
    /// `∂ log p / ∂h` per target `[n_targets, hidden]` (`None` when
    /// [`StepOptions::hidden_head`]).
    grad_dirs: Option<B::T>,
    /// Final hidden rows of the targets (kept when the LM head is trained or the caller's
    /// own head reads them).
    target_hidden: Option<B::T>,
    rows: Vec<usize>,
    target_ids: Vec<u32>,
    ids: Vec<u32>,
}

impl<B: TrainBackend> Forward<B> {
    /// How many blocks keep only their input for backward (gradient checkpointing), and how
    /// many keep everything their backward reads.
    pub fn kept_layers(&self) -> (usize, usize) {
        let inputs = self
            .layers
            .iter()
            .filter(|k| matches!(k, Kept::Input(_)))
            .count();
        (inputs, self.layers.len() - inputs)
    }

    /// The final (normalised) hidden states of the targets `[n_targets, hidden]`, row-major,
    /// for a head of the caller's own ([`StepOptions::hidden_head`]: a reward model's score,
    /// a distillation loss over the whole vocabulary).
    pub fn target_hidden(&self, m: &B) -> Option<Vec<f32>> {
        self.target_hidden.as_ref().map(|h| m.rows_to_host(h))
    }

    /// The same rows as [`Forward::target_hidden`], where they live (on the device), for
    /// the LM head again: a loss over the whole distribution reads their logits in chunks.
    pub fn target_states(&self) -> Option<&B::T> {
        self.target_hidden.as_ref()
    }
}

/// Outputs and saved states of [`TrainBackend::project_train`], apart.
fn split<T, S>(v: Vec<(T, Option<S>)>) -> (Vec<T>, Vec<Option<S>>) {
    v.into_iter().unzip()
}

fn take3<T>(v: Vec<T>) -> (T, T, T) {
    let mut it = v.into_iter();
    match (it.next(), it.next(), it.next()) {
        (Some(a), Some(b), Some(c)) => (a, b, c),
        _ => unreachable!("three projections asked"),
    }
}

fn take2<T>(v: Vec<T>) -> (T, T) {
    let mut it = v.into_iter();
    match (it.next(), it.next()) {
        (Some(a), Some(b)) => (a, b),
        _ => unreachable!("two projections asked"),
    }
}

fn take1<T>(v: Vec<T>) -> T {
    v.into_iter().next().expect("one projection asked")
}

/// How a forward pass runs, apart from what it trains.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepOptions {
    /// Seeds LoRA dropout (`None`: off).
    pub dropout_seed: Option<u64>,
    /// Keep only each block's input and recompute the block's forward in backward
    /// (transformers' `gradient_checkpointing`): activation memory of one block instead of
    /// every block, for about one more forward pass of compute.
    pub gradient_checkpointing: bool,
    /// Loss scaling for fp16 (`torch.amp.GradScaler`): backward starts from the loss times
    /// `2^loss_scale_exp`, so that small gradients stay representable in f16; the optimiser
    /// step divides them back ([`crate::train::params::TrainModel::optimizer_step`]). 0: none.
    pub loss_scale_exp: i32,
    /// Skip the LM head: forward keeps the targets' final hidden states
    /// ([`Forward::target_hidden`]) and backward starts from their gradient
    /// ([`backward_hidden`]).
    pub hidden_head: bool,
    /// The LM head's logits are divided by this before the softmax (TRL's GRPO computes its
    /// log-probabilities, and their entropy, at the sampling temperature); `None`: 1.
    pub temperature: Option<f32>,
    /// Compute the entropy of the distribution at each target ([`Forward::target_entropy`]).
    pub entropy: bool,
}

impl StepOptions {
    /// The loss scale `2^loss_scale_exp`.
    pub fn loss_scale(&self) -> f32 {
        2f32.powi(self.loss_scale_exp)
    }

    /// The options of micro-batch `i` of a step (its own dropout seed).
    pub fn micro(&self, i: usize) -> StepOptions {
        StepOptions {
            dropout_seed: self.dropout_seed.map(|s| s ^ (i as u64) << 48),
            ..*self
        }
    }
}

/// What forward keeps of one block: everything its backward reads, or (gradient checkpointing)
/// only its input, from which backward recomputes the rest.
enum Kept<B: TrainBackend> {
    All(Box<LayerSaved<B>>),
    Input(B::T),
}

/// The dropout seed of projection `k` of layer `li`.
fn layer_seed(seed: Option<u64>, li: usize, k: u64) -> Option<u64> {
    seed.map(|s| s ^ ((li as u64) << 8 | k).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// One block's forward on the residual stream `x (+ pending)`: what its backward reads, and
/// the down projection's output (the stream entering the next block is `saved.h + down`).
#[allow(clippy::too_many_arguments)]
fn layer_forward<B: TrainBackend>(
    m: &B,
    li: usize,
    x: B::T,
    pending: Option<B::T>,
    rope: &B::Rope,
    shape: AttnShape,
    segments: Option<&[u32]>,
    dropout_seed: Option<u64>,
) -> (LayerSaved<B>, B::T) {
    let cfg = m.config();
    let (hq, hkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    let seed = |k| layer_seed(dropout_seed, li, k);
    let (xin, n1, r1) = m.norm_train(Norm::Input(li), x, pending);
    let (qkv, qkv_in) = split(m.project_train(li, &QKV, &n1, &[seed(0), seed(1), seed(2)]));
    drop(n1);
    let (q, k, v) = take3(qkv);
    let q = m.rope(q, hq, rope);
    let k = m.rope(k, hkv, rope);
    let (o, lse) = m.attention_train(&q, &k, &v, shape, segments);
    let (attn, o_in) = split(m.project_train(li, &[Proj::O], &o, &[seed(3)]));
    let (h, n2, r2) = m.norm_train(Norm::Post(li), xin.clone(), Some(take1(attn)));
    let (gu, gate_up_in) = split(m.project_train(li, &GATE_UP, &n2, &[seed(4), seed(5)]));
    drop(n2);
    let (gate, up) = take2(gu);
    let act = m.swiglu(&gate, &up);
    let (down, down_in) = split(m.project_train(li, &[Proj::Down], &act, &[seed(6)]));
    drop(act);
    let saved = LayerSaved {
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
        qkv_in,
        o_in,
        gate_up_in,
        down_in,
    };
    (saved, take1(down))
}

/// The forward pass.
pub fn forward<B: TrainBackend>(
    m: &B,
    batch: &StepBatch,
    trainable: &Trainable,
    options: &StepOptions,
) -> Forward<B> {
    let cfg = m.config();
    let (b, t) = (batch.batch, batch.len);
    assert_eq!(batch.ids.len(), b * t, "forward: ids are [batch, len]");
    let num_layers = cfg.num_hidden_layers;
    let rope = m.rope_tables(&batch.positions);
    let segments = batch.segments.as_deref();
    let lowest = trainable.lowest(num_layers);
    let mut x = m.embed(&batch.ids);
    let mut layers = Vec::with_capacity(num_layers - lowest.min(num_layers));
    // `x + pending` is the residual stream entering the next block.
    let mut pending: Option<B::T> = None;
    for li in 0..num_layers {
        let shape = AttnShape::of_layer(cfg, li, b, t);
        let checkpointed = options.gradient_checkpointing && li >= lowest;
        let (x_in, pending_in) = if checkpointed {
            // The block's input, summed once: backward recomputes the block from it.
            let xin = match pending.take() {
                Some(p) => m.add(x, &p),
                None => x,
            };
            layers.push(Kept::Input(xin.clone()));
            (xin, None)
        } else {
            (x, pending.take())
        };
        let (saved, down) = layer_forward(
            m,
            li,
            x_in,
            pending_in,
            &rope,
            shape,
            segments,
            options.dropout_seed,
        );
        x = saved.h.clone();
        if li >= lowest && !checkpointed {
            layers.push(Kept::All(Box::new(saved)));
        }
        pending = Some(down);
    }
    let (x, hidden, r_final) = m.norm_train(Norm::Final, x, pending);
    let rows: Vec<usize> = batch.targets.iter().map(|t| t.pos).collect();
    let target_ids: Vec<u32> = batch.targets.iter().map(|t| t.id).collect();
    let mut target_h = m.gather(&hidden, &rows);
    drop(hidden);
    let temperature = options
        .temperature
        .filter(|&t| t != 1.0 && !options.hidden_head);
    if let Some(t) = temperature {
        // logits / t = W·(h / t): the head (and its weight's gradient) reads the scaled rows.
        let mut v = m.rows_to_host(&target_h);
        v.iter_mut().for_each(|x| *x /= t);
        target_h = m.rows_from_host(&v, rows.len(), m.config().hidden_size);
    }
    let (target_logps, grad_dirs, target_entropy) = if options.hidden_head {
        (Vec::new(), None, None)
    } else {
        let (lp, dirs, e) = m.head_train(&target_h, &target_ids, options.entropy);
        (lp, Some(dirs), e)
    };
    let keep_hidden = options.hidden_head || trainable.head;
    Forward {
        layers,
        x_final: x,
        r_final,
        rope,
        batch: b,
        len: t,
        segments: batch.segments.clone(),
        dropout_seed: options.dropout_seed,
        loss_scale: options.loss_scale(),
        target_logps,
        target_entropy,
        inv_temperature: temperature.map_or(1.0, |t| 1.0 / t),
        grad_dirs,
        target_hidden: keep_hidden.then_some(target_h),
        rows,
        target_ids,
        ids: batch.ids.clone(),
    }
}

/// Summed `log p` of each sequence's targets (`seqs` sequences, by [`Target::seq`]) under `m`,
/// without gradients: the train step's forward on `batch` as it is laid out (rows of one
/// sequence, packed or with shared prefixes alike).
pub fn sequence_sums<B: TrainBackend>(m: &B, batch: &StepBatch, seqs: usize) -> Vec<f64> {
    let fwd = forward(m, batch, &Trainable::nothing(), &StepOptions::default());
    let mut sums = vec![0f64; seqs];
    for (t, lp) in batch.targets.iter().zip(&fwd.target_logps) {
        sums[t.seq] += f64::from(*lp);
    }
    sums
}

/// The backward pass for upstream gradients `d_logps` (one per target, `∂loss/∂log p`).
pub fn backward<B: TrainBackend>(
    m: &B,
    mut fwd: Forward<B>,
    d_logps: &[f32],
    trainable: &Trainable,
) -> Grads<B::T> {
    assert_eq!(
        d_logps.len(),
        fwd.rows.len(),
        "one upstream gradient per target"
    );
    let grad_dirs = fwd
        .grad_dirs
        .take()
        .expect("backward follows a forward through the LM head (hidden_head: backward_hidden)");
    let scaled: Vec<f32>;
    let d_logps = if fwd.loss_scale == 1.0 {
        d_logps
    } else {
        // A power of two: exact, so unscaling in the optimiser step gives the same bits.
        scaled = d_logps.iter().map(|d| d * fwd.loss_scale).collect();
        &scaled
    };
    let mut grads = Grads::new();
    if trainable.head
        && let Some(h) = &fwd.target_hidden
    {
        let key = if m.head_tied() {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        grads.insert(key.into(), m.head_weight_grad(h, &fwd.target_ids, d_logps));
    }
    // The head read h / temperature: the hidden rows' gradient carries 1 / temperature.
    let tempered: Vec<f32>;
    let d_rows = if fwd.inv_temperature == 1.0 {
        d_logps
    } else {
        tempered = d_logps.iter().map(|d| d * fwd.inv_temperature).collect();
        &tempered
    };
    let d_hidden = m.scatter_rows(grad_dirs, d_rows, &fwd.rows, fwd.batch * fwd.len);
    backward_body(m, fwd, d_hidden, grads, trainable)
}

/// The backward pass of a forward with [`StepOptions::hidden_head`], from the gradient of the
/// loss with respect to the targets' final hidden states `[n_targets, hidden]`, row-major
/// (scaled by the forward's loss scale here). The LM head is not trained on this path.
pub fn backward_hidden<B: TrainBackend>(
    m: &B,
    fwd: Forward<B>,
    d_hidden: &[f32],
    trainable: &Trainable,
) -> Grads<B::T> {
    let hidden = m.config().hidden_size;
    let n = fwd.rows.len();
    assert_eq!(
        d_hidden.len(),
        n * hidden,
        "one hidden-state gradient row per target"
    );
    assert!(
        !trainable.head,
        "the LM head takes no gradient from a head of the caller's own"
    );
    let d = m.rows_from_host(d_hidden, n, hidden);
    let scale = vec![fwd.loss_scale; n];
    let d_hidden = m.scatter_rows(d, &scale, &fwd.rows, fwd.batch * fwd.len);
    backward_body(m, fwd, d_hidden, Grads::new(), trainable)
}

/// Backward from the final hidden states' gradient `[batch·len, hidden]` down through the
/// final norm, the trained blocks and the embedding.
fn backward_body<B: TrainBackend>(
    m: &B,
    fwd: Forward<B>,
    d_hidden: B::T,
    mut grads: Grads<B::T>,
    trainable: &Trainable,
) -> Grads<B::T> {
    let cfg = m.config();
    let num_layers = cfg.num_hidden_layers;
    let (hq, hkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    let (b, t) = (fwd.batch, fwd.len);
    let segments = fwd.segments.as_deref();
    let (mut dx, dw) = m.norm_backward(
        Norm::Final,
        &fwd.x_final,
        &fwd.r_final,
        d_hidden,
        None,
        trainable.final_norm,
    );
    if let Some(dw) = dw {
        grads.insert("model.norm.weight".into(), dw);
    }
    let lowest = trainable.lowest(num_layers);
    let mut saved_layers = fwd.layers;
    for li in (lowest..num_layers).rev() {
        let shape = AttnShape::of_layer(cfg, li, b, t);
        let s = match saved_layers
            .pop()
            .expect("one saved state per trained layer")
        {
            Kept::All(s) => *s,
            Kept::Input(x) => {
                let (rope, seed) = (&fwd.rope, fwd.dropout_seed);
                layer_forward(m, li, x, None, rope, shape, segments, seed).0
            }
        };
        let full = trainable.layer_full(li);
        let want = |input| ProjGrads {
            lora: trainable.lora,
            weight: full,
            input,
        };
        let prefix = format!("model.layers.{li}");
        // MLP
        let act = m.swiglu(&s.gate, &s.up);
        let da = m.project_backward(
            li,
            &[Proj::Down],
            &act,
            &s.down_in,
            vec![dx.clone()],
            want(true),
            &mut grads,
        );
        drop(act);
        let (dg, du) = m.swiglu_backward(&s.gate, &s.up, da.expect("asked"));
        let n2 = m.norm_again(Norm::Post(li), &s.h, &s.r2);
        let dn2 = m.project_backward(
            li,
            &GATE_UP,
            &n2,
            &s.gate_up_in,
            vec![dg, du],
            want(true),
            &mut grads,
        );
        drop(n2);
        // dh = dx + the norm's input gradient, in one pass.
        let (dh, dw2) = m.norm_backward(
            Norm::Post(li),
            &s.h,
            &s.r2,
            dn2.expect("asked"),
            Some(&dx),
            full,
        );
        drop(dx);
        if let Some(dw) = dw2 {
            grads.insert(format!("{prefix}.post_attention_layernorm.weight"), dw);
        }
        // Attention
        let d_o = m.project_backward(
            li,
            &[Proj::O],
            &s.o,
            &s.o_in,
            vec![dh.clone()],
            want(true),
            &mut grads,
        );
        let (dq, dk, dv) = m.attention_backward(
            [&s.q, &s.k, &s.v],
            &s.o,
            d_o.expect("asked"),
            &s.lse,
            shape,
            segments,
        );
        let dq = m.rope_backward(dq, hq, &fwd.rope);
        let dk = m.rope_backward(dk, hkv, &fwd.rope);
        // The projections' input gradient feeds the layers below, the embedding, and this
        // layer's own input-norm weight.
        let want_input = li > lowest || trainable.embedding || full;
        let n1 = m.norm_again(Norm::Input(li), &s.x, &s.r1);
        let dn1 = m.project_backward(
            li,
            &QKV,
            &n1,
            &s.qkv_in,
            vec![dq, dk, dv],
            want(want_input),
            &mut grads,
        );
        drop(n1);
        dx = match dn1 {
            Some(dn1) => {
                let (dx_sum, dw1) =
                    m.norm_backward(Norm::Input(li), &s.x, &s.r1, dn1, Some(&dh), full);
                if let Some(dw) = dw1 {
                    grads.insert(format!("{prefix}.input_layernorm.weight"), dw);
                }
                dx_sum
            }
            None => dh,
        };
    }
    if trainable.embedding {
        let de = m.embedding_grad(&fwd.ids, &dx);
        let key = "model.embed_tokens.weight".to_string();
        let total = match grads.remove(&key) {
            Some(head) => m.add(head, &de),
            None => de,
        };
        grads.insert(key, total);
    }
    grads
}
