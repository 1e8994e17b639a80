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
//! - **Model Breadcrumbs** (Davari & Belilovsky 2023, arXiv 2312.06795): each `τₖ` keeps the
//!   `⌊d·n⌋` magnitudes that follow its `⌊γ·n⌋` largest ones (the outliers; fewer when
//!   `⌊d·n⌋ + ⌊γ·n⌋ > n`, as mergekit's `magnitude_outliers`); then a weighted sum
//!   (`breadcrumbs`) or TIES sign election (`breadcrumbs_ties`).
//!
//! Which methods divide by the weight sum by default follows mergekit 0.1.5
//! ([`MergeMethod::normalizes_by_default`]).
//!
//! Trimming keeps every element whose magnitude reaches the `⌊d·n⌋`-th largest one (mergekit
//! keeps exactly `⌊d·n⌋`; the two differ only on exact ties). The threshold is found with a
//! 65 536-bin histogram of the float bit patterns and a selection inside one bin, in two
//! streaming passes and O(bin) memory.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::error::{AggregationError, Result};
use crate::trim::trim_thresholds;

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
    /// Breadcrumbs: drop each task vector's largest outliers and its smallest magnitudes, then
    /// a weighted sum.
    Breadcrumbs,
    /// Breadcrumbs sparsification, then TIES sign election.
    BreadcrumbsTies,
    /// Spherical interpolation of the base and one other model ([`crate::slerp`]); needs each
    /// tensor's rows, so [`merge`] does not take it.
    Slerp,
    /// Model Stock ([`crate::model_stock`]): the average of the models pulled towards the base
    /// by the angle between their task vectors; needs the tensor's rows, so [`merge`] does not
    /// take it.
    ModelStock,
}

impl MergeMethod {
    /// Whether mergekit 0.1.5 divides by the weight sum when a config leaves `normalize` out:
    /// linear and TIES do; task arithmetic, DARE and breadcrumbs do not.
    pub fn normalizes_by_default(self) -> bool {
        matches!(self, MergeMethod::Linear | MergeMethod::Ties)
    }

    /// mergekit's name.
    pub fn name(self) -> &'static str {
        match self {
            MergeMethod::Linear => "linear",
            MergeMethod::TaskArithmetic => "task_arithmetic",
            MergeMethod::Ties => "ties",
            MergeMethod::DareTies => "dare_ties",
            MergeMethod::DareLinear => "dare_linear",
            MergeMethod::Breadcrumbs => "breadcrumbs",
            MergeMethod::BreadcrumbsTies => "breadcrumbs_ties",
            MergeMethod::Slerp => "slerp",
            MergeMethod::ModelStock => "model_stock",
        }
    }
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
            "breadcrumbs" => MergeMethod::Breadcrumbs,
            "breadcrumbs_ties" | "breadcrumbs-ties" => MergeMethod::BreadcrumbsTies,
            "slerp" => MergeMethod::Slerp,
            "model_stock" | "model-stock" => MergeMethod::ModelStock,
            other => {
                return Err(format!(
                    "unknown merge method `{other}` (linear, task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, slerp, model_stock)"
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
    /// TIES and breadcrumbs density `d` (fraction of each task vector kept).
    pub density: f64,
    /// Breadcrumbs' `γ`: the fraction of largest magnitudes dropped as outliers (mergekit's
    /// default 0.01).
    pub gamma: f64,
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
            gamma: 0.01,
            drop_rate: 0.0,
            lambda: 1.0,
            seed: 0,
            normalize: true,
        }
    }

    /// Checks the ranges of density, gamma and drop rate.
    pub fn validate(&self) -> Result<()> {
        if !(self.density > 0.0 && self.density <= 1.0) {
            return Err(AggregationError::Config(format!(
                "density {} must be in (0, 1]",
                self.density
            )));
        }
        if !(0.0..=1.0).contains(&self.gamma) {
            return Err(AggregationError::Config(format!(
                "gamma {} must be in [0, 1]",
                self.gamma
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

const CHUNK: usize = 1 << 12;

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
    match params.method {
        MergeMethod::Slerp => {
            return Err(AggregationError::Config(
                "slerp interpolates row by row: use slerp::slerp with the tensor's rows".into(),
            ));
        }
        MergeMethod::ModelStock => {
            return Err(AggregationError::Config(
                "model stock needs the tensor's rows: use model_stock::model_stock".into(),
            ));
        }
        _ => {}
    }
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
    let crumbs = matches!(
        params.method,
        MergeMethod::Breadcrumbs | MergeMethod::BreadcrumbsTies
    );
    let dare = matches!(
        params.method,
        MergeMethod::DareTies | MergeMethod::DareLinear
    );
    let consensus = matches!(
        params.method,
        MergeMethod::Ties | MergeMethod::DareTies | MergeMethod::BreadcrumbsTies
    );
    let keep = (params.density * n as f64) as usize;
    if (ties || crumbs) && keep == 0 {
        return Err(AggregationError::Config(format!(
            "density {} keeps no element of a {n}-element tensor",
            params.density
        )));
    }
    // Kept: magnitudes at or above the `lows` and strictly below the `highs`.
    let (lows, highs): (Vec<f32>, Vec<f32>) = if ties {
        (
            trim_thresholds(models, base, keep),
            vec![f32::INFINITY; models.len()],
        )
    } else if crumbs && keep < n {
        // mergekit keeps ranks [top, top + keep) counted from the largest magnitude.
        let top = ((params.gamma * n as f64) as usize).min(n - keep);
        let highs = if top == 0 {
            vec![f32::INFINITY; models.len()]
        } else {
            trim_thresholds(models, base, top)
        };
        (trim_thresholds(models, base, top + keep), highs)
    } else {
        (vec![0.0; models.len()], vec![f32::INFINITY; models.len()])
    };
    let ctx = Chunked {
        models,
        base,
        w32: weights.iter().map(|w| *w as f32).collect(),
        lows,
        highs,
        weight_sum: weights.iter().sum(),
        params: *params,
        tensor,
        dare,
        consensus,
    };
    let mut out = vec![0f32; n];
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each_init(Scratch::default, |scratch, (c, out)| {
            ctx.run(c, out, scratch)
        });
    Ok(out)
}

/// Per-thread buffers of the merge kernel (reused across chunks).
#[derive(Default)]
struct Scratch {
    tasks: Vec<f32>,
    sum: Vec<f32>,
    sign: Vec<f32>,
    mixed: Vec<f32>,
    div: Vec<f32>,
}

/// Everything one chunk of a merge needs.
struct Chunked<'a> {
    models: &'a [&'a [f32]],
    base: Option<&'a [f32]>,
    w32: Vec<f32>,
    lows: Vec<f32>,
    highs: Vec<f32>,
    weight_sum: f64,
    params: MergeParams,
    tensor: u64,
    dare: bool,
    consensus: bool,
}

impl Chunked<'_> {
    /// Runs chunk `c` with the widest vector instructions the CPU has.
    fn run(&self, c: usize, out: &mut [f32], scratch: &mut Scratch) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features were detected at run time.
            unsafe { self.chunk_avx2(c, out, scratch) };
            return;
        }
        self.chunk(c, out, scratch);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn chunk_avx2(&self, c: usize, out: &mut [f32], scratch: &mut Scratch) {
        self.chunk(c, out, scratch);
    }

    /// The weighted, DARE-masked task vector of client `k` over chunk `c`.
    #[inline(always)]
    fn dare_task(&self, k: usize, c: usize, b: &[f32], buf: &mut [f32]) {
        let start = c * CHUNK;
        let x = &self.models[k][start..start + buf.len()];
        let w = self.w32[k];
        let keep_p = 1.0 - self.params.drop_rate;
        let inv_keep = (1.0 / keep_p) as f32;
        let mut rng = dare_rng(self.params.seed, self.tensor, k, c);
        for ((t, v), bb) in buf.iter_mut().zip(x).zip(b) {
            let keep = rng.random::<f64>() < keep_p;
            *t = if keep { w * (v - bb) * inv_keep } else { 0.0 };
        }
    }

    #[inline(always)]
    fn chunk(&self, c: usize, out: &mut [f32], scratch: &mut Scratch) {
        let p = &self.params;
        let start = c * CHUNK;
        let len = out.len();
        let lambda = p.lambda as f32;
        if p.method == MergeMethod::Linear {
            // Σ wₖxₖ / Σ wₖ (written before read: see `fedavg::weighted_average`).
            let div = if p.normalize && self.weight_sum.abs() >= 1e-8 {
                self.weight_sum
            } else {
                1.0
            };
            let inv = (1.0 / div) as f32;
            for (k, m) in self.models.iter().enumerate() {
                let (x, w) = (&m[start..start + len], self.w32[k] * inv);
                if k == 0 {
                    for (o, v) in out.iter_mut().zip(x) {
                        *o = w * v;
                    }
                } else {
                    for (o, v) in out.iter_mut().zip(x) {
                        *o += w * v;
                    }
                }
            }
            return;
        }
        let zero;
        let b: &[f32] = match self.base {
            Some(b) => &b[start..start + len],
            None => {
                zero = vec![0f32; len];
                &zero
            }
        };
        let k_n = self.models.len();
        scratch.tasks.resize(k_n * CHUNK, 0.0);
        scratch.sum.resize(CHUNK, 0.0);
        let sum = &mut scratch.sum[..len];
        // Each client's weighted, sparsified task vector, computed once.
        for k in 0..k_n {
            let t = &mut scratch.tasks[k * CHUNK..k * CHUNK + len];
            if self.dare && p.drop_rate > 0.0 {
                self.dare_task(k, c, b, t);
            } else {
                let (x, w, lo, hi) = (
                    &self.models[k][start..start + len],
                    self.w32[k],
                    self.lows[k],
                    self.highs[k],
                );
                for ((t, v), bb) in t.iter_mut().zip(x).zip(b) {
                    let d = v - bb;
                    let m = d.abs();
                    *t = if m >= lo && m < hi { w * d } else { 0.0 };
                }
            }
            if k == 0 {
                sum.copy_from_slice(t);
            } else {
                for (s, t) in sum.iter_mut().zip(t.iter()) {
                    *s += t;
                }
            }
        }
        if self.consensus {
            // sign(Σ) with 0 counting as +; a term agrees when t·sign > 0.
            scratch.sign.resize(CHUNK, 0.0);
            scratch.mixed.resize(CHUNK, 0.0);
            scratch.div.resize(CHUNK, 0.0);
            let sign = &mut scratch.sign[..len];
            for (g, s) in sign.iter_mut().zip(sum.iter()) {
                *g = if *s >= 0.0 { 1.0 } else { -1.0 };
            }
            let mixed = &mut scratch.mixed[..len];
            let div = &mut scratch.div[..len];
            mixed.fill(0.0);
            div.fill(0.0);
            for k in 0..k_n {
                let t = &scratch.tasks[k * CHUNK..k * CHUNK + len];
                let w = self.w32[k];
                for (((m, dv), t), g) in
                    mixed.iter_mut().zip(div.iter_mut()).zip(t).zip(sign.iter())
                {
                    let agreeing = (t * g).max(0.0);
                    *m += agreeing;
                    *dv += if agreeing > 0.0 { w } else { 0.0 };
                }
            }
            for ((((o, m), dv), bb), g) in out
                .iter_mut()
                .zip(mixed.iter())
                .zip(div.iter())
                .zip(b)
                .zip(sign.iter())
            {
                let d = if *dv == 0.0 { 1.0 } else { *dv };
                let m = m * g;
                let m = if p.normalize { m / d } else { m };
                *o = bb + lambda * m;
            }
        } else {
            let d = if self.weight_sum.abs() < 1e-8 {
                1.0
            } else {
                self.weight_sum
            } as f32;
            for ((o, s), bb) in out.iter_mut().zip(sum.iter()).zip(b) {
                let m = if p.normalize { s / d } else { *s };
                *o = bb + lambda * m;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
