//! What a run reports while it goes (the CLI draws a progress bar from it): its own module, so
//! that the run and its metrics both use it without importing each other.

/// Progress of a run.
#[derive(Debug, Clone)]
pub enum Progress {
    /// A round closed.
    Round {
        /// Rounds done.
        done: u64,
        /// Rounds in all.
        total: u64,
        /// Global held-out loss.
        loss: f64,
    },
    /// Free text (evaluation, restarts).
    Note(String),
}
