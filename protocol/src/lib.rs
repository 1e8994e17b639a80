//! Wire messages, versioning, signed envelopes, codecs with size limits, identities and TLS config: the only crate that knows the wire format.
