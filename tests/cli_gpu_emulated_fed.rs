//! The simulator and the daemons with `--device cuda` / `device = "cuda"` on the emulated CUDA
//! device of `engine/tests/cuda_emu` (`FEDTUNE_CUDA_EMULATOR=1`, which `.ci/run` sets), against
//! the same federations on the CPU: `sim` with jobs side by side, a DoRA federation, and a GPU
//! client federating with a CPU client over QUIC. Without `FEDTUNE_CUDA_EMULATOR=1` each test
//! says so and passes.

#[path = "../engine/tests/gpu_common/emu.rs"]
mod emu;
#[path = "support/fed_cli.rs"]
mod fed_cli;
#[path = "support/gpu_cli.rs"]
mod gpu_cli;
#[path = "support/train.rs"]
mod train;

use std::path::Path;
use std::process::Output;

use gpu_cli::{command, emulator, fedtune};
use serde_json::Value;
use train::{model, root, tmpdir};

/// The simulator's config of the emulated-GPU tests, written into `dir`: two quickstart
/// hospitals, one SFT and one DPO round of the tiny model, FedAvg-exact; DoRA with `dora`.
fn sim_config(dir: &Path, dora: bool) -> std::path::PathBuf {
    let data = root().join("examples/quickstart/data");
    let mut clients = String::new();
    for name in ["st-mary-cardiology", "riverside-pediatrics"] {
        let d = data.join(name);
        clients += &format!(
            "[[data.clients]]\nname = \"{name}\"\ntrain = \"{}\"\neval = \"{}\"\npreferences = \"{}\"\n\n",
            d.join("train.jsonl").display(),
            d.join("eval.jsonl").display(),
            d.join("prefs.jsonl").display()
        );
    }
    let config = dir.join("sim.toml");
    std::fs::write(
        &config,
        format!(
            r#"name = "emulated-gpu"
seed = 7
device = "cuda"

[model]
path = "smollm2"
rank = 4
lora_alpha = 8
use_dora = {dora}

[data]
partition = {{ kind = "per_file" }}
max_seq_length = 256

{clients}[sft]
rounds = 1
learning_rate = 1e-3
local_steps = 2
batch_size = 2

[dpo]
rounds = 1
learning_rate = 5e-4
local_steps = 1
batch_size = 1
beta = 0.1

[strategy]
rule = {{ kind = "fed_avg_exact" }}
min_results = 2
round_timeout_s = 3600

[faults]
train_time_s = 3600
"#
        ),
    )
    .unwrap();
    config
}

/// `fedtune sim --config <config> --tiny --device <device> --parallel <parallel>` into `out`,
/// on the emulated GPU's libraries (`gpu`) when `device` is `cuda`.
fn sim(config: &Path, out: &Path, device: &str, parallel: &str, gpu: &Path) -> Output {
    let args = [
        "sim",
        "--config",
        config.to_str().unwrap(),
        "--tiny",
        "--device",
        device,
        "--parallel",
        parallel,
        "--output",
        out.to_str().unwrap(),
    ];
    fedtune(&args, (device == "cuda").then_some(gpu))
}

#[test]
fn a_simulated_federation_trains_side_by_side_on_the_emulated_gpu() {
    let Some(gpu) = emulator() else { return };
    let dir = tmpdir("emulated-gpu-sim");
    let config = sim_config(&dir, false);
    let run = |device: &str, parallel: &str| {
        let out = dir.join(format!("{device}-{parallel}"));
        let o = sim(&config, &out, device, parallel, &gpu);
        let adapter = std::fs::read(out.join("global/final/adapter_model.safetensors")).unwrap();
        let metrics: Vec<Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let events = std::fs::read_to_string(out.join("events.jsonl")).unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        (adapter, metrics, events, said)
    };
    let (one, metrics, _, _) = run("cuda", "1");
    assert_eq!(metrics.len(), 3, "base + 1 SFT round + 1 DPO round");
    let (two, _, events_two, stdout) = run("cuda", "2");
    assert!(
        one == two,
        "two jobs side by side on the GPU trained another global adapter"
    );
    // The first job is measured alone on the device; its peak sets how many fit.
    let memory: Vec<Value> = events_two
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["event"] == "job_memory")
        .collect();
    assert_eq!(memory.len(), 1, "{events_two}");
    assert_eq!(memory[0]["device"], "cuda", "{}", memory[0]);
    assert!(memory[0]["bytes"].as_u64().unwrap() > 0, "{}", memory[0]);
    assert!(stdout.contains("MiB of cuda memory"), "{stdout}");
    // The same federation on the CPU: the same held-out losses, round by round.
    let (_, cpu_metrics, _, _) = run("cpu", "1");
    let loss = |m: &[Value]| -> Vec<f64> {
        m.iter()
            .map(|r| r["global_eval_loss"].as_f64().unwrap())
            .collect()
    };
    same_losses("", &loss(&metrics), &loss(&cpu_metrics), 1e-4);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every round's global held-out loss on GPU clients within `rel` (relative) of the CPU's.
fn same_losses(label: &str, on_gpu: &[f64], on_cpu: &[f64], rel: f64) {
    for (g, c) in on_gpu.iter().zip(on_cpu) {
        println!("{label}global held-out loss: GPU {g}, CPU {c}");
        assert!((g - c).abs() <= rel * c.abs(), "GPU {g} vs CPU {c}");
    }
}

/// A DoRA federation (magnitudes in the global adapter) trained by GPU clients: the global
/// held-out loss of every round is the CPU federation's.
#[test]
fn a_dora_federation_on_the_emulated_gpu_follows_the_cpu() {
    let Some(gpu) = emulator() else { return };
    let dir = tmpdir("emulated-gpu-sim-dora");
    let config = sim_config(&dir, true);
    let run = |device: &str| {
        let out = dir.join(device);
        sim(&config, &out, device, "1", &gpu);
        let cfg = std::fs::read_to_string(out.join("global/final/adapter_config.json")).unwrap();
        assert!(cfg.contains("\"use_dora\": true"), "{cfg}");
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["global_eval_loss"].as_f64())
            .collect::<Option<Vec<f64>>>()
            .unwrap()
    };
    let (on_gpu, on_cpu) = (run("cuda"), run("cpu"));
    assert_eq!(on_gpu.len(), 3, "base + SFT round + DPO round");
    same_losses("DoRA ", &on_gpu, &on_cpu, 1e-6);
    let _ = std::fs::remove_dir_all(&dir);
}

/// SFT, GRPO and reward-model rounds with one client on the CPU and one on the GPU.
#[test]
fn a_cpu_client_and_a_gpu_client_federate_over_quic() {
    let Some(gpu) = emulator() else { return };
    let (dir, ca_dir, key) = fed_cli::federation_dir("emulated-gpu-fed");
    let names = ["hospital", "bank"];
    let mut entries = String::new();
    for n in names {
        entries += &fed_cli::issue(&ca_dir, n);
        entries += "\n";
    }
    let port = fed_cli::free_udp_port();
    let model = model();
    let data_dir = dir.join("coord-data");
    let coord_toml = dir.join("coord.toml");
    std::fs::write(
        &coord_toml,
        format!(
            r#"federation = "demo"
model = "{model}"
listen = "127.0.0.1:{port}"
data_dir = "{data}"
ca = "{ca}"
rounds = 1
rank = 4
lora_alpha = 8.0
min_results = 2
round_timeout_s = 1800
rule = {{ kind = "fed_avg_exact" }}
sampling = {{ fraction = 1.0, min_clients = 2 }}

[local]
learning_rate = 5e-3
local_steps = 2
batch_size = 2

{entries}
[[then]]
phase = "grpo"
rounds = 1
[then.local]
learning_rate = 1e-2
local_steps = 1
batch_size = 4
[then.local.grpo]
rewards = ['regex:^\s*[A-Z]']
num_generations = 4
max_completion_length = 3
beta = 0.04

[[then]]
phase = "reward"
rounds = 1
[then.local]
learning_rate = 1e-3
local_steps = 1
batch_size = 4
"#,
            model = model.display(),
            data = data_dir.display(),
            ca = ca_dir.display(),
        ),
    )
    .unwrap();
    let spawn = |args: &[&str], log: &Path, gpu: Option<&Path>| {
        let out = std::fs::File::create(log).unwrap();
        command(gpu)
            .args(args)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap()
    };
    let mut coord = spawn(
        &["coord", "--config", coord_toml.to_str().unwrap()],
        &dir.join("coord.out"),
        None,
    );
    let mut clients = Vec::new();
    for n in names {
        let toml = dir.join(format!("{n}.toml"));
        // The bank trains on the GPU, the hospital on the CPU.
        let device = if n == "bank" {
            "device = \"cuda\"\n"
        } else {
            ""
        };
        std::fs::write(
            &toml,
            format!(
                "federation = \"demo\"\ncoordinator = \"127.0.0.1:{port}\"\n{key}\nca = \"{}\"\n\
                 name = \"{n}\"\nmodel = \"{}\"\ntrain_data = \"{}\"\n\
                 preference_data = \"{}\"\nprompt_data = \"{}\"\n{device}",
                ca_dir.display(),
                model.display(),
                root().join(format!("testdata/demo/{n}.jsonl")).display(),
                root().join("testdata/demo/prefs.jsonl").display(),
                root().join("testdata/grpo/prompts.jsonl").display(),
                key = key.trim(),
            ),
        )
        .unwrap();
        let gpu = (n == "bank").then_some(gpu.as_path());
        clients.push(spawn(
            &["client", "--config", toml.to_str().unwrap()],
            &dir.join(format!("{n}.out")),
            gpu,
        ));
    }
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(s) = coord.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > std::time::Duration::from_secs(900) {
            let _ = coord.kill();
            for c in &mut clients {
                let _ = c.kill();
            }
            panic!(
                "the federation did not finish: {}",
                std::fs::read_to_string(dir.join("coord.out")).unwrap_or_default()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let log = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    assert!(status.success(), "{}", log("coord.out"));
    for (n, c) in names.iter().zip(&mut clients) {
        assert!(
            c.wait().unwrap().success(),
            "{n}: {}",
            log(&format!("{n}.out"))
        );
    }
    // Both updates of every round (SFT, GRPO, reward model) were accepted into its aggregate.
    let coord_out = log("coord.out");
    for round in 1..=3 {
        for n in names {
            assert!(
                coord_out.contains(&format!("round {round}: update of {n} accepted")),
                "{coord_out}"
            );
        }
        assert!(
            coord_out.contains(&format!("round {round} closed")),
            "{coord_out}"
        );
    }
    // The last global adapter is a reward model: LoRA factors and the score head.
    let cfg: Value =
        serde_json::from_str(&log("coord-data/store/global/000003/adapter_config.json"))
            .unwrap_or_else(|e| panic!("round 3's global adapter: {e}"));
    assert_eq!(cfg["task_type"], "SEQ_CLS", "{cfg}");
    // The bank's daemon trained on the (emulated) GPU, the hospital's on the CPU.
    let bank = log("bank.out");
    assert!(
        bank.contains("training on cuda:0 (fedtune CUDA emulator"),
        "{bank}"
    );
    assert!(!log("hospital.out").contains("training on cuda"));
    let _ = std::fs::remove_dir_all(&dir);
}
