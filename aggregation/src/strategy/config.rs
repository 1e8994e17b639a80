//! What a strategy is configured with: the aggregation rule, client sampling, and the
//! composition around the rule (target rank, norm bounding, DP, server optimiser, validation).

use serde::{Deserialize, Serialize};

use crate::dp::DpConfig;
use crate::optim::ServerOptimizer;
use crate::validate::ValidationConfig;

/// Aggregation rules.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Rule {
    /// FedIT: average `A` and `B` separately (inexact; for comparison). `fedavg-factors`
    /// (the command line's spelling) and `fedavg_factors` are accepted too.
    #[serde(alias = "fedavg_factors", alias = "fedavg-factors")]
    FedAvgFactors,
    /// Exact `Σ pₖsₖBₖAₖ`, stacked or re-factorised to the target rank. `fedavg-exact` (the
    /// command line's spelling) and `fedavg_exact` are accepted too.
    #[serde(alias = "fedavg_exact", alias = "fedavg-exact")]
    FedAvgExact,
    /// FFA-LoRA: `A` frozen and shared, `B` averaged.
    Ffa,
    /// HetLoRA: zero-padding for heterogeneous ranks.
    HetLora,
    /// FlexLoRA: SVD redistribution for heterogeneous ranks.
    FlexLora,
    /// TIES on `ΔW` per module.
    Ties {
        /// Density.
        density: f64,
        /// λ.
        lambda: f64,
    },
    /// DARE then TIES sign election.
    DareTies {
        /// Drop rate p.
        drop_rate: f64,
        /// λ.
        lambda: f64,
    },
    /// DARE then a weighted sum.
    DareLinear {
        /// Drop rate p.
        drop_rate: f64,
        /// λ.
        lambda: f64,
    },
    /// Weighted sum of task vectors.
    TaskArithmetic {
        /// λ.
        lambda: f64,
    },
    /// Coordinate-wise median of `ΔW` (of `B` with `ffa`).
    Median,
    /// Coordinate-wise trimmed mean.
    TrimmedMean {
        /// Fraction trimmed at each end.
        beta: f64,
    },
    /// Krum (one update selected).
    Krum {
        /// Assumed Byzantine clients.
        f: usize,
    },
    /// Multi-Krum (mean of the `m` best).
    MultiKrum {
        /// Assumed Byzantine clients.
        f: usize,
        /// Updates averaged.
        m: usize,
    },
}

impl Rule {
    /// Short name for reports.
    pub fn name(&self) -> &'static str {
        match self {
            Rule::FedAvgFactors => "fedavg-factors",
            Rule::FedAvgExact => "fedavg-exact",
            Rule::Ffa => "ffa",
            Rule::HetLora => "hetlora",
            Rule::FlexLora => "flexlora",
            Rule::Ties { .. } => "ties",
            Rule::DareTies { .. } => "dare-ties",
            Rule::DareLinear { .. } => "dare-linear",
            Rule::TaskArithmetic { .. } => "task-arithmetic",
            Rule::Median => "median",
            Rule::TrimmedMean { .. } => "trimmed-mean",
            Rule::Krum { .. } => "krum",
            Rule::MultiKrum { .. } => "multi-krum",
        }
    }
}

/// Client sampling per round (Flower's `fraction_fit`, `min_fit_clients`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    /// Fraction of available clients sampled.
    pub fraction: f64,
    /// At least this many (when available).
    pub min_clients: usize,
    /// At most this many.
    pub max_clients: Option<usize>,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            fraction: 1.0,
            min_clients: 1,
            max_clients: None,
        }
    }
}

/// Configuration of [`FedStrategy`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StrategyConfig {
    /// The aggregation rule.
    pub rule: Rule,
    /// Rank of the global adapter after dense or product-space rules (`None`: exact stacking
    /// for FedAvg-exact, the largest client rank otherwise).
    pub target_rank: Option<usize>,
    /// Clip each update to this norm before aggregating (norm bounding).
    pub norm_bound: Option<f64>,
    /// Client-level differential privacy.
    pub dp: Option<DpConfig>,
    /// Server optimiser.
    pub server_optimizer: Option<ServerOptimizer>,
    /// Validation thresholds.
    pub validation: ValidationConfig,
    /// Client sampling.
    pub sampling: Sampling,
    /// Seed of sampling, DARE masks, DP noise and randomized SVD.
    pub seed: u64,
    /// FFA-LoRA: `A` is frozen at a shared seeded init and every rule applies to `B`
    /// (averaging is then exact, and coordinate rules are well defined on `B`).
    #[serde(default)]
    pub frozen_a: bool,
}

impl StrategyConfig {
    /// A config for `rule` with everything else off.
    pub fn new(rule: Rule) -> Self {
        StrategyConfig {
            rule,
            target_rank: None,
            norm_bound: None,
            dp: None,
            server_optimizer: None,
            validation: ValidationConfig::default(),
            sampling: Sampling::default(),
            seed: 0,
            frozen_a: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Rule;

    #[test]
    fn rules_take_the_command_lines_spelling_too() {
        for (kind, want) in [
            ("fed_avg_exact", Rule::FedAvgExact),
            ("fedavg_exact", Rule::FedAvgExact),
            ("fedavg-exact", Rule::FedAvgExact),
            ("fed_avg_factors", Rule::FedAvgFactors),
            ("fedavg_factors", Rule::FedAvgFactors),
            ("fedavg-factors", Rule::FedAvgFactors),
        ] {
            let got: Rule = serde_json::from_str(&format!("{{\"kind\": \"{kind}\"}}")).unwrap();
            assert_eq!(got, want, "{kind}");
        }
        // Written back in the one canonical spelling.
        let text = serde_json::to_string(&Rule::FedAvgExact).unwrap();
        assert_eq!(text, "{\"kind\":\"fed_avg_exact\"}");
    }
}
