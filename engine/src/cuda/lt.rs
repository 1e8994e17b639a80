//! Matrix products through cuBLASLt: `C = Σ αᵢ·op(Aᵢ)·op(Bᵢ)` accumulated into one output
//! (the first term writes, the others add with β = 1), on row-major operands of any stride.
//! f32 products use f32 arithmetic (no TF32 unless asked); bf16/f16 products run on tensor
//! cores with f32 accumulation and may write f32 output (the LM head's logits). The chosen
//! algorithm is cached per shape.
//!
//! Row-major `C[m, n] = op(A)·op(B)` is column-major `Cᵀ = op(B)ᵀ·op(A)ᵀ`: cuBLASLt's first
//! operand is B's storage, its second A's, with the same transpose flags.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::{result, sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use super::tensor::Dt;
use crate::error::{Error, Result};

/// A row-major matrix operand: `rows × cols` at `ptr` with row stride `ld` (elements).
#[derive(Debug, Clone, Copy)]
pub struct Mat {
    /// Device address of element (0, 0).
    pub ptr: u64,
    /// Rows as stored.
    pub rows: usize,
    /// Columns as stored.
    pub cols: usize,
    /// Row stride in elements (≥ cols).
    pub ld: usize,
    /// Element type.
    pub dt: Dt,
}

/// One term `alpha·op(a)·op(b)`.
#[derive(Debug, Clone, Copy)]
pub struct LtTerm {
    /// Left factor.
    pub a: Mat,
    /// Use `a` transposed.
    pub ta: bool,
    /// Right factor.
    pub b: Mat,
    /// Use `b` transposed.
    pub tb: bool,
    /// Scale.
    pub alpha: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    lda: usize,
    ldb: usize,
    ldc: usize,
    ab: Dt,
    c: Dt,
    accumulate: bool,
    tf32: bool,
    align: [u8; 3],
}

/// A cuBLASLt handle with its workspace and algorithm cache.
pub struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    stream: Arc<CudaStream>,
    algos: Mutex<HashMap<Key, sys::cublasLtMatmulAlgo_t>>,
}

// SAFETY: the handle is used under the caller's single stream; the algorithm cache is locked.
unsafe impl Send for Lt {}
unsafe impl Sync for Lt {}

impl Drop for Lt {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once.
        let _ = unsafe { result::destroy_handle(self.handle) };
    }
}

fn blas<T>(what: &str, r: std::result::Result<T, result::CublasError>) -> Result<T> {
    r.map_err(|e| Error::Device(format!("cuBLASLt {what}: {e:?}")))
}

fn cuda_type(dt: Dt) -> sys::cudaDataType {
    match dt {
        Dt::F32 => sys::cudaDataType_t::CUDA_R_32F,
        Dt::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
        Dt::F16 => sys::cudaDataType_t::CUDA_R_16F,
    }
}

/// Largest power of two (≤ 256) dividing `p`: the alignment cuBLASLt may assume.
fn alignment(p: u64) -> u8 {
    let tz = p.trailing_zeros().min(8);
    tz as u8
}

struct Layout(sys::cublasLtMatrixLayout_t);
impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by create_matrix_layout, destroyed once.
        let _ = unsafe { result::destroy_matrix_layout(self.0) };
    }
}
struct Desc(sys::cublasLtMatmulDesc_t);
impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_desc, destroyed once.
        let _ = unsafe { result::destroy_matmul_desc(self.0) };
    }
}
struct Pref(sys::cublasLtMatmulPreference_t);
impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_pref, destroyed once.
        let _ = unsafe { result::destroy_matmul_pref(self.0) };
    }
}

impl Lt {
    /// A handle with a workspace of 32 MiB (cuBLAS's recommendation for Hopper; 4 MiB before).
    pub fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        // SAFETY: the library was found before the device was opened.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::Device("cuBLASLt library not found".into()));
        }
        let handle = blas("handle", result::create_handle())?;
        let (major, _) = stream
            .context()
            .compute_capability()
            .map_err(|e| Error::Device(format!("compute capability: {e}")))?;
        let size = if major >= 9 { 32 << 20 } else { 4 << 20 };
        // SAFETY: the workspace is scratch space for cuBLASLt.
        let workspace = unsafe { stream.alloc::<u8>(size) }
            .map_err(|e| Error::Device(format!("cuBLASLt workspace: {e}")))?;
        Ok(Lt {
            handle,
            workspace,
            stream: stream.clone(),
            algos: Mutex::new(HashMap::new()),
        })
    }

    /// Workspace bytes.
    pub fn workspace_bytes(&self) -> usize {
        self.workspace.len()
    }

    /// `c = Σ terms` (`c` `[m, n]` with row stride `ldc`), or `c += Σ terms` when
    /// `accumulate`. Shapes are checked; cuBLASLt errors are returned.
    pub fn gemm(&self, c: Mat, terms: &[LtTerm], accumulate: bool, tf32: bool) -> Result<()> {
        for (i, t) in terms.iter().enumerate() {
            let (m, k) = if t.ta {
                (t.a.cols, t.a.rows)
            } else {
                (t.a.rows, t.a.cols)
            };
            let (k2, n) = if t.tb {
                (t.b.cols, t.b.rows)
            } else {
                (t.b.rows, t.b.cols)
            };
            if k != k2 || m != c.rows || n != c.cols || t.a.dt != t.b.dt {
                return Err(Error::Invalid(format!(
                    "GPU product: op(A) {m}×{k} · op(B) {k2}×{n} into {}×{} ({:?}·{:?})",
                    c.rows, c.cols, t.a.dt, t.b.dt
                )));
            }
            if m == 0 || n == 0 {
                return Ok(());
            }
            self.one(c, t, m, n, k, accumulate || i > 0, tf32)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn one(
        &self,
        c: Mat,
        t: &LtTerm,
        m: usize,
        n: usize,
        k: usize,
        acc: bool,
        tf32: bool,
    ) -> Result<()> {
        let key = Key {
            m,
            n,
            k,
            ta: t.ta,
            tb: t.tb,
            lda: t.a.ld,
            ldb: t.b.ld,
            ldc: c.ld,
            ab: t.a.dt,
            c: c.dt,
            accumulate: acc,
            tf32,
            align: [alignment(t.a.ptr), alignment(t.b.ptr), alignment(c.ptr)],
        };
        let compute = if tf32 && t.a.dt == Dt::F32 {
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
        } else {
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
        // Column-major view: first operand = B's storage (rows = its cols), second = A's.
        let lay = |x: &Mat| -> Result<Layout> {
            Ok(Layout(blas(
                "layout",
                result::create_matrix_layout(
                    cuda_type(x.dt),
                    x.cols as u64,
                    x.rows as u64,
                    x.ld as i64,
                ),
            )?))
        };
        let l1 = lay(&t.b)?;
        let l2 = lay(&t.a)?;
        let lc = Layout(blas(
            "layout",
            result::create_matrix_layout(cuda_type(c.dt), n as u64, m as u64, c.ld as i64),
        )?);
        let desc = Desc(blas(
            "descriptor",
            result::create_matmul_desc(compute, sys::cudaDataType_t::CUDA_R_32F),
        )?);
        let set = |attr, v: i32| -> Result<()> {
            // SAFETY: a valid descriptor; TRANSA/TRANSB take an int32 operation.
            blas("descriptor", unsafe {
                result::set_matmul_desc_attribute(desc.0, attr, (&v as *const i32).cast(), 4)
            })
        };
        let op = |t: bool| if t { 1 } else { 0 };
        set(
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            op(t.tb),
        )?;
        set(
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
            op(t.ta),
        )?;
        let cached = self
            .algos
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .copied();
        let algo = match cached {
            Some(a) => a,
            None => {
                let pref = Pref(blas("preference", result::create_matmul_pref())?);
                let ws = self.workspace.len();
                let setp = |attr, v: &[u8]| -> Result<()> {
                    // SAFETY: a valid preference; the value has the attribute's size.
                    blas("preference", unsafe {
                        result::set_matmul_pref_attribute(pref.0, attr, v.as_ptr().cast(), v.len())
                    })
                };
                use sys::cublasLtMatmulPreferenceAttributes_t as P;
                setp(
                    P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    &(ws as u64).to_ne_bytes(),
                )?;
                let al = |a: u8| (1u32 << a).to_ne_bytes();
                setp(
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                    &al(key.align[1]),
                )?;
                setp(
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    &al(key.align[0]),
                )?;
                setp(
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                    &al(key.align[2]),
                )?;
                setp(
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                    &al(key.align[2]),
                )?;
                // SAFETY: valid handles.
                let h = blas("heuristic", unsafe {
                    result::get_matmul_algo_heuristic(
                        self.handle,
                        desc.0,
                        l1.0,
                        l2.0,
                        lc.0,
                        lc.0,
                        pref.0,
                    )
                })?;
                self.algos
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key, h.algo);
                h.algo
            }
        };
        let alpha = t.alpha;
        let beta: f32 = if acc { 1.0 } else { 0.0 };
        let ws = self.workspace.device_ptr(&self.stream).0;
        // SAFETY: operands were shape-checked by the caller and live on this stream; the
        // algorithm was chosen for these layouts and alignments.
        blas("matmul", unsafe {
            result::matmul(
                self.handle,
                desc.0,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                t.b.ptr as *const _,
                l1.0,
                t.a.ptr as *const _,
                l2.0,
                c.ptr as *const _,
                lc.0,
                c.ptr as *mut _,
                lc.0,
                &algo,
                ws as *mut _,
                self.workspace.len(),
                self.stream.cu_stream() as _,
            )
        })
    }
}
