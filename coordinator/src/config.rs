//! The configuration of a federation, as the coordinator's state machine takes it.

use std::collections::BTreeSet;

use fedtune_aggregation::strategy::StrategyConfig;
use fedtune_protocol::envelope::Digest;
use fedtune_protocol::{Hyper, Phase, PublicKey};
use serde::{Deserialize, Serialize};

/// Configuration of a federation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CoordConfig {
    /// Federation id.
    pub federation: String,
    /// Rounds of the first stage.
    pub rounds: u64,
    /// Local training phase of the first stage.
    pub phase: Phase,
    /// Local hyperparameters of the first stage.
    pub hyper: Hyper,
    /// Later stages, run in order after the first (e.g. DPO rounds after SFT rounds).
    #[serde(default)]
    pub then: Vec<Stage>,
    /// LoRA rank.
    pub rank: usize,
    /// LoRA α (the scale of decoded updates is α/r).
    pub lora_alpha: f64,
    /// Aggregation strategy (rule, sampling, DP, ...).
    pub strategy: StrategyConfig,
    /// Updates needed to close a round at its deadline.
    pub min_results: usize,
    /// Round length in milliseconds.
    pub round_timeout_ms: u64,
    /// Largest update payload.
    pub max_payload: u64,
    /// Validity of signed headers.
    pub header_ttl_ms: u64,
    /// Allowed clock skew.
    pub max_skew_ms: u64,
    /// Hash of the base model and LoRA configuration.
    pub plan_hash: Digest,
    /// Admitted client keys.
    pub admitted: BTreeSet<PublicKey>,
}

/// A stage of a federation: `rounds` rounds of `phase` with `hyper`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stage {
    /// Local training phase.
    pub phase: Phase,
    /// Rounds.
    pub rounds: u64,
    /// Local hyperparameters.
    pub hyper: Hyper,
}

impl CoordConfig {
    /// Rounds of every stage together.
    pub fn total_rounds(&self) -> u64 {
        self.rounds + self.then.iter().map(|s| s.rounds).sum::<u64>()
    }

    /// Phase and hyperparameters of `round` (1-based; rounds past the end use the last stage).
    pub fn stage_of(&self, round: u64) -> (Phase, &Hyper) {
        let mut end = self.rounds;
        if round <= end {
            return (self.phase, &self.hyper);
        }
        for s in &self.then {
            end += s.rounds;
            if round <= end {
                return (s.phase, &s.hyper);
            }
        }
        self.then
            .last()
            .map_or((self.phase, &self.hyper), |s| (s.phase, &s.hyper))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_follow_each_other_and_the_last_one_holds() {
        let hyper = |lr| Hyper {
            learning_rate: lr,
            local_steps: 1,
            batch_size: 1,
            beta: 0.1,
            seed: 0,
        };
        let cfg: CoordConfig = serde_json::from_value(serde_json::json!({
            "federation": "f", "rounds": 2, "phase": "sft", "hyper": hyper(1.0),
            "then": [{"phase": "dpo", "rounds": 3, "hyper": hyper(2.0)}],
            "rank": 4, "lora_alpha": 8.0,
            "strategy": fedtune_aggregation::strategy::StrategyConfig::new(
                fedtune_aggregation::strategy::Rule::FedAvgExact),
            "min_results": 1, "round_timeout_ms": 1, "max_payload": 1, "header_ttl_ms": 1,
            "max_skew_ms": 1, "plan_hash": vec![0u8; 32], "admitted": [],
        }))
        .unwrap();
        assert_eq!(cfg.total_rounds(), 5);
        let phases: Vec<(Phase, f64)> = (1..=6)
            .map(|r| {
                let (p, h) = cfg.stage_of(r);
                (p, h.learning_rate)
            })
            .collect();
        assert_eq!(
            phases,
            vec![
                (Phase::Sft, 1.0),
                (Phase::Sft, 1.0),
                (Phase::Dpo, 2.0),
                (Phase::Dpo, 2.0),
                (Phase::Dpo, 2.0),
                (Phase::Dpo, 2.0),
            ]
        );
    }
}
