//! The simulator: drives the coordinator and client state machines of the daemons (not a
//! re-implementation) with many clients on one machine. This module is the in-memory
//! transport with a simulated clock; every message crosses the protocol codec, and clients
//! train through the real engine on one shared read-only base model.

pub mod demo;
pub mod memory;

pub use memory::{Federation, SimClient};
