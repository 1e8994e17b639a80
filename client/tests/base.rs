//! Where a client's base model trains: mixed precision (client.toml's `bf16`/`fp16`) needs a
//! GPU, and the CPU says so instead of training in another precision than asked.

use burn::tensor::{DType, Device};
use fedtune_client::trainer::Base;
use fedtune_engine::cuda::Dt;
use fedtune_engine::device::Device as EngineDevice;

#[test]
fn mixed_precision_on_the_cpu_is_refused_with_the_reason() {
    let m = fedtune_engine::load_model(
        &std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/tiny-llama/model"),
        &Device::flex(),
        DType::F32,
    )
    .unwrap();
    for dt in [Dt::BF16, Dt::F16] {
        let err = match Base::on(m.model.clone(), EngineDevice::Cpu, dt) {
            Ok(_) => panic!("{dt:?} on the CPU was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("GPU") && err.contains("cuda"), "{err}");
    }
    assert!(
        Base::on(m.model, EngineDevice::Cpu, Dt::F32)
            .unwrap()
            .host()
            .is_some()
    );
}
