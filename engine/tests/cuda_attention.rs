//! GPU attention against the host kernels and the f32 GPU kernel: forward and backward, on
//! CUDA cores (f32) and on tensor cores (bf16/f16), with GQA, packed segments, a sliding window
//! and a KV cache. Runs where a CUDA device is found (`scripts/gpu_check.sh` on the GPU
//! machine, the emulated GPU in CI); on machines without one every test says so and passes,
//! unless `FEDTUNE_REQUIRE_GPU=1`. Other kernels and whole models: `cuda_device.rs`.

mod gpu_common;

use burn::tensor::Tensor;
use fedtune_engine::cuda::{Dt, GTensor};
use fedtune_engine::kernels;
use fedtune_engine::train::fused;
use gpu_common::{check, gpu, host, packed_segments, rand, up};

/// The host attention context and the GPU geometry of one training-shaped call (`tq = tk`).
fn attn_case<'a>(
    b: usize,
    t: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    segments: Option<&'a [u32]>,
    window: Option<usize>,
) -> (fused::AttnCtx<'a>, fedtune_engine::cuda::ops::AttnGeom) {
    let ctx = fused::AttnCtx {
        shape: kernels::attention::Shape {
            batch: b,
            len: t,
            hq,
            hkv,
            d,
        },
        segments,
        window,
        scale: 1.0 / (d as f64).sqrt(),
        mask: None,
        cpu: true,
    };
    let geom = fedtune_engine::cuda::ops::AttnGeom {
        batch: b,
        tq: t,
        tk: t,
        hq,
        hkv,
        d,
        k_bs: t * hkv * d,
        k_rs: hkv * d,
        window: window.unwrap_or(0),
    };
    (ctx, geom)
}

#[test]
fn attention_matches_the_host_kernel_with_gqa_segments_and_window() {
    let Some(g) = gpu() else { return };
    let (b, t, hq, hkv, d) = (2, 75, 6, 2, 40);
    let (q, k, v) = (
        rand([b * t, hq * d]),
        rand([b * t, hkv * d]),
        rand([b * t, hkv * d]),
    );
    let segments = packed_segments(b, t);
    for (label, segs, window) in [
        ("causal", None, None),
        ("segments", Some(&segments[..]), None),
        ("window 17", None, Some(17)),
    ] {
        let (ctx, geom) = attn_case(b, t, hq, hkv, d, segs, window);
        let (want_o, want_lse) = fused::attention(&q, &k, &v, &ctx);
        let (gk, gv) = (up(&g, &k), up(&g, &v));
        let (o, lse) = g
            .attention(
                &up(&g, &q),
                gk.ptr(),
                gv.ptr(),
                geom,
                segs,
                1.0 / (d as f32).sqrt(),
                true,
            )
            .unwrap();
        check(
            &format!("attention {label} o"),
            &g.download(&o).unwrap(),
            &host(&want_o),
            1e-5,
        );
        check(
            &format!("attention {label} lse"),
            &g.download_f32(&lse.unwrap()).unwrap(),
            &want_lse.unwrap(),
            1e-5,
        );
    }
}

#[test]
fn attention_backward_matches_the_host_kernel_with_gqa_segments_and_window() {
    let Some(g) = gpu() else { return };
    // d = 40 (a partial last column group) and d = 128 (the largest supported).
    for (b, t, hq, hkv, d) in [(2, 75, 6, 2, 40), (1, 70, 4, 4, 128)] {
        let (q, k, v, d_o) = (
            rand([b * t, hq * d]),
            rand([b * t, hkv * d]),
            rand([b * t, hkv * d]),
            rand([b * t, hq * d]),
        );
        let segments = packed_segments(b, t);
        for (label, segs, window) in [
            ("causal", None, None),
            ("segments", Some(&segments[..]), None),
            ("window 17", None, Some(17)),
        ] {
            let (ctx, geom) = attn_case(b, t, hq, hkv, d, segs, window);
            let (o, lse) = fused::attention(&q, &k, &v, &ctx);
            let lse = lse.expect("host lse");
            let (want_dq, want_dk, want_dv) =
                fused::attention_backward(&q, &k, &v, &o, d_o.clone(), Some(&lse), &ctx);
            let (dq, dk, dv) = g
                .attention_backward(
                    &up(&g, &q),
                    &up(&g, &k),
                    &up(&g, &v),
                    &up(&g, &o),
                    &up(&g, &d_o),
                    &g.upload_f32(&lse).unwrap(),
                    geom,
                    segs,
                    1.0 / (d as f32).sqrt(),
                )
                .unwrap();
            for (what, got, want) in [
                ("dq", dq, want_dq),
                ("dk", dk, want_dk),
                ("dv", dv, want_dv),
            ] {
                check(
                    &format!("attention backward d={d} {label} {what}"),
                    &g.download(&got).unwrap(),
                    &host(&want),
                    1e-5,
                );
            }
        }
    }
}

#[test]
fn tensor_core_attention_matches_the_f32_kernel_within_bf16_rounding() {
    let Some(g) = gpu() else { return };
    // d = 64 and d = 128: the kernel has a build for each bound.
    for (b, t, hq, hkv, d) in [(2, 75, 6, 2, 64), (2, 70, 4, 2, 128)] {
        let (q, k, v) = (
            rand([b * t, hq * d]),
            rand([b * t, hkv * d]),
            rand([b * t, hkv * d]),
        );
        let segments = packed_segments(b, t);
        for dt in [Dt::BF16, Dt::F16] {
            assert!(
                g.use_mma_attention(dt, d),
                "sm_80+ runs attention on tensor cores"
            );
            // The same 16-bit inputs in f32 for the reference kernel.
            let (q16, k16, v16) = (
                g.cast(&up(&g, &q), dt),
                g.cast(&up(&g, &k), dt),
                g.cast(&up(&g, &v), dt),
            );
            let (q32, k32, v32) = (
                g.cast(&q16, Dt::F32),
                g.cast(&k16, Dt::F32),
                g.cast(&v16, Dt::F32),
            );
            // Attention on the 16-bit inputs and on their f32 values: (o, lse) of each.
            let scale = 1.0 / (d as f32).sqrt();
            let both = |q16: &GTensor, q32: &GTensor, geom, segs: Option<&[u32]>| {
                let run = |q: &GTensor, k: &GTensor, v: &GTensor| {
                    let (o, lse) = g
                        .attention(q, k.ptr(), v.ptr(), geom, segs, scale, true)
                        .unwrap();
                    (
                        g.download(&o).unwrap(),
                        g.download_f32(&lse.unwrap()).unwrap(),
                    )
                };
                (run(q16, &k16, &v16), run(q32, &k32, &v32))
            };
            for (label, segs, window) in [
                ("causal", None, None),
                ("segments", Some(&segments[..]), None),
                ("window 17", None, Some(17)),
            ] {
                let geom = attn_case(b, t, hq, hkv, d, segs, window).1;
                let ((o, lse), (want_o, want_lse)) = both(&q16, &q32, geom, segs);
                check(
                    &format!("{dt:?} tensor-core attention {label} o"),
                    &o,
                    &want_o,
                    2e-2,
                );
                check(
                    &format!("{dt:?} tensor-core attention {label} lse"),
                    &lse,
                    &want_lse,
                    5e-3,
                );
            }
            // Keys and values one element past a 16-byte boundary: the tiles are copied element
            // by element instead of 16 bytes at a time, with the same result.
            let shifted = |t: &Tensor<2>| {
                let mut vals = vec![0.0];
                vals.extend(host(t));
                g.upload(&vals, 1, vals.len(), dt).unwrap()
            };
            let (ks, vs) = (shifted(&k), shifted(&v));
            let geom = attn_case(b, t, hq, hkv, d, None, None).1;
            let (aligned, _) = g
                .attention(&q16, k16.ptr(), v16.ptr(), geom, None, scale, false)
                .unwrap();
            let (unaligned, _) = g
                .attention(&q16, ks.ptr() + 2, vs.ptr() + 2, geom, None, scale, false)
                .unwrap();
            assert_eq!(
                g.download(&unaligned).unwrap(),
                g.download(&aligned).unwrap(),
                "{dt:?} attention with unaligned keys"
            );
            // Decoding with a cache: the last 5 positions of each sequence query all 75 keys.
            let tail: Vec<u32> = (0..b)
                .flat_map(|s| (t - 5..t).map(move |p| (s * t + p) as u32))
                .collect();
            let (qt16, qt32) = (
                g.gather_rows(&q16, &tail).unwrap(),
                g.gather_rows(&q32, &tail).unwrap(),
            );
            let geom = fedtune_engine::cuda::ops::AttnGeom {
                batch: b,
                tq: 5,
                tk: t,
                hq,
                hkv,
                d,
                k_bs: t * hkv * d,
                k_rs: hkv * d,
                window: 0,
            };
            let ((o, _), (want, _)) = both(&qt16, &qt32, geom, None);
            check(
                &format!("{dt:?} tensor-core attention, 5 queries on a cache of 75"),
                &o,
                &want,
                2e-2,
            );
        }
    }
}

#[test]
fn tensor_core_attention_backward_matches_the_f32_kernel_within_bf16_rounding() {
    let Some(g) = gpu() else { return };
    // d = 64 (4 warps of keys per block) and d = 128 (2 warps), GQA and plain heads.
    for (b, t, hq, hkv, d) in [(2, 75, 6, 2, 64), (1, 70, 4, 4, 128)] {
        let segments = packed_segments(b, t);
        let (q, k, v, d_o) = (
            rand([b * t, hq * d]),
            rand([b * t, hkv * d]),
            rand([b * t, hkv * d]),
            rand([b * t, hq * d]),
        );
        for dt in [Dt::BF16, Dt::F16] {
            assert!(g.use_mma_attention(dt, d), "sm_80+ runs it on tensor cores");
            // The same 16-bit inputs, and their f32 values for the reference kernel.
            let half: Vec<GTensor> = [&q, &k, &v, &d_o]
                .iter()
                .map(|t| g.cast(&up(&g, t), dt))
                .collect();
            let full: Vec<GTensor> = half.iter().map(|t| g.cast(t, Dt::F32)).collect();
            for (label, segs, window) in [
                ("causal", None, None),
                ("segments", Some(&segments[..]), None),
                ("window 17", None, Some(17)),
            ] {
                let (_, geom) = attn_case(b, t, hq, hkv, d, segs, window);
                let scale = 1.0 / (d as f32).sqrt();
                let (o32, lse) = g
                    .attention(
                        &full[0],
                        full[1].ptr(),
                        full[2].ptr(),
                        geom,
                        segs,
                        scale,
                        true,
                    )
                    .unwrap();
                let lse = lse.unwrap();
                let o16 = g.cast(&o32, dt);
                let o = g.cast(&o16, Dt::F32);
                let got = g
                    .attention_backward(
                        &half[0], &half[1], &half[2], &o16, &half[3], &lse, geom, segs, scale,
                    )
                    .unwrap();
                let want = g
                    .attention_backward(
                        &full[0], &full[1], &full[2], &o, &full[3], &lse, geom, segs, scale,
                    )
                    .unwrap();
                for (what, got, want) in [
                    ("dq", got.0, want.0),
                    ("dk", got.1, want.1),
                    ("dv", got.2, want.2),
                ] {
                    check(
                        &format!("{dt:?} tensor-core attention backward d={d} {label} {what}"),
                        &g.download(&got).unwrap(),
                        &g.download(&want).unwrap(),
                        if dt == Dt::BF16 { 8e-3 } else { 1.5e-3 },
                    );
                }
            }
        }
    }
}
