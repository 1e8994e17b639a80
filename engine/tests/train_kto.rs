//! KTO on the tiny reference model against TRL 1.16's own `KTOTrainer`
//! (`testdata/kto/make_reference.py`): the token ids it trains on, each batch's loss, its
//! metrics and LoRA gradients, for conversations and text prompts, `kto` and
//! `apo_zero_unpaired`, with unequal weights and a truncating `max_length`; and training
//! that lowers the loss.

use fedtune_engine::data::{Dataset, LoadOptions};
use fedtune_engine::train::kto::{KtoLoss, KtoObjective, KtoOptions};
use fedtune_engine::train::lora::init_adapter;
use fedtune_engine::train::sft::{Objective, RunOptions, train};
use fedtune_engine::train::step::{StepOptions, Trainable};
use fedtune_engine::train::{NoCallback, TrainConfig};
use fedtune_engine::{LlamaModel, PeftAdapter};
use serde_json::Value;

mod trl_common;

use trl_common::{assert_grads, close, testdata, tiny};

fn with_adapter(dir: &str) -> LlamaModel {
    let mut m = tiny().model;
    let a = PeftAdapter::load(&testdata().join(dir)).unwrap();
    m.attach_adapter(&a).unwrap();
    m
}

#[test]
fn loss_metrics_gradients_and_tokens_equal_trls_kto_trainer() {
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(testdata().join("kto/reference.json")).unwrap(),
    )
    .unwrap();
    let tok = tiny().tokenizer;
    // TRL's reference is a frozen copy of the adapter it was given; the policy moved from it.
    let ref_model = with_adapter("tiny-llama/adapter");
    let policy = with_adapter("kto/policy_adapter");
    let cases = reference["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for case in cases {
        let name = case["file"].as_str().unwrap();
        let batch = case["batch_size"].as_u64().unwrap() as usize;
        let opts = KtoOptions {
            beta: case["beta"].as_f64().unwrap(),
            desirable_weight: case["desirable_weight"].as_f64().unwrap(),
            undesirable_weight: case["undesirable_weight"].as_f64().unwrap(),
            loss_type: case["loss_type"].as_str().unwrap().parse().unwrap(),
            max_length: case["max_length"].as_u64().unwrap() as usize,
        };
        let what = format!("{name} {:?}", opts.loss_type);
        let data =
            Dataset::load(&testdata().join("kto").join(name), LoadOptions::default()).unwrap();
        let (examples, dropped) = data.encode_feedback(&tok, opts.max_length).unwrap();
        assert_eq!(dropped, 0);
        let objective = KtoObjective::against(
            &ref_model,
            opts,
            examples.clone(),
            Vec::new(),
            batch,
            tok.pad_id,
        );
        let order: Vec<usize> = (0..examples.len()).collect();
        let micro = objective.batches(&order);
        let want_batches = case["batches"].as_array().unwrap();
        assert_eq!(micro.len(), want_batches.len(), "{what}");
        for (mb, want) in micro.iter().zip(want_batches) {
            // The same ids and trained positions as TRL's collator.
            for (row, &k) in mb.examples.iter().enumerate() {
                let e = &examples[k];
                let seq = e.sequence_with(&e.completion, opts.max_length);
                let ids: Vec<u32> = want["input_ids"][row]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u32)
                    .collect();
                let mask: Vec<u8> = want["completion_mask"][row]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u8)
                    .collect();
                assert_eq!(seq.ids, ids, "{what}: row {row}");
                assert_eq!(seq.mask, mask, "{what}: row {row}");
                assert_eq!(e.label, want["label"][row].as_bool().unwrap());
            }
            let out = objective
                .step(
                    &policy,
                    std::slice::from_ref(mb),
                    &Trainable::lora(),
                    &StepOptions::default(),
                )
                .unwrap();
            println!("{what}: loss {} vs TRL {}", out.loss, want["loss"]);
            close(
                &format!("{what}: loss"),
                out.loss,
                want["loss"].as_f64().unwrap(),
                1e-5,
            );
            for (k, v) in want["metrics"].as_object().unwrap() {
                if k.starts_with("logits/") {
                    continue; // not computed by fedtune
                }
                let got = *out
                    .metrics
                    .get(k)
                    .unwrap_or_else(|| panic!("{what}: no metric {k}"));
                close(&format!("{what}: {k}"), got, v.as_f64().unwrap(), 1e-4);
            }
            assert_grads(&what, &out.grads, &want["grads"], 1e-4);
        }
    }
}

#[test]
fn kto_training_lowers_the_loss_and_options_are_checked() {
    let m0 = tiny();
    let opts = KtoOptions::default();
    let data = Dataset::load(&testdata().join("kto/chat.jsonl"), LoadOptions::default()).unwrap();
    let (examples, _) = data
        .encode_feedback(&m0.tokenizer, opts.max_length)
        .unwrap();
    let cfg = TrainConfig {
        lora_r: 8,
        lora_alpha: 16.0,
        learning_rate: 2e-2,
        max_steps: Some(12),
        per_device_train_batch_size: 3,
        ..Default::default()
    };
    let mut m = tiny().model;
    let a = init_adapter(&m, &cfg);
    m.attach_weights(&a, 0.0).unwrap();
    let objective = KtoObjective::new(opts, examples.clone(), examples, 3, m0.tokenizer.pad_id);
    let (before, _) = objective.metrics_on(&m, true);
    let run = RunOptions {
        config: &cfg,
        output: None,
        resume: None,
        cancel: None,
    };
    train(&mut m, &run, &objective, &mut NoCallback).unwrap();
    let (after, metrics) = objective.metrics_on(&m, true);
    println!("KTO loss {before:.4} -> {after:.4}, {metrics:?}");
    assert!(after < before - 0.05, "{before} -> {after}");
    assert!(metrics["rewards/margins"] > 0.0, "{metrics:?}");
    // A fresh adapter starts at the reference: zero rewards, loss = mean weight × (1 − σ(0)).
    assert!((before - 0.5).abs() < 1e-6, "{before}");
    let bad = KtoOptions {
        loss_type: KtoLoss::Kto,
        ..KtoOptions::default()
    };
    assert!(bad.validate(1).unwrap_err().contains("batch"));
    assert!(
        KtoOptions { beta: 0.0, ..bad }
            .validate(4)
            .unwrap_err()
            .contains("beta")
    );
}
