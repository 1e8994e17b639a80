//! In-memory federation with a simulated clock (a discrete-event simulation).
//!
//! One pass delivers every pending coordinator action (persisting into an in-memory store,
//! exactly what a daemon writes to disk), then every client action. A training job runs the
//! real engine at once, but its update is handed to the client's state machine only at the
//! simulated time it would finish (clients train side by side, each for its own simulated
//! duration). When nothing is pending the clock jumps to the earliest of the next scheduled
//! event (a finished training job, a reconnection) and the coordinator's deadline.

use std::collections::BTreeMap;

use fedtune_client::trainer::{Base, LocalData, TrainOutcome, train_round};
use fedtune_client::{Client, ClientAction, ClientEvent, TrainJob};
use fedtune_coordinator::{Action, CoordConfig, Coordinator, RoundEvent};
use fedtune_protocol::messages::{MAX_CONTROL, decode, encode};
use fedtune_protocol::{Identity, PublicKey, SignedHeader, ToClient, ToCoordinator, Upload};

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
    /// Writing results.
    #[error("{0}")]
    Io(String),
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
    pub log: Vec<ClientEvent>,
    /// Simulated training time per round, in milliseconds (without a fate hook).
    pub train_ms: u64,
    /// Wall-clock seconds spent training this client.
    pub train_wall_s: f64,
    /// Metrics of its last training job.
    pub last_metrics: Vec<(String, f64)>,
}

impl SimClient {
    /// A disconnected client with no history.
    pub fn new(machine: Client, data: LocalData, train_ms: u64) -> Self {
        SimClient {
            machine,
            data,
            connected: false,
            sent: Vec::new(),
            log: Vec::new(),
            train_ms,
            train_wall_s: 0.0,
            last_metrics: Vec::new(),
        }
    }
}

/// A federation in memory.
pub struct Federation<'a> {
    /// The coordinator.
    pub coordinator: Coordinator,
    /// The clients.
    pub clients: Vec<SimClient>,
    /// The shared read-only base model, on the training device.
    pub base: &'a Base,
    /// What the coordinator persisted.
    pub store: BTreeMap<String, Vec<u8>>,
    /// The coordinator's round log.
    pub log: Vec<RoundEvent>,
    /// Simulated time (ms since the Unix epoch).
    pub now_ms: u64,
    /// Fault injection: rewrites what client `i` sends at time `now` (Byzantine clients,
    /// replays, forgeries); `None` sends messages unchanged.
    pub tamper: Option<Tamper<'a>>,
    /// Fault injection: decides what happens to each training job (`None`: every client
    /// trains for its `train_ms`).
    pub fate: Option<FateHook<'a>>,
    /// Fault injection: rewrites a job's outcome before the client signs it (a Byzantine
    /// client with a valid key).
    pub corrupt: Option<CorruptHook<'a>>,
    /// Simulator events (dropouts, crashes, reconnections) for reports.
    pub events: Vec<serde_json::Value>,
    /// Training jobs run side by side at most.
    pub parallel: usize,
    /// Wall-clock seconds spent inside the coordinator's state machine.
    pub coordinator_s: f64,
    /// Bytes of memory that parallel training may fill (`None`: no cap): resident memory on
    /// the host, the device's memory on a GPU.
    pub memory_budget: Option<u64>,
    /// One training job's measured peak memory.
    pub per_job_bytes: Option<u64>,
    /// Scheduled events by (time, sequence number).
    queue: BTreeMap<(u64, u64), Event>,
    seq: u64,
    /// Jobs collected in this pass: (client, job, simulated time, crash).
    jobs: Vec<(usize, Box<TrainJob>, u64, Option<u64>)>,
}

/// What a client sends: a control message, or an update's upload (header, then payload).
#[derive(Debug, Clone, PartialEq)]
pub enum Sent {
    /// A control message.
    Message(ToCoordinator),
    /// An upload.
    Upload(Upload),
}

/// A rewriter of what clients send: `(client index, now, sent) → what is actually sent`.
pub type Tamper<'a> = Box<dyn FnMut(usize, u64, Sent) -> Vec<Sent> + 'a>;
/// Decides a job's fate: `(client index, job, now) → fate`.
pub type FateHook<'a> = Box<dyn FnMut(usize, &TrainJob, u64) -> Fate + 'a>;
/// Rewrites a job's outcome: `(client index, round, outcome)`.
pub type CorruptHook<'a> = Box<dyn FnMut(usize, u64, &mut TrainOutcome) + 'a>;

/// What happens to a training job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// The client trains for this many simulated milliseconds, then uploads.
    Train {
        /// Simulated training time.
        ms: u64,
    },
    /// The client drops out (disconnects without training) and comes back after the round's
    /// deadline.
    DropOut,
    /// The client trains for `ms`, then its connection drops in the middle of the upload
    /// (nothing arrives); it reconnects after `reconnect_ms` and sends the update again.
    CrashMidUpload {
        /// Simulated training time.
        ms: u64,
        /// Time until it reconnects.
        reconnect_ms: u64,
    },
}

/// A scheduled event.
enum Event {
    Trained {
        client: usize,
        round: u64,
        outcome: Box<TrainOutcome>,
        crash: Option<u64>,
    },
    Reconnect {
        client: usize,
    },
}

impl<'a> Federation<'a> {
    /// A federation of `clients` around `coordinator` (nobody connected yet), at `now_ms`.
    pub fn new(
        coordinator: Coordinator,
        clients: Vec<SimClient>,
        base: &'a Base,
        now_ms: u64,
    ) -> Self {
        Federation {
            coordinator,
            clients,
            base,
            store: BTreeMap::new(),
            log: Vec::new(),
            now_ms,
            tamper: None,
            fate: None,
            corrupt: None,
            events: Vec::new(),
            parallel: 1,
            coordinator_s: 0.0,
            memory_budget: None,
            per_job_bytes: None,
            queue: BTreeMap::new(),
            seq: 0,
            jobs: Vec::new(),
        }
    }

    fn schedule(&mut self, at: u64, e: Event) {
        self.seq += 1;
        self.queue.insert((at, self.seq), e);
    }

    fn event(&mut self, v: serde_json::Value) {
        self.events.push(v);
    }

    /// Every client's data, in client order.
    pub fn client_data(&self) -> Vec<&LocalData> {
        self.clients.iter().map(|c| &c.data).collect()
    }

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
        let t = std::time::Instant::now();
        self.coordinator.handle_disconnect(self.now_ms, pk);
        self.coordinator_s += t.elapsed().as_secs_f64();
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
                ClientAction::Stop(reason) => {
                    return Err(SimError::Io(format!("client {i} stopped: {reason}")));
                }
                ClientAction::Send(msg) => self.send(i, Sent::Message(msg)),
                ClientAction::Upload(u) => self.send(i, Sent::Upload(u)),
                ClientAction::Train(job) => {
                    let fate = match self.fate.as_mut() {
                        Some(f) => f(i, &job, self.now_ms),
                        None => Fate::Train {
                            ms: self.clients[i].train_ms,
                        },
                    };
                    let round = job.plan.round;
                    let (ms, crash) = match fate {
                        Fate::DropOut => {
                            self.event(serde_json::json!({
                                "event": "dropout", "round": round, "client": i,
                            }));
                            self.clients[i].machine.handle_abandoned(round);
                            self.disconnect(i);
                            let back = job.plan.deadline_ms.max(self.now_ms) + 1;
                            self.schedule(back, Event::Reconnect { client: i });
                            continue;
                        }
                        Fate::Train { ms } => (ms, None),
                        Fate::CrashMidUpload { ms, reconnect_ms } => (ms, Some(reconnect_ms)),
                    };
                    self.jobs.push((i, job, ms, crash));
                }
            }
        }
        Ok(any)
    }

    /// Carries what client `i` sends to the coordinator as the daemons do: through the wire
    /// encoding, an upload's header first (the payload is taken only when it passes), then the
    /// whole upload; the client hears how its upload went.
    fn send(&mut self, i: usize, sent: Sent) {
        if !self.clients[i].connected {
            return;
        }
        let sent = match self.tamper.as_mut() {
            Some(t) => t(i, self.now_ms, sent),
            None => vec![sent],
        };
        let pk = self.clients[i].machine.public_key();
        for s in sent {
            let t = std::time::Instant::now();
            match s {
                Sent::Message(msg) => {
                    let bytes = encode(&msg);
                    self.clients[i].sent.extend_from_slice(&bytes);
                    let msg: ToCoordinator =
                        decode(&bytes, MAX_CONTROL, "message").expect("own encoding");
                    self.coordinator.handle_message(self.now_ms, pk, msg);
                }
                Sent::Upload(u) => {
                    let bytes = encode(&*u.header);
                    self.clients[i].sent.extend_from_slice(&bytes);
                    let header: SignedHeader =
                        decode(&bytes, MAX_CONTROL, "update header").expect("own encoding");
                    let round = header.header.round;
                    if self
                        .coordinator
                        .handle_upload_header(self.now_ms, pk, &header)
                        .is_ok()
                    {
                        self.clients[i].sent.extend_from_slice(&u.payload);
                        let upload = Upload {
                            header: Box::new(header),
                            payload: u.payload,
                        };
                        self.coordinator.handle_upload(self.now_ms, pk, upload);
                        self.clients[i]
                            .machine
                            .handle_uploaded(self.now_ms, round, 0);
                    } else {
                        self.clients[i]
                            .machine
                            .handle_upload_refused(self.now_ms, round);
                    }
                }
            }
            self.coordinator_s += t.elapsed().as_secs_f64();
            self.drain_coordinator();
        }
    }

    /// Runs the jobs collected in this pass through the real engine (up to `parallel` at a
    /// time on threads sharing the read-only base model) and schedules their results.
    fn run_jobs(&mut self) -> Result<(), SimError> {
        let jobs = std::mem::take(&mut self.jobs);
        let base = self.base;
        let clients = &self.clients;
        let train = |i: usize, job: &TrainJob| {
            let t = std::time::Instant::now();
            let r = train_round(base, &clients[i].data, job)
                .map_err(|source| SimError::Train { client: i, source });
            (r, t.elapsed().as_secs_f64())
        };
        let mut results = Vec::with_capacity(jobs.len());
        let mut next = 0;
        while next < jobs.len() {
            let width = self.width().min(jobs.len() - next);
            let chunk = &jobs[next..next + width];
            next += width;
            let meter = Meter::of(base);
            if chunk.len() == 1
                && meter.measures(self.memory_budget)
                && self.per_job_bytes.is_none()
            {
                // Measure one job's peak memory before running jobs side by side.
                let before = meter.reset_peak();
                let (i, job, ..) = &chunk[0];
                results.push(train(*i, job));
                if let (Some(b), Some(peak)) = (before, meter.peak()) {
                    let per = peak.saturating_sub(b).max(1);
                    self.per_job_bytes = Some(per);
                    let width = self.width();
                    self.events.push(serde_json::json!({
                        "event": "job_memory", "device": meter.name(), "bytes": per,
                        "side_by_side": width,
                    }));
                }
                continue;
            }
            if chunk.len() == 1 {
                let (i, job, ..) = &chunk[0];
                results.push(train(*i, job));
                continue;
            }
            std::thread::scope(|s| {
                let handles: Vec<_> = chunk
                    .iter()
                    .map(|(i, job, ..)| s.spawn(move || train(*i, job)))
                    .collect();
                for h in handles {
                    results.push(h.join().expect("training thread"));
                }
            });
        }
        for ((i, job, ms, crash), (out, wall)) in jobs.into_iter().zip(results) {
            let mut out = out?;
            self.clients[i].train_wall_s += wall;
            let round = job.plan.round;
            if let Some(c) = self.corrupt.as_mut() {
                c(i, round, &mut out);
            }
            let at = self.now_ms + ms;
            self.schedule(
                at,
                Event::Trained {
                    client: i,
                    round,
                    outcome: Box::new(out),
                    crash,
                },
            );
        }
        Ok(())
    }

    /// How many jobs may run side by side now: `parallel`, capped by the room left for them
    /// once one job's peak has been measured (one at a time until then, where jobs are
    /// measured: under a memory budget, and always on a GPU).
    fn width(&self) -> usize {
        let meter = Meter::of(self.base);
        side_by_side(
            self.parallel,
            meter.measures(self.memory_budget),
            self.per_job_bytes,
            meter.room(self.memory_budget),
        )
    }

    /// Carries out a scheduled event at its time.
    fn apply(&mut self, at: u64, e: Event) {
        self.now_ms = self.now_ms.max(at);
        match e {
            Event::Reconnect { client } => {
                if !self.clients[client].connected {
                    self.event(serde_json::json!({"event": "reconnect", "client": client}));
                    self.connect(client);
                }
            }
            Event::Trained {
                client,
                round,
                outcome,
                crash,
            } => {
                let c = &mut self.clients[client];
                c.last_metrics = outcome.metrics.clone();
                c.machine.handle_trained(
                    self.now_ms,
                    round,
                    &outcome.adapter,
                    outcome.num_examples,
                    outcome.metrics,
                );
                if let Some(reconnect_ms) = crash {
                    // The update is signed and queued, then the connection drops mid-upload:
                    // nothing reaches the coordinator.
                    while let Some(a) = self.clients[client].machine.poll_action() {
                        if let ClientAction::Log(v) = a {
                            self.clients[client].log.push(v);
                        }
                    }
                    self.event(serde_json::json!({
                        "event": "crash_mid_upload", "round": round, "client": client,
                    }));
                    self.disconnect(client);
                    self.schedule(self.now_ms + reconnect_ms, Event::Reconnect { client });
                }
            }
        }
    }

    fn tick(&mut self, at: u64) {
        self.now_ms = self.now_ms.max(at);
        let t = std::time::Instant::now();
        self.coordinator.handle_tick(self.now_ms);
        self.coordinator_s += t.elapsed().as_secs_f64();
    }

    /// One pass; returns whether anything happened.
    pub fn pass(&mut self) -> Result<bool, SimError> {
        let mut any = self.drain_coordinator();
        for i in 0..self.clients.len() {
            any |= self.drain_client(i)?;
        }
        self.run_jobs()?;
        if !any && !self.coordinator.is_finished() {
            let deadline = self.coordinator.next_deadline();
            let next = self.queue.keys().next().map(|k| k.0);
            match (next, deadline) {
                (Some(t), Some(d)) if d < t => self.tick(d),
                (Some(_), _) => {
                    let (k, e) = self.queue.pop_first().expect("non-empty");
                    self.apply(k.0, e);
                }
                (None, Some(d)) => self.tick(d),
                (None, None) => self.tick(self.now_ms + 1000),
            }
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
        mut stop: impl FnMut(&[RoundEvent]) -> bool,
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
        self.events
            .push(serde_json::json!({"event": "coordinator_restart"}));
        for c in self.clients.iter_mut() {
            c.connected = false;
        }
        self.connect_all();
        Ok(())
    }
}

/// How many jobs run side by side: `parallel`, capped by how many jobs of `per_job` bytes fit
/// in `room`; where jobs are measured (`measures`), one until a job's peak is known.
fn side_by_side(parallel: usize, measures: bool, per_job: Option<u64>, room: Option<u64>) -> usize {
    let p = parallel.max(1);
    if !measures {
        return p;
    }
    match (per_job, room) {
        (None, _) => 1,
        (Some(_), None) => p,
        (Some(per), Some(room)) => p.min((room / per.max(1)) as usize).max(1),
    }
}

/// Where a training job's memory is counted: the process's resident memory when clients
/// train on the host, the device's memory pool when they train on a GPU.
enum Meter<'m> {
    Host,
    Gpu(&'m fedtune_engine::cuda::Gpu),
}

impl Meter<'_> {
    fn of(base: &Base) -> Meter<'_> {
        match base {
            Base::Host(_) => Meter::Host,
            Base::Gpu(m) => Meter::Gpu(&m.gpu),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Meter::Host => "host",
            Meter::Gpu(_) => "cuda",
        }
    }

    /// Whether jobs run side by side only after one job's peak is measured: under a budget,
    /// and always on a GPU, whose memory is fixed and not swapped.
    fn measures(&self, budget: Option<u64>) -> bool {
        matches!(self, Meter::Gpu(_)) || budget.is_some()
    }

    /// Resets the peak; the bytes in use now (`None`: not measurable here).
    fn reset_peak(&self) -> Option<u64> {
        match self {
            Meter::Host => reset_peak_rss(),
            Meter::Gpu(g) => {
                g.synchronize().ok()?;
                g.reset_peak().ok()?;
                g.used_bytes().ok()
            }
        }
    }

    /// The peak since [`Meter::reset_peak`].
    fn peak(&self) -> Option<u64> {
        match self {
            Meter::Host => peak_rss(),
            Meter::Gpu(g) => g.peak_bytes().ok(),
        }
    }

    /// Bytes more jobs may fill now: what is left of `budget` (bytes in use in all), and on a
    /// GPU no more than 90% of what the device can still allocate (`None`: no limit known).
    fn room(&self, budget: Option<u64>) -> Option<u64> {
        match self {
            Meter::Host => budget.map(|b| b.saturating_sub(current_rss().unwrap_or(0))),
            Meter::Gpu(g) => {
                let free = g.available_bytes().ok().map(|a| a / 10 * 9);
                let left = budget.map(|b| b.saturating_sub(g.used_bytes().unwrap_or(0)));
                match (free, left) {
                    (Some(f), Some(l)) => Some(f.min(l)),
                    (f, l) => f.or(l),
                }
            }
        }
    }
}

fn status_kb(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok()
}

/// Resident memory now, in bytes (Linux; `None` elsewhere).
fn current_rss() -> Option<u64> {
    status_kb("VmRSS:").map(|kb| kb * 1024)
}

/// Peak resident memory since the last reset, in bytes.
fn peak_rss() -> Option<u64> {
    status_kb("VmHWM:").map(|kb| kb * 1024)
}

/// Resets the peak to the current resident memory (`/proc/self/clear_refs`); returns the
/// current resident memory, or `None` when the peak cannot be reset.
fn reset_peak_rss() -> Option<u64> {
    std::fs::write("/proc/self/clear_refs", "5").ok()?;
    current_rss()
}

#[cfg(test)]
mod tests {
    use super::side_by_side;

    #[test]
    fn jobs_side_by_side_are_capped_by_the_room_for_measured_jobs() {
        // Unmeasured (host without a budget): `parallel` as asked.
        assert_eq!(side_by_side(4, false, None, None), 4);
        assert_eq!(side_by_side(0, false, None, None), 1);
        // Measured: one at a time until a job's peak is known.
        assert_eq!(side_by_side(4, true, None, Some(1 << 40)), 1);
        // Then as many as fit, at most `parallel`, at least one.
        assert_eq!(side_by_side(4, true, Some(100), Some(250)), 2);
        assert_eq!(side_by_side(4, true, Some(100), Some(10_000)), 4);
        assert_eq!(side_by_side(4, true, Some(100), Some(50)), 1);
        assert_eq!(side_by_side(4, true, Some(100), None), 4);
    }
}
