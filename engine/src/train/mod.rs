//! Training: a hand-written forward/backward over burn tensors ([`step`], [`ops`]).
pub mod fused;
pub mod ops;
pub mod step;
