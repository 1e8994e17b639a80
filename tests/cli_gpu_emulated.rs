//! The CLI with `--device cuda`, in CI: `fedtune train sft|dpo|kto|distill|reward|grpo` (DoRA
//! too), `eval` (with `--reward-model` and `--generate`) and `generate` on the emulated CUDA
//! device of `engine/tests/cuda_emu` (`sim` and the daemons: `cli_gpu_emulated_fed.rs`)
//! (`FEDTUNE_CUDA_EMULATOR=1`, which `.ci/run` sets; the commands open the emulated driver
//! through `LD_LIBRARY_PATH`), against the same commands on the CPU. Without
//! `FEDTUNE_CUDA_EMULATOR=1` each test says so and passes; on a GPU machine
//! `scripts/gpu_check.sh` runs the same commands on the real device.

#[path = "../engine/tests/gpu_common/emu.rs"]
mod emu;
#[path = "support/gpu_cli.rs"]
mod gpu_cli;
#[path = "support/train.rs"]
mod train;

use std::path::Path;
use std::process::{Command, Output};

use gpu_cli::{command, emulator, fedtune};
use serde_json::Value;
use train::{data, model, root, tmpdir};

/// A training log's `(step, loss, grad_norm)` entries.
fn logged(out: &Path) -> Vec<(u64, f64, f64)> {
    std::fs::read_to_string(out.join("train_log.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("loss").is_some() && v.get("grad_norm").is_some())
        .map(|v| {
            (
                v["step"].as_u64().unwrap(),
                v["loss"].as_f64().unwrap(),
                v["grad_norm"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// `fedtune <args>` on the CPU, or with `--device cuda` on the emulated GPU when `gpu` is given.
fn on_device(args: &[&str], gpu: Option<&Path>) -> Output {
    let mut args = args.to_vec();
    if gpu.is_some() {
        args.extend_from_slice(&["--device", "cuda"]);
    }
    fedtune(&args, gpu)
}

/// `train sft` on the tiny model and the demo data for `steps` steps: the log's `(loss,
/// grad_norm)` per step.
fn sft(out: &Path, steps: &str, extra: &[&str], gpu: Option<&Path>) -> Vec<(f64, f64)> {
    run_train("sft", &data(), out, steps, extra, gpu)
}

/// `train <method>` on the tiny model and `data` for `steps` steps: the log's `(loss,
/// grad_norm)` per step.
fn run_train(
    method: &str,
    data: &Path,
    out: &Path,
    steps: &str,
    extra: &[&str],
    gpu: Option<&Path>,
) -> Vec<(f64, f64)> {
    let mut args = train_args(method, data, out, steps);
    args.extend(extra.iter().map(|s| s.to_string()));
    on_device(&strs(&args), gpu);
    logged(out).into_iter().map(|s| (s.1, s.2)).collect()
}

/// `train <method>` for `steps` steps on the CPU and on the emulated GPU (into
/// `<dir>/<name>-cpu` and `<dir>/<name>-gpu`): each step's loss and gradient norm agree within
/// 1e-5.
fn gpu_follows_cpu(
    gpu: &Path,
    dir: &Path,
    name: &str,
    method: &str,
    data: &Path,
    steps: &str,
    flags: &[&str],
) {
    let out = |device: &str| dir.join(format!("{name}-{device}"));
    let cpu = run_train(method, data, &out("cpu"), steps, flags, None);
    let on_gpu = run_train(method, data, &out("gpu"), steps, flags, Some(gpu));
    close(&format!("{name}: GPU vs CPU"), &on_gpu, &cpu, 1e-5);
}

/// `train <method> --model <tiny> --data <data> --output <out> --max-steps <steps>`.
fn train_args(method: &str, data: &Path, out: &Path, steps: &str) -> Vec<String> {
    let m = model();
    [
        "train",
        method,
        "--model",
        m.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--max-steps",
        steps,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(|s| s.as_str()).collect()
}

fn close(what: &str, got: &[(f64, f64)], want: &[(f64, f64)], rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}: steps logged");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        for (name, a, b) in [("loss", g.0, w.0), ("grad_norm", g.1, w.1)] {
            let r = (a - b).abs() / b.abs().max(1e-12);
            println!("{what}: step {} {name} {a} vs {b} ({r:.1e})", i + 1);
            assert!(r <= rel, "{what}: step {} {name}: {a} vs {b}", i + 1);
        }
    }
}

fn eval_loss(adapter: &Path, gpu: Option<&Path>) -> f64 {
    let (m, d) = (model(), data());
    let args = [
        "eval",
        "--model",
        m.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--data",
        d.to_str().unwrap(),
        "--json",
    ];
    let o = on_device(&args, gpu);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v["loss"].as_f64().unwrap()
}

#[test]
fn sft_eval_and_generation_on_the_emulated_gpu_give_what_the_cpu_gives() {
    let Some(gpu) = emulator() else { return };
    let dir = tmpdir("emulated-gpu-sft");
    gpu_follows_cpu(&gpu, &dir, "sft", "sft", &data(), "3", &[]);
    // DoRA: the magnitudes start from norms computed on the device and train with the factors.
    gpu_follows_cpu(&gpu, &dir, "dora", "sft", &data(), "2", &["--use-dora"]);
    let (cpu_out, gpu_out) = (dir.join("sft-cpu"), dir.join("sft-gpu"));
    // The adapter trained on the GPU scores like the CPU's, on either device.
    let want = eval_loss(&cpu_out, None);
    for (what, got) in [
        ("GPU adapter, CPU eval", eval_loss(&gpu_out, None)),
        ("GPU adapter, GPU eval", eval_loss(&gpu_out, Some(&gpu))),
    ] {
        println!("{what}: {got} vs {want}");
        assert!(
            (got - want).abs() <= 1e-5 * want.abs(),
            "{what}: {got} vs {want}"
        );
    }
    // Greedy generation from the GGUF file: the same tokens.
    let gguf = root().join("testdata/gguf/tiny.gguf");
    let generate = |gpu: Option<&Path>| {
        let args = [
            "generate",
            "--model",
            gguf.to_str().unwrap(),
            "--prompt",
            "The patient",
            "--max-new-tokens",
            "8",
        ];
        String::from_utf8(on_device(&args, gpu).stdout).unwrap()
    };
    assert_eq!(generate(Some(&gpu)), generate(None), "greedy generation");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The emulated device's counters of a `train sft --device cuda` run of `steps` steps
/// (`FEDTUNE_CUDA_EMU_STATS=1`): launches, host-to-device copies, device-to-host copies, waits,
/// allocations.
fn device_counters(gpu: &Path, out: &Path, steps: &str) -> [u64; 5] {
    let mut args = train_args("sft", &data(), out, steps);
    args.extend(["--max-seq-length", "128", "--device", "cuda"].map(String::from));
    let o = command(Some(gpu))
        .args(&args)
        .env("FEDTUNE_CUDA_EMU_STATS", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("cuda-emu: ") && l.contains(" launches, "))
        .unwrap_or_else(|| panic!("no counters in\n{err}"));
    let nums: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|t| t.parse().ok())
        .collect();
    nums.try_into()
        .unwrap_or_else(|_| panic!("five counters expected: {line}"))
}

/// What a training step asks of the device, from the difference between a 1-step and a 3-step
/// run: it reads from the device only for what it logs (the loss and the gradient norm) and
/// never waits for the device otherwise, so a GPU never stalls inside a step.
#[test]
fn a_gpu_training_step_reads_back_only_its_loss_and_gradient_norm() {
    let Some(gpu) = emulator() else { return };
    let dir = tmpdir("emulated-gpu-syncs");
    let one = device_counters(&gpu, &dir.join("one"), "1");
    let three = device_counters(&gpu, &dir.join("three"), "3");
    let per_step: Vec<u64> = three.iter().zip(&one).map(|(t, o)| (t - o) / 2).collect();
    println!(
        "per LoRA SFT step on the tiny model: {} kernel launches (products not counted), {} \
         host-to-device copies, {} device-to-host copies, {} waits, {} allocations",
        per_step[0], per_step[1], per_step[2], per_step[3], per_step[4]
    );
    assert!(per_step[0] > 0, "no kernel launched: {one:?} {three:?}");
    assert!(
        per_step[2] <= 2,
        "{} device-to-host copies per step",
        per_step[2]
    );
    assert_eq!(per_step[3], 0, "waits for the device per step");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn qlora_with_packing_and_accumulation_and_dpo_on_the_emulated_gpu_follow_the_cpu() {
    let Some(gpu) = emulator() else { return };
    let dir = tmpdir("emulated-gpu-qlora-dpo");
    // NF4 with double quantisation (the same codes on both devices), packed sequences, two
    // micro-batches per step.
    let flags = [
        "--load-in-4bit",
        "--bnb-4bit-use-double-quant",
        "--packing",
        "--max-seq-length",
        "256",
        "--gradient-accumulation-steps",
        "2",
        "--per-device-train-batch-size",
        "2",
    ];
    gpu_follows_cpu(&gpu, &dir, "qlora", "sft", &data(), "2", &flags);
    // DPO: the reference is the model with the adapter disabled, on the same device.
    let flags = [
        "--learning-rate",
        "1e-3",
        "--per-device-train-batch-size",
        "2",
        "--gradient-accumulation-steps",
        "1",
    ];
    let prefs = root().join("testdata/demo/prefs.jsonl");
    gpu_follows_cpu(&gpu, &dir, "dpo", "dpo", &prefs, "2", &flags);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn kto_and_distillation_on_the_emulated_gpu_follow_the_cpu() {
    let Some(gpu) = emulator() else { return };
    let dir = tmpdir("emulated-gpu-kto-distill");
    let kto = root().join("testdata/kto/chat.jsonl");
    gpu_follows_cpu(&gpu, &dir, "kto", "kto", &kto, "2", &[]);
    // Distillation from the tiny model with the reference adapter as the teacher (on the same
    // device as the student).
    let (teacher, adapter) = (model(), root().join("testdata/tiny-llama/adapter"));
    let flags = [
        "--teacher",
        teacher.to_str().unwrap(),
        "--teacher-adapter",
        adapter.to_str().unwrap(),
    ];
    let chat = root().join("testdata/gkd/chat.jsonl");
    gpu_follows_cpu(&gpu, &dir, "distill", "distill", &chat, "2", &flags);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `fedtune eval <args> --json` on the CPU or the emulated GPU: its JSON object.
fn eval_json(args: &[&str], gpu: Option<&Path>) -> Value {
    let mut all = vec!["eval", "--json"];
    all.extend_from_slice(args);
    let o = on_device(&all, gpu);
    let out = String::from_utf8(o.stdout).unwrap();
    serde_json::from_str(out.lines().last().unwrap()).unwrap()
}

/// Every number of `got` within `rel` of `want`'s, the other values equal.
fn same_json(what: &str, got: &Value, want: &Value, rel: f64) {
    let (g, w) = (got.as_object().unwrap(), want.as_object().unwrap());
    assert_eq!(
        g.keys().collect::<Vec<_>>(),
        w.keys().collect::<Vec<_>>(),
        "{what}"
    );
    for (k, wv) in w {
        match (g[k].as_f64(), wv.as_f64()) {
            (Some(a), Some(b)) => assert!(
                (a - b).abs() <= rel * b.abs().max(1e-3),
                "{what}: {k} {a} vs {b}"
            ),
            _ => assert_eq!(&g[k], wv, "{what}: {k}"),
        }
    }
    println!("{what}: {} values agree", w.len());
}

#[test]
fn reward_models_grpo_and_their_evaluations_on_the_emulated_gpu_follow_the_cpu() {
    let Some(gpu) = emulator() else { return };
    let dir = tmpdir("emulated-gpu-reward-grpo");
    let prefs = root().join("testdata/demo/prefs.jsonl");
    // A reward model (LoRA and the score head) trained on each device.
    let flags = ["--center-rewards-coefficient", "0.01"];
    gpu_follows_cpu(&gpu, &dir, "reward", "reward", &prefs, "2", &flags);
    let m = model();
    let (cpu_rm, gpu_rm) = (dir.join("reward-cpu"), dir.join("reward-gpu"));
    // Each scores the pairs alike, on either device.
    let score = |adapter: &Path, gpu: Option<&Path>| {
        let args = [
            "--reward-model",
            "--model",
            m.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--data",
            prefs.to_str().unwrap(),
        ];
        eval_json(&args, gpu)
    };
    let want = score(&cpu_rm, None);
    same_json(
        "GPU reward model, CPU eval",
        &score(&gpu_rm, None),
        &want,
        1e-4,
    );
    same_json(
        "GPU reward model, GPU eval",
        &score(&gpu_rm, Some(&gpu)),
        &want,
        1e-4,
    );
    // GRPO with a rule and that reward model (on the policy's device), sampling at 0.9.
    let prompts = root().join("testdata/grpo/prompts.jsonl");
    let rm = format!("reward_model:{}", cpu_rm.display());
    let flags = [
        "--reward",
        "regex:^\\s*[A-Z]",
        "--reward",
        &rm,
        "--num-generations",
        "4",
        "--per-device-train-batch-size",
        "4",
        "--max-completion-length",
        "3",
        "--temperature",
        "0.9",
        "--beta",
        "0.04",
        "--learning-rate",
        "1e-2",
    ];
    gpu_follows_cpu(&gpu, &dir, "grpo", "grpo", &prompts, "2", &flags);
    // Completions of held-out prompts, sampled and scored on each device: the same numbers.
    let policy = dir.join("grpo-cpu");
    let generated = |gpu: Option<&Path>| {
        let args = [
            "--generate",
            "--model",
            m.to_str().unwrap(),
            "--adapter",
            policy.to_str().unwrap(),
            "--data",
            prompts.to_str().unwrap(),
            "--reward",
            "regex:^\\s*[A-Z]",
            "--reward",
            &rm,
            "--max-new-tokens",
            "4",
            "--temperature",
            "0.7",
        ];
        eval_json(&args, gpu)
    };
    same_json(
        "eval --generate",
        &generated(Some(&gpu)),
        &generated(None),
        1e-4,
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn mixed_precision_checkpointing_and_tf32_train_on_the_emulated_gpu() {
    let Some(gpu) = emulator() else { return };
    let dir = tmpdir("emulated-gpu-flags");
    let f32 = sft(&dir.join("f32"), "2", &[], Some(&gpu));
    // Recomputing each block's forward in backward gives the same numbers.
    let ckpt = sft(
        &dir.join("ckpt"),
        "2",
        &["--gradient-checkpointing"],
        Some(&gpu),
    );
    close("gradient checkpointing vs f32", &ckpt, &f32, 1e-5);
    // TF32 products round their inputs to 10 bits; bf16 and fp16 (loss scaling) train a bf16 or
    // f16 base with f32 LoRA factors: near the f32 run, not equal to it.
    for (flag, rel) in [("--tf32", 2e-3), ("--fp16", 2e-2), ("--bf16", 5e-2)] {
        let got = sft(&dir.join(&flag[2..]), "2", &[flag], Some(&gpu));
        close(&format!("{flag} vs f32"), &got, &f32, rel);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Ctrl-C during `train sft --device cuda` checkpoints after the current step and says how to
/// resume; the checkpoint resumes on the CPU and the steps after it are the steps of an
/// uninterrupted CPU run.
#[test]
fn ctrl_c_on_the_gpu_checkpoints_and_the_cpu_resumes_exactly() {
    let Some(gpu) = emulator() else { return };
    let dir = tmpdir("emulated-gpu-ctrl-c");
    let common = |out: &Path| -> Vec<String> {
        let mut args = train_args("sft", &data(), out, "4");
        args.extend(["--max-seq-length", "128"].map(String::from));
        args
    };
    let interrupted = dir.join("gpu");
    let mut args = common(&interrupted);
    args.extend(["--device".into(), "cuda".into()]);
    let child = command(Some(&gpu))
        .args(&args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt once the first step is logged.
    let log = interrupted.join("train_log.jsonl");
    let t = std::time::Instant::now();
    while !std::fs::read_to_string(&log).is_ok_and(|l| l.contains("\"step\":1")) {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(300),
            "no step logged"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("interrupted: saving a checkpoint"), "{err}");
    let stopped: u64 = err
        .split("stopped at step ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no 'stopped at step' in {err}"));
    assert!((1..4).contains(&stopped), "{err}");
    let checkpoint = interrupted.join(format!("checkpoint-{stopped}"));
    assert!(checkpoint.is_dir(), "{err}");
    // Resumed on the CPU, against an uninterrupted CPU run.
    let resumed = dir.join("resumed");
    let mut args = common(&resumed);
    args.extend([
        "--resume-from-checkpoint".into(),
        checkpoint.to_str().unwrap().into(),
    ]);
    fedtune(&strs(&args), None);
    let whole = dir.join("whole");
    let args = common(&whole);
    fedtune(&strs(&args), None);
    let after: Vec<(f64, f64)> = logged(&resumed)
        .into_iter()
        .filter(|s| s.0 > stopped)
        .map(|s| (s.1, s.2))
        .collect();
    let want: Vec<(f64, f64)> = logged(&whole)
        .into_iter()
        .filter(|s| s.0 > stopped)
        .map(|s| (s.1, s.2))
        .collect();
    assert!(!want.is_empty());
    close(
        &format!("steps after a GPU checkpoint at step {stopped}, resumed on the CPU"),
        &after,
        &want,
        1e-5,
    );
    let _ = std::fs::remove_dir_all(&dir);
}
