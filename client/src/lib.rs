//! The client daemon: a sans-IO state machine that receives round plans, trains locally and uploads signed updates.
