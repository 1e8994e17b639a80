//! `federation.toml` runs on the tiny model through the real engine: five clients complete
//! their rounds and the same seed gives byte-identical global adapters; 30% dropout still
//! completes; two Byzantine clients out of ten wreck FedAvg while trimmed mean stays within
//! 5% of the honest run; a coordinator restart mid-run ends exactly as an uninterrupted run.

use fedtune_engine::LoadedModel;
use fedtune_sim::SimConfig;
use fedtune_sim::run::{Progress, SimOutcome, prepare_clients, run_memory};

mod common;

use common::{root, tiny};

/// A config over `testdata/demo/<file>` split IID among `clients`, plus `extra` TOML.
fn config(clients: usize, rounds: u64, rule: &str, faults: &str) -> SimConfig {
    let text = format!(
        r#"
name = "test-sim"
seed = 3
clients = {clients}

[model]
path = "{model}"
rank = 4
lora_alpha = 8

[data]
train = "{data}"
eval_fraction = 0.25
max_seq_length = 256

[sft]
rounds = {rounds}
learning_rate = 5e-3
local_steps = 3
batch_size = 4

[strategy]
rule = {rule}

[faults]
{faults}
"#,
        model = root().join("testdata/tiny-llama/model").display(),
        data = root().join("testdata/demo/helpdesk.jsonl").display(),
    );
    let mut c: SimConfig = toml::from_str(&text).unwrap();
    c.resolve(&root());
    c.check().unwrap();
    c
}

fn run(cfg: &SimConfig, m: &LoadedModel) -> SimOutcome {
    let clients = prepare_clients(cfg, m).unwrap();
    run_memory(cfg, m, clients, None, &mut |_| {}).unwrap()
}

fn final_loss(o: &SimOutcome) -> f64 {
    o.rounds.last().unwrap()["global_eval_loss"]
        .as_f64()
        .unwrap()
}

fn base_loss(o: &SimOutcome) -> f64 {
    o.rounds[0]["global_eval_loss"].as_f64().unwrap()
}

#[test]
fn five_clients_complete_and_the_same_seed_gives_identical_adapters() {
    let m = tiny();
    let cfg = config(5, 2, r#"{ kind = "fed_avg_exact" }"#, "");
    let a = run(&cfg, &m);
    assert_eq!(a.rounds.len(), 3, "base + 2 rounds");
    for r in &a.rounds[1..] {
        assert_eq!(r["used"].as_array().unwrap().len(), 5, "{r}");
        for c in r["clients"].as_array().unwrap() {
            assert_eq!(c["status"], "accepted", "{c}");
            assert!(c["upload_bytes"].as_u64().unwrap() > 0);
        }
    }
    assert!(
        final_loss(&a) < base_loss(&a),
        "{} -> {}",
        base_loss(&a),
        final_loss(&a)
    );
    let b = run(&cfg, &m);
    assert_eq!(
        a.global_bytes, b.global_bytes,
        "same seed, different adapters"
    );
    let mut other = cfg.clone();
    other.seed = 4;
    let c = run(&other, &m);
    assert_ne!(a.global_bytes, c.global_bytes, "the seed changes nothing");
}

#[test]
fn clients_trained_side_by_side_under_a_memory_budget_give_the_same_adapters() {
    let m = tiny();
    let serial = config(4, 2, r#"{ kind = "fed_avg_exact" }"#, "");
    let mut side_by_side = serial.clone();
    side_by_side.parallel = 2;
    side_by_side.memory_budget_mb = Some(16 << 10);
    let a = run(&serial, &m);
    let mut notes = Vec::new();
    let clients = prepare_clients(&side_by_side, &m).unwrap();
    let b = run_memory(&side_by_side, &m, clients, None, &mut |p| {
        if let Progress::Note(s) = p {
            notes.push(s);
        }
    })
    .unwrap();
    assert_eq!(a.global_bytes, b.global_bytes);
    // The first job ran alone and its measured peak is recorded and said once (where the
    // peak can be reset: Linux's /proc/self/clear_refs).
    if std::fs::write("/proc/self/clear_refs", "5").is_ok() {
        let measured: Vec<_> = b
            .events
            .iter()
            .filter(|e| e["event"] == "job_memory")
            .collect();
        assert_eq!(measured.len(), 1, "{:?}", b.events);
        assert_eq!(measured[0]["device"], "host");
        assert!(measured[0]["bytes"].as_u64().unwrap() > 0);
        let k = measured[0]["side_by_side"].as_u64().unwrap();
        assert!((1..=2).contains(&k), "{k}");
        let said: Vec<_> = notes
            .iter()
            .filter(|n| n.starts_with("one training job peaks at"))
            .collect();
        assert_eq!(said.len(), 1, "{notes:?}");
        assert!(said[0].ends_with(&format!("host memory: up to {k} side by side")));
    }
}

#[test]
fn rounds_complete_with_30_percent_dropout_and_stragglers() {
    let m = tiny();
    let mut cfg = config(
        10,
        3,
        r#"{ kind = "fed_avg_exact" }"#,
        "dropout = 0.3\nstraggler = 0.2\nstraggler_delay_s = 900\ntrain_time_s = 60",
    );
    cfg.strategy.min_results = Some(4);
    cfg.strategy.round_timeout_s = 600.0;
    let o = run(&cfg, &m);
    assert_eq!(o.rounds.len(), 4);
    let dropouts = o.events.iter().filter(|e| e["event"] == "dropout").count();
    assert!(dropouts >= 3, "{dropouts} dropouts in 30 client-rounds");
    let used: Vec<usize> = o.rounds[1..]
        .iter()
        .map(|r| r["used"].as_array().unwrap().len())
        .collect();
    assert!(used.iter().all(|&u| u >= 4), "{used:?}");
    assert!(
        used.iter().any(|&u| u < 10),
        "nobody missed a round: {used:?}"
    );
    assert!(final_loss(&o) < base_loss(&o));
    println!("updates used per round with 30% dropout: {used:?}; {dropouts} dropouts");
}

#[test]
fn two_byzantine_clients_of_ten_wreck_fedavg_but_not_trimmed_mean() {
    let m = tiny();
    let byz = "[[faults.byzantine]]\nclient = 1\nattack = { kind = \"sign_flip\", scale = 4.0 }\n\
               [[faults.byzantine]]\nclient = 6\nattack = { kind = \"sign_flip\", scale = 4.0 }";
    let fedavg = r#"{ kind = "fed_avg_exact" }"#;
    let trimmed = r#"{ kind = "trimmed_mean", beta = 0.2 }"#;
    let honest = final_loss(&run(&config(10, 2, fedavg, ""), &m));
    let attacked_fedavg = final_loss(&run(&config(10, 2, fedavg, byz), &m));
    let attacked_trimmed = final_loss(&run(&config(10, 2, trimmed, byz), &m));
    let base = base_loss(&run(&config(10, 1, fedavg, ""), &m));
    println!(
        "global held-out loss: base {base:.4}, honest FedAvg {honest:.4}, \
         2/10 sign-flip: FedAvg {attacked_fedavg:.4}, trimmed mean {attacked_trimmed:.4}"
    );
    assert!(
        (attacked_trimmed - honest).abs() <= 0.05 * honest,
        "trimmed mean {attacked_trimmed} vs honest {honest}"
    );
    assert!(
        attacked_fedavg > honest * 1.05,
        "FedAvg under attack {attacked_fedavg} vs honest {honest}"
    );
}

#[test]
fn malformed_and_misconfigured_clients_are_rejected_with_reasons() {
    let m = tiny();
    let faults = "[[faults.byzantine]]\nclient = 0\nattack = { kind = \"nan\" }\n\
                  [[faults.byzantine]]\nclient = 1\nattack = { kind = \"replay\" }\n\
                  [[faults.byzantine]]\nclient = 2\nattack = { kind = \"wrong_base\" }";
    let mut cfg = config(5, 2, r#"{ kind = "fed_avg_exact" }"#, faults);
    cfg.strategy.min_results = Some(2);
    cfg.strategy.round_timeout_s = 300.0;
    let o = run(&cfg, &m);
    assert_eq!(o.rounds.len(), 3);
    let r2 = &o.rounds[2]["clients"];
    assert_eq!(r2[0]["status"], "rejected");
    assert!(
        r2[0]["reason"].as_str().unwrap().contains("NaN")
            || r2[0]["reason"].as_str().unwrap().contains("finite"),
        "{}",
        r2[0]
    );
    assert_eq!(
        r2[1]["status"], "rejected",
        "the replayed update: {}",
        r2[1]
    );
    assert_eq!(r2[2]["status"], "declined", "{}", r2[2]);
    assert!(r2[2]["reason"].as_str().unwrap().contains("base model"));
    for k in [3, 4] {
        assert_eq!(r2[k]["status"], "accepted");
    }
    let used = o.rounds[2]["used"].as_array().unwrap();
    assert_eq!(used.len(), 2, "{used:?}");
    println!("rejections: {:?}", o.rejections);
}

#[test]
fn three_clients_over_quic_complete_and_beat_the_base() {
    let m = tiny();
    let mut cfg = config(3, 2, r#"{ kind = "fed_avg_exact" }"#, "");
    cfg.transport = fedtune_sim::config::Transport::Quic;
    let out = std::env::temp_dir().join(format!("fedtune-sim-quic-{}", std::process::id()));
    let clients = prepare_clients(&cfg, &m).unwrap();
    let o = fedtune_sim::quic::run_quic(&cfg, &m, clients, &out, &mut |_| {}).unwrap();
    assert_eq!(o.rounds.len(), 3);
    for r in &o.rounds[1..] {
        assert_eq!(r["used"].as_array().unwrap().len(), 3, "{r}");
    }
    assert!(final_loss(&o) < base_loss(&o));
    assert!(out.join("coord-data/store/state").is_file());
    assert!(out.join("global/final/adapter_model.safetensors").is_file());
    // Faults are the memory transport's: asking for them over QUIC is an error.
    let mut faulty = cfg.clone();
    faulty.faults.dropout = 0.1;
    let clients = prepare_clients(&faulty, &m).unwrap();
    let e = fedtune_sim::quic::run_quic(&faulty, &m, clients, &out, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("memory"), "{e}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_coordinator_restart_mid_run_ends_as_an_uninterrupted_run() {
    let m = tiny();
    let plain = config(4, 3, r#"{ kind = "fed_avg_exact" }"#, "");
    let restarted = config(
        4,
        3,
        r#"{ kind = "fed_avg_exact" }"#,
        "coordinator_restart_round = 2",
    );
    let a = run(&plain, &m);
    let b = run(&restarted, &m);
    assert!(
        b.events.iter().any(|e| e["event"] == "coordinator_restart"),
        "no restart happened"
    );
    assert_eq!(a.global_bytes, b.global_bytes);
    assert_eq!(b.rounds.len(), 4);
}

#[test]
fn a_negative_noise_std_and_an_unknown_device_are_config_errors_and_cuda_trains_or_says_why_not() {
    let mut c = config(2, 1, r#"{ kind = "fed_avg_exact" }"#, "");
    c.faults.byzantine.push(fedtune_sim::config::Byzantine {
        client: 1,
        attack: fedtune_sim::config::Attack::Noise { std: -0.5 },
    });
    let e = c.check().unwrap_err();
    assert!(
        e.contains("faults.byzantine") && e.contains("noise std"),
        "{e}"
    );
    let mut c = config(2, 1, r#"{ kind = "fed_avg_exact" }"#, "");
    c.device = Some("tpu".into());
    let e = c.check().unwrap_err();
    assert!(e.starts_with("device:") && e.contains("tpu"), "{e}");
    // On a machine without a GPU the run stops naming the device; with one, it trains there.
    c.device = Some("cuda".into());
    c.check().unwrap();
    let m = tiny();
    let clients = prepare_clients(&c, &m).unwrap();
    match run_memory(&c, &m, clients, None, &mut |_| {}) {
        Ok(o) => assert!(final_loss(&o).is_finite()),
        Err(e) => assert!(e.to_string().starts_with("device:"), "{e}"),
    }
}

/// The README's server optimisers are set in `[strategy]`: FedAvgM with η = 1 and no momentum is
/// plain aggregation, FedAdam (Flower's spelling `fedadam`, defaults for β and τ) moves the
/// global adapter elsewhere and still trains, and a bad value is an error naming the field.
#[test]
fn server_optimizers_are_configured_in_the_strategy_section() {
    let m = tiny();
    let rule = r#"{ kind = "fed_avg_exact" }"#;
    let plain = run(&config(2, 2, rule, ""), &m);
    let with = |opt: &str| config(2, 2, &format!("{rule}\nserver_optimizer = {opt}"), "");
    let unit = run(
        &with(r#"{ kind = "fed_avg_m", lr = 1.0, momentum = 0.0 }"#),
        &m,
    );
    let adam_cfg = with(r#"{ kind = "fedadam", lr = 0.001 }"#);
    assert_eq!(
        adam_cfg.strategy.server_optimizer,
        Some(fedtune_aggregation::optim::ServerOptimizer::FedAdam {
            lr: 0.001,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3
        })
    );
    let adam = run(&adam_cfg, &m);
    let diff = |a: &SimOutcome, b: &SimOutcome| -> f32 {
        let mut worst = 0f32;
        for (name, fa) in &a.global.modules {
            let fb = &b.global.modules[name];
            let (da, db) = (fa.b.matmul(&fa.a), fb.b.matmul(&fb.a));
            for (x, y) in da.data.iter().zip(&db.data) {
                worst = worst.max((x - y).abs());
            }
        }
        worst
    };
    let (same, moved) = (diff(&unit, &plain), diff(&adam, &plain));
    println!("FedAvgM(1, 0) vs plain: {same:e}; FedAdam vs plain: {moved:e}");
    assert!(same < 1e-6, "{same}");
    assert!(moved > 1e-4, "{moved}");
    assert!(final_loss(&adam).is_finite() && final_loss(&adam) < base_loss(&adam));
    let mut bad = with(r#"{ kind = "fed_yogi", lr = 0.01 }"#);
    bad.strategy.server_optimizer = Some(fedtune_aggregation::optim::ServerOptimizer::FedYogi {
        lr: 0.01,
        beta1: 1.5,
        beta2: 0.99,
        tau: 1e-3,
    });
    let e = bad.check().unwrap_err();
    assert!(e.contains("strategy.server_optimizer.beta1"), "{e}");
    let e = toml::from_str::<SimConfig>(
        "name = \"x\"\n[model]\npath = \"m\"\nrank = 4\nlora_alpha = 8\n[data]\n[sft]\nrounds = 1\n\
         learning_rate = 1e-3\nlocal_steps = 1\n[strategy]\nrule = { kind = \"fed_avg_exact\" }\n\
         server_optimizer = { kind = \"fed_adam\" }\n",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("lr"), "{e}");
}

#[test]
fn a_dora_federation_trains_magnitudes_and_directions_and_beats_the_base() {
    use fedtune_engine::train::{TrainConfig, lora::init_adapter};
    let m = tiny();
    let mut cfg = config(3, 2, r#"{ kind = "fed_avg_exact" }"#, "");
    cfg.model.use_dora = true;
    let out = run(&cfg, &m);
    for r in &out.rounds[1..] {
        assert_eq!(r["used"].as_array().unwrap().len(), 3, "{r}");
    }
    assert!(
        final_loss(&out) < base_loss(&out),
        "{} -> {}",
        base_loss(&out),
        final_loss(&out)
    );
    // The global carries a trained magnitude for every module (PEFT's starting value is the
    // base weight's row norms).
    let start = init_adapter(
        &m.model,
        &TrainConfig {
            lora_r: 4,
            lora_alpha: 8.0,
            use_dora: true,
            ..TrainConfig::default()
        },
    );
    let mags: Vec<&String> = out
        .global
        .dense
        .keys()
        .filter(|k| k.ends_with(".lora_magnitude_vector"))
        .collect();
    assert_eq!(mags.len(), out.global.modules.len());
    let moved = mags
        .iter()
        .map(|k| {
            out.global.dense[*k]
                .data
                .iter()
                .zip(&start.dense[*k].data)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max)
        })
        .fold(0f32, f32::max);
    assert!(moved > 1e-4, "magnitudes did not train: {moved}");
    let back = fedtune_protocol::peft::decode(
        &out.global_bytes,
        &fedtune_protocol::peft::Limits::default(),
        |_, _| 2.0,
    )
    .unwrap();
    assert!(fedtune_protocol::peft::is_dora(&back));
}

/// `[grpo]`: its settings are checked with the field named, and each client's GRPO prompts are
/// its SFT training examples up to the answer, the answer as the `reference` field.
#[test]
fn grpo_settings_are_checked_and_prompts_come_from_each_clients_sft_examples() {
    let grpo = |extra: &str| -> fedtune_sim::config::GrpoSection {
        toml::from_str(&format!(
            "rounds = 1\nlearning_rate = 1e-5\nlocal_steps = 1\nnum_generations = 4\n{extra}"
        ))
        .unwrap()
    };
    let mut c = config(2, 1, r#"{ kind = "fed_avg_exact" }"#, "");
    for (extra, want) in [
        (
            "rewards = [\"json_valid\"]\nbatch_size = 6\n",
            "grpo.batch_size: 6 completions must be a multiple of num_generations (4",
        ),
        ("rewards = [\"nonsense\"]\n", "grpo.rewards: "),
        ("rewards = []\n", "grpo.rewards: name at least one reward"),
        (
            "rewards = [\"json_valid\"]\nloss_type = \"ppo\"\n",
            "grpo.loss_type: unknown loss_type `ppo`",
        ),
    ] {
        c.grpo = Some(grpo(extra));
        let e = c.check().unwrap_err();
        assert!(e.starts_with(want), "{extra}: {e}");
    }
    c.grpo = Some(grpo("rewards = [\"json_valid\", \"field_match\"]\n"));
    c.check().unwrap();
    let m = tiny();
    let clients = prepare_clients(&c, &m).unwrap();
    for cl in &clients {
        let p = &cl.data.prompts;
        assert!(!p.prompts.is_empty(), "{}", cl.name);
        assert_eq!(p.prompts.len(), cl.data.train.len(), "{}", cl.name);
        assert!(p.tokenizer.is_some() && !p.stop_ids.is_empty());
        for g in &p.prompts {
            let reference = g.fields["reference"].as_str().unwrap();
            assert!(!reference.is_empty());
            assert!(
                !g.text.contains(reference),
                "the answer is not in the prompt"
            );
            assert_eq!(g.ids, m.tokenizer.encode(&g.text).unwrap());
        }
    }
    // Without GRPO rounds no prompts are made.
    c.grpo = None;
    let clients = prepare_clients(&c, &m).unwrap();
    assert!(clients.iter().all(|cl| cl.data.prompts.prompts.is_empty()));
}
