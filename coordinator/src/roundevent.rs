//! The records of the round log (`rounds.jsonl`), typed: the coordinator machine emits them as
//! [`Action::Log`](crate::Action::Log), the daemon adds its own (uploads abandoned or refused,
//! storage recovered), writes each as one JSON line and the simulator reads them as they are.
//! Clients are [`PublicKey`]s (lower-case hex in JSON).

use std::collections::BTreeMap;

use fedtune_aggregation::update::Report;
use fedtune_protocol::{Phase, PublicKey};
use serde::{Deserialize, Serialize};

/// A sampled client that gave no usable update in a round, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientFailure {
    /// The client.
    pub client: PublicKey,
    /// Why (declined, no update before the deadline, failed validation ...).
    pub reason: String,
}

/// A closed round (`round_closed`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundClosed {
    /// The round.
    pub round: u64,
    /// Its phase.
    pub phase: Phase,
    /// The clients sampled for it.
    pub sampled: Vec<PublicKey>,
    /// The clients whose updates the aggregate is made of.
    pub used: Vec<PublicKey>,
    /// Sampled clients without a usable update.
    pub failures: Vec<ClientFailure>,
    /// Example-weighted means of the used clients' metrics.
    pub metrics: BTreeMap<String, f64>,
    /// What the aggregation rule did (none when no update was usable).
    pub report: Option<Report>,
    /// Seconds from the round's opening to its close.
    pub seconds: f64,
    /// BLAKE3 of the new global adapter, hex.
    pub global_digest: String,
    /// Updates rejected so far, by reason label.
    pub rejections: BTreeMap<String, u64>,
}

/// One record of the round log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum RoundEvent {
    /// A round opened.
    RoundOpen {
        /// The round.
        round: u64,
        /// The clients sampled for it.
        sampled: Vec<PublicKey>,
        /// Its deadline, milliseconds since the Unix epoch.
        deadline_ms: u64,
    },
    /// A round's deadline passed with too few updates; it is sampled again.
    RoundRetry {
        /// The round.
        round: u64,
        /// Updates accepted (kept for the retry).
        results: usize,
        /// Updates the round needs.
        needed: usize,
        /// Sampled clients without an update.
        missing: Vec<PublicKey>,
    },
    /// An update was accepted and stored.
    Accepted {
        /// The round.
        round: u64,
        /// Its client.
        client: PublicKey,
        /// Training examples behind it.
        num_examples: u64,
        /// Payload bytes.
        bytes: u64,
        /// The metrics its header reported.
        metrics: BTreeMap<String, f64>,
    },
    /// A message or update was rejected.
    Rejected {
        /// The round (none for a message that names no round).
        round: Option<u64>,
        /// The client.
        client: PublicKey,
        /// The reason's label (`bad_signature`, `replay`, ...).
        reason: String,
        /// The reason in words.
        detail: String,
    },
    /// A sampled client declined its round or failed to train.
    Declined {
        /// The round.
        round: u64,
        /// The client.
        client: PublicKey,
        /// `plan` or `training`.
        reason: String,
        /// Why, in the client's words.
        detail: String,
    },
    /// Aggregation failed; the round is sampled again.
    AggregationFailed {
        /// The round.
        round: u64,
        /// The error.
        error: String,
    },
    /// A round closed with a new global adapter.
    RoundClosed(Box<RoundClosed>),
    /// A stored update of the open round failed its checks on recovery and was dropped.
    StoredUpdateInvalid {
        /// The round.
        round: u64,
        /// The store key.
        key: String,
        /// Why.
        reason: String,
    },
    /// A partial upload was removed.
    UploadAbandoned {
        /// The round.
        round: u64,
        /// The client.
        client: PublicKey,
        /// Bytes it had received.
        bytes: u64,
        /// Why.
        why: String,
    },
    /// An upload was refused before its payload for want of disk space.
    UploadRefused {
        /// The round.
        round: u64,
        /// The client.
        client: PublicKey,
        /// The figures.
        why: String,
    },
    /// Writes succeed again after failing.
    StorageRecovered {
        /// Seconds they failed.
        failed_seconds: f64,
    },
}

impl RoundEvent {
    /// The client the record is about, where it names one.
    pub fn client(&self) -> Option<PublicKey> {
        match self {
            RoundEvent::Accepted { client, .. }
            | RoundEvent::Rejected { client, .. }
            | RoundEvent::Declined { client, .. }
            | RoundEvent::UploadAbandoned { client, .. }
            | RoundEvent::UploadRefused { client, .. } => Some(*client),
            _ => None,
        }
    }

    /// The record as the JSON object of its line (before the log adds times and names).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("a round event serialises")
    }
}

/// The records of a round log's text, one JSON object per line; lines the log added
/// (`time`, names) are ignored. An error names the line.
pub fn parse_log(text: &str) -> Result<Vec<RoundEvent>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| format!("round log line {}: {e}", i + 1)))
        .collect()
}
