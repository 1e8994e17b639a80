//! Finding and loading the system BLAS (`dlopen`): `FEDTUNE_BLAS`, then oneMKL on Intel CPUs
//! (its sequential layer, one thread per call), then OpenBLAS with `OPENBLAS_CORETYPE` set to
//! the CPU's kernel family (see the parent module).

use super::{Blas, GemmBf16, Sgemm};

type SetThreads = unsafe extern "C" fn(n: i32);
type SetLayer = unsafe extern "C" fn(layer: i32) -> i32;
type VersionString = unsafe extern "C" fn(buf: *mut std::ffi::c_char, len: i32);
type CoreName = unsafe extern "C" fn() -> *const std::ffi::c_char;

#[cfg(target_os = "macos")]
const CANDIDATES: &[&str] = &[
    "libopenblas.dylib",
    "/opt/homebrew/opt/openblas/lib/libopenblas.dylib",
    "/usr/local/opt/openblas/lib/libopenblas.dylib",
];
/// oneMKL's single dynamic library (the pip wheel ships `.so.3`, Debian's `libmkl-rt` `.so`).
#[cfg(not(target_os = "macos"))]
const MKL_NAMES: &[&str] = &["libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so"];
#[cfg(target_os = "macos")]
const MKL_NAMES: &[&str] = &[];

/// `MKL_THREADING_SEQUENTIAL` of `mkl_set_threading_layer`.
const MKL_SEQUENTIAL: i32 = 1;

#[cfg(not(target_os = "macos"))]
const CANDIDATES: &[&str] = &[
    "libopenblas.so.0",
    "libopenblas.so",
    "libopenblasp.so.0",
    "libopenblasp-r0.3.so",
];

pub(super) fn load(path: &str) -> Result<Blas, String> {
    // SAFETY: loading a shared library runs its initialisers; the candidates are BLAS
    // libraries, and FEDTUNE_BLAS is the user's explicit choice.
    let lib = unsafe { libloading::Library::new(path) }.map_err(|e| format!("{path}: {e}"))?;
    // SAFETY: `cblas_sgemm` has this C signature in every CBLAS (LP64).
    let sgemm: Sgemm = unsafe { lib.get::<Sgemm>(b"cblas_sgemm\0") }
        .map(|s| *s)
        .map_err(|e| format!("{path}: no cblas_sgemm ({e})"))?;
    // One thread per call: parallelism comes from the caller's row blocks.
    // SAFETY: OpenBLAS's `openblas_set_num_threads(int)`.
    if let Ok(set) = unsafe { lib.get::<SetThreads>(b"openblas_set_num_threads\0") } {
        unsafe { set(1) };
    }
    let mkl = setup_mkl(&lib);
    // SAFETY: oneMKL's `cblas_gemm_bf16bf16f32` and OpenBLAS's `cblas_sbgemm` (present when
    // it is built with bf16 support) share this C signature (LP64, bf16 as 16-bit words).
    let gemm_bf16 = [&b"cblas_gemm_bf16bf16f32\0"[..], b"cblas_sbgemm\0"]
        .into_iter()
        .find_map(|sym| unsafe { lib.get::<GemmBf16>(sym) }.ok().map(|f| *f));
    // SAFETY: OpenBLAS's `char* openblas_get_corename(void)` returns a static C string.
    let core = unsafe { lib.get::<CoreName>(b"openblas_get_corename\0") }
        .ok()
        .and_then(|f| {
            let p = unsafe { f() };
            (!p.is_null()).then(|| {
                unsafe { std::ffi::CStr::from_ptr(p) }
                    .to_string_lossy()
                    .into_owned()
            })
        });
    Ok(Blas {
        sgemm,
        gemm_bf16,
        name: path.to_string(),
        core,
        mkl,
        _lib: lib,
    })
}

/// When `lib` is oneMKL: its sequential layer (no OpenMP runtime needed) unless the user chose
/// one, set before any other MKL call, then one thread per call whatever the layer; returns
/// its version string. `None` for other libraries.
fn setup_mkl(lib: &libloading::Library) -> Option<String> {
    // SAFETY: `int MKL_Set_Threading_Layer(int)`, called before any computation.
    let layer = unsafe { lib.get::<SetLayer>(b"MKL_Set_Threading_Layer\0") }.ok()?;
    if std::env::var_os("MKL_THREADING_LAYER").is_none() {
        unsafe { layer(MKL_SEQUENTIAL) };
    }
    // SAFETY: `void MKL_Set_Num_Threads(int)`.
    if let Ok(set) = unsafe { lib.get::<SetThreads>(b"MKL_Set_Num_Threads\0") } {
        unsafe { set(1) };
    }
    // SAFETY: `void MKL_Get_Version_String(char* buf, int len)` writes a NUL-terminated
    // string of at most `len` bytes.
    let Ok(version) = (unsafe { lib.get::<VersionString>(b"MKL_Get_Version_String\0") }) else {
        return Some("oneMKL".to_string());
    };
    let mut buf = [0 as std::ffi::c_char; 256];
    unsafe { version(buf.as_mut_ptr(), buf.len() as i32) };
    buf[buf.len() - 1] = 0;
    let s = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy();
    Some(s.trim().to_string())
}

/// The OpenBLAS kernel family to ask for on this CPU (`OPENBLAS_CORETYPE`), if any.
pub(super) fn openblas_coretype() -> Option<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl")
        {
            return Some("SkylakeX");
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Some("Haswell");
        }
    }
    None
}

/// Sets `OPENBLAS_CORETYPE` for the library about to be loaded, unless the user set it.
fn choose_openblas_kernels() {
    if std::env::var_os("OPENBLAS_CORETYPE").is_some() {
        return;
    }
    if let Some(core) = openblas_coretype() {
        // SAFETY: called once, from the initialiser of `get()`, before the library is
        // loaded; fedtune reads no environment variable concurrently at that point, and the
        // value only adds a variable no other code of ours depends on.
        unsafe { std::env::set_var("OPENBLAS_CORETYPE", core) };
    }
}

pub(super) fn find() -> Option<Blas> {
    choose_openblas_kernels();
    match std::env::var("FEDTUNE_BLAS") {
        Ok(v) if matches!(v.as_str(), "off" | "none" | "0" | "") => None,
        Ok(path) => match load(&path) {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::warn!("FEDTUNE_BLAS: {e}; using burn's matrix product");
                None
            }
        },
        Err(_) => candidates().into_iter().find_map(|p| load(&p).ok()),
    }
}

/// The libraries tried in order when the user named none: oneMKL (Intel CPUs), then OpenBLAS.
pub(super) fn candidates() -> Vec<String> {
    let mut all = mkl_candidates();
    all.extend(CANDIDATES.iter().map(|s| s.to_string()));
    all
}

/// Where to look for oneMKL: only on Intel CPUs (on others it is known to take slow paths),
/// on the loader's path and in the active Python environment.
fn mkl_candidates() -> Vec<String> {
    if !intel_cpu() {
        return Vec::new();
    }
    let mut out: Vec<String> = MKL_NAMES.iter().map(|s| s.to_string()).collect();
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(prefix) = std::env::var_os(var) {
            let lib = std::path::Path::new(&prefix).join("lib");
            out.extend(
                MKL_NAMES
                    .iter()
                    .map(|n| lib.join(n))
                    .filter(|p| p.exists())
                    .map(|p| p.to_string_lossy().into_owned()),
            );
        }
    }
    out
}

/// Whether the CPU's vendor string is `GenuineIntel`.
fn intel_cpu() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // CPUID leaf 0 exists on every x86-64 CPU (safe since Rust 1.87).
        let r = std::arch::x86_64::__cpuid(0);
        let mut v = Vec::with_capacity(12);
        for w in [r.ebx, r.edx, r.ecx] {
            v.extend_from_slice(&w.to_le_bytes());
        }
        v == b"GenuineIntel"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
