//! DoRA (PEFT's `use_dora`) on the GPU: the per-output factor `c = m/‖W + s·B·A‖` (the norm a
//! constant, as PEFT detaches it) from one f32 product and a row-norm kernel, the column
//! scaling of outputs and gradients by it, and the magnitude's gradient
//! `Σ_rows dy ⊙ p / ‖·‖` (`kernels/elementwise.cu`, `kernels/backward.cu`).

use cudarc::driver::LaunchConfig;

use super::Gpu;
use super::ops::{A, grid1};
use super::tensor::{Dt, GTensor};
use crate::error::{Error, Result};

impl Gpu {
    /// `(c, inv)` f32 `[1, out]` for base weight `w` `[out, in]` and f32 factors `a` `[r, in]`,
    /// `b` `[out, r]` at scale `s`: `inv = 1/‖W + s·B·A‖` per row and `c = m ⊙ inv`, or with
    /// no `m` the norms themselves (a fresh adapter's magnitude).
    pub fn dora_factor(
        &self,
        w: &GTensor,
        a: &GTensor,
        b: &GTensor,
        s: f32,
        m: Option<&GTensor>,
    ) -> Result<(GTensor, GTensor)> {
        if a.dt != Dt::F32 || b.dt != Dt::F32 || m.is_some_and(|m| m.dt != Dt::F32) {
            return Err(Error::Invalid(
                "DoRA's norm reads f32 factors and magnitude".into(),
            ));
        }
        let (out, inp) = (w.rows, w.cols);
        if (b.rows, a.cols, b.cols) != (out, inp, a.rows) || m.is_some_and(|m| m.len() != out) {
            return Err(Error::Invalid(format!(
                "DoRA shapes: W [{out}, {inp}], A [{}, {}], B [{}, {}]",
                a.rows, a.cols, b.rows, b.cols
            )));
        }
        let full = self.cast(w, Dt::F32);
        self.matmul_into(&full, 0, &[(b, false, a, false, s)], true)?;
        let (c, inv) = (self.alloc(1, out, Dt::F32), self.alloc(1, out, Dt::F32));
        if out > 0 {
            self.run(
                "dora_norm",
                LaunchConfig {
                    grid_dim: (out as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                },
                &[
                    A::P(full.ptr()),
                    A::P(m.map_or(0, GTensor::ptr)),
                    A::P(c.ptr()),
                    A::P(inv.ptr()),
                    A::I(out as i32),
                    A::I(inp as i32),
                ],
            );
        }
        Ok((c, inv))
    }

    /// `y[:, j] *= c[j] + add` in place (`c` f32 `[1, cols]`).
    pub fn scale_cols(&self, y: &mut GTensor, c: &GTensor, add: f32) {
        assert_eq!(
            (c.len(), c.dt),
            (y.cols, Dt::F32),
            "scale_cols: one f32 factor per column"
        );
        if !y.unique() {
            *y = self.copy(y);
        }
        if !y.is_empty() {
            self.run(
                &format!("scale_cols_{}", y.dt.suffix()),
                grid1(y.len()),
                &[
                    A::P(y.ptr()),
                    A::P(c.ptr()),
                    A::F(add),
                    A::I(y.rows as i32),
                    A::I(y.cols as i32),
                ],
            );
        }
    }

    /// `inv ⊙ Σ_rows a ⊙ b`, f32 `[1, cols]` (`a`, `b` of one shape and type).
    pub fn col_dot(&self, a: &GTensor, b: &GTensor, inv: &GTensor) -> GTensor {
        assert_eq!(
            (a.rows, a.cols, a.dt),
            (b.rows, b.cols, b.dt),
            "col_dot shapes"
        );
        assert_eq!((inv.len(), inv.dt), (a.cols, Dt::F32), "col_dot factor");
        let out = self.alloc(1, a.cols, Dt::F32);
        if a.cols > 0 {
            self.run(
                &format!("col_dot_{}", a.dt.suffix()),
                LaunchConfig {
                    grid_dim: (a.cols.div_ceil(256) as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                },
                &[
                    A::P(a.ptr()),
                    A::P(b.ptr()),
                    A::P(inv.ptr()),
                    A::P(out.ptr()),
                    A::I(a.rows as i32),
                    A::I(a.cols as i32),
                ],
            );
        }
        out
    }
}
