//! `fedtune train sft --report-to tensorboard`: TensorBoard event files beside
//! `train_log.jsonl`, with the logged values.

#[path = "support/tensorboard.rs"]
mod tensorboard;
#[path = "support/train.rs"]
mod train;

use serde_json::Value;
use train::{data, tmpdir, train_sft};

/// transformers' `report_to`: `--report-to tensorboard` (or `report_to = "tensorboard"` in
/// TOML) writes TensorBoard event files under OUTPUT/runs/ with the Trainer's tags and the
/// values of train_log.jsonl (TensorBoard 2.21's EventAccumulator read such a file back when
/// this was written); unknown destinations are refused.
#[test]
fn report_to_tensorboard_writes_the_logged_values() {
    let out = tmpdir("tensorboard");
    let (ok, err) = train_sft(
        &data(),
        &out.join("run"),
        &[
            "--max-steps",
            "4",
            "--eval-split",
            "0.2",
            "--eval-steps",
            "2",
            "--report-to",
            "tensorboard",
        ],
    );
    assert!(ok, "{err}");
    let scalars = tensorboard::scalars(&out.join("run"));
    let log: Vec<Value> = std::fs::read_to_string(out.join("run/train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let of = |tag: &str| -> Vec<(i64, f32)> {
        scalars
            .iter()
            .filter(|(t, _, _)| t == tag)
            .map(|(_, s, v)| (*s, *v))
            .collect()
    };
    let want = |key: &str| -> Vec<(i64, f32)> {
        log.iter()
            .filter_map(|e| Some((e["step"].as_i64()?, e[key].as_f64()? as f32)))
            .collect()
    };
    assert_eq!(of("train/loss"), want("loss"));
    assert_eq!(of("train/learning_rate"), want("learning_rate"));
    assert_eq!(of("eval/loss"), want("eval_loss"));
    assert_eq!(of("train/loss").len(), 4);
    assert_eq!(of("eval/loss").len(), 2);
    assert!(!of("train/grad_norm").is_empty());
    // In TOML, as transformers takes it; and an unknown destination is an error.
    let toml = out.join("train.toml");
    std::fs::write(&toml, "report_to = [\"tensorboard\"]\n").unwrap();
    let (ok, err) = train_sft(
        &data(),
        &out.join("toml"),
        &["--config", toml.to_str().unwrap(), "--max-steps", "1"],
    );
    assert!(ok, "{err}");
    assert_eq!(
        tensorboard::scalars(&out.join("toml"))
            .iter()
            .filter(|(t, _, _)| t == "train/loss")
            .count(),
        1
    );
    let (ok, err) = train_sft(&data(), &out.join("bad"), &["--report-to", "wandb"]);
    assert!(!ok && err.contains("tensorboard"), "{err}");
    let _ = std::fs::remove_dir_all(&out);
}
