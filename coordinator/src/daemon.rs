//! The coordinator daemon: the thin tokio/quinn driver of [`Coordinator`].
//!
//! Each connection is authenticated twice: its TLS client certificate must chain to the
//! federation CA (rustls), and the ed25519 key it announces in `Hello` must be the key admitted
//! for the certificate's common name. One identity holds at most
//! [`ConnectionLimits::per_client`] connections, each must say `Hello` within
//! [`ConnectionLimits::hello_timeout`], and the newest connection that said it is the client's
//! only route (older ones are closed as superseded; their end changes nothing). Control
//! messages are length-prefixed postcard frames on the connection's first bidirectional stream.
//! Each update comes on its own bidirectional stream: a header frame, checked by
//! [`Coordinator::handle_upload_header`] before a byte of payload is read (a rejected stream is
//! stopped); the coordinator answers with the number of payload bytes it already holds for that
//! (client, round, digest) — uploads resume after a dropped connection — and the client sends
//! the rest, appended to a file under `incoming/` (never past the signed length) and handed to
//! [`Coordinator::handle_upload`] once complete. One task owns the machine; actions are carried
//! out in order (`Persist` through [`FileStore`] before any later `Send`).

use std::collections::{BTreeMap, VecDeque};
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedtune_protocol::clock::now_ms;
use fedtune_protocol::messages::{MAX_CONTROL, decode, encode};
use fedtune_protocol::quic::{read_frame, write_frame};
use fedtune_protocol::{PublicKey, ToClient, ToCoordinator};
use tokio::sync::mpsc;

use crate::admission::{Admission, Decision, HandshakeCounts, HandshakeLimits, Pending};
use crate::disk::Disk;
use crate::event::{Event, Refusal};
use crate::machine::{Action, Coordinator};
use crate::roundevent::RoundEvent;
use crate::store::FileStore;
use crate::upload::{Budget, Parts, upload};

/// Errors that stop the daemon (never caused by a peer).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// File or socket. (The cause is part of the message, not a `source`, so that error
    /// chains do not print it twice.)
    #[error("{context}: {cause}")]
    Io {
        /// What was being done.
        context: String,
        /// Cause.
        cause: std::io::Error,
    },
    /// TLS or QUIC configuration.
    #[error("{0}")]
    Protocol(#[from] fedtune_protocol::ProtocolError),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> DaemonError {
    let context = context.into();
    move |cause| DaemonError::Io { context, cause }
}

/// Where and how the daemon runs.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// Data directory: `store/` (durable state), `incoming/`, `rounds.jsonl`.
    pub data_dir: PathBuf,
    /// Admitted clients: certificate common name → ed25519 key.
    pub clients: BTreeMap<String, PublicKey>,
    /// How long to keep serving after the last round (so clients learn it finished).
    pub linger: Duration,
    /// Limits on what one authenticated client may hold open.
    pub limits: ConnectionLimits,
    /// Print each round-log record as a line on stdout (`fedtune coord`; not the simulator).
    pub console: bool,
    /// Serve Prometheus metrics at `GET /metrics` on this address ([`crate::metrics`]).
    pub metrics: Option<SocketAddr>,
}

/// Limits on the connections of one client identity.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Time from the end of the TLS handshake to the client's `Hello` (control stream opened
    /// and the frame read); a connection that says nothing is closed.
    pub hello_timeout: Duration,
    /// Connections one identity may hold at once (counted from the end of the handshake); more
    /// are closed at once. Only the newest connection that said `Hello` receives messages.
    pub per_client: usize,
    /// Bytes of completed uploads held in memory at once, all connections together (uploads
    /// stream to disk; a completed one waits for room before it is read in and checked). A
    /// payload larger than this still goes through, alone.
    pub upload_memory: u64,
    /// Bounds on unfinished QUIC handshakes, before any certificate is seen.
    pub handshakes: HandshakeLimits,
    /// Bytes of free disk kept for the coordinator's own writes (state, global adapters, the
    /// round log): an upload is refused while the data directory's volume has less free than
    /// twice its payload plus this, and its client is asked again once there is room.
    pub disk_reserve: u64,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            hello_timeout: Duration::from_secs(10),
            per_client: 4,
            upload_memory: 512 << 20,
            handshakes: HandshakeLimits::default(),
            disk_reserve: 64 << 20,
        }
    }
}

/// Live connections per identity (after the handshake, before or after `Hello`).
type Counts = Arc<Mutex<BTreeMap<PublicKey, usize>>>;

/// One counted connection; uncounted when dropped.
struct Slot {
    counts: Counts,
    pk: PublicKey,
}

impl Slot {
    /// Counts a connection of `pk`, or `None` when it already holds `max`.
    fn take(counts: &Counts, pk: PublicKey, max: usize) -> Option<Slot> {
        let mut c = counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = c.entry(pk).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Slot {
            counts: counts.clone(),
            pk,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = c.get_mut(&self.pk) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.pk);
            }
        }
    }
}

/// Numbers connections, so that the end of a superseded connection is not taken for the end of
/// the client's current one.
static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

/// A client's current connection.
struct Current {
    id: u64,
    conn: quinn::Connection,
    tx: mpsc::Sender<ToClient>,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// Rounds completed.
    pub rounds: u64,
    /// Rejections by reason.
    pub rejections: BTreeMap<String, u64>,
    /// The final global adapter (PEFT safetensors bytes).
    pub global: Vec<u8>,
    /// What became of the QUIC connection attempts.
    pub handshakes: HandshakeCounts,
}

fn common_name(conn: &quinn::Connection) -> Option<String> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(certs.first()?.as_ref()).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    Some(cn)
}

#[allow(clippy::too_many_arguments)]
async fn connection(
    incoming: quinn::Incoming,
    pending: Pending,
    admission: Admission,
    clients: BTreeMap<String, PublicKey>,
    events: mpsc::Sender<Event>,
    incoming_dir: PathBuf,
    limits: ConnectionLimits,
    counts: Counts,
    budget: Arc<Budget>,
) {
    let handshake = tokio::time::timeout(limits.handshakes.timeout, incoming.into_future()).await;
    drop(pending);
    let conn = match handshake {
        Ok(Ok(conn)) => conn,
        Ok(Err(_)) => return,
        Err(_) => {
            // Dropping the unfinished handshake closes it.
            admission.timed_out();
            return;
        }
    };
    let Some(pk) = common_name(&conn).and_then(|cn| clients.get(&cn).copied()) else {
        tracing::warn!("connection from a certificate whose name is not admitted");
        conn.close(1u32.into(), b"not admitted");
        return;
    };
    let Some(_slot) = Slot::take(&counts, pk, limits.per_client) else {
        tracing::warn!(client = %pk, max = limits.per_client, "too many connections of one client");
        conn.close(5u32.into(), b"too many connections");
        return;
    };
    let hello = tokio::time::timeout(limits.hello_timeout, async {
        let (send, mut recv) = conn.accept_bi().await.ok()?;
        let b = read_frame(&mut recv, MAX_CONTROL).await.ok()??;
        let msg = decode::<ToCoordinator>(&b, MAX_CONTROL, "hello").ok()?;
        Some((send, recv, msg))
    })
    .await;
    let (mut send, mut recv) = match hello {
        Ok(Some((send, recv, ToCoordinator::Hello { client, .. }))) if client == pk => (send, recv),
        Err(_) => {
            tracing::warn!(client = %pk, "no hello in time");
            conn.close(2u32.into(), b"no hello in time");
            return;
        }
        _ => {
            tracing::warn!(client = %pk, "bad hello");
            conn.close(3u32.into(), b"bad hello");
            return;
        }
    };
    let id = NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel::<ToClient>(16);
    if events
        .send(Event::Hello {
            pk,
            id,
            conn: conn.clone(),
            tx,
        })
        .await
        .is_err()
    {
        return;
    }
    // Outgoing messages.
    let writer = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if write_frame(&mut send, &encode(&msg)).await.is_err() {
                break;
            }
        }
    });
    // Uploads, each on its own stream.
    let uploads = {
        let conn = conn.clone();
        let events = events.clone();
        tokio::spawn(async move {
            while let Ok(stream) = conn.accept_bi().await {
                let events = events.clone();
                let dir = incoming_dir.clone();
                tokio::spawn(upload(pk, stream, events, dir, budget.clone()));
            }
        })
    };
    // Control messages from the client.
    while let Ok(Some(b)) = read_frame(&mut recv, MAX_CONTROL).await {
        match decode::<ToCoordinator>(&b, MAX_CONTROL, "message") {
            Ok(msg) => {
                if events.send(Event::Msg { pk, msg }).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(client = %pk, error = %e, "undecodable message");
                break;
            }
        }
    }
    uploads.abort();
    writer.abort();
    let _ = events.send(Event::Gone { pk, id }).await;
}

/// What the coordinator's stateless-reset key is derived for (from its identity).
pub const RESET_KEY_PURPOSE: &str = "fedtune 2026-12 QUIC stateless reset key";

/// Writes a record of the daemon's own (not the machine's) to `rounds.jsonl`; a failed write
/// is only warned about (these records are not part of the federation's state).
fn log_own(log: &mut crate::roundlog::RoundLog, e: RoundEvent) {
    if let Err(e) = log.write(&e, now_ms()) {
        tracing::warn!(error = %e, "writing rounds.jsonl");
    }
}

/// Records a removed partial upload in `rounds.jsonl` (and the log).
fn log_abandoned(
    log: &mut crate::roundlog::RoundLog,
    client: PublicKey,
    round: u64,
    bytes: u64,
    why: &str,
) {
    tracing::warn!(%client, round, bytes, why, "partial upload removed");
    log_own(
        log,
        RoundEvent::UploadAbandoned {
            round,
            client,
            bytes,
            why: why.to_string(),
        },
    );
}

/// Where the machine's actions are carried out.
struct Out<'a> {
    store: &'a FileStore,
    log: &'a mut crate::roundlog::RoundLog,
    conns: &'a BTreeMap<PublicKey, Current>,
    /// When the last round finished.
    finished_at: &'a mut Option<tokio::time::Instant>,
}

/// Carries out one action; an error names what was being written.
fn carry_out(a: &Action, out: &mut Out<'_>) -> Result<(), (String, std::io::Error)> {
    match a {
        Action::Persist { key, bytes } => out
            .store
            .put(key, bytes)
            .map_err(|e| (format!("persisting {key}"), e)),
        Action::Log(e) => out
            .log
            .write(e, now_ms())
            .map_err(|e| ("writing rounds.jsonl".to_string(), e)),
        Action::Send { to, msg } => {
            if let Some(c) = out.conns.get(to) {
                let _ = c.tx.try_send(msg.clone());
            }
            Ok(())
        }
        Action::Finished => {
            out.finished_at
                .get_or_insert_with(tokio::time::Instant::now);
            Ok(())
        }
    }
}

/// Binds the coordinator's QUIC endpoint. Its stateless-reset key is derived from the
/// coordinator's identity, so after a restart clients learn at once that their connection is
/// gone ([`fedtune_protocol::quic::server_endpoint`]).
pub fn bind(
    server: quinn::ServerConfig,
    addr: SocketAddr,
    id: &fedtune_protocol::Identity,
) -> Result<quinn::Endpoint, DaemonError> {
    fedtune_protocol::quic::server_endpoint(server, addr, id.derive_key(RESET_KEY_PURPOSE))
        .map_err(io(format!("listening on {addr}")))
}

/// Runs the coordinator on `endpoint` until every round is done (and `linger` has passed) or
/// `shutdown` resolves.
pub async fn serve(
    mut machine: Coordinator,
    endpoint: quinn::Endpoint,
    opts: DaemonOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<RunSummary, DaemonError> {
    let store = open_store(&opts)?;
    let incoming_dir = opts.data_dir.join("incoming");
    std::fs::create_dir_all(&incoming_dir).map_err(io("creating incoming/"))?;
    let (mut log, metrics) = round_log(&opts).await?;
    tracing::info!(addr = ?endpoint.local_addr().ok(), "coordinator listening");
    // The daemon keeps a sender itself, so the channel stays open while it runs.
    let (ev_tx, mut ev_rx) = mpsc::channel::<Event>(256);
    let admission = Admission::new(opts.limits.handshakes);
    let accept = spawn_accept(
        endpoint.clone(),
        &opts,
        ev_tx.clone(),
        admission.clone(),
        incoming_dir.clone(),
    );
    let mut disk = Disk::new(&opts.data_dir, opts.limits.disk_reserve);
    // A partial upload idle for longer than a header lives (the coordinator's header lifetime
    // plus the clock skew it allows) is abandoned: an honest client's header has expired by
    // then, and a client that comes back sends its update again from the start.
    let c = machine.config();
    let idle = Duration::from_millis(c.header_ttl_ms.saturating_add(c.max_skew_ms));
    let mut parts = Parts::new(incoming_dir, idle);
    // Actions taken from the machine and not yet carried out (a write failed).
    let mut held: VecDeque<Action> = VecDeque::new();
    // Each client's current connection: the newest that said hello.
    let mut conns: BTreeMap<PublicKey, Current> = BTreeMap::new();
    let mut finished_at: Option<tokio::time::Instant> = None;
    tokio::pin!(shutdown);
    machine.handle_tick(now_ms());
    loop {
        for (pk, round, bytes, why) in parts.tidy(machine.completed_rounds()) {
            log_abandoned(&mut log, pk, round, bytes, why);
        }
        // Carry out actions in order. A write that fails holds it and every later action
        // (nothing is sent before what it depends on is stored), tried again each second;
        // uploads are refused meanwhile, and the daemon keeps running.
        held.extend(std::iter::from_fn(|| machine.poll_action()));
        if !held.is_empty() && disk.retry_due() {
            let mut out = Out {
                store: &store,
                log: &mut log,
                conns: &conns,
                finished_at: &mut finished_at,
            };
            carry_out_held(&mut held, &mut out, &mut disk);
        }
        if held.is_empty()
            && let Some(r) = disk.succeeded()
        {
            writes_recovered(r, &mut machine, &mut log, &conns);
            continue;
        }
        if finished_at.is_some_and(|t| t.elapsed() >= opts.linger) {
            break;
        }
        let wake = machine
            .next_deadline()
            .map(|d| Duration::from_millis(d.saturating_sub(now_ms())))
            .unwrap_or(Duration::from_millis(500))
            .min(Duration::from_millis(500))
            .min(if held.is_empty() {
                Duration::MAX
            } else {
                crate::disk::RETRY
            });
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(wake) => machine.handle_tick(now_ms()),
            ev = ev_rx.recv() => match ev {
                None => break,
                Some(ev) => on_event(ev, &mut machine, &mut conns, &mut disk, &mut log),
            },
        }
        if let Some(m) = &metrics {
            m.set_connected(conns.len());
        }
    }
    if !held.is_empty() {
        tracing::warn!(
            actions = held.len(),
            "stopping with writes not done: nothing after them was sent, and a restart resumes from what is stored"
        );
    }
    accept.abort();
    endpoint.close(0u32.into(), b"bye");
    Ok(RunSummary {
        rounds: machine.completed_rounds(),
        rejections: machine.rejections().clone(),
        global: machine.global().1.to_vec(),
        handshakes: admission.stats().snapshot(),
    })
}

/// The durable store under `store/`, without the temporary files of interrupted writes.
fn open_store(opts: &DaemonOptions) -> Result<FileStore, DaemonError> {
    let store = FileStore::open(&opts.data_dir.join("store")).map_err(io("opening the store"))?;
    let stale = store
        .remove_stale_temporaries()
        .map_err(io("removing the store's stale temporary files"))?;
    if stale > 0 {
        tracing::info!(
            files = stale,
            "removed temporary files of interrupted writes"
        );
    }
    Ok(store)
}

/// The round log (`rounds.jsonl`, appended to), and the Prometheus metrics it also feeds when
/// `opts.metrics` names an address (served from now on).
async fn round_log(
    opts: &DaemonOptions,
) -> Result<
    (
        crate::roundlog::RoundLog,
        Option<Arc<crate::metrics::Metrics>>,
    ),
    DaemonError,
> {
    let log_path = opts.data_dir.join("rounds.jsonl");
    let log = crate::roundlog::RoundLog::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(format!("opening {}", log_path.display())))?,
        &opts.clients,
        opts.console,
    );
    let Some(addr) = opts.metrics else {
        return Ok((log, None));
    };
    let m = Arc::new(crate::metrics::Metrics::default());
    let text = m.clone();
    fedtune_protocol::metrics_http::listen(addr, Arc::new(move || text.text()))
        .await
        .map_err(io(format!("metrics: listening on {addr}")))?;
    tracing::info!(%addr, "metrics at /metrics");
    Ok((log.with_metrics(m.clone()), Some(m)))
}

/// The accepting task: each incoming QUIC connection is accepted, asked to retry (address
/// validation under a handshake flood) or refused, as `admission` decides; accepted ones run
/// [`connection`] on tasks of their own, sending their events to `ev_tx`.
fn spawn_accept(
    endpoint: quinn::Endpoint,
    opts: &DaemonOptions,
    ev_tx: mpsc::Sender<Event>,
    admission: Admission,
    incoming_dir: PathBuf,
) -> tokio::task::JoinHandle<()> {
    let clients = opts.clients.clone();
    let counts = Counts::default();
    let limits = opts.limits;
    let budget = Arc::new(Budget::new(limits.upload_memory));
    tokio::spawn(async move {
        let mut shed_logged = (0u64, tokio::time::Instant::now());
        while let Some(inc) = endpoint.accept().await {
            let ip = inc.remote_address().ip();
            match admission.decide(ip, inc.remote_address_validated(), inc.may_retry()) {
                (Decision::Accept, Some(pending)) => {
                    tokio::spawn(connection(
                        inc,
                        pending,
                        admission.clone(),
                        clients.clone(),
                        ev_tx.clone(),
                        incoming_dir.clone(),
                        limits,
                        counts.clone(),
                        budget.clone(),
                    ));
                }
                (Decision::Retry, _) => {
                    if let Err(e) = inc.retry() {
                        e.into_incoming().refuse();
                    }
                }
                _ => inc.refuse(),
            }
            // Shedding is logged at most once a second, with the totals.
            let c = admission.stats().snapshot();
            let shed = c.retried + c.refused;
            if shed > shed_logged.0 && shed_logged.1.elapsed() >= Duration::from_secs(1) {
                tracing::warn!(
                    pending = admission.pending(),
                    retried = c.retried,
                    refused = c.refused,
                    timed_out = c.timed_out,
                    "many unfinished QUIC handshakes: answering with Retry, refusing beyond the caps"
                );
                shed_logged = (shed, tokio::time::Instant::now());
            }
        }
    })
}

/// Carries out `held` actions in order until one fails (it and the rest stay held; the
/// failure is reported once per outage).
fn carry_out_held(held: &mut VecDeque<Action>, out: &mut Out<'_>, disk: &mut Disk) {
    while let Some(a) = held.front() {
        match carry_out(a, out) {
            Ok(()) => {
                held.pop_front();
            }
            Err((what, e)) => {
                if disk.failed(&what, &e) {
                    tracing::error!(%what, error = %e, held = held.len(), "a write failed: holding the actions from it on and refusing uploads until it succeeds");
                    eprintln!(
                        "error: {what}: {e}; retrying each second, uploads refused meanwhile"
                    );
                }
                return;
            }
        }
    }
}

/// Writes succeed again after failing: logged, and the clients refused meanwhile are asked
/// again for their update.
fn writes_recovered(
    r: crate::disk::Recovered,
    machine: &mut Coordinator,
    log: &mut crate::roundlog::RoundLog,
    conns: &BTreeMap<PublicKey, Current>,
) {
    if r.failed_for > Duration::ZERO {
        tracing::info!(seconds = r.failed_for.as_secs_f64(), "writes succeed again");
        log_own(
            log,
            RoundEvent::StorageRecovered {
                failed_seconds: r.failed_for.as_secs_f64(),
            },
        );
    }
    for pk in r.refused {
        if conns.contains_key(&pk) {
            machine.invite_again(now_ms(), pk);
        }
    }
}

/// Hands one connection event to the machine (or, for an upload while writes fail or without
/// room for it, refuses it before the machine sees it).
fn on_event(
    ev: Event,
    machine: &mut Coordinator,
    conns: &mut BTreeMap<PublicKey, Current>,
    disk: &mut Disk,
    log: &mut crate::roundlog::RoundLog,
) {
    match ev {
        Event::Hello { pk, id, conn, tx } => {
            // A newer connection of the same client supersedes the older one, which is
            // closed; the older one's end then changes nothing.
            if let Some(old) = conns.insert(pk, Current { id, conn, tx }) {
                tracing::info!(client = %pk, "a newer connection supersedes the older one");
                old.conn
                    .close(6u32.into(), b"superseded by a newer connection");
            }
            machine.handle_hello(now_ms(), pk);
        }
        Event::Msg { pk, msg } => machine.handle_message(now_ms(), pk, msg),
        Event::UploadHeader { pk, header, reply } => {
            // While writes fail, or without room for it, an upload waits (its client is asked
            // again); the machine does not see it, so nothing is counted.
            let verdict = match disk.refuse(pk, header.header.payload_len) {
                Some(why) => {
                    tracing::warn!(client = %pk, round = header.header.round, %why, "upload refused");
                    log_own(
                        log,
                        RoundEvent::UploadRefused {
                            round: header.header.round,
                            client: pk,
                            why: why.clone(),
                        },
                    );
                    Err(Refusal::NoRoom)
                }
                None => machine
                    .handle_upload_header(now_ms(), pk, &header)
                    .map_err(|_| Refusal::Rejected),
            };
            let _ = reply.send(verdict);
        }
        Event::Upload { pk, upload, .. } => machine.handle_upload(now_ms(), pk, upload),
        Event::Abandoned {
            pk,
            round,
            bytes,
            why,
        } => log_abandoned(log, pk, round, bytes, &why),
        Event::NoRoom { pk, bytes } => disk.no_room(pk, bytes),
        Event::Gone { pk, id } => {
            if conns.get(&pk).is_some_and(|c| c.id == id) {
                conns.remove(&pk);
                machine.handle_disconnect(now_ms(), pk);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_io_error_prints_its_cause_once_in_an_error_chain() {
        let e = io("persisting state")(std::io::Error::other("No space left on device"));
        let mut chain = vec![e.to_string()];
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            chain.push(s.to_string());
            source = s.source();
        }
        let text = chain.join(": ");
        assert_eq!(text, "persisting state: No space left on device");
    }
}
