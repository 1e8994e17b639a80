//! Spherical linear interpolation of two models, as mergekit 0.1.5's `slerp` computes it, and
//! mergekit's per-tensor parameter schedules (filters and layer gradients).
//!
//! mergekit interpolates each tensor as one vector (its batched kernel keeps a leading axis
//! for a batch of tensors; `fedtune merge` calls [`slerp`] with one row, checked against
//! `mergekit-yaml` 0.1.5's output): with `a`, `b` the base's and the other model's values,
//! `â = a/‖a‖`, `b̂ = b/‖b‖` (a norm below 1e-8 counts as 1) and `cos θ = â·b̂` clamped to
//! [−1, 1], the result is `sin((1−t)θ)/sin θ · a + sin(tθ)/sin θ · b`, or `(1−t)·a + t·b` when
//! `|cos θ| > 0.9995`. Arithmetic here is in f64 (mergekit uses f32 for f32 inputs; the two
//! agree to a few f32 rounding steps).

use serde::{Deserialize, Serialize};

/// `|cos θ|` above which SLERP falls back to linear interpolation.
pub const DOT_THRESHOLD: f64 = 0.9995;

/// SLERP of `base` and `other` (the same `rows × cols` values, row-major) at `t` (0: the
/// base, 1: the other), each of the `rows` rows on its own (1: the whole tensor).
pub fn slerp(t: f64, base: &[f32], other: &[f32], rows: usize) -> Vec<f32> {
    assert_eq!(base.len(), other.len(), "slerp: same-shaped tensors");
    let rows = rows.max(1);
    let cols = base.len() / rows;
    assert_eq!(rows * cols, base.len(), "slerp: rows divide the tensor");
    let mut out = vec![0f32; base.len()];
    if cols == 0 {
        return out;
    }
    let norm = |v: &[f32]| {
        let n = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        if n > 1e-8 { n } else { 1.0 }
    };
    for (r, o) in out.chunks_mut(cols).enumerate() {
        let (a, b) = (&base[r * cols..][..cols], &other[r * cols..][..cols]);
        let (na, nb) = (norm(a), norm(b));
        let dot = a
            .iter()
            .zip(b)
            .map(|(x, y)| (f64::from(*x) / na) * (f64::from(*y) / nb))
            .sum::<f64>()
            .clamp(-1.0, 1.0);
        let (ca, cb) = if dot.abs() > DOT_THRESHOLD {
            (1.0 - t, t)
        } else {
            let theta = dot.acos();
            let s = theta.sin();
            (((1.0 - t) * theta).sin() / s, (t * theta).sin() / s)
        };
        for ((o, x), y) in o.iter_mut().zip(a).zip(b) {
            *o = (ca * f64::from(*x) + cb * f64::from(*y)) as f32;
        }
    }
    out
}

/// A numeric merge parameter as mergekit's YAML writes it: a value, a gradient (values spread
/// evenly over the layers, interpolated linearly between them), or a list of conditions whose
/// `filter` is a substring of the tensor name (the first match wins; no filter matches all).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Setting {
    /// One value.
    Value(f64),
    /// A gradient over the layers.
    Gradient(Vec<f64>),
    /// Conditions, in order.
    Conditional(Vec<Condition>),
}

/// One condition of a [`Setting`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// Substring of the tensor names it applies to (`None` or `*`: every tensor).
    #[serde(default)]
    pub filter: Option<String>,
    /// The value there.
    pub value: Setting,
}

impl Setting {
    /// The value for `tensor` at layer fraction `frac` (mergekit: `layer / (layers − 1)` for
    /// a decoder layer's tensors, 0 for the embedding, the final norm and the head); `None`
    /// when no condition matches.
    pub fn at(&self, tensor: &str, frac: f64) -> Option<f64> {
        match self {
            Setting::Value(v) => Some(*v),
            Setting::Gradient(v) if v.is_empty() => None,
            Setting::Gradient(v) => {
                let scaled = frac * (v.len() - 1) as f64;
                let i0 = scaled as usize;
                let i1 = (i0 + 1).min(v.len() - 1);
                let f = scaled - i0 as f64;
                Some((1.0 - f) * v[i0.min(v.len() - 1)] + f * v[i1])
            }
            Setting::Conditional(c) => c
                .iter()
                .find(|c| match c.filter.as_deref() {
                    None | Some("*") => true,
                    Some(f) => tensor.contains(f),
                })
                .and_then(|c| c.value.at(tensor, frac)),
        }
    }
}

/// mergekit's layer fraction of `tensor` in a model of `layers` decoder layers: `i / (layers
/// − 1)` for `model.layers.{i}.…` (1 with a single layer), else 0.
pub fn layer_fraction(tensor: &str, layers: usize) -> f64 {
    let idx = tensor
        .strip_prefix("model.layers.")
        .and_then(|r| r.split('.').next())
        .and_then(|i| i.parse::<usize>().ok());
    match idx {
        Some(_) if layers <= 1 => 1.0,
        Some(i) => i as f64 / (layers - 1) as f64,
        None => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_collinear_rows_and_a_right_angle() {
        let a = [1.0f32, 0.0, 0.0, 2.0];
        let b = [0.0f32, 1.0, 0.0, 4.0];
        // Row 0 is a right angle: at t = 0.5 both coefficients are sin(π/4)/1.
        let m = slerp(0.5, &a, &b, 2);
        let c = std::f64::consts::FRAC_1_SQRT_2 as f32;
        assert!((m[0] - c).abs() < 1e-7 && (m[1] - c).abs() < 1e-7, "{m:?}");
        // Row 1 is collinear: linear interpolation.
        assert!(
            (m[2] - 0.0).abs() < 1e-7 && (m[3] - 3.0).abs() < 1e-6,
            "{m:?}"
        );
        assert_eq!(slerp(0.0, &a, &b, 2), a.to_vec());
        let one = slerp(1.0, &a, &b, 2);
        assert!(one.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-6));
    }

    #[test]
    fn settings_follow_mergekits_evaluate_setting() {
        let s: Setting = serde_json::from_str(
            r#"[{"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
                {"filter": "mlp", "value": 0.25}, {"value": 0.5}]"#,
        )
        .unwrap();
        let q = "model.layers.3.self_attn.q_proj.weight";
        assert_eq!(s.at(q, 0.0), Some(0.0));
        assert!((s.at(q, 0.1).unwrap() - 0.2).abs() < 1e-12);
        assert!((s.at(q, 0.6).unwrap() - 0.46).abs() < 1e-12);
        assert_eq!(s.at(q, 1.0), Some(1.0));
        assert_eq!(s.at("model.layers.0.mlp.up_proj.weight", 0.5), Some(0.25));
        assert_eq!(s.at("model.norm.weight", 0.0), Some(0.5));
        assert_eq!(layer_fraction("model.layers.3.mlp.up_proj.weight", 7), 0.5);
        assert_eq!(layer_fraction("model.embed_tokens.weight", 7), 0.0);
    }
}
