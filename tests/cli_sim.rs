//! `fedtune sim` and `fedtune gen-clinical` as users run them: the quickstart's pipeline with
//! `--tiny` writes metrics, global adapters, plots and the HTML report, and the global adapter
//! beats the base model on every hospital's held-out notes; the generator reproduces the
//! committed quickstart data; a bad config names the field.

use std::path::PathBuf;
use std::process::{Command, Output};

#[path = "support/tensorboard.rs"]
mod tensorboard;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fedtune-cli-sim-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fedtune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fedtune"))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap()
}

#[test]
fn the_quickstart_runs_on_the_tiny_model_and_beats_the_base_everywhere() {
    let out = tmpdir("quickstart");
    let o = fedtune(&[
        "sim",
        "--config",
        "examples/quickstart/federation.toml",
        "--tiny",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        metrics.len(),
        5,
        "base + 2 SFT rounds + 1 DPO round + 1 GRPO round"
    );
    assert_eq!(metrics[1]["phase"], "sft");
    assert_eq!(metrics[3]["phase"], "dpo");
    assert_eq!(metrics[4]["phase"], "grpo");
    // Every hospital trained its GRPO round on its own notes, scored by the plan's rewards.
    let grpo = &metrics[4];
    assert_eq!(grpo["used"].as_array().unwrap().len(), 4, "{grpo}");
    assert!(grpo["metrics"]["reward"].as_f64().is_some(), "{grpo}");
    let base = &metrics[0]["clients"];
    let last = &metrics[4]["clients"];
    for k in 0..4 {
        let (b, a) = (
            base[k]["global_eval_loss"].as_f64().unwrap(),
            last[k]["global_eval_loss"].as_f64().unwrap(),
        );
        assert!(a < b, "{}: {b} -> {a}", base[k]["name"]);
    }
    for p in [
        "report.html",
        "plots/global_eval_loss.png",
        "plots/client_eval_loss.png",
        "global/final/adapter_model.safetensors",
        "global/round-004/adapter_config.json",
        "rounds.jsonl",
    ] {
        assert!(out.join(p).is_file(), "{p} missing");
    }
    // report_to = "tensorboard": every round's record as scalars at its round.
    let scalars = tensorboard::scalars(&out);
    let global: Vec<(i64, f32)> = scalars
        .iter()
        .filter(|(t, _, _)| t == "federation/global_eval_loss")
        .map(|(_, s, v)| (*s, *v))
        .collect();
    let want: Vec<(i64, f32)> = metrics
        .iter()
        .map(|m| {
            (
                m["round"].as_i64().unwrap(),
                m["global_eval_loss"].as_f64().unwrap() as f32,
            )
        })
        .collect();
    assert_eq!(global, want);
    assert!(
        scalars
            .iter()
            .any(|(t, s, _)| t == "clients/st-mary-cardiology/global_eval_loss" && *s == 4),
        "{scalars:?}"
    );
    let png = std::fs::read(out.join("plots/global_eval_loss.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    for s in [
        "data:image/png;base64,",
        "st-mary-cardiology",
        "Failures",
        "JSON validity",
        // Each percentage beside its number of held-out examples, from the base model through
        // each stage's last global adapter.
        "% of 8</td>",
        "field accuracy, base → SFT → DPO → GRPO",
    ] {
        assert!(html.contains(s), "report lacks {s}");
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn gen_clinical_reproduces_the_committed_quickstart_data() {
    let out = tmpdir("gen");
    let o = fedtune(&["gen-clinical", "--output", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for h in [
        "st-mary-cardiology",
        "riverside-pediatrics",
        "northgate-oncology",
        "harbor-emergency",
    ] {
        for f in [
            "train.jsonl",
            "eval.jsonl",
            "prefs.jsonl",
            "eval_prefs.jsonl",
        ] {
            let want =
                std::fs::read(root().join("examples/quickstart/data").join(h).join(f)).unwrap();
            let got = std::fs::read(out.join(h).join(f)).unwrap();
            assert!(want == got, "{h}/{f} differs from the committed file");
        }
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_bad_config_names_the_file_and_field() {
    let dir = tmpdir("bad");
    let cfg = dir.join("federation.toml");
    let text = std::fs::read_to_string(root().join("examples/quickstart/federation.toml"))
        .unwrap()
        .replace("train_time_s = 120", "train_time_s = 120\ndropout = 1.5");
    std::fs::write(&cfg, text).unwrap();
    let o = fedtune(&["sim", "--config", cfg.to_str().unwrap(), "--tiny"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("federation.toml") && err.contains("faults.dropout"),
        "{err}"
    );
    std::fs::write(&cfg, "name = \"x\"\nclients = 2\nbogus = 1\n").unwrap();
    let o = fedtune(&["sim", "--config", cfg.to_str().unwrap(), "--tiny"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("bogus"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `scripts/gpu_sim.toml` (what scripts/gpu_check.sh runs on a GPU with 1 and 4 jobs side by
/// side) runs here with `--device cpu`: two jobs side by side train the same global adapter as
/// one at a time, byte for byte; `--device` and `--parallel` are checked like the config's
/// fields.
#[test]
fn the_gpu_check_federation_runs_with_device_and_parallel_overrides() {
    let run = |parallel: &str| {
        let out = tmpdir(&format!("gpu-sim-{parallel}"));
        let o = fedtune(&[
            "sim",
            "--config",
            "scripts/gpu_sim.toml",
            "--tiny",
            "--device",
            "cpu",
            "--parallel",
            parallel,
            "--output",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let adapter = std::fs::read(out.join("global/final/adapter_model.safetensors")).unwrap();
        let rounds = std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count();
        let _ = std::fs::remove_dir_all(&out);
        (adapter, rounds)
    };
    let (one, rounds) = run("1");
    assert_eq!(rounds, 4, "base + 2 SFT rounds + 1 DPO round");
    let (two, _) = run("2");
    assert!(one == two, "parallel 2 trained a different global adapter");
    for (flag, value, says) in [
        ("--device", "tpu", "device"),
        ("--parallel", "0", "parallel"),
    ] {
        let o = fedtune(&[
            "sim",
            "--config",
            "scripts/gpu_sim.toml",
            "--tiny",
            flag,
            value,
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(says) && err.contains(flag),
            "{flag} {value}: {err}"
        );
    }
}
