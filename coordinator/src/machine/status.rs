//! What a coordinator's store says about its federation, read without running it
//! (`fedtune coord status`): rounds completed, the open round, the global adapter, which
//! clients' updates were accepted, rejections by reason.

use std::collections::{BTreeMap, BTreeSet};

use fedtune_protocol::PublicKey;
use serde::Serialize;

use super::{Coordinator, Result};

/// The open round, as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OpenStatus {
    /// Round number.
    pub round: u64,
    /// Sampled clients.
    pub sampled: Vec<PublicKey>,
    /// Sampled clients whose update is stored.
    pub updates: Vec<PublicKey>,
    /// When it opened, milliseconds since the Unix epoch.
    pub opened_ms: u64,
    /// Its deadline, milliseconds since the Unix epoch.
    pub deadline_ms: u64,
}

/// A federation's state as its coordinator persisted it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredStatus {
    /// Rounds completed.
    pub completed_rounds: u64,
    /// Whether the federation finished.
    pub finished: bool,
    /// The round in progress.
    pub open_round: Option<OpenStatus>,
    /// The round of the current global adapter (0: the initial one).
    pub global_round: u64,
    /// BLAKE3 of the current global adapter's bytes, hex.
    pub global_digest: String,
    /// Per client, the number of rounds whose update was accepted.
    pub accepted_rounds: BTreeMap<PublicKey, u64>,
    /// Rejected updates by reason.
    pub rejections: BTreeMap<String, u64>,
}

impl Coordinator {
    /// Reads the status from the persisted `state` (its bytes, if stored) and the store's
    /// keys (the open round's stored updates are listed there; their values are not read).
    pub fn stored_status(state: Option<&[u8]>, keys: &[String]) -> Result<StoredStatus> {
        let (d, _) = super::recover::read_state(state)?;
        let open_round = d.open.as_ref().map(|o| {
            let prefix = format!("updates/{:06}/", o.round);
            let stored_keys: BTreeSet<&str> = keys
                .iter()
                .filter_map(|k| k.strip_prefix(&prefix))
                .collect();
            OpenStatus {
                round: o.round,
                sampled: o.sampled.iter().copied().collect(),
                updates: o
                    .sampled
                    .iter()
                    .filter(|c| stored_keys.contains(c.to_hex().as_str()))
                    .copied()
                    .collect(),
                opened_ms: o.opened_ms,
                deadline_ms: o.deadline_ms,
            }
        });
        let mut accepted_rounds = BTreeMap::new();
        for (client, _) in &d.seen {
            *accepted_rounds.entry(*client).or_insert(0) += 1;
        }
        let h = &d.global_header.header;
        Ok(StoredStatus {
            completed_rounds: d.completed,
            finished: d.finished,
            open_round,
            global_round: h.round,
            global_digest: hex::encode(h.payload_digest),
            accepted_rounds,
            rejections: d.rejections.clone(),
        })
    }
}
