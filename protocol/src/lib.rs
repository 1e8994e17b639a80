//! Wire messages, versioning, signed envelopes, codecs with size limits, identities and TLS
//! configuration: the only crate that knows the wire format.
//!
//! - [`peft`]: the adapter payload (PEFT's safetensors layout), shared with the files users
//!   load in PEFT: the `fedtune-peft` crate, which has no network dependency.
//! - [`identity`]: ed25519 identities.
//! - [`envelope`]: signed headers and the checks run before and after reading a payload.
//! - [`messages`]: control messages (`postcard`) and framing.
//! - [`plan`]: the LoRA configuration of a federation and the `plan_hash` that pins it.
//! - [`rejection`]: why an update was refused.
//!
//! Control messages use `postcard`, not `bincode`: bincode 3.0.0 is an empty crate that
//! refuses to compile, and 2.0.1 is unmaintained (RUSTSEC-2025-0141) and aborts the process on
//! a hostile length prefix.

pub mod clock;
pub mod envelope;
pub mod error;
pub mod identity;
pub mod messages;
pub mod metrics_http;
pub mod plan;
pub mod quic;
pub mod rejection;
pub mod tls;

pub use fedtune_peft as peft;

pub use envelope::{Digest, Header, PayloadKind, SignedHeader, digest};
pub use error::{ProtocolError, Result};
pub use identity::{Identity, PublicKey};
pub use messages::{
    DeclineReason, DistillPlan, GrpoPlan, Hyper, Phase, RoundPlan, ToClient, ToCoordinator, Upload,
};
pub use plan::{LoraPlan, model_digest, plan_hash};
pub use rejection::Rejection;

/// The protocol version this build speaks.
/// 2: round plans carry the LoRA configuration and every local-training setting.
pub const PROTOCOL_VERSION: u16 = 2;
