//! The coordinator: a sans-IO round state machine ([`Coordinator`]), its durable file store
//! ([`store`]) and the thin tokio/quinn driver ([`daemon`]).
//!
//! Inputs are `handle_*` calls with the current time; outputs are [`Action`]s taken with
//! [`Coordinator::poll_action`], in order. A driver must carry out each
//! [`Action::Persist`] durably (write, fsync, atomic rename) before the actions after it: an
//! update is acknowledged only after it is stored, and [`Coordinator::recover`] rebuilds the
//! machine, open round and accepted updates included, from what was persisted.

pub mod admission;
pub mod config;
pub mod daemon;
mod disk;
mod event;
pub mod machine;
pub mod metrics;
pub mod roundevent;
pub mod roundlog;
pub mod store;
mod upload;

pub use config::Stage;
pub use machine::{Action, CoordConfig, Coordinator, CoordinatorError};
pub use roundevent::{ClientFailure, RoundClosed, RoundEvent};
