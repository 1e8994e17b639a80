//! Single-precision matrix products through a system BLAS when one is installed.
//!
//! The projections of a training step are most of its time, and at their shapes (a few
//! thousand rows times a few hundred to a few thousand columns) OpenBLAS's SGEMM ran 1.3–2×
//! as fast as the `gemm` crate behind burn-flex here, and Intel's oneMKL faster again on Intel
//! CPUs (see BENCHMARKS.md). The library is loaded at run time (`dlopen`), so fedtune builds
//! and runs without one and picks it up when present:
//!
//! - `FEDTUNE_BLAS=/path/to/lib.so` loads that library (it must export the LP64
//!   `cblas_sgemm`); `FEDTUNE_BLAS=off` disables BLAS.
//! - Otherwise, on Intel CPUs, oneMKL's single dynamic library (`libmkl_rt.so.3` or `.2`) is
//!   tried first: on the loader's path, then in the active Python environment
//!   (`$VIRTUAL_ENV/lib`, `$CONDA_PREFIX/lib`; `pip install mkl` puts it there). Then the
//!   usual OpenBLAS names (`apt install libopenblas0`, `dnf install openblas`,
//!   `brew install openblas`). When none loads, callers fall back to burn's own product.
//!
//! OpenBLAS picks its kernels for the CPU when it is loaded. Releases before 0.3.22 (Debian 12
//! ships 0.3.21) do not know recent Xeons (Sapphire and Emerald Rapids) and fall back to their
//! generic SSE3 kernels ("Prescott"), about 5× slower here than their AVX-512 ones. Unless the
//! user set `OPENBLAS_CORETYPE`, fedtune sets it before loading the library to the newest
//! kernel family the CPU supports (`SkylakeX` with AVX-512, `Haswell` with AVX2), and logs the
//! kernels the library reports.
//!
//! BLAS runs single-threaded inside each call (OpenBLAS: one thread; oneMKL: its sequential
//! layer unless `MKL_THREADING_LAYER` says otherwise, and one thread); a product is split into
//! row blocks over the rayon pool the rest of the engine uses, so one set of threads does all
//! the work (the library's own threads would spin beside rayon's). Every output element is one
//! BLAS dot product over the full `k`, so a run repeats bit for bit with the same number of
//! threads. Across thread counts the blocks have other shapes, and some libraries' kernels
//! round a block's edge rows differently: OpenBLAS 0.3.21 changed the last bits between one
//! and two threads on a CI machine (another CPU than this one, whose AVX2 kernels did not);
//! the results then agree to float rounding (tested below).

use std::sync::OnceLock;

use rayon::prelude::*;

use super::SharedOut;

mod load;

/// A CBLAS `?gemm` over elements `E` with f32 `alpha`, `beta` and output (LP64).
type Gemm<E> = unsafe extern "C" fn(
    order: i32,
    trans_a: i32,
    trans_b: i32,
    m: i32,
    n: i32,
    k: i32,
    alpha: f32,
    a: *const E,
    lda: i32,
    b: *const E,
    ldb: i32,
    beta: f32,
    c: *mut f32,
    ldc: i32,
);

/// `cblas_sgemm`.
type Sgemm = Gemm<f32>;

/// oneMKL's `cblas_gemm_bf16bf16f32` (and OpenBLAS's `cblas_sbgemm` where it is built with
/// bf16 support): bf16 operands (as 16-bit words), f32 accumulation.
type GemmBf16 = Gemm<u16>;

const ROW_MAJOR: i32 = 101;
const NO_TRANS: i32 = 111;
const TRANS: i32 = 112;

/// A loaded BLAS.
pub struct Blas {
    sgemm: Sgemm,
    gemm_bf16: Option<GemmBf16>,
    /// Where it was loaded from.
    pub name: String,
    /// The kernel family OpenBLAS reports (`openblas_get_corename`), when it is OpenBLAS.
    pub core: Option<String>,
    /// oneMKL's version string, when it is oneMKL.
    pub mkl: Option<String>,
    _lib: libloading::Library,
}

/// The BLAS in use, loaded on first call; `None` when none is installed or it is disabled.
pub fn get() -> Option<&'static Blas> {
    static BLAS: OnceLock<Option<Blas>> = OnceLock::new();
    BLAS.get_or_init(|| {
        let b = load::find();
        match &b {
            Some(b) => tracing::debug!(
                "matrix products through {} ({})",
                b.name,
                b.mkl
                    .clone()
                    .or_else(|| b.core.as_ref().map(|c| format!("kernels: {c}")))
                    .unwrap_or_else(|| "kernels: unknown".into())
            ),
            None => tracing::debug!("no BLAS found; matrix products through burn"),
        }
        b
    })
    .as_ref()
}

/// How the products of a 16-bit base run, in words for logs: bf16 products through the BLAS
/// when it has them (`bf16`), else widened to f32.
pub fn half_products(bf16: bool) -> String {
    match get() {
        Some(b) if bf16 && b.has_bf16() => {
            format!("its products in bf16 with f32 accumulation ({})", b.name)
        }
        Some(b) => format!(
            "widened to f32 for each product ({} has no {} matrix product)",
            b.name,
            if bf16 { "bf16" } else { "f16" }
        ),
        None => "widened to f32 for each product (no BLAS loaded)".into(),
    }
}

/// An operand's stored values: f32, or bf16 for the mixed-precision products of
/// [`Blas::has_bf16`] (both operands of one part have the same type).
#[derive(Clone, Copy)]
pub enum Values<'a> {
    /// Single precision.
    F32(&'a [f32]),
    /// bfloat16.
    Bf16(&'a [half::bf16]),
}

impl Values<'_> {
    fn len(&self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::Bf16(v) => v.len(),
        }
    }
}

/// A row-major operand: `data` holds the matrix `[rows, cols]` with row stride `ld`, used as
/// is or transposed.
#[derive(Clone, Copy)]
pub struct Operand<'a> {
    /// Values.
    pub data: Values<'a>,
    /// Row stride of the stored matrix.
    pub ld: usize,
    /// Whether the product uses the transpose of the stored matrix.
    pub trans: bool,
}

impl<'a> Operand<'a> {
    /// A contiguous `[_, cols]` matrix used as is.
    pub fn plain(data: &'a [f32], cols: usize) -> Self {
        Operand {
            data: Values::F32(data),
            ld: cols,
            trans: false,
        }
    }

    /// A contiguous `[_, cols]` matrix used transposed.
    pub fn transposed(data: &'a [f32], cols: usize) -> Self {
        Operand {
            data: Values::F32(data),
            ld: cols,
            trans: true,
        }
    }
}

/// One term `alpha·op(a)·op(b)` (`op(a)` is `[m×k]`, `op(b)` `[k×n]`) of
/// [`Blas::product_sum`].
#[derive(Clone, Copy)]
pub struct Part<'a> {
    /// Inner dimension.
    pub k: usize,
    /// Scale.
    pub alpha: f32,
    /// Left operand.
    pub a: Operand<'a>,
    /// Right operand.
    pub b: Operand<'a>,
}

/// One row-major `?gemm` call's arguments but its operands.
struct Call {
    ta: i32,
    tb: i32,
    m: i32,
    n: i32,
    k: i32,
    alpha: f32,
    lda: i32,
    ldb: i32,
    beta: f32,
    c: *mut f32,
    ldc: i32,
}

impl Call {
    /// Runs `gemm` on `a` and `b`.
    ///
    /// # Safety
    /// `a`, `b` and `c` must be valid for the shapes and strides the call names.
    unsafe fn run<E>(&self, gemm: Gemm<E>, a: *const E, b: *const E) {
        // SAFETY: the caller's contract.
        unsafe {
            gemm(
                ROW_MAJOR, self.ta, self.tb, self.m, self.n, self.k, self.alpha, a, self.lda, b,
                self.ldb, self.beta, self.c, self.ldc,
            )
        }
    }
}

/// Rows (or columns) of `C` per parallel block: large enough that each block's packing of the
/// shared operand stays cheap.
const MIN_BLOCK: usize = 64;

impl Blas {
    /// Whether the library multiplies bf16 matrices with f32 accumulation (oneMKL's
    /// `cblas_gemm_bf16bf16f32`, on AMX or AVX-512-BF16 where the CPU has them), so that
    /// [`Values::Bf16`] parts run.
    pub fn has_bf16(&self) -> bool {
        self.gemm_bf16.is_some()
    }

    /// `c[m×n] = alpha·op(a)·op(b) + beta·c`, row-major, `c` contiguous with row stride `n`.
    ///
    /// # Panics
    /// When a slice is too short for the shapes it is given, or a size exceeds `i32`.
    #[allow(clippy::too_many_arguments)]
    pub fn sgemm(
        &self,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: Operand<'_>,
        b: Operand<'_>,
        beta: f32,
        c: &mut [f32],
    ) {
        assert!(c.len() >= m * n, "sgemm: output too short");
        // SAFETY: `c` holds m·n initialised values.
        unsafe {
            self.sum_raw(
                m,
                n,
                &[Part { k, alpha, a, b }],
                beta,
                c.as_mut_ptr(),
                n,
                true,
            )
        }
    }

    /// [`Blas::sgemm`] on the calling thread only, into `c` with row stride `ldc` (for
    /// kernels that already run one task per thread).
    #[allow(clippy::too_many_arguments)]
    pub fn sgemm_serial(
        &self,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: Operand<'_>,
        b: Operand<'_>,
        beta: f32,
        c: &mut [f32],
        ldc: usize,
    ) {
        if m == 0 || n == 0 {
            return;
        }
        assert!(
            ldc >= n && (m - 1) * ldc + n <= c.len(),
            "sgemm: output too short"
        );
        // SAFETY: `c` holds every element the product touches (checked above).
        unsafe {
            self.sum_raw(
                m,
                n,
                &[Part { k, alpha, a, b }],
                beta,
                c.as_mut_ptr(),
                ldc,
                false,
            )
        }
    }

    /// `alpha·op(a)·op(b)` `[m×n]` in a new vector (never zero-filled first).
    pub fn product(
        &self,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: Operand<'_>,
        b: Operand<'_>,
    ) -> Vec<f32> {
        self.product_sum(m, n, &[Part { k, alpha, a, b }])
    }

    /// `Σ alphaᵢ·op(aᵢ)·op(bᵢ)` `[m×n]` in a new vector (never zero-filled first), the parts
    /// accumulated in order. The threads split `C` once for the whole sum and each runs every
    /// part on its block, so they meet once per sum instead of once per part (at each meeting
    /// the thread that finished first waits: the two halves of one product here differ by a
    /// few percent from call to call).
    ///
    /// # Panics
    /// When `parts` is empty, or as [`Blas::sgemm`].
    pub fn product_sum(&self, m: usize, n: usize, parts: &[Part<'_>]) -> Vec<f32> {
        assert!(!parts.is_empty(), "product_sum: no parts");
        let mut c = Vec::<f32>::with_capacity(m * n);
        if parts.iter().all(|p| p.k == 0) {
            c.resize(m * n, 0.0);
            return c;
        }
        // SAFETY: with beta = 0 the first part writes every element of c without reading it
        // (BLAS writes zeros when its k is 0); the length is set only afterwards.
        unsafe {
            self.sum_raw(m, n, parts, 0.0, c.as_mut_ptr(), n, true);
            c.set_len(m * n);
        }
        c
    }

    /// `c = Σ parts + beta·c`: the first part with `beta`, the others accumulated onto it.
    ///
    /// # Safety
    /// `c` must be valid for writes of `m` rows of `n` values at row stride `ldc` (and reads
    /// when `beta != 0`).
    #[allow(clippy::too_many_arguments)]
    unsafe fn sum_raw(
        &self,
        m: usize,
        n: usize,
        parts: &[Part<'_>],
        beta: f32,
        c: *mut f32,
        ldc: usize,
        parallel: bool,
    ) {
        if m == 0 || n == 0 {
            return;
        }
        let fits = |op: &Operand<'_>, rows: usize, cols: usize| {
            // op(x) is [rows, cols]: stored [rows, cols] or [cols, rows].
            let (sr, sc) = if op.trans { (cols, rows) } else { (rows, cols) };
            sr == 0 || sc == 0 || (op.ld >= sc && (sr - 1) * op.ld + sc <= op.data.len())
        };
        for Part { k, a, b, .. } in parts {
            match (a.data, b.data) {
                (Values::F32(_), Values::F32(_)) => {}
                (Values::Bf16(_), Values::Bf16(_)) => {
                    assert!(self.has_bf16(), "{}: no bf16 matrix product", self.name)
                }
                _ => panic!("sgemm: operands of one part differ in type"),
            }
            assert!(fits(a, m, *k), "sgemm: left operand too short");
            assert!(fits(b, *k, n), "sgemm: right operand too short");
            for v in [m, n, *k, a.ld, b.ld, ldc] {
                assert!(i32::try_from(v).is_ok(), "sgemm: size {v} exceeds i32");
            }
        }
        let threads = if parallel {
            rayon::current_num_threads()
        } else {
            1
        };
        // Split the longer side of C into blocks: rows of op(a), or columns of op(b). Each
        // block packs the whole of the other operand, so this packs the smaller one again:
        // a row block all of op(b) (k·n), a column block all of op(a) (m·k). On the LM head
        // (256 rows × 49 152 vocabulary columns), column blocks were 8-13% faster than row
        // blocks that each packed the 113 MB embedding.
        let by_rows = m >= n;
        let len = if by_rows { m } else { n };
        let blocks = (len / MIN_BLOCK).clamp(1, threads);
        let step = len.div_ceil(blocks);
        let out = SharedOut::new(c, (m - 1) * ldc + n);
        let run = |start: usize| {
            let end = (start + step).min(len);
            for (i, &Part { k, alpha, a, b }) in parts.iter().enumerate() {
                let (mi, ni, a_off, b_off, c_off) = if by_rows {
                    // Row `start` of op(a): a row of a, or a column when transposed.
                    let a_off = if a.trans { start } else { start * a.ld };
                    (end - start, n, a_off, 0, start * ldc)
                } else {
                    // Column `start` of op(b): a column of b, or a row when transposed.
                    let b_off = if b.trans { start * b.ld } else { start };
                    (m, end - start, 0, b_off, start)
                };
                // SAFETY: bounds and types were checked for the whole product above; this
                // block reads its rows of op(a) (or columns of op(b)) and writes only its own
                // part of c.
                unsafe {
                    let call = Call {
                        ta: if a.trans { TRANS } else { NO_TRANS },
                        tb: if b.trans { TRANS } else { NO_TRANS },
                        m: mi as i32,
                        n: ni as i32,
                        k: k as i32,
                        alpha,
                        lda: a.ld.max(1) as i32,
                        ldb: b.ld.max(1) as i32,
                        beta: if i == 0 { beta } else { 1.0 },
                        c: out.at(c_off),
                        ldc: ldc as i32,
                    };
                    match (a.data, b.data, self.gemm_bf16) {
                        (Values::Bf16(ad), Values::Bf16(bd), Some(gemm)) => call.run(
                            gemm,
                            ad.as_ptr().add(a_off).cast(),
                            bd.as_ptr().add(b_off).cast(),
                        ),
                        (Values::F32(ad), Values::F32(bd), _) => {
                            call.run(self.sgemm, ad.as_ptr().add(a_off), bd.as_ptr().add(b_off))
                        }
                        _ => unreachable!("operand types checked above"),
                    }
                }
            }
        };
        if blocks == 1 {
            run(0);
        } else {
            (0..blocks).into_par_iter().for_each(|bi| run(bi * step));
        }
    }
}

/// Every BLAS this machine can load among the oneMKL and OpenBLAS names fedtune looks for
/// and the paths in `FEDTUNE_TEST_BLAS` (colon-separated; `.ci/run` puts oneMKL there), one
/// per library kind, so that both are checked where both are present.
#[cfg(test)]
pub(crate) fn every_blas() -> Vec<Blas> {
    // Sets OPENBLAS_CORETYPE once, as users get it, before any library loads here.
    let _ = get();
    let extra = std::env::var("FEDTUNE_TEST_BLAS").unwrap_or_default();
    let mut seen = std::collections::BTreeSet::new();
    load::candidates()
        .into_iter()
        .chain(extra.split(':').filter(|s| !s.is_empty()).map(String::from))
        .filter_map(|p| load::load(&p).ok())
        .filter(|b| seen.insert((b.mkl.is_some(), b.core.clone())))
        .collect()
}

#[cfg(test)]
mod tests;
