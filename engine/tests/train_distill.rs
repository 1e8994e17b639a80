//! Knowledge distillation against TRL 1.16's own `GKDTrainer` (`testdata/gkd/make_reference.py`):
//! `generalized_jsd_loss` and its gradient on fixed logits for several `beta` and temperatures;
//! on the tiny model, the ids and labels of TRL's ChatML collator, each batch's loss and the
//! LoRA gradients for `beta` 0.5, 0 and 1; and distillation (on-policy samples included) that
//! brings a fresh student closer to its teacher on held-out conversations.

use fedtune_engine::data::{Dataset, LoadOptions};
use fedtune_engine::train::distill::{DistillObjective, DistillOptions, generalized_jsd};
use fedtune_engine::train::lora::init_adapter;
use fedtune_engine::train::sft::{Objective, RunOptions, train};
use fedtune_engine::train::step::{StepOptions, Trainable};
use fedtune_engine::train::{NoCallback, TrainConfig};
use fedtune_engine::{LlamaModel, PeftAdapter};
use serde_json::Value;

mod trl_common;

use trl_common::{assert_grads, close, testdata, tiny};

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(testdata().join("gkd/reference.json")).unwrap())
        .unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|x| match x {
            Value::Array(_) => floats(x),
            _ => vec![x.as_f64().unwrap()],
        })
        .collect()
}

fn with_adapter() -> LlamaModel {
    let mut m = tiny().model;
    let a = PeftAdapter::load(&testdata().join("tiny-llama/adapter")).unwrap();
    m.attach_adapter(&a).unwrap();
    m
}

#[test]
fn generalized_jsd_and_its_gradient_equal_trls() {
    let r = reference();
    let f = &r["loss_function"];
    let (student, teacher) = (floats(&f["student"]), floats(&f["teacher"]));
    let labels: Vec<i64> = floats(&f["labels"]).iter().map(|v| *v as i64).collect();
    let vocab = 7;
    let kept = labels.iter().filter(|l| **l != -100).count();
    for case in f["cases"].as_array().unwrap() {
        let beta = case["beta"].as_f64().unwrap();
        let temperature = case["temperature"].as_f64().unwrap();
        let what = format!("beta {beta}, temperature {temperature}");
        let mut grad = vec![0f32; student.len()];
        let mut loss = 0.0;
        for (p, l) in labels.iter().enumerate() {
            if *l == -100 {
                continue;
            }
            let row = p * vocab..(p + 1) * vocab;
            let s: Vec<f32> = student[row.clone()].iter().map(|v| *v as f32).collect();
            let t: Vec<f32> = teacher[row.clone()].iter().map(|v| *v as f32).collect();
            let scale = 1.0 / kept as f64;
            loss += generalized_jsd(&s, &t, beta, temperature, scale, &mut grad[row]) * scale;
        }
        println!("{what}: {loss} vs TRL {}", case["loss"]);
        close(&what, loss, case["loss"].as_f64().unwrap(), 1e-6);
        for (i, (g, w)) in grad.iter().zip(floats(&case["grad"])).enumerate() {
            assert!(
                (*g as f64 - w).abs() < 1e-6,
                "{what}: grad[{i}] {g} vs TRL {w}"
            );
        }
    }
}

#[test]
fn loss_gradients_and_tokens_equal_trls_gkd_trainer() {
    let r = reference();
    let tok = tiny().tokenizer;
    let teacher = tiny().model;
    let student = with_adapter();
    let data = Dataset::load(&testdata().join("gkd/chat.jsonl"), LoadOptions::default()).unwrap();
    let cases = r["trainer"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for case in cases {
        let beta = case["beta"].as_f64().unwrap();
        let batch = case["batch_size"].as_u64().unwrap() as usize;
        let opts = DistillOptions {
            beta,
            lmbda: 0.0,
            ..DistillOptions::default()
        };
        let (examples, dropped) = data.encode_completions(&tok, opts.max_length).unwrap();
        assert_eq!(dropped, 0);
        let objective = DistillObjective::new(
            &teacher,
            student.config.vocab_size,
            opts,
            examples.clone(),
            Vec::new(),
            batch,
            tok.pad_id,
            vec![],
            0,
        )
        .unwrap();
        let order: Vec<usize> = (0..examples.len()).collect();
        let micro = Objective::<LlamaModel>::batches(&objective, &order);
        let want = case["batches"].as_array().unwrap();
        assert_eq!(micro.len(), want.len());
        for (k, (mb, want)) in micro.iter().zip(want).enumerate() {
            let what = format!("beta {beta}, batch {k}");
            for (row, &i) in mb.examples.iter().enumerate() {
                let seq = examples[i].sequence();
                let ids: Vec<u32> = floats(&want["input_ids"][row])
                    .iter()
                    .map(|v| *v as u32)
                    .collect();
                let mask: Vec<u8> = floats(&want["labels"][row])
                    .iter()
                    .map(|v| *v as u8)
                    .collect();
                assert_eq!(seq.ids, ids, "{what}: row {row}");
                assert_eq!(seq.mask, mask, "{what}: row {row}");
            }
            let out = objective
                .step(
                    &student,
                    std::slice::from_ref(mb),
                    &Trainable::lora(),
                    &StepOptions::default(),
                )
                .unwrap();
            println!("{what}: loss {} vs TRL {}", out.loss, want["loss"]);
            close(&what, out.loss, want["loss"].as_f64().unwrap(), 1e-5);
            assert_eq!(out.metrics["generated_fraction"], 0.0);
            assert_grads(&what, &out.grads, &want["grads"], 1e-4);
        }
    }
}

#[test]
fn distillation_brings_the_student_closer_on_held_out_data() {
    let loaded = tiny();
    let tok = loaded.tokenizer;
    // The teacher: the tiny model with the reference adapter; the student: the base model
    // with a fresh adapter (so it starts as the base model).
    let teacher = with_adapter();
    let data = Dataset::load(&testdata().join("gkd/chat.jsonl"), LoadOptions::default()).unwrap();
    let opts = DistillOptions {
        max_new_tokens: 6,
        ..DistillOptions::default()
    };
    let (mut examples, _) = data.encode_completions(&tok, opts.max_length).unwrap();
    let held_out = examples.split_off(3);
    let cfg = TrainConfig {
        lora_r: 8,
        lora_alpha: 16.0,
        learning_rate: 1e-2,
        max_steps: Some(20),
        per_device_train_batch_size: 3,
        ..Default::default()
    };
    let mut student = loaded.model;
    let a = init_adapter(&student, &cfg);
    student.attach_weights(&a, 0.0).unwrap();
    let stop = tok.eos_id.into_iter().collect();
    let objective = DistillObjective::new(
        &teacher,
        student.config.vocab_size,
        opts,
        examples,
        held_out,
        3,
        tok.pad_id,
        stop,
        7,
    )
    .unwrap();
    let before = objective.loss_on(&student, true);
    let run = RunOptions {
        config: &cfg,
        output: None,
        resume: None,
        cancel: None,
    };
    let summary = train(&mut student, &run, &objective, &mut NoCallback).unwrap();
    let after = objective.loss_on(&student, true);
    println!(
        "held-out divergence {before:.4} -> {after:.4}; {:?}",
        summary.final_loss
    );
    assert!(before > 0.05, "the student starts away from its teacher");
    assert!(after < before - 0.05, "{before} -> {after}");
}

#[test]
fn options_and_vocabularies_are_checked() {
    let teacher = tiny().model;
    let bad = |o: DistillOptions| o.validate().unwrap_err();
    let d = DistillOptions::default();
    assert!(bad(DistillOptions { beta: 1.5, ..d }).contains("beta"));
    assert!(bad(DistillOptions { lmbda: -0.1, ..d }).contains("lmbda"));
    assert!(
        bad(DistillOptions {
            temperature: 0.0,
            ..d
        })
        .contains("temperature")
    );
    assert!(
        bad(DistillOptions {
            max_new_tokens: 0,
            ..d
        })
        .contains("max_new_tokens")
    );
    let err = DistillObjective::new(&teacher, 1000, d, vec![], vec![], 1, 0, vec![], 0)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("share a tokenizer"), "{err}");
    // Plain text has no prompt.
    let dir = std::env::temp_dir().join(format!("fedtune-distill-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("text.jsonl");
    std::fs::write(&path, "{\"text\": \"just text\"}\n").unwrap();
    let data = Dataset::load(&path, LoadOptions::default()).unwrap();
    let err = data
        .encode_completions(&tiny().tokenizer, 64)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("text.jsonl") && err.contains("prompt"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
