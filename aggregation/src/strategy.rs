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
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::dp::{Accountant, DpConfig, clip_factor, noise_std};
use crate::error::{AggregationError, Result};
use crate::fedavg::{self, Input};
use crate::matrix::{Matrix, dense_refactor};
use crate::merge::{MergeMethod, MergeParams, merge};
use crate::optim::{OptimizerState, ServerOptimizer};
use crate::robust::{krum_ranking, median, trimmed_mean};
use crate::update::{
    Adapter, ClientId, ClientResult, Failure, GlobalUpdate, LoraFactors, Report, example_weights,
    weighted_metrics,
};
use crate::validate::{Plan, ValidationConfig, update_norm, validate};

/// Aggregation rules.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Rule {
    /// FedIT: average `A` and `B` separately (inexact; for comparison).
    FedAvgFactors,
    /// Exact `Σ pₖsₖBₖAₖ`, stacked or re-factorised to the target rank.
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

/// Flat norm of a factor-space update (`B` only under FFA-LoRA).
fn factor_norm(x: &Adapter, g: &Adapter, b_only: bool) -> f64 {
    let mut sq = 0.0;
    for (name, m) in &x.modules {
        let gm = g.modules.get(name);
        let diff = |p: &Matrix, q: Option<&Matrix>| -> f64 {
            match q {
                Some(q) if q.shape() == p.shape() => p
                    .data
                    .iter()
                    .zip(&q.data)
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum(),
                _ => p.data.iter().map(|a| (*a as f64).powi(2)).sum(),
            }
        };
        sq += diff(&m.b, gm.map(|g| &g.b));
        if !b_only {
            sq += diff(&m.a, gm.map(|g| &g.a));
        }
    }
    for (name, d) in &x.dense {
        sq += d
            .data
            .iter()
            .zip(
                g.dense
                    .get(name)
                    .map_or(&vec![0.0; d.data.len()], |m| &m.data),
            )
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>();
    }
    sq.sqrt()
}

/// Dense `s·B·A` of every module plus the dense tensors.
fn densify(a: &Adapter) -> BTreeMap<String, Matrix> {
    let mut out: BTreeMap<String, Matrix> = a
        .modules
        .par_iter()
        .map(|(k, m)| (k.clone(), m.delta()))
        .collect();
    for (k, d) in &a.dense {
        out.insert(format!("dense:{k}"), d.clone());
    }
    out
}

/// The shapes of the result: the first client's adapter.
fn input_template(input: &Input<'_>) -> Adapter {
    input.results[0].adapter.clone()
}

fn add_noise(data: &mut [f32], std: f64, rng: &mut ChaCha8Rng) {
    let normal = Normal::new(0.0, std).expect("finite positive std");
    for v in data {
        *v = (*v as f64 + normal.sample(rng)) as f32;
    }
}

impl FedStrategy {
    /// Factor-space rules with clipping, noise and the server optimiser on factors.
    fn aggregate_factors(
        &mut self,
        round: u64,
        input: &Input<'_>,
        coefficients: &[f64],
        noise: Option<f64>,
    ) -> Result<Adapter> {
        let ffa = self.frozen_a();
        // Clipped updates: G + c(X − G) in factor space.
        let clipped: Vec<ClientResult> = input
            .results
            .iter()
            .zip(coefficients)
            .map(|(r, &c)| {
                let mut r = (*r).clone();
                if c < 1.0 {
                    for (name, m) in r.adapter.modules.iter_mut() {
                        let g = input.global.modules.get(name);
                        let shrink = |x: &mut Matrix, g: Option<&Matrix>| {
                            let g = g.filter(|g| g.shape() == x.shape());
                            for (i, v) in x.data.iter_mut().enumerate() {
                                let base = g.map_or(0.0, |g| g.data[i]);
                                *v = base + (c as f32) * (*v - base);
                            }
                        };
                        shrink(&mut m.b, g.map(|g| &g.b));
                        if !ffa {
                            shrink(&mut m.a, g.map(|g| &g.a));
                        }
                    }
                }
                r
            })
            .collect();
        let refs: Vec<&ClientResult> = clipped.iter().collect();
        let inner = Input {
            global: input.global,
            results: refs,
            weights: input.weights.clone(),
        };
        let mut out = match self.config.rule {
            Rule::HetLora => fedavg::hetlora(&inner),
            Rule::Median | Rule::TrimmedMean { .. } => {
                // Coordinate rules on B with the shared A (checked by `ffa`).
                let mut out = fedavg::ffa(&inner)?;
                for (name, m) in out.modules.iter_mut() {
                    let bs: Vec<&[f32]> = inner
                        .results
                        .iter()
                        .map(|r| r.adapter.modules[name].b.data.as_slice())
                        .collect();
                    m.b.data = match self.config.rule {
                        Rule::TrimmedMean { beta } => trimmed_mean(&bs, beta)?,
                        _ => median(&bs),
                    };
                }
                out
            }
            _ if ffa => fedavg::ffa(&inner)?,
            _ => fedavg::fedavg_factors(&inner)?,
        };
        let mut rng = rng_for(self.config.seed, round, 2);
        if let Some(std) = noise {
            for m in out.modules.values_mut() {
                add_noise(&mut m.b.data, std, &mut rng);
                if !ffa {
                    add_noise(&mut m.a.data, std, &mut rng);
                }
            }
        }
        if let Some(opt) = self.config.server_optimizer {
            for (name, m) in out.modules.iter_mut() {
                if let Some(g) = self.state.global.modules.get(name)
                    && g.b.shape() == m.b.shape()
                {
                    m.b.data = opt.step(
                        &mut self.state.optimizer,
                        &format!("{name}.B"),
                        &g.b.data,
                        &m.b.data,
                    );
                    if !ffa && g.a.shape() == m.a.shape() {
                        m.a.data = opt.step(
                            &mut self.state.optimizer,
                            &format!("{name}.A"),
                            &g.a.data,
                            &m.a.data,
                        );
                    }
                }
            }
        }
        Ok(out)
    }

    /// Dense rules: per module, the clients' `ΔW` (clipped relative to the global), then TIES,
    /// DARE, task arithmetic, median or trimmed mean.
    fn aggregate_dense(
        &self,
        round: u64,
        input: &Input<'_>,
        coefficients: &[f64],
    ) -> Result<BTreeMap<String, Matrix>> {
        let global_dense = densify(input.global);
        let template = densify(&input.results[0].adapter);
        let mut out = BTreeMap::new();
        for (t, name) in template.keys().enumerate() {
            let base = global_dense.get(name);
            let clients: Vec<Matrix> = input
                .results
                .par_iter()
                .zip(coefficients)
                .map(|(r, &c)| {
                    let x = match name.strip_prefix("dense:") {
                        Some(d) => r.adapter.dense[d].clone(),
                        None => r.adapter.modules[name].delta(),
                    };
                    if c >= 1.0 {
                        return x;
                    }
                    let data = x
                        .data
                        .iter()
                        .enumerate()
                        .map(|(i, v)| {
                            let b = base.map_or(0.0, |b| b.data[i]);
                            b + (c as f32) * (v - b)
                        })
                        .collect();
                    Matrix::new(x.rows, x.cols, data)
                })
                .collect();
            let (rows, cols) = clients[0].shape();
            let slices: Vec<&[f32]> = clients.iter().map(|m| m.data.as_slice()).collect();
            let data = match self.config.rule {
                Rule::Median => median(&slices),
                Rule::TrimmedMean { beta } => trimmed_mean(&slices, beta)?,
                rule => {
                    let mut p = match rule {
                        Rule::Ties { density, lambda } => MergeParams {
                            density,
                            lambda,
                            ..MergeParams::new(MergeMethod::Ties)
                        },
                        Rule::DareTies { drop_rate, lambda } => MergeParams {
                            drop_rate,
                            lambda,
                            ..MergeParams::new(MergeMethod::DareTies)
                        },
                        Rule::DareLinear { drop_rate, lambda } => MergeParams {
                            drop_rate,
                            lambda,
                            ..MergeParams::new(MergeMethod::DareLinear)
                        },
                        Rule::TaskArithmetic { lambda } => MergeParams {
                            lambda,
                            ..MergeParams::new(MergeMethod::TaskArithmetic)
                        },
                        other => {
                            return Err(AggregationError::Config(format!(
                                "{} is not a dense rule",
                                other.name()
                            )));
                        }
                    };
                    p.seed = self.config.seed ^ round;
                    merge(
                        base.map(|b| b.data.as_slice()),
                        &slices,
                        &input.weights,
                        &p,
                        t as u64,
                    )?
                }
            };
            out.insert(name.clone(), Matrix::new(rows, cols, data));
        }
        Ok(out)
    }

    /// DP noise and the server optimiser on dense `ΔW`, then re-factorisation to the target
    /// rank. Returns the adapter and the minimum retained energy.
    fn finish_dense(
        &mut self,
        round: u64,
        mut dense: BTreeMap<String, Matrix>,
        template: &Adapter,
        noise: Option<f64>,
    ) -> Result<(Adapter, f64)> {
        let mut rng = rng_for(self.config.seed, round, 3);
        if let Some(std) = noise {
            for m in dense.values_mut() {
                add_noise(&mut m.data, std, &mut rng);
            }
        }
        if let Some(opt) = self.config.server_optimizer {
            let global = densify(&self.state.global);
            for (name, m) in dense.iter_mut() {
                let zeros;
                let g = match global.get(name) {
                    Some(g) => &g.data,
                    None => {
                        zeros = vec![0.0; m.data.len()];
                        &zeros
                    }
                };
                m.data = opt.step(&mut self.state.optimizer, name, g, &m.data);
            }
        }
        let rank = self
            .config
            .target_rank
            .unwrap_or(self.state.plan.max_rank.max(1));
        let mut modules = BTreeMap::new();
        let mut dense_out = BTreeMap::new();
        let mut min_energy = 1.0f64;
        for (t, (name, m)) in dense.into_iter().enumerate() {
            if let Some(d) = name.strip_prefix("dense:") {
                dense_out.insert(d.to_string(), m);
                continue;
            }
            let scale = template.modules.get(&name).map_or(1.0, |f| f.scale);
            let r = dense_refactor(&m, rank, 2, self.config.seed ^ round ^ t as u64);
            min_energy = min_energy.min(r.retained_energy);
            modules.insert(
                name,
                LoraFactors {
                    a: r.a,
                    b: r.b.scaled(1.0 / scale),
                    scale,
                },
            );
        }
        Ok((
            Adapter {
                modules,
                dense: dense_out,
            },
            min_energy,
        ))
    }
}
