//! The client daemon: the thin tokio/quinn driver of [`Client`]. It connects with its
//! certificate, says hello on a control stream, runs training jobs on a blocking thread,
//! uploads each update on its own stream (header frame, the coordinator's resume offset, then
//! the rest of the payload), and
//! reconnects with exponential backoff (1 s doubling to 30 s) when the connection drops or the
//! coordinator restarts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fedtune_protocol::clock::{now_ms, utc};
use fedtune_protocol::envelope::Digest;
use fedtune_protocol::messages::{MAX_CONTROL, decode, encode};
use fedtune_protocol::quic::{read_frame, write_frame};
use fedtune_protocol::{ToClient, Upload};

use crate::event::ClientEvent;
use crate::machine::{Client, ClientAction};
use crate::metrics::ClientMetrics;
use crate::trainer::{Base, LocalData, train_round};

/// Where the coordinator is and what the client needs locally.
#[derive(Clone)]
pub struct ClientOptions {
    /// The coordinator's UDP address.
    pub coordinator: SocketAddr,
    /// The name its certificate is issued for.
    pub server_name: String,
    /// Largest global adapter accepted.
    pub max_payload: u64,
    /// Local JSONL log.
    pub log: Option<PathBuf>,
    /// Give up after this many failed connection attempts in a row.
    pub max_attempts: u32,
    /// Serve Prometheus metrics at `GET /metrics` on this address ([`crate::metrics`]).
    pub metrics: Option<SocketAddr>,
}

/// Errors that stop the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The coordinator stayed unreachable.
    #[error("coordinator unreachable after {attempts} attempts: {last}")]
    Unreachable {
        /// Attempts made.
        attempts: u32,
        /// The last error.
        last: String,
    },
    /// Local training failed.
    #[error("local training: {0}")]
    Train(String),
    /// The coordinator is not the one this client trusts.
    #[error("{0}")]
    WrongCoordinator(String),
    /// Socket setup.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

enum Outcome {
    Finished(Digest),
    Stopped(String),
    Dropped(String),
}

/// Runs the client until the federation finishes; returns the final global adapter digest.
pub async fn run(
    mut machine: Client,
    quic: quinn::ClientConfig,
    base: Arc<Base>,
    data: Arc<LocalData>,
    opts: ClientOptions,
) -> Result<Digest, ClientError> {
    let bind: SocketAddr = if opts.coordinator.is_ipv4() {
        "0.0.0.0:0".parse().expect("valid")
    } else {
        "[::]:0".parse().expect("valid")
    };
    let metrics = match opts.metrics {
        Some(addr) => {
            let m = Arc::new(ClientMetrics::default());
            let text = m.clone();
            fedtune_protocol::metrics_http::listen(addr, Arc::new(move || text.text()))
                .await
                .map_err(|e| {
                    std::io::Error::new(e.kind(), format!("metrics: listening on {addr}: {e}"))
                })?;
            tracing::info!(%addr, "metrics at /metrics");
            Some(m)
        }
        None => None,
    };
    let out = Out {
        path: opts.log.clone(),
        metrics,
    };
    let mut endpoint = quinn::Endpoint::client(bind)?;
    endpoint.set_default_client_config(quic);
    let mut failures = 0u32;
    let mut backoff = Duration::from_secs(1);
    loop {
        let mut established = false;
        let attempt = async {
            let conn = endpoint
                .connect(opts.coordinator, &opts.server_name)
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())?;
            established = true;
            out.connected(true);
            let r = session(&mut machine, &conn, &base, &data, &opts, &out).await;
            out.connected(false);
            r
        };
        match attempt.await {
            Ok(Outcome::Finished(d)) => {
                endpoint.close(0u32.into(), b"done");
                return Ok(d);
            }
            Ok(Outcome::Stopped(reason)) => {
                endpoint.close(1u32.into(), b"wrong coordinator");
                return Err(ClientError::WrongCoordinator(reason));
            }
            Ok(Outcome::Dropped(e)) | Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, attempt = failures, "connection lost; reconnecting");
                if failures >= opts.max_attempts {
                    return Err(ClientError::Unreachable {
                        attempts: failures,
                        last: e,
                    });
                }
                // A connection that was up (the coordinator restarted, the network blinked) is
                // tried again after the shortest wait; failed connection attempts back off.
                if established {
                    backoff = Duration::from_secs(1);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Where the client's log records go: the local log file and the metrics.
struct Out {
    path: Option<PathBuf>,
    metrics: Option<Arc<ClientMetrics>>,
}

impl Out {
    fn connected(&self, up: bool) {
        if let Some(m) = &self.metrics {
            m.set_connected(up);
        }
    }

    /// Counts `e` and appends it to the local log as one JSON line with its time (`time_ms`,
    /// and `time`, UTC).
    fn log(&self, e: &ClientEvent) {
        if let Some(m) = &self.metrics {
            m.record(e);
        }
        if let Some(p) = &self.path {
            append(p, e);
        }
    }
}

fn append(p: &std::path::Path, e: &ClientEvent) {
    use std::io::Write;
    let now = now_ms();
    let mut v = serde_json::to_value(e).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("time_ms".into(), now.into());
        o.insert("time".into(), utc(now).into());
    }
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
    {
        let _ = writeln!(f, "{v}");
    }
}

/// Local training of `round` failed: say it on stderr and in the tracing log, and let the
/// machine tell the coordinator.
fn train_failed(machine: &mut Client, round: u64, error: String) {
    tracing::error!(round, %error, "local training failed");
    eprintln!("round {round}: local training failed: {error}");
    machine.handle_train_failed(now_ms(), round, error);
}

/// Uploads `u` on a stream of its own: the header frame, the coordinator's answer (the payload
/// bytes it already holds), then the rest of the payload. `None`: the coordinator refused the
/// header (a rejection comes as a message) or had no room for it.
async fn upload(conn: &quinn::Connection, u: &Upload) -> Result<Option<u64>, String> {
    let (mut s, mut r) = conn.open_bi().await.map_err(|e| e.to_string())?;
    write_frame(&mut s, &encode(&*u.header))
        .await
        .map_err(|e| e.to_string())?;
    let Some(b) = read_frame(&mut r, 8).await.map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    let offset = u64::from_le_bytes(b.try_into().map_err(|_| "bad offset".to_string())?)
        .min(u.payload.len() as u64);
    s.write_all(&u.payload[offset as usize..])
        .await
        .map_err(|e| e.to_string())?;
    s.finish().map_err(|e| e.to_string())?;
    Ok(Some(offset))
}

async fn session(
    machine: &mut Client,
    conn: &quinn::Connection,
    base: &Arc<Base>,
    data: &Arc<LocalData>,
    opts: &ClientOptions,
    out: &Out,
) -> Result<Outcome, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    machine.handle_connected(now_ms());
    let limit = MAX_CONTROL + opts.max_payload as usize;
    loop {
        while let Some(a) = machine.poll_action() {
            match a {
                ClientAction::Log(e) => out.log(&e),
                ClientAction::Finished(d) => return Ok(Outcome::Finished(d)),
                ClientAction::Stop(reason) => return Ok(Outcome::Stopped(reason)),
                ClientAction::Upload(u) => {
                    let round = u.header.header.round;
                    match upload(conn, &u).await? {
                        Some(offset) => machine.handle_uploaded(now_ms(), round, offset),
                        None => machine.handle_upload_refused(now_ms(), round),
                    }
                }
                ClientAction::Send(msg) => write_frame(&mut send, &encode(&msg))
                    .await
                    .map_err(|e| e.to_string())?,
                ClientAction::Train(job) => {
                    let (b, d) = (base.clone(), data.clone());
                    let round = job.plan.round;
                    let started = std::time::Instant::now();
                    // A failure is told to the coordinator and the log; the client stays in
                    // the federation for the next round.
                    let trained = match tokio::task::spawn_blocking(move || {
                        train_round(&b, &d, &job)
                    })
                    .await
                    {
                        Ok(Ok(t)) => t,
                        Ok(Err(e)) => {
                            train_failed(machine, round, e.to_string());
                            continue;
                        }
                        Err(e) => {
                            train_failed(machine, round, format!("the training task stopped: {e}"));
                            continue;
                        }
                    };
                    out.log(&ClientEvent::Trained {
                        round,
                        seconds: started.elapsed().as_secs_f64(),
                        metrics: trained.metrics.iter().cloned().collect(),
                    });
                    machine.handle_trained(
                        now_ms(),
                        round,
                        &trained.adapter,
                        trained.num_examples,
                        trained.metrics,
                    );
                }
            }
        }
        match read_frame(&mut recv, limit).await {
            Ok(Some(b)) => match decode::<ToClient>(&b, limit, "message") {
                Ok(msg) => machine.handle_message(now_ms(), msg),
                Err(e) => return Ok(Outcome::Dropped(e.to_string())),
            },
            Ok(None) => return Ok(Outcome::Dropped("the coordinator closed the stream".into())),
            Err(e) => return Ok(Outcome::Dropped(e.to_string())),
        }
    }
}
