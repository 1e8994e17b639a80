//! The model against transformers' own outputs on the tiny reference checkpoint
//! (`testdata/tiny-llama`, produced by torch 2.15 + transformers 5.23 + PEFT 0.21.2).

use std::path::PathBuf;

use burn::tensor::{DType, Device};
use fedtune_engine::weights::{SafetensorsSource, TensorSource, to_f32_vec};
use fedtune_engine::{LlamaModel, ModelConfig};

fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/tiny-llama")
}

#[test]
fn base_logits_match_transformers_within_1e4() {
    let dir = testdata();
    let cfg = ModelConfig::from_file(&dir.join("model/config.json")).unwrap();
    let src = SafetensorsSource::open_dir(&dir.join("model")).unwrap();
    let device = Device::flex();
    let model = LlamaModel::load(&src, cfg, &device, DType::F32).unwrap();
    let reference = SafetensorsSource::open_file(&dir.join("reference.safetensors")).unwrap();
    let ids: Vec<u32> = reference
        .load("input_ids")
        .unwrap()
        .unwrap()
        .convert::<i64>()
        .iter::<i64>()
        .map(|v| v as u32)
        .collect();
    let t = ids.len();
    let logits = model.forward(&ids, 1, t);
    let got = to_f32_vec(logits.clone().slice([0..1, 0..t, 0..256]).into_data());
    let want = to_f32_vec(reference.load("base_logits_first256").unwrap().unwrap());
    let max = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    println!("max abs diff on first 256 columns: {max:e}");
    assert!(max < 1e-4, "max abs diff {max}");
}
