//! DoRA (PEFT's `use_dora`) against PEFT 0.21's own DoRA layers on the tiny Llama
//! (`testdata/dora/make_reference.py`): the adapter PEFT saved loads as is; logits, per-token
//! log-probabilities, every lora_A / lora_B / lora_magnitude_vector gradient of the mean
//! next-token loss, and the weights `merge_and_unload()` writes, within 1e-5. With dropout
//! (whose masks PEFT draws from torch's generator) the gradients are checked by finite
//! differences instead, with the norm held constant as PEFT's gradient holds it.

use std::path::PathBuf;

use burn::tensor::{DType, Device, Tensor, TensorData};
use fedtune_engine::model::Positions;
use fedtune_engine::train::step::{StepBatch, StepOptions, Target, Trainable, backward, forward};
use fedtune_engine::weights::{SafetensorsSource, TensorSource, to_f32_vec};
use fedtune_engine::{LlamaModel, ModelConfig, PeftAdapter};

fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata")
}

fn base() -> LlamaModel {
    let d = testdata().join("tiny-llama/model");
    let cfg = ModelConfig::from_file(&d.join("config.json")).unwrap();
    let src = SafetensorsSource::open_dir(&d).unwrap();
    LlamaModel::load(&src, cfg, &Device::flex(), DType::F32).unwrap()
}

fn peft_adapter() -> PeftAdapter {
    PeftAdapter::load(&testdata().join("dora/start_adapter")).unwrap()
}

fn with_dora() -> LlamaModel {
    let mut m = base();
    m.attach_adapter(&peft_adapter()).unwrap();
    m
}

fn reference() -> SafetensorsSource {
    SafetensorsSource::open_file(&testdata().join("dora/reference.safetensors")).unwrap()
}

fn floats(r: &SafetensorsSource, name: &str) -> Vec<f32> {
    to_f32_vec(
        r.load(name)
            .unwrap()
            .unwrap_or_else(|| panic!("{name} missing")),
    )
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The reference batch: 2 rows of 12 ids, every position but the last a target.
fn reference_batch() -> StepBatch {
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(testdata().join("dora/reference.json")).unwrap(),
    )
    .unwrap();
    let rows: Vec<Vec<u32>> = serde_json::from_value(json["input_ids"].clone()).unwrap();
    let (b, t) = (rows.len(), rows[0].len());
    let ids: Vec<u32> = rows.concat();
    let mut targets = Vec::new();
    for row in 0..b {
        for pos in 0..t - 1 {
            targets.push(Target {
                pos: row * t + pos,
                id: ids[row * t + pos + 1],
                seq: row,
            });
        }
    }
    StepBatch {
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
    }
}

#[test]
fn peft_dora_adapter_loads_with_its_magnitudes() {
    let a = peft_adapter();
    assert!(a.config.use_dora);
    let mags: Vec<_> = a
        .weights
        .dense
        .keys()
        .filter(|k| k.ends_with(".lora_magnitude_vector"))
        .collect();
    assert_eq!(mags.len(), a.weights.modules.len());
    assert_eq!(mags.len(), 14);
    let m = with_dora();
    for (name, lin) in m.linears() {
        let l = lin.lora.as_ref().unwrap();
        assert_eq!(
            l.magnitude.as_ref().map(|t| t.dims()),
            Some([1, lin.out_features()]),
            "{name}"
        );
    }
    // What fedtune reads back is what it writes.
    assert_eq!(m.lora_weights(), a.weights);
}

#[test]
fn dora_logits_and_logprobs_match_peft_within_1e5() {
    let m = with_dora();
    let r = reference();
    let batch = reference_batch();
    let logits = m.forward(&batch.ids, batch.batch, batch.len);
    let ours = to_f32_vec(logits.slice([0..2, 0..12, 0..256]).into_data());
    let d = max_abs_diff(&ours, &floats(&r, "logits"));
    println!("logits: max |Δ| {d:e}");
    assert!(d < 1e-5, "{d}");
    let fwd = forward(&m, &batch, &Trainable::lora(), &StepOptions::default());
    let d = max_abs_diff(&fwd.target_logps, &floats(&r, "logps"));
    println!("training forward log p: max |Δ| {d:e}");
    assert!(d < 1e-5, "{d}");
}

#[test]
fn dora_gradients_match_peft_within_1e5() {
    let m = with_dora();
    let r = reference();
    let batch = reference_batch();
    let trainable = Trainable::lora();
    let fwd = forward(&m, &batch, &trainable, &StepOptions::default());
    // transformers' loss is the mean over targets of −log p.
    let n = batch.targets.len();
    let g = vec![-1.0 / n as f32; n];
    let grads = backward(&m, fwd, &g, &trainable);
    assert_eq!(
        grads.len(),
        3 * 14,
        "A, B and magnitude of every projection"
    );
    let mut worst = 0f32;
    for (name, t) in &grads {
        let want = floats(&r, &format!("grad.{name}"));
        let got = to_f32_vec(t.to_data());
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = max_abs_diff(&got, &want);
        assert!(scale > 0.0, "{name}: PEFT's gradient is zero");
        println!("{name}: max |Δ| {d:e} (largest {scale:e})");
        worst = worst.max(d);
    }
    assert!(worst < 1e-5, "{worst}");
}

#[test]
fn dora_merge_matches_peft_merge_and_unload_within_1e5() {
    let mut m = with_dora();
    m.merge_adapter().unwrap();
    let r = reference();
    let mut worst = 0f32;
    for (name, lin) in m.linears() {
        assert!(lin.lora.is_none());
        let want = floats(&r, &format!("merged.{name}.weight"));
        worst = worst.max(max_abs_diff(&to_f32_vec(lin.weight().into_data()), &want));
    }
    println!("merged weights: max |Δ| {worst:e}");
    assert!(worst < 1e-5, "{worst}");
}

#[test]
fn dora_adapter_saves_as_peft_writes_it() {
    let a = peft_adapter();
    let dir = std::env::temp_dir().join(format!("fedtune-dora-save-{}", std::process::id()));
    a.save(&dir).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["use_dora"], true);
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let key = "base_model.model.model.layers.1.mlp.gate_proj.lora_magnitude_vector";
    assert_eq!(
        st.tensor(key).unwrap().shape(),
        &[160],
        "1-D, as PEFT stores it"
    );
    assert_eq!(PeftAdapter::load(&dir).unwrap().weights, a.weights);
    // A magnitude without use_dora, or use_dora without magnitudes, is an error naming it.
    let text = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        text.replace("\"use_dora\": true", "\"use_dora\": false"),
    )
    .unwrap();
    let err = PeftAdapter::load(&dir).unwrap_err().to_string();
    assert!(
        err.contains("lora_magnitude_vector") && err.contains("use_dora"),
        "{err}"
    );
    let mut plain = a.clone();
    plain.weights.dense.clear();
    plain.save(&dir).unwrap();
    let err = PeftAdapter::load(&dir).unwrap_err().to_string();
    assert!(err.contains("missing"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn dora_gradients_with_dropout_agree_with_finite_differences() {
    let mut m = with_dora();
    for (_, lin) in m.linears_mut() {
        lin.lora.as_mut().unwrap().dropout = 0.2;
    }
    let batch = reference_batch();
    let trainable = Trainable::lora();
    let opts = StepOptions {
        dropout_seed: Some(9),
        ..StepOptions::default()
    };
    let n = batch.targets.len();
    let g: Vec<f32> = (0..n)
        .map(|i| ((i * 7 % 5) as f32 - 2.0) / n as f32)
        .collect();
    let grads = backward(&m, forward(&m, &batch, &trainable, &opts), &g, &trainable);
    let objective = |m: &LlamaModel| -> f64 {
        forward(m, &batch, &trainable, &opts)
            .target_logps
            .iter()
            .zip(&g)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum()
    };
    for (module, part, idx) in [
        (
            "model.layers.0.self_attn.q_proj",
            "lora_magnitude_vector",
            3usize,
        ),
        ("model.layers.0.mlp.up_proj", "lora_magnitude_vector", 40),
        ("model.layers.1.self_attn.v_proj", "lora_A", 17),
        ("model.layers.1.mlp.down_proj", "lora_B", 9),
    ] {
        let name = format!("{module}.{part}");
        let analytic = to_f32_vec(grads[&name].to_data())[idx] as f64;
        let eps = 1e-2f32;
        let shifted = |delta: f32| {
            let mut m2 = m.clone();
            let t = m2.param(&name).unwrap();
            let mut v = to_f32_vec(t.to_data());
            v[idx] += delta;
            assert!(m2.set_param(
                &name,
                Tensor::from_data(TensorData::new(v, t.dims()), &t.device())
            ));
            if part != "lora_magnitude_vector" {
                // PEFT's gradient treats the norm ‖W + s·B·A‖ as a constant: hold m/‖·‖
                // where it was by rescaling the magnitude with the moved norm.
                let c = |m: &LlamaModel| {
                    let lin = m.linear(module).unwrap();
                    let (c, _) = lin
                        .lora
                        .as_ref()
                        .unwrap()
                        .dora_factor(&lin.weight())
                        .unwrap();
                    c
                };
                let mag = m2
                    .param(&format!("{module}.lora_magnitude_vector"))
                    .unwrap();
                let kept = mag * c(&m) / c(&m2);
                assert!(m2.set_param(&format!("{module}.lora_magnitude_vector"), kept));
            }
            objective(&m2)
        };
        let numeric = (shifted(eps) - shifted(-eps)) / (2.0 * eps as f64);
        println!("{name}[{idx}]: analytic {analytic:.6} numeric {numeric:.6}");
        assert!(
            (analytic - numeric).abs() <= 2e-2 * analytic.abs().max(1e-3),
            "{name}[{idx}]: {analytic} vs {numeric}"
        );
    }
    // Dropout changes the DoRA output (the masked base term is there).
    let plain = forward(&m, &batch, &trainable, &StepOptions::default()).target_logps;
    let dropped = forward(&m, &batch, &trainable, &opts).target_logps;
    assert!(max_abs_diff(&plain, &dropped) > 1e-3);
}
