//! The simulator: drives the coordinator and client state machines with many clients on one machine, with seeded faults.
