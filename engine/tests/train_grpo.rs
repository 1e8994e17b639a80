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

/// A group's rollouts packed in one row that runs their prompt once (each completion sees the
/// prompt and itself) get the log-probabilities and LoRA gradients of separate rows, with the
/// masked rollout left out of both and fewer tokens run.
#[test]
fn a_group_sharing_its_prompt_in_one_row_gets_the_numbers_of_separate_rows() {
    use fedtune_engine::train::batches::shares_prefixes;
    use fedtune_engine::train::grpo::rollout_batch;
    use fedtune_engine::train::step::{backward, forward};
    use fedtune_engine::weights::to_f32_vec;
    let loaded = load_model(
        &testdata().join("tiny-llama/model"),
        &Device::flex(),
        DType::F32,
    )
    .unwrap();
    let tok = &loaded.tokenizer;
    let pad = tok.pad_id;
    let mut model: LlamaModel = loaded.model.clone();
    let adapter = PeftAdapter::load(&testdata().join("kto/policy_adapter")).unwrap();
    model.attach_adapter(&adapter).unwrap();
    let a = tok
        .encode("Note: fever for two days, cough. Extract JSON:")
        .unwrap();
    let b = tok.encode("Triage: chest pain.").unwrap();
    let c = |s: &str| tok.encode(s).unwrap();
    let rollout = |prompt: &Vec<u32>, completion: Vec<u32>, masked: bool| Rollout {
        prompt: prompt.clone(),
        completion,
        advantage: 0.0,
        old: None,
        reference: None,
        masked,
    };
    let rollouts = [
        rollout(&a, c(r#"{"dx": "flu"}"#), false),
        rollout(&a, c(r#"{"dx": "pneumonia", "days": 2}"#), false),
        rollout(&a, c("no"), true),
        rollout(&a, c(r#"{"dx""#), false),
        rollout(&b, c(r#"{"dx": "angina"}"#), false),
        rollout(&b, c("ECG now"), false),
    ];
    let refs: Vec<&Rollout> = rollouts.iter().collect();
    let run = |share: bool| {
        let batch = rollout_batch(&refs, pad, share);
        let fwd = forward(&model, &batch, &Trainable::lora(), &StepOptions::default());
        let mut logps = vec![Vec::new(); refs.len()];
        for (t, lp) in batch.targets.iter().zip(&fwd.target_logps) {
            logps[t.seq].push(*lp);
        }
        // A different upstream gradient per rollout and token (the same in both layouts).
        let mut seen = vec![0usize; refs.len()];
        let d: Vec<f32> = batch
            .targets
            .iter()
            .map(|t| {
                seen[t.seq] += 1;
                0.1 * (t.seq as f32 + 1.0) - 0.01 * (seen[t.seq] % 7) as f32
            })
            .collect();
        let grads = backward(&model, fwd, &d, &Trainable::lora());
        (batch.batch * batch.len, logps, grads)
    };
    // The host's attention takes shared prefixes; a sliding window rules them out.
    assert!(shares_prefixes(&model));
    let mut windowed = model.clone();
    windowed.config.sliding_window = vec![Some(8); windowed.config.num_hidden_layers];
    assert!(!shares_prefixes(&windowed));
    let (separate_tokens, separate, g_sep) = run(false);
    let (shared_tokens, shared, g_shared) = run(true);
    assert!(
        shared_tokens < separate_tokens,
        "{shared_tokens} vs {separate_tokens} tokens"
    );
    assert!(separate[2].is_empty() && shared[2].is_empty(), "masked");
    for (k, (s, p)) in separate.iter().zip(&shared).enumerate() {
        assert_eq!(s.len(), p.len(), "rollout {k}");
        for (x, y) in s.iter().zip(p) {
            assert!((x - y).abs() < 1e-5, "rollout {k}: {x} vs {y}");
        }
    }
    assert_eq!(g_sep.len(), g_shared.len());
    for (name, gs) in &g_sep {
        let (gs, gp) = (
            to_f32_vec(gs.clone().into_data()),
            to_f32_vec(g_shared[name].clone().into_data()),
        );
        let scale = gs.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        let diff = gs
            .iter()
            .zip(&gp)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff <= 1e-4 * scale, "{name}: {diff} of {scale}");
    }
}
