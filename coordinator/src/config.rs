//! The configuration of a federation, as the coordinator's state machine takes it.

use std::collections::BTreeSet;

use fedtune_aggregation::strategy::StrategyConfig;
use fedtune_protocol::envelope::Digest;
use fedtune_protocol::{Hyper, Phase, PublicKey};
use serde::{Deserialize, Serialize};

/// Configuration of a federation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CoordConfig {
    /// Federation id.
    pub federation: String,
    /// Rounds to run.
    pub rounds: u64,
    /// Local training phase.
    pub phase: Phase,
    /// Local hyperparameters.
    pub hyper: Hyper,
    /// LoRA rank.
    pub rank: usize,
    /// LoRA α (the scale of decoded updates is α/r).
    pub lora_alpha: f64,
    /// Aggregation strategy (rule, sampling, DP, ...).
    pub strategy: StrategyConfig,
    /// Updates needed to close a round at its deadline.
    pub min_results: usize,
    /// Round length in milliseconds.
    pub round_timeout_ms: u64,
    /// Largest update payload.
    pub max_payload: u64,
    /// Validity of signed headers.
    pub header_ttl_ms: u64,
    /// Allowed clock skew.
    pub max_skew_ms: u64,
    /// Hash of the base model and LoRA configuration.
    pub plan_hash: Digest,
    /// Admitted client keys.
    pub admitted: BTreeSet<PublicKey>,
}
