//! Server optimisers on the aggregated update (Reddi et al. 2021, "Adaptive Federated
//! Optimization", arXiv 2003.00295; FedAvgM: Hsu et al. 2019, arXiv 1909.06335).
//!
//! With the pseudo-gradient `Δₜ = aggregate − xₜ`:
//! - FedAvgM: `vₜ = β·vₜ₋₁ + Δₜ`, `xₜ₊₁ = xₜ + η·vₜ`.
//! - FedAdagrad: `mₜ = β₁mₜ₋₁ + (1−β₁)Δₜ`, `vₜ = vₜ₋₁ + Δₜ²`.
//! - FedYogi: `vₜ = vₜ₋₁ − (1−β₂)·Δₜ²·sign(vₜ₋₁ − Δₜ²)`.
//! - FedAdam: `vₜ = β₂vₜ₋₁ + (1−β₂)Δₜ²`.
//! - the adaptive three: `xₜ₊₁ = xₜ + η·mₜ/(√vₜ + τ)`.
//!
//! State is kept per named tensor and can be saved and restored (serde). Parameters are the
//! tensors of the space the rule aggregates in: LoRA factors under FedIT/FFA-LoRA/HetLoRA,
//! dense `ΔW` for product-space and coordinate rules (whose factor bases rotate between rounds,
//! so factor-wise moments would mean nothing).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Which server optimiser. In TOML: `server_optimizer = { kind = "fed_adam", lr = 0.01 }`
/// (`fedadam`, `fedyogi`, `fedadagrad`, `fedavgm` are accepted too); the moments' parameters
/// default to Reddi et al.'s (β₁ 0.9 — 0 for FedAdagrad —, β₂ 0.99, τ 1e-3) and FedAvgM's
/// momentum to 0.9; the server learning rate has no default.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ServerOptimizer {
    /// Server momentum.
    #[serde(alias = "fedavgm")]
    FedAvgM {
        /// Server learning rate η.
        lr: f64,
        /// Momentum β.
        #[serde(default = "default_momentum")]
        momentum: f64,
    },
    /// Adagrad on the server.
    #[serde(alias = "fedadagrad")]
    FedAdagrad {
        /// η.
        lr: f64,
        /// β₁.
        #[serde(default)]
        beta1: f64,
        /// τ (adaptivity).
        #[serde(default = "default_tau")]
        tau: f64,
    },
    /// Yogi on the server.
    #[serde(alias = "fedyogi")]
    FedYogi {
        /// η.
        lr: f64,
        /// β₁.
        #[serde(default = "default_beta1")]
        beta1: f64,
        /// β₂.
        #[serde(default = "default_beta2")]
        beta2: f64,
        /// τ.
        #[serde(default = "default_tau")]
        tau: f64,
    },
    /// Adam on the server.
    #[serde(alias = "fedadam")]
    FedAdam {
        /// η.
        lr: f64,
        /// β₁.
        #[serde(default = "default_beta1")]
        beta1: f64,
        /// β₂.
        #[serde(default = "default_beta2")]
        beta2: f64,
        /// τ.
        #[serde(default = "default_tau")]
        tau: f64,
    },
}

fn default_momentum() -> f64 {
    0.9
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.99
}
fn default_tau() -> f64 {
    1e-3
}

/// Moments of a server optimiser.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct OptimizerState {
    /// First moment (or FedAvgM's velocity) per tensor.
    pub m: BTreeMap<String, Vec<f32>>,
    /// Second moment per tensor.
    pub v: BTreeMap<String, Vec<f32>>,
    /// Rounds applied.
    pub steps: u64,
}

impl ServerOptimizer {
    /// Checks value ranges; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        let (lr, betas, tau): (f64, &[(&str, f64)], f64) = match self {
            ServerOptimizer::FedAvgM { lr, momentum } => (*lr, &[("momentum", *momentum)][..], 1.0),
            ServerOptimizer::FedAdagrad { lr, beta1, tau } => (*lr, &[("beta1", *beta1)][..], *tau),
            ServerOptimizer::FedYogi {
                lr,
                beta1,
                beta2,
                tau,
            }
            | ServerOptimizer::FedAdam {
                lr,
                beta1,
                beta2,
                tau,
            } => (*lr, &[("beta1", *beta1), ("beta2", *beta2)][..], *tau),
        };
        if !(lr.is_finite() && lr > 0.0) {
            return Err(format!("server_optimizer.lr must be positive, got {lr}"));
        }
        for (name, b) in betas {
            if !(0.0..1.0).contains(b) {
                return Err(format!(
                    "server_optimizer.{name} must be in [0, 1), got {b}"
                ));
            }
        }
        if !(tau.is_finite() && tau > 0.0) {
            return Err(format!("server_optimizer.tau must be positive, got {tau}"));
        }
        Ok(())
    }

    /// Applies one step: returns the new parameters from the current ones `x` and the
    /// aggregate, updating `state`.
    pub fn step(
        &self,
        state: &mut OptimizerState,
        name: &str,
        x: &[f32],
        aggregate: &[f32],
    ) -> Vec<f32> {
        let n = x.len();
        let m = state
            .m
            .entry(name.to_string())
            .or_insert_with(|| vec![0.0; n]);
        if m.len() != n {
            *m = vec![0.0; n];
        }
        let mut out = vec![0f32; n];
        match *self {
            ServerOptimizer::FedAvgM { lr, momentum } => {
                for i in 0..n {
                    let d = (aggregate[i] - x[i]) as f64;
                    let v = momentum * m[i] as f64 + d;
                    m[i] = v as f32;
                    out[i] = (x[i] as f64 + lr * v) as f32;
                }
            }
            ServerOptimizer::FedAdagrad { lr, beta1, tau }
            | ServerOptimizer::FedYogi { lr, beta1, tau, .. }
            | ServerOptimizer::FedAdam { lr, beta1, tau, .. } => {
                let v = state
                    .v
                    .entry(name.to_string())
                    .or_insert_with(|| vec![0.0; n]);
                if v.len() != n {
                    *v = vec![0.0; n];
                }
                for i in 0..n {
                    let d = (aggregate[i] - x[i]) as f64;
                    let mi = beta1 * m[i] as f64 + (1.0 - beta1) * d;
                    let d2 = d * d;
                    let vi = v[i] as f64;
                    let vi = match *self {
                        ServerOptimizer::FedAdagrad { .. } => vi + d2,
                        ServerOptimizer::FedYogi { beta2, .. } => {
                            vi - (1.0 - beta2) * d2 * (vi - d2).signum()
                        }
                        ServerOptimizer::FedAdam { beta2, .. } => beta2 * vi + (1.0 - beta2) * d2,
                        ServerOptimizer::FedAvgM { .. } => unreachable!("handled above"),
                    };
                    m[i] = mi as f32;
                    v[i] = vi as f32;
                    out[i] = (x[i] as f64 + lr * mi / (vi.max(0.0).sqrt() + tau)) as f32;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fedavgm_with_unit_lr_and_no_momentum_is_fedavg() {
        let opt = ServerOptimizer::FedAvgM {
            lr: 1.0,
            momentum: 0.0,
        };
        let mut s = OptimizerState::default();
        let out = opt.step(&mut s, "w", &[1.0, 2.0], &[3.0, -1.0]);
        assert_eq!(out, vec![3.0, -1.0]);
    }

    #[test]
    fn fedadam_first_step_moves_by_lr_times_sign_like_adam() {
        // m = (1-β1)Δ, v = (1-β2)Δ²: step = η(1-β1)Δ/(√(1-β2)|Δ| + τ).
        let opt = ServerOptimizer::FedAdam {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-9,
        };
        let mut s = OptimizerState::default();
        let out = opt.step(&mut s, "w", &[0.0], &[2.0]);
        let want = 0.1 * 0.1 * 2.0 / (0.1 * 2.0 + 1e-9);
        assert!((out[0] as f64 - want).abs() < 1e-6, "{out:?}");
        let restored: OptimizerState =
            serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(restored, s, "state survives a save and restore");
    }
}
