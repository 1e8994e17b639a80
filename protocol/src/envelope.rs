//! Signed headers of adapter updates and global adapters.
//!
//! The signature covers a domain-separated encoding of the header: the ASCII tag
//! `fedtune/v1/header` and a zero byte, then the header's postcard encoding (deterministic:
//! fixed field order, varints). The payload itself is not signed; its BLAKE3 digest and length
//! are, so the payload can be hashed while it streams and checked before it is parsed.
//!
//! [`check_header`] runs every check that needs no payload, in a fixed order, so that a bad
//! update is rejected before its bytes are read; [`check_payload`] runs the rest.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::identity::{Identity, PublicKey};
use crate::{PROTOCOL_VERSION, Rejection};

/// Domain separation tag of header signatures.
pub const HEADER_DOMAIN: &[u8] = b"fedtune/v1/header\0";

/// A 32-byte BLAKE3 digest.
pub type Digest = [u8; 32];

/// BLAKE3 of `bytes`.
pub fn digest(bytes: &[u8]) -> Digest {
    *blake3::hash(bytes).as_bytes()
}

/// What a signed payload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PayloadKind {
    /// A client's adapter after local training.
    Update,
    /// The coordinator's global adapter.
    Global,
}

/// The signed header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// Protocol version.
    pub version: u16,
    /// Update or global adapter.
    pub kind: PayloadKind,
    /// Federation id.
    pub federation: String,
    /// Round the payload belongs to.
    pub round: u64,
    /// Signer's public key.
    pub signer: PublicKey,
    /// Hash of the base model and LoRA configuration every party trains with.
    pub plan_hash: Digest,
    /// Hash of the global adapter the update was trained from (for a global adapter: of the
    /// previous one).
    pub parent: Digest,
    /// Payload length in bytes.
    pub payload_len: u64,
    /// BLAKE3 of the payload.
    pub payload_digest: Digest,
    /// Random nonce.
    pub nonce: [u8; 16],
    /// Issue time, milliseconds since the Unix epoch.
    pub issued_at_ms: u64,
    /// Expiry, milliseconds since the Unix epoch.
    pub expires_at_ms: u64,
    /// Training examples behind an update (its FedAvg weight).
    pub num_examples: u64,
    /// Metrics reported with it (at most [`MAX_METRICS`], names of at most 64 bytes).
    pub metrics: Vec<(String, f64)>,
}

/// Most metrics a header may carry.
pub const MAX_METRICS: usize = 32;

/// A header with its ed25519 signature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignedHeader {
    /// The header.
    pub header: Header,
    /// Signature over [`Header::signing_bytes`].
    #[serde(with = "sig_serde")]
    pub signature: [u8; 64],
}

mod sig_serde {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        let v: &[u8] = Deserialize::deserialize(d)?;
        v.try_into()
            .map_err(|_| serde::de::Error::custom("a signature has 64 bytes"))
    }
}

impl Header {
    /// The bytes the signature covers.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut out = HEADER_DOMAIN.to_vec();
        out.extend(postcard::to_stdvec(self).expect("headers always encode"));
        out
    }

    /// Signs the header.
    pub fn sign(self, id: &Identity) -> SignedHeader {
        let signature = id.sign(&self.signing_bytes());
        SignedHeader {
            header: self,
            signature,
        }
    }
}

impl SignedHeader {
    /// Whether the signature is the signer's.
    pub fn signature_valid(&self) -> bool {
        self.header
            .signer
            .verify(&self.header.signing_bytes(), &self.signature)
    }
}

/// The fields of a header that are not derived from the payload or the signer.
#[derive(Debug, Clone, PartialEq)]
pub struct Seal<'a> {
    /// Update or global adapter.
    pub kind: PayloadKind,
    /// Federation id.
    pub federation: &'a str,
    /// Round.
    pub round: u64,
    /// Hash of base model and LoRA configuration.
    pub plan_hash: Digest,
    /// Hash of the global adapter trained from.
    pub parent: Digest,
    /// Random nonce.
    pub nonce: [u8; 16],
    /// Now, in milliseconds since the Unix epoch.
    pub now_ms: u64,
    /// Validity in milliseconds.
    pub ttl_ms: u64,
    /// Examples behind an update.
    pub num_examples: u64,
    /// Metrics.
    pub metrics: Vec<(String, f64)>,
}

/// Builds and signs the header of `payload`.
pub fn seal(id: &Identity, s: Seal<'_>, payload: &[u8]) -> SignedHeader {
    Header {
        version: PROTOCOL_VERSION,
        kind: s.kind,
        federation: s.federation.to_string(),
        round: s.round,
        signer: id.public(),
        plan_hash: s.plan_hash,
        parent: s.parent,
        payload_len: payload.len() as u64,
        payload_digest: digest(payload),
        nonce: s.nonce,
        issued_at_ms: s.now_ms,
        expires_at_ms: s.now_ms.saturating_add(s.ttl_ms),
        num_examples: s.num_examples,
        metrics: s.metrics,
    }
    .sign(id)
}

/// What the receiver of an update expects.
#[derive(Debug, Clone)]
pub struct Expectations<'a> {
    /// Federation id.
    pub federation: &'a str,
    /// Keys admitted to send this kind of payload.
    pub admitted: &'a BTreeSet<PublicKey>,
    /// The round open now (`None`: no round is open).
    pub open_round: Option<u64>,
    /// Hash of the base model and LoRA configuration.
    pub plan_hash: Digest,
    /// Hash of the current global adapter.
    pub parent: Digest,
    /// (signer, round) pairs already accepted.
    pub seen: &'a BTreeSet<(PublicKey, u64)>,
    /// Largest payload accepted.
    pub max_payload: u64,
    /// Allowed clock skew for `issued_at` in the future, in milliseconds.
    pub max_skew_ms: u64,
    /// Expected payload kind.
    pub kind: PayloadKind,
}

/// Checks a header before its payload is read. The order is fixed: version, kind, key,
/// signature, federation, round, replay, parent, expiry, length.
pub fn check_header(h: &SignedHeader, e: &Expectations<'_>, now_ms: u64) -> Result<(), Rejection> {
    let hd = &h.header;
    if hd.version != PROTOCOL_VERSION {
        return Err(Rejection::Version { got: hd.version });
    }
    if hd.kind != e.kind {
        return Err(Rejection::WrongKind);
    }
    if !e.admitted.contains(&hd.signer) {
        return Err(Rejection::UnknownKey(hd.signer.to_hex()));
    }
    if !h.signature_valid() {
        return Err(Rejection::BadSignature);
    }
    if hd.federation != e.federation {
        return Err(Rejection::WrongFederation(hd.federation.clone()));
    }
    if e.open_round != Some(hd.round) {
        return Err(Rejection::RoundNotOpen {
            got: hd.round,
            open: e.open_round,
        });
    }
    if e.seen.contains(&(hd.signer, hd.round)) {
        return Err(Rejection::Replay { round: hd.round });
    }
    if hd.plan_hash != e.plan_hash {
        return Err(Rejection::WrongPlan);
    }
    if hd.parent != e.parent {
        return Err(Rejection::StaleGlobal);
    }
    if now_ms > hd.expires_at_ms || hd.issued_at_ms > now_ms.saturating_add(e.max_skew_ms) {
        return Err(Rejection::Expired);
    }
    if hd.metrics.len() > MAX_METRICS
        || hd
            .metrics
            .iter()
            .any(|(k, v)| k.len() > 64 || !v.is_finite())
    {
        return Err(Rejection::BadMetrics);
    }
    if hd.payload_len > e.max_payload {
        return Err(Rejection::TooLarge {
            len: hd.payload_len,
            cap: e.max_payload,
        });
    }
    Ok(())
}

/// Checks a payload against its (already checked) header: length and digest.
pub fn check_payload_digest(h: &Header, payload: &[u8]) -> Result<(), Rejection> {
    if payload.len() as u64 != h.payload_len {
        return Err(Rejection::LengthMismatch {
            declared: h.payload_len,
            got: payload.len() as u64,
        });
    }
    if digest(payload) != h.payload_digest {
        return Err(Rejection::DigestMismatch);
    }
    Ok(())
}
