//! Reward-model training on the tiny reference model against TRL 1.16's own `RewardTrainer`
//! (`testdata/reward/make_reference.py`): the token ids it scores, each batch's rewards, loss
//! (with and without `center_rewards_coefficient`), metrics and the gradients of the score head
//! and of LoRA factors, for text and conversations; the PEFT adapter round trip; and training
//! that raises the accuracy and lowers the loss.

use fedtune_engine::data::{Dataset, LoadOptions};
use fedtune_engine::train::lora::init_adapter;
use fedtune_engine::train::reward::{RewardObjective, RewardOptions};
use fedtune_engine::train::sft::{Objective, RunOptions, train};
use fedtune_engine::train::step::{StepOptions, Trainable};
use fedtune_engine::train::{NoCallback, TrainConfig};
use fedtune_engine::{LlamaModel, PeftAdapter};
use serde_json::Value;

mod trl_common;

use trl_common::{assert_grads, close, testdata, tiny};

fn start_model() -> LlamaModel {
    let mut m = tiny().model;
    let a = PeftAdapter::load(&testdata().join("reward/start_adapter")).unwrap();
    assert!(a.score().is_some());
    m.attach_adapter(&a).unwrap();
    m
}

#[test]
fn rewards_loss_metrics_and_gradients_equal_trls_reward_trainer() {
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(testdata().join("reward/reference.json")).unwrap(),
    )
    .unwrap();
    let tok = tiny().tokenizer;
    assert_eq!(
        u64::from(tok.pad_id),
        reference["pad_token_id"].as_u64().unwrap()
    );
    let model = start_model();
    for case in reference["cases"].as_array().unwrap() {
        let name = case["file"].as_str().unwrap();
        let batch = case["batch_size"].as_u64().unwrap() as usize;
        let options = RewardOptions {
            center_rewards_coefficient: case["center_rewards_coefficient"].as_f64(),
            ..RewardOptions::default()
        };
        let data = Dataset::load(
            &testdata().join("reward").join(name),
            LoadOptions::default(),
        )
        .unwrap();
        let (pairs, dropped) = data.encode_reward_pairs(&tok, Some(1024)).unwrap();
        assert_eq!(dropped, 0);
        let objective = RewardObjective::new(options, pairs.clone(), Vec::new(), batch, tok.pad_id);
        let order: Vec<usize> = (0..pairs.len()).collect();
        let micro = Objective::<LlamaModel>::batches(&objective, &order);
        let want_batches = case["batches"].as_array().unwrap();
        assert_eq!(micro.len(), want_batches.len(), "{name}");
        for (bi, (mb, want)) in micro.iter().zip(want_batches).enumerate() {
            let what = format!("{name} batch {bi}");
            // TRL's rows: every chosen sequence, then every rejected one.
            let n = mb.examples.len();
            for row in 0..2 * n {
                let p = &pairs[mb.examples[row % n]];
                let ids = if row < n { &p.chosen } else { &p.rejected };
                let want_ids: Vec<u32> = want["input_ids"][row]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u32)
                    .collect();
                assert_eq!(ids, &want_ids, "{what}: row {row}");
            }
            let out = objective
                .step(
                    &model,
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
                let got = *out
                    .metrics
                    .get(k)
                    .unwrap_or_else(|| panic!("{what}: no metric {k}"));
                close(&format!("{what}: {k}"), got, v.as_f64().unwrap(), 1e-4);
            }
            let chunk: Vec<_> = mb.examples.iter().map(|&i| pairs[i].clone()).collect();
            let rewards =
                fedtune_engine::train::reward::score_pairs(&model, &chunk, batch, tok.pad_id)
                    .unwrap();
            for (k, (c, r)) in rewards.iter().enumerate() {
                close(
                    &format!("{what}: reward of chosen {k}"),
                    *c,
                    want["rewards"][k].as_f64().unwrap(),
                    1e-4,
                );
                close(
                    &format!("{what}: reward of rejected {k}"),
                    *r,
                    want["rewards"][n + k].as_f64().unwrap(),
                    1e-4,
                );
            }
            assert_grads(&what, &out.grads, &want["grads"], 1e-4);
        }
    }
}

#[test]
fn reward_training_separates_the_pairs_and_saves_a_peft_sequence_classifier() {
    let m0 = tiny();
    let data = Dataset::load(
        &testdata().join("reward/text.jsonl"),
        LoadOptions::default(),
    )
    .unwrap();
    let (pairs, _) = data.encode_reward_pairs(&m0.tokenizer, None).unwrap();
    let cfg = TrainConfig {
        lora_r: 8,
        lora_alpha: 16.0,
        learning_rate: 1e-2,
        max_steps: Some(15),
        per_device_train_batch_size: 3,
        ..Default::default()
    };
    let mut m = tiny().model;
    let a = init_adapter(&m, &cfg);
    m.attach_weights(&a, 0.0).unwrap();
    m.init_score(7);
    let objective = RewardObjective::new(
        RewardOptions::default(),
        pairs.clone(),
        pairs,
        3,
        m0.tokenizer.pad_id,
    );
    let (before, mb) = objective.metrics_on(&m, true).unwrap();
    let run = RunOptions {
        config: &cfg,
        output: None,
        resume: None,
        cancel: None,
    };
    train(&mut m, &run, &objective, &mut NoCallback).unwrap();
    let (after, ma) = objective.metrics_on(&m, true).unwrap();
    println!(
        "reward loss {before:.4} -> {after:.4}, accuracy {} -> {}",
        mb["accuracy"], ma["accuracy"]
    );
    assert!(after < before - 0.1, "{before} -> {after}");
    assert_eq!(ma["accuracy"], 1.0, "{ma:?}");
    // The trained adapter, score head included, round-trips through PEFT's format.
    let dir = std::env::temp_dir().join(format!("fedtune-reward-{}", std::process::id()));
    let adapter = PeftAdapter {
        config: fedtune_engine::LoraConfig::new(8, 16.0),
        weights: m.lora_weights(),
        metadata: Default::default(),
    };
    adapter.save(&dir).unwrap();
    let cfg_json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg_json["task_type"], "SEQ_CLS");
    assert_eq!(cfg_json["modules_to_save"][1], "score");
    let mut back = tiny().model;
    back.attach_adapter(&PeftAdapter::load(&dir).unwrap())
        .unwrap();
    let (again, _) = objective.metrics_on(&back, true).unwrap();
    assert!((again - after).abs() < 1e-9, "{again} vs {after}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `reward_model:DIR` as a GRPO reward: the reward model on the base model scores prompt +
/// completion as `score_pairs` scores the same pair's chosen side (TRL tokenises a reward
/// model's conversations through the chat template in both trainers; text as prompt +
/// completion, where the EOS RewardTrainer appends is padding the score skips); an adapter
/// without a score head is refused.
#[test]
fn a_reward_model_scores_grpo_completions_as_it_scores_pairs() {
    use fedtune_engine::rewards::{RewardInput, Rewards};
    use fedtune_engine::train::reward::score_pairs;
    use serde_json::Map;
    let loaded = tiny();
    let tok = std::sync::Arc::new(loaded.tokenizer);
    let dir = testdata().join("reward/start_adapter");
    let mut rewards = Rewards::parse(&[format!("reward_model:{}", dir.display())], &[]).unwrap();
    // Loaded onto a model that carries another adapter: that one is left out.
    let mut base = loaded.model.clone();
    base.attach_adapter(&PeftAdapter::load(&testdata().join("tiny-llama/adapter")).unwrap())
        .unwrap();
    rewards.load_models(&base, &tok).unwrap();
    let rm = start_model();
    let none = Map::new();
    for file in ["reward/chat.jsonl", "reward/text.jsonl"] {
        let data = Dataset::load(&testdata().join(file), LoadOptions::default()).unwrap();
        let (pairs, _) = data.encode_reward_pairs(&tok, None).unwrap();
        let want = score_pairs(&rm, &pairs, 4, tok.pad_id).unwrap();
        let raw: Vec<Value> = std::fs::read_to_string(testdata().join(file))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let prompts: Vec<(
            String,
            Option<Vec<fedtune_engine::template::Message>>,
            String,
        )> = raw
            .iter()
            .map(|r| match &r["prompt"] {
                Value::String(p) => (p.clone(), None, r["chosen"].as_str().unwrap().to_string()),
                msgs => {
                    let m: Vec<fedtune_engine::template::Message> =
                        serde_json::from_value(msgs.clone()).unwrap();
                    let text = tok.render(&m, true).unwrap();
                    let c = r["chosen"][0]["content"].as_str().unwrap().to_string();
                    (text, Some(m), c)
                }
            })
            .collect();
        let inputs: Vec<RewardInput<'_>> = prompts
            .iter()
            .map(|(p, m, c)| RewardInput {
                prompt: p,
                messages: m.as_deref(),
                completion: c,
                fields: &none,
            })
            .collect();
        let got = rewards.score(&inputs).unwrap();
        assert_eq!(got.total.len(), want.len());
        for (k, (g, (w, _))) in got.each[0].iter().zip(&want).enumerate() {
            assert!(
                (f64::from(*g) - w).abs() < 1e-4,
                "{file} {k}: {g} vs the pair's {w}"
            );
        }
    }
    // An adapter without a score head is not a reward model.
    let mut not_rm = Rewards::parse(
        &[format!(
            "reward_model:{}",
            testdata().join("tiny-llama/adapter").display()
        )],
        &[],
    )
    .unwrap();
    let err = not_rm.load_models(&base, &tok).unwrap_err().to_string();
    assert!(err.contains("not a reward model"), "{err}");
    // Scoring before loading names the reward.
    let unloaded = Rewards::parse(&["reward_model:x".to_string()], &[]).unwrap();
    let i = RewardInput {
        prompt: "p",
        messages: None,
        completion: "c",
        fields: &none,
    };
    let err = unloaded.score(&[i]).unwrap_err().to_string();
    assert!(err.contains("reward_model:x"), "{err}");
}
