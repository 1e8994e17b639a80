//! Finding the CUDA libraries at run time. cudarc opens them by name (`libnvrtc.so.13`, …);
//! where the loader's path does not have them, they are loaded here first by full path from
//! `FEDTUNE_CUDA_LIBS`, the CUDA toolkit (`/usr/local/cuda/lib64`) or the NVIDIA pip wheels of
//! the active Python (`nvidia/cu13/lib`; `nvidia/{cublas,cuda_nvrtc}/lib` for CUDA 12). A
//! library already loaded answers later opens of its name, so cudarc then finds it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Libraries in load order (NVRTC's builtins before NVRTC, cuBLASLt before cuBLAS), each with
/// the names tried: CUDA 13 first, then 12.
const LIBS: [(&str, &[&str]); 4] = [
    (
        "nvrtc-builtins",
        &[
            "libnvrtc-builtins.so.13.0",
            "libnvrtc-builtins.so.12.9",
            "libnvrtc-builtins.so.12",
        ],
    ),
    ("nvrtc", &["libnvrtc.so.13", "libnvrtc.so.12"]),
    ("cublasLt", &["libcublasLt.so.13", "libcublasLt.so.12"]),
    ("cublas", &["libcublas.so.13", "libcublas.so.12"]),
];

/// Directories searched, in order.
pub fn search_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Ok(v) = std::env::var("FEDTUNE_CUDA_LIBS") {
        dirs.extend(std::env::split_paths(&v));
    }
    if let Ok(v) = std::env::var("CUDA_HOME").or_else(|_| std::env::var("CUDA_PATH")) {
        dirs.push(Path::new(&v).join("lib64"));
    }
    dirs.push("/usr/local/cuda/lib64".into());
    dirs.push("/usr/local/cuda/targets/x86_64-linux/lib".into());
    for root in python_nvidia_dirs() {
        for sub in ["cu13/lib", "cublas/lib", "cuda_nvrtc/lib", "cu12/lib"] {
            dirs.push(root.join(sub));
        }
    }
    dirs.retain(|d| d.is_dir());
    dirs
}

/// `nvidia` package directories of the active Python (`python3`, or `$VIRTUAL_ENV`'s).
fn python_nvidia_dirs() -> Vec<PathBuf> {
    let python = std::env::var("VIRTUAL_ENV")
        .map(|v| Path::new(&v).join("bin/python3"))
        .unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(python)
        .args([
            "-c",
            "import importlib.util as u\ns=u.find_spec('nvidia')\nprint('\\n'.join(s.submodule_search_locations or []) if s else '')",
        ])
        .stderr(std::process::Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(PathBuf::from)
            .collect(),
        _ => Vec::new(),
    }
}

/// Loads what the loader's own path lacks from [`search_dirs`], once. Returns the libraries
/// that could not be found, by short name.
pub fn preload() -> &'static [&'static str] {
    static MISSING: OnceLock<Vec<&'static str>> = OnceLock::new();
    MISSING.get_or_init(|| {
        let mut missing = Vec::new();
        let mut dirs: Option<Vec<PathBuf>> = None;
        for (short, names) in LIBS {
            // SAFETY: loading a CUDA library runs its initialisers, which only set up its own
            // state; the handle is kept for the life of the process.
            let by_name = names
                .iter()
                .find_map(|n| unsafe { libloading::Library::new(n) }.ok());
            let lib = by_name.or_else(|| {
                let dirs = dirs.get_or_insert_with(search_dirs);
                dirs.iter().find_map(|d| {
                    names
                        .iter()
                        .find_map(|n| unsafe { libloading::Library::new(d.join(n)) }.ok())
                })
            });
            match lib {
                Some(l) => std::mem::forget(l),
                None if short == "nvrtc-builtins" => {}
                None => missing.push(short),
            }
        }
        missing
    })
}
