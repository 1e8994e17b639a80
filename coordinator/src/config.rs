//! The configuration of a federation, as the coordinator's state machine takes it.

use std::collections::BTreeSet;

use fedtune_aggregation::strategy::StrategyConfig;
use fedtune_protocol::envelope::Digest;
use fedtune_protocol::{Hyper, LoraPlan, Phase, PublicKey};
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
    /// LoRA rank, α (the scale of decoded updates is α/r) and target modules, sent with every
    /// plan.
    pub lora: LoraPlan,
    /// Aggregation strategy (rule, sampling, DP, ...).
    pub strategy: StrategyConfig,
    /// Updates needed to close a round at its deadline.
    pub min_results: usize,
    /// Round length in milliseconds.
    pub round_timeout_ms: u64,
    /// Largest update payload.
    pub max_payload: u64,
    /// Validity of the update headers clients sign (the simulator's clients use it).
    pub header_ttl_ms: u64,
    /// Clock skew tolerated on a header's issue time.
    pub max_skew_ms: u64,
    /// Hash of the base model and LoRA configuration ([`fedtune_protocol::plan_hash`]).
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

/// Clock skew tolerated on a signed header's issue time (a client's clock ahead of the
/// coordinator's).
pub const DEFAULT_MAX_SKEW_MS: u64 = 120_000;

/// Largest update payload by default.
pub const DEFAULT_MAX_PAYLOAD: u64 = 256 << 20;

/// Validity of the update headers a client signs, for rounds of `round_timeout_ms`:
/// `max(4 × round timeout, 1 h)`, so an update sent again after a reconnection late in its
/// round is still valid, while an old header cannot be used in much later rounds.
pub fn default_header_ttl_ms(round_timeout_ms: u64) -> u64 {
    round_timeout_ms.saturating_mul(4).max(3_600_000)
}

impl CoordConfig {
    /// A federation of `rounds` rounds of `phase` with the documented defaults for the rest:
    /// no later stages, one update needed to close a round, [`DEFAULT_MAX_PAYLOAD`],
    /// [`default_header_ttl_ms`] and [`DEFAULT_MAX_SKEW_MS`]. The daemon's `coord.toml` and the
    /// simulator both start from here and set what their files say.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        federation: String,
        phase: Phase,
        rounds: u64,
        hyper: Hyper,
        lora: LoraPlan,
        strategy: StrategyConfig,
        round_timeout_ms: u64,
        plan_hash: Digest,
        admitted: BTreeSet<PublicKey>,
    ) -> Self {
        CoordConfig {
            federation,
            rounds,
            phase,
            hyper,
            then: Vec::new(),
            lora,
            strategy,
            min_results: 1,
            round_timeout_ms,
            max_payload: DEFAULT_MAX_PAYLOAD,
            header_ttl_ms: default_header_ttl_ms(round_timeout_ms),
            max_skew_ms: DEFAULT_MAX_SKEW_MS,
            plan_hash,
            admitted,
        }
    }

    /// The first setting out of its range, as `field: why` (positive rank, minimum results
    /// and rounds; every stage's hyperparameters in range).
    pub fn validate(&self) -> Result<(), String> {
        for (field, v) in [
            ("lora.rank", self.lora.rank as u64),
            ("min_results", self.min_results as u64),
            ("rounds", self.total_rounds()),
        ] {
            if v == 0 {
                return Err(format!("{field} must be positive"));
            }
        }
        let stages = std::iter::once(("hyper".to_string(), &self.hyper)).chain(
            self.then
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("then[{i}].hyper"), &s.hyper)),
        );
        for (field, hyper) in stages {
            if let Some(why) = hyper.invalid() {
                return Err(format!("{field}.{why}"));
            }
        }
        // A reward stage turns the global adapter into a reward model (LoRA + score head):
        // training a policy from it afterwards would start from the wrong model.
        let phases = std::iter::once(self.phase).chain(self.then.iter().map(|s| s.phase));
        let mut reward = false;
        for (i, p) in phases.enumerate() {
            if reward && p != Phase::Reward {
                return Err(format!(
                    "then[{}].phase: a {} stage cannot follow a reward stage (a reward stage's \
                     rounds train a reward model, which is the federation's result: run \
                     policy training in a federation of its own, its GRPO rewards naming the \
                     exported reward model)",
                    i - 1,
                    serde_json::to_value(p)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default()
                ));
            }
            reward |= p == Phase::Reward;
        }
        if let Some(t) = self.strategy.target_rank
            && (t == 0 || t > self.lora.rank)
        {
            return Err(format!(
                "target_rank {t}: must be 1..={} (rank): the next round's clients train from \
                 the global adapter and send updates of its rank, which the plan caps at rank",
                self.lora.rank
            ));
        }
        Ok(())
    }

    /// The strategy the machine aggregates with: `strategy`, its `target_rank` the plan's
    /// rank unless set. (FedAvg-exact's stacked sum has rank Σ rₖ; clients train the next
    /// round from the global adapter, so it is re-factorised to a rank the plan admits.)
    pub fn effective_strategy(&self) -> StrategyConfig {
        let mut s = self.strategy.clone();
        s.target_rank.get_or_insert(self.lora.rank);
        s
    }

    /// Whether a stage trains a reward model: then the global adapter carries a `score` head
    /// from the start (the same initial head for every client), which earlier stages pass
    /// through unchanged.
    pub fn trains_reward_model(&self) -> bool {
        self.phase == Phase::Reward || self.then.iter().any(|s| s.phase == Phase::Reward)
    }

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
    fn the_constructor_sets_the_documented_defaults() {
        let hyper = Hyper::new(1e-3, 1, 1);
        let lora = LoraPlan {
            rank: 4,
            lora_alpha: 8.0,
            target_modules: vec!["q_proj".into()],
        };
        let strategy = fedtune_aggregation::strategy::StrategyConfig::new(
            fedtune_aggregation::strategy::Rule::FedAvgExact,
        );
        let short = CoordConfig::new(
            "f".into(),
            Phase::Sft,
            3,
            hyper.clone(),
            lora.clone(),
            strategy.clone(),
            60_000,
            [0; 32],
            BTreeSet::new(),
        );
        assert_eq!(short.header_ttl_ms, 3_600_000, "at least an hour");
        assert_eq!(short.max_skew_ms, DEFAULT_MAX_SKEW_MS);
        assert_eq!(
            (short.min_results, short.max_payload),
            (1, DEFAULT_MAX_PAYLOAD)
        );
        assert_eq!(short.total_rounds(), 3);
        let long = CoordConfig::new(
            "f".into(),
            Phase::Sft,
            3,
            hyper,
            lora,
            strategy,
            2 * 3_600_000,
            [0; 32],
            BTreeSet::new(),
        );
        assert_eq!(long.header_ttl_ms, 8 * 3_600_000, "four round timeouts");
    }

    #[test]
    fn validation_names_the_setting_and_the_stage() {
        let lora = LoraPlan {
            rank: 4,
            lora_alpha: 8.0,
            target_modules: vec!["q_proj".into()],
        };
        let mut cfg = CoordConfig::new(
            "f".into(),
            Phase::Sft,
            1,
            Hyper::new(1e-3, 1, 1),
            lora,
            fedtune_aggregation::strategy::StrategyConfig::new(
                fedtune_aggregation::strategy::Rule::FedAvgExact,
            ),
            60_000,
            [0; 32],
            BTreeSet::new(),
        );
        assert_eq!(cfg.validate(), Ok(()));
        cfg.then.push(Stage {
            phase: Phase::Dpo,
            rounds: 1,
            hyper: Hyper {
                max_grad_norm: -1.0,
                ..Hyper::new(1e-3, 1, 1)
            },
        });
        let err = cfg.validate().unwrap_err();
        assert!(err.starts_with("then[0].hyper.max_grad_norm"), "{err}");
        // SFT then a reward model is fine; a policy stage after a reward stage is not.
        cfg.then[0].hyper.max_grad_norm = 1.0;
        cfg.then[0].phase = Phase::Reward;
        assert!(
            !CoordConfig {
                then: vec![],
                ..cfg.clone()
            }
            .trains_reward_model()
        );
        assert!(cfg.trains_reward_model());
        assert_eq!(cfg.validate(), Ok(()));
        cfg.then.push(Stage {
            phase: Phase::Dpo,
            ..cfg.then[0].clone()
        });
        let err = cfg.validate().unwrap_err();
        assert!(
            err.starts_with("then[1].phase: a dpo stage cannot follow a reward stage"),
            "{err}"
        );
        cfg.then.clear();
        cfg.lora.rank = 0;
        assert_eq!(cfg.validate().unwrap_err(), "lora.rank must be positive");
    }

    #[test]
    fn stages_follow_each_other_and_the_last_one_holds() {
        let hyper = |lr| Hyper::new(lr, 1, 1);
        let cfg: CoordConfig = serde_json::from_value(serde_json::json!({
            "federation": "f", "rounds": 2, "phase": "sft", "hyper": hyper(1.0),
            "then": [{"phase": "dpo", "rounds": 3, "hyper": hyper(2.0)}],
            "lora": {"rank": 4, "lora_alpha": 8.0, "target_modules": ["q_proj"]},
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
