//! The aggregation paths of [`FedStrategy`]: in LoRA factor space (clipping, noise and the
//! server optimiser on factors) and in dense `ΔW` space (then re-factorised to the target rank).

use std::collections::BTreeMap;

use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;

use crate::error::{AggregationError, Result};
use crate::fedavg::{self, Input};
use crate::matrix::{Matrix, dense_refactor};
use crate::merge::{MergeMethod, MergeParams, merge};
use crate::robust::{median, trimmed_mean};
use crate::update::{Adapter, ClientResult, LoraFactors};

use super::{FedStrategy, Rule, rng_for};

/// Flat norm of a factor-space update (`B` only under FFA-LoRA).
pub(super) fn factor_norm(x: &Adapter, g: &Adapter, b_only: bool) -> f64 {
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
pub(super) fn densify(a: &Adapter) -> BTreeMap<String, Matrix> {
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
pub(super) fn input_template(input: &Input<'_>) -> Adapter {
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
    pub(super) fn aggregate_factors(
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
    pub(super) fn aggregate_dense(
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
    pub(super) fn finish_dense(
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
