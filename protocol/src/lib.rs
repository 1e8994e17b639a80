//! Wire messages, versioning, signed envelopes, codecs with size limits, identities and TLS
//! configuration: the only crate that knows the wire format.
//!
//! - [`peft`]: the adapter payload (PEFT's safetensors layout), shared with the files users
//!   load in PEFT.

pub mod error;
pub mod peft;

pub use error::{ProtocolError, Result};
