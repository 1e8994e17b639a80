//! The coordinator machine with plain adapter values (no engine, no network, a fake clock):
//! recovery re-checks every stored update, a round's `used` lists what was aggregated, and a
//! declined plan counts at once.

use std::collections::{BTreeMap, BTreeSet};

use fedtune_aggregation::strategy::{Rule, StrategyConfig};
use fedtune_aggregation::{Adapter, LoraFactors, Matrix};
use fedtune_coordinator::machine::Action;
use fedtune_coordinator::{CoordConfig, Coordinator};
use fedtune_protocol::envelope::{PayloadKind, Seal, seal};
use fedtune_protocol::{
    DeclineReason, Hyper, Identity, LoraPlan, Phase, RoundPlan, ToClient, ToCoordinator, Upload,
    peft,
};

const MODULE: &str = "model.layers.0.self_attn.q_proj";

fn adapter(b: f32) -> Adapter {
    let mut a = Adapter::default();
    a.modules.insert(
        MODULE.into(),
        LoraFactors {
            a: Matrix::new(2, 8, (0..16).map(|i| i as f32 * 0.01).collect()),
            b: Matrix::new(8, 2, vec![b; 16]),
            scale: 4.0,
        },
    );
    a
}

fn config(ids: &[Identity]) -> CoordConfig {
    let mut strategy = StrategyConfig::new(Rule::FedAvgFactors);
    strategy.sampling.min_clients = ids.len();
    let mut cfg = CoordConfig::new(
        "recovery".into(),
        Phase::Sft,
        1,
        Hyper {
            seed: 0,
            ..Hyper::new(1e-3, 1, 1)
        },
        LoraPlan {
            rank: 2,
            lora_alpha: 8.0,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
        },
        strategy,
        60_000,
        [7; 32],
        ids.iter().map(|i| i.public()).collect::<BTreeSet<_>>(),
    );
    cfg.max_payload = 1 << 20;
    cfg
}

/// A new federation of `ids` at `now`, starting from a zero `B`.
fn start(ids: &[Identity], now: u64) -> Coordinator {
    Coordinator::new(config(ids), Identity::from_seed([9; 32]), adapter(0.0), now).unwrap()
}

/// Drains the machine's actions: stored values into `store`, log records and plans returned.
fn drain(
    c: &mut Coordinator,
    store: &mut BTreeMap<String, Vec<u8>>,
) -> (Vec<serde_json::Value>, Vec<RoundPlan>) {
    let (mut logs, mut plans) = (Vec::new(), Vec::new());
    while let Some(a) = c.poll_action() {
        match a {
            Action::Persist { key, bytes } => {
                store.insert(key, bytes);
            }
            Action::Log(e) => logs.push(e.to_json()),
            Action::Send {
                msg: ToClient::Plan { plan, .. },
                ..
            } => plans.push(*plan),
            _ => {}
        }
    }
    (logs, plans)
}

fn events<'a>(logs: &'a [serde_json::Value], event: &str) -> Vec<&'a serde_json::Value> {
    logs.iter().filter(|v| v["event"] == event).collect()
}

/// Client `id` sends a signed update for `plan` (its `B` filled with `0.1·(k+1)`).
fn upload(c: &mut Coordinator, id: &Identity, plan: &RoundPlan, k: usize, now: u64) {
    upload_of(c, id, plan, k, now, &adapter(0.1 * (k + 1) as f32));
}

/// Client `id` sends `update`, signed, for `plan`.
fn upload_of(
    c: &mut Coordinator,
    id: &Identity,
    plan: &RoundPlan,
    k: usize,
    now: u64,
    update: &Adapter,
) {
    let payload = peft::encode(update);
    let header = seal(
        id,
        Seal {
            kind: PayloadKind::Update,
            federation: "recovery",
            round: plan.round,
            plan_hash: [7; 32],
            parent: plan.global_digest,
            nonce: [k as u8; 16],
            now_ms: now,
            ttl_ms: 600_000,
            num_examples: 10,
            metrics: vec![],
        },
        &payload,
    );
    c.handle_upload_header(now, id.public(), &header).unwrap();
    c.handle_upload(
        now,
        id.public(),
        Upload {
            header: Box::new(header),
            payload,
        },
    );
}

#[test]
fn a_stored_update_damaged_on_disk_is_dropped_on_recovery_and_not_listed_as_used() {
    let now = 1_000_000;
    // Three sampled clients, two of which upload: the round stays open.
    let ids = [1u8, 2, 3].map(|k| Identity::from_seed([k; 32]));
    let coord = Identity::from_seed([9; 32]);
    let mut store = BTreeMap::new();
    let mut c = Coordinator::new(config(&ids), coord.clone(), adapter(0.0), now).unwrap();
    for id in &ids {
        c.handle_hello(now, id.public());
    }
    let (_, plans) = drain(&mut c, &mut store);
    let plan = plans.first().expect("the round opens").clone();
    for (k, id) in ids[..2].iter().enumerate() {
        upload(&mut c, id, &plan, k, now);
    }
    let (logs, _) = drain(&mut c, &mut store);
    assert_eq!(events(&logs, "accepted").len(), 2, "{logs:?}");
    // The second client's stored update loses one bit of its payload on disk.
    let key = format!("updates/{:06}/{}", plan.round, ids[1].public().to_hex());
    let keys: Vec<String> = store.keys().cloned().collect();
    let stored = store
        .iter_mut()
        .find(|(k, _)| k.starts_with(&key))
        .unwrap_or_else(|| panic!("no stored update under {key}: {keys:?}"))
        .1;
    *stored.last_mut().unwrap() ^= 1;
    // Restart.
    let mut r = Coordinator::recover(config(&ids), coord, &store).unwrap();
    let (logs, _) = drain(&mut r, &mut store);
    let invalid = events(&logs, "stored_update_invalid");
    assert_eq!(invalid.len(), 1, "{logs:?}");
    assert!(invalid[0]["key"].as_str().unwrap().starts_with(&key));
    assert!(
        invalid[0]["reason"].as_str().unwrap().contains("digest"),
        "{invalid:?}"
    );
    // At the deadline the round closes with the intact update only.
    r.handle_tick(plan.deadline_ms + 1);
    let (logs, _) = drain(&mut r, &mut store);
    let closed = events(&logs, "round_closed");
    assert_eq!(closed.len(), 1, "{logs:?}");
    assert_eq!(
        closed[0]["used"],
        serde_json::json!([ids[0].public().to_hex()]),
        "{closed:?}"
    );
}

/// A client that declines the round (here: its local training failed) counts at once: with
/// every sampled client answered, the round closes without waiting for its deadline, and the
/// log says why, typed.
#[test]
fn a_declined_plan_closes_the_round_without_waiting_for_the_deadline() {
    let now = 1_000_000;
    let ids = [1u8, 2].map(|k| Identity::from_seed([k; 32]));
    let mut store = BTreeMap::new();
    let mut c = start(&ids, now);
    for id in &ids {
        c.handle_hello(now, id.public());
    }
    let (_, plans) = drain(&mut c, &mut store);
    let plan = plans[0].clone();
    upload(&mut c, &ids[0], &plan, 0, now);
    c.handle_message(
        now + 5,
        ids[1].public(),
        ToCoordinator::Decline {
            round: plan.round,
            reason: DeclineReason::Training("no preference pairs for a dpo round".into()),
        },
    );
    let (logs, _) = drain(&mut c, &mut store);
    let declined = events(&logs, "declined");
    assert_eq!(declined.len(), 1, "{logs:?}");
    assert_eq!(declined[0]["reason"], "training");
    assert_eq!(declined[0]["detail"], "no preference pairs for a dpo round");
    let closed = events(&logs, "round_closed");
    assert_eq!(
        closed.len(),
        1,
        "closed at once, before the deadline: {logs:?}"
    );
    assert_eq!(
        closed[0]["used"],
        serde_json::json!([ids[0].public().to_hex()])
    );
    assert!(
        closed[0]["failures"]
            .to_string()
            .contains("declined (training): no preference pairs"),
        "{closed:?}"
    );
}

/// The status read from `store`'s state and keys, as `fedtune coord status` reads a store.
fn stored_status(
    store: &BTreeMap<String, Vec<u8>>,
) -> Result<fedtune_coordinator::machine::StoredStatus, fedtune_coordinator::CoordinatorError> {
    let keys: Vec<String> = store.keys().cloned().collect();
    Coordinator::stored_status(store.get("state").map(Vec::as_slice), &keys)
}

/// `fedtune coord status` reads the store: the open round with the clients whose updates are
/// stored, then after the round closes the completed count, the new global adapter and the
/// accepted rounds per client.
#[test]
fn the_stored_status_follows_the_rounds() {
    let now = 1_000_000;
    let ids = [1u8, 2, 3].map(|k| Identity::from_seed([k; 32]));
    let mut store = BTreeMap::new();
    let mut c = start(&ids, now);
    assert!(
        stored_status(&store).is_err(),
        "no state yet: an error, not a guess"
    );
    for id in &ids {
        c.handle_hello(now, id.public());
    }
    let (_, plans) = drain(&mut c, &mut store);
    let plan = plans.first().expect("the round opens").clone();
    upload(&mut c, &ids[0], &plan, 0, now);
    drain(&mut c, &mut store);
    let s = stored_status(&store).unwrap();
    assert_eq!(
        (s.completed_rounds, s.finished, s.global_round),
        (0, false, 0)
    );
    let open = s.open_round.as_ref().expect("round 1 is open");
    assert_eq!(open.round, plan.round);
    assert_eq!(open.sampled.len(), 3);
    assert_eq!(open.updates, vec![ids[0].public()]);
    assert_eq!(open.deadline_ms, plan.deadline_ms);
    let first_global = s.global_digest.clone();
    for (k, id) in ids[1..].iter().enumerate() {
        upload(&mut c, id, &plan, k + 1, now);
    }
    drain(&mut c, &mut store);
    let s = stored_status(&store).unwrap();
    assert_eq!(s.completed_rounds, 1);
    assert!(s.finished, "a one-round federation");
    assert_eq!(s.global_round, 1);
    assert_ne!(s.global_digest, first_global);
    assert_eq!(s.global_digest.len(), 64);
    assert_eq!(
        s.accepted_rounds.values().copied().collect::<Vec<_>>(),
        [1, 1, 1]
    );
}

/// FedAvg-exact's sum of two rank-2 updates has rank 4; the coordinator re-factorises it to
/// the plan's rank (unless `target_rank` says less), so that the next round's clients, which
/// train from the global adapter and send updates of its rank, are not refused.
#[test]
fn fedavg_exact_keeps_the_global_at_the_plans_rank_so_the_next_round_trains_from_it() {
    let now = 1_000_000;
    let ids = [1u8, 2].map(|k| Identity::from_seed([k; 32]));
    let mut cfg = config(&ids);
    cfg.strategy.rule = Rule::FedAvgExact;
    cfg.rounds = 2;
    let mut wide = cfg.clone();
    wide.strategy.target_rank = Some(3);
    let e = wide.validate().unwrap_err();
    assert!(e.contains("target_rank 3") && e.contains("1..=2"), "{e}");
    let mut c = Coordinator::new(cfg, Identity::from_seed([9; 32]), adapter(0.0), now).unwrap();
    let mut store = BTreeMap::new();
    for id in &ids {
        c.handle_hello(now, id.public());
    }
    for round in 1..=2u64 {
        let (_, plans) = drain(&mut c, &mut store);
        assert_eq!(plans.len(), 2, "round {round}: {plans:?}");
        let global = c.global_adapter().clone();
        for (k, (id, plan)) in ids.iter().zip(&plans).enumerate() {
            // A client's update: the global adapter it trained from, moved.
            let mut update = global.clone();
            for m in update.modules.values_mut() {
                m.b.data.iter_mut().for_each(|v| *v += 0.1 * (k + 1) as f32);
            }
            upload_of(&mut c, id, plan, k, now + round, &update);
        }
        let (logs, _) = drain(&mut c, &mut store);
        assert!(
            events(&logs, "rejected").is_empty(),
            "round {round}: {logs:?}"
        );
        let closed = events(&logs, "round_closed");
        assert_eq!(closed.len(), 1, "round {round}: {logs:?}");
        assert_eq!(
            c.global_adapter().modules[MODULE].rank(),
            2,
            "round {round}"
        );
        // Replay the hellos so the next round's plans go out.
        for id in &ids {
            c.handle_hello(now + round, id.public());
        }
    }
    assert_eq!(c.completed_rounds(), 2);
}
