//! GFLOP/s of the training step's projection shapes: burn's matrix product against the BLAS
//! path of `kernels::blas` (when a BLAS is installed).
//!
//! `cargo run --release -p fedtune-engine --example bench_matmul`
use std::time::Instant;

use burn::tensor::{Device, Distribution, Tensor};
use fedtune_engine::kernels::blas::{self, Operand};

fn rate(flops: f64, mut f: impl FnMut()) -> f64 {
    f();
    let t = Instant::now();
    let mut runs = 0;
    while t.elapsed().as_secs_f64() < 0.5 {
        f();
        runs += 1;
    }
    flops * runs as f64 / t.elapsed().as_secs_f64() / 1e9
}

fn main() {
    let dev = Device::flex();
    let blas = blas::get();
    println!("blas: {:?}", blas.map(|b| (&b.name, &b.core)));
    for (m, k, n) in [
        (1024, 576, 576),
        (1024, 576, 192),
        (1024, 576, 1536),
        (1024, 1536, 576),
        (1024, 192, 576),
        (256, 576, 49152),
        (256, 49152, 576),
        (1024, 576, 16),
        (1024, 576, 48),
        (1024, 1536, 16),
        (1024, 16, 576),
        (1024, 16, 1536),
    ] {
        let x = Tensor::<2>::random([m, k], Distribution::Default, &dev);
        let w = Tensor::<2>::random([n, k], Distribution::Default, &dev);
        let fl = 2.0 * (m * n * k) as f64;
        let burn_nt = rate(fl, || {
            let _ = x.clone().matmul(w.clone().transpose()).into_data();
        });
        let dy = Tensor::<2>::random([m, n], Distribution::Default, &dev);
        let burn_nn = rate(fl, || {
            let _ = dy.clone().matmul(w.clone()).into_data();
        });
        let (mut bl_nt, mut bl_nn) = (0.0, 0.0);
        if let Some(b) = blas {
            let xv = x.to_data().try_into_vec::<f32>().expect("f32");
            let wv = w.to_data().try_into_vec::<f32>().expect("f32");
            let dv = dy.to_data().try_into_vec::<f32>().expect("f32");
            let mut c = vec![0f32; m * n];
            bl_nt = rate(fl, || {
                b.sgemm(
                    m,
                    n,
                    k,
                    1.0,
                    Operand::plain(&xv, k),
                    Operand::transposed(&wv, k),
                    0.0,
                    &mut c,
                )
            });
            let mut c2 = vec![0f32; m * k];
            bl_nn = rate(fl, || {
                b.sgemm(
                    m,
                    k,
                    n,
                    1.0,
                    Operand::plain(&dv, n),
                    Operand::plain(&wv, k),
                    0.0,
                    &mut c2,
                )
            });
        }
        println!(
            "{m}x{k}x{n}: x·Wᵀ burn {burn_nt:.0} blas {bl_nt:.0} | dy·W burn {burn_nn:.0} blas {bl_nn:.0} GFLOP/s"
        );
    }
}
