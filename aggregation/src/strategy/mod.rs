//! Strategies, with the interface Flower users know: [`Strategy::configure_fit`] samples the
//! clients of a round, [`Strategy::aggregate_fit`] turns `(results, failures)` into
//! `Option<GlobalUpdate>` — `None` when no result survives validation or the total weight is
//! zero, in which case the global adapter stays as it is.
//!
//! [`FedStrategy`] composes: validation → norm bounding / DP clipping → the rule → DP noise →
//! server optimiser → re-factorisation to the target rank. Its state (global adapter, optimiser
//! moments, privacy accountant) is serialisable so that a coordinator can persist and restore it.

use std::collections::BTreeMap;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::dp::{Accountant, clip_factor, noise_std};
use crate::error::{AggregationError, Result};
use crate::fedavg::{self, Input};
use crate::optim::OptimizerState;
use crate::robust::krum_ranking;
use crate::update::{
    Adapter, ClientId, ClientResult, Failure, GlobalUpdate, Report, example_weights,
    weighted_metrics,
};
use crate::validate::{Plan, update_norm, validate};

mod config;
mod paths;

pub use config::{Rule, Sampling, StrategyConfig};
use paths::{densify, factor_norm, input_template};

/// A sampled client and the rank it should train at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FitInstruction {
    /// The client.
    pub client: ClientId,
    /// Rank of the adapter it receives and returns.
    pub rank: usize,
}

/// What `aggregate_fit` returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The new global update, or `None` (the global adapter stays as it is).
    pub global: Option<GlobalUpdate>,
    /// Failures given plus those found by validation.
    pub failures: Vec<Failure>,
}

/// The federated-learning strategy interface.
pub trait Strategy {
    /// Samples the clients of `round` among `available`.
    fn configure_fit(&mut self, round: u64, available: &[ClientId]) -> Vec<FitInstruction>;
    /// Aggregates a round's results.
    fn aggregate_fit(
        &mut self,
        round: u64,
        results: &[ClientResult],
        failures: &[Failure],
    ) -> Result<Outcome>;
}

/// Everything [`FedStrategy`] carries across rounds.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StrategyState {
    /// Current global adapter.
    pub global: Adapter,
    /// Shapes and ranks updates must have.
    pub plan: Plan,
    /// Server optimiser moments.
    pub optimizer: OptimizerState,
    /// Privacy accountant.
    pub accountant: Accountant,
    /// Rank per client (heterogeneous ranks).
    pub client_ranks: BTreeMap<ClientId, usize>,
    /// Clients sampled in the last `configure_fit` (for the DP sampling rate).
    pub last_sampled: usize,
}

/// The standard strategy.
#[derive(Debug, Clone)]
pub struct FedStrategy {
    /// Configuration.
    pub config: StrategyConfig,
    /// State across rounds.
    pub state: StrategyState,
}

/// The space a rule aggregates in.
enum Space {
    /// LoRA factors (FedIT, FFA-LoRA, HetLoRA).
    Factors,
    /// Low-rank products, exact (FedAvg-exact, FlexLoRA, Krum).
    Product,
    /// Dense `ΔW` per module (TIES, DARE, task arithmetic, median, trimmed mean).
    Dense,
}

fn rng_for(seed: u64, round: u64, purpose: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ round.rotate_left(17) ^ purpose,
    )
}

impl FedStrategy {
    /// A strategy starting from `global` (possibly empty) under `plan`.
    pub fn new(config: StrategyConfig, global: Adapter, plan: Plan) -> Result<Self> {
        if let Some(dp) = &config.dp
            && !(dp.clip_norm > 0.0 && dp.noise_multiplier >= 0.0 && dp.population > 0)
        {
            return Err(AggregationError::Config(
                "dp needs clip_norm > 0, noise_multiplier >= 0 and a population".into(),
            ));
        }
        if let Some(opt) = &config.server_optimizer {
            opt.validate().map_err(AggregationError::Config)?;
        }
        if matches!(config.rule, Rule::HetLora)
            && (config.dp.is_some() || config.norm_bound.is_some())
        {
            return Err(AggregationError::Config(
                "norm bounding and DP are not defined for hetlora's padded factors; use flexlora"
                    .into(),
            ));
        }
        Ok(FedStrategy {
            config,
            state: StrategyState {
                global,
                plan,
                ..Default::default()
            },
        })
    }

    /// Restores a strategy from saved state.
    pub fn from_state(config: StrategyConfig, state: StrategyState) -> Self {
        FedStrategy { config, state }
    }

    /// The global adapter a client of rank `rank` receives (its first `rank` components for
    /// heterogeneous-rank rules, the whole adapter otherwise).
    pub fn global_for(&self, rank: usize) -> Adapter {
        match self.config.rule {
            Rule::HetLora | Rule::FlexLora => fedavg::truncate(&self.state.global, rank),
            _ => self.state.global.clone(),
        }
    }

    /// Whether `A` is frozen and shared (FFA-LoRA): every rule then works on `B`.
    fn frozen_a(&self) -> bool {
        self.config.frozen_a || matches!(self.config.rule, Rule::Ffa)
    }

    fn space(&self) -> Space {
        if self.frozen_a()
            && matches!(
                self.config.rule,
                Rule::Ffa
                    | Rule::FedAvgFactors
                    | Rule::FedAvgExact
                    | Rule::Median
                    | Rule::TrimmedMean { .. }
            )
        {
            return Space::Factors;
        }
        match self.config.rule {
            Rule::FedAvgFactors | Rule::HetLora | Rule::Ffa => Space::Factors,
            Rule::FedAvgExact | Rule::FlexLora | Rule::Krum { .. } | Rule::MultiKrum { .. } => {
                Space::Product
            }
            _ => Space::Dense,
        }
    }
}

impl Strategy for FedStrategy {
    fn configure_fit(&mut self, round: u64, available: &[ClientId]) -> Vec<FitInstruction> {
        let s = self.config.sampling;
        let n = available.len();
        let mut k = ((s.fraction * n as f64).ceil() as usize).max(s.min_clients);
        if let Some(m) = s.max_clients {
            k = k.min(m);
        }
        let k = k.min(n);
        let mut pool: Vec<ClientId> = available.to_vec();
        pool.sort();
        pool.shuffle(&mut rng_for(self.config.seed, round, 1));
        pool.truncate(k);
        pool.sort();
        self.state.last_sampled = pool.len();
        let default_rank = self.state.plan.max_rank;
        pool.into_iter()
            .map(|c| FitInstruction {
                rank: self
                    .state
                    .client_ranks
                    .get(&c)
                    .copied()
                    .unwrap_or(default_rank),
                client: c,
            })
            .collect()
    }

    fn aggregate_fit(
        &mut self,
        round: u64,
        results: &[ClientResult],
        failures: &[Failure],
    ) -> Result<Outcome> {
        let mut failures = failures.to_vec();
        let mut plan = self.state.plan.clone();
        plan.client_ranks = self.state.client_ranks.clone();
        if matches!(self.config.rule, Rule::HetLora | Rule::FlexLora) {
            plan.client_ranks.clear();
        }
        let (ok, bad) = validate(results, &plan, &self.state.global, &self.config.validation);
        failures.extend(bad);
        let mut used: Vec<&ClientResult> = ok.iter().map(|&i| &results[i]).collect();
        let Some(mut weights) = example_weights(&used) else {
            return Ok(Outcome {
                global: None,
                failures,
            });
        };
        let mut report = Report {
            rule: self.config.rule.name().into(),
            ..Default::default()
        };
        // Krum selects before anything else.
        if let Rule::Krum { f } | Rule::MultiKrum { f, .. } = self.config.rule {
            let adapters: Vec<&Adapter> = used.iter().map(|r| &r.adapter).collect();
            let ranking = krum_ranking(&adapters, f)?;
            let m = match self.config.rule {
                Rule::MultiKrum { m, .. } => m.clamp(1, used.len()),
                _ => 1,
            };
            let mut chosen: Vec<usize> = ranking[..m].iter().map(|(i, _)| *i).collect();
            chosen.sort();
            used = chosen.iter().map(|&i| used[i]).collect();
            let Some(w) = example_weights(&used) else {
                return Ok(Outcome {
                    global: None,
                    failures,
                });
            };
            weights = w;
        }
        // Clipping factors (norm bounding and DP clipping), on updates relative to the global.
        let clip = match (self.config.norm_bound, &self.config.dp) {
            (Some(b), Some(dp)) => Some(b.min(dp.clip_norm)),
            (Some(b), None) => Some(b),
            (None, Some(dp)) => Some(dp.clip_norm),
            (None, None) => None,
        };
        let coefficients: Vec<f64> = match clip {
            None => vec![1.0; used.len()],
            Some(c) => used
                .iter()
                .map(|r| {
                    let norm = if matches!(self.space(), Space::Factors) {
                        factor_norm(&r.adapter, &self.state.global, self.frozen_a())
                    } else {
                        update_norm(&r.adapter, &self.state.global)
                    };
                    clip_factor(norm, c)
                })
                .collect(),
        };
        report.clipped = used
            .iter()
            .zip(&coefficients)
            .filter(|(_, c)| **c < 1.0)
            .map(|(r, _)| r.client.clone())
            .collect();
        report.used = used.iter().map(|r| r.client.clone()).collect();
        let noise = self
            .config
            .dp
            .as_ref()
            .map(|dp| noise_std(dp, &weights))
            .filter(|s| *s > 0.0);
        let global = self.state.global.clone();
        let input = Input {
            global: &global,
            results: used.clone(),
            weights: weights.clone(),
        };
        let adapter = match self.space() {
            Space::Factors => self.aggregate_factors(round, &input, &coefficients, noise)?,
            Space::Product => {
                let rank = match self.config.rule {
                    Rule::FlexLora => Some(self.config.target_rank.unwrap_or(plan.max_rank)),
                    _ => self.config.target_rank,
                };
                let (a, energy) = fedavg::fedavg_exact(&input, &coefficients, rank);
                report.retained_energy = Some(energy);
                if noise.is_some() || self.config.server_optimizer.is_some() {
                    let dense = densify(&a);
                    let (out, energy) = self.finish_dense(round, dense, &a, noise)?;
                    report.retained_energy = Some(energy);
                    out
                } else {
                    a
                }
            }
            Space::Dense => {
                let dense = self.aggregate_dense(round, &input, &coefficients)?;
                let (out, energy) =
                    self.finish_dense(round, dense, &input_template(&input), noise)?;
                report.retained_energy = Some(energy);
                out
            }
        };
        if let Some(dp) = &self.config.dp {
            let q =
                (self.state.last_sampled.max(used.len()) as f64 / dp.population as f64).min(1.0);
            self.state.accountant.step(q, dp.noise_multiplier, 1);
            report.epsilon = Some(self.state.accountant.epsilon(dp.delta));
            report.delta = Some(dp.delta);
            report.noise_std = noise;
        }
        let num_examples = used.iter().map(|r| r.num_examples).sum();
        let metrics = weighted_metrics(&used);
        if self.state.plan.modules.is_empty() {
            self.state.plan = Plan::from_adapter(&adapter);
        }
        self.state.global = adapter.clone();
        Ok(Outcome {
            global: Some(GlobalUpdate {
                adapter,
                num_examples,
                metrics,
                report,
            }),
            failures,
        })
    }
}
