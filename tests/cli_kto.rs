//! `fedtune train kto` end to end on the tiny model: unpaired feedback (and preference pairs,
//! unpaired) trains an adapter that PEFT-style loading reads back, TRL's metric names in the
//! log, TOML options with flags winning, and clear errors.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

#[path = "support/train.rs"]
mod train;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fedtune-cli-kto-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fedtune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fedtune"))
        .args(args)
        .output()
        .unwrap()
}

fn kto(data: &str, out: &std::path::Path, extra: &[&str]) -> Output {
    train::train("kto", &root().join(data), out, extra, &[])
}

#[test]
fn kto_trains_on_feedback_and_logs_trl_metrics() {
    let dir = tmpdir("flow");
    let cfg = dir.join("kto.toml");
    // TOML for the KTO options; the flag wins over the file's beta.
    std::fs::write(
        &cfg,
        "beta = 0.5\nundesirable_weight = 1.5\nlearning_rate = 2e-2\nlora_r = 8\n",
    )
    .unwrap();
    let out = dir.join("a");
    let o = kto(
        "testdata/kto/chat.jsonl",
        &out,
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--beta",
            "0.2",
            "--max-steps",
            "8",
            "--per-device-train-batch-size",
            "3",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("6 examples: 3 desirable, 3 undesirable"),
        "{err}"
    );
    assert!(out.join("adapter_model.safetensors").is_file());
    assert!(out.join("tokenizer.json").is_file());
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("training_summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["kto"]["beta"], 0.2);
    assert_eq!(summary["kto"]["undesirable_weight"], 1.5);
    assert_eq!(summary["config"]["lora_r"], 8);
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    let entries: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(entries.len(), 8);
    for k in [
        "kl",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "logps/chosen",
    ] {
        assert!(entries[0].get(k).is_some(), "{k} missing: {}", entries[0]);
    }
    // A fresh adapter starts at the reference: the loss is the batch's mean weight × (1 − σ(0)),
    // between 0.5 and 0.75 with weights 1 and 1.5 (0.625 over the whole set); training lowers it.
    let first = entries[0]["loss"].as_f64().unwrap();
    assert!((0.5 - 1e-5..0.75 + 1e-5).contains(&first), "{}", entries[0]);
    let last = summary["final_train_loss"].as_f64().unwrap();
    assert!(last < 0.6, "whole-set loss 0.625 -> {last}");
    // The adapter evaluates: it loads as a PEFT adapter onto the model.
    let model = root().join("testdata/tiny-llama/model");
    let e = fedtune(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        out.to_str().unwrap(),
        "--data",
        root()
            .join("testdata/tiny-llama/dpo_pair.jsonl")
            .to_str()
            .unwrap(),
        "--json",
    ]);
    assert!(e.status.success(), "{}", String::from_utf8_lossy(&e.stderr));
    // Preference pairs are unpaired into desirable and undesirable examples.
    let o = kto(
        "testdata/formats/prefs.jsonl",
        &dir.join("b"),
        &["--max-steps", "1", "--per-device-train-batch-size", "2"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_options_and_data_are_clear_errors() {
    let dir = tmpdir("errors");
    let o = kto(
        "testdata/kto/chat.jsonl",
        &dir.join("a"),
        &["--per-device-train-batch-size", "1"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("per_device_train_batch_size"),
        "{err}"
    );
    let o = kto("testdata/kto/chat.jsonl", &dir.join("b"), &["--full"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--full"), "{err}");
    let o = kto("testdata/demo/hospital.jsonl", &dir.join("c"), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("hospital.jsonl:1") && err.contains("label"),
        "{err}"
    );
    let o = kto(
        "testdata/kto/chat.jsonl",
        &dir.join("d"),
        &["--loss-type", "bco"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("apo_zero_unpaired"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
