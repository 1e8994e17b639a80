//! The training step's device operations ([`TrainBackend`]) on the GPU, built from the kernels
//! of [`super::backward`] and cuBLASLt products: projections that keep their LoRA input
//! `x·Aᵀ`, their backward (LoRA factor gradients, frozen-weight gradients for full
//! fine-tuning, and the input gradient of projections sharing one input, every term
//! accumulated into one output), attention keeping its log-sum-exp, and the LM head's
//! log-probabilities with their gradient direction in chunks. Each mirrors the host
//! implementation (`device/host_train.rs`) and is checked against it, step by step, in
//! `engine/tests/cuda_train.rs`.

use cudarc::driver::CudaSlice;

use super::model::{CudaModel, GBase, GProj};
use super::ops::{AttnGeom, MAX_HEAD_DIM};
use super::tensor::{Dt, GTensor};
use crate::device::{AttnShape, Grads, Norm, Proj, ProjGrads, TrainBackend};
use crate::error::{Error, Result};

/// What a projection's training forward keeps for its backward: its LoRA input `x·Aᵀ` (after
/// dropout) and, with dropout, the probability and seed that regenerate the mask.
pub struct GSaved {
    u: GTensor,
    dropout: Option<(f32, u64)>,
    /// DoRA's `(c, inv, p)`: the factor `m/‖W + s·B·A‖`, the reciprocal norm (both f32
    /// `[1, out]`) and the undecomposed output `x̃·Wᵀ + s·u·Bᵀ` `[n, out]`.
    dora: Option<(GTensor, GTensor, GTensor)>,
}

/// A device error inside the step (out of memory, a failed launch): fatal, as in the forward.
fn ok<T>(r: Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("GPU: {e}"))
}

impl CudaModel {
    fn dense_weight(&self, p: &GProj) -> GTensor {
        match &p.base {
            GBase::Dense(w) => w.clone(),
            GBase::Nf4(q) => self.gpu.nf4_dequant(q, self.dt),
        }
    }

    fn norm_weight(&self, which: Norm) -> &GTensor {
        match which {
            Norm::Input(i) => &self.layers[i].ln1,
            Norm::Post(i) => &self.layers[i].ln2,
            Norm::Final => &self.norm,
        }
    }

    fn geom(s: AttnShape) -> AttnGeom {
        AttnGeom {
            batch: s.batch,
            tq: s.len,
            tk: s.len,
            hq: s.hq,
            hkv: s.hkv,
            d: s.d,
            k_bs: s.len * s.hkv * s.d,
            k_rs: s.hkv * s.d,
            window: s.window.unwrap_or(0),
        }
    }

    /// `x` (f32) in the compute dtype: itself in f32, a converted copy otherwise (`x` freed).
    fn in_model_dtype(&self, x: GTensor) -> GTensor {
        if x.dt == self.dt {
            x
        } else {
            self.gpu.cast(&x, self.dt)
        }
    }

    /// Rows `start..end` of `x` in their own tensor.
    fn rows(&self, x: &GTensor, start: usize, end: usize) -> GTensor {
        let out = self.gpu.alloc(end - start, x.cols, x.dt);
        self.gpu.copy_rows(x, start, end - start, &out, 0);
        out
    }
}

impl TrainBackend for CudaModel {
    type Saved = GSaved;
    type Lse = CudaSlice<f32>;
    type Rms = CudaSlice<f32>;

    fn can_train(&self, weights: bool) -> Result<()> {
        let c = &self.config;
        match self.dt {
            Dt::F32 => {}
            Dt::BF16 | Dt::F16 if !weights => {}
            Dt::BF16 | Dt::F16 => {
                return Err(Error::Invalid(
                    "full and partial fine-tuning on the GPU run in f32 (bf16 and fp16 mixed precision train LoRA adapters)".into(),
                ));
            }
        }
        if c.head_dim > MAX_HEAD_DIM || !c.num_attention_heads.is_multiple_of(c.num_key_value_heads)
        {
            return Err(Error::Invalid(format!(
                "GPU training supports head_dim up to {MAX_HEAD_DIM} and query heads divisible by KV heads (this model: head_dim {}, {} / {})",
                c.head_dim, c.num_attention_heads, c.num_key_value_heads
            )));
        }
        Ok(())
    }

    fn norm_train(
        &self,
        which: Norm,
        x: GTensor,
        pending: Option<GTensor>,
    ) -> (GTensor, GTensor, CudaSlice<f32>) {
        let eps = self.config.rms_norm_eps as f32;
        let w = self.norm_weight(which);
        let (h, y, r) = self.gpu.rmsnorm(&x, pending.as_ref(), w, eps, true);
        (h.unwrap_or(x), y, r.expect("asked for 1/rms"))
    }

    fn norm_again(&self, which: Norm, h: &GTensor, _rms: &CudaSlice<f32>) -> GTensor {
        let eps = self.config.rms_norm_eps as f32;
        self.gpu
            .rmsnorm(h, None, self.norm_weight(which), eps, false)
            .1
    }

    fn norm_backward(
        &self,
        which: Norm,
        h: &GTensor,
        rms: &CudaSlice<f32>,
        dy: GTensor,
        skip: Option<&GTensor>,
        want_dw: bool,
    ) -> (GTensor, Option<GTensor>) {
        self.gpu
            .rmsnorm_backward(h, rms, self.norm_weight(which), &dy, skip, want_dw)
    }

    fn project_train(
        &self,
        layer: usize,
        which: &[Proj],
        x: &GTensor,
        dropout: &[Option<u64>],
    ) -> Vec<(GTensor, Option<GSaved>)> {
        assert_eq!(
            which.len(),
            dropout.len(),
            "one dropout seed per projection"
        );
        let g = &self.gpu;
        which
            .iter()
            .zip(dropout)
            .map(|(&p, &seed)| {
                let proj = self.proj(layer, p);
                let w = self.dense_weight(proj);
                let (mut y, saved) = match &proj.lora {
                    None => (
                        ok(g.matmul_sum(&[(x, false, &w, true, 1.0)], self.dt)),
                        None,
                    ),
                    Some(l) => {
                        let drop = seed.filter(|_| l.dropout > 0.0).map(|s| (l.dropout, s));
                        let xin = drop.map(|(prob, s)| g.dropout(x, prob, s));
                        let xd = xin.as_ref().unwrap_or(x);
                        let u = ok(g.matmul_sum(&[(xd, false, &l.a, true, 1.0)], self.dt));
                        match self.dora_factor(proj, &w) {
                            None => {
                                let y = ok(g.matmul_sum(
                                    &[(x, false, &w, true, 1.0), (&u, false, &l.b, true, l.scale)],
                                    self.dt,
                                ));
                                let saved = GSaved {
                                    u,
                                    dropout: drop,
                                    dora: None,
                                };
                                (y, Some(saved))
                            }
                            // DoRA: x·Wᵀ − x̃·Wᵀ + c⊙p with p = x̃·Wᵀ + s·u·Bᵀ (c⊙p without
                            // dropout), as PEFT computes it.
                            Some((c, inv)) => {
                                let p = ok(g.matmul_sum(
                                    &[(xd, false, &w, true, 1.0), (&u, false, &l.b, true, l.scale)],
                                    self.dt,
                                ));
                                let mut y = g.copy(&p);
                                g.scale_cols(&mut y, &c, 0.0);
                                if let Some(xin) = &xin {
                                    let base = ok(g.matmul_sum(
                                        &[(x, false, &w, true, 1.0), (xin, false, &w, true, -1.0)],
                                        self.dt,
                                    ));
                                    g.add_assign(&mut y, &base);
                                }
                                let saved = GSaved {
                                    u,
                                    dropout: drop,
                                    dora: Some((c, inv, p)),
                                };
                                (y, Some(saved))
                            }
                        }
                    }
                };
                if let Some(b) = &proj.bias {
                    g.add_bias(&mut y, b);
                }
                (y, saved)
            })
            .collect()
    }

    fn project_backward(
        &self,
        layer: usize,
        which: &[Proj],
        x: &GTensor,
        saved: &[Option<GSaved>],
        dys: Vec<GTensor>,
        want: ProjGrads,
        grads: &mut Grads<GTensor>,
    ) -> Option<GTensor> {
        assert!(
            which.len() == saved.len() && which.len() == dys.len(),
            "project_backward: one saved state and gradient per projection"
        );
        let g = &self.gpu;
        let mut dybs = Vec::with_capacity(which.len());
        // The gradient each base product sees (DoRA without dropout: c⊙dy), and DoRA with
        // dropout's (c − 1)⊙dy, whose product with W joins the masked terms.
        let mut base_dys = Vec::with_capacity(which.len());
        let mut dora_masked = Vec::with_capacity(which.len());
        for ((&p, sv), dy) in which.iter().zip(saved).zip(&dys) {
            let proj = self.proj(layer, p);
            let name = format!("model.layers.{layer}.{}", p.path());
            if want.weight {
                let dw = ok(g.matmul_sum(&[(dy, true, x, false, 1.0)], Dt::F32));
                grads.insert(format!("{name}.weight"), dw);
                if proj.bias.is_some() {
                    grads.insert(format!("{name}.bias"), g.col_sum(dy));
                }
            }
            let (mut base_dy, mut masked) = (dy.clone(), None);
            match (&proj.lora, sv) {
                (Some(l), Some(sv)) => {
                    // The gradient the LoRA branch sees: c⊙dy with DoRA.
                    let dy_lora = match &sv.dora {
                        None => dy.clone(),
                        Some((c, inv, p)) => {
                            if want.lora {
                                grads.insert(
                                    format!("{name}.lora_magnitude_vector"),
                                    g.col_dot(dy, p, inv),
                                );
                            }
                            let mut scaled = g.copy(dy);
                            g.scale_cols(&mut scaled, c, 0.0);
                            if sv.dropout.is_some() {
                                let mut m = g.copy(dy);
                                g.scale_cols(&mut m, c, -1.0);
                                masked = Some(m);
                            } else {
                                base_dy = scaled.clone();
                            }
                            scaled
                        }
                    };
                    // dy·B [n, r], shared by the A gradient and the input gradient.
                    let dyb = ok(g.matmul_sum(&[(&dy_lora, false, &l.b, false, 1.0)], self.dt));
                    if want.lora {
                        // A's gradient reads the input the forward multiplied: x after dropout.
                        let xin = sv.dropout.map(|(prob, seed)| g.dropout(x, prob, seed));
                        let xa = xin.as_ref().unwrap_or(x);
                        // Gradients in f32 whatever the compute dtype (the optimiser's).
                        let da = ok(g.matmul_sum(&[(&dyb, true, xa, false, l.scale)], Dt::F32));
                        let db =
                            ok(g.matmul_sum(&[(&dy_lora, true, &sv.u, false, l.scale)], Dt::F32));
                        grads.insert(format!("{name}.lora_A"), da);
                        grads.insert(format!("{name}.lora_B"), db);
                    }
                    dybs.push(Some(dyb));
                }
                _ => dybs.push(None),
            }
            base_dys.push(base_dy);
            dora_masked.push(masked);
        }
        if !want.input {
            return None;
        }
        let weights: Vec<GTensor> = which
            .iter()
            .map(|&p| self.dense_weight(self.proj(layer, p)))
            .collect();
        let mut terms: Vec<(&GTensor, bool, &GTensor, bool, f32)> = base_dys
            .iter()
            .zip(&weights)
            .map(|(dy, w)| (dy, false, w, false, 1.0))
            .collect();
        // Without dropout the LoRA term joins the one accumulated product; with dropout it is
        // formed apart (with DoRA's (c − 1)⊙dy·W), masked like the forward's input, and added.
        let mut masked = Vec::new();
        for (k, ((&p, dyb), sv)) in which.iter().zip(&dybs).zip(saved).enumerate() {
            if let (Some(dyb), Some(l)) = (dyb, &self.proj(layer, p).lora) {
                match sv.as_ref().and_then(|s| s.dropout) {
                    None => terms.push((dyb, false, &l.a, false, l.scale)),
                    Some((prob, seed)) => {
                        let mut parts = vec![(dyb, false, &l.a, false, l.scale)];
                        if let Some(m) = &dora_masked[k] {
                            parts.push((m, false, &weights[k], false, 1.0));
                        }
                        let t = ok(g.matmul_sum(&parts, self.dt));
                        masked.push(g.dropout(&t, prob, seed));
                    }
                }
            }
        }
        let mut dx = ok(g.matmul_sum(&terms, self.dt));
        for t in &masked {
            g.add_assign(&mut dx, t);
        }
        Some(dx)
    }

    fn rope_backward(&self, dx: GTensor, heads: usize, t: &Self::Rope) -> GTensor {
        self.gpu.rope(dx, heads, &t.cos, &t.sin, true)
    }

    fn attention_train(
        &self,
        q: &GTensor,
        k: &GTensor,
        v: &GTensor,
        shape: AttnShape,
        segments: Option<&[u32]>,
    ) -> (GTensor, CudaSlice<f32>) {
        // The device's kernels know contiguous segments only (GRPO, which packs shared
        // prompts, is refused on the GPU before a step runs).
        assert!(
            segments.is_none_or(|s| s
                .iter()
                .all(|&g| crate::kernels::attention::segment::prefix(g) == 0)),
            "shared-prefix segments on the GPU"
        );
        let scale = 1.0 / (shape.d as f32).sqrt();
        let (o, lse) = ok(self.gpu.attention(
            q,
            k.ptr(),
            v.ptr(),
            Self::geom(shape),
            segments,
            scale,
            true,
        ));
        (o, lse.expect("asked for the log-sum-exp"))
    }

    fn attention_backward(
        &self,
        [q, k, v]: [&GTensor; 3],
        o: &GTensor,
        d_o: GTensor,
        lse: &CudaSlice<f32>,
        shape: AttnShape,
        segments: Option<&[u32]>,
    ) -> (GTensor, GTensor, GTensor) {
        let scale = 1.0 / (shape.d as f32).sqrt();
        ok(self
            .gpu
            .attention_backward(q, k, v, o, &d_o, lse, Self::geom(shape), segments, scale))
    }

    fn swiglu_backward(&self, g: &GTensor, u: &GTensor, da: GTensor) -> (GTensor, GTensor) {
        self.gpu.swiglu_backward(g, u, &da)
    }

    fn gather(&self, x: &GTensor, rows: &[usize]) -> GTensor {
        let r32: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        ok(self.gpu.gather_rows(x, &r32))
    }

    /// Logits in f32 chunks; the softmax gradient formed in place, then multiplied by the
    /// head weight. The chunks' log-probabilities are read back once, after the last chunk is
    /// queued (one synchronisation per call, not one per chunk). No entropy: no kernel
    /// computes it yet (GRPO, its only reader, trains on the CPU).
    fn head_train(
        &self,
        h: &GTensor,
        ids: &[u32],
        entropy: bool,
    ) -> (Vec<f32>, GTensor, Option<Vec<f32>>) {
        let g = &self.gpu;
        assert_eq!(h.rows, ids.len(), "one target per row");
        let n = ids.len();
        let dirs = g.alloc(n, h.cols, self.dt);
        let mut chunks = Vec::new();
        let mut entropies = Vec::new();
        let head = self.head();
        let chunk = self.head_chunk().max(1);
        for start in (0..n).step_by(chunk) {
            let end = (start + chunk).min(n);
            let hc = self.rows(h, start, end);
            let logits = ok(g.matmul_sum(&[(&hc, false, head, true, 1.0)], Dt::F32));
            let (lp, e) = ok(g.logprob_grad(&logits, &ids[start..end], entropy));
            chunks.push(lp);
            entropies.extend(e);
            let dlogits = self.in_model_dtype(logits);
            let part = ok(g.matmul_sum(&[(&dlogits, false, head, false, 1.0)], self.dt));
            g.copy_rows(&part, 0, end - start, &dirs, start);
        }
        let mut logps = Vec::with_capacity(n);
        for lp in &chunks {
            logps.extend(ok(g.download(lp)));
        }
        let entropy = entropy.then(|| {
            let mut all = Vec::with_capacity(n);
            for e in &entropies {
                all.extend(ok(g.download(e)));
            }
            all
        });
        (logps, dirs, entropy)
    }

    fn scatter_rows(&self, dirs: GTensor, scale: &[f32], rows: &[usize], n: usize) -> GTensor {
        ok(self.gpu.scatter_rows(&dirs, Some(scale), rows, n))
    }

    /// Per chunk: `e_y − p` in place of the f32 logits, the rows of `h` scaled by `g`, and
    /// `dW += (e_y − p)ᵀ·(g ⊙ h)` accumulated in one output.
    fn head_weight_grad(&self, h: &GTensor, ids: &[u32], g: &[f32]) -> GTensor {
        let gpu = &self.gpu;
        let head = self.head();
        let dw = gpu.zeros(head.rows, head.cols, Dt::F32);
        let chunk = self.head_chunk().max(1);
        for start in (0..ids.len()).step_by(chunk) {
            let end = (start + chunk).min(ids.len());
            let hc = self.rows(h, start, end);
            let logits = ok(gpu.matmul_sum(&[(&hc, false, head, true, 1.0)], Dt::F32));
            ok(gpu.logprob_grad(&logits, &ids[start..end], false));
            let dlogits = self.in_model_dtype(logits);
            let identity: Vec<usize> = (0..end - start).collect();
            let hs = ok(gpu.scatter_rows(&hc, Some(&g[start..end]), &identity, end - start));
            ok(gpu.matmul_into(&dw, 0, &[(&dlogits, true, &hs, false, 1.0)], true));
        }
        dw
    }

    fn head_input_grad(&self, d_logits: &[f32], n: usize) -> GTensor {
        let head = self.head();
        assert_eq!(d_logits.len(), n * head.rows, "d_logits is [n, vocab]");
        let d = ok(self.gpu.upload(d_logits, n, head.rows, self.dt));
        ok(self
            .gpu
            .matmul_sum(&[(&d, false, head, false, 1.0)], self.dt))
    }

    fn embedding_grad(&self, ids: &[u32], dx: &GTensor) -> GTensor {
        let dest: Vec<usize> = ids.iter().map(|&i| i as usize).collect();
        ok(self
            .gpu
            .scatter_rows(dx, None, &dest, self.config.vocab_size))
    }

    fn head_tied(&self) -> bool {
        self.head.is_none()
    }

    fn add(&self, mut a: GTensor, b: &GTensor) -> GTensor {
        self.gpu.add_assign(&mut a, b);
        a
    }

    fn rows_to_host(&self, x: &GTensor) -> Vec<f32> {
        ok(self.gpu.download(x))
    }

    fn rows_from_host(&self, values: &[f32], n: usize, d: usize) -> GTensor {
        ok(self.gpu.upload(values, n, d, self.dt))
    }

    fn grad_from_host(&self, values: &[f32], n: usize, d: usize) -> GTensor {
        ok(self.gpu.upload(values, n, d, Dt::F32))
    }
}
