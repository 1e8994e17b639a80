//! The simulator: drives the coordinator and client state machines of the daemons (not a
//! re-implementation) with many clients on one machine. [`memory`] is the in-memory transport
//! with a simulated clock; every message crosses the protocol codec, and clients train
//! through the real engine on one shared read-only base model. [`run`] turns a
//! `federation.toml` ([`config`]) into a run with partitioned data ([`partition`]), seeded
//! faults and per-round evaluation ([`evaluate`]).

pub mod clinical;
pub mod config;
pub mod demo;
pub mod evaluate;
pub mod memory;
pub mod metrics;
pub mod partition;
pub mod progress;
pub mod quic;
pub mod report;
pub mod run;
pub mod setup;

pub use config::SimConfig;
pub use memory::{Fate, Federation, Sent, SimClient, SimError};
