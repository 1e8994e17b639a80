//! NF4 against bitsandbytes 0.50.2's own output (`testdata/nf4`): codes, scales and
//! dequantised values bit for bit, with and without double quantisation.

use std::path::PathBuf;

use fedtune_engine::nf4::{Absmax, NF4, dynamic_map, quantize};
use fedtune_engine::weights::{SafetensorsSource, TensorSource, to_f32_vec};

fn fixture() -> SafetensorsSource {
    SafetensorsSource::open_file(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../testdata/nf4/nf4_reference.safetensors"),
    )
    .unwrap()
}

fn f32s(s: &SafetensorsSource, k: &str) -> Vec<f32> {
    to_f32_vec(s.load(k).unwrap().unwrap())
}

fn u8s(s: &SafetensorsSource, k: &str) -> Vec<u8> {
    s.load(k).unwrap().unwrap().try_to_vec::<u8>().unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn levels_and_dynamic_map_equal_bitsandbytes() {
    let s = fixture();
    assert_eq!(bits(&NF4), bits(&f32s(&s, "code")));
    assert_eq!(bits(&dynamic_map()), bits(&f32s(&s, "dq_state2_code")));
}

#[test]
fn nf4_codes_scales_and_values_are_bit_identical() {
    let s = fixture();
    let w = f32s(&s, "weight");
    let q = quantize(&w, 96, 256, false);
    assert_eq!(q.packed, u8s(&s, "packed"));
    let Absmax::F32(absmax) = &q.absmax else {
        panic!("single quantisation")
    };
    assert_eq!(bits(absmax), bits(&f32s(&s, "absmax")));
    assert_eq!(bits(&q.dequantize()), bits(&f32s(&s, "dequantized")));
    assert_eq!(q.bytes_at_rest() * 8, 96 * 256 * 4 + (96 * 256 / 64) * 32);
}

#[test]
fn double_quantisation_is_bit_identical() {
    let s = fixture();
    let w = f32s(&s, "weight");
    let q = quantize(&w, 96, 256, true);
    assert_eq!(q.packed, u8s(&s, "dq_packed"));
    let Absmax::Double {
        codes,
        absmax2,
        offset,
    } = &q.absmax
    else {
        panic!("double")
    };
    assert_eq!(offset.to_bits(), f32s(&s, "dq_absmax_offset")[0].to_bits());
    assert_eq!(bits(absmax2), bits(&f32s(&s, "dq_state2_absmax")));
    assert_eq!(*codes, u8s(&s, "dq_absmax_codes"));
    assert_eq!(bits(&q.dequantize()), bits(&f32s(&s, "dq_dequantized")));
    let bits_per_weight = q.bytes_at_rest() as f64 * 8.0 / (96.0 * 256.0);
    assert!(bits_per_weight < 4.2, "{bits_per_weight}");
}

/// A model with an NF4 base (QLoRA): at most 4.2 bits per quantised parameter at rest with
/// double quantisation, its forward equals a dense model holding the dequantised weights, and
/// its logits stay near the original's (the tiny model's random weights are the worst case).
#[test]
fn an_nf4_base_is_compact_and_close_to_the_dense_model() {
    use burn::tensor::{DType, Device};
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/tiny-llama/model");
    let dense = fedtune_engine::load_model(&dir, &Device::flex(), DType::F32).unwrap();
    let ids: Vec<u32> = (0..24).map(|i| (i * 37 + 11) % 2000).collect();
    let want = to_f32_vec(dense.model.forward(&ids, 1, ids.len()).into_data());
    for double in [false, true] {
        let mut q = dense.model.clone();
        let (params, bytes) = q.quantize_nf4(double);
        let bits = bytes as f64 * 8.0 / params as f64;
        assert!(bits <= 4.2 || !double, "{bits} bits per parameter");
        assert!(bits <= 4.6, "{bits} bits per parameter");
        let got = to_f32_vec(q.forward(&ids, 1, ids.len()).into_data());
        let dot: f64 = got.iter().zip(&want).map(|(a, b)| (a * b) as f64).sum();
        let na: f64 = got.iter().map(|a| (a * a) as f64).sum::<f64>().sqrt();
        let nb: f64 = want.iter().map(|b| (b * b) as f64).sum::<f64>().sqrt();
        let cos = dot / (na * nb);
        assert!(cos > 0.9, "cosine {cos} between NF4 and dense logits");
        assert_ne!(got, want, "the NF4 base must actually be used");
        let mut dq = q.clone();
        for (_, lin) in dq.linears_mut() {
            lin.base = fedtune_engine::model::linear::BaseWeight::Dense(lin.weight());
        }
        let exact = to_f32_vec(dq.forward(&ids, 1, ids.len()).into_data());
        let worst = got
            .iter()
            .zip(&exact)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "NF4 forward vs dequantised dense: {worst}");
    }
}
