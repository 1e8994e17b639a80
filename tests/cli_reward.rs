//! `fedtune train reward` and `fedtune eval --reward-model` end to end on the tiny model:
//! preference pairs train a reward model (a PEFT sequence-classifier adapter with its score
//! head) that ranks the pairs, TRL's metric names in the log, TOML options with flags winning,
//! evaluation that reproduces the final training metrics, and clear errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fedtune-cli-reward-{name}-{}", std::process::id()));
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

fn model() -> PathBuf {
    root().join("testdata/tiny-llama/model")
}

fn reward(data: &Path, out: &Path, extra: &[&str]) -> Output {
    let m = model();
    let mut args = vec![
        "train",
        "reward",
        "--model",
        m.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    fedtune(&args)
}

fn eval_json(adapter: &Path, data: &Path) -> Value {
    let m = model();
    let o = fedtune(&[
        "eval",
        "--model",
        m.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--reward-model",
        "--data",
        data.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap()
}

#[test]
fn a_reward_model_learns_to_rank_the_pairs_and_eval_scores_them() {
    let dir = tmpdir("flow");
    let data = root().join("testdata/reward/text.jsonl");
    let cfg = dir.join("reward.toml");
    // TOML for the options; the flag wins over the file's coefficient.
    std::fs::write(
        &cfg,
        "center_rewards_coefficient = 0.5\nlearning_rate = 1e-2\nlora_r = 8\nlora_alpha = 16\n",
    )
    .unwrap();
    let out = dir.join("rm");
    let o = reward(
        &data,
        &out,
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--center-rewards-coefficient",
            "0.01",
            "--max-steps",
            "15",
            "--per-device-train-batch-size",
            "3",
            "--logging-steps",
            "1",
            "--save-steps",
            "15",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("6 preference pairs to train on"), "{err}");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["task_type"], "SEQ_CLS");
    assert_eq!(
        config["modules_to_save"],
        serde_json::json!(["classifier", "score"])
    );
    assert!(out.join("tokenizer.json").is_file());
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("training_summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["reward"]["center_rewards_coefficient"], 0.01);
    let final_loss = summary["final_train_loss"].as_f64().unwrap();
    assert_eq!(summary["final_train_metrics"]["accuracy"], 1.0, "{summary}");
    // TRL's metric names in the log.
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    let first: Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    for k in [
        "accuracy",
        "margin",
        "mean_reward",
        "min_reward",
        "max_reward",
    ] {
        assert!(first.get(k).is_some(), "{k} missing from {first}");
    }
    // The untrained head starts near chance: the loss falls well below log 2.
    assert!(final_loss < 0.3, "{final_loss}");
    // eval --reward-model scores the same pairs the same way.
    let e = eval_json(&out, &data);
    assert_eq!(e["pairs"], 6);
    assert_eq!(e["accuracy"], 1.0);
    assert!(e["margin"].as_f64().unwrap() > 0.0);
    // The checkpoint's adapter holds the trained score head too.
    let ckpt = eval_json(&out.join("checkpoint-15"), &data);
    assert_eq!(ckpt["loss"], e["loss"], "{ckpt} vs {e}");
    // eval's loss is Bradley–Terry alone; training's included the centring term.
    assert!(
        e["loss"].as_f64().unwrap() <= final_loss + 1e-9,
        "{e} vs {final_loss}"
    );
    // Pairs longer than max_length are left out, as TRL filters them.
    let m = model();
    let o = fedtune(&[
        "eval",
        "--model",
        m.to_str().unwrap(),
        "--adapter",
        out.to_str().unwrap(),
        "--reward-model",
        "--data",
        data.to_str().unwrap(),
        "--max-length",
        "39",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let short: Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(short["left_out"], 1, "{short}");
    assert_eq!(short["pairs"], 5, "{short}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn reward_mistakes_are_clear_errors() {
    let dir = tmpdir("errors");
    let m = model();
    // An ordinary LoRA adapter has no score head.
    let o = fedtune(&[
        "eval",
        "--model",
        m.to_str().unwrap(),
        "--adapter",
        root().join("testdata/tiny-llama/adapter").to_str().unwrap(),
        "--reward-model",
        "--data",
        root().join("testdata/reward/text.jsonl").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("no score head"),
        "{err}"
    );
    // Unpaired data is not preference data; the error names the file and line.
    let o = reward(
        &root().join("testdata/kto/text.jsonl"),
        &dir.join("x"),
        &["--max-steps", "1"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains("kto/text.jsonl:1")
            && err.contains("not a preference pair"),
        "{err}"
    );
    // Full fine-tuning does not apply.
    let o = reward(
        &root().join("testdata/reward/text.jsonl"),
        &dir.join("y"),
        &["--full"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--full"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
