//! `fedtune train sft` and `fedtune export` end to end on the tiny model: the adapter directory
//! is PEFT's, training lowers the loss, QLoRA trains on an NF4 base, a TOML config is read and
//! flags override it, and the exported model gives the logits of base + adapter.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

#[path = "support/train.rs"]
mod train;

use train::{data, model, root, tmpdir, train_sft, train_sft_env};

fn fedtune(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_fedtune"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fedtune {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn eval_loss(model: &Path, adapter: Option<&Path>) -> f64 {
    let mut args = vec![
        "eval".to_string(),
        "--model".into(),
        model.display().to_string(),
        "--data".into(),
        data().display().to_string(),
        "--json".into(),
    ];
    if let Some(a) = adapter {
        args.push("--adapter".into());
        args.push(a.display().to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = fedtune(&args);
    let v: Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    v["loss"].as_f64().unwrap()
}

/// A short LoRA r 8 run that moves the tiny model's loss well down.
const SHORT_RUN: &[&str] = &[
    "--max-steps",
    "12",
    "--learning-rate",
    "5e-3",
    "--lora-r",
    "8",
    "--lora-alpha",
    "16",
    "--per-device-train-batch-size",
    "4",
    "--seed",
    "7",
];

/// The tiny model with `adapter` has at most 0.8× the base's loss, and `fedtune export` of the
/// two (into `merged`) gives the same loss within 1e-4.
fn lowers_the_loss_and_exports_exactly(adapter: &Path, merged: &Path) {
    let base = eval_loss(&model(), None);
    let tuned = eval_loss(&model(), Some(adapter));
    assert!(tuned < base * 0.8, "base {base}, tuned {tuned}");
    fedtune(&[
        "export",
        "--model",
        model().to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--output",
        merged.to_str().unwrap(),
    ]);
    assert!(merged.join("config.json").is_file() && merged.join("tokenizer.json").is_file());
    let exported = eval_loss(merged, None);
    assert!(
        (exported - tuned).abs() < 1e-4,
        "exported {exported} vs base+adapter {tuned}"
    );
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn train_sft_writes_a_peft_adapter_that_lowers_the_loss_and_exports_exactly() {
    let out = tmpdir("lora");
    let adapter = out.join("adapter");
    let (ok, err) = train_sft(&data(), &adapter, SHORT_RUN);
    assert!(ok, "{err}");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "training_summary.json",
        "train_log.jsonl",
    ] {
        assert!(adapter.join(f).is_file(), "{f} missing");
    }
    let cfg = read_json(&adapter.join("adapter_config.json"));
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["r"], 8);
    assert_eq!(cfg["lora_alpha"].as_f64(), Some(16.0));
    assert_eq!(cfg["target_modules"].as_array().unwrap().len(), 7);
    let bytes = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let a = st
        .tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        .unwrap();
    assert_eq!(a.shape()[0], 8);
    let b = st
        .tensor("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight")
        .unwrap();
    assert_eq!(b.shape()[1], 8);

    lowers_the_loss_and_exports_exactly(&adapter, &out.join("merged"));
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn qlora_trains_on_an_nf4_base_from_a_toml_config_with_flag_overrides() {
    let out = tmpdir("qlora");
    let toml = out.join("train.toml");
    std::fs::write(
        &toml,
        "lora_r = 4\nlora_alpha = 8.0\nlearning_rate = 5e-3\nmax_steps = 10\n\
         per_device_train_batch_size = 4\nload_in_4bit = true\nbnb_4bit_use_double_quant = true\n",
    )
    .unwrap();
    let adapter = out.join("adapter");
    fedtune(&[
        "train",
        "sft",
        "--model",
        model().to_str().unwrap(),
        "--data",
        data().to_str().unwrap(),
        "--output",
        adapter.to_str().unwrap(),
        "--config",
        toml.to_str().unwrap(),
        "--lora-r",
        "6",
    ]);
    let cfg = read_json(&adapter.join("adapter_config.json"));
    assert_eq!(cfg["r"], 6, "the flag overrides the TOML file");
    assert_eq!(cfg["lora_alpha"].as_f64(), Some(8.0));
    // fedtune's metadata stays out of PEFT's config (PEFT warns about keys it does not know).
    assert!(
        cfg.as_object()
            .unwrap()
            .keys()
            .all(|k| !k.starts_with("fedtune")),
        "{cfg}"
    );
    let meta = read_json(&adapter.join("fedtune_adapter.json"));
    let q = &meta["quantization"];
    assert_eq!(q["bnb_4bit_quant_type"], "nf4", "{meta}");
    assert_eq!(q["bnb_4bit_use_double_quant"], true);
    let summary = read_json(&adapter.join("training_summary.json"));
    assert_eq!(summary["summary"]["steps"], 10);
    let log: Vec<Value> = std::fs::read_to_string(adapter.join("train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let losses: Vec<f64> = log.iter().filter_map(|e| e["loss"].as_f64()).collect();
    assert!(losses.len() >= 2, "{log:?}");
    assert!(
        losses.last().unwrap() < &(losses[0] * 0.9),
        "QLoRA loss did not fall: {losses:?}"
    );
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn bad_options_and_data_are_clear_errors() {
    let out = tmpdir("bad");
    let bad = root().join("testdata/formats/bad.jsonl");
    let (ok, err) = train_sft(&bad, &out.join("a"), &["--max-steps", "1"]);
    assert!(
        !ok && err.contains("bad.jsonl:2") && err.contains("field"),
        "{err}"
    );
    let (ok, err) = train_sft(&data(), &out.join("b"), &["--full", "--load-in-4bit"]);
    assert!(!ok && err.contains("--load-in-4bit"), "{err}");
    let (ok, err) = train_sft(&data(), &out.join("d"), &["--tf32"]);
    assert!(
        !ok && err.contains("--tf32") && err.contains("--device cuda"),
        "{err}"
    );
    let (ok, err) = train_sft(&data(), &out.join("e"), &["--fp16"]);
    assert!(
        !ok && err.contains("--fp16") && err.contains("--device cuda"),
        "{err}"
    );
    let (ok, err) = train_sft(&data(), &out.join("f"), &["--fp16", "--bf16"]);
    assert!(
        !ok && err.contains("--fp16") && err.contains("--bf16"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn train_sft_on_cuda_trains_there_or_names_the_device_it_could_not_open() {
    // CI has no GPU: the run must stop with an error naming the device. On the GPU machine
    // (scripts/gpu_check.sh runs this binary too) it trains and writes the adapter.
    let out = tmpdir("cuda");
    let (ok, err) = train_sft(
        &data(),
        &out.join("a"),
        &["--max-steps", "2", "--device", "cuda"],
    );
    if ok {
        assert!(out.join("a/adapter_model.safetensors").is_file(), "{err}");
        assert!(eval_loss(&model(), Some(&out.join("a"))).is_finite());
    } else {
        assert!(err.contains("--device cuda:0"), "{err}");
        assert!(!out.join("a/adapter_model.safetensors").exists());
    }
    let _ = std::fs::remove_dir_all(&out);
}

/// `--gradient-checkpointing` recomputes each block in backward: the same losses and gradient
/// norms, step for step, as the plain run (LoRA dropout on, so the recomputed masks must match).
#[test]
fn gradient_checkpointing_trains_the_same_steps() {
    let out = tmpdir("ckpt");
    let common = [
        "--max-steps",
        "4",
        "--lora-dropout",
        "0.1",
        "--per-device-train-batch-size",
        "2",
        "--learning-rate",
        "5e-3",
    ];
    let mut logs = Vec::new();
    for (name, extra) in [("plain", None), ("ckpt", Some("--gradient-checkpointing"))] {
        let mut args = common.to_vec();
        args.extend(extra);
        let (ok, err) = train_sft(&data(), &out.join(name), &args);
        assert!(ok, "{err}");
        let log = std::fs::read_to_string(out.join(name).join("train_log.jsonl")).unwrap();
        let steps: Vec<(f64, f64)> = log
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|v| v["loss"].is_number())
            .map(|v| {
                (
                    v["loss"].as_f64().unwrap(),
                    v["grad_norm"].as_f64().unwrap(),
                )
            })
            .collect();
        assert_eq!(steps.len(), 4, "{log}");
        logs.push(steps);
    }
    for (a, b) in logs[0].iter().zip(&logs[1]) {
        assert!((a.0 - b.0).abs() <= 1e-6 * a.0.abs(), "loss {a:?} vs {b:?}");
        assert!(
            (a.1 - b.1).abs() <= 1e-5 * a.1.abs(),
            "grad norm {a:?} vs {b:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&out);
}

/// `checkpoint-N/` holds a PEFT adapter of step N beside the resume state, as the Hugging Face
/// Trainer's checkpoints do: `eval --adapter out/checkpoint-2` loads it, and it is the
/// adapter of step 2 (a run stopped at step 2 writes the same loss), not the final one.
#[test]
fn checkpoints_hold_a_loadable_peft_adapter_of_their_step() {
    let out = tmpdir("ckpt-peft");
    let common = [
        "--per-device-train-batch-size",
        "2",
        "--learning-rate",
        "5e-3",
        "--seed",
        "3",
        // The first two steps do not depend on the run's length.
        "--lr-scheduler-type",
        "constant",
    ];
    let mut args = common.to_vec();
    args.extend(["--max-steps", "4", "--save-steps", "2"]);
    let (ok, err) = train_sft(&data(), &out.join("run"), &args);
    assert!(ok, "{err}");
    let ckpt = out.join("run/checkpoint-2");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "trainer_state.json",
    ] {
        assert!(
            ckpt.join(f).is_file(),
            "{f} missing from {}",
            ckpt.display()
        );
    }
    let mut args = common.to_vec();
    args.extend(["--max-steps", "2"]);
    let (ok, err) = train_sft(&data(), &out.join("two"), &args);
    assert!(ok, "{err}");
    let at_two = eval_loss(&model(), Some(&out.join("two")));
    let from_ckpt = eval_loss(&model(), Some(&ckpt));
    let last = eval_loss(&model(), Some(&out.join("run")));
    assert!((from_ckpt - at_two).abs() < 1e-6, "{from_ckpt} vs {at_two}");
    assert!(
        (from_ckpt - last).abs() > 1e-4,
        "{from_ckpt} vs the final {last}"
    );
    let _ = std::fs::remove_dir_all(&out);
}

/// TRL 1.x / transformers names: `--max-length` (and `max_length` in TOML) for
/// `--max-seq-length`, `--warmup-steps` overriding the ratio, `--save-total-limit` keeping the
/// newest checkpoints only.
#[test]
fn trl_names_max_length_warmup_steps_and_save_total_limit_work() {
    let out = tmpdir("trl-names");
    let toml = out.join("train.toml");
    std::fs::write(&toml, "max_length = 384\n").unwrap();
    let args = [
        "--config",
        toml.to_str().unwrap(),
        "--max-steps",
        "4",
        "--per-device-train-batch-size",
        "2",
        "--warmup-steps",
        "2",
        "--lr-scheduler-type",
        "constant",
        "--save-steps",
        "1",
        "--save-total-limit",
        "2",
    ];
    let (ok, err) = train_sft(&data(), &out.join("run"), &args);
    assert!(ok, "{err}");
    let summary = read_json(&out.join("run/training_summary.json"));
    assert_eq!(summary["config"]["max_seq_length"], 384);
    assert_eq!(summary["config"]["warmup_steps"], 2);
    let log = std::fs::read_to_string(out.join("run/train_log.jsonl")).unwrap();
    let lrs: Vec<f64> = log
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter_map(|v| v["learning_rate"].as_f64())
        .collect();
    // transformers' warm-up: lr·s/warmup at step s (0-based), then the constant peak.
    assert_eq!(lrs.len(), 4, "{log}");
    assert!(lrs[0] < lrs[1] && lrs[1] < lrs[2], "{lrs:?}");
    assert_eq!(lrs[2], lrs[3], "{lrs:?}");
    let mut kept: Vec<String> = std::fs::read_dir(out.join("run"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    kept.sort();
    assert_eq!(kept, ["checkpoint-3", "checkpoint-4"]);
    let (ok, err) = train_sft(
        &data(),
        &out.join("cli"),
        &["--max-length", "320", "--max-steps", "1"],
    );
    assert!(ok, "{err}");
    let summary = read_json(&out.join("cli/training_summary.json"));
    assert_eq!(summary["config"]["max_seq_length"], 320);
    let _ = std::fs::remove_dir_all(&out);
}

/// TRL's `assistant_only_loss` / `completion_only_loss`: fedtune trains assistant turns only by
/// default; `--assistant-only-loss false` trains every token of a conversation (TRL's
/// default), so the same step trains more tokens.
#[test]
fn assistant_only_loss_false_trains_every_token_of_a_conversation() {
    let out = tmpdir("loss-on");
    let trained = |name: &str, extra: &[&str]| {
        let mut args = vec!["--max-steps", "1", "--per-device-train-batch-size", "4"];
        args.extend_from_slice(extra);
        let (ok, err) = train_sft(&data(), &out.join(name), &args);
        assert!(ok, "{err}");
        let s = read_json(&out.join(name).join("training_summary.json"));
        (
            s["summary"]["trained_tokens"].as_u64().unwrap(),
            s["config"]["assistant_only_loss"].as_bool().unwrap(),
        )
    };
    let (assistant, flag) = trained("assistant", &[]);
    assert!(flag, "fedtune's default");
    let (all, flag) = trained("all", &["--assistant-only-loss", "false"]);
    assert!(!flag);
    println!("trained tokens: assistant turns {assistant}, every token {all}");
    assert!(all > assistant, "{all} vs {assistant}");
    let _ = std::fs::remove_dir_all(&out);
}

/// The start banner says what the run will do: examples, steps, effective batch, and the
/// trainable parameters against the model's (the adapter's and the checkpoint's value counts).
#[test]
fn the_start_banner_counts_examples_steps_and_parameters() {
    let out = tmpdir("banner");
    let (ok, err) = train_sft(
        &data(),
        &out.join("a"),
        &[
            "--max-steps",
            "3",
            "--per-device-train-batch-size",
            "2",
            "--gradient-accumulation-steps",
            "2",
        ],
    );
    assert!(ok, "{err}");
    let values = |p: &Path| -> usize {
        let bytes = std::fs::read(p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensors()
            .iter()
            .map(|(_, v)| v.shape().iter().product::<usize>())
            .sum()
    };
    let adapter = values(&out.join("a/adapter_model.safetensors"));
    let model = values(&model().join("model.safetensors"));
    let line = err
        .lines()
        .find(|l| l.starts_with("training "))
        .unwrap_or_else(|| panic!("no banner: {err}"));
    assert!(line.contains("3 steps, effective batch 4"), "{line}");
    assert!(
        line.contains(&format!("trainable parameters {adapter} of {model}")),
        "{line}"
    );
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn use_dora_trains_a_peft_dora_adapter_that_exports_exactly() {
    let out = tmpdir("dora");
    let adapter = out.join("adapter");
    let (ok, err) = train_sft(&data(), &adapter, &[&["--use-dora"], SHORT_RUN].concat());
    assert!(ok, "{err}");
    let cfg = read_json(&adapter.join("adapter_config.json"));
    assert_eq!(cfg["use_dora"], true, "{cfg}");
    let bytes = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mags: Vec<_> = st
        .tensors()
        .into_iter()
        .filter(|(k, _)| k.ends_with(".lora_magnitude_vector"))
        .collect();
    assert_eq!(mags.len(), 14, "a magnitude per adapted projection");
    let (_, down) = mags
        .iter()
        .find(|(k, _)| k.contains("layers.0.mlp.down_proj"))
        .unwrap();
    assert_eq!(down.shape(), &[64], "1-D [out], as PEFT stores it");

    lowers_the_loss_and_exports_exactly(&adapter, &out.join("merged"));
    // QLoRA + DoRA: the norm of the dequantised weight; the loss falls.
    let q = out.join("qdora");
    let (ok, err) = train_sft(
        &data(),
        &q,
        &[
            "--use-dora",
            "--load-in-4bit",
            "--max-steps",
            "8",
            "--learning-rate",
            "5e-3",
            "--per-device-train-batch-size",
            "4",
        ],
    );
    assert!(ok, "{err}");
    let losses: Vec<f64> = std::fs::read_to_string(q.join("train_log.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).unwrap()["loss"].as_f64())
        .collect();
    assert!(
        losses.last().unwrap() < &(losses[0] * 0.9),
        "QLoRA + DoRA loss did not fall: {losses:?}"
    );
    // What DoRA does not do is refused by name.
    let (ok, err) = train_sft(&data(), &out.join("x"), &["--use-dora", "--full"]);
    assert!(!ok && err.contains("use_dora"), "{err}");
    let _ = std::fs::remove_dir_all(&out);
}

/// `--dtype bf16` (or f16, or `--bf16`) on the CPU holds the frozen base in 16 bits, with f32
/// LoRA factors and optimiser state: it trains, its losses stay within 1% of the f32 run's (and
/// differ from them: the base is really rounded), widened or, through oneMKL, as bf16 products;
/// its adapter loads; where it means nothing it is refused by name.
#[test]
fn dtype_bf16_trains_lora_on_a_16_bit_base_on_the_cpu() {
    let out = tmpdir("half");
    // `precision`: `--dtype D`, or `--bf16`.
    let losses_with = |name: &str, precision: &str, env: &[(&str, &str)]| -> (Vec<f64>, String) {
        let mut args = vec![
            "-v",
            "--max-steps",
            "4",
            "--per-device-train-batch-size",
            "2",
            "--learning-rate",
            "5e-3",
        ];
        args.extend(match precision {
            "--bf16" => vec!["--bf16"],
            dtype => vec!["--dtype", dtype],
        });
        let (ok, err) = train_sft_env(&data(), &out.join(name), &args, env);
        assert!(ok, "{err}");
        let log = std::fs::read_to_string(out.join(name).join("train_log.jsonl")).unwrap();
        let losses = log
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter_map(|v| v["loss"].as_f64())
            .collect();
        (losses, err)
    };
    let losses = |name: &str, dtype: &str| losses_with(name, dtype, &[]).0;
    let full = losses("f32", "f32");
    let near_f32 = |what: &str, half: &[f64]| {
        assert_eq!(half.len(), full.len());
        assert_ne!(half, full, "{what}: the base must be rounded");
        for (a, b) in full.iter().zip(half) {
            assert!(
                (a - b).abs() <= 0.01 * a.abs(),
                "{what}: loss {b} vs f32 {a}"
            );
        }
    };
    for dtype in ["bf16", "f16"] {
        near_f32(dtype, &losses(dtype, dtype));
        assert!(eval_loss(&model(), Some(&out.join(dtype))).is_finite());
    }
    // Without a bf16 matrix product (no BLAS here) the 16-bit base is widened for each product;
    // with oneMKL's (FEDTUNE_TEST_BLAS, where .ci/run puts it) the products are bf16 with f32
    // accumulation, as under PyTorch's autocast: other losses, still within 1% of f32's.
    let (widened, log) = losses_with("bf16-wide", "bf16", &[("FEDTUNE_BLAS", "off")]);
    near_f32("bf16 widened", &widened);
    assert!(log.contains("widened to f32"), "{log}");
    let mkl = std::env::var("FEDTUNE_TEST_BLAS")
        .unwrap_or_default()
        .split(':')
        .find(|p| p.contains("mkl_rt"))
        .map(String::from);
    match mkl {
        Some(mkl) => {
            let (bf16, log) = losses_with("bf16-mkl", "bf16", &[("FEDTUNE_BLAS", &mkl)]);
            assert!(log.contains("products in bf16"), "{log}");
            near_f32("bf16 products", &bf16);
            assert_ne!(bf16, widened, "the activations must be rounded too");
        }
        None => eprintln!("no oneMKL in FEDTUNE_TEST_BLAS: bf16 products not checked end to end"),
    }
    // TRL's --bf16 on the CPU is --dtype bf16.
    let (flag, _) = losses_with("bf16-flag", "--bf16", &[("FEDTUNE_BLAS", "off")]);
    assert_eq!(flag, widened, "--bf16 trains as --dtype bf16");
    let (ok, err) = train_sft(&data(), &out.join("z"), &["--bf16", "--full"]);
    assert!(
        !ok && err.contains("--bf16") && err.contains("--full"),
        "{err}"
    );
    let (ok, err) = train_sft(&data(), &out.join("w"), &["--bf16", "--dtype", "f16"]);
    assert!(
        !ok && err.contains("--bf16") && err.contains("f16"),
        "{err}"
    );
    let (ok, err) = train_sft(&data(), &out.join("x"), &["--dtype", "bf16", "--full"]);
    assert!(
        !ok && err.contains("--dtype bf16") && err.contains("--full"),
        "{err}"
    );
    let (ok, err) = train_sft(
        &data(),
        &out.join("y"),
        &["--dtype", "bf16", "--device", "cuda"],
    );
    assert!(!ok && err.contains("--bf16"), "{err}");
    let _ = std::fs::remove_dir_all(&out);
}
