//! The SFT loop on the tiny reference model: LoRA starts at the base model, training overfits
//! a handful of examples, resuming continues the same loss curve, accumulation equals a larger
//! batch, cancellation checkpoints, and a saved adapter reloads to identical logits.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use burn::tensor::{DType, Device};
use fedtune_engine::data::{Dataset, LoadOptions};
use fedtune_engine::train::TrainConfig;
use fedtune_engine::train::lora::{init_adapter, to_peft};
use fedtune_engine::train::sft::{LogEntry, NoCallback, SftRun, train_sft};
use fedtune_engine::weights::to_f32_vec;
use fedtune_engine::{Encoded, LlamaModel, LoadedModel, PeftAdapter, load_model};

fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata")
}

fn tiny() -> LoadedModel {
    load_model(
        &testdata().join("tiny-llama/model"),
        &Device::flex(),
        DType::F32,
    )
    .unwrap()
}

fn examples(m: &LoadedModel) -> Vec<Encoded> {
    let d = Dataset::load(
        &testdata().join("formats/openai.jsonl"),
        LoadOptions::default(),
    )
    .unwrap();
    let mut v = d.encode_sft(&m.tokenizer, None).unwrap();
    let d = Dataset::load(
        &testdata().join("formats/alpaca.json"),
        LoadOptions::default(),
    )
    .unwrap();
    v.extend(d.encode_sft(&m.tokenizer, None).unwrap());
    v
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fedtune-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn config() -> TrainConfig {
    TrainConfig {
        lora_r: 8,
        lora_alpha: 16.0,
        learning_rate: 5e-3,
        max_steps: Some(6),
        per_device_train_batch_size: 2,
        ..Default::default()
    }
}

fn with_adapter(m: &mut LlamaModel, cfg: &TrainConfig) {
    let a = init_adapter(m, cfg);
    m.attach_weights(&a, cfg.lora_dropout).unwrap();
}

fn run(
    m: &mut LlamaModel,
    seqs: &[Encoded],
    cfg: &TrainConfig,
    out: Option<&std::path::Path>,
    resume: Option<&std::path::Path>,
) -> Vec<LogEntry> {
    let r = SftRun {
        config: cfg,
        train: seqs,
        eval: &[],
        pad: 2,
        output: out,
        resume,
        cancel: None,
    };
    let mut log = Vec::new();
    struct Keep<'a>(&'a mut Vec<LogEntry>);
    impl fedtune_engine::train::Callback for Keep<'_> {
        fn on_log(&mut self, e: &LogEntry, _: &fedtune_engine::train::TrainerState) {
            self.0.push(e.clone());
        }
    }
    train_sft(m, &r, &mut Keep(&mut log)).unwrap();
    log
}

#[test]
fn lora_b_is_zero_at_init_so_the_first_forward_equals_the_base_model() {
    let mut m = tiny();
    let ids: Vec<u32> = (10..30).collect();
    let base = to_f32_vec(m.model.forward(&ids, 1, ids.len()).into_data());
    with_adapter(&mut m.model, &config());
    let with = to_f32_vec(m.model.forward(&ids, 1, ids.len()).into_data());
    assert_eq!(base, with);
}

#[test]
fn a_few_dozen_steps_overfit_a_handful_of_examples() {
    let mut m = tiny();
    let seqs = examples(&m);
    let cfg = TrainConfig {
        lora_r: 16,
        lora_alpha: 32.0,
        learning_rate: 1e-2,
        max_steps: Some(40),
        per_device_train_batch_size: 8,
        max_grad_norm: 0.0,
        ..Default::default()
    };
    with_adapter(&mut m.model, &cfg);
    let log = run(&mut m.model, &seqs, &cfg, None, None);
    let first = log.first().unwrap().loss.unwrap();
    let last = log.last().unwrap().loss.unwrap();
    println!("loss {first:.3} -> {last:.4}");
    assert!(last < 0.05 * first && last < 0.5, "{first} -> {last}");
}

#[test]
fn resuming_from_a_checkpoint_gives_the_same_loss_curve() {
    let m0 = tiny();
    let seqs = examples(&m0);
    let cfg = TrainConfig {
        lora_dropout: 0.1,
        save_steps: Some(3),
        warmup_ratio: 0.2,
        ..config()
    };
    let mut a = tiny();
    with_adapter(&mut a.model, &cfg);
    let straight = run(&mut a.model, &seqs, &cfg, None, None);
    // Stop after 3 steps (a checkpoint is written at step 3), then resume in a fresh model.
    let out = tmp("resume");
    let mut b = tiny();
    with_adapter(&mut b.model, &cfg);
    let first = run(
        &mut b.model,
        &seqs,
        &TrainConfig {
            max_steps: Some(6),
            ..cfg.clone()
        },
        Some(&out),
        None,
    );
    let _ = first;
    let mut c = tiny();
    with_adapter(&mut c.model, &cfg);
    let resumed = run(
        &mut c.model,
        &seqs,
        &cfg,
        Some(&out),
        Some(&out.join("checkpoint-3")),
    );
    let losses = |l: &[LogEntry]| {
        l.iter()
            .map(|e| (e.step, e.loss.unwrap().to_bits()))
            .collect::<Vec<_>>()
    };
    assert_eq!(losses(&resumed), losses(&straight)[3..].to_vec());
    assert_eq!(
        to_f32_vec(
            a.model
                .param("model.layers.1.mlp.down_proj.lora_B")
                .unwrap()
                .into_data()
        ),
        to_f32_vec(
            c.model
                .param("model.layers.1.mlp.down_proj.lora_B")
                .unwrap()
                .into_data()
        ),
        "the adapters after 6 steps are identical"
    );
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    assert_eq!(
        log.lines().count(),
        6,
        "the resumed log continues the first one"
    );
}

#[test]
fn gradient_accumulation_equals_a_larger_batch() {
    let m0 = tiny();
    let seqs: Vec<Encoded> = examples(&m0).into_iter().take(4).collect();
    let big = TrainConfig {
        per_device_train_batch_size: 4,
        max_steps: Some(1),
        ..config()
    };
    let acc = TrainConfig {
        per_device_train_batch_size: 2,
        gradient_accumulation_steps: 2,
        max_steps: Some(1),
        ..config()
    };
    let mut a = tiny();
    with_adapter(&mut a.model, &big);
    let la = run(&mut a.model, &seqs, &big, None, None);
    let mut b = tiny();
    with_adapter(&mut b.model, &acc);
    let lb = run(&mut b.model, &seqs, &acc, None, None);
    let (x, y) = (la[0].loss.unwrap(), lb[0].loss.unwrap());
    assert!((x - y).abs() < 1e-5 * x.abs(), "{x} vs {y}");
    let name = "model.layers.0.self_attn.q_proj.lora_B";
    let pa = to_f32_vec(a.model.param(name).unwrap().into_data());
    let pb = to_f32_vec(b.model.param(name).unwrap().into_data());
    let d = pa
        .iter()
        .zip(&pb)
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max);
    assert!(d < 1e-6, "{d}");
}

#[test]
fn cancellation_saves_a_checkpoint_and_stops() {
    let mut m = tiny();
    let seqs = examples(&m);
    let cfg = config();
    with_adapter(&mut m.model, &cfg);
    let out = tmp("cancel");
    let cancel = AtomicBool::new(true);
    let r = SftRun {
        config: &cfg,
        train: &seqs,
        eval: &[],
        pad: 2,
        output: Some(&out),
        resume: None,
        cancel: Some(&cancel),
    };
    let s = train_sft(&mut m.model, &r, &mut NoCallback).unwrap();
    assert!(s.cancelled && s.steps == 0);
    assert!(out.join("checkpoint-0/trainer_state.json").exists());
}

#[test]
fn saved_adapter_reloads_to_identical_logits() {
    let mut m = tiny();
    let seqs = examples(&m);
    let cfg = config();
    with_adapter(&mut m.model, &cfg);
    run(&mut m.model, &seqs, &cfg, None, None);
    let ids: Vec<u32> = (100..140).collect();
    let trained = to_f32_vec(m.model.forward(&ids, 1, ids.len()).into_data());
    let dir = tmp("adapter");
    to_peft(&m.model, &cfg, None).save(&dir).unwrap();
    let mut fresh = tiny();
    fresh
        .model
        .attach_adapter(&PeftAdapter::load(&dir).unwrap())
        .unwrap();
    let reloaded = to_f32_vec(fresh.model.forward(&ids, 1, ids.len()).into_data());
    assert_eq!(trained, reloaded);
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg_json["r"], 8);
    assert_eq!(cfg_json["task_type"], "CAUSAL_LM");
}

/// Every trained tensor of `m`, in f32, by name.
fn lora_params(m: &LlamaModel) -> Vec<(String, Vec<f32>)> {
    m.linears()
        .into_iter()
        .flat_map(|(n, _)| [format!("{n}.lora_A"), format!("{n}.lora_B")])
        .map(|n| {
            let v = to_f32_vec(m.param(&n).unwrap().into_data());
            (n, v)
        })
        .collect()
}

/// fp16 loss scaling is exact where nothing overflows: the loss is scaled by a power of two
/// and the step divides it out, so an f32 run with the scaler trains the same bits as one
/// without (the GPU runs this same loop over f16 activations).
#[test]
fn loss_scaling_without_overflow_changes_no_bit() {
    let m0 = tiny();
    let seqs = examples(&m0);
    let plain = TrainConfig {
        lora_dropout: 0.1,
        max_grad_norm: 0.5,
        ..config()
    };
    let scaled = TrainConfig {
        fp16: true,
        fp16_growth_interval: 2,
        ..plain.clone()
    };
    let (mut a, mut b) = (tiny(), tiny());
    with_adapter(&mut a.model, &plain);
    with_adapter(&mut b.model, &scaled);
    let la = run(&mut a.model, &seqs, &plain, None, None);
    let lb = run(&mut b.model, &seqs, &scaled, None, None);
    let curve = |l: &[LogEntry]| {
        l.iter()
            .map(|e| (e.loss.unwrap().to_bits(), e.grad_norm.unwrap().to_bits()))
            .collect::<Vec<_>>()
    };
    assert_eq!(curve(&la), curve(&lb));
    assert_eq!(lora_params(&a.model), lora_params(&b.model));
    // 2^16, doubling every 2 steps without overflow: 2^16, 2^16, 2^17, 2^17, 2^18, 2^18.
    let scales: Vec<f64> = lb.iter().map(|e| e.loss_scale.unwrap()).collect();
    assert_eq!(
        scales,
        [16, 16, 17, 17, 18, 18].map(|e| 2f64.powi(e)).to_vec()
    );
    assert!(la.iter().all(|e| e.loss_scale.is_none()));
}

/// A loss scale the gradients overflow at skips the step (nothing changes: parameters,
/// moments, the optimiser's step count), halves the scale and logs a null gradient norm, until
/// the scale fits; training then goes on, and a resumed run keeps the scaler's state.
#[test]
fn an_overflowing_loss_scale_skips_steps_and_backs_off() {
    let m0 = tiny();
    let seqs = examples(&m0);
    let cfg = TrainConfig {
        fp16: true,
        // 2^130 is past f32's range: the first steps overflow for certain.
        fp16_init_scale: 2f64.powi(130),
        max_steps: Some(8),
        save_steps: Some(2),
        ..config()
    };
    let mut m = tiny();
    with_adapter(&mut m.model, &cfg);
    let before = lora_params(&m.model);
    let out = tmp("fp16-overflow");
    let log = run(&mut m.model, &seqs, &cfg, Some(&out), None);
    assert_eq!(log.len(), 8);
    let skipped = log
        .iter()
        .take_while(|e| e.grad_norm.is_none_or(|g| !g.is_finite()))
        .count();
    assert!(
        skipped >= 3,
        "at least 2^130..2^128 overflow: {skipped} skipped"
    );
    assert!(skipped < 8, "the scale came down within 8 steps");
    let mut exp = 130;
    for e in &log {
        assert!(e.loss.unwrap().is_finite(), "the loss itself is unscaled");
        assert_eq!(e.loss_scale, Some(2f64.powi(exp)), "step {}", e.step);
        if e.grad_norm.is_none_or(|g| !g.is_finite()) {
            exp -= 1;
        }
    }
    println!("{skipped} steps skipped at first; the scale ends at 2^{exp}");
    // The skipped steps left the adapter as it was; the later ones trained it.
    let mut first = tiny();
    with_adapter(&mut first.model, &cfg);
    run(
        &mut first.model,
        &seqs,
        &TrainConfig {
            max_steps: Some(skipped as u64),
            save_steps: None,
            ..cfg.clone()
        },
        None,
        None,
    );
    assert_eq!(lora_params(&first.model), before);
    assert_ne!(lora_params(&m.model), before);
    // The log file writes a skipped step's norm as null.
    let text = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    assert!(
        text.lines().next().unwrap().contains("\"grad_norm\":null"),
        "{text}"
    );
    // Resuming from the checkpoint after the back-off goes on with the same scale and bits.
    let at = 2 * skipped.div_ceil(2) as u64;
    let mut r = tiny();
    with_adapter(&mut r.model, &cfg);
    let resumed = run(
        &mut r.model,
        &seqs,
        &cfg,
        Some(&tmp("fp16-overflow-resumed")),
        Some(&out.join(format!("checkpoint-{at}"))),
    );
    let tail = |l: &[LogEntry]| {
        l.iter()
            .map(|e| (e.step, e.loss.unwrap().to_bits(), e.loss_scale))
            .collect::<Vec<_>>()
    };
    assert_eq!(tail(&resumed), tail(&log)[at as usize..].to_vec());
    assert_eq!(lora_params(&r.model), lora_params(&m.model));
}
