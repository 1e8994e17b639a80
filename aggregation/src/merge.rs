//! Model merging of dense tensors with mergekit's semantics (`generalized_task_arithmetic`),
//! used by `fedtune merge` on full weights and by the TIES/DARE rules on `ΔW`.
//!
//! With task vectors `τₖ = xₖ − base` and weights `wₖ`:
//! - **linear**: `Σ wₖxₖ / Σ wₖ`.
//! - **task arithmetic** (Ilharco et al. 2023): `base + λ·Σ wₖτₖ` (÷ `Σ wₖ` when normalised).
//! - **TIES** (Yadav et al. 2023, arXiv 2306.01708): trim each `τₖ` to its `⌊d·n⌋` largest
//!   magnitudes; elect the sign `γ = sign(Σ wₖτ̂ₖ)` (0 counts as +); disjoint mean
//!   `τ = Σ wₖτ̂ₖ·[sign(wₖτ̂ₖ) = γ] / Σ wₖ·[sign(wₖτ̂ₖ) = γ]` (a zero divisor becomes 1);
//!   `base + λτ`.
//! - **DARE** (Yu et al. 2024, arXiv 2311.03099): `τ̃ₖ = mₖ ⊙ τₖ / (1−p)`, `mₖ ~ Bernoulli(1−p)`
//!   from a seeded counter-based RNG (the same seed gives the same masks on any thread count);
//!   then linear sum (`dare_linear`) or TIES sign election (`dare_ties`).
//!
//! Trimming keeps every element whose magnitude reaches the `⌊d·n⌋`-th largest one (mergekit
//! keeps exactly `⌊d·n⌋`; the two differ only on exact ties). The threshold is found with a
//! 65 536-bin histogram of the float bit patterns and a selection inside one bin, in two
//! streaming passes and O(bin) memory.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::error::{AggregationError, Result};

/// Merge methods (mergekit's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MergeMethod {
    /// Weighted average of the inputs.
    Linear,
    /// Weighted sum of task vectors.
    TaskArithmetic,
    /// Trim, elect sign, disjoint merge.
    Ties,
    /// DARE drop-and-rescale, then TIES sign election.
    DareTies,
    /// DARE drop-and-rescale, then a weighted sum.
    DareLinear,
}

impl std::str::FromStr for MergeMethod {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "linear" => MergeMethod::Linear,
            "task_arithmetic" | "task-arithmetic" => MergeMethod::TaskArithmetic,
            "ties" => MergeMethod::Ties,
            "dare_ties" | "dare-ties" => MergeMethod::DareTies,
            "dare_linear" | "dare-linear" => MergeMethod::DareLinear,
            other => {
                return Err(format!(
                    "unknown merge method `{other}` (linear, task_arithmetic, ties, dare_ties, dare_linear)"
                ));
            }
        })
    }
}

/// Parameters of a merge.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MergeParams {
    /// The method.
    pub method: MergeMethod,
    /// TIES density `d` (fraction of each task vector kept).
    pub density: f64,
    /// DARE drop rate `p`.
    pub drop_rate: f64,
    /// Scale `λ` of the merged task vector.
    pub lambda: f64,
    /// Seed of DARE's masks.
    pub seed: u64,
    /// Divide by the (masked) weight sum, as mergekit's `normalize: true`.
    pub normalize: bool,
}

impl MergeParams {
    /// Defaults: density 1, no drop, λ = 1, normalised.
    pub fn new(method: MergeMethod) -> Self {
        MergeParams {
            method,
            density: 1.0,
            drop_rate: 0.0,
            lambda: 1.0,
            seed: 0,
            normalize: true,
        }
    }

    fn validate(&self) -> Result<()> {
        if !(self.density > 0.0 && self.density <= 1.0) {
            return Err(AggregationError::Config(format!(
                "density {} must be in (0, 1]",
                self.density
            )));
        }
        if !(0.0..1.0).contains(&self.drop_rate) {
            return Err(AggregationError::Config(format!(
                "drop rate {} must be in [0, 1)",
                self.drop_rate
            )));
        }
        Ok(())
    }
}

const CHUNK: usize = 1 << 14;

/// The smallest magnitude kept when trimming `τ = x − base` to its `keep` largest magnitudes.
fn trim_threshold(x: &[f32], base: Option<&[f32]>, keep: usize) -> f32 {
    let n = x.len();
    if keep >= n {
        return 0.0;
    }
    if keep == 0 {
        return f32::INFINITY;
    }
    let mag = |i: usize| -> u32 {
        let t = x[i] - base.map_or(0.0, |b| b[i]);
        t.abs().to_bits()
    };
    // Pass 1: histogram of the top 16 bits of |τ| (monotone in |τ| for non-negative floats).
    let hist = (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| {
            let mut h = vec![0u32; 1 << 16];
            for i in c * CHUNK..((c + 1) * CHUNK).min(n) {
                h[(mag(i) >> 16) as usize] += 1;
            }
            h
        })
        .reduce(
            || vec![0u32; 1 << 16],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            },
        );
    // The bin holding the keep-th largest value, and how many lie above it.
    let mut above = 0usize;
    let mut bin = 0usize;
    for b in (0..1 << 16).rev() {
        let c = hist[b] as usize;
        if above + c >= keep {
            bin = b;
            break;
        }
        above += c;
    }
    // Pass 2: select inside that bin.
    let mut inside: Vec<u32> = (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .flat_map_iter(|c| {
            (c * CHUNK..((c + 1) * CHUNK).min(n))
                .map(mag)
                .filter(|m| (*m >> 16) as usize == bin)
                .collect::<Vec<_>>()
        })
        .collect();
    let want = keep - above; // 1-based rank inside the bin, from the top
    let idx = inside.len() - want;
    let (_, v, _) = inside.select_nth_unstable(idx);
    f32::from_bits(*v)
}

/// A counter-based Bernoulli(1−p) keep mask for chunk `chunk` of client `k`'s tensor.
fn dare_rng(seed: u64, tensor: u64, k: usize, chunk: usize) -> ChaCha8Rng {
    let mut h = seed ^ 0x9E37_79B9_7F4A_7C15;
    for v in [tensor, k as u64, chunk as u64] {
        h = (h ^ v).wrapping_mul(0xBF58_476D_1CE4_E5B9).rotate_left(31);
    }
    ChaCha8Rng::seed_from_u64(h)
}

/// Merges same-shaped tensors `models` (with optional `base`, zero when absent) into a new
/// tensor. `tensor` distinguishes tensors in DARE's RNG stream.
pub fn merge(
    base: Option<&[f32]>,
    models: &[&[f32]],
    weights: &[f64],
    params: &MergeParams,
    tensor: u64,
) -> Result<Vec<f32>> {
    params.validate()?;
    if models.is_empty() || models.len() != weights.len() {
        return Err(AggregationError::Config(format!(
            "{} tensors with {} weights",
            models.len(),
            weights.len()
        )));
    }
    let n = models[0].len();
    if models.iter().any(|m| m.len() != n) || base.is_some_and(|b| b.len() != n) {
        return Err(AggregationError::Incompatible(
            "tensors to merge differ in size".into(),
        ));
    }
    let ties = matches!(params.method, MergeMethod::Ties);
    let dare = matches!(
        params.method,
        MergeMethod::DareTies | MergeMethod::DareLinear
    );
    let consensus = matches!(params.method, MergeMethod::Ties | MergeMethod::DareTies);
    let thresholds: Vec<f32> = if ties {
        let keep = (params.density * n as f64) as usize;
        if keep == 0 {
            return Err(AggregationError::Config(format!(
                "density {} keeps no element of a {n}-element tensor",
                params.density
            )));
        }
        models
            .iter()
            .map(|m| trim_threshold(m, base, keep))
            .collect()
    } else {
        vec![0.0; models.len()]
    };
    let keep_p = 1.0 - params.drop_rate;
    let mut out = vec![0f32; n];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
        let start = c * CHUNK;
        let len = out.len();
        // DARE masks for this chunk, one stream per client.
        let masks: Vec<Vec<bool>> = if dare && params.drop_rate > 0.0 {
            (0..models.len())
                .map(|k| {
                    let mut rng = dare_rng(params.seed, tensor, k, c);
                    (0..len).map(|_| rng.random::<f64>() < keep_p).collect()
                })
                .collect()
        } else {
            Vec::new()
        };
        let mut wt = vec![0f64; models.len()];
        for (j, o) in out.iter_mut().enumerate() {
            let i = start + j;
            let b = base.map_or(0.0, |b| b[i]);
            if params.method == MergeMethod::Linear {
                let mut s = 0f64;
                let mut w = 0f64;
                for (m, wk) in models.iter().zip(weights) {
                    s += wk * m[i] as f64;
                    w += wk;
                }
                let w = if params.normalize && w.abs() >= 1e-8 {
                    w
                } else {
                    1.0
                };
                *o = (s / w) as f32;
                continue;
            }
            for (k, m) in models.iter().enumerate() {
                let mut t = (m[i] - b) as f64;
                if ties && (t.abs() as f32) < thresholds[k] {
                    t = 0.0;
                }
                if !masks.is_empty() {
                    t = if masks[k][j] { t / keep_p } else { 0.0 };
                }
                wt[k] = weights[k] * t;
            }
            let (mixed, divisor) = if consensus {
                let sign = if wt.iter().sum::<f64>() >= 0.0 {
                    1.0
                } else {
                    -1.0
                };
                let mut mixed = 0.0;
                let mut div = 0.0;
                for (k, v) in wt.iter().enumerate() {
                    if *v != 0.0 && v.signum() == sign {
                        mixed += v;
                        div += weights[k];
                    }
                }
                (mixed, if div == 0.0 { 1.0 } else { div })
            } else {
                let div: f64 = weights.iter().sum();
                (wt.iter().sum(), if div.abs() < 1e-8 { 1.0 } else { div })
            };
            let mixed = if params.normalize {
                mixed / divisor
            } else {
                mixed
            };
            *o = (b as f64 + params.lambda * mixed) as f32;
        }
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_is_the_kth_largest_magnitude() {
        let x: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 1000) as f32 - 500.0)
            .collect();
        let mut mags: Vec<f32> = x.iter().map(|v| v.abs()).collect();
        mags.sort_by(|a, b| b.partial_cmp(a).unwrap());
        for keep in [1, 10, 400, 999] {
            assert_eq!(
                trim_threshold(&x, None, keep),
                mags[keep - 1],
                "keep {keep}"
            );
        }
    }

    #[test]
    fn dare_with_no_drop_is_task_arithmetic() {
        let base = vec![1.0f32; 100];
        let a: Vec<f32> = (0..100).map(|i| i as f32 * 0.1).collect();
        let b: Vec<f32> = (0..100).map(|i| -(i as f32) * 0.05).collect();
        let mut p = MergeParams::new(MergeMethod::DareLinear);
        p.drop_rate = 0.0;
        let dare = merge(Some(&base), &[&a, &b], &[0.7, 0.3], &p, 0).unwrap();
        let ta = merge(
            Some(&base),
            &[&a, &b],
            &[0.7, 0.3],
            &MergeParams::new(MergeMethod::TaskArithmetic),
            0,
        )
        .unwrap();
        assert_eq!(dare, ta);
    }
}
