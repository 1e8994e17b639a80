//! The daemons as users run them: `fedtune ca init/issue`, `fedtune coord --config`, three
//! `fedtune client --config` processes on loopback. The coordinator is killed with SIGKILL in
//! the middle of round 1 (two updates accepted, the third client gone), restarted from its data
//! directory, and the federation completes with both accepted updates used.

use serde_json::json;
#[path = "support/fed_cli.rs"]
mod fed_cli;
#[path = "support/tensorboard.rs"]
mod tensorboard;
use fed_cli::{federation_dir, fedtune, free_udp_port, issue};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn spawn(args: &[&str], log: &Path) -> Child {
    let out = std::fs::File::create(log).unwrap();
    let err = out.try_clone().unwrap();
    Command::new(env!("CARGO_BIN_EXE_fedtune"))
        .args(args)
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .unwrap()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn events(path: &Path, event: &str, round: u64) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == event && e["round"] == round)
        .collect()
}

#[test]
fn coordinator_killed_mid_round_resumes_and_the_federation_completes() {
    let (dir, ca, init) = federation_dir("cli-fed");
    let coordinator_key = init.trim().to_string();
    assert!(coordinator_key.starts_with("coordinator_key = "), "{init}");
    let names = ["hospital", "bank", "helpdesk"];
    let mut entries = String::new();
    for n in names {
        entries += &issue(&ca, n);
        entries += "\n";
    }
    let port = free_udp_port();
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bank_metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let model = root().join("testdata/tiny-llama/model");
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
rounds = 2
rank = 4
lora_alpha = 8.0
min_results = 2
round_timeout_s = 15
rule = {{ kind = "fed_avg_exact" }}
target_rank = 4
# Server momentum: its state is persisted and restored with the strategy's after the kill.
server_optimizer = {{ kind = "fedavgm", lr = 1.0, momentum = 0.5 }}
sampling = {{ fraction = 1.0, min_clients = 3 }}
metrics_listen = "127.0.0.1:{metrics_port}"

[local]
learning_rate = 5e-3
local_steps = 3
batch_size = 2
# Every client trains with these (the plan carries them).
gradient_accumulation_steps = 2
weight_decay = 0.01
max_grad_norm = 0.5

{entries}"#,
            model = model.display(),
            data = data_dir.display(),
            ca = ca.display(),
        ),
    )
    .unwrap();
    let client_toml = |n: &str| {
        let p = dir.join(format!("{n}.toml"));
        std::fs::write(
            &p,
            format!(
                r#"federation = "demo"
coordinator = "127.0.0.1:{port}"
{coordinator_key}
ca = "{ca}"
name = "{n}"
model = "{model}"
train_data = "{data}"
log = "{log}"
{local}"#,
                ca = ca.display(),
                model = model.display(),
                data = root().join(format!("testdata/demo/{n}.jsonl")).display(),
                log = dir.join(format!("{n}.log.jsonl")).display(),
                // One site trains its own way: QLoRA, checkpointing, a shorter maximum length,
                // a forced data format (its update is the same kind), and pins the LoRA
                // configuration it expects (the others take the plan's).
                // It also keeps each round's training log, with TensorBoard event files, and
                // serves its metrics.
                local = if n == "bank" {
                    format!(
                        "load_in_4bit = true\nbnb_4bit_use_double_quant = true\n\
                         gradient_checkpointing = true\nrank = 4\nlora_alpha = 8.0\n\
                         max_length = 512\nformat = \"openai\"\n\
                         output_dir = \"{}\"\nreport_to = \"tensorboard\"\n\
                         metrics_listen = \"127.0.0.1:{bank_metrics_port}\"\n",
                        dir.join("bank-runs").display()
                    )
                } else if n == "hospital" {
                    // Another trains on a bf16 base (the CPU's 16-bit training).
                    "dtype = \"bf16\"\n".to_string()
                } else {
                    String::new()
                },
            ),
        )
        .unwrap();
        p
    };
    let rounds = data_dir.join("rounds.jsonl");
    let coord_args = ["coord", "--config", coord_toml.to_str().unwrap()];
    let mut coord = spawn(&coord_args, &dir.join("coord.out"));
    let tomls: Vec<PathBuf> = names.iter().map(|n| client_toml(n)).collect();
    let client = |i: usize| {
        spawn(
            &["client", "--config", tomls[i].to_str().unwrap()],
            &dir.join(format!("client{i}.out")),
        )
    };
    let mut clients: Vec<Child> = (0..3).map(client).collect();
    // The third client disappears as soon as round 1 opens: the round stays open.
    wait_for("round 1 to open", Duration::from_secs(120), || {
        !events(&rounds, "round_open", 1).is_empty()
    });
    clients[2].kill().unwrap();
    clients[2].wait().unwrap();
    wait_for("two accepted updates", Duration::from_secs(120), || {
        events(&rounds, "accepted", 1).len() == 2
    });
    assert!(events(&rounds, "round_closed", 1).is_empty());
    let accepted: Vec<String> = events(&rounds, "accepted", 1)
        .iter()
        .map(|e| e["client"].as_str().unwrap().to_string())
        .collect();
    // `coord status` reads the running coordinator's store: round 1 open, two updates in,
    // the third client awaited, by name.
    let status = coord_status(&coord_toml);
    assert_eq!(status["completed_rounds"], 0, "{status}");
    assert_eq!(status["open_round"]["round"], 1, "{status}");
    assert_eq!(status["open_round"]["updates"].as_array().unwrap().len(), 2);
    assert_eq!(
        status["open_round"]["waiting"],
        json!(["helpdesk"]),
        "{status}"
    );
    // The bank client's own metrics: round 1 trained, uploaded and accepted, its loss.
    wait_for(
        "the bank client to count its accepted update",
        Duration::from_secs(60),
        || {
            try_metrics(bank_metrics_port)
                .is_some_and(|t| t.contains("fedtune_client_updates_accepted_total 1"))
        },
    );
    let text = metrics(bank_metrics_port);
    for line in [
        "fedtune_client_round 1",
        "fedtune_client_rounds_trained_total 1",
        "fedtune_client_train_seconds_count 1",
        "fedtune_client_uploads_total 1",
        "fedtune_client_connected 1",
        "fedtune_client_metric{name=\"train_loss\"}",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
    // Its local log has the same events, each with its time.
    let bank_log = std::fs::read_to_string(dir.join("bank.log.jsonl")).unwrap();
    let uploaded: Vec<serde_json::Value> = bank_log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "uploaded")
        .collect();
    assert_eq!(uploaded.len(), 1, "{bank_log}");
    assert_eq!(uploaded[0]["round"], 1);
    assert!(
        uploaded[0]["time"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    // Prometheus metrics of the running coordinator.
    let text = metrics(metrics_port);
    for line in ["fedtune_round_open 1", "fedtune_rounds_completed_total 0"] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
    // Two, or three while the coordinator has not yet noticed the killed client's silence.
    let connected: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("fedtune_clients_connected "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no fedtune_clients_connected in\n{text}"));
    assert!((2..=3).contains(&connected), "{text}");
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("fedtune_updates_accepted_total{client="))
            .count(),
        2,
        "{text}"
    );
    coord.kill().unwrap(); // SIGKILL
    coord.wait().unwrap();
    let mut coord = spawn(&coord_args, &dir.join("coord2.out"));
    let restarted = Instant::now();
    clients[2] = client(2);
    // The two clients still connected to the killed coordinator learn it at their next
    // keep-alive (a stateless reset from the restarted endpoint, whose reset key is derived from
    // the coordinator's identity) instead of QUIC's 60 s idle timeout: round 2 opens (it needs
    // all three) well within 30 s.
    wait_for(
        "round 2 to open after the restart",
        Duration::from_secs(30),
        || !events(&rounds, "round_open", 2).is_empty(),
    );
    println!(
        "every client back: round 2 opened {:.1} s after the restart",
        restarted.elapsed().as_secs_f64()
    );
    let status = {
        let t = Instant::now();
        loop {
            if let Some(s) = coord.try_wait().unwrap() {
                break s;
            }
            assert!(
                t.elapsed() < Duration::from_secs(300),
                "coordinator did not finish: {}",
                std::fs::read_to_string(dir.join("coord2.out")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(dir.join("coord2.out")).unwrap()
    );
    for (i, c) in clients.iter_mut().enumerate() {
        let s = c.wait().unwrap();
        assert!(
            s.success(),
            "client {i}: {}",
            std::fs::read_to_string(dir.join(format!("client{i}.out"))).unwrap()
        );
    }
    let hospital = std::fs::read_to_string(dir.join("client0.out")).unwrap();
    assert!(hospital.contains("frozen base in bf16"), "{hospital}");
    let closed = events(&rounds, "round_closed", 1);
    assert_eq!(closed.len(), 1);
    let used: Vec<String> = closed[0]["used"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    for a in &accepted {
        assert!(
            used.contains(a),
            "update of {a} lost in the restart: used {used:?}"
        );
    }
    assert_eq!(events(&rounds, "round_closed", 2).len(), 1);
    assert!(
        std::fs::read_to_string(dir.join("coord2.out"))
            .unwrap()
            .contains("resuming")
    );
    assert!(
        data_dir
            .join("store/global/000002/adapter_model.safetensors")
            .is_file()
    );
    // Round-log records carry their time and the clients' names; the console has a line each.
    let closed2 = &events(&rounds, "round_closed", 2)[0];
    assert!(
        closed2["time"].as_str().unwrap().ends_with('Z'),
        "{closed2}"
    );
    assert!(closed2["time_ms"].as_u64().is_some());
    assert!(
        closed2["used_names"]
            .as_array()
            .unwrap()
            .contains(&json!("hospital")),
        "{closed2}"
    );
    let console = std::fs::read_to_string(dir.join("coord2.out")).unwrap();
    assert!(
        console.contains("round 2 closed after") && console.contains("update of bank accepted"),
        "{console}"
    );
    // And the stopped one's: finished, every client named with its accepted rounds.
    let status = coord_status(&coord_toml);
    assert_eq!(status["completed_rounds"], 2, "{status}");
    assert_eq!(status["finished"], true);
    assert_eq!(status["global"]["round"], 2);
    assert!(
        status["accepted_rounds"]["helpdesk"].as_u64() >= Some(1),
        "{status}"
    );
    assert_eq!(status["accepted_rounds"]["hospital"], 2, "{status}");
    assert_eq!(status["last_closed"]["round"], 2);
    assert!(!status["last_closed"]["used"].as_array().unwrap().is_empty());
    let text = fedtune(&["coord", "status", "--config", coord_toml.to_str().unwrap()]);
    assert!(
        text.contains("federation demo: 2 of 2 rounds completed, finished"),
        "{text}"
    );
    // The bank kept each round's training log, and TensorBoard has the same losses.
    let mut rounds_logged = 0;
    for round in 1..=2 {
        let rd = dir.join(format!("bank-runs/round-{round:03}"));
        let Ok(text) = std::fs::read_to_string(rd.join("train_log.jsonl")) else {
            continue;
        };
        rounds_logged += 1;
        let logged: Vec<(i64, f32)> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter_map(|e| Some((e["step"].as_i64()?, e["loss"].as_f64()? as f32)))
            .collect();
        assert!(!logged.is_empty(), "round {round}: {text}");
        let board: Vec<(i64, f32)> = tensorboard::scalars(&rd)
            .into_iter()
            .filter(|(t, _, _)| t == "train/loss")
            .map(|(_, s, v)| (s, v))
            .collect();
        for l in &logged {
            assert!(board.contains(l), "round {round}: {l:?} not in {board:?}");
        }
    }
    assert!(
        rounds_logged >= 1,
        "no round's training log under bank-runs"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The text of `GET /metrics` on `127.0.0.1:port`.
fn metrics(port: u16) -> String {
    try_metrics(port).unwrap_or_else(|| panic!("no metrics on port {port}"))
}

/// The text of `GET /metrics` on `127.0.0.1:port`, if something answers 200 there.
fn try_metrics(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut reply = String::new();
    c.read_to_string(&mut reply).ok()?;
    reply.starts_with("HTTP/1.1 200 OK").then_some(reply)
}

/// `fedtune coord status --json` on `config`.
fn coord_status(config: &Path) -> serde_json::Value {
    let out = fedtune(&[
        "coord",
        "status",
        "--config",
        config.to_str().unwrap(),
        "--json",
    ]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// `fedtune coord` with `args`; its stderr (the run must fail).
fn coord_fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_fedtune"))
        .arg("coord")
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "coord {args:?} should fail: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// Operator mistakes are named by file and field, and a store with rounds but no state file is
/// not silently restarted at round 1.
#[test]
fn coordinator_config_mistakes_name_the_file_and_field_and_a_store_without_state_is_kept() {
    let (dir, ca, key) = federation_dir("cli-coord-err");
    let (a, b) = (issue(&ca, "a"), issue(&ca, "b"));
    let model = root().join("testdata/tiny-llama/model");
    // A client's local settings are checked with the file and field named.
    let client_toml = dir.join("a.toml");
    for (extra, want) in [
        ("format = \"nonsense\"\n", "format"),
        ("bnb_4bit_use_double_quant = true\n", "needs load_in_4bit"),
        ("max_length = 1\n", "max_length must be at least 2"),
        (
            "dtype = \"int8\"\n",
            "dtype = \"int8\": expected f32, bf16 or f16",
        ),
        (
            "dtype = \"bf16\"\ndevice = \"cuda\"\n",
            "dtype holds the frozen base in 16 bits on the CPU",
        ),
        (
            "gradient_accumulation_steps = 2\n",
            "gradient_accumulation_steps: the round plan sets it",
        ),
        (
            "teacher = \"/no/such/teacher\"\n",
            "teacher: loading /no/such/teacher",
        ),
    ] {
        std::fs::write(
            &client_toml,
            format!(
                "federation = \"demo\"\ncoordinator = \"127.0.0.1:9\"\n{}\nca = \"{}\"\n\
                 name = \"a\"\nmodel = \"{}\"\nrank = 4\nlora_alpha = 8.0\n\
                 train_data = \"{}\"\n{extra}",
                key.trim(),
                ca.display(),
                model.display(),
                root().join("testdata/demo/bank.jsonl").display()
            ),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_fedtune"))
            .args(["client", "--config", client_toml.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra}: {err}");
        assert!(
            err.contains(client_toml.to_str().unwrap()) && err.contains(want),
            "{extra}: {err}"
        );
    }
    let data_dir = dir.join("coord-data");
    let toml = dir.join("coord.toml");
    let write = |model: &Path, rank: u32, clients: &str| {
        std::fs::write(
            &toml,
            format!(
                r#"federation = "demo"
model = "{model}"
listen = "127.0.0.1:0"
data_dir = "{data}"
ca = "{ca}"
rounds = 1
rank = {rank}
lora_alpha = 8.0
min_results = 1
rule = {{ kind = "fed_avg_exact" }}

[local]
learning_rate = 5e-3
local_steps = 1
batch_size = 1

{clients}
"#,
                model = model.display(),
                data = data_dir.display(),
                ca = ca.display(),
            ),
        )
        .unwrap();
    };
    let config = ["--config", toml.to_str().unwrap()];
    let name = toml.display().to_string();
    write(&model, 4, &format!("{a}\n{a}"));
    let err = coord_fails(&config);
    assert!(
        err.contains(&name) && err.contains("clients: the name `a` is listed twice"),
        "{err}"
    );
    // The same key under two names.
    let twin = b.replace(
        b.lines().find(|l| l.starts_with("key")).unwrap(),
        a.lines().find(|l| l.starts_with("key")).unwrap(),
    );
    write(&model, 4, &format!("{a}\n{twin}"));
    let err = coord_fails(&config);
    assert!(
        err.contains("clients.b: its key is also another client's"),
        "{err}"
    );
    write(&model, 0, &format!("{a}\n{b}"));
    let err = coord_fails(&config);
    assert!(
        err.contains(&format!("{name}: rank must be positive")),
        "{err}"
    );
    write(&model, 4, &format!("{a}\n{b}"));
    let text = std::fs::read_to_string(&toml).unwrap();
    std::fs::write(
        &toml,
        text.replace("rounds = 1\n", "rounds = 1\nupload_memory_mb = 0\n"),
    )
    .unwrap();
    let err = coord_fails(&config);
    assert!(
        err.contains(&format!("{name}: upload_memory_mb must be positive")),
        "{err}"
    );
    // A distillation phase's settings are checked as TRL checks them.
    write(
        &model,
        4,
        &format!("[local.distill]\nbeta = 2.0\n\n{a}\n{b}"),
    );
    let text = std::fs::read_to_string(&toml).unwrap();
    std::fs::write(
        &toml,
        text.replace("rounds = 1\n", "rounds = 1\nphase = \"distill\"\n"),
    )
    .unwrap();
    let err = coord_fails(&config);
    assert!(
        err.contains(&format!("{name}: local.distill: beta must be in [0, 1]")),
        "{err}"
    );
    // A policy stage after a reward-model stage would train from the reward model.
    write(
        &model,
        4,
        &format!(
            "[[then]]\nphase = \"dpo\"\nrounds = 1\n[then.local]\nlearning_rate = 1e-5\n\
             local_steps = 1\nbatch_size = 1\n\n{a}\n{b}"
        ),
    );
    let text = std::fs::read_to_string(&toml).unwrap();
    std::fs::write(
        &toml,
        text.replacen("rounds = 1\n", "rounds = 1\nphase = \"reward\"\n", 1),
    )
    .unwrap();
    let err = coord_fails(&config);
    assert!(
        err.contains(&format!(
            "{name}: then[0].phase: a dpo stage cannot follow a reward stage"
        )),
        "{err}"
    );
    // The plan's local-training settings are checked with the table and field named.
    for (setting, want) in [
        ("warmup_ratio = 1.5", "local.warmup_ratio must be in [0, 1]"),
        (
            "gradient_accumulation_steps = 0",
            "local.gradient_accumulation_steps must be at least 1",
        ),
        ("loss_type = \"nonsense\"", "local.loss_type: unknown"),
    ] {
        write(&model, 4, &format!("{a}\n{b}"));
        let text = std::fs::read_to_string(&toml).unwrap();
        std::fs::write(
            &toml,
            text.replace("batch_size = 1\n", &format!("batch_size = 1\n{setting}\n")),
        )
        .unwrap();
        let err = coord_fails(&config);
        assert!(err.contains(&format!("{name}: {want}")), "{setting}: {err}");
    }
    write(&dir.join("no-such-model"), 4, &format!("{a}\n{b}"));
    let err = coord_fails(&config);
    assert!(err.contains(&format!("{name}: model: hashing")), "{err}");
    // A store holding a global adapter but no state file.
    write(&model, 4, &format!("{a}\n{b}"));
    let global = data_dir.join("store/global/000001");
    std::fs::create_dir_all(&global).unwrap();
    std::fs::write(global.join("adapter_model.safetensors"), b"kept").unwrap();
    let err = coord_fails(&config);
    assert!(
        err.contains("no `state` file") && err.contains("--new-federation"),
        "{err}"
    );
    assert!(
        global.join("adapter_model.safetensors").is_file(),
        "nothing removed"
    );
    // With --new-federation the old store is moved aside (the run then stops at the missing
    // CA certificate, removed here so that it does not start serving).
    std::fs::remove_file(ca.join("ca.pem")).unwrap();
    let mut args = config.to_vec();
    args.push("--new-federation");
    let err = coord_fails(&args);
    assert!(err.contains("ca.pem"), "{err}");
    let aside: Vec<_> = std::fs::read_dir(&data_dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("store.old-"))
        .collect();
    assert_eq!(aside.len(), 1);
    assert!(
        aside[0]
            .path()
            .join("global/000001/adapter_model.safetensors")
            .is_file()
    );
    // A missing identity file is named as missing.
    std::fs::remove_file(ca.join("coordinator.id")).unwrap();
    let err = coord_fails(&config);
    assert!(
        err.contains("reading identity key") && err.contains("coordinator.id"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
