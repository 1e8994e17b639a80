//! The aggregation crate's error type.

/// Errors of aggregation. A client whose update is unusable is not an error: it becomes a
/// [`crate::Failure`] with a reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AggregationError {
    /// The configuration is invalid (names the parameter).
    #[error("aggregation config: {0}")]
    Config(String),
    /// Updates cannot be combined by the chosen rule (e.g. FedIT with mixed ranks).
    #[error("incompatible updates: {0}")]
    Incompatible(String),
}

/// Result with [`AggregationError`].
pub type Result<T, E = AggregationError> = std::result::Result<T, E>;
