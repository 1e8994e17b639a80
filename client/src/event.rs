//! The records of a client's local log (`log` in `client.toml`), typed: the machine emits them
//! as [`ClientAction::Log`](crate::ClientAction::Log), the daemon adds its own (trained,
//! uploaded), writes each as one JSON line with its time and counts them for `/metrics`; the
//! simulator keeps them as they are.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One record of the client's log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ClientEvent {
    /// The client stops: continuing cannot succeed.
    Error {
        /// Why.
        reason: String,
    },
    /// A round's plan and global adapter passed the checks: local training starts.
    Plan {
        /// The round.
        round: u64,
    },
    /// A round's plan or global adapter failed the checks; the round is declined.
    PlanRejected {
        /// The round.
        round: u64,
        /// Why.
        reason: String,
    },
    /// Local training finished.
    Trained {
        /// The round.
        round: u64,
        /// Wall-clock seconds of the training job.
        seconds: f64,
        /// Its metrics (`train_loss`, `eval_loss`, ...).
        metrics: BTreeMap<String, f64>,
    },
    /// Local training failed; the round is declined with this error.
    TrainFailed {
        /// The round.
        round: u64,
        /// Why.
        error: String,
    },
    /// The update's payload was sent, from `resumed_from` (bytes the coordinator already held).
    Uploaded {
        /// The round.
        round: u64,
        /// The payload's length.
        bytes: u64,
        /// Bytes the coordinator held before this attempt.
        resumed_from: u64,
    },
    /// The coordinator refused the upload's header (or had no room for it); the update is
    /// sent again when the round's plan comes again.
    UploadRefused {
        /// The round.
        round: u64,
    },
    /// The coordinator asked again for a round whose update it has not got: sent again.
    Resend {
        /// The round.
        round: u64,
    },
    /// The coordinator stored the round's update.
    Accepted {
        /// The round.
        round: u64,
    },
    /// The coordinator rejected the round's update.
    Rejected {
        /// The round.
        round: u64,
        /// Why.
        reason: String,
    },
}
