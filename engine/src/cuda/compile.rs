//! The CUDA C++ kernel sources, compiled at run time by NVRTC for the device's compute
//! capability and cached on disk by source hash and architecture
//! (`$FEDTUNE_CACHE_DIR/kernels`, else `$XDG_CACHE_HOME/fedtune/kernels` or
//! `~/.cache/fedtune/kernels`). All kernels form one program (one module to load).

use std::path::PathBuf;

use crate::error::{Error, Result};

/// Every kernel source file, in program order (`common.cuh` first: the others use it).
pub const SOURCES: [(&str, &str); 10] = [
    ("common.cuh", include_str!("kernels/common.cuh")),
    ("norm.cu", include_str!("kernels/norm.cu")),
    ("rope.cu", include_str!("kernels/rope.cu")),
    ("attention.cu", include_str!("kernels/attention.cu")),
    ("attention_mma.cu", include_str!("kernels/attention_mma.cu")),
    ("elementwise.cu", include_str!("kernels/elementwise.cu")),
    ("nf4.cu", include_str!("kernels/nf4.cu")),
    ("backward.cu", include_str!("kernels/backward.cu")),
    (
        "attention_mma_bwd.cu",
        include_str!("kernels/attention_mma_bwd.cu"),
    ),
    ("optim.cu", include_str!("kernels/optim.cu")),
];

/// The whole program: the sources concatenated, each behind a `#line` marker so that NVRTC's
/// messages name the file and line.
pub fn program() -> String {
    let mut s = String::new();
    for (name, src) in SOURCES {
        s.push_str(&format!("#line 1 \"{name}\"\n"));
        s.push_str(src);
        s.push('\n');
    }
    s
}

/// NVRTC options for a virtual architecture such as `compute_90`.
pub fn options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "--fmad=true".into(),
    ]
}

/// Compiles the program to PTX for `arch` (`compute_80`, `compute_90`, …).
pub fn compile(arch: &str) -> Result<String> {
    let opts = cudarc::nvrtc::CompileOptions {
        options: options(arch),
        name: Some("fedtune_kernels.cu".into()),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(program(), opts).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => Error::Device(format!(
            "NVRTC could not compile fedtune's kernels for {arch}:\n{}",
            log.to_string_lossy()
        )),
        other => Error::Device(format!("NVRTC failed for {arch}: {other:?}")),
    })?;
    Ok(ptx.to_src().trim_end_matches('\0').to_string())
}

fn cache_dir() -> Option<PathBuf> {
    if let Ok(d) = std::env::var("FEDTUNE_CACHE_DIR") {
        return Some(PathBuf::from(d).join("kernels"));
    }
    let base = std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .ok()?;
    Some(base.join("fedtune").join("kernels"))
}

/// PTX for `arch`, from the disk cache when the same sources were compiled before. A cache
/// that cannot be written only costs a recompilation next time.
pub fn cached(arch: &str) -> Result<String> {
    let mut h = blake3::Hasher::new();
    h.update(program().as_bytes());
    h.update(options(arch).join(" ").as_bytes());
    let key = h.finalize().to_hex();
    let file = cache_dir().map(|d| d.join(format!("{}-{arch}.ptx", &key.as_str()[..24])));
    if let Some(f) = &file
        && let Ok(ptx) = std::fs::read_to_string(f)
    {
        return Ok(ptx);
    }
    let ptx = compile(arch)?;
    if let Some(f) = &file
        && let Some(dir) = f.parent()
        && std::fs::create_dir_all(dir).is_ok()
    {
        let tmp = f.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &ptx).is_ok() {
            let _ = std::fs::rename(&tmp, f);
        }
    }
    Ok(ptx)
}
