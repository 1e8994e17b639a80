//! Why an update was rejected: one variant per check, each with a stable label for counters.

use serde::{Deserialize, Serialize};

/// A rejected update or global adapter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    /// Another protocol version.
    #[error("protocol version {got} is not supported")]
    Version {
        /// The version sent.
        got: u16,
    },
    /// An update where a global adapter was expected, or the reverse.
    #[error("wrong payload kind")]
    WrongKind,
    /// A key that is not admitted.
    #[error("unknown key {0}")]
    UnknownKey(String),
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// Another federation's update.
    #[error("wrong federation {0:?}")]
    WrongFederation(String),
    /// The round is not the open one.
    #[error("round {got} is not open (open: {open:?})")]
    RoundNotOpen {
        /// The round sent.
        got: u64,
        /// The open round.
        open: Option<u64>,
    },
    /// This client already has an accepted update in this round.
    #[error("replayed update for round {round}")]
    Replay {
        /// The round.
        round: u64,
    },
    /// Trained with another base model or LoRA configuration.
    #[error("base model or LoRA configuration differs from the federation's")]
    WrongPlan,
    /// Trained from another global adapter than the current one.
    #[error("trained from a stale global adapter")]
    StaleGlobal,
    /// The header expired or was issued in the future.
    #[error("header expired or not yet valid")]
    Expired,
    /// Too many or malformed metrics.
    #[error("too many or non-finite metrics")]
    BadMetrics,
    /// The payload is larger than the cap.
    #[error("payload of {len} bytes exceeds the cap of {cap}")]
    TooLarge {
        /// Declared length.
        len: u64,
        /// The cap.
        cap: u64,
    },
    /// The payload is not as long as declared.
    #[error("payload has {got} bytes, the header declares {declared}")]
    LengthMismatch {
        /// Declared length.
        declared: u64,
        /// Received length.
        got: u64,
    },
    /// The payload's digest differs from the signed one.
    #[error("payload digest mismatch")]
    DigestMismatch,
    /// The payload does not parse as a PEFT adapter.
    #[error("payload does not parse: {0}")]
    BadPayload(String),
    /// The adapter does not satisfy the round plan (NaN/Inf, shapes, modules, ranks, norms).
    #[error("invalid adapter: {0}")]
    Invalid(String),
    /// Sent by a client that was not sampled for the round.
    #[error("not sampled for round {round}")]
    NotSampled {
        /// The round.
        round: u64,
    },
}

impl Rejection {
    /// A stable label for counters and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Rejection::Version { .. } => "version",
            Rejection::WrongKind => "wrong_kind",
            Rejection::UnknownKey(_) => "unknown_key",
            Rejection::BadSignature => "bad_signature",
            Rejection::WrongFederation(_) => "wrong_federation",
            Rejection::RoundNotOpen { .. } => "round_not_open",
            Rejection::Replay { .. } => "replay",
            Rejection::WrongPlan => "wrong_plan",
            Rejection::StaleGlobal => "stale_global",
            Rejection::Expired => "expired",
            Rejection::BadMetrics => "bad_metrics",
            Rejection::TooLarge { .. } => "too_large",
            Rejection::LengthMismatch { .. } => "length_mismatch",
            Rejection::DigestMismatch => "digest_mismatch",
            Rejection::BadPayload(_) => "bad_payload",
            Rejection::Invalid(_) => "invalid",
            Rejection::NotSampled { .. } => "not_sampled",
        }
    }
}
