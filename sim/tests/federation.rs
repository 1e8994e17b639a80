//! Whole federations in memory on the tiny model, every client training through the real
//! engine: rounds complete and the global adapter beats the base model on every client's
//! held-out data and loads as a PEFT adapter; a planted canary never leaves its client; a
//! coordinator killed mid-round resumes from what it persisted and ends with the same global
//! adapter as an uninterrupted run; hostile updates are rejected while honest ones are used.

use std::collections::BTreeSet;

use fedtune_aggregation::strategy::{Rule, StrategyConfig};
use fedtune_client::trainer::Base;
use fedtune_client::trainer::LocalData;
use fedtune_client::{Client, ClientConfig};
use fedtune_coordinator::{CoordConfig, Coordinator, RoundClosed, RoundEvent};
use fedtune_engine::eval::sft_loss;
use fedtune_engine::train::TrainConfig;
use fedtune_engine::train::lora::{init_adapter, lora_config};
use fedtune_engine::{LoadedModel, PeftAdapter};
use fedtune_protocol::{Digest, Hyper, Identity, LoraPlan, Phase, PublicKey, digest, plan_hash};
use fedtune_sim::{Federation, SimClient};

const T0: u64 = 1_700_000_000_000;
const CANARY: &str = "CANARY-7f3a9c";

mod common;

use common::{root, tiny};

fn lora() -> TrainConfig {
    TrainConfig {
        lora_r: 4,
        lora_alpha: 8.0,
        seed: 3,
        ..TrainConfig::default()
    }
}

fn data(m: &LoadedModel, k: usize) -> LocalData {
    fedtune_sim::demo::client_data(m, &root(), k, (k == 0).then_some(CANARY))
}

struct Setup {
    cfg: CoordConfig,
    model_digest: Digest,
    coord_id: Identity,
    client_ids: Vec<Identity>,
}

fn setup(n: usize, rounds: u64, rule: Rule) -> Setup {
    let coord_id = Identity::from_seed([100; 32]);
    let client_ids: Vec<Identity> = (0..n)
        .map(|i| Identity::from_seed([i as u8 + 1; 32]))
        .collect();
    let mut strategy = StrategyConfig::new(rule);
    strategy.target_rank = Some(4);
    strategy.sampling.min_clients = n;
    strategy.seed = 5;
    let model_digest = digest(b"tiny-llama");
    let lora_plan = LoraPlan {
        rank: 4,
        lora_alpha: 8.0,
        target_modules: lora().target_modules,
    };
    let mut cfg = CoordConfig::new(
        "test-federation".into(),
        Phase::Sft,
        rounds,
        Hyper {
            seed: 11,
            ..Hyper::new(5e-3, 4, 4)
        },
        lora_plan.clone(),
        strategy,
        600_000,
        plan_hash(&model_digest, &lora_plan),
        client_ids.iter().map(|i| i.public()).collect(),
    );
    cfg.min_results = n.div_ceil(2);
    cfg.max_payload = 64 << 20;
    Setup {
        cfg,
        model_digest,
        coord_id,
        client_ids,
    }
}

fn federation<'a>(s: &Setup, m: &LoadedModel, base: &'a Base) -> Federation<'a> {
    federation_from(s, m, base, init_adapter(&m.model, &lora()))
}

/// A federation whose global adapter starts as `initial`.
fn federation_from<'a>(
    s: &Setup,
    m: &LoadedModel,
    base: &'a Base,
    initial: fedtune_aggregation::Adapter,
) -> Federation<'a> {
    let coordinator = Coordinator::new(s.cfg.clone(), s.coord_id.clone(), initial, T0).unwrap();
    let clients = s
        .client_ids
        .iter()
        .enumerate()
        .map(|(k, id)| {
            SimClient::new(
                Client::new(
                    ClientConfig {
                        federation: s.cfg.federation.clone(),
                        coordinator: s.coord_id.public(),
                        model_digest: s.model_digest,
                        lora_pin: Default::default(),
                        header_ttl_ms: 3_600_000,
                        max_payload: 64 << 20,
                    },
                    id.clone(),
                ),
                data(m, k),
                1_000 * (k as u64 + 1),
            )
        })
        .collect();
    let mut f = Federation::new(coordinator, clients, base, T0);
    f.connect_all();
    f
}

fn held_out_losses(m: &LoadedModel, f: &Federation<'_>, adapter: Option<&PeftAdapter>) -> Vec<f64> {
    let mut model = m.model.clone();
    if let Some(a) = adapter {
        model.attach_adapter(a).unwrap();
    }
    f.clients
        .iter()
        .map(|c| sft_loss(&model, &c.data.eval, 8, c.data.pad).mean())
        .collect()
}

/// The `round_closed` records of a round log.
fn closed_rounds(log: &[RoundEvent]) -> Vec<&RoundClosed> {
    log.iter()
        .filter_map(|e| match e {
            RoundEvent::RoundClosed(c) => Some(c.as_ref()),
            _ => None,
        })
        .collect()
}

/// The clients whose update of `round` a round log shows accepted.
fn accepted_in(log: &[RoundEvent], round: u64) -> BTreeSet<PublicKey> {
    log.iter()
        .filter_map(|e| match e {
            RoundEvent::Accepted {
                round: r, client, ..
            } if *r == round => Some(*client),
            _ => None,
        })
        .collect()
}

#[test]
fn three_clients_two_rounds_beat_the_base_and_leak_nothing() {
    let m = tiny();
    let s = setup(3, 2, Rule::FedAvgExact);
    let base_f = Base::from(m.model.clone());
    let mut f = federation(&s, &m, &base_f);
    f.run(10_000).unwrap();
    assert!(f.coordinator.is_finished());
    assert_eq!(f.coordinator.completed_rounds(), 2);
    let closed = closed_rounds(&f.log);
    assert_eq!(closed.len(), 2);
    assert_eq!(closed[1].used.len(), 3, "{:?}", closed[1]);

    // The final global adapter, written as PEFT files and read back.
    let dir = std::env::temp_dir().join(format!("fedtune-sim-global-{}", std::process::id()));
    let peft = PeftAdapter {
        config: lora_config(&lora(), Some("tiny-llama".into())),
        weights: f.coordinator.global_adapter().clone(),
        metadata: Default::default(),
    };
    peft.save(&dir).unwrap();
    let loaded = PeftAdapter::load(&dir).unwrap();
    let stored = &f.store["global/000002/adapter_model.safetensors"];
    assert_eq!(stored, f.coordinator.global().1);
    let base = held_out_losses(&m, &f, None);
    let tuned = held_out_losses(&m, &f, Some(&loaded));
    for (k, (b, t)) in base.iter().zip(&tuned).enumerate() {
        assert!(t < b, "client {k}: held-out loss {b} -> {t}");
    }
    println!("held-out loss per client: base {base:?} -> global {tuned:?}");

    // Only adapters and scalar metrics left the clients.
    for c in &f.clients {
        assert!(!c.sent.is_empty());
        assert!(
            !c.sent.windows(CANARY.len()).any(|w| w == CANARY.as_bytes()),
            "the canary left its client"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_coordinator_killed_mid_round_resumes_with_no_update_lost() {
    let m = tiny();
    let s = setup(3, 2, Rule::FedAvgExact);
    let base_reference = Base::from(m.model.clone());
    let mut reference = federation(&s, &m, &base_reference);
    reference.run(10_000).unwrap();
    let want = digest(reference.coordinator.global().1);

    let base_f = Base::from(m.model.clone());
    let mut f = federation(&s, &m, &base_f);
    // Stop after the first update of round 2 is stored and acknowledged.
    let stopped = f
        .run_until(10_000, |log| !accepted_in(log, 2).is_empty())
        .unwrap();
    assert!(stopped);
    let accepted_before = accepted_in(&f.log, 2);
    f.crash_and_restart(s.cfg.clone(), s.coord_id.clone())
        .unwrap();
    f.run(10_000).unwrap();
    assert_eq!(f.coordinator.completed_rounds(), 2);
    let closed = closed_rounds(&f.log);
    let used: BTreeSet<PublicKey> = closed.last().unwrap().used.iter().copied().collect();
    assert!(
        accepted_before.is_subset(&used),
        "an accepted update was lost"
    );
    assert_eq!(used.len(), 3);
    assert_eq!(
        digest(f.coordinator.global().1),
        want,
        "the restarted run differs"
    );
}

/// Client 0 of 4 is hostile: each round its update is replaced by one forgery. Every forgery
/// is rejected with its own reason, the three honest updates are aggregated every round, and
/// the coordinator keeps running to the end.
#[test]
fn hostile_updates_are_rejected_with_their_reasons_and_honest_ones_aggregated() {
    use fedtune_protocol::envelope::{PayloadKind, Seal, seal};
    use fedtune_protocol::{Upload, peft};
    use fedtune_sim::Sent;
    let m = tiny();
    let mut s = setup(4, 8, Rule::FedAvgExact);
    s.cfg.min_results = 3;
    s.cfg.hyper.local_steps = 2;
    s.cfg.strategy.sampling.min_clients = 4;
    let hostile = s.client_ids[0].clone();
    let outsider = Identity::from_seed([77; 32]);
    let base_f = Base::from(m.model.clone());
    let mut f = federation(&s, &m, &base_f);
    let mut first: Option<Sent> = None;
    let federation_id = s.cfg.federation.clone();
    f.tamper = Some(Box::new(move |i, now, sent| {
        let Sent::Upload(Upload { header, payload }) = sent else {
            return vec![sent];
        };
        if i != 0 {
            return vec![Sent::Upload(Upload { header, payload })];
        }
        let h = header.header.clone();
        let resign = |payload: &[u8], f: &dyn Fn(&mut Seal<'_>)| {
            let mut sl = Seal {
                kind: PayloadKind::Update,
                federation: &federation_id,
                round: h.round,
                plan_hash: h.plan_hash,
                parent: h.parent,
                nonce: h.nonce,
                now_ms: now,
                ttl_ms: 3_600_000,
                num_examples: h.num_examples,
                metrics: h.metrics.clone(),
            };
            f(&mut sl);
            Box::new(seal(&hostile, sl, payload))
        };
        let upd = |header, payload| Sent::Upload(Upload { header, payload });
        let mut adapter =
            peft::decode(&payload, &Default::default(), |_, r| 8.0 / r as f32).unwrap();
        match h.round {
            1 => {
                // A NaN in an otherwise well-formed, properly signed update.
                let m = adapter.modules.values_mut().next().unwrap();
                m.b.data[0] = f32::NAN;
                let p = peft::encode(&adapter);
                let out = vec![upd(resign(&p, &|_| {}), p)];
                first = Some(upd(header, payload));
                out
            }
            2 => {
                // Replay of round 1's update, then the payload tampered after signing.
                let mut p = payload.clone();
                let mid = p.len() / 2;
                p[mid] ^= 0x55;
                vec![first.clone().unwrap(), upd(header, p)]
            }
            3 => vec![upd(
                resign(&payload, &|s| s.federation = "other-federation"),
                payload,
            )],
            4 => vec![upd(resign(&payload, &|s| s.parent = [0; 32]), payload)],
            5 => {
                let mut forged = header.clone();
                forged.header.num_examples = 1_000_000;
                vec![upd(forged, payload)]
            }
            6 => {
                // Signed by a key the federation does not admit, then an expired header.
                let sl = Seal {
                    kind: PayloadKind::Update,
                    federation: "test-federation",
                    round: h.round,
                    plan_hash: h.plan_hash,
                    parent: h.parent,
                    nonce: h.nonce,
                    now_ms: now,
                    ttl_ms: 3_600_000,
                    num_examples: 1,
                    metrics: Vec::new(),
                };
                let foreign = Box::new(seal(&outsider, sl, &payload));
                vec![
                    upd(foreign, payload.clone()),
                    upd(resign(&payload, &|s| s.now_ms = now - 7_200_000), payload),
                ]
            }
            7 => {
                // Shapes that do not match the plan.
                let m = adapter.modules.values_mut().next().unwrap();
                m.a = fedtune_aggregation::Matrix::new(
                    m.a.rows,
                    m.a.cols + 1,
                    vec![0.0; m.a.rows * (m.a.cols + 1)],
                );
                let p = peft::encode(&adapter);
                vec![upd(resign(&p, &|_| {}), p)]
            }
            _ => {
                // An honest update, sent twice while the round is open: the second is a replay.
                vec![upd(header.clone(), payload.clone()), upd(header, payload)]
            }
        }
    }));
    f.run(100_000).unwrap();
    assert!(f.coordinator.is_finished());
    let closed = closed_rounds(&f.log);
    assert_eq!(closed.len(), 8);
    let hostile = s.client_ids[0].public();
    for (r, c) in closed.iter().enumerate() {
        assert!(c.used.len() >= 3, "round {}: {c:?}", r + 1);
        assert_eq!(
            c.used.contains(&hostile),
            r == 7,
            "round {}: {:?}",
            r + 1,
            c.used
        );
    }
    let rej = f.coordinator.rejections();
    println!("rejections: {rej:?}");
    for label in [
        "invalid",
        "round_not_open",
        "digest_mismatch",
        "wrong_federation",
        "stale_global",
        "bad_signature",
        "unknown_key",
        "expired",
        "replay",
    ] {
        assert!(
            rej.get(label).copied().unwrap_or(0) >= 1,
            "no `{label}` rejection: {rej:?}"
        );
    }
    assert_eq!(rej["invalid"], 2, "NaN and shape mismatch");
    for e in &f.log {
        if let RoundEvent::Rejected { detail, .. } = e {
            assert!(!detail.is_empty());
        }
    }
}

/// A client's upload is lost with its connection; when it reconnects, the coordinator sends
/// the round's plan again and the client sends the same signed update again, which completes
/// the round with every client.
#[test]
fn an_update_lost_with_the_connection_is_sent_again_after_reconnecting() {
    use fedtune_client::ClientEvent;
    use fedtune_sim::Sent;
    let m = tiny();
    let s = setup(3, 1, Rule::FedAvgExact);
    let base_f = Base::from(m.model.clone());
    let mut f = federation(&s, &m, &base_f);
    let mut dropped = false;
    f.tamper = Some(Box::new(move |i, _, msg| match msg {
        Sent::Upload(_) if i == 1 && !dropped => {
            dropped = true;
            Vec::new()
        }
        other => vec![other],
    }));
    f.run_until(10_000, |log| accepted_in(log, 1).len() == 2)
        .unwrap();
    assert!(
        !f.coordinator.is_finished(),
        "the round waits for the third update"
    );
    f.disconnect(1);
    f.connect(1);
    f.run(10_000).unwrap();
    let closed = closed_rounds(&f.log);
    assert_eq!(closed[0].used.len(), 3, "{:?}", closed[0]);
    assert!(
        f.clients[1]
            .log
            .iter()
            .any(|e| matches!(e, ClientEvent::Resend { round: 1 }))
    );
}

/// A federated KTO phase: two clients, each with its own unpaired feedback, train the shared
/// adapter through the real KTO objective (the reference is the global adapter each round
/// starts from); rounds complete, the updates count their feedback examples, and the global
/// adapter scores the feedback better than the starting one (higher KTO rewards margin).
#[test]
fn a_kto_phase_trains_on_each_clients_feedback() {
    use fedtune_engine::data::{Dataset, LoadOptions};
    use fedtune_engine::train::kto::{KtoObjective, KtoOptions};
    let m = tiny();
    let mut s = setup(2, 2, Rule::FedAvgExact);
    s.cfg.phase = Phase::Kto;
    s.cfg.hyper.batch_size = 3;
    s.cfg.hyper.learning_rate = 2e-2;
    let base_f = Base::from(m.model.clone());
    let mut f = federation(&s, &m, &base_f);
    let feedback = Dataset::load(
        &root().join("testdata/kto/chat.jsonl"),
        LoadOptions::default(),
    )
    .unwrap()
    .encode_feedback(&m.tokenizer, 1024)
    .unwrap()
    .0;
    for (k, c) in f.clients.iter_mut().enumerate() {
        c.data.feedback = feedback[3 * k..3 * k + 3].to_vec();
    }
    f.run(10_000).unwrap();
    assert!(f.coordinator.is_finished());
    assert_eq!(f.coordinator.completed_rounds(), 2);
    let margin = |adapter: &fedtune_aggregation::Adapter| {
        let mut model = m.model.clone();
        model.attach_weights(adapter, 0.0).unwrap();
        let objective = KtoObjective::new(
            KtoOptions::default(),
            Vec::new(),
            feedback.clone(),
            3,
            m.tokenizer.pad_id,
        );
        objective.metrics_on(&model, true).1["rewards/margins"]
    };
    let start = margin(&init_adapter(&m.model, &lora()));
    let end = margin(f.coordinator.global_adapter());
    println!("KTO rewards/margins on the feedback: {start:.4} -> {end:.4}");
    assert!(end > start + 0.01, "{start} -> {end}");
}

/// A GRPO phase: the plan names the reward, each client samples and scores completions of
/// its own prompts, and the federation's adapter earns a higher reward than the start.
#[test]
fn a_grpo_phase_trains_on_each_clients_prompts_with_the_plans_rewards() {
    use fedtune_client::trainer::PromptData;
    use fedtune_engine::rewards::Rewards;
    use fedtune_engine::train::grpo::{GrpoObjective, GrpoOptions, load_prompts};
    use std::sync::Arc;
    let m = tiny();
    let mut s = setup(2, 3, Rule::FedAvgExact);
    s.cfg.phase = Phase::Grpo;
    s.cfg.hyper.batch_size = 8;
    s.cfg.hyper.local_steps = 8;
    s.cfg.hyper.learning_rate = 3e-2;
    let reward = "regex:^\\s*[A-Z]".to_string();
    s.cfg.hyper.grpo = Some(Box::new(fedtune_protocol::GrpoPlan {
        rewards: vec![reward.clone()],
        reward_weights: Vec::new(),
        num_generations: 8,
        max_completion_length: 3,
        temperature: 1.0,
        loss_type: "grpo".into(),
        epsilon: 0.2,
        beta: 0.0,
    }));
    let base_f = Base::from(m.model.clone());
    let mut f = federation(&s, &m, &base_f);
    let prompts = load_prompts(&root().join("testdata/grpo/prompts.jsonl"), &m.tokenizer).unwrap();
    let stop: Vec<u32> = m.tokenizer.eos_id.into_iter().collect();
    for (k, c) in f.clients.iter_mut().enumerate() {
        c.data.prompts = PromptData {
            prompts: prompts[2 * k..2 * k + 2].to_vec(),
            tokenizer: Some(Arc::new(tiny().tokenizer)),
            stop_ids: stop.clone(),
        };
    }
    f.run(10_000).unwrap();
    assert!(f.coordinator.is_finished());
    assert_eq!(f.coordinator.completed_rounds(), 3);
    let tok = Arc::new(tiny().tokenizer);
    let mean_reward = |adapter: &fedtune_aggregation::Adapter| {
        let mut model = m.model.clone();
        model.attach_weights(adapter, 0.0).unwrap();
        let objective = GrpoObjective::new(
            prompts.clone(),
            Rewards::parse(std::slice::from_ref(&reward), &[]).unwrap(),
            GrpoOptions {
                num_generations: 8,
                max_completion_length: 3,
                ..GrpoOptions::default()
            },
            8,
            m.tokenizer.pad_id,
            stop.clone(),
            tok.clone(),
            5,
        );
        (0..4)
            .map(|_| objective.mean_reward(&model).unwrap())
            .sum::<f64>()
            / 4.0
    };
    let start = mean_reward(&init_adapter(&m.model, &lora()));
    let end = mean_reward(f.coordinator.global_adapter());
    println!("GRPO mean reward on all prompts: {start:.3} -> {end:.3}");
    assert!(end > start + 0.2, "{start} -> {end}");
}

/// A distillation phase: each client distils a teacher it holds (here the tiny model with the
/// reference adapter) into the shared adapter, half of its micro-batches on its own samples;
/// the global adapter ends closer to the teacher on held-out conversations than it started.
#[test]
fn a_distill_phase_brings_the_global_adapter_closer_to_each_sites_teacher() {
    use fedtune_client::trainer::DistillData;
    use fedtune_engine::data::{Dataset, LoadOptions};
    use fedtune_engine::train::distill::{DistillObjective, DistillOptions};
    use std::sync::Arc;
    let m = tiny();
    let mut s = setup(2, 2, Rule::FedAvgExact);
    s.cfg.phase = Phase::Distill;
    s.cfg.hyper.batch_size = 4;
    s.cfg.hyper.local_steps = 4;
    s.cfg.hyper.learning_rate = 1e-2;
    s.cfg.hyper.distill = Some(Box::new(fedtune_protocol::DistillPlan {
        max_new_tokens: 6,
        ..Default::default()
    }));
    let mut teacher = m.model.clone();
    let a = PeftAdapter::load(&root().join("testdata/tiny-llama/adapter")).unwrap();
    teacher.attach_adapter(&a).unwrap();
    let teacher = Arc::new(teacher);
    let encode = |p: &str| {
        Dataset::load(&root().join(p), LoadOptions::default())
            .unwrap()
            .encode_completions(&m.tokenizer, 1024)
            .unwrap()
            .0
    };
    let examples = encode("testdata/demo/hospital.jsonl");
    let held_out = encode("testdata/gkd/chat.jsonl");
    let base_f = Base::from(m.model.clone());
    let mut f = federation(&s, &m, &base_f);
    for (k, c) in f.clients.iter_mut().enumerate() {
        c.data.distill = DistillData {
            teacher: Some(teacher.clone()),
            examples: examples[20 * k..20 * k + 20].to_vec(),
            eval: Vec::new(),
            stop_ids: m.tokenizer.eos_id.into_iter().collect(),
        };
    }
    f.run(10_000).unwrap();
    assert!(f.coordinator.is_finished());
    assert_eq!(f.coordinator.completed_rounds(), 2);
    let divergence = |adapter: &fedtune_aggregation::Adapter| {
        let mut model = m.model.clone();
        model.attach_weights(adapter, 0.0).unwrap();
        let objective = DistillObjective::new(
            teacher.as_ref(),
            model.config.vocab_size,
            DistillOptions::default(),
            Vec::new(),
            held_out.clone(),
            4,
            m.tokenizer.pad_id,
            vec![],
            0,
        )
        .unwrap();
        objective.loss_on(&model, true)
    };
    let start = divergence(&init_adapter(&m.model, &lora()));
    let end = divergence(f.coordinator.global_adapter());
    println!("held-out divergence to the teacher: {start:.4} -> {end:.4}");
    assert!(end < start - 0.03, "{start} -> {end}");
}

/// A federation that trains a reward model: one SFT round, then two reward-model rounds on
/// each client's own preference pairs. The coordinator starts from one score head (every
/// client the same), the SFT round passes it through, the reward rounds train it with the
/// LoRA factors, and the global reward model ranks the pairs better than the start did.
#[test]
fn a_reward_phase_trains_a_shared_reward_model_on_each_clients_pairs() {
    use fedtune_coordinator::Stage;
    use fedtune_engine::adapter::SCORE_KEY;
    use fedtune_engine::data::{Dataset, LoadOptions};
    use fedtune_engine::train::reward::{
        RewardObjective, RewardOptions, add_score_head, score_head,
    };
    let m = tiny();
    let mut s = setup(2, 1, Rule::FedAvgExact);
    s.cfg.then.push(Stage {
        phase: Phase::Reward,
        rounds: 2,
        hyper: Hyper {
            seed: 11,
            ..Hyper::new(1e-2, 6, 4)
        },
    });
    assert!(s.cfg.trains_reward_model());
    let pairs = Dataset::load(
        &root().join("testdata/demo/prefs.jsonl"),
        LoadOptions::default(),
    )
    .unwrap()
    .encode_reward_pairs(&m.tokenizer, None)
    .unwrap()
    .0;
    assert_eq!(pairs.len(), 24);
    let mut initial = init_adapter(&m.model, &lora());
    add_score_head(&mut initial, &m.model.config, 7);
    let base_f = Base::from(m.model.clone());
    let mut f = federation_from(&s, &m, &base_f, initial.clone());
    for (k, c) in f.clients.iter_mut().enumerate() {
        c.data.reward_pairs = pairs[10 * k..10 * k + 10].to_vec();
    }
    f.run(10_000).unwrap();
    assert!(f.coordinator.is_finished());
    assert_eq!(f.coordinator.completed_rounds(), 3);
    let end = f.coordinator.global_adapter();
    let (h0, h1) = (&initial.dense[SCORE_KEY], &end.dense[SCORE_KEY]);
    assert_eq!(h0, &score_head(m.model.config.hidden_size, 7));
    assert_ne!(h0, h1, "the reward rounds train the score head");
    // The clients' 20 pairs, and 4 pairs no client trained on.
    let objective = RewardObjective::new(
        RewardOptions::default(),
        pairs[..20].to_vec(),
        pairs[20..].to_vec(),
        8,
        m.tokenizer.pad_id,
    );
    let metrics = |adapter: &fedtune_aggregation::Adapter, eval: bool| {
        let mut model = m.model.clone();
        model.attach_weights(adapter, 0.0).unwrap();
        objective.metrics_on(&model, eval).unwrap()
    };
    for (eval, what) in [(false, "the clients' pairs"), (true, "held-out pairs")] {
        let ((l0, m0), (l1, m1)) = (metrics(&initial, eval), metrics(end, eval));
        println!(
            "reward model on {what}: loss {l0:.4} -> {l1:.4}, accuracy {:.3} -> {:.3}, \
             margin {:.4} -> {:.4}",
            m0["accuracy"], m1["accuracy"], m0["margin"], m1["margin"]
        );
        assert!(l1 < l0 - 0.05, "{what}: {l0} -> {l1}");
        assert!(m1["margin"] > m0["margin"], "{what}: {m0:?} -> {m1:?}");
    }
    // The global reward model is a PEFT sequence classifier's adapter, as the coordinator
    // stores it and as `PeftAdapter` saves it.
    let stored = fedtune_protocol::peft::adapter_config(end, None);
    assert_eq!(stored["task_type"], "SEQ_CLS", "{stored}");
    let dir = std::env::temp_dir().join(format!("fedtune-sim-reward-{}", std::process::id()));
    let peft = PeftAdapter {
        config: lora_config(&lora(), None),
        weights: end.clone(),
        metadata: Default::default(),
    };
    peft.save(&dir).unwrap();
    let text = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
    assert!(
        text.contains("SEQ_CLS") && text.contains("\"score\""),
        "{text}"
    );
    assert_eq!(PeftAdapter::load(&dir).unwrap().score(), Some(h1));
    std::fs::remove_dir_all(&dir).unwrap();
}
