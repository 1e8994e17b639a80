//! Every architecture variant against transformers' logits (`testdata/variants`, from
//! `scripts/make_variant_fixtures.py`): Qwen2 with q/k/v biases and an untied head, Mistral
//! with a sliding window shorter than the sequence, Llama with llama3 RoPE scaling, attention
//! and MLP biases and an explicit head_dim, a bf16 sharded Llama with linear RoPE scaling, and
//! a Qwen2 whose layers differ (full attention, then a sliding window), in inference and in
//! the training step's forward pass.

use std::path::PathBuf;

use burn::tensor::{DType, Device};
use fedtune_engine::weights::{SafetensorsSource, TensorSource, to_f32_vec};
use fedtune_engine::{LlamaModel, ModelConfig};

/// The variant's model (f32), its reference input ids `[b, t]` and transformers' logits.
fn variant(name: &str) -> (LlamaModel, Vec<u32>, [usize; 2], Vec<f32>) {
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
    let logits = to_f32_vec(reference.load("logits").unwrap().unwrap());
    (model, ids, [b, t], logits)
}

fn check(name: &str) {
    let (model, ids, [b, t], want) = variant(name);
    let got = to_f32_vec(model.forward(&ids, b, t).into_data());
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

#[test]
fn qwen2_with_mixed_layer_types_matches_transformers() {
    check("qwen2_mixed_layer_types");
}

#[test]
fn the_training_step_masks_each_layer_as_transformers_does() {
    // Layer 0 attends to everything before it, layer 1 within a window of 8: the training
    // forward pass must give transformers' log-probabilities of every next token (before the
    // fix it applied layer 1's window to both layers).
    use fedtune_engine::model::Positions;
    use fedtune_engine::train::step::{StepBatch, StepOptions, Target, Trainable, forward};
    let (model, ids, [b, t], logits) = variant("qwen2_mixed_layer_types");
    assert_eq!(model.config.sliding_window, vec![None, Some(8)]);
    let vocab = model.config.vocab_size;
    let mut targets = Vec::new();
    let mut want = Vec::new();
    for row in 0..b {
        for pos in 0..t - 1 {
            let i = row * t + pos;
            let id = ids[i + 1];
            targets.push(Target {
                pos: i,
                id,
                seq: row,
            });
            let l = &logits[i * vocab..(i + 1) * vocab];
            let max = l.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
            let lse = max + l.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
            want.push(l[id as usize] - lse);
        }
    }
    let batch = StepBatch {
        ids,
        batch: b,
        len: t,
        positions: Positions::Range {
            start: 0,
            len: t,
            batch: b,
        },
        segments: None,
        targets,
        real_tokens: b * t,
    };
    let got = forward(&model, &batch, &Trainable::full(), &StepOptions::default()).target_logps;
    let max = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    println!("training log p vs transformers: max abs diff {max:e}");
    assert!(max < 1e-4, "{max}");
}

/// transformers' own deviation of bf16 and f16 logits from f32 on the tiny model and these
/// ids, measured on an H200 (`bench/gpu_forward.py bf16`, 2026-12-04): max abs 0.238 (bf16),
/// 0.032 (f16).
#[test]
fn bf16_and_f16_on_the_cpu_run_and_stay_near_f32() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/tiny-llama/model");
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let src = SafetensorsSource::open_dir(&dir).unwrap();
    let ids: Vec<u32> = (0..64u32).map(|i| (i * 7919) % 49_152).collect();
    let logits = |dt| {
        let m = LlamaModel::load(&src, cfg.clone(), &Device::flex(), dt).unwrap();
        to_f32_vec(m.forward(&ids, 2, 32).into_data())
    };
    let want = logits(DType::F32);
    for (dt, transformers_max) in [(DType::BF16, 0.238f32), (DType::F16, 0.032)] {
        let got = logits(dt);
        let max = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let mean = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .sum::<f32>()
            / got.len() as f32;
        println!(
            "{dt:?} on the CPU vs f32: max abs {max:.4}, mean {mean:.5} (transformers max {transformers_max})"
        );
        assert!(
            got.iter().all(|v| v.is_finite()),
            "{dt:?}: non-finite logits"
        );
        assert!(max <= 2.0 * transformers_max, "{dt:?}: max {max}");
    }
}

/// `ModelConfig::num_parameters` (the start banner's model size) is the number of values in
/// the checkpoint, for every architecture variant: biases, untied heads, explicit head dims,
/// sharded files.
#[test]
fn the_parameter_count_from_the_config_is_the_checkpoints() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata");
    let mut dirs = vec![root.join("tiny-llama/model")];
    for e in std::fs::read_dir(root.join("variants")).unwrap().flatten() {
        if e.path().is_dir() {
            dirs.push(e.path());
        }
    }
    assert!(dirs.len() >= 6);
    for dir in dirs {
        let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let mut values = 0usize;
        for f in std::fs::read_dir(&dir).unwrap().flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if !name.ends_with(".safetensors") || name == "reference.safetensors" {
                continue;
            }
            let bytes = std::fs::read(f.path()).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            values += st
                .tensors()
                .iter()
                .map(|(_, v)| v.shape().iter().product::<usize>())
                .sum::<usize>();
        }
        assert_eq!(cfg.num_parameters(), values, "{}", dir.display());
    }
}

/// `ModelConfig::projections` names and sizes every projection as the loaded model holds them,
/// so a fresh adapter made from the configuration alone (a model loaded straight onto a GPU)
/// is the one made from the loaded model, factor for factor.
#[test]
fn an_adapter_from_the_config_is_the_one_from_the_model() {
    use fedtune_engine::train::TrainConfig;
    use fedtune_engine::train::lora::{init_adapter, init_adapter_for};
    for name in [
        "qwen2_bias_untied",
        "llama3_rope_bias_headdim",
        "qwen2_mixed_layer_types",
    ] {
        let (model, ..) = variant(name);
        let shapes: Vec<(String, usize, usize)> = model
            .linears()
            .into_iter()
            .map(|(n, l)| (n, l.out_features(), l.in_features()))
            .collect();
        assert_eq!(model.config.projections(), shapes, "{name}");
        let cfg = TrainConfig {
            lora_r: 4,
            ..TrainConfig::default()
        };
        let (a, b) = (
            init_adapter(&model, &cfg),
            init_adapter_for(&model.config, &cfg),
        );
        assert_eq!(a.modules.len(), 7 * model.layers.len(), "{name}");
        for (m, f) in &a.modules {
            assert_eq!(f.a.data, b.modules[m].a.data, "{name} {m}");
            assert_eq!(f.b.data, b.modules[m].b.data, "{name} {m}");
        }
    }
}
