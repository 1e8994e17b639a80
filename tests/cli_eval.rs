//! `fedtune eval --json` as a stable contract, checked against the reference numbers of
//! transformers/PEFT (`testdata/tiny-llama/reference.json`).

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/tiny-llama")
}

fn eval(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_fedtune"))
        .arg("eval")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(testdata().join("reference.json")).unwrap())
        .unwrap()
}

#[test]
fn eval_json_reports_the_reference_sft_loss_with_and_without_adapter() {
    let t = testdata();
    let model = t.join("model");
    let data = t.join("conversation.jsonl");
    let r = reference();
    let base = eval(&[
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    let want = r["sft"]["assistant_only_mean_loss_base"].as_f64().unwrap();
    assert!(
        (base["loss"].as_f64().unwrap() - want).abs() < 1e-4,
        "{base}"
    );
    assert_eq!(base["tokens"], 34);
    assert!((base["perplexity"].as_f64().unwrap() - want.exp()).abs() / want.exp() < 1e-4);
    let adapter = t.join("adapter");
    let with = eval(&[
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    let want = r["sft"]["assistant_only_mean_loss_adapter"]
        .as_f64()
        .unwrap();
    assert!(
        (with["loss"].as_f64().unwrap() - want).abs() < 1e-4,
        "{with}"
    );
}

#[test]
fn eval_beta_reports_the_reference_dpo_loss_and_margin() {
    let t = testdata();
    let r = reference();
    let out = eval(&[
        "--model",
        t.join("model").to_str().unwrap(),
        "--adapter",
        t.join("adapter").to_str().unwrap(),
        "--data",
        t.join("dpo_pair.jsonl").to_str().unwrap(),
        "--beta",
        "0.1",
    ]);
    let dpo = &r["dpo"];
    for (got, want) in [("dpo_loss", "loss"), ("reward_margin", "reward_margin")] {
        let g = out[got].as_f64().unwrap();
        let w = dpo[want].as_f64().unwrap();
        assert!((g - w).abs() < 1e-4, "{got}: {g} vs {w}");
    }
    assert_eq!(out["reward_accuracy"], 0.0);
    assert!(
        (out["logps/chosen"].as_f64().unwrap() - dpo["policy_chosen_logp"].as_f64().unwrap()).abs()
            < 1e-3
    );
}

#[test]
fn bad_data_is_a_clear_error_naming_file_line_and_field() {
    let bad = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/formats/bad.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_fedtune"))
        .args(["eval", "--model"])
        .arg(testdata().join("model"))
        .arg("--data")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.jsonl:2") && err.contains("`output`"),
        "{err}"
    );
}

fn fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_fedtune"))
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "expected a failure: {args:?}");
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn device_cuda_without_a_driver_is_a_one_line_error_and_bad_devices_are_named() {
    let t = testdata();
    let (model, data) = (t.join("model"), t.join("conversation.jsonl"));
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());
    let bad = fails(&["eval", "--model", m, "--data", d, "--device", "cuda:x"]);
    assert!(bad.contains("cuda:x"), "{bad}");
    let bad = fails(&["eval", "--model", m, "--data", d, "--device", "tpu"]);
    assert!(bad.contains("unknown device"), "{bad}");
    let train = fails(&[
        "train",
        "sft",
        "--model",
        m,
        "--data",
        d,
        "--output",
        "/nonexistent/x",
        "--device",
        "cuda",
    ]);
    // Where a driver is installed (a GPU machine) `--device cuda` runs; elsewhere it must fail
    // with a message naming what is missing, not a panic.
    let has_driver = [
        "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
        "/usr/lib64/libcuda.so.1",
    ]
    .iter()
    .any(|p| std::path::Path::new(p).exists());
    if !has_driver {
        assert!(train.contains("no NVIDIA driver found"), "{train}");
        assert!(train.contains("--device cuda"), "{train}");
        let err = fails(&["eval", "--model", m, "--data", d, "--device", "cuda"]);
        assert!(err.contains("no NVIDIA driver found"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn eval_with_nf4_weights_stays_close_to_the_dense_loss() {
    let t = testdata();
    let (model, data) = (t.join("model"), t.join("conversation.jsonl"));
    let args = [
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ];
    let dense = eval(&args)["loss"].as_f64().unwrap();
    let mut q = args.to_vec();
    q.extend(["--load-in-4bit", "--bnb-4bit-use-double-quant"]);
    let nf4 = eval(&q)["loss"].as_f64().unwrap();
    assert!(
        nf4.is_finite() && nf4 != dense,
        "NF4 should change the loss a little: {nf4} vs {dense}"
    );
    assert!((nf4 - dense).abs() / dense < 0.05, "{nf4} vs {dense}");
}

#[test]
fn bf16_and_f16_eval_run_on_the_cpu_and_bf16_full_training_is_refused_with_a_message() {
    let t = testdata();
    let (model, data) = (t.join("model"), t.join("conversation.jsonl"));
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());
    let f32_loss = eval(&["--model", m, "--data", d])["loss"].as_f64().unwrap();
    for dt in ["bf16", "f16"] {
        let loss = eval(&["--model", m, "--data", d, "--dtype", dt])["loss"]
            .as_f64()
            .unwrap();
        assert!(
            (loss - f32_loss).abs() < 0.05,
            "{dt}: {loss} vs f32 {f32_loss}"
        );
    }
    let err = fails(&[
        "train",
        "sft",
        "--model",
        m,
        "--data",
        d,
        "--output",
        "/nonexistent/x",
        "--dtype",
        "bf16",
        "--full",
    ]);
    // LoRA on a bf16 base trains (tests/cli_train.rs); full fine-tuning is f32 only.
    assert!(
        err.contains("--dtype bf16") && err.contains("--full"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn eval_generate_scores_each_prompts_completion_with_the_rewards() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = testdata().join("model");
    let prompts = root.join("testdata/grpo/prompts.jsonl");
    let dir = std::env::temp_dir().join(format!("fedtune-eval-gen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let completions = dir.join("completions.jsonl");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "--model",
            model.to_str().unwrap(),
            "--data",
            prompts.to_str().unwrap(),
            "--generate",
            "--reward",
            "json_valid",
            "--reward",
            "length:0:40",
            "--reward",
            "regex:Czech",
            "--reward-weights",
            "2,1,0.5",
            "--max-new-tokens",
            "6",
        ];
        args.extend_from_slice(extra);
        eval(&args)
    };
    let m = run(&["--completions", completions.to_str().unwrap()]);
    assert_eq!(m["prompts"], 4, "{m}");
    let lines: Vec<Value> = std::fs::read_to_string(&completions)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    // Every score recomputed here from the written completion.
    let mut sums = [0f64; 4];
    let mut passes = [0usize; 3];
    for l in &lines {
        let c = l["completion"].as_str().unwrap();
        let valid = serde_json::from_str::<Value>(c.trim()).is_ok() as u8 as f64;
        let n = c.chars().count();
        let length = -((n.saturating_sub(40)) as f64 / 40.0).min(1.0);
        let czech = c.contains("Czech") as u8 as f64;
        let total = 2.0 * valid + length + 0.5 * czech;
        for (k, (name, want)) in [("json_valid", valid), ("length", length), ("regex", czech)]
            .into_iter()
            .enumerate()
        {
            let got = l["rewards"][name].as_f64().unwrap();
            assert!(
                (got - want).abs() < 1e-6,
                "{name}: {got} vs {want} for {c:?}"
            );
            sums[k] += want;
            passes[k] += usize::from(if name == "length" {
                want >= 0.0
            } else {
                want >= 1.0
            });
        }
        assert!((l["reward"].as_f64().unwrap() - total).abs() < 1e-5, "{l}");
        sums[3] += total;
    }
    for (k, name) in ["json_valid", "length", "regex"].into_iter().enumerate() {
        let mean = m[format!("rewards/{name}/mean")].as_f64().unwrap();
        assert!((mean - sums[k] / 4.0).abs() < 1e-6, "{name} mean: {m}");
        let pass = m[format!("rewards/{name}/pass_rate")].as_f64().unwrap();
        assert!(
            (pass - passes[k] as f64 / 4.0).abs() < 1e-12,
            "{name} pass rate: {m}"
        );
    }
    assert!(
        (m["reward"].as_f64().unwrap() - sums[3] / 4.0).abs() < 1e-5,
        "{m}"
    );
    let longest = m["completions/max_length"].as_f64().unwrap();
    assert!((1.0..=6.0).contains(&longest), "{m}");
    // Greedy decoding repeats.
    assert_eq!(run(&[]), m);
    // Mistakes are named.
    let refused = |data: &std::path::Path, reward: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_fedtune"))
            .args(["eval", "--model", model.to_str().unwrap()])
            .args(["--data", data.to_str().unwrap(), "--generate"])
            .args(["--reward", reward])
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = refused(&prompts, "no_such_reward");
    assert!(err.contains("no_such_reward"), "{err}");
    let err = refused(&testdata().join("conversation.jsonl"), "json_valid");
    assert!(
        err.contains("conversation.jsonl") && err.contains("prompt"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
