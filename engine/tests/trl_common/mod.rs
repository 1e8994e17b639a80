//! What the tests against TRL's trainers share: the tiny model, tolerance checks, and the
//! comparison of gradients with the first values TRL's reference files hold.

#![allow(dead_code)]

use std::path::PathBuf;

use burn::tensor::{DType, Device};
use fedtune_engine::train::step::Grads;
use fedtune_engine::weights::to_f32_vec;
use fedtune_engine::{LoadedModel, load_model};
use serde_json::Value;

pub fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata")
}

pub fn tiny() -> LoadedModel {
    load_model(
        &testdata().join("tiny-llama/model"),
        &Device::flex(),
        DType::F32,
    )
    .unwrap()
}

/// `got` within `tol` of `want`, relative above 1 and absolute below.
pub fn close(what: &str, got: f64, want: f64, tol: f64) {
    assert!(
        (got - want).abs() <= tol * want.abs().max(1.0),
        "{what}: {got} vs TRL {want}"
    );
}

/// Every gradient of `want` (PEFT parameter name → TRL's first values) against `grads`
/// (fedtune's names: PEFT's without `.weight`, but the score head's `score.weight`), within
/// `tol` of the largest magnitude.
pub fn assert_grads(what: &str, grads: &Grads, want: &Value, tol: f64) {
    for (param, want_g) in want.as_object().unwrap() {
        let key = if param == "score.weight" {
            param.as_str()
        } else {
            param.trim_end_matches(".weight")
        };
        let g = to_f32_vec(grads[key].clone().into_data());
        let want_g: Vec<f64> = want_g
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let scale = want_g.iter().fold(0f64, |a, v| a.max(v.abs()));
        for (i, w) in want_g.iter().enumerate() {
            assert!(
                (g[i] as f64 - w).abs() <= tol * scale.max(1e-3),
                "{what}: {param}[{i}] {} vs TRL {w}",
                g[i]
            );
        }
    }
}
