//! Averaging rules for LoRA updates, with pₖ = nₖ/Σn:
//!
//! - **FedAvg on factors** (FedIT, Zhang et al. 2024, arXiv 2305.05644): `Ā = Σ pₖAₖ`,
//!   `B̄ = Σ pₖBₖ`. Inexact: `B̄Ā = Σₖ Σⱼ pₖpⱼ BₖAⱼ ≠ Σ pₖBₖAₖ` (the cross terms `BₖAⱼ` are
//!   noise). Kept for comparison.
//! - **Exact FedAvg in product space** (FLoRA, Wang et al. 2024, arXiv 2409.05976):
//!   `ΔW = Σ pₖsₖBₖAₖ` as the stacked adapter `B* = [s₁B₁ … ], A* = [p₁A₁; …]` of rank `Σ rₖ`,
//!   or re-factorised to a target rank by truncated SVD (see [`crate::lowrank::combine`]).
//! - **FFA-LoRA** (Sun et al. 2024, arXiv 2403.12313): `A` frozen at a shared seeded init, only
//!   `B` trained and averaged, `B̄ = Σ pₖBₖ`, which is exact since `B̄A = Σ pₖBₖA`.
//! - **HetLoRA** (Cho et al. 2024, arXiv 2401.06432): ranks differ; factors are zero-padded to
//!   `r_max` and averaged with weights `∝ nₖ·‖ΔWₖ‖_F`; each client gets the first `rₖ`
//!   components back.
//! - **FlexLoRA** (Bai et al. 2024, arXiv 2402.11505): ranks differ; the exact `Σ pₖsₖBₖAₖ` is
//!   SVD-factorised and each client gets its top `rₖ` components.

use std::collections::BTreeMap;

use rayon::prelude::*;

use crate::error::{AggregationError, Result};
use crate::lowrank::{combination_norm_sq, combine};
use crate::matrix::Matrix;
use crate::update::{Adapter, ClientResult, LoraFactors};

/// What every averaging rule reads.
pub struct Input<'a> {
    /// The current global adapter (empty before the first round).
    pub global: &'a Adapter,
    /// The clients' validated results.
    pub results: Vec<&'a ClientResult>,
    /// Their weights, summing to 1.
    pub weights: Vec<f64>,
}

impl Input<'_> {
    /// Module names (identical across results after validation).
    pub fn module_names(&self) -> Vec<String> {
        self.results
            .first()
            .map(|r| r.adapter.modules.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn module<'b>(&'b self, k: usize, name: &str) -> &'b LoraFactors {
        &self.results[k].adapter.modules[name]
    }
}

/// `Σ wₖxₖ` over same-length slices: one streaming pass, parallel over chunks that stay in
/// L1 while every input is added (f32 accumulation, vectorised; no `mul_add`, which is a
/// library call on targets without FMA).
pub fn weighted_average(inputs: &[&[f32]], weights: &[f64]) -> Vec<f32> {
    const CHUNK: usize = 1 << 13;
    let n = inputs.first().map_or(0, |x| x.len());
    let w: Vec<f32> = weights.iter().map(|w| *w as f32).collect();
    let mut out = vec![0f32; n];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
        let start = c * CHUNK;
        // Write before reading: a fresh allocation's first read would map the shared zero
        // page and fault again on the write.
        match inputs.first() {
            Some(x0) => {
                let x0 = &x0[start..start + o.len()];
                for (o, v) in o.iter_mut().zip(x0) {
                    *o = v * w[0];
                }
            }
            None => return,
        }
        for (x, &wk) in inputs.iter().zip(&w).skip(1) {
            let x = &x[start..start + o.len()];
            for (o, v) in o.iter_mut().zip(x) {
                *o += v * wk;
            }
        }
    });
    out
}

fn weighted_sum(parts: &[(f64, &Matrix)]) -> Matrix {
    let (rows, cols) = parts[0].1.shape();
    let inputs: Vec<&[f32]> = parts.iter().map(|(_, m)| m.data.as_slice()).collect();
    let weights: Vec<f64> = parts.iter().map(|(w, _)| *w).collect();
    Matrix::new(rows, cols, weighted_average(&inputs, &weights))
}

/// Example-weighted mean of the dense tensors (shared by every rule that averages).
pub fn average_dense(input: &Input<'_>) -> BTreeMap<String, Matrix> {
    let Some(first) = input.results.first() else {
        return BTreeMap::new();
    };
    first
        .adapter
        .dense
        .keys()
        .map(|name| {
            let parts: Vec<(f64, &Matrix)> = input
                .results
                .iter()
                .zip(&input.weights)
                .map(|(r, w)| (*w, &r.adapter.dense[name]))
                .collect();
            (name.clone(), weighted_sum(&parts))
        })
        .collect()
}

/// FedIT: averages `A` and `B` separately (requires equal ranks and scales per module).
pub fn fedavg_factors(input: &Input<'_>) -> Result<Adapter> {
    let mut modules = BTreeMap::new();
    for name in input.module_names() {
        let first = input.module(0, &name);
        for k in 1..input.results.len() {
            let m = input.module(k, &name);
            if m.rank() != first.rank() || m.scale != first.scale {
                return Err(AggregationError::Incompatible(format!(
                    "fedavg on factors needs equal ranks and scales; module `{name}` has rank {} \
                     (scale {}) at {} and rank {} (scale {}) at {} — use fedavg-exact, hetlora or flexlora",
                    first.rank(),
                    first.scale,
                    input.results[0].client,
                    m.rank(),
                    m.scale,
                    input.results[k].client
                )));
            }
        }
        let a: Vec<(f64, &Matrix)> = (0..input.results.len())
            .map(|k| (input.weights[k], &input.module(k, &name).a))
            .collect();
        let b: Vec<(f64, &Matrix)> = (0..input.results.len())
            .map(|k| (input.weights[k], &input.module(k, &name).b))
            .collect();
        modules.insert(
            name,
            LoraFactors {
                a: weighted_sum(&a),
                b: weighted_sum(&b),
                scale: first.scale,
            },
        );
    }
    Ok(Adapter {
        modules,
        dense: average_dense(input),
    })
}

/// Exact FedAvg `Σ pₖsₖBₖAₖ` per module, stacked (`rank = None`) or re-factorised to `rank`.
/// `coefficients` multiply the weights (norm bounding passes its clipping factors here; the
/// global adapter then takes weight `1 − Σ pₖcₖ`). Returns the adapter and the minimum retained
/// energy over modules.
pub fn fedavg_exact(
    input: &Input<'_>,
    coefficients: &[f64],
    rank: Option<usize>,
) -> (Adapter, f64) {
    let kept: f64 = input
        .weights
        .iter()
        .zip(coefficients)
        .map(|(p, c)| p * c)
        .sum();
    let names = input.module_names();
    let done: Vec<(String, LoraFactors, f64)> = names
        .par_iter()
        .map(|name| {
            let mut terms: Vec<(f64, &LoraFactors)> = (0..input.results.len())
                .map(|k| (input.weights[k] * coefficients[k], input.module(k, name)))
                .collect();
            if let Some(g) = input.global.modules.get(name)
                && (1.0 - kept).abs() > 1e-12
            {
                terms.push((1.0 - kept, g));
            }
            let scale = terms[0].1.scale;
            let (factors, energy) = combine(&terms, rank, scale);
            (name.clone(), factors, energy)
        })
        .collect();
    let min_energy = done.iter().map(|d| d.2).fold(1.0f64, f64::min);
    let modules: BTreeMap<String, LoraFactors> = done.into_iter().map(|(n, f, _)| (n, f)).collect();
    (
        Adapter {
            modules,
            dense: average_dense(input),
        },
        min_energy,
    )
}

/// FFA-LoRA: checks that every client kept the shared `A` and averages `B`.
pub fn ffa(input: &Input<'_>) -> Result<Adapter> {
    let mut modules = BTreeMap::new();
    for name in input.module_names() {
        let shared = match input.global.modules.get(&name) {
            Some(g) => &g.a,
            None => &input.module(0, &name).a,
        };
        for (k, r) in input.results.iter().enumerate() {
            if input.module(k, &name).a != *shared {
                return Err(AggregationError::Incompatible(format!(
                    "FFA-LoRA: client {} changed the frozen A of module `{name}`",
                    r.client
                )));
            }
        }
        let b: Vec<(f64, &Matrix)> = (0..input.results.len())
            .map(|k| (input.weights[k], &input.module(k, &name).b))
            .collect();
        modules.insert(
            name.clone(),
            LoraFactors {
                a: shared.clone(),
                b: weighted_sum(&b),
                scale: input.module(0, &name).scale,
            },
        );
    }
    Ok(Adapter {
        modules,
        dense: average_dense(input),
    })
}

fn pad(m: &LoraFactors, r: usize, scale: f32) -> LoraFactors {
    let (rk, inp, out) = (m.rank(), m.a.cols, m.b.rows);
    let mut a = vec![0f32; r * inp];
    a[..rk * inp].copy_from_slice(&m.a.data);
    let ratio = m.scale / scale;
    let mut b = vec![0f32; out * r];
    for i in 0..out {
        for j in 0..rk {
            b[i * r + j] = m.b.data[i * rk + j] * ratio;
        }
    }
    LoraFactors {
        a: Matrix::new(r, inp, a),
        b: Matrix::new(out, r, b),
        scale,
    }
}

/// HetLoRA: zero-pads every module to the largest rank and averages factors with weights
/// `∝ pₖ·‖sₖBₖAₖ‖_F` (per module). The result has rank `r_max`; see [`truncate`].
pub fn hetlora(input: &Input<'_>) -> Adapter {
    let mut modules = BTreeMap::new();
    for name in input.module_names() {
        let parts: Vec<&LoraFactors> = (0..input.results.len())
            .map(|k| input.module(k, &name))
            .collect();
        let r_max = parts.iter().map(|m| m.rank()).max().unwrap_or(1);
        let scale = parts
            .iter()
            .find(|m| m.rank() == r_max)
            .map_or(1.0, |m| m.scale);
        let padded: Vec<LoraFactors> = parts.iter().map(|m| pad(m, r_max, scale)).collect();
        let mut w: Vec<f64> = parts
            .iter()
            .zip(&input.weights)
            .map(|(m, p)| p * combination_norm_sq(&[(1.0, *m)]).sqrt())
            .collect();
        let total: f64 = w.iter().sum();
        if total > 0.0 {
            w.iter_mut().for_each(|v| *v /= total);
        } else {
            w = input.weights.clone();
        }
        let a: Vec<(f64, &Matrix)> = padded.iter().zip(&w).map(|(m, w)| (*w, &m.a)).collect();
        let b: Vec<(f64, &Matrix)> = padded.iter().zip(&w).map(|(m, w)| (*w, &m.b)).collect();
        modules.insert(
            name,
            LoraFactors {
                a: weighted_sum(&a),
                b: weighted_sum(&b),
                scale,
            },
        );
    }
    Adapter {
        modules,
        dense: average_dense(input),
    }
}

/// FlexLoRA: the exact `Σ pₖsₖBₖAₖ`, SVD-factorised to the largest client rank with components
/// ordered by singular value, so that [`truncate`] hands each client its top `rₖ`.
pub fn flexlora(input: &Input<'_>) -> (Adapter, f64) {
    let r_max = input
        .results
        .iter()
        .flat_map(|r| r.adapter.modules.values().map(|m| m.rank()))
        .max()
        .unwrap_or(1);
    let ones = vec![1.0; input.results.len()];
    fedavg_exact(input, &ones, Some(r_max))
}

/// The first `rank` components of every module (a client's share under HetLoRA/FlexLoRA).
/// The scale is kept per component, so `B·A` restricted to those components is unchanged.
pub fn truncate(adapter: &Adapter, rank: usize) -> Adapter {
    let modules = adapter
        .modules
        .iter()
        .map(|(name, m)| {
            let r = rank.min(m.rank());
            let (inp, out, rk) = (m.a.cols, m.b.rows, m.rank());
            let a = Matrix::new(r, inp, m.a.data[..r * inp].to_vec());
            let b = Matrix::new(
                out,
                r,
                (0..out)
                    .flat_map(|i| m.b.data[i * rk..i * rk + r].iter().copied())
                    .collect(),
            );
            (
                name.clone(),
                LoraFactors {
                    a,
                    b,
                    scale: m.scale,
                },
            )
        })
        .collect();
    Adapter {
        modules,
        dense: adapter.dense.clone(),
    }
}
