//! The protocol crate's error type.

/// Errors decoding or verifying protocol data. Every variant says what was wrong with the
/// input; decoders never panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The bytes are not a valid encoding.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// What was being decoded.
        what: &'static str,
        /// Why it failed.
        reason: String,
    },
    /// A file could not be read (missing, unreadable): not the same as malformed content.
    #[error("reading {what} {path}: {reason}")]
    Unreadable {
        /// What the file holds.
        what: &'static str,
        /// The file.
        path: String,
        /// Why it could not be read.
        reason: String,
    },
    /// A size limit was exceeded.
    #[error("{what} of {size} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
}

impl ProtocolError {
    /// A malformed-input error.
    pub fn malformed(what: &'static str, reason: impl std::fmt::Display) -> Self {
        ProtocolError::Malformed {
            what,
            reason: reason.to_string(),
        }
    }
}

/// Result with [`ProtocolError`].
pub type Result<T, E = ProtocolError> = std::result::Result<T, E>;
