//! The client state machine: hello → welcome (the coordinator's key must be the pinned one) →
//! for each plan: verify the signed global adapter (signature by the pinned key, federation,
//! plan hash, digest), ask the driver to train, sign and send the update → finished.

use std::collections::VecDeque;

use fedtune_aggregation::Adapter;
use fedtune_protocol::envelope::{Digest, PayloadKind, Seal, check_payload_digest, seal};
use fedtune_protocol::{
    DeclineReason, Identity, LoraPlan, PROTOCOL_VERSION, PublicKey, RoundPlan, SignedHeader,
    ToClient, ToCoordinator, Upload, peft, plan_hash,
};

use crate::event::ClientEvent;

/// What a client knows before it connects.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Federation id.
    pub federation: String,
    /// The coordinator's pinned key.
    pub coordinator: PublicKey,
    /// Digest of the local base model ([`fedtune_protocol::model_digest`]): a plan's global
    /// adapter must be signed for it and the plan's LoRA configuration
    /// ([`fedtune_protocol::plan_hash`]).
    pub model_digest: Digest,
    /// The LoRA settings this site insists on (`client.toml`'s `rank`, `lora_alpha`,
    /// `target_modules`); the plan's are taken where it names none.
    pub lora_pin: LoraPin,
    /// Validity of the headers it signs.
    pub header_ttl_ms: u64,
    /// Largest global adapter accepted.
    pub max_payload: u64,
}

/// LoRA settings a client requires of the plans it trains; a plan with other values is
/// declined with the setting named.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoraPin {
    /// Required rank.
    pub rank: Option<usize>,
    /// Required α.
    pub lora_alpha: Option<f64>,
    /// Required target modules (in the plan's order).
    pub target_modules: Option<Vec<String>>,
}

impl LoraPin {
    /// Why `plan` breaks the pin, naming the first setting that differs.
    pub fn mismatch(&self, plan: &LoraPlan) -> Option<String> {
        let differ = |field: &str, ours: String, theirs: String| {
            Some(format!(
                "the plan's LoRA {field} is {theirs}, this client requires {ours}"
            ))
        };
        if let Some(r) = self.rank.filter(|&r| r != plan.rank) {
            return differ("rank", r.to_string(), plan.rank.to_string());
        }
        if let Some(a) = self.lora_alpha.filter(|&a| a != plan.lora_alpha) {
            return differ("lora_alpha", a.to_string(), plan.lora_alpha.to_string());
        }
        if let Some(t) = self
            .target_modules
            .as_ref()
            .filter(|t| **t != plan.target_modules)
        {
            return differ(
                "target_modules",
                format!("{t:?}"),
                format!("{:?}", plan.target_modules),
            );
        }
        None
    }
}

/// A local training job.
#[derive(Debug, Clone)]
pub struct TrainJob {
    /// The round plan.
    pub plan: RoundPlan,
    /// The verified global adapter to start from.
    pub global: Adapter,
}

/// What the driver must do.
#[derive(Debug, Clone)]
pub enum ClientAction {
    /// Send a control message to the coordinator.
    Send(ToCoordinator),
    /// Upload an update on a stream of its own (header, the coordinator's offset, payload),
    /// then call [`Client::handle_uploaded`] or [`Client::handle_upload_refused`].
    Upload(Upload),
    /// Run local training, then call [`Client::handle_trained`].
    Train(Box<TrainJob>),
    /// Append to the local log.
    Log(ClientEvent),
    /// The federation finished with this global adapter digest.
    Finished(Digest),
    /// Stop: continuing cannot succeed (the coordinator is not the pinned one).
    Stop(String),
}

/// The client state machine.
pub struct Client {
    cfg: ClientConfig,
    id: Identity,
    actions: VecDeque<ClientAction>,
    welcomed: bool,
    /// Round being trained or uploaded.
    current: Option<RoundPlan>,
    nonce: u64,
    /// Rounds whose update the coordinator stored.
    pub accepted: Vec<u64>,
    /// The signed update of the current round until the coordinator answers it (sent again
    /// when the coordinator sends the round's plan again, e.g. after a dropped connection).
    pending: Option<Upload>,
    /// The round whose local training failed and why (told again if its plan comes again).
    failed: Option<(u64, String)>,
}

impl Client {
    /// A client with identity `id`.
    pub fn new(cfg: ClientConfig, id: Identity) -> Self {
        Client {
            cfg,
            id,
            actions: VecDeque::new(),
            welcomed: false,
            current: None,
            nonce: 0,
            accepted: Vec::new(),
            pending: None,
            failed: None,
        }
    }

    /// The client's public key.
    pub fn public_key(&self) -> PublicKey {
        self.id.public()
    }

    /// Connected (or reconnected): say hello.
    pub fn handle_connected(&mut self, _now_ms: u64) {
        self.welcomed = false;
        self.actions
            .push_back(ClientAction::Send(ToCoordinator::Hello {
                version: PROTOCOL_VERSION,
                client: self.id.public(),
            }));
    }

    /// The next action.
    pub fn poll_action(&mut self) -> Option<ClientAction> {
        self.actions.pop_front()
    }

    fn log(&mut self, v: ClientEvent) {
        self.actions.push_back(ClientAction::Log(v));
    }

    fn verify_global(
        &self,
        plan: &RoundPlan,
        h: &SignedHeader,
        payload: &[u8],
    ) -> Result<Adapter, String> {
        let hd = &h.header;
        if hd.signer != self.cfg.coordinator || !h.signature_valid() {
            return Err("global adapter not signed by the pinned coordinator key".into());
        }
        if hd.kind != PayloadKind::Global
            || hd.federation != self.cfg.federation
            || plan.federation != self.cfg.federation
        {
            return Err("global adapter or plan of another federation".into());
        }
        if hd.plan_hash != plan_hash(&self.cfg.model_digest, &plan.lora) {
            return Err("global adapter for another base model or LoRA configuration".into());
        }
        if let Some(why) = self.cfg.lora_pin.mismatch(&plan.lora) {
            return Err(why);
        }
        if hd.payload_len > self.cfg.max_payload {
            return Err(format!(
                "global adapter of {} bytes is too large",
                hd.payload_len
            ));
        }
        check_payload_digest(hd, payload).map_err(|e| e.to_string())?;
        if hd.payload_digest != plan.global_digest {
            return Err("the plan names another global adapter".into());
        }
        peft::decode(payload, &peft::Limits::default(), |_, r| plan.lora.scale(r))
            .map_err(|e| e.to_string())
    }

    /// A message from the coordinator.
    pub fn handle_message(&mut self, _now_ms: u64, msg: ToClient) {
        match msg {
            ToClient::Welcome { coordinator, .. } => {
                if coordinator == self.cfg.coordinator {
                    self.welcomed = true;
                } else {
                    let reason = format!(
                        "the coordinator identifies as key {}, not the pinned coordinator_key {}",
                        coordinator.to_hex(),
                        self.cfg.coordinator.to_hex()
                    );
                    self.log(ClientEvent::Error {
                        reason: reason.clone(),
                    });
                    self.actions.push_back(ClientAction::Stop(reason));
                }
            }
            ToClient::Plan {
                plan,
                global,
                payload,
            } => {
                if !self.welcomed {
                    return;
                }
                if self.accepted.contains(&plan.round) {
                    return;
                }
                if self.current.as_ref().is_some_and(|p| p.round == plan.round) {
                    // The coordinator asks again: our upload did not arrive.
                    if let Some(upload) = self.pending.clone() {
                        self.log(ClientEvent::Resend { round: plan.round });
                        self.actions.push_back(ClientAction::Upload(upload));
                    } else if let Some((_, error)) =
                        self.failed.clone().filter(|(r, _)| *r == plan.round)
                    {
                        // Our decline may have been lost with the connection.
                        self.actions
                            .push_back(ClientAction::Send(ToCoordinator::Decline {
                                round: plan.round,
                                reason: DeclineReason::Training(error),
                            }));
                    }
                    return;
                }
                match self.verify_global(&plan, &global, &payload) {
                    Ok(adapter) => {
                        self.current = Some((*plan).clone());
                        self.log(ClientEvent::Plan { round: plan.round });
                        self.actions
                            .push_back(ClientAction::Train(Box::new(TrainJob {
                                plan: *plan,
                                global: adapter,
                            })));
                    }
                    Err(reason) => {
                        self.log(ClientEvent::PlanRejected {
                            round: plan.round,
                            reason: reason.clone(),
                        });
                        self.actions
                            .push_back(ClientAction::Send(ToCoordinator::Decline {
                                round: plan.round,
                                reason: DeclineReason::Plan(reason),
                            }));
                    }
                }
            }
            ToClient::Accepted { round } => {
                self.accepted.push(round);
                if self.current.as_ref().is_some_and(|p| p.round == round) {
                    self.current = None;
                    self.pending = None;
                }
                self.log(ClientEvent::Accepted { round });
            }
            ToClient::Rejected { round, reason } => {
                if self.current.as_ref().is_some_and(|p| p.round == round) {
                    self.current = None;
                    self.pending = None;
                }
                self.log(ClientEvent::Rejected { round, reason });
            }
            ToClient::Finished { global_digest } => {
                self.actions
                    .push_back(ClientAction::Finished(global_digest));
            }
        }
    }

    /// The driver gave up `round`'s job without training (the client went away): a later
    /// plan for the same round trains again.
    pub fn handle_abandoned(&mut self, round: u64) {
        if self.current.as_ref().is_some_and(|p| p.round == round) && self.pending.is_none() {
            self.current = None;
        }
    }

    /// Local training of `round` failed: the coordinator is told why at once (it counts the
    /// client as a failure of the round instead of waiting for the deadline), and the local log
    /// says it. A later plan for the same round is not trained again.
    pub fn handle_train_failed(&mut self, _now_ms: u64, round: u64, error: String) {
        if self.current.as_ref().is_none_or(|p| p.round != round) || self.pending.is_some() {
            return;
        }
        self.log(ClientEvent::TrainFailed {
            round,
            error: error.clone(),
        });
        self.failed = Some((round, error.clone()));
        self.actions
            .push_back(ClientAction::Send(ToCoordinator::Decline {
                round,
                reason: DeclineReason::Training(error),
            }));
    }

    /// Local training of `round` finished: sign and send the update.
    pub fn handle_trained(
        &mut self,
        now_ms: u64,
        round: u64,
        adapter: &Adapter,
        num_examples: u64,
        metrics: Vec<(String, f64)>,
    ) {
        let Some(plan) = self.current.clone().filter(|p| p.round == round) else {
            return;
        };
        let payload = peft::encode(adapter);
        self.nonce += 1;
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&self.nonce.to_le_bytes());
        nonce[8..].copy_from_slice(&round.to_le_bytes());
        let header = seal(
            &self.id,
            Seal {
                kind: PayloadKind::Update,
                federation: &self.cfg.federation,
                round,
                plan_hash: plan_hash(&self.cfg.model_digest, &plan.lora),
                parent: plan.global_digest,
                nonce,
                now_ms,
                ttl_ms: self.cfg.header_ttl_ms,
                num_examples,
                metrics,
            },
            &payload,
        );
        let upload = Upload {
            header: Box::new(header),
            payload,
        };
        self.pending = Some(upload.clone());
        self.actions.push_back(ClientAction::Upload(upload));
    }

    /// The payload of `round`'s upload was sent from `resumed_from` (the bytes the coordinator
    /// already held); its answer comes as a message.
    pub fn handle_uploaded(&mut self, _now_ms: u64, round: u64, resumed_from: u64) {
        if let Some(u) = self
            .pending
            .as_ref()
            .filter(|u| u.header.header.round == round)
        {
            let bytes = u.payload.len() as u64;
            self.log(ClientEvent::Uploaded {
                round,
                bytes,
                resumed_from,
            });
        }
    }

    /// The coordinator refused `round`'s upload before its payload (a rejection comes as a
    /// message) or had no room for it: the update is kept and sent again when the round's plan
    /// comes again.
    pub fn handle_upload_refused(&mut self, _now_ms: u64, round: u64) {
        self.log(ClientEvent::UploadRefused { round });
    }
}
