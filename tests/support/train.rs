//! What the `fedtune train sft` end-to-end tests share: the tiny model, the demo data, a
//! scratch directory, and a run of the command.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn model() -> PathBuf {
    root().join("testdata/tiny-llama/model")
}

pub fn data() -> PathBuf {
    root().join("testdata/demo/hospital.jsonl")
}

pub fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fedtune-cli-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `fedtune train sft --model <tiny> --data <data> --output <out> <extra…>`: its exit status and
/// stderr.
pub fn train_sft(data: &Path, out: &Path, extra: &[&str]) -> (bool, String) {
    train_sft_env(data, out, extra, &[])
}

/// [`train_sft`] with extra environment variables.
pub fn train_sft_env(
    data: &Path,
    out: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (bool, String) {
    let o = train("sft", data, out, extra, env);
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// `fedtune train <method> --model <tiny> --data <data> --output <out> <extra…>` with extra
/// environment variables.
pub fn train(
    method: &str,
    data: &Path,
    out: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Output {
    let model = model();
    let mut args = vec![
        "train",
        method,
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Command::new(env!("CARGO_BIN_EXE_fedtune"))
        .args(&args)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}
