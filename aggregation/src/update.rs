//! The model of an update: named LoRA modules (`A` `[r, in]`, `B` `[out, r]`, scale `s`) and
//! optional dense tensors, with the number of training examples behind it and its metrics.

use std::collections::BTreeMap;

use crate::matrix::Matrix;

/// The LoRA factors of one module; its weight delta is `ΔW = s·B·A`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraFactors {
    /// `[r, in]`.
    pub a: Matrix,
    /// `[out, r]`.
    pub b: Matrix,
    /// `s = α/r` (or `α/√r` with rsLoRA).
    pub scale: f32,
}

impl LoraFactors {
    /// Rank `r`.
    pub fn rank(&self) -> usize {
        self.a.rows
    }

    /// `(out, in)` of the weight it modifies.
    pub fn target_shape(&self) -> (usize, usize) {
        (self.b.rows, self.a.cols)
    }

    /// The dense `s·B·A` (only for small modules and tests).
    pub fn delta(&self) -> Matrix {
        self.b.matmul(&self.a).scaled(self.scale)
    }
}

/// An adapter: LoRA modules and dense tensors by name.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct Adapter {
    /// LoRA modules by module path.
    pub modules: BTreeMap<String, LoraFactors>,
    /// Dense tensors (e.g. fully trained parameters) by name.
    pub dense: BTreeMap<String, Matrix>,
}

impl Adapter {
    /// Number of parameters.
    pub fn num_parameters(&self) -> usize {
        self.modules
            .values()
            .map(|m| m.a.data.len() + m.b.data.len())
            .sum::<usize>()
            + self.dense.values().map(|d| d.data.len()).sum::<usize>()
    }
}

/// Identifier of a client (its public key, or a name in simulations).
pub type ClientId = String;

/// One client's result for a round.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientResult {
    /// Who sent it.
    pub client: ClientId,
    /// The client's adapter after local training.
    pub adapter: Adapter,
    /// Training examples behind it (the FedAvg weight).
    pub num_examples: u64,
    /// Metrics reported by the client (e.g. `train_loss`, `eval_loss`).
    pub metrics: BTreeMap<String, f64>,
}

/// A client that did not produce a usable result, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Failure {
    /// Who failed.
    pub client: ClientId,
    /// Why (validation failure, timeout, dropout ...).
    pub reason: String,
}

/// What a round of aggregation produced.
#[derive(Debug, Clone, PartialEq)]
pub struct GlobalUpdate {
    /// The new global adapter.
    pub adapter: Adapter,
    /// Examples behind the aggregate.
    pub num_examples: u64,
    /// Example-weighted means of the clients' metrics.
    pub metrics: BTreeMap<String, f64>,
    /// What the rule did (retained energy, selected clients, privacy spent ...).
    pub report: Report,
}

/// Diagnostics of one aggregation.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// The rule that ran.
    pub rule: String,
    /// Clients whose updates were used.
    pub used: Vec<ClientId>,
    /// Minimum over modules of the energy kept by SVD re-factorisation (1 = exact).
    pub retained_energy: Option<f64>,
    /// Clients whose update norms were clipped (norm bounding or DP).
    pub clipped: Vec<ClientId>,
    /// (ε, δ) spent so far under differential privacy.
    pub epsilon: Option<f64>,
    /// δ of the privacy guarantee.
    pub delta: Option<f64>,
    /// Noise standard deviation added this round.
    pub noise_std: Option<f64>,
}

/// Example-weighted mean of the clients' metrics (metrics missing at a client are skipped).
pub fn weighted_metrics(results: &[&ClientResult]) -> BTreeMap<String, f64> {
    let mut sums: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for r in results {
        for (k, v) in &r.metrics {
            if v.is_finite() {
                let e = sums.entry(k.clone()).or_default();
                e.0 += v * r.num_examples as f64;
                e.1 += r.num_examples as f64;
            }
        }
    }
    sums.into_iter()
        .filter(|(_, (_, w))| *w > 0.0)
        .map(|(k, (s, w))| (k, s / w))
        .collect()
}

/// FedAvg weights `pₖ = nₖ / Σ n`; `None` when the total is zero.
pub fn example_weights(results: &[&ClientResult]) -> Option<Vec<f64>> {
    let total: f64 = results.iter().map(|r| r.num_examples as f64).sum();
    (total > 0.0).then(|| {
        results
            .iter()
            .map(|r| r.num_examples as f64 / total)
            .collect()
    })
}
