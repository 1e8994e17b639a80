//! Recovery: the machine rebuilt from what it persisted, every stored update checked again.

use std::collections::BTreeMap;

use fedtune_aggregation::strategy::{FedStrategy, StrategyState};
use fedtune_protocol::Identity;
use fedtune_protocol::envelope::check_payload_digest;

use super::{CoordConfig, Coordinator, CoordinatorError, Durable, Result, Stored};
use crate::roundevent::RoundEvent;

/// The persisted `state` (its bytes, if stored): the machine's durable part and the
/// strategy's state.
pub(super) fn read_state(bytes: Option<&[u8]>) -> Result<(Durable, StrategyState)> {
    let bytes = bytes.ok_or_else(|| CoordinatorError::Store {
        key: "state".into(),
        reason: "missing".into(),
    })?;
    postcard::from_bytes(bytes).map_err(|e| CoordinatorError::Store {
        key: "state".into(),
        reason: e.to_string(),
    })
}

impl Coordinator {
    /// Rebuilds the machine from persisted values (`state` and the open round's updates).
    pub fn recover(
        cfg: CoordConfig,
        id: Identity,
        stored: &BTreeMap<String, Vec<u8>>,
    ) -> Result<Self> {
        let (d, state) = read_state(stored.get("state").map(Vec::as_slice))?;
        let strategy = FedStrategy::from_state(cfg.effective_strategy(), state);
        let mut c = Self::assemble(cfg, id, strategy, d);
        if let Some(open) = c.d.open.clone() {
            let prefix = format!("updates/{:06}/", open.round);
            for (k, v) in stored.range(prefix.clone()..) {
                if !k.starts_with(&prefix) {
                    break;
                }
                // A stored update is checked again as on arrival (signature, digest, signer,
                // round, decoding): a file damaged on disk is dropped and logged, and its client
                // is asked again, instead of being aggregated.
                let checked = postcard::from_bytes::<Stored>(v)
                    .map_err(|e| e.to_string())
                    .and_then(|s| {
                        let h = &s.header.header;
                        if !s.header.signature_valid() {
                            return Err("its signature does not verify".into());
                        }
                        if h.round != open.round || !c.cfg.admitted.contains(&h.signer) {
                            return Err(
                                "it is not an update of this round by an admitted client".into()
                            );
                        }
                        check_payload_digest(h, &s.payload).map_err(|e| e.to_string())?;
                        let adapter = c.decode(&s.payload).map_err(|e| e.to_string())?;
                        Ok((s, adapter))
                    });
                match checked {
                    Ok((s, adapter)) => {
                        c.results
                            .insert(s.header.header.signer, Self::result_of(&s.header, adapter));
                    }
                    Err(reason) => c.log(RoundEvent::StoredUpdateInvalid {
                        round: open.round,
                        key: k.clone(),
                        reason,
                    }),
                }
            }
        }
        Ok(c)
    }
}
