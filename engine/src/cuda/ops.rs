//! Launchers of fedtune's kernels (sources in `kernels/`): each takes [`GTensor`]s, checks
//! shapes, and queues the kernel on the device's stream.

use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};

use super::Gpu;
use super::lt::{LtTerm, Mat};
use super::tensor::{Dt, GTensor};
use crate::error::Result;

/// Blocks for a grid-stride loop over `n` elements.
fn blocks(n: usize) -> u32 {
    (n.div_ceil(256)).clamp(1, 65_535 * 8) as u32
}

pub(super) fn grid1(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks(n), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A kernel argument: a device address (or any 64-bit value), an `int`, an `unsigned`, a
/// `long long`, a `float` or a `double`.
#[derive(Clone, Copy)]
pub(super) enum A {
    P(u64),
    I(i32),
    U(u32),
    L(i64),
    F(f32),
    D(f64),
}

/// Head dimensions the attention kernel supports.
pub const MAX_HEAD_DIM: usize = 128;

/// Attention geometry of one call (see `kernels/attention.cu`).
#[derive(Debug, Clone, Copy)]
pub struct AttnGeom {
    /// Sequences.
    pub batch: usize,
    /// Query rows per sequence.
    pub tq: usize,
    /// Key positions per sequence (≥ tq; the queries are the last tq).
    pub tk: usize,
    /// Query heads.
    pub hq: usize,
    /// Key/value heads.
    pub hkv: usize,
    /// Head dimension.
    pub d: usize,
    /// Elements between sequences in K/V.
    pub k_bs: usize,
    /// Elements between positions in K/V.
    pub k_rs: usize,
    /// Sliding window (0 = none).
    pub window: usize,
}

impl Gpu {
    pub(super) fn run(&self, name: &str, cfg: LaunchConfig, args: &[A]) {
        let f = self.func(name);
        let mut b = self.stream.launch_builder(&f);
        for a in args {
            match a {
                A::P(v) => b.arg(v),
                A::I(v) => b.arg(v),
                A::U(v) => b.arg(v),
                A::L(v) => b.arg(v),
                A::F(v) => b.arg(v),
                A::D(v) => b.arg(v),
            };
        }
        // SAFETY: each launcher passes the argument list its kernel declares, with buffers
        // sized by the shape checks before it.
        self.timed(
            || name.to_string(),
            || unsafe { b.launch(cfg) }.unwrap_or_else(|e| panic!("GPU kernel {name}: {e}")),
        );
    }

    /// `Σ alpha·op(a)·op(b)` into a new `[m, n]` tensor of `out` type.
    pub fn matmul_sum(
        &self,
        terms: &[(&GTensor, bool, &GTensor, bool, f32)],
        out: Dt,
    ) -> Result<GTensor> {
        let (a, ta, _, _, _) = terms[0];
        let (b, tb) = (terms[0].2, terms[0].3);
        let m = if ta { a.cols } else { a.rows };
        let n = if tb { b.rows } else { b.cols };
        let c = self.alloc(m, n, out);
        self.matmul_into(&c, 0, terms, false)?;
        Ok(c)
    }

    /// `c[:, col0 .. col0 + n] (+)= Σ alpha·op(a)·op(b)`.
    pub fn matmul_into(
        &self,
        c: &GTensor,
        col0: usize,
        terms: &[(&GTensor, bool, &GTensor, bool, f32)],
        accumulate: bool,
    ) -> Result<()> {
        let mat = |t: &GTensor| Mat {
            ptr: t.ptr(),
            rows: t.rows,
            cols: t.cols,
            ld: t.cols,
            dt: t.dt,
        };
        let lt: Vec<LtTerm> = terms
            .iter()
            .map(|&(a, ta, b, tb, alpha)| LtTerm {
                a: mat(a),
                ta,
                b: mat(b),
                tb,
                alpha,
            })
            .collect();
        let n = lt
            .first()
            .map(|t| if t.tb { t.b.rows } else { t.b.cols })
            .unwrap_or(0);
        let cm = Mat {
            ptr: c.ptr() + (col0 * c.dt.size()) as u64,
            rows: c.rows,
            cols: n,
            ld: c.cols,
            dt: c.dt,
        };
        assert!(col0 + n <= c.cols, "matmul_into: columns out of range");
        let k = lt
            .first()
            .map(|t| if t.ta { t.a.rows } else { t.a.cols })
            .unwrap_or(0);
        self.timed(
            || {
                format!(
                    "gemm {:?}<-{:?} {}x{n}x{k}{}",
                    c.dt,
                    lt.first().map_or(c.dt, |t| t.a.dt),
                    c.rows,
                    if lt.len() > 1 {
                        format!(" +{}", lt.len() - 1)
                    } else {
                        String::new()
                    }
                )
            },
            || self.lt().gemm(cm, &lt, accumulate, self.tf32()),
        )
    }

    /// RMSNorm of `x (+ p)`: returns `(h, y, r)` where `h = x + p` (only when `p` is given),
    /// `y` the normalised rows and `r` the per-row `1/rms` (f32) when `want_r`.
    pub fn rmsnorm(
        &self,
        x: &GTensor,
        p: Option<&GTensor>,
        w: &GTensor,
        eps: f32,
        want_r: bool,
    ) -> (Option<GTensor>, GTensor, Option<CudaSlice<f32>>) {
        let (n, d) = (x.rows, x.cols);
        assert_eq!(w.len(), d, "rmsnorm weight");
        if let Some(p) = p {
            assert_eq!((p.rows, p.cols), (n, d), "rmsnorm residual");
        }
        let h = p.map(|_| self.alloc(n, d, x.dt));
        let y = self.alloc(n, d, x.dt);
        // SAFETY: written by the kernel for every row.
        let r = want_r.then(|| unsafe { self.stream.alloc::<f32>(n.max(1)) }.expect("GPU alloc"));
        let (xp, pp, wp) = (x.ptr(), p.map_or(0, |p| p.ptr()), w.ptr());
        let hp = h.as_ref().map_or(0, |h| h.ptr());
        let yp = y.ptr();
        let rp = r.as_ref().map_or(0, |r| r.device_ptr(&self.stream).0);
        let (ni, di) = (n as i32, d as i32);
        let threads = if d >= 1024 {
            1024
        } else {
            (d.div_ceil(32) * 32).max(32) as u32
        };
        let cfg = LaunchConfig {
            grid_dim: (n.max(1) as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        if n > 0 {
            self.run(
                &format!("rmsnorm_{}", x.dt.suffix()),
                cfg,
                &[
                    A::P(xp),
                    A::P(pp),
                    A::P(wp),
                    A::P(hp),
                    A::P(yp),
                    A::P(rp),
                    A::I(ni),
                    A::I(di),
                    A::F(eps),
                ],
            );
        }
        (h, y, r)
    }

    /// RoPE on rows `[n, heads·d]` with per-token tables `[n, d]` (f32), in place when `x` is
    /// the only handle to its storage.
    pub fn rope(
        &self,
        mut x: GTensor,
        heads: usize,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        inverse: bool,
    ) -> GTensor {
        if !x.unique() {
            x = self.copy(&x);
        }
        let d = x.cols / heads;
        assert_eq!(cos.len(), x.rows * d, "rope tables");
        let (xp, cp, sp) = (
            x.ptr(),
            cos.device_ptr(&self.stream).0,
            sin.device_ptr(&self.stream).0,
        );
        let (n, h, di, inv) = (x.rows as i32, heads as i32, d as i32, inverse as i32);
        let pairs = x.rows * heads * d / 2;
        if pairs > 0 {
            self.run(
                &format!("rope_{}", x.dt.suffix()),
                grid1(pairs),
                &[
                    A::P(xp),
                    A::P(cp),
                    A::P(sp),
                    A::I(n),
                    A::I(h),
                    A::I(di),
                    A::I(inv),
                ],
            );
        }
        x
    }

    /// A copy of `x` in new storage.
    pub fn copy(&self, x: &GTensor) -> GTensor {
        let out = self.alloc(x.rows, x.cols, x.dt);
        self.copy_rows(x, 0, x.rows, &out, 0);
        out
    }

    /// Rows `[r0, r0 + rows)` of `src` into rows starting at `dst_r0` of `dst` (same width).
    pub fn copy_rows(&self, src: &GTensor, r0: usize, rows: usize, dst: &GTensor, dst_r0: usize) {
        assert_eq!(src.cols, dst.cols, "copy_rows width");
        assert_eq!(src.dt, dst.dt, "copy_rows type");
        assert!(
            r0 + rows <= src.rows && dst_r0 + rows <= dst.rows,
            "copy_rows bounds"
        );
        self.copy_strided(
            src.row_ptr(r0),
            src.cols,
            dst.row_ptr(dst_r0),
            dst.cols,
            rows,
            src.cols,
            src.dt,
        );
    }

    /// `rows × cols` elements from `src` (row stride `src_rs`) to `dst` (row stride `dst_rs`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn copy_strided(
        &self,
        src: u64,
        src_rs: usize,
        dst: u64,
        dst_rs: usize,
        rows: usize,
        cols: usize,
        dt: Dt,
    ) {
        let (srs, drs) = (src_rs as i64, dst_rs as i64);
        let (r, c) = (rows as i32, cols as i32);
        if rows * cols > 0 {
            self.run(
                &format!("copy_rows_{}", dt.suffix()),
                grid1(rows * cols),
                &[A::P(src), A::L(srs), A::P(dst), A::L(drs), A::I(r), A::I(c)],
            );
        }
    }

    /// `x[rows[i], :]` for the `n` row indices at device address `rows` (u32).
    pub(crate) fn gather_rows_dev(&self, x: &GTensor, rows: u64, n: usize) -> GTensor {
        let out = self.alloc(n, x.cols, x.dt);
        if n > 0 {
            let (xp, op) = (x.ptr(), out.ptr());
            let (ni, c) = (n as i32, x.cols as i32);
            self.run(
                &format!("gather_rows_{}", x.dt.suffix()),
                grid1(n * x.cols),
                &[A::P(xp), A::P(rows), A::P(op), A::I(ni), A::I(c)],
            );
        }
        out
    }

    /// `log p(target)` per row of f32 logits `[rows, vocab]` into `out` (f32, device address),
    /// with the targets at device address `targets` (u32): no synchronisation.
    pub(crate) fn target_logprobs_dev(&self, logits: &GTensor, targets: u64, out: u64) {
        assert_eq!(logits.dt, Dt::F32, "logits in f32");
        if logits.rows == 0 {
            return;
        }
        let (rows, vocab) = (logits.rows as i32, logits.cols as i32);
        let cfg = LaunchConfig {
            grid_dim: (logits.rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        self.run(
            "target_logprobs",
            cfg,
            &[
                A::P(logits.ptr()),
                A::P(targets),
                A::P(out),
                A::I(rows),
                A::I(vocab),
            ],
        );
    }

    /// `x[rows[i], :]` for each i.
    pub fn gather_rows(&self, x: &GTensor, rows: &[u32]) -> Result<GTensor> {
        assert!(
            rows.iter().all(|&r| (r as usize) < x.rows),
            "gather_rows bounds"
        );
        if rows.is_empty() {
            return Ok(self.alloc(0, x.cols, x.dt));
        }
        let idx = self.upload_u32(rows)?;
        Ok(self.gather_rows_dev(x, idx.device_ptr(&self.stream).0, rows.len()))
    }

    /// `table[ids[i], :]` for each i (the embedding), with ids checked against the vocabulary.
    pub fn embed(&self, table: &GTensor, ids: &[u32]) -> Result<GTensor> {
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= table.rows) {
            return Err(crate::error::Error::Invalid(format!(
                "token id {bad} is outside the vocabulary of {}",
                table.rows
            )));
        }
        self.gather_rows(table, ids)
    }

    /// `y[i, :] += bias` in place (`y` must be the only handle).
    pub fn add_bias(&self, y: &mut GTensor, bias: &GTensor) {
        assert_eq!(bias.len(), y.cols, "bias width");
        assert!(y.unique(), "add_bias on shared storage");
        let (yp, bp) = (y.ptr(), bias.ptr());
        let (n, c) = (y.rows as i32, y.cols as i32);
        if !y.is_empty() {
            self.run(
                &format!("add_bias_{}", y.dt.suffix()),
                grid1(y.len()),
                &[A::P(yp), A::P(bp), A::I(n), A::I(c)],
            );
        }
    }

    /// `T(silu(g)) ⊙ u`.
    pub fn swiglu(&self, g: &GTensor, u: &GTensor) -> GTensor {
        assert_eq!(
            (g.rows, g.cols, g.dt),
            (u.rows, u.cols, u.dt),
            "swiglu shapes"
        );
        let out = self.alloc(g.rows, g.cols, g.dt);
        let (gp, up, op, n) = (g.ptr(), u.ptr(), out.ptr(), g.len() as u64);
        if n > 0 {
            self.run(
                &format!("swiglu_{}", g.dt.suffix()),
                grid1(g.len()),
                &[A::P(gp), A::P(up), A::P(op), A::P(n)],
            );
        }
        out
    }

    /// `x` converted to `dt` (a new tensor; a copy when the type is the same).
    pub fn cast(&self, x: &GTensor, dt: Dt) -> GTensor {
        if x.dt == dt {
            return self.copy(x);
        }
        let out = self.alloc(x.rows, x.cols, dt);
        let n = x.len() as u64;
        if n == 0 {
            return out;
        }
        let (xp, op) = (x.ptr(), out.ptr());
        match (x.dt, dt) {
            (src, Dt::F32) => self.run(
                &format!("to_f32_{}", src.suffix()),
                grid1(x.len()),
                &[A::P(xp), A::P(op), A::P(n)],
            ),
            (Dt::F32, dst) => self.run(
                &format!("from_f32_{}", dst.suffix()),
                grid1(x.len()),
                &[A::P(xp), A::P(op), A::P(n)],
            ),
            (_, _) => return self.cast(&self.cast(x, Dt::F32), dt),
        }
        out
    }

    /// Causal attention (see `kernels/attention.cu`): `q` rows `[batch·tq, hq·d]`, keys and
    /// values at `k`/`v` with the strides of `g`, optional segments `[batch·tq]` (tq = tk).
    /// Returns `o` like `q` and, when `want_lse`, `lse` `[batch, hq, tq]`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        q: &GTensor,
        k: u64,
        v: u64,
        g: AttnGeom,
        segments: Option<&[u32]>,
        scale: f32,
        want_lse: bool,
    ) -> Result<(GTensor, Option<CudaSlice<f32>>)> {
        if g.d > MAX_HEAD_DIM || g.d == 0 || !g.hq.is_multiple_of(g.hkv) {
            return Err(crate::error::Error::Invalid(format!(
                "GPU attention supports head_dim 1..={MAX_HEAD_DIM} and heads divisible by KV heads (got d = {}, {} / {})",
                g.d, g.hq, g.hkv
            )));
        }
        assert_eq!(
            (q.rows, q.cols),
            (g.batch * g.tq, g.hq * g.d),
            "attention q shape"
        );
        let o = self.alloc(q.rows, q.cols, q.dt);
        // SAFETY: every (b, h, q) entry is written by the kernel.
        let lse = want_lse.then(|| {
            unsafe { self.stream.alloc::<f32>((g.batch * g.hq * g.tq).max(1)) }.expect("GPU alloc")
        });
        let seg = match segments {
            Some(s) => {
                assert_eq!(s.len(), g.batch * g.tq, "segments");
                Some(self.upload_u32(s)?)
            }
            None => None,
        };
        if q.rows == 0 {
            return Ok((o, lse));
        }
        let (qp, op) = (q.ptr(), o.ptr());
        let lp = lse.as_ref().map_or(0, |l| l.device_ptr(&self.stream).0);
        let sp = seg.as_ref().map_or(0, |s| s.device_ptr(&self.stream).0);
        let ints = [g.tq, g.tk, g.tk - g.tq, g.hq, g.hkv, g.d].map(|v| v as i32);
        let longs = [q.cols, g.k_bs, g.k_rs].map(|v| v as i64);
        let window = g.window as i32;
        let (name, cfg) = if self.use_mma_attention(q.dt, g.d) {
            // K and V tiles [2][BK][d + 8], BK = 64 keys at d ≤ 64 and 32 above.
            let bk = if g.d <= 64 { 64 } else { 32 };
            let smem = 2 * 2 * bk * (g.d + 8) * 2 + 2 * bk * 4; // and [2][BK] key segments
            let cfg = LaunchConfig {
                grid_dim: (g.tq.div_ceil(64) as u32, g.hq as u32, g.batch as u32),
                block_dim: (128, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            // Built for d ≤ 64 and d ≤ 128 (registers: accumulators for the bound).
            let bound = if g.d <= 64 { 64 } else { 128 };
            (format!("attn_mma{bound}_{}", q.dt.suffix()), cfg)
        } else {
            let smem = (16 * g.d + 32 * (g.d + 1) + 32 * g.d) * 4;
            let cfg = LaunchConfig {
                grid_dim: (g.tq.div_ceil(16) as u32, g.hq as u32, g.batch as u32),
                block_dim: (128, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            (format!("attn_fwd_{}", q.dt.suffix()), cfg)
        };
        let mut args = vec![A::P(qp), A::P(k), A::P(v), A::P(op), A::P(lp), A::P(sp)];
        args.extend(ints.iter().map(|&i| A::I(i)));
        args.extend(longs.iter().map(|&l| A::L(l)));
        args.extend([A::F(scale), A::I(window)]);
        self.run(&name, cfg, &args);
        Ok((o, lse))
    }

    /// Whether attention on `dt` with head dimension `d` runs on tensor cores
    /// (`attention_mma.cu`: bf16/f16, `d` a multiple of 16, sm_80+), unless
    /// `FEDTUNE_ATTENTION=simt` asks for the f32-arithmetic kernel.
    pub fn use_mma_attention(&self, dt: Dt, d: usize) -> bool {
        static SIMT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let simt =
            *SIMT.get_or_init(|| std::env::var("FEDTUNE_ATTENTION").is_ok_and(|v| v == "simt"));
        !simt && dt != Dt::F32 && d.is_multiple_of(16) && d <= MAX_HEAD_DIM && self.cc.0 >= 8
    }

    /// `log p(target)` per row of f32 logits `[rows, vocab]`, on the host.
    pub fn target_logprobs(&self, logits: &GTensor, targets: &[u32]) -> Result<Vec<f32>> {
        assert_eq!(logits.rows, targets.len(), "one target per row");
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        let t = self.upload_u32(targets)?;
        let out = self.alloc(1, targets.len(), Dt::F32);
        self.target_logprobs_dev(logits, t.device_ptr(&self.stream).0, out.ptr());
        self.download(&out)
    }

    /// Dequantises an NF4 weight into a new `[rows, cols]` tensor of `dt`.
    pub fn nf4_dequant(&self, w: &super::model::Nf4Gpu, dt: Dt) -> GTensor {
        let out = self.alloc(w.rows, w.cols, dt);
        let n = (w.rows * w.cols) as u64;
        let pp = w.packed.device_ptr(&self.stream).0;
        let ap = w
            .absmax
            .as_ref()
            .map_or(0, |a| a.device_ptr(&self.stream).0);
        let cp = w
            .codes2
            .as_ref()
            .map_or(0, |c| c.device_ptr(&self.stream).0);
        let a2 = w
            .absmax2
            .as_ref()
            .map_or(0, |a| a.device_ptr(&self.stream).0);
        let dm = self.dyn_map_ptr();
        let off = w.offset;
        let op = out.ptr();
        if n > 0 {
            self.run(
                &format!("nf4_dequant_{}", dt.suffix()),
                grid1(n as usize),
                &[
                    A::P(pp),
                    A::P(ap),
                    A::P(cp),
                    A::P(a2),
                    A::P(dm),
                    A::F(off),
                    A::P(op),
                    A::P(n),
                ],
            );
        }
        out
    }
}
