//! Prometheus metrics of a running client (`metrics_listen` in `client.toml`), served as text
//! at `GET /metrics` by [`fedtune_protocol::metrics_http`]: counted from the local log's records
//! as they are written (so the figures are those of the log) and from the connection coming
//! and going.
//!
//! - `fedtune_client_round` (the last round planned), `fedtune_client_rounds_trained_total`,
//!   `fedtune_client_train_seconds` (histogram of training jobs' durations),
//!   `fedtune_client_train_failures_total`, `fedtune_client_plans_declined_total` (plans or
//!   global adapters that failed this client's checks);
//! - `fedtune_client_uploads_total`, `fedtune_client_upload_bytes_total` (payload bytes sent,
//!   resumed uploads counting only the rest), `fedtune_client_uploads_refused_total`;
//! - `fedtune_client_updates_accepted_total`, `fedtune_client_updates_rejected_total{reason}`
//!   (the coordinator's rejection label: `replay`, `stale_global`, `invalid`, ...);
//! - `fedtune_client_connected` (1 while connected to the coordinator);
//! - `fedtune_client_metric{name}`: the last training job's metrics (`train_loss`,
//!   `eval_loss`, ...).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::event::ClientEvent;

type Labels = Vec<(String, String)>;

/// The client's metrics.
pub struct ClientMetrics {
    registry: Registry,
    round: Gauge,
    trained: Counter,
    train_seconds: Histogram,
    train_failures: Counter,
    plans_declined: Counter,
    uploads: Counter,
    upload_bytes: Counter,
    uploads_refused: Counter,
    accepted: Counter,
    rejected: Family<Labels, Counter>,
    connected: Gauge,
    metric: Family<Labels, Gauge<f64, AtomicU64>>,
}

impl Default for ClientMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("fedtune_client");
        let m = ClientMetrics {
            round: Gauge::default(),
            trained: Counter::default(),
            train_seconds: Histogram::new([1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 14_400.0]),
            train_failures: Counter::default(),
            plans_declined: Counter::default(),
            uploads: Counter::default(),
            upload_bytes: Counter::default(),
            uploads_refused: Counter::default(),
            accepted: Counter::default(),
            rejected: Family::default(),
            connected: Gauge::default(),
            metric: Family::default(),
            registry: Registry::default(),
        };
        registry.register("round", "The last round planned", m.round.clone());
        registry.register(
            "rounds_trained",
            "Local training jobs finished",
            m.trained.clone(),
        );
        registry.register(
            "train_seconds",
            "Durations of local training jobs",
            m.train_seconds.clone(),
        );
        registry.register(
            "train_failures",
            "Local training jobs that failed (declined)",
            m.train_failures.clone(),
        );
        registry.register(
            "plans_declined",
            "Plans or global adapters that failed this client's checks",
            m.plans_declined.clone(),
        );
        registry.register("uploads", "Update payloads sent", m.uploads.clone());
        registry.register(
            "upload_bytes",
            "Payload bytes sent (a resumed upload counts the rest)",
            m.upload_bytes.clone(),
        );
        registry.register(
            "uploads_refused",
            "Uploads the coordinator refused before their payload",
            m.uploads_refused.clone(),
        );
        registry.register(
            "updates_accepted",
            "Updates the coordinator stored",
            m.accepted.clone(),
        );
        registry.register(
            "updates_rejected",
            "Updates the coordinator rejected, by reason",
            m.rejected.clone(),
        );
        registry.register(
            "connected",
            "1 while connected to the coordinator",
            m.connected.clone(),
        );
        registry.register(
            "metric",
            "The last local training job's metrics",
            m.metric.clone(),
        );
        ClientMetrics { registry, ..m }
    }
}

/// The label of a coordinator's rejection reason (`replay: …` → `replay`); `other` for a
/// reason without one, so that a label's values stay few.
pub fn reason_label(reason: &str) -> &str {
    match reason.split_once(':') {
        Some((l, _))
            if !l.is_empty()
                && l.len() <= 32
                && l.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') =>
        {
            l
        }
        _ => "other",
    }
}

impl ClientMetrics {
    /// Counts a record of the local log.
    pub fn record(&self, e: &ClientEvent) {
        match e {
            ClientEvent::Plan { round } => {
                self.round.set(*round as i64);
            }
            ClientEvent::PlanRejected { round, .. } => {
                self.round.set(*round as i64);
                self.plans_declined.inc();
            }
            ClientEvent::Trained {
                seconds, metrics, ..
            } => {
                self.trained.inc();
                self.train_seconds.observe(*seconds);
                for (k, x) in metrics {
                    self.metric
                        .get_or_create(&vec![("name".to_string(), k.clone())])
                        .set(*x);
                }
            }
            ClientEvent::TrainFailed { .. } => {
                self.train_failures.inc();
            }
            ClientEvent::Uploaded {
                bytes,
                resumed_from,
                ..
            } => {
                self.uploads.inc();
                self.upload_bytes
                    .inc_by(bytes.saturating_sub(*resumed_from));
            }
            ClientEvent::UploadRefused { .. } => {
                self.uploads_refused.inc();
            }
            ClientEvent::Accepted { .. } => {
                self.accepted.inc();
            }
            ClientEvent::Rejected { reason, .. } => {
                let l = reason_label(reason).to_string();
                self.rejected
                    .get_or_create(&vec![("reason".to_string(), l)])
                    .inc();
            }
            ClientEvent::Error { .. } | ClientEvent::Resend { .. } => {}
        }
    }

    /// Whether the client is connected to the coordinator now.
    pub fn set_connected(&self, up: bool) {
        self.connected.set(i64::from(up));
    }

    /// The text exposition.
    pub fn text(&self) -> String {
        let mut out = String::new();
        // Writing to a String does not fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn log_records_become_metrics() {
        let m = ClientMetrics::default();
        for e in [
            ClientEvent::Plan { round: 2 },
            ClientEvent::Trained {
                round: 2,
                seconds: 12.5,
                metrics: BTreeMap::from([("train_loss".to_string(), 0.75)]),
            },
            ClientEvent::Uploaded {
                round: 2,
                bytes: 1000,
                resumed_from: 400,
            },
            ClientEvent::Rejected {
                round: 2,
                reason: "replay: update replayed".into(),
            },
            ClientEvent::Rejected {
                round: 2,
                reason: "Something Else: entirely".into(),
            },
            ClientEvent::Accepted { round: 3 },
        ] {
            m.record(&e);
        }
        m.set_connected(true);
        let t = m.text();
        for line in [
            "fedtune_client_round 2",
            "fedtune_client_rounds_trained_total 1",
            "fedtune_client_train_seconds_count 1",
            "fedtune_client_uploads_total 1",
            "fedtune_client_upload_bytes_total 600",
            "fedtune_client_updates_accepted_total 1",
            "fedtune_client_updates_rejected_total{reason=\"replay\"} 1",
            "fedtune_client_updates_rejected_total{reason=\"other\"} 1",
            "fedtune_client_connected 1",
            "fedtune_client_metric{name=\"train_loss\"} 0.75",
        ] {
            assert!(t.contains(line), "{line} missing from\n{t}");
        }
    }
}
