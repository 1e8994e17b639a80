//! In-memory federation with a simulated clock.
//!
//! One pass delivers every pending coordinator action (persisting into an in-memory store,
//! exactly what a daemon writes to disk), then every client action (training runs the real
//! engine and advances the clock by the client's simulated training time). When nothing is
//! pending the clock jumps to the coordinator's next deadline.

use std::collections::BTreeMap;

use fedtune_client::trainer::{LocalData, train_round};
use fedtune_client::{Client, ClientAction};
use fedtune_coordinator::{Action, CoordConfig, Coordinator};
use fedtune_engine::LlamaModel;
use fedtune_protocol::messages::{MAX_CONTROL, decode, encode};
use fedtune_protocol::{Identity, PublicKey, ToClient, ToCoordinator};

/// Errors of a simulation.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// Local training failed.
    #[error("client {client}: training: {source}")]
    Train {
        /// Client index.
        client: usize,
        /// Cause.
        source: fedtune_engine::Error,
    },
    /// The coordinator could not be rebuilt.
    #[error("coordinator: {0}")]
    Coordinator(#[from] fedtune_coordinator::CoordinatorError),
    /// The federation did not finish.
    #[error("the federation did not finish within {0} passes")]
    Stalled(usize),
}

/// A simulated client.
pub struct SimClient {
    /// The client's state machine.
    pub machine: Client,
    /// Its private data.
    pub data: LocalData,
    /// Whether it is connected.
    pub connected: bool,
    /// Every byte it sent (for leak checks).
    pub sent: Vec<u8>,
    /// Its local log.
    pub log: Vec<serde_json::Value>,
    /// Simulated training time per round, in milliseconds.
    pub train_ms: u64,
}

/// A federation in memory.
pub struct Federation<'a> {
    /// The coordinator.
    pub coordinator: Coordinator,
    /// The clients.
    pub clients: Vec<SimClient>,
    /// The shared base model.
    pub base: &'a LlamaModel,
    /// What the coordinator persisted.
    pub store: BTreeMap<String, Vec<u8>>,
    /// The coordinator's round log.
    pub log: Vec<serde_json::Value>,
    /// Simulated time (ms since the Unix epoch).
    pub now_ms: u64,
    /// LoRA α of the federation.
    pub lora_alpha: f64,
    /// Fault injection: rewrites what client `i` sends at time `now` (Byzantine clients,
    /// replays, forgeries); `None` sends messages unchanged.
    pub tamper: Option<Tamper<'a>>,
}

/// A message rewriter: `(client index, now, message) → messages actually sent`.
pub type Tamper<'a> = Box<dyn FnMut(usize, u64, ToCoordinator) -> Vec<ToCoordinator> + 'a>;

impl<'a> Federation<'a> {
    /// Connects every client.
    pub fn connect_all(&mut self) {
        for i in 0..self.clients.len() {
            self.connect(i);
        }
    }

    /// Connects client `i`.
    pub fn connect(&mut self, i: usize) {
        self.clients[i].connected = true;
        self.clients[i].machine.handle_connected(self.now_ms);
    }

    /// Disconnects client `i` (messages to it are dropped until it reconnects).
    pub fn disconnect(&mut self, i: usize) {
        self.clients[i].connected = false;
        let pk = self.clients[i].machine.public_key();
        self.coordinator.handle_disconnect(self.now_ms, pk);
    }

    fn index_of(&self, pk: &PublicKey) -> Option<usize> {
        self.clients
            .iter()
            .position(|c| c.machine.public_key() == *pk)
    }

    /// Delivers pending coordinator actions; returns whether there were any.
    fn drain_coordinator(&mut self) -> bool {
        let mut any = false;
        while let Some(a) = self.coordinator.poll_action() {
            any = true;
            match a {
                Action::Persist { key, bytes } => {
                    self.store.insert(key, bytes);
                }
                Action::Log(v) => self.log.push(v),
                Action::Finished => {}
                Action::Send { to, msg } => {
                    let Some(i) = self.index_of(&to) else {
                        continue;
                    };
                    if !self.clients[i].connected {
                        continue;
                    }
                    let bytes = encode(&msg);
                    let msg: ToClient =
                        decode(&bytes, usize::MAX, "message").expect("own encoding");
                    self.clients[i].machine.handle_message(self.now_ms, msg);
                }
            }
        }
        any
    }

    /// Runs client `i`'s pending actions; returns whether there were any.
    fn drain_client(&mut self, i: usize) -> Result<bool, SimError> {
        let mut any = false;
        while let Some(a) = self.clients[i].machine.poll_action() {
            any = true;
            match a {
                ClientAction::Log(v) => self.clients[i].log.push(v),
                ClientAction::Finished(_) => {}
                ClientAction::Send(msg) => {
                    if !self.clients[i].connected {
                        continue;
                    }
                    let msgs = match self.tamper.as_mut() {
                        Some(t) => t(i, self.now_ms, msg),
                        None => vec![msg],
                    };
                    for msg in msgs {
                        let bytes = encode(&msg);
                        self.clients[i].sent.extend_from_slice(&bytes);
                        let limit = MAX_CONTROL.max(bytes.len());
                        let msg: ToCoordinator =
                            decode(&bytes, limit, "message").expect("own encoding");
                        let pk = self.clients[i].machine.public_key();
                        self.coordinator.handle_message(self.now_ms, pk, msg);
                        self.drain_coordinator();
                    }
                }
                ClientAction::Train(job) => {
                    let out = train_round(self.base, &self.clients[i].data, &job, self.lora_alpha)
                        .map_err(|source| SimError::Train { client: i, source })?;
                    self.now_ms += self.clients[i].train_ms;
                    self.clients[i].machine.handle_trained(
                        self.now_ms,
                        job.plan.round,
                        &out.adapter,
                        out.num_examples,
                        out.metrics,
                    );
                }
            }
        }
        Ok(any)
    }

    /// One pass; returns whether anything happened.
    pub fn pass(&mut self) -> Result<bool, SimError> {
        let mut any = self.drain_coordinator();
        for i in 0..self.clients.len() {
            any |= self.drain_client(i)?;
        }
        if !any && !self.coordinator.is_finished() {
            match self.coordinator.next_deadline() {
                Some(d) => self.now_ms = self.now_ms.max(d),
                None => self.now_ms += 1000,
            }
            self.coordinator.handle_tick(self.now_ms);
            any = true;
        }
        Ok(any)
    }

    /// Runs until the coordinator finishes.
    pub fn run(&mut self, max_passes: usize) -> Result<(), SimError> {
        self.run_until(max_passes, |_| false).map(|_| ())
    }

    /// Runs until the coordinator finishes or `stop` is true of the round log; returns whether
    /// it stopped early.
    pub fn run_until(
        &mut self,
        max_passes: usize,
        mut stop: impl FnMut(&[serde_json::Value]) -> bool,
    ) -> Result<bool, SimError> {
        for _ in 0..max_passes {
            if self.coordinator.is_finished() {
                self.drain_coordinator();
                return Ok(false);
            }
            if stop(&self.log) {
                return Ok(true);
            }
            self.pass()?;
        }
        Err(SimError::Stalled(max_passes))
    }

    /// Kills the coordinator (its memory is lost; pending actions are dropped) and restarts it
    /// from what it persisted; every client reconnects.
    pub fn crash_and_restart(&mut self, cfg: CoordConfig, id: Identity) -> Result<(), SimError> {
        self.coordinator = Coordinator::recover(cfg, id, &self.store)?;
        self.log
            .push(serde_json::json!({"event": "coordinator_restart"}));
        for c in self.clients.iter_mut() {
            c.connected = false;
        }
        self.connect_all();
        Ok(())
    }
}
