//! Prometheus metrics of a running coordinator (`metrics_listen` in `coord.toml`), served as
//! text at `GET /metrics`: counted from the round log's records as they are written (so the
//! figures are those of `rounds.jsonl`) and from connections coming and going.
//!
//! - `fedtune_rounds_completed_total`, `fedtune_round_open` (the open round, 0 when none),
//!   `fedtune_round_seconds` (histogram of closed rounds' durations);
//! - `fedtune_updates_accepted_total{client}`, `fedtune_update_bytes_total{client}`,
//!   `fedtune_updates_rejected_total{reason}`, `fedtune_declined_total{client}`,
//!   `fedtune_uploads_abandoned_total{client}`;
//! - `fedtune_clients_connected`;
//! - `fedtune_round_metric{name}`: the last closed round's example-weighted metrics
//!   (`train_loss`, `eval_loss`, ...).
//!
//! The HTTP side is [`fedtune_protocol::metrics_http`], shared with the client.

use std::sync::atomic::AtomicU64;

use fedtune_protocol::PublicKey;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::roundevent::RoundEvent;

type Labels = Vec<(String, String)>;

/// The coordinator's metrics.
pub struct Metrics {
    registry: Registry,
    rounds_completed: Counter,
    round_open: Gauge,
    round_seconds: Histogram,
    accepted: Family<Labels, Counter>,
    bytes: Family<Labels, Counter>,
    rejected: Family<Labels, Counter>,
    declined: Family<Labels, Counter>,
    abandoned: Family<Labels, Counter>,
    connected: Gauge,
    round_metric: Family<Labels, Gauge<f64, AtomicU64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("fedtune");
        let m = Metrics {
            rounds_completed: Counter::default(),
            round_open: Gauge::default(),
            round_seconds: Histogram::new([1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14_400.0]),
            accepted: Family::default(),
            bytes: Family::default(),
            rejected: Family::default(),
            declined: Family::default(),
            abandoned: Family::default(),
            connected: Gauge::default(),
            round_metric: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "rounds_completed",
            "Rounds closed",
            m.rounds_completed.clone(),
        );
        registry.register(
            "round_open",
            "The open round (0: none)",
            m.round_open.clone(),
        );
        registry.register(
            "round_seconds",
            "Durations of closed rounds",
            m.round_seconds.clone(),
        );
        registry.register("updates_accepted", "Updates accepted", m.accepted.clone());
        registry.register("update_bytes", "Bytes of accepted updates", m.bytes.clone());
        registry.register(
            "updates_rejected",
            "Updates rejected, by reason",
            m.rejected.clone(),
        );
        registry.register("declined", "Plans declined by clients", m.declined.clone());
        registry.register(
            "uploads_abandoned",
            "Partial uploads removed",
            m.abandoned.clone(),
        );
        registry.register(
            "clients_connected",
            "Clients connected now",
            m.connected.clone(),
        );
        registry.register(
            "round_metric",
            "The last closed round's example-weighted metrics",
            m.round_metric.clone(),
        );
        Metrics { registry, ..m }
    }
}

fn label(k: &str, v: &str) -> Labels {
    vec![(k.to_string(), v.to_string())]
}

impl Metrics {
    /// Counts a round-log record, clients by `name`.
    pub fn record(&self, e: &RoundEvent, name: &dyn Fn(&PublicKey) -> String) {
        let client = |c: &PublicKey| label("client", &name(c));
        match e {
            RoundEvent::RoundOpen { round, .. } => {
                self.round_open.set(*round as i64);
            }
            RoundEvent::Accepted {
                client: c, bytes, ..
            } => {
                self.accepted.get_or_create(&client(c)).inc();
                self.bytes.get_or_create(&client(c)).inc_by(*bytes);
            }
            RoundEvent::Rejected { reason, .. } => {
                self.rejected.get_or_create(&label("reason", reason)).inc();
            }
            RoundEvent::Declined { client: c, .. } => {
                self.declined.get_or_create(&client(c)).inc();
            }
            RoundEvent::UploadAbandoned { client: c, .. } => {
                self.abandoned.get_or_create(&client(c)).inc();
            }
            RoundEvent::RoundClosed(c) => {
                self.rounds_completed.inc();
                self.round_open.set(0);
                self.round_seconds.observe(c.seconds);
                for (k, x) in &c.metrics {
                    self.round_metric
                        .get_or_create(&vec![("name".to_string(), k.clone())])
                        .set(*x);
                }
            }
            _ => {}
        }
    }

    /// Clients connected now.
    pub fn set_connected(&self, n: usize) {
        self.connected.set(n as i64);
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
    use crate::roundevent::RoundClosed;
    use std::collections::BTreeMap;

    #[test]
    fn round_log_records_become_metrics() {
        let m = Metrics::default();
        let a = fedtune_protocol::Identity::from_seed([1; 32]).public();
        let name = |_: &PublicKey| "hospital".to_string();
        let events = [
            RoundEvent::RoundOpen {
                round: 3,
                sampled: vec![a],
                deadline_ms: 0,
            },
            RoundEvent::Accepted {
                round: 3,
                client: a,
                num_examples: 4,
                bytes: 1000,
                metrics: BTreeMap::new(),
            },
            RoundEvent::Rejected {
                round: Some(3),
                client: a,
                reason: "stale_round".into(),
                detail: String::new(),
            },
            RoundEvent::RoundClosed(Box::new(RoundClosed {
                round: 3,
                phase: fedtune_protocol::Phase::Sft,
                sampled: vec![a],
                used: vec![a],
                failures: vec![],
                metrics: BTreeMap::from([("train_loss".to_string(), 0.75)]),
                report: None,
                seconds: 12.5,
                global_digest: String::new(),
                rejections: BTreeMap::new(),
            })),
        ];
        for e in &events {
            m.record(e, &name);
        }
        m.set_connected(1);
        let t = m.text();
        for line in [
            "fedtune_rounds_completed_total 1",
            "fedtune_round_open 0",
            "fedtune_updates_accepted_total{client=\"hospital\"} 1",
            "fedtune_update_bytes_total{client=\"hospital\"} 1000",
            "fedtune_updates_rejected_total{reason=\"stale_round\"} 1",
            "fedtune_clients_connected 1",
            "fedtune_round_metric{name=\"train_loss\"} 0.75",
            "fedtune_round_seconds_count 1",
        ] {
            assert!(t.contains(line), "{line} missing from\n{t}");
        }
    }
}
