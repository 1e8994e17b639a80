//! Control messages and their codec: `postcard` with a hard size limit checked before
//! decoding, and length-prefixed frames for byte streams.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::envelope::{Digest, SignedHeader};
use crate::error::{ProtocolError, Result};
use crate::identity::PublicKey;

/// Largest control message (everything but adapter payloads).
pub const MAX_CONTROL: usize = 1 << 20;

/// The local training phase of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Supervised fine-tuning.
    Sft,
    /// Preference alignment.
    Dpo,
    /// KTO on unpaired feedback (appended last: the earlier variants keep their encoding).
    Kto,
    /// GRPO on each client's own prompts, scored by the rewards the plan names.
    Grpo,
    /// Knowledge distillation from a teacher each client holds locally (appended last).
    Distill,
    /// Reward-model training on each client's preference pairs (TRL's `RewardTrainer`): the
    /// LoRA factors and the `score` head are aggregated (appended last).
    Reward,
}

/// The distillation settings every client of a `distill` phase uses (TRL `GKDConfig`'s names
/// and defaults). Each client's teacher stays on its site; it must share the base model's
/// tokenizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillPlan {
    /// Generalized JSD interpolation: 0 = KL(teacher‖student), 1 = KL(student‖teacher).
    #[serde(default = "half")]
    pub beta: f64,
    /// Share of micro-batches trained on the student's own samples.
    #[serde(default = "half")]
    pub lmbda: f64,
    /// Sampling temperature of generated completions.
    #[serde(default = "default_distill_temperature")]
    pub temperature: f64,
    /// Longest generated completion in tokens.
    #[serde(default = "default_new_tokens")]
    pub max_new_tokens: u32,
    /// Off-policy micro-batches train on the teacher's samples (sequence-level KD).
    #[serde(default)]
    pub seq_kd: bool,
}

impl Default for DistillPlan {
    fn default() -> Self {
        DistillPlan {
            beta: half(),
            lmbda: half(),
            temperature: default_distill_temperature(),
            max_new_tokens: default_new_tokens(),
            seq_kd: false,
        }
    }
}

fn half() -> f64 {
    0.5
}
fn default_distill_temperature() -> f64 {
    0.9
}
fn default_new_tokens() -> u32 {
    128
}

/// The GRPO settings every client of a `grpo` phase uses (TRL's names): the plan names the
/// rewards, each client scores its own private completions with them, and only the adapter
/// and scalar metrics leave the site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrpoPlan {
    /// Reward functions (`json_valid`, `json_schema:FILE`, `field_match[:FIELD]`,
    /// `exact_match[:FIELD]`, `regex:PATTERN`, `length:MIN:MAX`, `command:PROGRAM`); files and
    /// programs are resolved on each client.
    pub rewards: Vec<String>,
    /// One weight per reward (empty: 1 each).
    #[serde(default)]
    pub reward_weights: Vec<f64>,
    /// Completions sampled per prompt.
    #[serde(default = "default_generations")]
    pub num_generations: u32,
    /// Longest completion in tokens.
    #[serde(default = "default_completion_length")]
    pub max_completion_length: u32,
    /// Sampling temperature.
    #[serde(default = "one")]
    pub temperature: f64,
    /// TRL's `loss_type` (`dapo`, `grpo`, `bnpo`, `dr_grpo`, `cispo`, `sapo`, `luspo`, `vespo`).
    #[serde(default = "default_loss")]
    pub loss_type: String,
    /// Clipping range ε.
    #[serde(default = "default_epsilon")]
    pub epsilon: f64,
    /// KL coefficient against the reference (the round's starting global adapter); TRL's
    /// default 0.
    #[serde(default)]
    pub beta: f64,
}

/// TRL's default `num_generations` (8).
pub fn default_generations() -> u32 {
    8
}
/// TRL's default `max_completion_length` (512).
pub fn default_completion_length() -> u32 {
    512
}
/// 1 (TRL's default sampling temperature).
pub fn one() -> f64 {
    1.0
}
/// TRL's default GRPO `loss_type` (`dapo`).
pub fn default_loss() -> String {
    "dapo".into()
}
/// TRL's default clipping range ε (0.2).
pub fn default_epsilon() -> f64 {
    0.2
}

/// Local training hyperparameters sent with a round plan: every setting the coordinator fixes
/// for all clients (TRL's names). What a site chooses for itself (memory, speed, precision)
/// stays in its own `client.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hyper {
    /// Learning rate (peak, after warm-up; constant afterwards within a round).
    pub learning_rate: f64,
    /// Local optimiser steps.
    pub local_steps: u64,
    /// Micro-batch size.
    pub batch_size: usize,
    /// Micro-batches per optimiser step: each step averages `batch_size` × this examples.
    pub gradient_accumulation_steps: u32,
    /// Share of the local steps with a linear learning-rate warm-up (TRL's `warmup_ratio`).
    pub warmup_ratio: f64,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Clipping of the global gradient norm (0: none).
    pub max_grad_norm: f64,
    /// Dropout on the LoRA input.
    pub lora_dropout: f64,
    /// DPO/KTO temperature β (DPO and KTO phases).
    pub beta: f64,
    /// DPO's loss (TRL's `loss_type`: `sigmoid`, `ipo`, `hinge`, `simpo`, `orpo`).
    pub loss_type: String,
    /// Seed of local data order and initialisation.
    pub seed: u64,
    /// GRPO's settings (GRPO phase; boxed: most plans have none).
    #[serde(default)]
    pub grpo: Option<Box<GrpoPlan>>,
    /// Distillation's settings (distill phase).
    #[serde(default)]
    pub distill: Option<Box<DistillPlan>>,
}

impl Hyper {
    /// `local_steps` steps of `batch_size` examples at `learning_rate`, with TRL's defaults for
    /// the rest: no accumulation, warm-up or weight decay, clipping at norm 1, no dropout,
    /// β 0.1 with the sigmoid DPO loss, seed 0.
    pub fn new(learning_rate: f64, local_steps: u64, batch_size: usize) -> Self {
        Hyper {
            learning_rate,
            local_steps,
            batch_size,
            gradient_accumulation_steps: 1,
            warmup_ratio: 0.0,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            lora_dropout: 0.0,
            beta: 0.1,
            loss_type: "sigmoid".into(),
            seed: 0,
            grpo: None,
            distill: None,
        }
    }

    /// The first setting out of its range, as `field: why`.
    pub fn invalid(&self) -> Option<String> {
        let checks: [(&str, bool, &str); 8] = [
            (
                "learning_rate",
                self.learning_rate.is_finite() && self.learning_rate > 0.0,
                "must be positive",
            ),
            ("local_steps", self.local_steps > 0, "must be positive"),
            ("batch_size", self.batch_size > 0, "must be positive"),
            (
                "gradient_accumulation_steps",
                self.gradient_accumulation_steps > 0,
                "must be at least 1",
            ),
            (
                "warmup_ratio",
                (0.0..=1.0).contains(&self.warmup_ratio),
                "must be in [0, 1]",
            ),
            (
                "weight_decay",
                self.weight_decay.is_finite() && self.weight_decay >= 0.0,
                "must be non-negative",
            ),
            (
                "max_grad_norm",
                self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0,
                "must be non-negative (0: no clipping)",
            ),
            (
                "lora_dropout",
                (0.0..1.0).contains(&self.lora_dropout),
                "must be in [0, 1)",
            ),
        ];
        checks
            .iter()
            .find(|(_, ok, _)| !ok)
            .map(|(f, _, why)| format!("{f} {why}"))
    }
}

/// What a sampled client must do in a round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundPlan {
    /// Federation id.
    pub federation: String,
    /// Round number (1-based).
    pub round: u64,
    /// SFT, DPO, KTO, GRPO or distillation.
    pub phase: Phase,
    /// Hyperparameters.
    pub hyper: Hyper,
    /// The federation's LoRA configuration (its hash with the base model's digest is the
    /// global header's `plan_hash`).
    pub lora: crate::plan::LoraPlan,
    /// Digest of the global adapter to start from.
    pub global_digest: Digest,
    /// Deadline, milliseconds since the Unix epoch.
    pub deadline_ms: u64,
}

/// Coordinator → client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToClient {
    /// Registration accepted.
    Welcome {
        /// The coordinator's key (clients compare it with their pinned key).
        coordinator: PublicKey,
        /// Federation id.
        federation: String,
    },
    /// A round plan with the signed global adapter (PEFT safetensors bytes).
    Plan {
        /// The plan (boxed: the other messages are small).
        plan: Box<RoundPlan>,
        /// Signed header of the global adapter.
        global: Box<SignedHeader>,
        /// The global adapter.
        payload: Vec<u8>,
    },
    /// The update of `round` is durably stored.
    Accepted {
        /// Round.
        round: u64,
    },
    /// The update of `round` was rejected.
    Rejected {
        /// Round.
        round: u64,
        /// Why: the rejection's label, a colon, and what it says (`replay: update already
        /// seen ...`; see [`crate::Rejection::label`]).
        reason: String,
    },
    /// The federation finished; the last global adapter has this digest.
    Finished {
        /// Digest of the final global adapter.
        global_digest: Digest,
    },
}

/// Client → coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToCoordinator {
    /// Registration.
    Hello {
        /// Protocol version.
        version: u16,
        /// The client's key.
        client: PublicKey,
    },
    /// Index 1 on the wire was an update carried in a control message. Updates are uploads on
    /// streams of their own ([`Upload`]); the index stays taken so that `Decline` keeps its
    /// encoding, and a frame that uses it fails to decode.
    #[doc(hidden)]
    Retired(Never),
    /// The client cannot take part in `round`.
    Decline {
        /// Round.
        round: u64,
        /// Why.
        reason: DeclineReason,
    },
}

/// A value that cannot exist: decoding one always fails.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Never {}

/// An update as the client uploads it, on a stream of its own: the signed header (one frame,
/// checked before any payload byte is read), then the payload (PEFT safetensors bytes),
/// resumed from the offset the coordinator says it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Upload {
    /// The signed header.
    pub header: Box<SignedHeader>,
    /// The adapter's bytes.
    pub payload: Vec<u8>,
}

/// Why a client takes no part in a round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeclineReason {
    /// The plan or its global adapter failed the client's checks (another federation, base
    /// model or LoRA configuration, a bad signature, a setting the site pins).
    Plan(String),
    /// Local training failed (no data for the round's phase, a bad setting, out of memory).
    Training(String),
}

impl DeclineReason {
    /// A short label for logs and metrics: `plan` or `training`.
    pub fn label(&self) -> &'static str {
        match self {
            DeclineReason::Plan(_) => "plan",
            DeclineReason::Training(_) => "training",
        }
    }

    /// The client's explanation.
    pub fn detail(&self) -> &str {
        match self {
            DeclineReason::Plan(s) | DeclineReason::Training(s) => s,
        }
    }
}

impl std::fmt::Display for DeclineReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeclineReason::Plan(s) => write!(f, "plan refused: {s}"),
            DeclineReason::Training(s) => write!(f, "local training failed: {s}"),
        }
    }
}

/// Encodes a message.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    postcard::to_stdvec(msg).expect("messages always encode")
}

/// Decodes a message of at most `limit` bytes; hostile input gives an error, never a panic or
/// an allocation beyond the input's size.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], limit: usize, what: &'static str) -> Result<T> {
    if bytes.len() > limit {
        return Err(ProtocolError::TooLarge {
            what,
            size: bytes.len() as u64,
            limit: limit as u64,
        });
    }
    let (v, rest) =
        postcard::take_from_bytes(bytes).map_err(|e| ProtocolError::malformed(what, e))?;
    if !rest.is_empty() {
        return Err(ProtocolError::malformed(
            what,
            format!("{} trailing bytes", rest.len()),
        ));
    }
    Ok(v)
}

/// Prefixes `body` with its length (u32, little endian).
pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// Reassembles length-prefixed frames from a byte stream, refusing frames over a limit before
/// buffering them.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    limit: usize,
}

impl FrameDecoder {
    /// A decoder refusing frames over `limit` bytes.
    pub fn new(limit: usize) -> Self {
        FrameDecoder {
            buf: Vec::new(),
            limit,
        }
    }

    /// Adds bytes; returns the complete frames now available.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        loop {
            if self.buf.len() < 4 {
                break;
            }
            let len = u32::from_le_bytes(self.buf[..4].try_into().expect("4 bytes")) as usize;
            if len > self.limit {
                return Err(ProtocolError::TooLarge {
                    what: "frame",
                    size: len as u64,
                    limit: self.limit as u64,
                });
            }
            if self.buf.len() < 4 + len {
                break;
            }
            out.push(self.buf[4..4 + len].to_vec());
            self.buf.drain(..4 + len);
        }
        Ok(out)
    }
}
