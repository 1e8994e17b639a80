//! Every architecture variant against transformers' logits (`testdata/variants`, from
//! `scripts/make_variant_fixtures.py`): Qwen2 with q/k/v biases and an untied head, Mistral
//! with a sliding window shorter than the sequence, Llama with llama3 RoPE scaling, attention
//! and MLP biases and an explicit head_dim, and a bf16 sharded Llama with linear RoPE scaling.

use std::path::PathBuf;

use burn::tensor::{DType, Device};
use fedtune_engine::weights::{SafetensorsSource, TensorSource, to_f32_vec};
use fedtune_engine::{LlamaModel, ModelConfig};

fn check(name: &str) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata/variants")
        .join(name);
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let src = SafetensorsSource::open_dir(&dir).unwrap();
    let model = LlamaModel::load(&src, cfg, &Device::flex(), DType::F32).unwrap();
    let reference = SafetensorsSource::open_file(&dir.join("reference.safetensors")).unwrap();
    let ids_data = reference.load("input_ids").unwrap().unwrap();
    let [b, t] = [ids_data.shape()[0], ids_data.shape()[1]];
    let ids: Vec<u32> = ids_data
        .convert::<i64>()
        .try_to_vec::<i64>()
        .unwrap()
        .iter()
        .map(|&v| v as u32)
        .collect();
    let got = to_f32_vec(model.forward(&ids, b, t).into_data());
    let want = to_f32_vec(reference.load("logits").unwrap().unwrap());
    let max = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    println!("{name}: max abs diff {max:e}");
    assert!(max < 1e-4, "{name}: {max}");
}

#[test]
fn qwen2_with_qkv_bias_and_untied_head_matches_transformers() {
    check("qwen2_bias_untied");
}

#[test]
fn mistral_sliding_window_matches_transformers() {
    check("mistral_sliding_window");
}

#[test]
fn llama3_rope_scaling_biases_and_explicit_head_dim_match_transformers() {
    check("llama3_rope_bias_headdim");
}

#[test]
fn bf16_sharded_checkpoint_with_linear_rope_matches_transformers() {
    check("llama_linear_rope_bf16_sharded");
}
