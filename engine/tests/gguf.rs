//! GGUF loading against gguf-py's reference dequantiser and transformers' own GGUF loader
//! (fixtures from `scripts/make_gguf_fixtures.py`).

use std::path::PathBuf;

use burn::tensor::{DType, Device};
use fedtune_engine::gguf::GgufFile;
use fedtune_engine::gguf::quant::{GgmlType, dequantize};
use fedtune_engine::weights::{SafetensorsSource, TensorSource, to_f32_vec};
use fedtune_engine::{ModelConfig, Tokenizer, load_model};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata")
}

#[test]
fn every_supported_type_dequantises_bit_identically_to_ggml() {
    let src = SafetensorsSource::open_file(&dir().join("gguf/quant_blocks.safetensors")).unwrap();
    for (name, ty) in [
        ("Q8_0", GgmlType::Q8_0),
        ("Q4_0", GgmlType::Q4_0),
        ("Q4_1", GgmlType::Q4_1),
        ("Q4_K", GgmlType::Q4K),
        ("Q6_K", GgmlType::Q6K),
        ("F16", GgmlType::F16),
        ("BF16", GgmlType::Bf16),
    ] {
        let bytes: Vec<u8> = src
            .load(&format!("{name}.bytes"))
            .unwrap()
            .unwrap()
            .try_to_vec::<u8>()
            .unwrap();
        let want = to_f32_vec(src.load(&format!("{name}.values")).unwrap().unwrap());
        let mut got = vec![0f32; want.len()];
        dequantize(ty, &bytes, &mut got);
        let same = got
            .iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{name} differs from ggml");
    }
}

#[test]
fn config_and_tokenizer_come_from_gguf_metadata() {
    let file = GgufFile::open(&dir().join("gguf/tiny.gguf")).unwrap();
    let got = file.model_config().unwrap();
    let want = ModelConfig::from_file(&dir().join("tiny-llama/model/config.json")).unwrap();
    assert_eq!(got.hidden_size, want.hidden_size);
    assert_eq!(got.num_key_value_heads, want.num_key_value_heads);
    assert_eq!(got.head_dim, want.head_dim);
    assert_eq!(got.rope_theta, want.rope_theta);
    assert!(got.tie_word_embeddings);
    let tok = file.tokenizer().unwrap();
    let reference = Tokenizer::from_dir(&dir().join("tiny-llama/model")).unwrap();
    let text = "<|im_start|>user\nA 54-year-old man, 120/80 mmHg; café ☕ 12345<|im_end|>\n";
    assert_eq!(tok.encode(text).unwrap(), reference.encode(text).unwrap());
    assert_eq!(tok.eos_token.as_deref(), Some("<|im_end|>"));
    assert!(tok.has_template());
}

#[test]
fn tiny_gguf_logits_match_transformers_gguf_loader_within_1e4() {
    let m = load_model(&dir().join("gguf/tiny.gguf"), &Device::flex(), DType::F32).unwrap();
    let reference =
        SafetensorsSource::open_file(&dir().join("gguf/tiny_gguf_reference.safetensors")).unwrap();
    let ids: Vec<u32> = reference
        .load("input_ids")
        .unwrap()
        .unwrap()
        .convert::<i64>()
        .try_to_vec::<i64>()
        .unwrap()
        .iter()
        .map(|&v| v as u32)
        .collect();
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir().join("gguf/tiny_gguf_reference.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        m.tokenizer.encode(meta["text"].as_str().unwrap()).unwrap(),
        ids
    );
    let t = ids.len();
    let logits = m.model.forward(&ids, 1, t);
    let got = to_f32_vec(logits.slice([0..1, 0..t, 0..256]).into_data());
    let want = to_f32_vec(reference.load("logits_first256").unwrap().unwrap());
    let max = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    println!("max abs diff vs transformers' GGUF loader: {max:e}");
    assert!(max < 1e-4, "{max}");
}

#[test]
fn truncated_or_foreign_files_are_errors_naming_the_file() {
    let bytes = std::fs::read(dir().join("gguf/tiny.gguf")).unwrap();
    let tmp = std::env::temp_dir().join(format!("fedtune-trunc-{}.gguf", std::process::id()));
    for cut in [3usize, 20, 1000, 200_000, bytes.len() - 10] {
        std::fs::write(&tmp, &bytes[..cut]).unwrap();
        let err = match GgufFile::open(&tmp) {
            Err(e) => e,
            Ok(f) => {
                // The header may be complete while tensor data is cut: loading must fail.
                let names: Vec<String> = f.tensors.keys().cloned().collect();
                match names.iter().try_for_each(|n| f.dequantize(n).map(|_| ())) {
                    Err(e) => e,
                    Ok(()) => panic!("cut at {cut} was accepted"),
                }
            }
        };
        assert!(err.to_string().contains("fedtune-trunc"), "{err}");
    }
    std::fs::write(&tmp, b"NOTGGUF at all").unwrap();
    assert!(
        GgufFile::open(&tmp)
            .unwrap_err()
            .to_string()
            .contains("magic")
    );
    std::fs::remove_file(&tmp).unwrap();
}
