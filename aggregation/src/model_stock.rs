//! Model Stock (Jang et al. 2024, arXiv 2403.19522) with mergekit 0.1.5's semantics.
//!
//! With the base `w₀` and `N ≥ 2` fine-tuned models `wₖ`, offsets `δₖ = wₖ − w₀`: `cos θ` is the
//! mean over pairs `k < l` of `δₖ·δₗ / max(‖δₖ‖‖δₗ‖, 10⁻⁶)` (each clamped to [−1, 1]),
//! `t = N·cos θ / (1 + (N − 1)·cos θ)` (0 where `|1 + (N − 1)·cos θ| < 10⁻⁶`, keeping the
//! base), and the result `t·mean(wₖ) + (1 − t)·w₀`. The angle is taken over the whole tensor,
//! or per row of its last axis (`filter_wise`, a 1-D tensor being one row). Weights play no
//! part, as in mergekit.

use crate::error::{AggregationError, Result};

/// Merges `models` (at least two) with `base` by Model Stock. `row` is the length of the
/// vectors the angle is measured on: the tensor's last axis (mergekit's `filter_wise`) or
/// its whole length.
pub fn model_stock(base: &[f32], models: &[&[f32]], row: usize) -> Result<Vec<f32>> {
    let n = base.len();
    if models.len() < 2 {
        return Err(AggregationError::Config(format!(
            "model stock needs the base and at least two other models ({} other given)",
            models.len()
        )));
    }
    if models.iter().any(|m| m.len() != n) {
        return Err(AggregationError::Incompatible(
            "tensors to merge differ in size".into(),
        ));
    }
    if row == 0 || !n.is_multiple_of(row) {
        return Err(AggregationError::Config(format!(
            "rows of {row} do not divide a {n}-element tensor"
        )));
    }
    let count = models.len();
    let mut out = vec![0f32; n];
    for r in 0..n / row {
        let span = r * row..(r + 1) * row;
        let b = &base[span.clone()];
        let offsets: Vec<Vec<f64>> = models
            .iter()
            .map(|m| {
                m[span.clone()]
                    .iter()
                    .zip(b)
                    .map(|(x, y)| f64::from(x - y))
                    .collect()
            })
            .collect();
        let norms: Vec<f64> = offsets
            .iter()
            .map(|o| o.iter().map(|v| v * v).sum::<f64>().sqrt())
            .collect();
        let (mut cos_sum, mut pairs) = (0.0f64, 0usize);
        for i in 0..count {
            for j in i + 1..count {
                let dot: f64 = offsets[i].iter().zip(&offsets[j]).map(|(a, b)| a * b).sum();
                cos_sum += (dot / (norms[i] * norms[j]).max(1e-6)).clamp(-1.0, 1.0);
                pairs += 1;
            }
        }
        let cos = cos_sum / pairs as f64;
        let denominator = 1.0 + (count as f64 - 1.0) * cos;
        let t = if denominator.abs() < 1e-6 {
            0.0
        } else {
            count as f64 * cos / denominator
        };
        let (t, count) = (t as f32, count as f32);
        for (c, o) in out[span.clone()].iter_mut().enumerate() {
            let i = r * row + c;
            let avg = models.iter().map(|m| m[i]).sum::<f32>() / count;
            *o = t * avg + (1.0 - t) * base[i];
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orthogonal_offsets_keep_the_base_and_equal_ones_take_the_average() {
        let base = [1.0f32, 2.0, 3.0, 4.0];
        // Orthogonal offsets: cos 0, t 0.
        let a = [2.0f32, 2.0, 3.0, 4.0];
        let b = [1.0f32, 3.0, 3.0, 4.0];
        assert_eq!(model_stock(&base, &[&a, &b], 4).unwrap(), base.to_vec());
        // Equal offsets: cos 1, t 1.
        let got = model_stock(&base, &[&a, &a], 4).unwrap();
        assert_eq!(got, a.to_vec());
        // Per row: the first row's offsets agree, the second's are orthogonal.
        let c = [2.0f32, 3.0, 4.0, 4.0];
        let d = [2.0f32, 3.0, 3.0, 5.0];
        let got = model_stock(&base, &[&c, &d], 2).unwrap();
        assert_eq!(got, vec![2.0, 3.0, 3.0, 4.0]);
    }

    #[test]
    fn half_aligned_offsets_interpolate_as_the_paper_says() {
        // Two offsets at 60 degrees: cos ½, t = 2·½/(1 + ½) = ⅔.
        let base = [0.0f32, 0.0];
        let a = [1.0f32, 0.0];
        let b = [0.5f32, 0.75f32.sqrt()];
        let got = model_stock(&base, &[&a, &b], 2).unwrap();
        let t = 2.0 / 3.0;
        assert!((got[0] - t * 0.75).abs() < 1e-6, "{got:?}");
        assert!((got[1] - t * 0.75f32.sqrt() / 2.0).abs() < 1e-6, "{got:?}");
        assert!(model_stock(&base, &[&a], 2).is_err());
        assert!(model_stock(&base, &[&a, &b], 3).is_err());
    }
}
