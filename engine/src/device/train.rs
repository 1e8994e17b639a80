//! The operations the training step needs beyond the forward's [`Backend`]: each forward
//! operation in a form that keeps what its backward reads, and the backward operations
//! themselves. The step ([`crate::train::step`]) is written once against this trait;
//! [`crate::LlamaModel`] implements it on the host (the CPU kernels and BLAS products the step
//! always used), [`crate::cuda::CudaModel`] on an NVIDIA GPU.
//!
//! Gradients are named as PEFT and Hugging Face name the parameters (see [`Grads`]).

use std::collections::BTreeMap;

use super::{AttnShape, Backend, Norm, Proj};
use crate::error::Result;

/// Gradients by parameter name: LoRA factors as `{module}.lora_A` / `.lora_B`, other weights
/// under their Hugging Face key. Vectors (norms, biases) are `[1, d]`.
/// Without a type, host tensors.
pub type Grads<T = burn::tensor::Tensor<2>> = BTreeMap<String, T>;

/// What a projection's backward computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProjGrads {
    /// The LoRA factors' gradients.
    pub lora: bool,
    /// The frozen weight's (and bias's) gradients: full fine-tuning of this layer.
    pub weight: bool,
    /// The input's gradient.
    pub input: bool,
}

/// The training step's device operations.
pub trait TrainBackend: Backend {
    /// What a projection's training forward keeps for its backward (LoRA input, dropout mask).
    type Saved;
    /// The softmax statistics an attention forward keeps for its backward.
    type Lse;
    /// Per-row `1/rms` an RMSNorm forward keeps for its backward.
    type Rms;

    /// Whether this model can be trained on its device and dtype, LoRA factors only or also
    /// `weights` (full or partial fine-tuning); an error names what cannot.
    fn can_train(&self, weights: bool) -> Result<()>;
    /// Whether its attention takes segment ids with a shared prefix
    /// (`kernels::attention::segment`, `train::batches::shared_prefix`); the GPU's does not.
    fn takes_shared_prefixes(&self) -> bool {
        false
    }
    /// `(h, norm(h), 1/rms(h))` with `h = x + pending` (or `x`).
    fn norm_train(
        &self,
        which: Norm,
        x: Self::T,
        pending: Option<Self::T>,
    ) -> (Self::T, Self::T, Self::Rms);
    /// `norm(h)` again (backward recomputes normalised inputs instead of keeping them).
    fn norm_again(&self, which: Norm, h: &Self::T, rms: &Self::Rms) -> Self::T;
    /// RMSNorm backward: `skip + ∂ℓ/∂h` (the skip connection's gradient added in the same
    /// pass) and, when `want_dw`, the weight's gradient `[1, d]`.
    fn norm_backward(
        &self,
        which: Norm,
        h: &Self::T,
        rms: &Self::Rms,
        dy: Self::T,
        skip: Option<&Self::T>,
        want_dw: bool,
    ) -> (Self::T, Option<Self::T>);
    /// The projections `which` of `layer` on their shared input `x`, each with what its
    /// backward needs (`None`: no LoRA branch). `dropout[i]` seeds projection `i`'s LoRA
    /// dropout (`None`: off).
    fn project_train(
        &self,
        layer: usize,
        which: &[Proj],
        x: &Self::T,
        dropout: &[Option<u64>],
    ) -> Vec<(Self::T, Option<Self::Saved>)>;
    /// Backward of the projections `which` of `layer`, which all read `x`, for upstream
    /// gradients `dys`: parameter gradients into `grads` (as `want` asks) and, when
    /// `want.input`, the input gradient of all of them together.
    #[allow(clippy::too_many_arguments)]
    fn project_backward(
        &self,
        layer: usize,
        which: &[Proj],
        x: &Self::T,
        saved: &[Option<Self::Saved>],
        dys: Vec<Self::T>,
        want: ProjGrads,
        grads: &mut Grads<Self::T>,
    ) -> Option<Self::T>;
    /// RoPE's transpose on rows `[n, heads·d]` (the gradient through RoPE).
    fn rope_backward(&self, dx: Self::T, heads: usize, tables: &Self::Rope) -> Self::T;
    /// Causal attention of a training batch (no cache), keeping its softmax statistics.
    fn attention_train(
        &self,
        q: &Self::T,
        k: &Self::T,
        v: &Self::T,
        shape: AttnShape,
        segments: Option<&[u32]>,
    ) -> (Self::T, Self::Lse);
    /// Attention backward: `(dq, dk, dv)` from the forward's output and statistics.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        qkv: [&Self::T; 3],
        o: &Self::T,
        d_o: Self::T,
        lse: &Self::Lse,
        shape: AttnShape,
        segments: Option<&[u32]>,
    ) -> (Self::T, Self::T, Self::T);
    /// SwiGLU backward: `(∂ℓ/∂gate, ∂ℓ/∂up)`.
    fn swiglu_backward(&self, g: &Self::T, u: &Self::T, da: Self::T) -> (Self::T, Self::T);
    /// Rows `rows` of `x`.
    fn gather(&self, x: &Self::T, rows: &[usize]) -> Self::T;
    /// `log p(ids[i])` under the LM head for hidden rows `h` `[n, hidden]`,
    /// `∂ log p(ids[i]) / ∂hᵢ` per row `[n, hidden]`, and with `entropy` each row's entropy
    /// `−Σ p·log p` (`None` without).
    fn head_train(
        &self,
        h: &Self::T,
        ids: &[u32],
        entropy: bool,
    ) -> (Vec<f32>, Self::T, Option<Vec<f32>>);
    /// `Σᵢ scale[i]·dirs[i]` into row `rows[i]` of a zero `[n, hidden]` matrix (the hidden
    /// states' gradient from the head's).
    fn scatter_rows(&self, dirs: Self::T, scale: &[f32], rows: &[usize], n: usize) -> Self::T;
    /// The LM head weight's gradient for hidden rows `h` with upstream `g[i]` on
    /// `log p(ids[i])`: `Σᵢ gᵢ·(e_{yᵢ} − pᵢ)ᵀ hᵢ` (logits recomputed in chunks).
    fn head_weight_grad(&self, h: &Self::T, ids: &[u32], g: &[f32]) -> Self::T;
    /// The gradient reaching hidden rows from their logits' gradient `d_logits`
    /// `[n, vocab]` (host values, row-major): `d_logits · W_head` `[n, hidden]` (a loss over
    /// the whole distribution, such as distillation's, computes `d_logits` itself).
    fn head_input_grad(&self, d_logits: &[f32], n: usize) -> Self::T;
    /// The embedding's gradient: row `ids[i]` receives `dx[i]` (summed over repeats).
    fn embedding_grad(&self, ids: &[u32], dx: &Self::T) -> Self::T;
    /// Whether the LM head is the embedding (tied weights).
    fn head_tied(&self) -> bool;
    /// `a + b` (gradients of one parameter from two uses).
    fn add(&self, a: Self::T, b: &Self::T) -> Self::T;
    /// `x` `[n, d]` as host values, row-major (a head of the caller's own reads them).
    fn rows_to_host(&self, x: &Self::T) -> Vec<f32>;
    /// `[n, d]` from host values, row-major, in the dtype the step computes in.
    fn rows_from_host(&self, values: &[f32], n: usize, d: usize) -> Self::T;
    /// A parameter's gradient `[n, d]` from host values, row-major, in f32 (the optimiser's
    /// dtype; a head of the caller's own computes it on the host).
    fn grad_from_host(&self, values: &[f32], n: usize, d: usize) -> Self::T;
}
