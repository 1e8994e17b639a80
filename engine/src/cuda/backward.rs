//! Launchers of the training step's backward kernels (`kernels/backward.cu`): RMSNorm,
//! SwiGLU, the LM head's softmax gradient and causal attention. Each mirrors a host kernel of
//! [`crate::kernels`] and is checked against it by `engine/tests/cuda_device.rs` on a GPU.

use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig};

use super::Gpu;
use super::ops::{A, AttnGeom, MAX_HEAD_DIM, grid1};
use super::tensor::{Dt, GTensor};
use crate::error::{Error, Result};

/// Rows per partial sum of a norm's weight gradient.
const DW_CHUNK: usize = 256;

impl Gpu {
    fn alloc_f32(&self, n: usize) -> CudaSlice<f32> {
        // SAFETY: every caller's kernel writes all `n` values before any is read.
        unsafe { self.stream.alloc::<f32>(n.max(1)) }.expect("GPU alloc")
    }

    /// RMSNorm backward: `dx (+ res)` for the forward `y = w ⊙ x·r` (`r` the per-row `1/rms`
    /// the forward kept), and the weight gradient `[1, d]` (f32) when `want_dw`.
    pub fn rmsnorm_backward(
        &self,
        x: &GTensor,
        r: &CudaSlice<f32>,
        w: &GTensor,
        dy: &GTensor,
        res: Option<&GTensor>,
        want_dw: bool,
    ) -> (GTensor, Option<GTensor>) {
        let (n, d) = (x.rows, x.cols);
        assert_eq!(w.len(), d, "rmsnorm_backward weight");
        assert_eq!(
            (dy.rows, dy.cols, dy.dt),
            (n, d, x.dt),
            "rmsnorm_backward dy"
        );
        assert!(r.len() >= n, "rmsnorm_backward r");
        if let Some(res) = res {
            assert_eq!(
                (res.rows, res.cols, res.dt),
                (n, d, x.dt),
                "rmsnorm_backward res"
            );
        }
        let dx = self.alloc(n, d, x.dt);
        let rp = r.device_ptr(&self.stream).0;
        let sfx = x.dt.suffix();
        if n > 0 {
            let threads = if d >= 1024 {
                1024
            } else {
                (d.div_ceil(32) * 32).max(32) as u32
            };
            let cfg = LaunchConfig {
                grid_dim: (n as u32, 1, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            };
            self.run(
                &format!("rmsnorm_bwd_{sfx}"),
                cfg,
                &[
                    A::P(x.ptr()),
                    A::P(rp),
                    A::P(w.ptr()),
                    A::P(dy.ptr()),
                    A::P(res.map_or(0, |t| t.ptr())),
                    A::P(dx.ptr()),
                    A::I(n as i32),
                    A::I(d as i32),
                ],
            );
        }
        let dw = want_dw.then(|| {
            if n == 0 {
                return self.zeros(1, d, Dt::F32);
            }
            let chunks = n.div_ceil(DW_CHUNK);
            let part = self.alloc(chunks, d, Dt::F32);
            let out = self.alloc(1, d, Dt::F32);
            let cfg = LaunchConfig {
                grid_dim: (d.div_ceil(256) as u32, chunks as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            self.run(
                &format!("rmsnorm_dw_{sfx}"),
                cfg,
                &[
                    A::P(x.ptr()),
                    A::P(rp),
                    A::P(dy.ptr()),
                    A::P(part.ptr()),
                    A::I(n as i32),
                    A::I(d as i32),
                    A::I(DW_CHUNK as i32),
                ],
            );
            self.col_sum_into(&part, &out);
            out
        });
        (dx, dw)
    }

    /// `out[j] = Σ_i part[i, j]` (f32, in row order).
    fn col_sum_into(&self, part: &GTensor, out: &GTensor) {
        assert_eq!((part.dt, out.dt), (Dt::F32, Dt::F32), "col_sum is f32");
        assert_eq!(out.len(), part.cols, "col_sum output");
        self.run(
            "col_sum_f32",
            LaunchConfig {
                grid_dim: (part.cols.div_ceil(256).max(1) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            },
            &[
                A::P(part.ptr()),
                A::P(out.ptr()),
                A::I(part.rows as i32),
                A::I(part.cols as i32),
            ],
        );
    }

    /// Column sums of `x` `[1, cols]` (f32): a bias's gradient.
    pub fn col_sum(&self, x: &GTensor) -> GTensor {
        let x32 = self.cast(x, Dt::F32);
        let out = self.alloc(1, x.cols, Dt::F32);
        if x.cols > 0 {
            self.col_sum_into(&x32, &out);
        }
        out
    }

    /// SwiGLU backward: `(dg, du)` for `a = silu(g) ⊙ u` and upstream `da`.
    pub fn swiglu_backward(&self, g: &GTensor, u: &GTensor, da: &GTensor) -> (GTensor, GTensor) {
        for t in [u, da] {
            assert_eq!(
                (t.rows, t.cols, t.dt),
                (g.rows, g.cols, g.dt),
                "swiglu_backward shapes"
            );
        }
        let (dg, du) = (
            self.alloc(g.rows, g.cols, g.dt),
            self.alloc(g.rows, g.cols, g.dt),
        );
        if !g.is_empty() {
            self.run(
                &format!("swiglu_bwd_{}", g.dt.suffix()),
                grid1(g.len()),
                &[
                    A::P(g.ptr()),
                    A::P(u.ptr()),
                    A::P(da.ptr()),
                    A::P(dg.ptr()),
                    A::P(du.ptr()),
                    A::P(g.len() as u64),
                ],
            );
        }
        (dg, du)
    }

    /// The LM head's `log p(target)` per row of f32 `logits` `[rows, vocab]`, overwriting each
    /// row with `e_target − softmax` (∂ log p / ∂ logits); with `entropy`, each row's entropy
    /// `−Σ p·log p` too (GRPO logs it).
    pub fn logprob_grad(
        &self,
        logits: &GTensor,
        targets: &[u32],
        entropy: bool,
    ) -> Result<(GTensor, Option<GTensor>)> {
        assert_eq!(logits.dt, Dt::F32, "logprob_grad reads f32 logits");
        assert_eq!(logits.rows, targets.len(), "one target per row");
        if let Some(&bad) = targets.iter().find(|&&t| t as usize >= logits.cols) {
            return Err(Error::Invalid(format!(
                "target token {bad} outside the vocabulary of {}",
                logits.cols
            )));
        }
        let out = self.alloc(1, targets.len(), Dt::F32);
        let ent = entropy.then(|| self.alloc(1, targets.len(), Dt::F32));
        if targets.is_empty() {
            return Ok((out, ent));
        }
        let t = self.upload_u32(targets)?;
        self.run(
            "logprob_grad",
            LaunchConfig {
                grid_dim: (logits.rows as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            },
            &[
                A::P(logits.ptr()),
                A::P(t.device_ptr(&self.stream).0),
                A::P(out.ptr()),
                A::P(ent.as_ref().map_or(0, GTensor::ptr)),
                A::I(logits.rows as i32),
                A::I(logits.cols as i32),
            ],
        );
        Ok((out, ent))
    }

    /// Attention backward for training (`tq = tk`, no cache): `(dq, dk, dv)` in the row
    /// layouts of `q`, `k`, `v` from the forward's output `o`, its `lse` and the upstream
    /// `d_o`. Probabilities are recomputed from `lse`; GQA, window and segments as the forward.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward(
        &self,
        q: &GTensor,
        k: &GTensor,
        v: &GTensor,
        o: &GTensor,
        d_o: &GTensor,
        lse: &CudaSlice<f32>,
        g: AttnGeom,
        segments: Option<&[u32]>,
        scale: f32,
    ) -> Result<(GTensor, GTensor, GTensor)> {
        if g.d > MAX_HEAD_DIM || g.d == 0 || !g.hq.is_multiple_of(g.hkv) || g.tq != g.tk {
            return Err(Error::Invalid(format!(
                "GPU attention backward supports head_dim 1..={MAX_HEAD_DIM}, heads divisible by KV heads and no cache (got d = {}, {} / {}, {} of {} positions)",
                g.d, g.hq, g.hkv, g.tq, g.tk
            )));
        }
        let (b, len, hq, hkv, d) = (g.batch, g.tq, g.hq, g.hkv, g.d);
        assert_eq!((q.rows, q.cols), (b * len, hq * d), "attention_backward q");
        for t in [o, d_o] {
            assert_eq!(
                (t.rows, t.cols, t.dt),
                (q.rows, q.cols, q.dt),
                "attention_backward o"
            );
        }
        for t in [k, v] {
            assert_eq!(
                (t.rows, t.cols, t.dt),
                (b * len, hkv * d, q.dt),
                "attention_backward k/v"
            );
        }
        assert!(lse.len() >= b * hq * len, "attention_backward lse");
        let (dq, dk, dv) = (
            self.alloc(q.rows, q.cols, q.dt),
            self.alloc(k.rows, k.cols, k.dt),
            self.alloc(v.rows, v.cols, v.dt),
        );
        if q.rows == 0 {
            return Ok((dq, dk, dv));
        }
        let seg = match segments {
            Some(s) => {
                assert_eq!(s.len(), b * len, "segments");
                Some(self.upload_u32(s)?)
            }
            None => None,
        };
        let sp = seg.as_ref().map_or(0, |s| s.device_ptr(&self.stream).0);
        let lp = lse.device_ptr(&self.stream).0;
        let sfx = q.dt.suffix();
        let dsum = self.alloc_f32(b * hq * len);
        let dp = dsum.device_ptr(&self.stream).0;
        let warps = b * len * hq;
        self.run(
            &format!("attn_dsum_{sfx}"),
            LaunchConfig {
                grid_dim: (warps.div_ceil(8) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            },
            &[
                A::P(o.ptr()),
                A::P(d_o.ptr()),
                A::P(dp),
                A::I(b as i32),
                A::I(len as i32),
                A::I(hq as i32),
                A::I(d as i32),
            ],
        );
        let tail = [
            A::I(len as i32),
            A::I(hq as i32),
            A::I(hkv as i32),
            A::I(d as i32),
            A::F(scale),
            A::I(g.window as i32),
        ];
        // Both kernels read (q, k, v, dO, lse, dsum, segments), then take their outputs, then
        // the shape.
        let args = |outs: &[u64]| -> Vec<A> {
            let inputs = [q.ptr(), k.ptr(), v.ptr(), d_o.ptr(), lp, dp, sp];
            let mut a: Vec<A> = inputs.iter().chain(outs).map(|&p| A::P(p)).collect();
            a.extend(tail);
            a
        };
        if self.use_mma_attention(q.dt, d) {
            // Tensor cores (kernels/attention_mma_bwd.cu), built for d ≤ 64 and d ≤ 128: 16
            // keys per warp, 4 warps and query tiles of 32 up to d = 64, 2 warps and tiles of 16
            // above; the K and V tiles of the dQ kernel 32 keys. Shared memory (tiles of d + 8
            // columns, the streamed ones double-buffered) at most 37 KiB.
            let (bound, warps, bq) = if d <= 64 { (64, 4, 32) } else { (128, 2, 16) };
            // ... plus lse, dsum and segments: [2][bq] f32 twice, [kb] + [2][bq] u32.
            let kv_smem = (2 * 16 * warps + 4 * bq) * (d + 8) * 2 + (6 * bq + 16 * warps) * 4;
            self.run(
                &format!("attn_bwd_kv_mma{bound}_{sfx}"),
                LaunchConfig {
                    grid_dim: (len.div_ceil(16 * warps) as u32, hkv as u32, b as u32),
                    block_dim: (32 * warps as u32, 1, 1),
                    shared_mem_bytes: kv_smem as u32,
                },
                &args(&[dk.ptr(), dv.ptr()]),
            );
            self.run(
                &format!("attn_bwd_q_mma{bound}_{sfx}"),
                LaunchConfig {
                    grid_dim: (len.div_ceil(64) as u32, hq as u32, b as u32),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: (4 * 32 * (d + 8) * 2 + 2 * 32 * 4) as u32,
                },
                &args(&[dq.ptr()]),
            );
            return Ok((dq, dk, dv));
        }
        // Shared memory: kernels/backward.cu's layouts (at most 41 KiB at d = 128).
        let kv_smem = (2 * 32 * d + 2 * 8 * d + 2 * 8) * 4;
        self.run(
            &format!("attn_bwd_kv_{sfx}"),
            LaunchConfig {
                grid_dim: (len.div_ceil(32) as u32, hkv as u32, b as u32),
                block_dim: (128, 1, 1),
                shared_mem_bytes: kv_smem as u32,
            },
            &args(&[dk.ptr(), dv.ptr()]),
        );
        let q_smem = (2 * 8 * d + 2 * 32 * (d + 1)) * 4;
        self.run(
            &format!("attn_bwd_q_{sfx}"),
            LaunchConfig {
                grid_dim: (len.div_ceil(8) as u32, hq as u32, b as u32),
                block_dim: (128, 1, 1),
                shared_mem_bytes: q_smem as u32,
            },
            &args(&[dq.ptr()]),
        );
        Ok((dq, dk, dv))
    }

    /// `[out_rows, cols]` whose row `r` is `Σ scale[i]·src[i]` over the source rows `i` with
    /// `dest[i] = r`, added in increasing `i` (deterministic, no atomics); rows no source maps
    /// to are zero. The gradient of a row gather: the embedding's (`dest` = token ids) and the
    /// hidden states' from the target rows.
    pub fn scatter_rows(
        &self,
        src: &GTensor,
        scale: Option<&[f32]>,
        dest: &[usize],
        out_rows: usize,
    ) -> Result<GTensor> {
        assert_eq!(
            dest.len(),
            src.rows,
            "scatter_rows: one destination per source row"
        );
        if let Some(s) = scale {
            assert_eq!(s.len(), src.rows, "scatter_rows: one scale per source row");
        }
        if let Some(&bad) = dest.iter().find(|&&r| r >= out_rows) {
            return Err(Error::Invalid(format!(
                "scatter_rows: destination row {bad} of {out_rows}"
            )));
        }
        // Source rows grouped by destination (a counting sort keeps them in order).
        let mut off = vec![0u32; out_rows + 1];
        for &r in dest {
            off[r + 1] += 1;
        }
        for r in 0..out_rows {
            off[r + 1] += off[r];
        }
        let mut next = off.clone();
        let mut idx = vec![0u32; dest.len()];
        for (i, &r) in dest.iter().enumerate() {
            idx[next[r] as usize] = i as u32;
            next[r] += 1;
        }
        let out = self.alloc(out_rows, src.cols, src.dt);
        if out.is_empty() {
            return Ok(out);
        }
        let (off_d, idx_d) = (self.upload_u32(&off)?, self.upload_u32(&idx)?);
        let scale_d = scale.map(|s| self.upload_f32(s)).transpose()?;
        let sp = scale_d.as_ref().map_or(0, |s| s.device_ptr(&self.stream).0);
        self.run(
            &format!("scatter_rows_{}", src.dt.suffix()),
            LaunchConfig {
                grid_dim: (out_rows as u32, 1, 1),
                block_dim: (src.cols.div_ceil(32).clamp(1, 8) as u32 * 32, 1, 1),
                shared_mem_bytes: 0,
            },
            &[
                A::P(src.ptr()),
                A::P(sp),
                A::P(off_d.device_ptr(&self.stream).0),
                A::P(idx_d.device_ptr(&self.stream).0),
                A::P(out.ptr()),
                A::I(src.cols as i32),
            ],
        );
        Ok(out)
    }

    /// `y += x` (a copy first when `y` shares its storage).
    pub fn add_assign(&self, y: &mut GTensor, x: &GTensor) {
        assert_eq!(
            (y.rows, y.cols, y.dt),
            (x.rows, x.cols, x.dt),
            "add_assign shapes"
        );
        if !y.unique() {
            *y = self.copy(y);
        }
        if !y.is_empty() {
            self.run(
                &format!("add_{}", y.dt.suffix()),
                grid1(y.len()),
                &[A::P(y.ptr()), A::P(x.ptr()), A::P(y.len() as u64)],
            );
        }
    }

    /// Inverted dropout of `x` with probability `p`: each element kept (scaled by `1/(1−p)`)
    /// or zeroed by a counter-based hash of `(seed, index)`, so the same seed gives the same
    /// mask again (in backward) without storing it.
    pub fn dropout(&self, x: &GTensor, p: f32, seed: u64) -> GTensor {
        assert!(
            (0.0..1.0).contains(&p),
            "dropout probability {p} outside [0, 1)"
        );
        let y = self.alloc(x.rows, x.cols, x.dt);
        if x.is_empty() {
            return y;
        }
        let threshold = (f64::from(p) * 4_294_967_296.0).min(4_294_967_295.0) as u32;
        self.run(
            &format!("dropout_{}", x.dt.suffix()),
            grid1(x.len()),
            &[
                A::P(x.ptr()),
                A::P(y.ptr()),
                A::P(x.len() as u64),
                A::P(seed),
                A::U(threshold),
                A::F(1.0 / (1.0 - p)),
            ],
        );
        y
    }
}
