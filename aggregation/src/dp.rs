//! Client-level differential privacy (DP-FedAvg, McMahan et al. 2018, arXiv 1710.06963).
//!
//! Each client's update `τₖ` (relative to the round's global adapter) is clipped to L2 norm `C`
//! over all its tensors: `τₖ ← τₖ·min(1, C/‖τₖ‖)`. The aggregate `Σ pₖτₖ` gets Gaussian noise
//! `N(0, σ²)` per coordinate with `σ = z·S`, where `S` is the sensitivity of the weighted mean
//! to adding or removing one client: `S = maxₖ pₖ·C` (for equal weights over `m` clients,
//! `σ = z·C/m`). Noise is added in the space the rule aggregates in (`ΔW` for product-space and
//! coordinate rules, `B` under FFA-LoRA); truncating `ΔW` back to a low rank afterwards is
//! post-processing and costs no privacy. With secure aggregation the clipping must happen on
//! the clients.
//!
//! The accountant is the Rényi DP of the sampled Gaussian mechanism (Mironov, Talwar & Zhang
//! 2019, arXiv 1908.10530) composed over rounds, converted to (ε, δ) with Balle et al. 2020's
//! bound — the computation Opacus and TF-Privacy perform, validated in tests against Opacus'
//! own numbers. Each round is one step with sampling rate `q = sampled / population`.

use serde::{Deserialize, Serialize};

/// DP configuration.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DpConfig {
    /// Clipping norm `C` of each client's update.
    pub clip_norm: f64,
    /// Noise multiplier `z`.
    pub noise_multiplier: f64,
    /// δ of the reported (ε, δ).
    pub delta: f64,
    /// Number of clients in the population (sampling rate `q = sampled / population`).
    pub population: usize,
}

/// Rényi orders used by Opacus (`RDPAccountant.DEFAULT_ALPHAS`).
pub fn default_orders() -> Vec<f64> {
    let mut v: Vec<f64> = (1..100).map(|x| 1.0 + x as f64 / 10.0).collect();
    v.extend((12..64).map(|x| x as f64));
    v
}

fn log_add(x: f64, y: f64) -> f64 {
    let (a, b) = if x < y { (x, y) } else { (y, x) };
    if a == f64::NEG_INFINITY {
        return b;
    }
    (a - b).exp().ln_1p() + b
}

fn log_sub(x: f64, y: f64) -> f64 {
    if y == f64::NEG_INFINITY {
        return x;
    }
    if x == y {
        return f64::NEG_INFINITY;
    }
    let d = (x - y).exp_m1();
    if d.is_infinite() { x } else { d.ln() + y }
}

/// `log(erfc(x))`, accurate in the far tail (asymptotic series beyond x = 25).
fn log_erfc(x: f64) -> f64 {
    if x < 25.0 {
        libm::erfc(x).ln()
    } else {
        let x2 = x * x;
        let series = 1.0 - 1.0 / (2.0 * x2) + 3.0 / (4.0 * x2 * x2) - 15.0 / (8.0 * x2 * x2 * x2);
        -x2 - (x * std::f64::consts::PI.sqrt()).ln() + series.ln()
    }
}

fn log_a_int(q: f64, sigma: f64, alpha: u64) -> f64 {
    let mut log_a = f64::NEG_INFINITY;
    let mut log_binom = 0.0; // log C(alpha, 0)
    for i in 0..=alpha {
        if i > 0 {
            log_binom += ((alpha - i + 1) as f64).ln() - (i as f64).ln();
        }
        let fi = i as f64;
        let s = log_binom
            + fi * q.ln()
            + (alpha as f64 - fi) * (1.0 - q).ln()
            + (fi * fi - fi) / (2.0 * sigma * sigma);
        log_a = log_add(log_a, s);
    }
    log_a
}

fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let mut coef = 1.0f64; // C(alpha, i), signed
    let mut i = 0.0f64;
    loop {
        if i > 0.0 {
            coef *= (alpha - i + 1.0) / i;
        }
        let log_coef = coef.abs().ln();
        let j = alpha - i;
        let log_t0 = log_coef + i * q.ln() + j * (1.0 - q).ln();
        let log_t1 = log_coef + j * q.ln() + i * (1.0 - q).ln();
        let log_e0 = 0.5f64.ln() + log_erfc((i - z0) / (std::f64::consts::SQRT_2 * sigma));
        let log_e1 = 0.5f64.ln() + log_erfc((z0 - j) / (std::f64::consts::SQRT_2 * sigma));
        let log_s0 = log_t0 + (i * i - i) / (2.0 * sigma * sigma) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * sigma * sigma) + log_e1;
        if coef > 0.0 {
            log_a0 = log_add(log_a0, log_s0);
            log_a1 = log_add(log_a1, log_s1);
        } else {
            log_a0 = log_sub(log_a0, log_s0);
            log_a1 = log_sub(log_a1, log_s1);
        }
        i += 1.0;
        if log_s0.max(log_s1) < -30.0 || i > 10_000.0 {
            break;
        }
    }
    log_add(log_a0, log_a1)
}

/// RDP at order `alpha` of one step of the sampled Gaussian mechanism with sampling rate `q`
/// and noise multiplier `sigma`.
pub fn rdp_step(q: f64, sigma: f64, alpha: f64) -> f64 {
    if q == 0.0 {
        return 0.0;
    }
    if sigma == 0.0 || alpha.is_infinite() {
        return f64::INFINITY;
    }
    if q >= 1.0 {
        return alpha / (2.0 * sigma * sigma);
    }
    let log_a = if alpha.fract() == 0.0 {
        log_a_int(q, sigma, alpha as u64)
    } else {
        log_a_frac(q, sigma, alpha)
    };
    log_a / (alpha - 1.0)
}

/// The tightest ε over `orders` for accumulated `rdp`, and its order.
pub fn epsilon(orders: &[f64], rdp: &[f64], delta: f64) -> (f64, f64) {
    orders
        .iter()
        .zip(rdp)
        .map(|(&a, &r)| {
            let eps = r - (delta.ln() + a.ln()) / (a - 1.0) + ((a - 1.0) / a).ln();
            (eps, a)
        })
        .filter(|(e, _)| e.is_finite())
        .min_by(|x, y| x.0.total_cmp(&y.0))
        .unwrap_or((f64::INFINITY, f64::NAN))
}

/// Composes rounds of the sampled Gaussian mechanism and reports (ε, δ).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Accountant {
    /// Rényi orders.
    pub orders: Vec<f64>,
    /// Accumulated RDP per order.
    pub rdp: Vec<f64>,
    /// Rounds accounted.
    pub steps: u64,
}

impl Default for Accountant {
    fn default() -> Self {
        let orders = default_orders();
        Accountant {
            rdp: vec![0.0; orders.len()],
            orders,
            steps: 0,
        }
    }
}

impl Accountant {
    /// Accounts `steps` steps at sampling rate `q` and noise multiplier `sigma`.
    pub fn step(&mut self, q: f64, sigma: f64, steps: u64) {
        for (r, &a) in self.rdp.iter_mut().zip(&self.orders) {
            *r += steps as f64 * rdp_step(q, sigma, a);
        }
        self.steps += steps;
    }

    /// ε at `delta` for everything accounted so far.
    pub fn epsilon(&self, delta: f64) -> f64 {
        if self.steps == 0 {
            return 0.0;
        }
        epsilon(&self.orders, &self.rdp, delta).0
    }
}

/// Clipping factor `min(1, C/‖τ‖)` for an update of norm `norm`.
pub fn clip_factor(norm: f64, clip: f64) -> f64 {
    if norm > clip && norm > 0.0 {
        clip / norm
    } else {
        1.0
    }
}

/// Noise standard deviation `σ = z·maxₖ pₖ·C` for weights `p`.
pub fn noise_std(cfg: &DpConfig, weights: &[f64]) -> f64 {
    let max_p = weights.iter().copied().fold(0.0, f64::max);
    cfg.noise_multiplier * max_p * cfg.clip_norm
}
