//! GRPO's loss on the tiny reference model against TRL 1.16's own `GRPOTrainer._compute_loss`
//! (`testdata/grpo/make_reference.py`): for every loss type, with and without the KL
//! term, token- and sequence-level ratios, asymmetric clipping, `delta` and sampling
//! temperatures other than 1 — the per-token log-probabilities of the policy and of the
//! reference (the adapter disabled), the loss, TRL's clipping, KL and entropy metrics, and the
//! gradients of LoRA factors.

use burn::tensor::{DType, Device};
use fedtune_engine::train::grpo::{GrpoLossOptions, Rollout, completion_logps, grpo_step};
use fedtune_engine::train::step::{StepOptions, Trainable};
use fedtune_engine::{LlamaModel, PeftAdapter, load_model};
use serde_json::Value;

mod trl_common;

use trl_common::{assert_grads, close, testdata};

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn loss_metrics_and_gradients_equal_trls_grpo_trainer() {
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(testdata().join("grpo/reference.json")).unwrap(),
    )
    .unwrap();
    let loaded = load_model(
        &testdata().join("tiny-llama/model"),
        &Device::flex(),
        DType::F32,
    )
    .unwrap();
    let pad = loaded.tokenizer.pad_id;
    let mut model: LlamaModel = loaded.model;
    let adapter = PeftAdapter::load(&testdata().join("kto/policy_adapter")).unwrap();
    model.attach_adapter(&adapter).unwrap();
    let base = model.without_adapter();
    let cases = reference["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 11);
    for case in cases {
        let opts = GrpoLossOptions {
            loss_type: case["loss_type"].as_str().unwrap().parse().unwrap(),
            beta: case["beta"].as_f64().unwrap(),
            importance_sampling_level: serde_json::from_value(
                case["importance_sampling_level"].clone(),
            )
            .unwrap(),
            epsilon: case["epsilon"].as_f64().unwrap(),
            epsilon_high: case["epsilon_high"].as_f64(),
            delta: case["delta"].as_f64(),
            max_completion_length: case["max_completion_length"].as_u64().unwrap() as usize,
            temperature: case["temperature"].as_f64().unwrap(),
            ..Default::default()
        };
        let what = format!(
            "{:?} beta {} {:?} temperature {}",
            opts.loss_type, opts.beta, opts.importance_sampling_level, opts.temperature
        );
        let n = case["advantages"].as_array().unwrap().len();
        let mut rollouts: Vec<Rollout> = (0..n)
            .map(|i| Rollout {
                prompt: ids(&case["prompt_ids"][i]),
                completion: ids(&case["completion_ids"][i]),
                advantage: case["advantages"][i].as_f64().unwrap(),
                old: Some(floats(&case["old_logps"][i])),
                reference: None,
                masked: false,
            })
            .collect();
        // The policy's and the reference's per-token log-probabilities, as TRL computed them
        // (TRL left-pads the prompts: positions shift, RoPE's scores do not).
        let refs: Vec<&Rollout> = rollouts.iter().collect();
        let policy = completion_logps(&model, &refs, 4, pad, opts.temperature);
        let reference_lp = completion_logps(&base, &refs, 4, pad, opts.temperature);
        for i in 0..n {
            for (got, want) in [
                (&policy[i], floats(&case["policy_logps"][i])),
                (&reference_lp[i], floats(&case["reference_logps"][i])),
            ] {
                assert_eq!(got.len(), want.len(), "{what}: completion {i}");
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() < 2e-4,
                        "{what}: completion {i}: {g} vs TRL {w}"
                    );
                }
            }
        }
        if opts.beta != 0.0 {
            for (r, lp) in rollouts.iter_mut().zip(reference_lp) {
                r.reference = Some(lp);
            }
        }
        let micro = vec![rollouts.iter().collect::<Vec<_>>()];
        let out = grpo_step(
            &model,
            &micro,
            &opts,
            &Trainable::lora(),
            &StepOptions::default(),
            pad,
        )
        .unwrap();
        println!("{what}: loss {} vs TRL {}", out.loss, case["loss"]);
        close(
            &format!("{what}: loss"),
            out.loss,
            case["loss"].as_f64().unwrap(),
            2e-5,
        );
        for (k, v) in case["metrics"].as_object().unwrap() {
            let got = *out
                .metrics
                .get(k)
                .unwrap_or_else(|| panic!("{what}: no metric {k} in {:?}", out.metrics));
            close(&format!("{what}: {k}"), got, v.as_f64().unwrap(), 1e-4);
        }
        assert_grads(&what, &out.grads, &case["grads"], 2e-4);
    }
}

/// GRPO end to end on the tiny model: prompts, sampled groups, a reward with variance within
/// the groups (the completion starts with a capital letter), and training that raises the mean reward.
#[test]
fn grpo_training_raises_the_reward() {
    use fedtune_engine::rewards::Rewards;
    use fedtune_engine::train::grpo::{GrpoObjective, GrpoOptions, GrpoPrompt};
    use fedtune_engine::train::lora::init_adapter;
    use fedtune_engine::train::sft::{RunOptions, train};
    use fedtune_engine::train::{NoCallback, TrainConfig};
    let loaded = load_model(
        &testdata().join("tiny-llama/model"),
        &Device::flex(),
        DType::F32,
    )
    .unwrap();
    let tok = std::sync::Arc::new(loaded.tokenizer);
    let mut m = loaded.model;
    let prompts: Vec<GrpoPrompt> = ["Clinical note: fever.", "Note: cough.", "Patient: rash."]
        .iter()
        .map(|t| GrpoPrompt {
            ids: tok.encode_with_special(t).unwrap(),
            text: t.to_string(),
            messages: None,
            fields: Default::default(),
        })
        .collect();
    let cfg = TrainConfig {
        lora_r: 8,
        lora_alpha: 16.0,
        learning_rate: 2e-2,
        max_steps: Some(30),
        per_device_train_batch_size: 8,
        ..Default::default()
    };
    let a = init_adapter(&m, &cfg);
    m.attach_weights(&a, 0.0).unwrap();
    let options = GrpoOptions {
        num_generations: 8,
        max_completion_length: 3,
        loss_type: "grpo".parse().unwrap(),
        ..Default::default()
    };
    options.validate(8).unwrap();
    assert!(options.validate(12).unwrap_err().contains("multiple"));
    let objective = GrpoObjective::new(
        prompts,
        Rewards::parse(&["regex:^\\s*[A-Z]".into()], &[]).unwrap(),
        options,
        8,
        tok.pad_id,
        tok.eos_id.into_iter().collect(),
        tok.clone(),
        1,
    );
    let mut before = 0.0;
    for _ in 0..4 {
        before += objective.mean_reward(&m).unwrap() / 4.0;
    }
    let run = RunOptions {
        config: &cfg,
        output: None,
        resume: None,
        cancel: None,
    };
    train(&mut m, &run, &objective, &mut NoCallback).unwrap();
    let mut after = 0.0;
    for _ in 0..4 {
        after += objective.mean_reward(&m).unwrap() / 4.0;
    }
    println!("GRPO mean reward {before:.3} -> {after:.3}");
    assert!(after > before + 0.1, "{before} -> {after}");
}
