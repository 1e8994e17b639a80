//! What the emulated-GPU CLI tests share: the emulated device (built on first use) and
//! `fedtune` commands that open it through `LD_LIBRARY_PATH`. The test crate declares `emu`
//! (`engine/tests/gpu_common/emu.rs`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::emu;

/// The emulated GPU's library directory, or `None` (the test passes) when not asked for.
pub fn emulator() -> Option<PathBuf> {
    if !emu::requested() {
        eprintln!("FEDTUNE_CUDA_EMULATOR is not 1: the emulated GPU is not used");
        return None;
    }
    Some(
        emu::dir()
            .unwrap_or_else(|e| panic!("FEDTUNE_CUDA_EMULATOR=1: {e}"))
            .to_path_buf(),
    )
}

/// A `fedtune` command, on the emulated GPU's libraries when `gpu` is given (the kernels' PTX
/// is cached under the tests' target directory, so NVRTC compiles it once).
pub fn command(gpu: Option<&Path>) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fedtune"));
    c.env(
        "FEDTUNE_CACHE_DIR",
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cuda-emu-cache"),
    );
    if let Some(dir) = gpu {
        let mut paths = vec![dir.to_path_buf()];
        if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
            paths.extend(std::env::split_paths(&old));
        }
        c.env("LD_LIBRARY_PATH", std::env::join_paths(paths).unwrap());
    }
    c
}

/// `fedtune <args>` (see [`command`]), which must succeed.
pub fn fedtune(args: &[&str], gpu: Option<&Path>) -> Output {
    let o = command(gpu).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "fedtune {args:?} ({}): {}",
        if gpu.is_some() { "emulated GPU" } else { "CPU" },
        String::from_utf8_lossy(&o.stderr)
    );
    o
}
