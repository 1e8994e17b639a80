//! The checks of an update: its signed header before the payload is taken (signer, federation,
//! round, plan, parent global, replay, size, clock, sampling), then its payload (digest,
//! decoding, validation against the federation's plan and the current global).

use fedtune_aggregation::update::{Adapter, ClientResult};
use fedtune_aggregation::validate::validate;
use fedtune_protocol::envelope::{Expectations, PayloadKind, check_header, check_payload_digest};
use fedtune_protocol::{PublicKey, Rejection, SignedHeader, peft};

use super::Coordinator;

impl Coordinator {
    pub(super) fn decode(&self, payload: &[u8]) -> std::result::Result<Adapter, Rejection> {
        let limits = peft::Limits {
            max_bytes: self.cfg.max_payload,
            ..Default::default()
        };
        peft::decode(payload, &limits, |_, r| self.cfg.lora.scale(r))
            .map_err(|e| Rejection::BadPayload(e.to_string()))
    }

    pub(super) fn result_of(h: &SignedHeader, adapter: Adapter) -> ClientResult {
        ClientResult {
            client: h.header.signer.to_hex(),
            adapter,
            num_examples: h.header.num_examples,
            metrics: h.header.metrics.iter().cloned().collect(),
        }
    }

    pub(super) fn check_header_only(
        &self,
        now_ms: u64,
        from: PublicKey,
        header: &SignedHeader,
    ) -> std::result::Result<(), Rejection> {
        if header.header.signer != from {
            return Err(Rejection::UnknownKey(header.header.signer.to_hex()));
        }
        let e = Expectations {
            federation: &self.cfg.federation,
            admitted: &self.cfg.admitted,
            open_round: self.d.open.as_ref().map(|o| o.round),
            plan_hash: self.cfg.plan_hash,
            parent: self.d.global_header.header.payload_digest,
            seen: &self.d.seen,
            max_payload: self.cfg.max_payload,
            max_skew_ms: self.cfg.max_skew_ms,
            kind: PayloadKind::Update,
        };
        check_header(header, &e, now_ms)?;
        if let Some(open) = &self.d.open
            && !open.sampled.contains(&from)
        {
            return Err(Rejection::NotSampled { round: open.round });
        }
        Ok(())
    }

    pub(super) fn check_update(
        &self,
        now_ms: u64,
        from: PublicKey,
        header: &SignedHeader,
        payload: &[u8],
    ) -> std::result::Result<Adapter, Rejection> {
        self.check_header_only(now_ms, from, header)?;
        check_payload_digest(&header.header, payload)?;
        let adapter = self.decode(payload)?;
        let result = Self::result_of(header, adapter);
        let (ok, failures) = validate(
            std::slice::from_ref(&result),
            &self.strategy.state.plan,
            &self.strategy.state.global,
            &self.strategy.config.validation,
        );
        if ok.is_empty() {
            let reason = failures
                .into_iter()
                .map(|f| f.reason)
                .collect::<Vec<_>>()
                .join("; ");
            return Err(Rejection::Invalid(reason));
        }
        Ok(result.adapter)
    }
}
