//! Row-major matrices in GPU memory: [`GTensor`] (`[rows, cols]` of one [`Dt`]), with uploads
//! from host f32 values (converted on the host, one tensor at a time) and downloads to f32.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, DevicePtr};

use super::{Gpu, drv};
use crate::error::{Error, Result};

/// Element type of a GPU tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dt {
    /// IEEE single precision.
    F32,
    /// bfloat16 (f32 arithmetic in kernels, f32 accumulation in products).
    BF16,
    /// IEEE half precision.
    F16,
}

impl Dt {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dt::F32 => 4,
            Dt::BF16 | Dt::F16 => 2,
        }
    }

    /// Suffix of the kernels instantiated for this type (`rmsnorm_bf16`).
    pub fn suffix(self) -> &'static str {
        match self {
            Dt::F32 => "f32",
            Dt::BF16 => "bf16",
            Dt::F16 => "f16",
        }
    }

    /// From burn's dtype (f32, bf16 and f16 only).
    pub fn from_burn(d: burn::tensor::DType) -> Result<Dt> {
        match d {
            burn::tensor::DType::F32 => Ok(Dt::F32),
            burn::tensor::DType::BF16 => Ok(Dt::BF16),
            burn::tensor::DType::F16 => Ok(Dt::F16),
            other => Err(Error::Invalid(format!(
                "{other:?} is not a GPU compute dtype (f32, bf16 or f16)"
            ))),
        }
    }

    /// Host bytes of `values` in this type (round to nearest even, as torch).
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            Dt::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Dt::BF16 => values
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
            Dt::F16 => values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
        }
    }
}

/// A `[rows, cols]` row-major matrix on the GPU. Clones share the storage.
#[derive(Clone)]
pub struct GTensor {
    pub(crate) buf: Arc<CudaSlice<u8>>,
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Element type.
    pub dt: Dt,
}

impl std::fmt::Debug for GTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GTensor[{}, {}; {:?}]", self.rows, self.cols, self.dt)
    }
}

impl GTensor {
    /// Elements.
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The device address of element 0.
    pub fn ptr(&self) -> u64 {
        self.buf.device_ptr(self.buf.stream()).0
    }

    /// The device address of row `r`.
    pub(crate) fn row_ptr(&self, r: usize) -> u64 {
        self.ptr() + (r * self.cols * self.dt.size()) as u64
    }

    /// The storage, writable when this is its only handle.
    pub(crate) fn unique(&mut self) -> bool {
        Arc::get_mut(&mut self.buf).is_some()
    }
}

impl Gpu {
    /// Uninitialised storage for `rows × cols` values of `dt` (from the pool).
    pub fn alloc(&self, rows: usize, cols: usize, dt: Dt) -> GTensor {
        let bytes = (rows * cols * dt.size()).max(1);
        // SAFETY: every caller writes the tensor before it is read.
        let buf = unsafe { self.stream.alloc::<u8>(bytes) }
            .unwrap_or_else(|e| panic!("GPU out of memory allocating {bytes} bytes: {e}"));
        GTensor {
            buf: Arc::new(buf),
            rows,
            cols,
            dt,
        }
    }

    /// Zeroed storage.
    pub fn zeros(&self, rows: usize, cols: usize, dt: Dt) -> GTensor {
        let mut t = self.alloc(rows, cols, dt);
        let buf = Arc::get_mut(&mut t.buf).expect("fresh tensor");
        self.stream
            .memset_zeros(buf)
            .unwrap_or_else(|e| panic!("GPU memset: {e}"));
        t
    }

    /// Uploads host bytes already in `dt`'s encoding.
    pub fn upload_bytes(&self, bytes: &[u8], rows: usize, cols: usize, dt: Dt) -> Result<GTensor> {
        if bytes.len() != rows * cols * dt.size() {
            return Err(Error::Invalid(format!(
                "upload of {} bytes into a [{rows}, {cols}] {dt:?} tensor",
                bytes.len()
            )));
        }
        let buf = drv("copy to the GPU", self.stream.clone_htod(bytes))?;
        Ok(GTensor {
            buf: Arc::new(buf),
            rows,
            cols,
            dt,
        })
    }

    /// Uploads f32 values as `dt`.
    pub fn upload(&self, values: &[f32], rows: usize, cols: usize, dt: Dt) -> Result<GTensor> {
        self.upload_bytes(&dt.encode(values), rows, cols, dt)
    }

    /// Uploads raw u32 values (token ids, segments, row indices).
    pub fn upload_u32(&self, values: &[u32]) -> Result<CudaSlice<u32>> {
        drv("copy to the GPU", self.stream.clone_htod(values))
    }

    /// Uploads raw bytes (NF4 codes).
    pub fn upload_u8(&self, values: &[u8]) -> Result<CudaSlice<u8>> {
        drv("copy to the GPU", self.stream.clone_htod(values))
    }

    /// Uploads f32 values as a plain buffer.
    pub fn upload_f32(&self, values: &[f32]) -> Result<CudaSlice<f32>> {
        drv("copy to the GPU", self.stream.clone_htod(values))
    }

    /// Downloads as f32 (converted on the device when stored in 16 bits).
    pub fn download(&self, t: &GTensor) -> Result<Vec<f32>> {
        let f = match t.dt {
            Dt::F32 => t.clone(),
            _ => self.cast(t, Dt::F32),
        };
        let bytes = drv("copy from the GPU", self.stream.clone_dtoh(f.buf.as_ref()))?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// Downloads a plain f32 buffer.
    pub fn download_f32(&self, b: &CudaSlice<f32>) -> Result<Vec<f32>> {
        drv("copy from the GPU", self.stream.clone_dtoh(b))
    }
}
