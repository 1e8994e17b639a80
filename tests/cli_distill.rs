//! `fedtune train distill` end to end on the tiny model: a fresh student adapter distilled from
//! a teacher (the tiny model with the reference adapter) gets closer to it on held-out
//! conversations, loads back as a PEFT adapter, takes TOML options with flags winning; a
//! teacher with another tokenizer and data without prompts are clear errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use burn::tensor::{DType, Device};
use fedtune_engine::data::{Dataset, LoadOptions};
use fedtune_engine::train::distill::{DistillObjective, DistillOptions};
use fedtune_engine::{PeftAdapter, load_model};
use serde_json::Value;

#[path = "support/train.rs"]
mod train;

use train::{root, tmpdir};

fn tiny() -> PathBuf {
    train::model()
}

/// `fedtune train distill` from `teacher` (with the reference adapter as its own) on `data`.
fn distill(teacher: &Path, data: &Path, out: &Path, extra: &[&str]) -> Output {
    let adapter = root().join("testdata/tiny-llama/adapter");
    let mut args = vec![
        "--teacher",
        teacher.to_str().unwrap(),
        "--teacher-adapter",
        adapter.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    train::train("distill", data, out, &args, &[])
}

/// The held-out divergence of the base model (a fresh adapter) from the teacher.
fn divergence_at_start(held_out: &Path) -> f64 {
    let student = load_model(&tiny(), &Device::flex(), DType::F32).unwrap();
    let mut teacher = load_model(&tiny(), &Device::flex(), DType::F32)
        .unwrap()
        .model;
    let a = PeftAdapter::load(&root().join("testdata/tiny-llama/adapter")).unwrap();
    teacher.attach_adapter(&a).unwrap();
    let d = Dataset::load(held_out, LoadOptions::default()).unwrap();
    let (eval, _) = d.encode_completions(&student.tokenizer, 1024).unwrap();
    let o = DistillObjective::new(
        &teacher,
        student.model.config.vocab_size,
        DistillOptions::default(),
        eval.clone(),
        eval,
        4,
        student.tokenizer.pad_id,
        vec![],
        0,
    )
    .unwrap();
    o.loss_on(&student.model, true)
}

#[test]
fn distillation_brings_a_fresh_student_closer_to_its_teacher() {
    let dir = tmpdir("flow");
    let cfg = dir.join("distill.toml");
    // TOML for the distillation options; the flag wins over the file's beta.
    std::fs::write(
        &cfg,
        "beta = 0.9\nmax_new_tokens = 6\nlearning_rate = 1e-2\nlora_r = 8\n",
    )
    .unwrap();
    let held_out = root().join("testdata/gkd/chat.jsonl");
    let out = dir.join("a");
    let o = distill(
        &tiny(),
        &root().join("testdata/demo/hospital.jsonl"),
        &out,
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--beta",
            "0.5",
            "--eval-data",
            held_out.to_str().unwrap(),
            "--max-steps",
            "12",
            "--per-device-train-batch-size",
            "4",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("40 examples"), "{err}");
    assert!(out.join("adapter_model.safetensors").is_file());
    assert!(out.join("tokenizer.json").is_file());
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("training_summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["distill"]["beta"], 0.5);
    assert_eq!(summary["distill"]["max_new_tokens"], 6);
    assert_eq!(summary["distill"]["lmbda"], 0.5);
    assert_eq!(summary["config"]["lora_r"], 8);
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    let entries: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let generated: f64 = entries
        .iter()
        .filter_map(|e| e.get("generated_fraction").and_then(Value::as_f64))
        .sum();
    assert!(
        generated > 0.0 && generated < 12.0,
        "lmbda 0.5 samples some micro-batches on-policy, not all: {log}"
    );
    let start = divergence_at_start(&held_out);
    let end = summary["summary"]["eval_loss"].as_f64().unwrap();
    println!("held-out divergence {start:.4} -> {end:.4}");
    assert!(end < start - 0.05, "{start} -> {end}");
    // The adapter loads onto the model.
    let e = Command::new(env!("CARGO_BIN_EXE_fedtune"))
        .args([
            "eval",
            "--model",
            tiny().to_str().unwrap(),
            "--adapter",
            out.to_str().unwrap(),
            "--data",
            held_out.to_str().unwrap(),
            "--json",
        ])
        .output()
        .unwrap();
    assert!(e.status.success(), "{}", String::from_utf8_lossy(&e.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn another_tokenizer_and_data_without_prompts_are_clear_errors() {
    let dir = tmpdir("errors");
    // A teacher whose tokenizer swaps the ids of two tokens.
    let other = dir.join("teacher");
    std::fs::create_dir_all(&other).unwrap();
    for f in std::fs::read_dir(tiny()).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, other.join(f.file_name().unwrap())).unwrap();
    }
    let mut tok: Value =
        serde_json::from_str(&std::fs::read_to_string(other.join("tokenizer.json")).unwrap())
            .unwrap();
    let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
    let name_of = |id: u64| {
        vocab
            .iter()
            .find(|(_, v)| v.as_u64() == Some(id))
            .map(|(k, _)| k.clone())
            .unwrap()
    };
    let (a, b) = (name_of(1000), name_of(1001));
    vocab.insert(a, 1001.into());
    vocab.insert(b, 1000.into());
    std::fs::write(other.join("tokenizer.json"), tok.to_string()).unwrap();
    let data = root().join("testdata/gkd/chat.jsonl");
    let o = distill(&other, &data, &dir.join("a"), &["--max-steps", "1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--teacher") && err.contains("tokenizer"),
        "{err}"
    );
    // Plain text: no prompt to distil on, named with its line.
    let text = dir.join("text.jsonl");
    std::fs::write(&text, "{\"text\": \"just some text\"}\n").unwrap();
    let o = distill(&tiny(), &text, &dir.join("b"), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("text.jsonl:1") && err.contains("prompt"),
        "{err}"
    );
    let o = distill(&tiny(), &data, &dir.join("c"), &["--lmbda", "2"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("lmbda"), "{err}");
    let o = distill(&tiny(), &data, &dir.join("d"), &["--full"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--full"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
