//! Training: a hand-written forward/backward over burn tensors ([`step`], [`ops`]).
pub mod batches;
pub mod checkpoint;
pub mod config;
pub mod distill;
pub mod dpo;
pub mod fused;
pub mod grpo;
pub mod kto;
pub mod lora;
pub mod memory;
pub mod ops;
pub mod optim;
pub mod params;
pub(crate) mod proj;
pub mod reward;
pub mod sft;
pub mod state;
pub mod step;
pub mod tensorboard;
pub mod trainer;

pub use config::TrainConfig;
pub use sft::{
    Callback, LogEntry, NoCallback, RunInfo, SftRun, TrainSummary, TrainerState, train_sft,
};
