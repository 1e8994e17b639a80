//! Reward-model rounds through the real engine on the tiny model: the score head of a
//! federation that ends in reward stages passes through its earlier (SFT) rounds unchanged,
//! reward rounds train it with the LoRA factors on the client's preference pairs, and a round
//! without a head or without pairs is an error that says what is missing.

use std::path::PathBuf;

use burn::tensor::{DType, Device};
use fedtune_client::TrainJob;
use fedtune_client::trainer::{Base, LocalData, train_round};
use fedtune_engine::adapter::SCORE_KEY;
use fedtune_engine::data::{Dataset, LoadOptions};
use fedtune_engine::train::TrainConfig;
use fedtune_engine::train::lora::init_adapter;
use fedtune_engine::train::reward::add_score_head;
use fedtune_protocol::{Hyper, LoraPlan, Phase, RoundPlan};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn job(phase: Phase, global: fedtune_aggregation::Adapter) -> TrainJob {
    TrainJob {
        plan: RoundPlan {
            federation: "f".into(),
            round: 1,
            phase,
            hyper: Hyper {
                seed: 3,
                ..Hyper::new(1e-2, 3, 4)
            },
            lora: LoraPlan {
                rank: 4,
                lora_alpha: 8.0,
                target_modules: TrainConfig::default().target_modules,
            },
            global_digest: [0; 32],
            deadline_ms: 0,
        },
        global,
    }
}

#[test]
fn reward_rounds_train_the_score_head_and_other_rounds_pass_it_through() {
    let m = fedtune_engine::load_model(
        &root().join("testdata/tiny-llama/model"),
        &Device::flex(),
        DType::F32,
    )
    .unwrap();
    let load = |p: &str| Dataset::load(&root().join(p), LoadOptions::default()).unwrap();
    let data = LocalData {
        train: load("testdata/demo/hospital.jsonl")
            .encode_sft(&m.tokenizer, Some(256))
            .unwrap(),
        reward_pairs: load("testdata/demo/prefs.jsonl")
            .encode_reward_pairs(&m.tokenizer, None)
            .unwrap()
            .0,
        pad: m.tokenizer.pad_id,
        ..Default::default()
    };
    let lora = TrainConfig {
        lora_r: 4,
        lora_alpha: 8.0,
        seed: 3,
        ..TrainConfig::default()
    };
    let mut global = init_adapter(&m.model, &lora);
    add_score_head(&mut global, &m.model.config, 3);
    let head = global.dense[SCORE_KEY].clone();
    let base = Base::from(m.model.clone());

    // An SFT round trains the LoRA factors and hands the head back as it came.
    let sft = train_round(&base, &data, &job(Phase::Sft, global.clone())).unwrap();
    assert_eq!(sft.adapter.dense[SCORE_KEY], head);
    assert_ne!(sft.adapter.modules, global.modules);
    assert_eq!(sft.num_examples, data.train.len() as u64);

    // A reward round trains both, on the pairs, and reports the trained model's ranking.
    let reward = train_round(&base, &data, &job(Phase::Reward, global.clone())).unwrap();
    assert_ne!(reward.adapter.dense[SCORE_KEY], head);
    assert_ne!(reward.adapter.modules, global.modules);
    assert_eq!(reward.num_examples, 24);
    let names: Vec<&str> = reward.metrics.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        ["train_loss", "accuracy", "margin"],
        "{:?}",
        reward.metrics
    );

    // Without a head, or without pairs, the round says what is missing.
    let mut no_head = global.clone();
    no_head.dense.clear();
    let err = train_round(&base, &data, &job(Phase::Reward, no_head))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no score head"), "{err}");
    let no_pairs = LocalData {
        reward_pairs: Vec::new(),
        ..data.clone()
    };
    let err = train_round(&base, &no_pairs, &job(Phase::Reward, global))
        .unwrap_err()
        .to_string();
    assert!(err.contains("preference_data"), "{err}");
}
