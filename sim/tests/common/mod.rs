//! Helpers shared by the simulator's tests.

use std::path::PathBuf;

use burn::tensor::{DType, Device};
use fedtune_engine::{LoadedModel, load_model};

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The tiny test model.
pub fn tiny() -> LoadedModel {
    load_model(
        &root().join("testdata/tiny-llama/model"),
        &Device::flex(),
        DType::F32,
    )
    .unwrap()
}
