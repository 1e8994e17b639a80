//! `fedtune train dpo` end to end on the tiny model: base → SFT → DPO with the SFT adapter
//! merged, TRL metric names in the log, every loss type and a QLoRA base, ShareGPT-style pairs,
//! and clear errors.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn model() -> String {
    root()
        .join("testdata/tiny-llama/model")
        .display()
        .to_string()
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fedtune-cli-dpo-{name}-{}", std::process::id()));
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

fn ok(args: &[&str]) -> Output {
    let out = fedtune(args);
    assert!(
        out.status.success(),
        "fedtune {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn read_json(p: PathBuf) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn sft_then_dpo_on_the_merged_sft_model_logs_trl_metrics() {
    let dir = tmpdir("flow");
    let sft = dir.join("sft");
    let dpo = dir.join("dpo");
    let m = model();
    ok(&[
        "train",
        "sft",
        "--model",
        &m,
        "--data",
        root()
            .join("testdata/demo/hospital.jsonl")
            .to_str()
            .unwrap(),
        "--output",
        sft.to_str().unwrap(),
        "--max-steps",
        "4",
        "--learning-rate",
        "5e-3",
        "--per-device-train-batch-size",
        "4",
    ]);
    ok(&[
        "train",
        "dpo",
        "--model",
        &m,
        "--sft-adapter",
        sft.to_str().unwrap(),
        "--data",
        root().join("testdata/demo/prefs.jsonl").to_str().unwrap(),
        "--output",
        dpo.to_str().unwrap(),
        "--max-steps",
        "8",
        "--learning-rate",
        "1e-2",
        "--per-device-train-batch-size",
        "6",
        "--eval-split",
        "0.25",
        "--eval-steps",
        "4",
        "--beta",
        "0.1",
        "--max-prompt-length",
        "16",
    ]);
    let cfg = read_json(dpo.join("adapter_config.json"));
    assert_eq!(cfg["peft_type"], "LORA");
    assert!(
        cfg.as_object()
            .unwrap()
            .keys()
            .all(|k| !k.starts_with("fedtune")),
        "{cfg}"
    );
    let meta = read_json(dpo.join("fedtune_adapter.json"));
    assert!(
        meta["merged_sft_adapter"]
            .as_str()
            .unwrap()
            .ends_with("sft")
    );
    let summary = read_json(dpo.join("training_summary.json"));
    assert_eq!(summary["dpo"]["loss_type"], "sigmoid");
    assert_eq!(
        summary["train_pairs"].as_u64().unwrap() + summary["eval_pairs"].as_u64().unwrap(),
        24
    );
    assert!(
        summary["truncated_prompts"].as_u64().unwrap() > 0,
        "{summary}"
    );
    let log: Vec<Value> = std::fs::read_to_string(dpo.join("train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let first = &log[0];
    for k in [
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    ] {
        assert!(first.get(k).is_some(), "{k} missing from {first}");
    }
    // Policy and reference both start at the SFT model: the first loss is log 2.
    assert!(
        (first["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-4,
        "{first}"
    );
    assert!(
        log.iter().any(|e| e.get("eval_rewards/margins").is_some()),
        "{log:?}"
    );
    // The chain applies itself: on the raw base, `eval` merges the recorded SFT adapter
    // first, and gives what the DPO adapter gives on an exported SFT-merged model.
    let held_out = root().join("testdata/demo/bank.jsonl");
    let eval = |model: &str| -> (f64, String) {
        let o = ok(&[
            "eval",
            "--model",
            model,
            "--adapter",
            dpo.to_str().unwrap(),
            "--data",
            held_out.to_str().unwrap(),
            "--json",
        ]);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        (
            v["loss"].as_f64().unwrap(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (chained, err) = eval(&m);
    assert!(err.contains("merged it first"), "{err}");
    let merged = dir.join("sft-merged");
    ok(&[
        "export",
        "--model",
        &m,
        "--adapter",
        sft.to_str().unwrap(),
        "--output",
        merged.to_str().unwrap(),
    ]);
    let (on_merged, err) = eval(merged.to_str().unwrap());
    assert!(!err.contains("merged it first"), "{err}");
    assert!(
        (chained - on_merged).abs() < 1e-4,
        "{chained} vs {on_merged}"
    );
    // Moved away from its SFT adapter, the DPO adapter is applied alone, with a warning.
    std::fs::rename(&sft, dir.join("elsewhere")).unwrap();
    let (_, err) = eval(&m);
    assert!(
        err.contains("warning") && err.contains("not found"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_loss_type_trains_including_on_a_qlora_base_and_sharegpt_pairs() {
    let dir = tmpdir("losses");
    let m = model();
    for (i, loss) in ["sigmoid", "ipo", "hinge", "simpo", "orpo"]
        .iter()
        .enumerate()
    {
        let out = dir.join(loss);
        let mut args = vec![
            "train",
            "dpo",
            "--model",
            &m,
            "--data",
            "testdata/formats/sharegpt_prefs.json",
            "--output",
            out.to_str().unwrap(),
            "--max-steps",
            "2",
            "--learning-rate",
            "1e-3",
            "--loss-type",
            loss,
        ];
        if i % 2 == 1 {
            args.extend(["--load-in-4bit", "--bnb-4bit-use-double-quant"]);
        }
        let args: Vec<&str> = args.into_iter().collect();
        let o = Command::new(env!("CARGO_BIN_EXE_fedtune"))
            .current_dir(root())
            .args(&args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{loss}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let s = read_json(out.join("training_summary.json"));
        assert_eq!(s["dpo"]["loss_type"], *loss);
        assert!(s["final_train_loss"].as_f64().unwrap().is_finite());
        if *loss == "orpo" {
            assert!(
                s["final_train_metrics"]["nll_loss"].as_f64().is_some(),
                "{s}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_options_and_non_preference_data_are_clear_errors() {
    let dir = tmpdir("bad");
    let m = model();
    let o = fedtune(&[
        "train",
        "dpo",
        "--model",
        &m,
        "--data",
        root().join("testdata/demo/prefs.jsonl").to_str().unwrap(),
        "--output",
        dir.join("a").to_str().unwrap(),
        "--loss-type",
        "kto",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("kto"));
    let o = fedtune(&[
        "train",
        "dpo",
        "--model",
        &m,
        "--data",
        root().join("testdata/demo/bank.jsonl").to_str().unwrap(),
        "--output",
        dir.join("b").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("bank.jsonl:1") && err.contains("preference"),
        "{err}"
    );
    let o = fedtune(&[
        "train",
        "dpo",
        "--model",
        &m,
        "--data",
        root().join("testdata/demo/prefs.jsonl").to_str().unwrap(),
        "--output",
        dir.join("c").to_str().unwrap(),
        "--full",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--full"));
    let _ = std::fs::remove_dir_all(&dir);
}
