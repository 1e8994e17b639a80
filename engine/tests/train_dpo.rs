//! Preference training on the tiny reference model: the step-0 DPO loss equals TRL/PEFT's
//! reference numbers, gradients of every loss type agree with finite differences of the loss
//! through the whole model, and training improves held-out pairs.

use std::path::PathBuf;

use burn::tensor::{DType, Device};
use fedtune_engine::data::{Dataset, LoadOptions};
use fedtune_engine::train::dpo::{DpoObjective, DpoOptions, LossType};
use fedtune_engine::train::lora::init_adapter;
use fedtune_engine::train::sft::{LogEntry, Objective, RunOptions, train};
use fedtune_engine::train::step::{StepOptions, Trainable};
use fedtune_engine::train::{Callback, TrainConfig, TrainerState};
use fedtune_engine::weights::to_f32_vec;
use fedtune_engine::{LoadedModel, PeftAdapter, load_model};

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

fn reference() -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(testdata().join("tiny-llama/reference.json")).unwrap(),
    )
    .unwrap()
}

fn pairs(
    m: &LoadedModel,
    file: &str,
    opts: &DpoOptions,
) -> Vec<fedtune_engine::tokenizer::EncodedPair> {
    let d = Dataset::load(&testdata().join(file), LoadOptions::default()).unwrap();
    d.encode_pairs(
        &m.tokenizer,
        Some(opts.max_prompt_length),
        Some(opts.max_length),
    )
    .unwrap()
    .0
}

#[test]
fn step_zero_loss_and_rewards_equal_the_reference() {
    let mut m = tiny();
    let adapter = PeftAdapter::load(&testdata().join("tiny-llama/adapter")).unwrap();
    m.model.attach_adapter(&adapter).unwrap();
    let r = reference();
    let opts = DpoOptions::default();
    let p = pairs(&m, "tiny-llama/dpo_pair.jsonl", &opts);
    for precompute in [false, true] {
        let o = DpoOptions {
            precompute_ref_log_probs: precompute,
            ..opts
        };
        let obj = DpoObjective::new(&m.model, o, p.clone(), Vec::new(), 1, 2);
        let (loss, metrics) = obj.metrics_on(&m.model, false);
        let want = r["dpo"]["loss"].as_f64().unwrap();
        assert!((loss - want).abs() < 1e-4, "{loss} vs {want}");
        let margin = r["dpo"]["reward_margin"].as_f64().unwrap();
        assert!((metrics["rewards/margins"] - margin).abs() < 1e-4);
        let pc = r["dpo"]["policy_chosen_logp"].as_f64().unwrap();
        assert!((metrics["logps/chosen"] - pc).abs() < 2e-3, "{metrics:?}");
        // The training path (hand-written forward) gives the same loss.
        let batches = obj.batches(&[0]);
        let out = obj
            .step(
                &m.model,
                &batches,
                &Trainable::lora(),
                &StepOptions::default(),
            )
            .unwrap();
        assert!((out.loss - want).abs() < 1e-4, "{} vs {want}", out.loss);
        assert_eq!(out.metrics["rewards/accuracies"], 0.0);
    }
}

#[test]
fn a_reference_with_its_adapter_starts_at_ln_2_and_stays_frozen() {
    // Federated DPO rounds: the reference is the model the round starts from, adapter included.
    let mut m = tiny();
    let adapter = PeftAdapter::load(&testdata().join("tiny-llama/adapter")).unwrap();
    m.model.attach_adapter(&adapter).unwrap();
    let r = reference();
    let margin = r["dpo"]["reward_margin"].as_f64().unwrap();
    let p = pairs(&m, "tiny-llama/dpo_pair.jsonl", &DpoOptions::default());
    for precompute in [false, true] {
        let o = DpoOptions {
            precompute_ref_log_probs: precompute,
            ..DpoOptions::default()
        };
        let obj = DpoObjective::against(&m.model, o, p.clone(), Vec::new(), 1, 2);
        let (loss, metrics) = obj.metrics_on(&m.model, false);
        assert!((loss - std::f64::consts::LN_2).abs() < 1e-6, "{loss}");
        assert!(metrics["rewards/margins"].abs() < 1e-6, "{metrics:?}");
        // A different policy (here the bare base) is measured against the frozen reference:
        // the roles of the reference test swapped, so the margin changes sign.
        let base = m.model.without_adapter();
        let (_, metrics) = obj.metrics_on(&base, false);
        assert!(
            (metrics["rewards/margins"] + margin).abs() < 1e-4,
            "{} vs {}",
            metrics["rewards/margins"],
            -margin
        );
    }
}

/// The loss along the negative gradient falls as the gradient's squared norm predicts.
#[test]
fn every_loss_type_has_the_gradient_of_its_loss() {
    let adapter = PeftAdapter::load(&testdata().join("tiny-llama/adapter")).unwrap();
    for loss_type in [
        LossType::Sigmoid,
        LossType::Ipo,
        LossType::Hinge,
        LossType::Simpo,
        LossType::Orpo,
    ] {
        let mut m = tiny();
        m.model.attach_adapter(&adapter).unwrap();
        let opts = DpoOptions {
            loss_type,
            beta: 0.1,
            label_smoothing: if loss_type == LossType::Sigmoid {
                0.1
            } else {
                0.0
            },
            ..DpoOptions::default()
        };
        let p = pairs(&m, "formats/prefs.jsonl", &opts);
        let n = p.len();
        let obj = DpoObjective::new(&m.model, opts, p, Vec::new(), n, 2);
        let order: Vec<usize> = (0..n).collect();
        let out = obj
            .step(
                &m.model,
                &obj.batches(&order),
                &Trainable::lora(),
                &StepOptions::default(),
            )
            .unwrap();
        let name = "model.layers.1.mlp.down_proj.lora_B";
        let g = out.grads[name].clone();
        let g2: f64 = to_f32_vec(g.clone().powf_scalar(2.0).sum().into_data())[0] as f64;
        assert!(g2 > 0.0, "{loss_type:?}: zero gradient");
        let at = |h: f64| {
            let mut q = m.model.clone();
            let w = q.param(name).unwrap();
            q.set_param(name, w + g.clone() * h);
            obj.metrics_on(&q, false).0
        };
        let h = 1e-2 / g2.sqrt();
        let fd = (at(h) - at(-h)) / (2.0 * h);
        assert!(
            (fd - g2).abs() < 2e-2 * g2.max(1e-3),
            "{loss_type:?}: directional derivative {fd} vs |g|² {g2}"
        );
    }
}

struct Keep(Vec<LogEntry>);
impl Callback for Keep {
    fn on_log(&mut self, e: &LogEntry, _: &TrainerState) {
        self.0.push(e.clone());
    }
}

#[test]
fn dpo_training_improves_held_out_pairs() {
    let mut m = tiny();
    let cfg = TrainConfig {
        lora_r: 8,
        lora_alpha: 16.0,
        learning_rate: 1e-2,
        max_steps: Some(12),
        per_device_train_batch_size: 6,
        eval_steps: Some(12),
        ..TrainConfig::default()
    };
    let a = init_adapter(&m.model, &cfg);
    m.model.attach_weights(&a, 0.0).unwrap();
    let opts = DpoOptions::default();
    let all = pairs(&m, "demo/prefs.jsonl", &opts);
    // Held out: every fourth pair (from all three sites).
    let (mut tr, mut ev) = (Vec::new(), Vec::new());
    for (i, p) in all.into_iter().enumerate() {
        if i % 4 == 3 { ev.push(p) } else { tr.push(p) }
    }
    let obj = DpoObjective::new(&m.model, opts, tr, ev, 6, m.tokenizer.pad_id);
    let (before, _) = obj.metrics_on(&m.model, true);
    assert!((before - std::f64::consts::LN_2).abs() < 1e-6, "{before}");
    let run = RunOptions {
        config: &cfg,
        output: None,
        resume: None,
        cancel: None,
    };
    let mut log = Keep(Vec::new());
    train(&mut m.model, &run, &obj, &mut log).unwrap();
    let train_losses: Vec<f64> = log.0.iter().filter_map(|e| e.loss).collect();
    let ev = log.0.iter().find(|e| e.eval_loss.is_some()).unwrap();
    assert!(ev.metrics.contains_key("eval_rewards/margins"), "{ev:?}");
    let after = ev.eval_loss.unwrap();
    assert!(
        after < before - 0.05,
        "held-out DPO loss {before} -> {after}; train {train_losses:?}"
    );
    assert!(ev.metrics["eval_rewards/accuracies"] > 0.5, "{ev:?}");
    assert!(ev.metrics["eval_rewards/margins"] > 0.1, "{ev:?}");
    assert!(log.0[0].metrics.contains_key("rewards/chosen"));
}
