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
