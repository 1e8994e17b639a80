//! The fedtune engine: Llama-family models on burn, their loaders, tokenizers and chat
//! templates, datasets, LoRA/QLoRA, supervised fine-tuning, DPO, evaluation, generation and
//! PEFT-format adapter I/O. The engine never sees a socket.

pub mod config;
pub mod error;
pub mod model;
pub mod weights;

pub use config::ModelConfig;
pub use error::{Error, Result};
pub use model::LlamaModel;
pub mod template;
pub mod tokenizer;

pub use template::Message;
pub use tokenizer::{Encoded, Tokenizer};
pub mod adapter;

pub use adapter::{LoraConfig, PeftAdapter};
pub mod data;
pub mod dpo;
pub mod eval;
pub mod gguf;
pub mod loader;

pub use loader::{LoadedModel, load_model, load_model_half};
pub mod cuda;
pub mod device;
pub mod generate;
pub mod kernels;
pub mod nf4;
pub mod rewards;
pub mod train;
