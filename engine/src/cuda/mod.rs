//! The NVIDIA GPU device: a CUDA context and stream opened through cudarc (the driver, NVRTC
//! and cuBLASLt are loaded at run time, so the default build carries this path and needs no
//! CUDA toolkit), fedtune's own kernels compiled by NVRTC for the device ([`compile`]),
//! products through cuBLASLt ([`lt`]), and a model whose weights live on the device
//! ([`model::CudaModel`], the [`crate::device::Backend`] of this device).
//!
//! Memory comes from the driver's stream-ordered pool (`cuMemAllocAsync`), kept cached: freed
//! blocks are reused by later allocations instead of being returned to the driver, so a step
//! does not call `cudaMalloc` per operation.

pub mod adapter;
pub mod backward;
pub mod compile;
pub mod dora;
pub mod libs;
pub mod lt;
pub mod model;
pub mod ops;
pub mod optim;
pub mod params;
pub mod profile;
pub mod tensor;
pub mod train;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr};

use crate::error::{Error, Result};
pub use model::CudaModel;
pub use profile::KernelTime;
pub use tensor::{Dt, GTensor};

/// An open GPU: context, stream, kernels and the cuBLASLt handle.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    module: Arc<CudaModule>,
    funcs: Mutex<HashMap<String, CudaFunction>>,
    lt: lt::Lt,
    /// Whether f32 products may use TF32 tensor cores ([`Gpu::set_tf32`]).
    tf32: std::sync::atomic::AtomicBool,
    /// bitsandbytes' dynamic map for double-quantised NF4 scales.
    dyn_map: CudaSlice<f32>,
    /// Whether launches are timed ([`Gpu::set_profiling`]).
    profiling: std::sync::atomic::AtomicBool,
    profiler: Mutex<Option<profile::Profiler>>,
    /// Device name, e.g. `NVIDIA H200`.
    pub name: String,
    /// Compute capability `(major, minor)`.
    pub cc: (i32, i32),
    /// CUDA device index.
    pub ordinal: usize,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cuda:{} ({}, sm_{}{})",
            self.ordinal, self.name, self.cc.0, self.cc.1
        )
    }
}

pub(crate) fn drv<T>(
    what: &str,
    r: std::result::Result<T, cudarc::driver::DriverError>,
) -> Result<T> {
    r.map_err(|e| Error::Device(format!("{what}: {e}")))
}

impl Gpu {
    /// Opens GPU `ordinal`: a clear error (never a panic) when no driver, no GPU or no CUDA
    /// library is found.
    pub fn open(ordinal: usize) -> Result<Arc<Gpu>> {
        // SAFETY: probing opens the driver library by name and closes it again.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::Device(
                "no NVIDIA driver found (libcuda.so.1); --device cuda needs an NVIDIA GPU with its driver installed"
                    .into(),
            ));
        }
        let missing = libs::preload();
        if !missing.is_empty() {
            return Err(Error::Device(format!(
                "CUDA libraries not found: {} (searched the loader path, FEDTUNE_CUDA_LIBS, /usr/local/cuda/lib64 and the \
                 active Python's nvidia wheels; `pip install nvidia-cuda-nvrtc nvidia-cublas` installs them)",
                missing.join(", ")
            )));
        }
        let count = drv("cuInit", CudaContext::device_count())?;
        if ordinal as i32 >= count {
            return Err(Error::Device(format!(
                "cuda:{ordinal} does not exist: {count} CUDA device(s) found"
            )));
        }
        let ctx = drv("creating the CUDA context", CudaContext::new(ordinal))?;
        // One stream: cudarc's cross-stream event tracking is not needed.
        // SAFETY: every buffer is used on this context's single stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = drv("creating a stream", ctx.new_stream())?;
        let cc = drv("compute capability", ctx.compute_capability())?;
        let name = drv("device name", ctx.name())?;
        keep_pool_cached(&ctx)?;
        let arch = format!("compute_{}{}", cc.0, cc.1);
        let ptx = compile::cached(&arch)?;
        let module = drv(
            "loading fedtune's kernels",
            ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx)),
        )?;
        let lt = lt::Lt::new(&stream)?;
        let dyn_map = drv("upload", stream.clone_htod(&crate::nf4::dynamic_map()[..]))?;
        let gpu = Arc::new(Gpu {
            ctx,
            stream,
            module,
            funcs: Mutex::new(HashMap::new()),
            lt,
            tf32: std::sync::atomic::AtomicBool::new(false),
            dyn_map,
            profiling: std::sync::atomic::AtomicBool::new(false),
            profiler: Mutex::new(None),
            name,
            cc,
            ordinal,
        });
        if std::env::var("FEDTUNE_PROFILE").is_ok_and(|v| v == "1") {
            gpu.set_profiling(true);
        }
        Ok(gpu)
    }

    /// Free device memory in bytes (the driver's count, plus nothing cached by the pool).
    pub fn free_bytes(&self) -> Result<u64> {
        let (free, _) = drv("free memory", self.ctx.mem_get_info())?;
        Ok(free as u64)
    }

    /// Bytes a new allocation can still get: the driver's free memory plus what the pool holds
    /// cached and unused.
    pub fn available_bytes(&self) -> Result<u64> {
        use cudarc::driver::sys::CUmemPool_attribute as A;
        let cached = pool_attr(&self.ctx, A::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?
            .saturating_sub(pool_attr(&self.ctx, A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?);
        Ok(self.free_bytes()? + cached)
    }

    /// Bytes allocated from the memory pool now.
    pub fn used_bytes(&self) -> Result<u64> {
        pool_attr(
            &self.ctx,
            cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
        )
    }

    /// Makes this GPU's context current on the calling thread. Work from several threads goes
    /// to the one stream in each thread's program order, so jobs that share only read-only
    /// tensors (a base model) may run side by side; a thread calls this before its first
    /// operation (cuBLASLt and the pool's attributes need the context current).
    pub fn bind(&self) -> Result<()> {
        drv("binding the CUDA context", self.ctx.bind_to_thread())
    }

    /// The stream every operation runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// A kernel of fedtune's program by name.
    pub(crate) fn func(&self, name: &str) -> CudaFunction {
        let mut funcs = self.funcs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = funcs.get(name) {
            return f.clone();
        }
        let f = self
            .module
            .load_function(name)
            .unwrap_or_else(|e| panic!("kernel `{name}` missing from fedtune's program: {e}"));
        funcs.insert(name.to_string(), f.clone());
        f
    }

    /// Waits for every queued operation.
    pub fn synchronize(&self) -> Result<()> {
        drv("synchronize", self.stream.synchronize())
    }

    /// Peak bytes allocated from the memory pool since the last reset (the allocator's
    /// high-water mark).
    pub fn peak_bytes(&self) -> Result<u64> {
        pool_attr(
            &self.ctx,
            cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
        )
    }

    /// Resets [`Gpu::peak_bytes`] to the bytes in use now.
    pub fn reset_peak(&self) -> Result<()> {
        let pool = default_pool(&self.ctx)?;
        let mut zero: u64 = 0;
        // SAFETY: a valid pool and a u64 attribute value.
        let r = unsafe {
            cudarc::driver::sys::cuMemPoolSetAttribute(
                pool,
                cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&mut zero as *mut u64).cast(),
            )
        };
        drv("resetting the pool's high-water mark", r.result())
    }

    /// The cuBLASLt workspace size in bytes (counted with the pool's peak for memory figures).
    pub fn workspace_bytes(&self) -> usize {
        self.lt.workspace_bytes()
    }

    /// Lets f32 matrix products run on TF32 tensor cores (10-bit mantissa inputs, f32
    /// accumulation), as PyTorch's `allow_tf32` and TRL's `--tf32` do; off by default, so f32
    /// stays exact for comparisons. bf16 and f16 products are unaffected.
    pub fn set_tf32(&self, on: bool) {
        self.tf32.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether f32 products may use TF32.
    pub fn tf32(&self) -> bool {
        self.tf32.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn lt(&self) -> &lt::Lt {
        &self.lt
    }

    pub(crate) fn dyn_map_ptr(&self) -> u64 {
        self.dyn_map.device_ptr(&self.stream).0
    }
}

fn default_pool(ctx: &Arc<CudaContext>) -> Result<cudarc::driver::sys::CUmemoryPool> {
    let mut pool = std::ptr::null_mut();
    // SAFETY: `pool` receives the device's default pool handle.
    let r = unsafe { cudarc::driver::sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
    drv("the device's memory pool", r.result())?;
    Ok(pool)
}

fn pool_attr(
    ctx: &Arc<CudaContext>,
    attr: cudarc::driver::sys::CUmemPool_attribute,
) -> Result<u64> {
    let pool = default_pool(ctx)?;
    let mut v: u64 = 0;
    // SAFETY: a valid pool; the attributes read here are u64 values.
    let r = unsafe {
        cudarc::driver::sys::cuMemPoolGetAttribute(pool, attr, (&mut v as *mut u64).cast())
    };
    drv("reading a memory pool attribute", r.result())?;
    Ok(v)
}

/// Keeps freed memory in the pool (release threshold = everything), so allocations after the
/// first step are served from cache.
fn keep_pool_cached(ctx: &Arc<CudaContext>) -> Result<()> {
    if !ctx.has_async_alloc() {
        return Ok(());
    }
    let pool = default_pool(ctx)?;
    let mut all: u64 = u64::MAX;
    // SAFETY: a valid pool and a u64 attribute value.
    let r = unsafe {
        cudarc::driver::sys::cuMemPoolSetAttribute(
            pool,
            cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut all as *mut u64).cast(),
        )
    };
    drv("configuring the memory pool", r.result())
}
