//! Every rule of a round, tested quinn-proto style: a [`Pair`] of one coordinator machine and
//! N client machines in memory on a fake clock, messages encoded and decoded as on the wire,
//! updates prechecked by their header before their payload as the daemon does, and a trainer
//! that returns fixed deltas. No engine, no model file, no network: each test runs in
//! milliseconds.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use fedtune_aggregation::strategy::{Rule, Sampling, StrategyConfig};
use fedtune_aggregation::{Adapter, LoraFactors, Matrix};
use fedtune_client::{Client, ClientAction, ClientConfig, ClientEvent, LoraPin};
use fedtune_coordinator::{Action, CoordConfig, Coordinator, RoundEvent};
use fedtune_protocol::envelope::{PayloadKind, Seal, seal};
use fedtune_protocol::messages::{MAX_CONTROL, decode, encode};
use fedtune_protocol::{
    Digest, Hyper, Identity, LoraPlan, Phase, PublicKey, SignedHeader, ToClient, ToCoordinator,
    Upload, digest, peft, plan_hash,
};

/// What a client sends: a control message, or an update's upload.
#[derive(Debug, Clone)]
enum Sent {
    Message(ToCoordinator),
    Upload(Upload),
}

const MODULE: &str = "model.layers.0.self_attn.q_proj";
const MODEL: Digest = [3; 32];
const FEDERATION: &str = "pair";
const T0: u64 = 1_767_225_600_000;
const TIMEOUT_MS: u64 = 60_000;

fn lora() -> LoraPlan {
    LoraPlan {
        rank: 2,
        lora_alpha: 8.0,
        target_modules: vec!["q_proj".into()],
    }
}

/// The first global adapter: fixed `A`, `B = 0`.
fn initial() -> Adapter {
    let mut a = Adapter::default();
    a.modules.insert(
        MODULE.into(),
        LoraFactors {
            a: Matrix::new(2, 8, (0..16).map(|i| i as f32 * 0.01).collect()),
            b: Matrix::new(8, 2, vec![0.0; 16]),
            scale: 4.0,
        },
    );
    a
}

/// A federation of `ids` over `rounds` rounds, sampling as `sampling` says (a round opens
/// once `min_clients` are connected), closing a round with at least `min_results` updates.
fn config(ids: &[Identity], rounds: u64, sampling: Sampling, min_results: usize) -> CoordConfig {
    let mut strategy = StrategyConfig::new(Rule::FedAvgFactors);
    strategy.sampling = sampling;
    let mut cfg = CoordConfig::new(
        FEDERATION.into(),
        Phase::Sft,
        rounds,
        Hyper {
            seed: 7,
            ..Hyper::new(1e-3, 1, 1)
        },
        lora(),
        strategy,
        TIMEOUT_MS,
        plan_hash(&MODEL, &lora()),
        ids.iter().map(|i| i.public()).collect::<BTreeSet<_>>(),
    );
    cfg.min_results = min_results;
    cfg.max_payload = 1 << 20;
    cfg
}

/// A training job in progress: its client, when it finishes, its plan's round and the global
/// adapter it started from.
struct Job {
    client: usize,
    done_at: u64,
    round: u64,
    global: Adapter,
}

/// One coordinator machine and N client machines, connected in memory.
struct Pair {
    now: u64,
    cfg: CoordConfig,
    coord_id: Identity,
    coord: Coordinator,
    ids: Vec<Identity>,
    clients: Vec<Client>,
    connected: Vec<bool>,
    /// Milliseconds each client's training takes (`None`: it never finishes).
    train_ms: Vec<Option<u64>>,
    jobs: Vec<Job>,
    /// Messages and uploads on their way to the coordinator, by sender.
    to_coord: VecDeque<(usize, Sent)>,
    /// What each client sent, in order (for replays).
    sent: Vec<Vec<Sent>>,
    store: BTreeMap<String, Vec<u8>>,
    log: Vec<RoundEvent>,
    finished: Vec<Option<Digest>>,
    /// Each client's local log.
    client_log: Vec<Vec<ClientEvent>>,
}

impl Pair {
    /// `n` clients, all sampled each round, none connected yet.
    fn new(n: usize, rounds: u64, min_results: usize) -> Pair {
        let all = Sampling {
            fraction: 1.0,
            min_clients: n,
            max_clients: None,
        };
        Pair::sampling(n, rounds, all, min_results)
    }

    fn sampling(n: usize, rounds: u64, sampling: Sampling, min_results: usize) -> Pair {
        let ids: Vec<Identity> = (0..n)
            .map(|k| Identity::from_seed([k as u8 + 10; 32]))
            .collect();
        let coord_id = Identity::from_seed([1; 32]);
        let cfg = config(&ids, rounds, sampling, min_results);
        let coord = Coordinator::new(cfg.clone(), coord_id.clone(), initial(), T0).unwrap();
        let clients = ids
            .iter()
            .map(|id| {
                Client::new(
                    ClientConfig {
                        federation: FEDERATION.into(),
                        coordinator: coord_id.public(),
                        model_digest: MODEL,
                        lora_pin: LoraPin::default(),
                        header_ttl_ms: 10 * TIMEOUT_MS,
                        max_payload: 1 << 20,
                    },
                    id.clone(),
                )
            })
            .collect();
        Pair {
            now: T0,
            cfg,
            coord_id,
            coord,
            ids,
            clients,
            connected: vec![false; n],
            train_ms: vec![Some(1_000); n],
            jobs: Vec::new(),
            to_coord: VecDeque::new(),
            sent: vec![Vec::new(); n],
            store: BTreeMap::new(),
            log: Vec::new(),
            finished: vec![None; n],
            client_log: vec![Vec::new(); n],
        }
    }

    /// Connects every client, in order.
    fn start(mut self) -> Pair {
        for k in 0..self.clients.len() {
            self.connect(k);
        }
        self
    }

    fn key(&self, k: usize) -> PublicKey {
        self.ids[k].public()
    }

    fn index_of(&self, pk: &PublicKey) -> Option<usize> {
        self.ids.iter().position(|i| i.public() == *pk)
    }

    fn connect(&mut self, k: usize) {
        self.connected[k] = true;
        self.clients[k].handle_connected(self.now);
        self.settle();
    }

    fn disconnect(&mut self, k: usize) {
        self.connected[k] = false;
        self.to_coord.retain(|(c, _)| *c != k);
        let pk = self.key(k);
        self.coord.handle_disconnect(self.now, pk);
        self.settle();
    }

    /// Kills the coordinator (what it did not persist is lost) and starts it again from its
    /// store; every client reconnects.
    fn restart_coordinator(&mut self) {
        self.coord =
            Coordinator::recover(self.cfg.clone(), self.coord_id.clone(), &self.store).unwrap();
        self.to_coord.clear();
        for k in 0..self.clients.len() {
            self.connected[k] = false;
        }
        for k in 0..self.clients.len() {
            self.connect(k);
        }
    }

    /// What client `k` sent reaches the coordinator as the daemons hand it over: through the
    /// wire encoding, an upload's header before its payload; the client hears how its upload
    /// went.
    fn deliver(&mut self, k: usize, sent: Sent) {
        let pk = self.key(k);
        match sent {
            Sent::Message(msg) => {
                let wire = encode(&msg);
                let msg: ToCoordinator = decode(&wire, MAX_CONTROL, "message").unwrap();
                self.coord.handle_message(self.now, pk, msg);
            }
            Sent::Upload(u) => {
                let wire = encode(&*u.header);
                let header: SignedHeader = decode(&wire, MAX_CONTROL, "update header").unwrap();
                let round = header.header.round;
                if self
                    .coord
                    .handle_upload_header(self.now, pk, &header)
                    .is_err()
                {
                    self.clients[k].handle_upload_refused(self.now, round);
                    return;
                }
                let upload = Upload {
                    header: Box::new(header),
                    payload: u.payload,
                };
                self.coord.handle_upload(self.now, pk, upload);
                self.clients[k].handle_uploaded(self.now, round, 0);
            }
        }
    }

    /// Client `k` sends `s` (lost while it is not connected).
    fn sent_by(&mut self, k: usize, s: Sent) {
        if self.connected[k] {
            self.sent[k].push(s.clone());
            self.to_coord.push_back((k, s));
        }
    }

    /// Carries out every pending action of every machine until none is left.
    fn settle(&mut self) {
        loop {
            let mut any = false;
            while let Some(a) = self.coord.poll_action() {
                any = true;
                match a {
                    Action::Persist { key, bytes } => {
                        self.store.insert(key, bytes);
                    }
                    Action::Log(e) => self.log.push(e),
                    Action::Finished => {}
                    Action::Send { to, msg } => {
                        if let Some(k) = self.index_of(&to).filter(|k| self.connected[*k]) {
                            let wire = encode(&msg);
                            let msg: ToClient = decode(&wire, 1 << 22, "message").unwrap();
                            self.clients[k].handle_message(self.now, msg);
                        }
                    }
                }
            }
            for k in 0..self.clients.len() {
                while let Some(a) = self.clients[k].poll_action() {
                    any = true;
                    match a {
                        ClientAction::Send(m) => self.sent_by(k, Sent::Message(m)),
                        ClientAction::Upload(u) => self.sent_by(k, Sent::Upload(u)),
                        ClientAction::Train(job) => {
                            if let Some(ms) = self.train_ms[k] {
                                self.jobs.push(Job {
                                    client: k,
                                    done_at: self.now + ms,
                                    round: job.plan.round,
                                    global: job.global,
                                });
                            }
                        }
                        ClientAction::Finished(d) => self.finished[k] = Some(d),
                        ClientAction::Log(e) => self.client_log[k].push(e),
                        ClientAction::Stop(why) => panic!("client {k} stopped: {why}"),
                    }
                }
            }
            while let Some((k, m)) = self.to_coord.pop_front() {
                any = true;
                self.deliver(k, m);
            }
            if !any {
                return;
            }
        }
    }

    /// Moves the clock to `t`: jobs due by then finish (the trainer adds `0.1·(k+1)` to every
    /// `B` of the global it started from), then the coordinator's clock ticks.
    fn advance_to(&mut self, t: u64) {
        loop {
            let next = self
                .jobs
                .iter()
                .enumerate()
                .filter(|(_, j)| j.done_at <= t)
                .min_by_key(|(_, j)| j.done_at)
                .map(|(i, _)| i);
            let Some(i) = next else { break };
            let job = self.jobs.remove(i);
            self.now = self.now.max(job.done_at);
            let mut update = job.global.clone();
            for f in update.modules.values_mut() {
                f.b.data
                    .iter_mut()
                    .for_each(|x| *x += 0.1 * (job.client + 1) as f32);
            }
            self.clients[job.client].handle_trained(self.now, job.round, &update, 10, vec![]);
            self.settle();
        }
        self.now = t;
        self.coord.handle_tick(self.now);
        self.settle();
    }

    /// Runs until the coordinator finishes, in steps of a second (at most `max_s` seconds).
    fn run(&mut self, max_s: u64) {
        for _ in 0..max_s {
            if self.coord.is_finished() {
                return;
            }
            self.advance_to(self.now + 1_000);
        }
        panic!("not finished after {max_s} s: {:#?}", self.log);
    }

    fn closed(&self) -> Vec<&fedtune_coordinator::RoundClosed> {
        self.log
            .iter()
            .filter_map(|e| match e {
                RoundEvent::RoundClosed(c) => Some(c.as_ref()),
                _ => None,
            })
            .collect()
    }

    fn count(&self, name: &str) -> usize {
        self.log
            .iter()
            .filter(|e| e.to_json()["event"] == name)
            .count()
    }

    fn rejected(&self) -> Vec<(usize, String)> {
        self.log
            .iter()
            .filter_map(|e| match e {
                RoundEvent::Rejected { client, reason, .. } => {
                    Some((self.index_of(client).unwrap(), reason.clone()))
                }
                _ => None,
            })
            .collect()
    }
}

#[test]
fn every_client_trains_and_every_round_closes_once_all_answered() {
    let mut p = Pair::new(3, 2, 3).start();
    p.run(60);
    let closed = p.closed();
    assert_eq!(closed.len(), 2);
    for c in &closed {
        assert_eq!(c.used.len(), 3, "{c:?}");
        assert!(c.failures.is_empty(), "{c:?}");
        // Closed as soon as the last update came (1 s of training), not at the deadline.
        assert!(c.seconds < 2.0, "{c:?}");
    }
    // FedAvg of the fixed deltas 0.1, 0.2, 0.3 over two rounds: B = 0.2 + 0.2.
    let b = &p.coord.global_adapter().modules[MODULE].b.data;
    assert!(b.iter().all(|x| (x - 0.4).abs() < 1e-6), "{b:?}");
    let want = digest(p.coord.global().1);
    assert!(
        p.finished.iter().all(|d| *d == Some(want)),
        "{:?}",
        p.finished
    );
}

#[test]
fn each_round_samples_its_fraction_and_only_the_sampled_train() {
    // Half of four clients per round; a round opens once two are connected.
    let half = Sampling {
        fraction: 0.5,
        min_clients: 2,
        max_clients: None,
    };
    let mut p = Pair::sampling(4, 4, half, 2).start();
    p.run(60);
    let mut everyone = BTreeSet::new();
    for round in 1..=4 {
        let sampled: BTreeSet<PublicKey> = p
            .log
            .iter()
            .find_map(|e| match e {
                RoundEvent::RoundOpen {
                    round: r, sampled, ..
                } if *r == round => Some(sampled.iter().copied().collect()),
                _ => None,
            })
            .unwrap();
        assert_eq!(sampled.len(), 2, "round {round}: {sampled:?}");
        let accepted: BTreeSet<PublicKey> = p
            .log
            .iter()
            .filter_map(|e| match e {
                RoundEvent::Accepted {
                    round: r, client, ..
                } if *r == round => Some(*client),
                _ => None,
            })
            .collect();
        assert_eq!(accepted, sampled, "round {round}");
        assert_eq!(p.closed()[round as usize - 1].used.len(), 2);
        everyone.extend(sampled);
    }
    // No client trained unasked (its update would have been rejected as not sampled), and
    // the seeded draws over four rounds reached more than the first two clients.
    assert!(p.rejected().is_empty(), "{:?}", p.rejected());
    assert!(everyone.len() > 2, "{everyone:?}");
}

#[test]
fn at_the_deadline_a_round_with_min_results_closes_and_names_the_missing_client() {
    let mut p = Pair::new(3, 1, 2);
    p.train_ms[2] = None;
    let mut p = p.start();
    p.advance_to(T0 + 5_000);
    assert!(
        p.closed().is_empty(),
        "waits for the third client until the deadline"
    );
    p.advance_to(T0 + TIMEOUT_MS + 1);
    let closed = p.closed();
    assert_eq!(closed.len(), 1);
    assert_eq!(closed[0].used.len(), 2);
    assert_eq!(closed[0].failures.len(), 1);
    assert_eq!(closed[0].failures[0].client, p.key(2));
    assert_eq!(
        closed[0].failures[0].reason,
        "no update before the deadline"
    );
}

#[test]
fn too_few_updates_by_the_deadline_resample_and_keep_the_accepted_ones() {
    let mut p = Pair::new(3, 1, 3);
    p.train_ms[2] = None;
    let mut p = p.start();
    p.advance_to(T0 + TIMEOUT_MS + 1);
    assert!(p.closed().is_empty());
    let retry = p
        .log
        .iter()
        .find_map(|e| match e {
            RoundEvent::RoundRetry {
                results, missing, ..
            } => Some((*results, missing.clone())),
            _ => None,
        })
        .expect("round_retry");
    assert_eq!(retry, (2, vec![p.key(2)]));
    assert_eq!(p.count("round_open"), 2);
    // This time the third client's training finishes (its first job was lost: it reconnects
    // and is sent the plan again); the two accepted updates were kept, not asked for again.
    p.train_ms[2] = Some(1_000);
    p.clients[2].handle_abandoned(1);
    p.disconnect(2);
    p.connect(2);
    p.run(60);
    assert_eq!(p.count("accepted"), 3);
    assert_eq!(p.closed()[0].used.len(), 3);
}

#[test]
fn a_replayed_update_is_rejected_and_changes_nothing() {
    let mut p = Pair::new(3, 1, 3);
    // The round stays open while the third client trains.
    p.train_ms[2] = Some(5_000);
    let mut p = p.start();
    p.advance_to(T0 + 1_000);
    let update = p.sent[0]
        .iter()
        .find(|m| matches!(m, Sent::Upload(_)))
        .cloned()
        .expect("client 0 sent its update");
    p.deliver(0, update);
    p.settle();
    assert_eq!(p.rejected(), vec![(0, "replay".to_string())]);
    // The client hears the rejection with its label first (what its metrics count by).
    let heard: Vec<&str> = p.client_log[0]
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Rejected { round: 1, reason } => Some(reason.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(heard.len(), 1, "{:?}", p.client_log[0]);
    assert!(heard[0].starts_with("replay: "), "{heard:?}");
    assert_eq!(fedtune_client::metrics::reason_label(heard[0]), "replay");
    p.run(60);
    assert_eq!(p.closed()[0].used.len(), 3);
    assert_eq!(p.coord.rejections().get("replay"), Some(&1));
}

#[test]
fn an_update_of_a_closed_round_is_rejected() {
    let mut p = Pair::new(2, 2, 2).start();
    p.advance_to(T0 + 1_000);
    assert_eq!(p.closed().len(), 1, "round 1 closed");
    let old = p.sent[1]
        .iter()
        .find(|m| matches!(m, Sent::Upload(_)))
        .cloned()
        .unwrap();
    // Round 1's update, sent again while round 2 is open.
    p.deliver(1, old);
    p.settle();
    assert_eq!(p.rejected(), vec![(1, "round_not_open".to_string())]);
    p.run(60);
    assert_eq!(p.closed().len(), 2);
    assert_eq!(p.closed()[1].used.len(), 2);
}

#[test]
fn an_update_trained_from_another_global_is_rejected_as_stale() {
    let mut p = Pair::new(3, 2, 2);
    // Client 2 does not train; an update in its name is made by hand below.
    p.train_ms[2] = None;
    let mut p = p.start();
    let first_global = p.coord.global().0.header.payload_digest;
    p.advance_to(T0 + TIMEOUT_MS + 1);
    assert_eq!(p.closed().len(), 1, "round 1 closed at its deadline");
    // Client 2 signs an update for round 2 trained from the global before the current one:
    // the coordinator refuses it by its header, before its payload.
    let payload = peft::encode(&initial());
    let header = seal(
        &p.ids[2],
        Seal {
            kind: PayloadKind::Update,
            federation: FEDERATION,
            round: 2,
            plan_hash: plan_hash(&MODEL, &lora()),
            parent: first_global,
            nonce: [9; 16],
            now_ms: p.now,
            ttl_ms: TIMEOUT_MS,
            num_examples: 10,
            metrics: vec![],
        },
        &payload,
    );
    p.deliver(
        2,
        Sent::Upload(Upload {
            header: Box::new(header),
            payload,
        }),
    );
    p.settle();
    assert_eq!(p.rejected(), vec![(2, "stale_global".to_string())]);
    p.run(120);
    let closed = p.closed();
    assert_eq!(closed[1].used.len(), 2);
    assert!(!closed[1].used.contains(&p.key(2)));
}

#[test]
fn a_coordinator_restarted_from_its_persisted_actions_loses_no_accepted_update() {
    let mut reference = Pair::new(3, 2, 3).start();
    reference.run(60);
    let want = digest(reference.coord.global().1);

    let mut p = Pair::new(3, 2, 3);
    p.train_ms[2] = Some(3_000);
    let mut p = p.start();
    // Round 1 closes at 3 s; in round 2 two updates are accepted at 4 s, the third client
    // trains until 6 s.
    p.advance_to(T0 + 4_500);
    assert_eq!(p.closed().len(), 1);
    assert_eq!(p.count("accepted"), 5, "{:#?}", p.log);
    p.restart_coordinator();
    p.run(60);
    assert_eq!(p.closed().len(), 2);
    assert_eq!(p.closed()[1].used.len(), 3);
    assert_eq!(
        digest(p.coord.global().1),
        want,
        "the restarted run differs"
    );
}
