//! The coordinator daemon: a sans-IO round state machine and the thin driver that runs it over QUIC.
