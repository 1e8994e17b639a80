//! A base held in 16 bits (`--dtype bf16|f16` training on the CPU): half the bytes of f32, and
//! its forward is exactly that of an f32 model holding the rounded weights (products and
//! accumulation stay f32).

use std::path::PathBuf;

use burn::tensor::{DType, Device};
use fedtune_engine::model::linear::BaseWeight;
use fedtune_engine::weights::to_f32_vec;

#[test]
fn a_16_bit_base_is_half_the_bytes_and_computes_on_the_rounded_weights() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/tiny-llama/model");
    let dense = fedtune_engine::load_model(&dir, &Device::flex(), DType::F32).unwrap();
    let ids: Vec<u32> = (0..24).map(|i| (i * 37 + 11) % 2000).collect();
    let want = to_f32_vec(dense.model.forward(&ids, 1, ids.len()).into_data());
    for bf16 in [true, false] {
        let mut h = dense.model.clone();
        let (params, bytes) = h.store_half(bf16);
        assert_eq!(bytes, 2 * params, "bf16 {bf16}");
        let got = to_f32_vec(h.forward(&ids, 1, ids.len()).into_data());
        assert_ne!(
            got, want,
            "the 16-bit base must actually be used (bf16 {bf16})"
        );
        let dot: f64 = got.iter().zip(&want).map(|(a, b)| (a * b) as f64).sum();
        let na: f64 = got.iter().map(|a| (a * a) as f64).sum::<f64>().sqrt();
        let nb: f64 = want.iter().map(|b| (b * b) as f64).sum::<f64>().sqrt();
        let cos = dot / (na * nb);
        assert!(
            cos > 0.9999,
            "bf16 {bf16}: cosine {cos} between 16-bit and f32 logits"
        );
        // The same model with the rounded weights held as f32: identical logits.
        let mut wide = h.clone();
        for (_, lin) in wide.linears_mut() {
            assert!(matches!(lin.base, BaseWeight::Half { .. }));
            lin.base = BaseWeight::Dense(lin.weight());
        }
        let exact = to_f32_vec(wide.forward(&ids, 1, ids.len()).into_data());
        assert_eq!(got, exact, "bf16 {bf16}");
        // Rounding is to nearest: every widened value is within half a unit in the last place.
        let first = |m: &mut fedtune_engine::LlamaModel| {
            let (_, lin) = m.linears_mut().into_iter().next().unwrap();
            to_f32_vec(lin.weight().into_data())
        };
        let rounded = first(&mut h);
        let orig = first(&mut dense.model.clone());
        let ulp = if bf16 { 2f32.powi(-8) } else { 2f32.powi(-11) };
        for (r, o) in rounded.iter().zip(&orig) {
            assert!((r - o).abs() <= ulp * o.abs().max(6.1e-5), "{o} → {r}");
        }
    }
}

/// Loading with the projections held in 16 bits as they are read gives the same model as
/// loading in f32 and rounding after: every projection 16-bit, identical logits.
#[test]
fn loading_into_a_16_bit_base_equals_rounding_after_loading() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/tiny-llama/model");
    let ids: Vec<u32> = (0..24).map(|i| (i * 37 + 11) % 2000).collect();
    for bf16 in [true, false] {
        let mut at_load = fedtune_engine::load_model_half(&dir, &Device::flex(), bf16).unwrap();
        let mut after = fedtune_engine::load_model(&dir, &Device::flex(), DType::F32).unwrap();
        after.model.store_half(bf16);
        let projections = at_load.model.linears_mut();
        assert!(!projections.is_empty());
        for (name, lin) in projections {
            assert!(matches!(lin.base, BaseWeight::Half { .. }), "{name}");
        }
        let got = to_f32_vec(at_load.model.forward(&ids, 1, ids.len()).into_data());
        let want = to_f32_vec(after.model.forward(&ids, 1, ids.len()).into_data());
        assert_eq!(got, want, "bf16 {bf16}");
    }
}
