//! The client: a sans-IO state machine ([`machine::Client`]) that verifies round plans and
//! global adapters and signs updates, and the local training job it asks its driver to run
//! ([`trainer`], through the real engine). [`daemon`] is its tokio/quinn driver; the simulator drives the
//! same machine in memory.

pub mod daemon;
pub mod event;
pub mod machine;
pub mod metrics;
pub mod trainer;

pub use event::ClientEvent;
pub use machine::{Client, ClientAction, ClientConfig, LoraPin, TrainJob};
