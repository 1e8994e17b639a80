//! The round state machine.
//!
//! A round: when no round is open and at least `min_clients` are connected, the strategy
//! samples clients (seeded), the machine persists the open round and sends each sampled
//! client the round plan with the signed global adapter. Updates are checked (header before
//! payload, then digest, parse and validation against the plan), persisted and acknowledged.
//! The round closes when every sampled client answered or at the deadline with at least
//! `min_results` updates (otherwise the round is retried with a new sample); the strategy
//! aggregates, the new global adapter is signed and persisted, and a round-log record is
//! emitted.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use fedtune_aggregation::strategy::{FedStrategy, Strategy};
use fedtune_aggregation::update::{Adapter, ClientResult, Failure};
use fedtune_aggregation::validate::Plan;
use fedtune_protocol::envelope::{Digest, PayloadKind, Seal, seal};
use fedtune_protocol::{
    Hyper, Identity, PublicKey, Rejection, RoundPlan, SignedHeader, ToClient, ToCoordinator,
    Upload, digest, peft,
};
use serde::{Deserialize, Serialize};

pub use crate::config::CoordConfig;
use crate::roundevent::{ClientFailure, RoundClosed, RoundEvent};

mod checks;
mod recover;
mod status;

pub use status::{OpenStatus, StoredStatus};

/// Errors that stop the coordinator (never caused by network input).
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// Bad configuration.
    #[error("configuration: {0}")]
    Config(String),
    /// Persisted state that cannot be read.
    #[error("stored state `{key}`: {reason}")]
    Store {
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
    /// Aggregation failed.
    #[error("aggregation: {0}")]
    Aggregation(String),
}

type Result<T> = std::result::Result<T, CoordinatorError>;

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send a message to a client (dropped if it is not connected).
    Send {
        /// The client.
        to: PublicKey,
        /// The message.
        msg: ToClient,
    },
    /// Store `bytes` under `key` durably before carrying out later actions.
    Persist {
        /// Key (a relative file name).
        key: String,
        /// Value.
        bytes: Vec<u8>,
    },
    /// Append a record to the round log.
    Log(RoundEvent),
    /// The federation finished.
    Finished,
}

/// The open round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OpenRound {
    round: u64,
    sampled: BTreeSet<PublicKey>,
    deadline_ms: u64,
    opened_ms: u64,
}

/// Everything persisted under `state`, besides the strategy's state (stored beside it).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Durable {
    /// Rounds completed.
    completed: u64,
    global_header: SignedHeader,
    global_payload: Vec<u8>,
    open: Option<OpenRound>,
    seen: BTreeSet<(PublicKey, u64)>,
    rejections: BTreeMap<String, u64>,
    finished: bool,
}

/// An accepted update as persisted.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    header: SignedHeader,
    payload: Vec<u8>,
}

/// The coordinator state machine.
pub struct Coordinator {
    cfg: CoordConfig,
    id: Identity,
    strategy: FedStrategy,
    d: Durable,
    /// Accepted updates of the open round.
    results: BTreeMap<PublicKey, ClientResult>,
    /// Sampled clients of the open round that declined or failed, and why.
    failures: BTreeMap<PublicKey, String>,
    connected: BTreeSet<PublicKey>,
    actions: VecDeque<Action>,
    nonce: u64,
}

fn round_key(round: u64, client: &PublicKey) -> String {
    format!("updates/{round:06}/{}", client.to_hex())
}

impl Coordinator {
    /// A new federation starting from `initial` (e.g. a freshly initialised adapter: `B = 0`).
    pub fn new(cfg: CoordConfig, id: Identity, initial: Adapter, now_ms: u64) -> Result<Self> {
        cfg.validate().map_err(CoordinatorError::Config)?;
        let plan = Plan {
            max_rank: cfg.lora.rank,
            ..Plan::from_adapter(&initial)
        };
        let strategy = FedStrategy::new(cfg.effective_strategy(), initial.clone(), plan)
            .map_err(|e| CoordinatorError::Config(e.to_string()))?;
        let payload = peft::encode(&initial);
        let header = Self::sign_global(&cfg, &id, 0, [0; 32], &payload, now_ms, 0);
        let d = Durable {
            completed: 0,
            global_header: header,
            global_payload: payload,
            open: None,
            seen: BTreeSet::new(),
            rejections: BTreeMap::new(),
            finished: false,
        };
        let mut c = Self::assemble(cfg, id, strategy, d);
        c.persist_global(0);
        c.persist_state();
        Ok(c)
    }

    fn assemble(cfg: CoordConfig, id: Identity, strategy: FedStrategy, d: Durable) -> Self {
        Coordinator {
            cfg,
            id,
            strategy,
            d,
            results: BTreeMap::new(),
            failures: BTreeMap::new(),
            connected: BTreeSet::new(),
            actions: VecDeque::new(),
            nonce: 0,
        }
    }

    fn sign_global(
        cfg: &CoordConfig,
        id: &Identity,
        round: u64,
        parent: Digest,
        payload: &[u8],
        now_ms: u64,
        nonce: u64,
    ) -> SignedHeader {
        let mut n = [0u8; 16];
        n[..8].copy_from_slice(&nonce.to_le_bytes());
        n[8..].copy_from_slice(&round.to_le_bytes());
        seal(
            id,
            Seal {
                kind: PayloadKind::Global,
                federation: &cfg.federation,
                round,
                plan_hash: cfg.plan_hash,
                parent,
                nonce: n,
                now_ms,
                // Global adapters stay valid: clients check the signature and the digest.
                ttl_ms: u64::MAX / 4,
                num_examples: 0,
                metrics: Vec::new(),
            },
            payload,
        )
    }

    /// The current global adapter (PEFT safetensors bytes) and its signed header.
    pub fn global(&self) -> (&SignedHeader, &[u8]) {
        (&self.d.global_header, &self.d.global_payload)
    }

    /// The current global adapter.
    pub fn global_adapter(&self) -> &Adapter {
        &self.strategy.state.global
    }

    /// The coordinator's configuration.
    pub fn config(&self) -> &CoordConfig {
        &self.cfg
    }

    /// Rounds completed.
    pub fn completed_rounds(&self) -> u64 {
        self.d.completed
    }

    /// Whether every round ran.
    pub fn is_finished(&self) -> bool {
        self.d.finished
    }

    /// Rejections so far by reason label.
    pub fn rejections(&self) -> &BTreeMap<String, u64> {
        &self.d.rejections
    }

    /// The coordinator's public key.
    pub fn public_key(&self) -> PublicKey {
        self.id.public()
    }

    /// The next time [`Coordinator::handle_tick`] must be called.
    pub fn next_deadline(&self) -> Option<u64> {
        self.d.open.as_ref().map(|o| o.deadline_ms)
    }

    /// The next action for the driver.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    fn persist_state(&mut self) {
        self.actions.push_back(Action::Persist {
            key: "state".into(),
            bytes: postcard::to_stdvec(&(&self.d, &self.strategy.state)).expect("state encodes"),
        });
    }

    fn persist_global(&mut self, round: u64) {
        self.actions.push_back(Action::Persist {
            key: format!("global/{round:06}/adapter_model.safetensors"),
            bytes: self.d.global_payload.clone(),
        });
        let config = peft::adapter_config(&self.strategy.state.global, None);
        self.actions.push_back(Action::Persist {
            key: format!("global/{round:06}/adapter_config.json"),
            bytes: serde_json::to_vec_pretty(&config).expect("JSON serialises"),
        });
        self.actions.push_back(Action::Persist {
            key: format!("global/{round:06}/header.bin"),
            bytes: fedtune_protocol::messages::encode(&self.d.global_header),
        });
    }

    fn log(&mut self, e: RoundEvent) {
        self.actions.push_back(Action::Log(e));
    }

    /// A client connected (its key authenticated by the transport) and said hello.
    pub fn handle_hello(&mut self, now_ms: u64, client: PublicKey) {
        if !self.cfg.admitted.contains(&client) {
            self.reject(None, client, Rejection::UnknownKey(client.to_hex()));
            return;
        }
        self.connected.insert(client);
        self.actions.push_back(Action::Send {
            to: client,
            msg: ToClient::Welcome {
                coordinator: self.id.public(),
                federation: self.cfg.federation.clone(),
            },
        });
        if self.d.finished {
            self.actions.push_back(Action::Send {
                to: client,
                msg: ToClient::Finished {
                    global_digest: self.d.global_header.header.payload_digest,
                },
            });
            return;
        }
        // A sampled client that reconnects during its round gets the plan again.
        self.invite_again(now_ms, client);
        self.handle_tick(now_ms);
    }

    /// Sends a connected client sampled for the open round, whose update is not stored, the
    /// round's plan again (a client sends its pending update again on it). The daemon calls it
    /// for a client whose upload it refused for lack of room, once there is room.
    pub fn invite_again(&mut self, _now_ms: u64, client: PublicKey) {
        if let Some(open) = &self.d.open
            && open.sampled.contains(&client)
            && self.connected.contains(&client)
            && !self.results.contains_key(&client)
        {
            let msg = self.plan_msg(open.round, open.deadline_ms);
            self.actions.push_back(Action::Send { to: client, msg });
        }
    }

    /// A client disconnected.
    pub fn handle_disconnect(&mut self, _now_ms: u64, client: PublicKey) {
        self.connected.remove(&client);
    }

    fn plan_msg(&self, round: u64, deadline_ms: u64) -> ToClient {
        let (phase, hyper) = self.cfg.stage_of(round);
        ToClient::Plan {
            plan: Box::new(RoundPlan {
                federation: self.cfg.federation.clone(),
                round,
                phase,
                hyper: Hyper {
                    seed: hyper.seed ^ round,
                    ..hyper.clone()
                },
                lora: self.cfg.lora.clone(),
                global_digest: self.d.global_header.header.payload_digest,
                deadline_ms,
            }),
            global: Box::new(self.d.global_header.clone()),
            payload: self.d.global_payload.clone(),
        }
    }

    /// Time passed: opens a round when none is open, closes one at its deadline.
    pub fn handle_tick(&mut self, now_ms: u64) {
        if self.d.finished {
            return;
        }
        match &self.d.open {
            Some(open) if now_ms >= open.deadline_ms => self.settle(now_ms),
            Some(_) => {}
            None => {
                if self.connected.len() >= self.cfg.strategy.sampling.min_clients.max(1) {
                    let round = self.d.completed + 1;
                    self.open_round(now_ms, round);
                }
            }
        }
    }

    /// The round's deadline passed, or every sampled client answered (an update or a
    /// decline): close it with what it has, or sample again when that is too little.
    fn settle(&mut self, now_ms: u64) {
        let Some(open) = &self.d.open else {
            return;
        };
        if self.results.len() >= self.cfg.min_results {
            self.close(now_ms);
        } else {
            let round = open.round;
            let missing: Vec<PublicKey> = open
                .sampled
                .iter()
                .filter(|c| !self.results.contains_key(c))
                .copied()
                .collect();
            self.log(RoundEvent::RoundRetry {
                round,
                results: self.results.len(),
                needed: self.cfg.min_results,
                missing,
            });
            // Keep accepted updates; sample again with a new deadline.
            self.open_round(now_ms, round);
        }
    }

    /// Whether every sampled client of the open round has sent an update or declined.
    fn all_answered(&self) -> bool {
        self.d.open.as_ref().is_some_and(|o| {
            o.sampled
                .iter()
                .all(|c| self.results.contains_key(c) || self.failures.contains_key(c))
        })
    }

    fn open_round(&mut self, now_ms: u64, round: u64) {
        let available: Vec<String> = self.connected.iter().map(|c| c.to_hex()).collect();
        let fit = self.strategy.configure_fit(round, &available);
        // The strategy samples among the ids it was given: every one is a key's hex.
        let mut sampled: BTreeSet<PublicKey> = fit
            .iter()
            .filter_map(|f| PublicKey::from_hex(&f.client).ok())
            .collect();
        // Clients whose update is already accepted stay in the round.
        sampled.extend(self.results.keys().copied());
        let deadline_ms = now_ms.saturating_add(self.cfg.round_timeout_ms);
        self.d.open = Some(OpenRound {
            round,
            sampled: sampled.clone(),
            deadline_ms,
            opened_ms: now_ms,
        });
        self.persist_state();
        self.log(RoundEvent::RoundOpen {
            round,
            sampled: sampled.iter().copied().collect(),
            deadline_ms,
        });
        for c in sampled {
            if !self.results.contains_key(&c) {
                let msg = self.plan_msg(round, deadline_ms);
                self.actions.push_back(Action::Send { to: c, msg });
            }
        }
    }

    fn reject(&mut self, round: Option<u64>, client: PublicKey, why: Rejection) {
        *self
            .d
            .rejections
            .entry(why.label().to_string())
            .or_insert(0) += 1;
        tracing::warn!(client = %client, reason = %why, "update rejected");
        self.log(RoundEvent::Rejected {
            round,
            client,
            reason: why.label().to_string(),
            detail: why.to_string(),
        });
        if let Some(round) = round {
            self.actions.push_back(Action::Send {
                to: client,
                // `label: detail`, so that a client can count rejections by label.
                msg: ToClient::Rejected {
                    round,
                    reason: format!("{}: {why}", why.label()),
                },
            });
        }
    }

    /// A message from an authenticated client.
    pub fn handle_message(&mut self, now_ms: u64, from: PublicKey, msg: ToCoordinator) {
        match msg {
            ToCoordinator::Hello { client, .. } => {
                if client == from {
                    self.handle_hello(now_ms, client)
                } else {
                    self.reject(None, from, Rejection::UnknownKey(client.to_hex()))
                }
            }
            ToCoordinator::Decline { round, reason } => {
                let sampled = self
                    .d
                    .open
                    .as_ref()
                    .is_some_and(|o| o.round == round && o.sampled.contains(&from));
                let answered =
                    self.results.contains_key(&from) || self.failures.contains_key(&from);
                if sampled && !answered {
                    self.failures.insert(
                        from,
                        format!("declined ({}): {}", reason.label(), reason.detail()),
                    );
                    self.log(RoundEvent::Declined {
                        round,
                        client: from,
                        reason: reason.label().to_string(),
                        detail: reason.detail().to_string(),
                    });
                    // A decline counts at once: the round need not wait for its deadline.
                    if self.all_answered() {
                        self.settle(now_ms);
                    }
                }
            }
        }
    }

    /// The signed header of an upload, before its payload: the driver takes the payload only
    /// when this passes. A rejection is answered, logged and counted here.
    pub fn handle_upload_header(
        &mut self,
        now_ms: u64,
        from: PublicKey,
        header: &SignedHeader,
    ) -> std::result::Result<(), Rejection> {
        let r = self.check_header_only(now_ms, from, header);
        if let Err(why) = &r {
            self.reject(Some(header.header.round), from, why.clone());
        }
        r
    }

    /// A whole upload whose header passed [`Coordinator::handle_upload_header`]: the header is
    /// checked again (time has passed), then the payload (digest, decoding, validation);
    /// accepted, it is persisted and answered.
    pub fn handle_upload(&mut self, now_ms: u64, from: PublicKey, upload: Upload) {
        let Upload { header, payload } = upload;
        let header = *header;
        let round = header.header.round;
        let verdict = self.check_update(now_ms, from, &header, &payload);
        match verdict {
            Err(why) => self.reject(Some(round), from, why),
            Ok(adapter) => {
                let bytes = postcard::to_stdvec(&Stored {
                    header: header.clone(),
                    payload,
                })
                .expect("encodes");
                self.actions.push_back(Action::Persist {
                    key: round_key(round, &from),
                    bytes,
                });
                self.d.seen.insert((from, round));
                self.persist_state();
                self.results.insert(from, Self::result_of(&header, adapter));
                self.actions.push_back(Action::Send {
                    to: from,
                    msg: ToClient::Accepted { round },
                });
                self.log(RoundEvent::Accepted {
                    round,
                    client: from,
                    num_examples: header.header.num_examples,
                    bytes: header.header.payload_len,
                    metrics: header.header.metrics.iter().cloned().collect(),
                });
                if self.all_answered() {
                    self.settle(now_ms);
                }
            }
        }
    }

    fn close(&mut self, now_ms: u64) {
        let Some(open) = self.d.open.clone() else {
            return;
        };
        let results: Vec<ClientResult> = self.results.values().cloned().collect();
        let mut failed = std::mem::take(&mut self.failures);
        for c in &open.sampled {
            if !self.results.contains_key(c) && !failed.contains_key(c) {
                failed.insert(*c, "no update before the deadline".into());
            }
        }
        let failures: Vec<Failure> = failed
            .into_iter()
            .map(|(c, reason)| Failure {
                client: c.to_hex(),
                reason,
            })
            .collect();
        let outcome = match self.strategy.aggregate_fit(open.round, &results, &failures) {
            Ok(o) => o,
            Err(e) => {
                self.log(RoundEvent::AggregationFailed {
                    round: open.round,
                    error: e.to_string(),
                });
                self.results.clear();
                self.open_round(now_ms, open.round);
                return;
            }
        };
        let parent = self.d.global_header.header.payload_digest;
        let mut metrics = BTreeMap::new();
        let mut report = None;
        if let Some(g) = &outcome.global {
            self.d.global_payload = peft::encode(&self.strategy.state.global);
            self.nonce += 1;
            self.d.global_header = Self::sign_global(
                &self.cfg,
                &self.id,
                open.round,
                parent,
                &self.d.global_payload,
                now_ms,
                self.nonce,
            );
            metrics = g.metrics.clone();
            report = Some(g.report.clone());
        }
        self.d.completed = open.round;
        self.d.open = None;
        self.results.clear();
        self.d.finished = self.d.completed >= self.cfg.total_rounds();
        self.persist_global(open.round);
        self.persist_state();
        // The aggregation's ids are the hex of the keys it was given.
        let key = |id: &String| PublicKey::from_hex(id).ok();
        self.log(RoundEvent::RoundClosed(Box::new(RoundClosed {
            round: open.round,
            phase: self.cfg.stage_of(open.round).0,
            sampled: open.sampled.iter().copied().collect(),
            // What the aggregate is made of (an update that failed validation is not).
            used: report
                .as_ref()
                .map(|r| r.used.iter().filter_map(key).collect())
                .unwrap_or_default(),
            failures: outcome
                .failures
                .iter()
                .filter_map(|f| {
                    key(&f.client).map(|client| ClientFailure {
                        client,
                        reason: f.reason.clone(),
                    })
                })
                .collect(),
            metrics,
            report,
            seconds: (now_ms.saturating_sub(open.opened_ms)) as f64 / 1000.0,
            global_digest: hex::encode(self.d.global_header.header.payload_digest),
            rejections: self.d.rejections.clone(),
        })));
        if self.d.finished {
            let global_digest = self.d.global_header.header.payload_digest;
            for c in self.connected.clone() {
                self.actions.push_back(Action::Send {
                    to: c,
                    msg: ToClient::Finished { global_digest },
                });
            }
            self.actions.push_back(Action::Finished);
        } else {
            self.handle_tick(now_ms);
        }
    }
}

/// `digest` re-exported for drivers that name files by content.
pub fn payload_digest(bytes: &[u8]) -> Digest {
    digest(bytes)
}
