//! Helpers of the GPU tests (`cuda_device`, `cuda_train`): the device, test data, random
//! matrices, uploads and comparisons.
#![allow(dead_code)] // each test binary uses a subset

pub mod emu;

use std::path::PathBuf;
use std::sync::Arc;

use burn::tensor::{DType, Device, Distribution, Tensor};
use fedtune_engine::cuda::{Dt, GTensor, Gpu};
use fedtune_engine::weights::{SafetensorsSource, to_f32_vec};
use fedtune_engine::{LlamaModel, ModelConfig};

/// Test data is read from `$FEDTUNE_REPO/testdata` (the binary may run on another machine),
/// else from the source tree.
pub fn repo() -> PathBuf {
    std::env::var("FEDTUNE_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."))
}

/// The GPU of the tests: the real one, or with `FEDTUNE_CUDA_EMULATOR=1` (and no
/// `FEDTUNE_REQUIRE_GPU`) the emulated one of [`emu`]; `None` (the test passes) without either.
pub fn gpu() -> Option<Arc<Gpu>> {
    if emu::requested() && std::env::var("FEDTUNE_REQUIRE_GPU").is_err() {
        let dir = load_emulator().unwrap_or_else(|e| panic!("FEDTUNE_CUDA_EMULATOR=1: {e}"));
        let g = Gpu::open(0).unwrap_or_else(|e| {
            panic!(
                "FEDTUNE_CUDA_EMULATOR=1: the emulated GPU ({}) did not open: {e}",
                dir.display()
            )
        });
        return Some(g);
    }
    match Gpu::open(0) {
        Ok(g) => Some(g),
        Err(e) => {
            assert!(
                std::env::var("FEDTUNE_REQUIRE_GPU").is_err(),
                "FEDTUNE_REQUIRE_GPU is set: {e}"
            );
            eprintln!("no GPU: {e}");
            None
        }
    }
}

/// Builds and loads the emulated GPU's libraries, so that cudarc's opens by name find them.
fn load_emulator() -> Result<&'static std::path::Path, String> {
    static LOADED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let dir = emu::dir()?;
    LOADED
        .get_or_init(|| {
            for lib in emu::LIBS {
                // SAFETY: the emulator's initialisers only set up its own state; the handle is
                // kept for the life of the process, so later opens by name find it.
                let l = unsafe { libloading::Library::new(dir.join(lib)) }
                    .map_err(|e| format!("loading the emulated {lib}: {e}"))?;
                std::mem::forget(l);
            }
            Ok(())
        })
        .clone()?;
    Ok(dir)
}

pub fn rand(shape: [usize; 2]) -> Tensor<2> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Device::flex())
}

pub fn host(t: &Tensor<2>) -> Vec<f32> {
    to_f32_vec(t.to_data())
}

pub fn up(g: &Gpu, t: &Tensor<2>) -> GTensor {
    let [r, c] = t.dims();
    g.upload(&host(t), r, c, Dt::F32).unwrap()
}

/// Largest |a − b| relative to the largest |b| (≥ 1).
pub fn rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths");
    let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
        / scale
}

pub fn check(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let r = rel(got, want);
    println!("{what}: max relative diff {r:.2e}");
    assert!(r <= tol, "{what}: {r:e} > {tol:e}");
}

/// Two packed sequences per row (positions < 30 and the rest), and padding (segment 0) at the
/// end of the second row.
pub fn packed_segments(b: usize, t: usize) -> Vec<u32> {
    (0..b * t)
        .map(|i| {
            let (row, pos) = (i / t, i % t);
            if row == 1 && pos >= t - 5 {
                0
            } else if pos < 30 {
                1
            } else {
                2
            }
        })
        .collect()
}

/// The tiny reference model with its tokenizer (f32, on the host).
pub fn tiny_loaded() -> fedtune_engine::LoadedModel {
    fedtune_engine::load_model(
        &repo().join("testdata/tiny-llama/model"),
        &Device::flex(),
        DType::F32,
    )
    .unwrap()
}

pub fn tiny(dir: &str) -> (LlamaModel, SafetensorsSource) {
    let d = repo().join(dir);
    let cfg = ModelConfig::from_file(&d.join("config.json")).unwrap();
    let src = SafetensorsSource::open_dir(&d).unwrap();
    (
        LlamaModel::load(&src, cfg, &Device::flex(), DType::F32).unwrap(),
        src,
    )
}
