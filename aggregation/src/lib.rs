//! Pure functions and strategies that combine clients' LoRA adapter updates into a global
//! update. No I/O, no clock, no async, no burn; everything is deterministic given a seed.
//!
//! - [`update`]: the model of an update ([`Adapter`] of [`LoraFactors`] and dense tensors,
//!   [`ClientResult`], [`Failure`], [`GlobalUpdate`]).
//! - [`fedavg`]: FedIT, exact product-space FedAvg, FFA-LoRA, HetLoRA, FlexLoRA.
//! - [`merge`]: TIES, DARE, breadcrumbs, task arithmetic and linear merging with mergekit's
//!   semantics; [`slerp`] and [`model_stock`], which need each tensor's rows.
//! - [`robust`]: coordinate median, trimmed mean, Krum, Multi-Krum, norm bounding.
//! - [`optim`]: FedAvgM, FedAdagrad, FedYogi, FedAdam.
//! - [`dp`]: clipping, Gaussian noise and the RDP accountant.
//! - [`validate`]: rejection of bad updates with reasons.
//! - [`strategy`]: the Flower-style [`Strategy`] interface and [`FedStrategy`].
//! - [`matrix`], [`lowrank`]: the linear algebra underneath.

pub mod dp;
pub mod error;
pub mod fedavg;
pub mod lowrank;
pub mod matrix;
pub mod merge;
pub mod model_stock;
pub mod optim;
pub mod robust;
pub mod slerp;
pub mod strategy;
mod trim;
pub mod update;
pub mod validate;

pub use error::{AggregationError, Result};
pub use matrix::Matrix;
pub use strategy::{
    FedStrategy, FitInstruction, Outcome, Rule, Sampling, Strategy, StrategyConfig, StrategyState,
};
pub use update::{Adapter, ClientId, ClientResult, Failure, GlobalUpdate, LoraFactors, Report};
pub use validate::{Plan, ValidationConfig};
