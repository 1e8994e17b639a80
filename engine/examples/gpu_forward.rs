//! GPU forward throughput and agreement with the host engine, on a model directory or GGUF
//! file. Used by `scripts/gpu_check.sh` on the GPU machine.
//!
//! `gpu_forward bench MODEL DTYPE BATCH SEQ ITERS`: tokens/s of the forward pass with the
//! LM head's log-probabilities at every position (what `fedtune eval` computes), one JSON line.
//! `DTYPE` is `f32`, `bf16`, `f16`, or `bf16-nf4` / `bf16-nf4dq` (NF4 projections, without or
//! with double quantisation, computing in bf16).
//! `gpu_forward gen MODEL DTYPE PROMPT NEW`: greedy decoding speed with the KV cache (new tokens
//! per second after a prompt of PROMPT random ids), one JSON line.
//! `gpu_forward parts BATCH SEQ`: milliseconds of the forward's parts on the Llama-3.2-1B
//! shape (attention on CUDA cores or on tensor cores, one layer's seven products, the LM
//! head) and of the training step's attention backward, bf16, each timed alone after a
//! warm-up, with attention's TFLOP/s; one JSON line.
//! `gpu_forward compare MODEL BATCH SEQ`: log-probabilities of random ids on the host engine
//! (f32) and on the GPU in f32 and bf16; prints the largest differences as one JSON line.
use std::time::Instant;

use burn::tensor::{DType, Device};
use fedtune_engine::cuda::{Dt, Gpu};
use fedtune_engine::eval::{TokenBatch, target_logprobs_on};
use fedtune_engine::loader::load_model_cuda;
use fedtune_engine::tokenizer::Encoded;
use rand::{Rng, SeedableRng};

fn batch(vocab: u32, b: usize, t: usize) -> TokenBatch {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let seqs: Vec<Encoded> = (0..b)
        .map(|_| Encoded {
            ids: (0..t).map(|_| rng.random_range(0..vocab)).collect(),
            mask: vec![1; t],
        })
        .collect();
    TokenBatch::pad(&seqs.iter().collect::<Vec<_>>(), 0)
}

/// Compute dtype and NF4 mode from `f32`, `bf16`, `f16`, `bf16-nf4`, `bf16-nf4dq`.
fn dtype(s: &str) -> (Dt, Option<bool>) {
    match s {
        "f32" => (Dt::F32, None),
        "f16" => (Dt::F16, None),
        "bf16-nf4" => (Dt::BF16, Some(false)),
        "bf16-nf4dq" => (Dt::BF16, Some(true)),
        _ => (Dt::BF16, None),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    let n = |i: usize| -> usize { a[i].parse().expect("a number") };
    let gpu = Gpu::open(0)?;
    match a[1].as_str() {
        "bench" => {
            let (dt, nf4) = dtype(&a[3]);
            let (b, t, iters) = (n(4), n(5), n(6));
            let t0 = Instant::now();
            let (m, _) = load_model_cuda(a[2].as_ref(), gpu.clone(), dt, nf4)?;
            gpu.synchronize()?;
            let load = t0.elapsed().as_secs_f64();
            let tb = batch(m.config.vocab_size as u32, b, t);
            let _ = target_logprobs_on(&m, &tb);
            gpu.synchronize()?;
            gpu.reset_peak()?;
            let t0 = Instant::now();
            for _ in 0..iters {
                let (lp, _) = target_logprobs_on(&m, &tb);
                assert!(
                    lp.iter().all(|v| v.is_finite()),
                    "non-finite log-probabilities"
                );
            }
            gpu.synchronize()?;
            let secs = t0.elapsed().as_secs_f64() / iters as f64;
            println!(
                "{{\"impl\": \"fedtune\", \"gpu\": \"{}\", \"dtype\": \"{}\", \"batch\": {b}, \"seq\": {t}, \"load_s\": {load:.2}, \"seconds\": {secs:.4}, \"tokens_per_s\": {:.1}, \"peak_gib\": {:.3}}}",
                gpu.name,
                a[3],
                (b * t) as f64 / secs,
                (gpu.peak_bytes()? as f64 + gpu.workspace_bytes() as f64) / (1u64 << 30) as f64
            );
        }
        "gen" => {
            let (dt, nf4) = dtype(&a[3]);
            let (prompt, new) = (n(4), n(5));
            let (m, _) = load_model_cuda(a[2].as_ref(), gpu.clone(), dt, nf4)?;
            let ids = batch(m.config.vocab_size as u32, 1, prompt).ids;
            let cfg = fedtune_engine::generate::GenerationConfig {
                max_new_tokens: new,
                ..Default::default()
            };
            let _ = fedtune_engine::generate::generate(&m, &ids, &cfg, |_| {});
            let t0 = Instant::now();
            let out = fedtune_engine::generate::generate(&m, &ids, &cfg, |_| {});
            let secs = t0.elapsed().as_secs_f64();
            println!(
                "{{\"impl\": \"fedtune\", \"generate\": \"greedy\", \"dtype\": \"{}\", \"prompt\": {prompt}, \"new_tokens\": {}, \"seconds\": {secs:.3}, \"tokens_per_s\": {:.1}}}",
                a[3],
                out.len(),
                out.len() as f64 / secs
            );
        }
        "parts" => {
            let (b, t) = (n(2), n(3));
            let (h, hq, hkv, d, inter, vocab, layers) = (2048, 32, 8, 64, 8192, 128_256, 16);
            let nrows = b * t;
            let dt = Dt::BF16;
            let rnd = |r: usize, c: usize| {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64((r * 31 + c) as u64);
                let v: Vec<f32> = (0..r * c)
                    .map(|_| rng.random_range(-0.05f32..0.05))
                    .collect();
                gpu.upload(&v, r, c, dt).expect("upload")
            };
            let time = |f: &mut dyn FnMut()| -> f64 {
                f();
                gpu.synchronize().expect("sync");
                let t0 = Instant::now();
                for _ in 0..5 {
                    f();
                }
                gpu.synchronize().expect("sync");
                t0.elapsed().as_secs_f64() * 1e3 / 5.0
            };
            let (q, kk, vv) = (rnd(nrows, hq * d), rnd(nrows, hkv * d), rnd(nrows, hkv * d));
            let geom = fedtune_engine::cuda::ops::AttnGeom {
                batch: b,
                tq: t,
                tk: t,
                hq,
                hkv,
                d,
                k_bs: t * hkv * d,
                k_rs: hkv * d,
                window: 0,
            };
            let scale = 1.0 / (d as f32).sqrt();
            let mut attn = || {
                let _ = gpu
                    .attention(&q, kk.ptr(), vv.ptr(), geom, None, scale, false)
                    .expect("attention");
            };
            let mma = time(&mut attn);
            // The training step's attention backward (dQ, dK, dV from the forward's lse).
            let (o, lse) = gpu
                .attention(&q, kk.ptr(), vv.ptr(), geom, None, scale, true)
                .expect("attention");
            let (lse, d_o) = (lse.expect("lse"), rnd(nrows, hq * d));
            let mut attn_bwd = || {
                let _ = gpu
                    .attention_backward(&q, &kk, &vv, &o, &d_o, &lse, geom, None, scale)
                    .expect("attention backward");
            };
            let bwd = time(&mut attn_bwd);
            // Causal attention's forward FLOPs (two products over half the score matrix); the
            // backward counted as 2.5 times that, as FlashAttention-2's paper does (its five
            // products; fedtune's two atomic-free kernels compute seven).
            let flops = 2.0 * (b * t * t * hq * d) as f64;
            let (tf_fwd, tf_bwd) = (flops / mma / 1e9, 2.5 * flops / bwd / 1e9);
            let x = rnd(nrows, h);
            let ws: Vec<_> = [
                (hq * d, h),
                (hkv * d, h),
                (hkv * d, h),
                (h, hq * d),
                (inter, h),
                (inter, h),
                (h, inter),
            ]
            .iter()
            .map(|&(o, i)| rnd(o, i))
            .collect();
            let xi = rnd(nrows, inter);
            let mut products = || {
                for (i, w) in ws.iter().enumerate() {
                    let inp = if i == 6 {
                        &xi
                    } else if i == 3 {
                        &q
                    } else {
                        &x
                    };
                    let _ = gpu
                        .matmul_sum(&[(inp, false, w, true, 1.0)], dt)
                        .expect("product");
                }
            };
            let prod = time(&mut products);
            let head = rnd(vocab, h);
            let chunk = (256usize << 20) / (4 * vocab);
            let mut headf = || {
                let mut r0 = 0;
                while r0 < nrows {
                    let rows: Vec<u32> = (r0..(r0 + chunk).min(nrows)).map(|r| r as u32).collect();
                    let hc = gpu.gather_rows(&x, &rows).expect("gather");
                    let logits = gpu
                        .matmul_sum(&[(&hc, false, &head, true, 1.0)], Dt::F32)
                        .expect("head");
                    let _ = gpu
                        .target_logprobs(
                            &logits,
                            &rows.iter().map(|r| r % 1000).collect::<Vec<_>>(),
                        )
                        .expect("lp");
                    r0 += chunk;
                }
            };
            let headms = time(&mut headf);
            println!(
                "{{\"parts\": \"bf16 ms, batch {b} x {t}\", \"attention_kernel\": \"{}\", \"attention_per_layer\": {mma:.3}, \"attention_tflops\": {tf_fwd:.1}, \"attention_backward_per_layer\": {bwd:.3}, \"attention_backward_tflops\": {tf_bwd:.1}, \"products_per_layer\": {prod:.3}, \"lm_head\": {headms:.3}, \"layers\": {layers}, \"estimate_total\": {:.1}}}",
                if gpu.use_mma_attention(dt, d) {
                    "tensor cores"
                } else {
                    "CUDA cores"
                },
                layers as f64 * (mma + prod) + headms
            );
        }
        "compare" => {
            let (b, t) = (n(3), n(4));
            let host = fedtune_engine::load_model(a[2].as_ref(), &Device::flex(), DType::F32)?;
            let tb = batch(host.model.config.vocab_size as u32, b, t);
            let (want, _) = target_logprobs_on(&host.model, &tb);
            let mut out = Vec::new();
            for dt in [Dt::F32, Dt::BF16] {
                let (m, _) = load_model_cuda(a[2].as_ref(), gpu.clone(), dt, None)?;
                let (got, _) = target_logprobs_on(&m, &tb);
                let max = got
                    .iter()
                    .zip(&want)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                let scale = want.iter().fold(1f32, |s, v| s.max(v.abs()));
                let mean = got
                    .iter()
                    .zip(&want)
                    .map(|(x, y)| (x - y).abs())
                    .sum::<f32>()
                    / want.len() as f32;
                out.push(format!(
                    "\"{dt:?}\": {{\"max_abs\": {max:.3e}, \"max_rel\": {:.3e}, \"mean_abs\": {mean:.3e}}}",
                    max / scale
                ));
            }
            println!(
                "{{\"compare\": \"logprobs vs host f32\", \"batch\": {b}, \"seq\": {t}, {}}}",
                out.join(", ")
            );
        }
        other => return Err(format!("unknown mode {other}").into()),
    }
    Ok(())
}
