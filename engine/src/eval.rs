//! Evaluation: log-probabilities of trained tokens, the SFT loss (mean cross-entropy over
//! trained tokens) and DPO metrics, computed without materialising logits for positions that
//! are not trained.
//!
//! Conventions (as transformers/TRL): the label of position `t` is `ids[t+1]`, counted when
//! `mask[t+1] == 1`; a sequence log-probability is the sum of its completion tokens'
//! log-probabilities.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};

use crate::device::Backend;
use crate::model::{LlamaModel, Positions};
use crate::tokenizer::Encoded;

/// Rows of logits computed at once (bounds memory at `rows × vocab` floats).
const LOGIT_CHUNK: usize = 512;

/// A right-padded batch of sequences.
#[derive(Debug, Clone)]
pub struct TokenBatch {
    /// Ids `[batch·len]`, padded with `pad`.
    pub ids: Vec<u32>,
    /// Trained-token mask `[batch·len]` (0 on padding).
    pub mask: Vec<u8>,
    /// Number of sequences.
    pub batch: usize,
    /// Padded length.
    pub len: usize,
}

impl TokenBatch {
    /// Pads `seqs` on the right to their longest length.
    pub fn pad<S: std::borrow::Borrow<Encoded>>(seqs: &[S], pad: u32) -> Self {
        let len = seqs.iter().map(|s| s.borrow().ids.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(seqs.len() * len);
        let mut mask = Vec::with_capacity(seqs.len() * len);
        for s in seqs {
            let s = s.borrow();
            ids.extend_from_slice(&s.ids);
            ids.resize(ids.len() + len - s.ids.len(), pad);
            mask.extend_from_slice(&s.mask);
            mask.resize(mask.len() + len - s.mask.len(), 0);
        }
        TokenBatch {
            ids,
            mask,
            batch: seqs.len(),
            len,
        }
    }

    /// `(row, flat index of the predicting position, target id)` for every trained target.
    pub fn targets(&self) -> Vec<(usize, usize, u32)> {
        let mut out = Vec::new();
        for r in 0..self.batch {
            for t in 0..self.len.saturating_sub(1) {
                let next = r * self.len + t + 1;
                if self.mask[next] == 1 {
                    out.push((r, r * self.len + t, self.ids[next]));
                }
            }
        }
        out
    }
}

/// Log-probabilities `log p(target)` for rows of hidden states `[n, hidden]`, computed in
/// chunks of [`LOGIT_CHUNK`] rows.
pub fn gather_logprobs(model: &LlamaModel, hidden: Tensor<2>, targets: &[u32]) -> Tensor<1> {
    let n = targets.len();
    let head = model.lm_head_weight().transpose();
    let device = hidden.device();
    let mut parts = Vec::new();
    let mut start = 0;
    while start < n {
        let end = (start + LOGIT_CHUNK).min(n);
        let h = hidden.clone().slice([start..end, 0..hidden.dims()[1]]);
        let logits = h.matmul(head.clone());
        let logits = if logits.dtype() == burn::tensor::DType::F32 {
            logits
        } else {
            logits.cast(burn::tensor::DType::F32)
        };
        let lp = log_softmax(logits, 1);
        let idx: Vec<i64> = targets[start..end].iter().map(|&t| t as i64).collect();
        let idx = Tensor::<2, Int>::from_data(TensorData::new(idx, [end - start, 1]), &device);
        parts.push(lp.gather(1, idx).reshape([end - start]));
        start = end;
    }
    if parts.len() == 1 {
        parts.pop().expect("one part")
    } else {
        Tensor::cat(parts, 0)
    }
}

/// Per-target log-probabilities of a batch (on the host, whatever the device) and the row
/// each belongs to.
pub fn target_logprobs_on<B: Backend>(model: &B, batch: &TokenBatch) -> (Vec<f32>, Vec<usize>) {
    let targets = batch.targets();
    let positions = Positions::Range {
        start: 0,
        len: batch.len,
        batch: batch.batch,
    };
    let hidden = crate::device::forward(
        model,
        &batch.ids,
        batch.batch,
        batch.len,
        &positions,
        None,
        None,
    );
    let rows: Vec<usize> = targets.iter().map(|&(_, p, _)| p).collect();
    let ids: Vec<u32> = targets.iter().map(|&(_, _, id)| id).collect();
    (
        model.target_logprobs(&hidden, &rows, &ids),
        targets.iter().map(|&(r, _, _)| r).collect(),
    )
}

/// Sums of trained-token log-probabilities per sequence, and trained-token counts.
pub fn sequence_logprobs<B: Backend>(model: &B, batch: &TokenBatch) -> (Vec<f64>, Vec<usize>) {
    let (values, rows) = target_logprobs_on(model, batch);
    let mut sums = vec![0f64; batch.batch];
    let mut counts = vec![0usize; batch.batch];
    for (v, r) in values.iter().zip(rows) {
        sums[r] += *v as f64;
        counts[r] += 1;
    }
    (sums, counts)
}

/// Loss over a set of sequences: total negative log-likelihood and number of trained tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LossSum {
    /// Σ −log p over trained tokens.
    pub nll: f64,
    /// Number of trained tokens.
    pub tokens: usize,
}

impl LossSum {
    /// Mean cross-entropy.
    pub fn mean(&self) -> f64 {
        if self.tokens == 0 {
            f64::NAN
        } else {
            self.nll / self.tokens as f64
        }
    }

    /// Adds another sum.
    pub fn add(&mut self, other: LossSum) {
        self.nll += other.nll;
        self.tokens += other.tokens;
    }
}

/// SFT loss of `seqs`, evaluated in batches of `batch_size`.
pub fn sft_loss<B: Backend>(model: &B, seqs: &[Encoded], batch_size: usize, pad: u32) -> LossSum {
    let mut total = LossSum::default();
    // Sort by length so that padding stays small; the sum does not depend on the order.
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| seqs[i].ids.len());
    for chunk in order.chunks(batch_size.max(1)) {
        let refs: Vec<&Encoded> = chunk.iter().map(|&i| &seqs[i]).collect();
        let batch = TokenBatch::pad(&refs, pad);
        let (sums, counts) = sequence_logprobs(model, &batch);
        total.add(LossSum {
            nll: -sums.iter().sum::<f64>(),
            tokens: counts.iter().sum(),
        });
    }
    total
}
