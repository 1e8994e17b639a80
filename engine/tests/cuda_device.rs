//! The GPU engine against the host engine and transformers, kernel by kernel and on whole
//! models. Runs where a CUDA device is found (`scripts/gpu_check.sh` on the GPU machine); on
//! machines without one every test says so and passes, unless `FEDTUNE_REQUIRE_GPU=1`.
//! Test data is read from `$FEDTUNE_REPO/testdata` (see `gpu_common`). Attention, forward and
//! backward, is tested in `cuda_attention.rs`, the training step in `cuda_train.rs`.

mod gpu_common;

use burn::tensor::{DType, Device, Tensor};
use fedtune_engine::cuda::{CudaModel, Dt, Gpu};
use fedtune_engine::device::{Backend, forward};
use fedtune_engine::eval::{TokenBatch, sequence_logprobs};
use fedtune_engine::kernels::{self, Term, matmul_sum};
use fedtune_engine::model::Positions;
use fedtune_engine::train::fused;
use fedtune_engine::weights::{SafetensorsSource, TensorSource, to_f32_vec};
use fedtune_engine::{ModelConfig, PeftAdapter, Tokenizer};
use gpu_common::{check, gpu, host, rand, repo, tiny, up};

#[test]
fn products_with_transposes_and_accumulation_match_the_host() {
    let Some(g) = gpu() else { return };
    let (x, w, u, b, dy) = (
        rand([37, 53]),
        rand([29, 53]),
        rand([37, 7]),
        rand([29, 7]),
        rand([37, 29]),
    );
    let want = host(&matmul_sum(&[Term::nt(&x, &w, 1.0), Term::nt(&u, &b, 0.5)]));
    let (gx, gw, gu, gb, gdy) = (up(&g, &x), up(&g, &w), up(&g, &u), up(&g, &b), up(&g, &dy));
    let got = g
        .matmul_sum(
            &[(&gx, false, &gw, true, 1.0), (&gu, false, &gb, true, 0.5)],
            Dt::F32,
        )
        .unwrap();
    check("x·Wᵀ + 0.5·u·Bᵀ", &g.download(&got).unwrap(), &want, 1e-5);
    let want = host(&matmul_sum(&[Term::tn(&dy, &x, 2.0)]));
    let got = g
        .matmul_sum(&[(&gdy, true, &gx, false, 2.0)], Dt::F32)
        .unwrap();
    check("2·dyᵀ·x", &g.download(&got).unwrap(), &want, 1e-5);
    let want = host(&matmul_sum(&[Term::nn(&dy, &w, 1.0)]));
    let got = g
        .matmul_sum(&[(&gdy, false, &gw, false, 1.0)], Dt::F32)
        .unwrap();
    check("dy·W", &g.download(&got).unwrap(), &want, 1e-5);
}

/// `Gpu::set_tf32` (TRL's `--tf32`): f32 products on TF32 tensor cores differ from f32 in the
/// low bits (inputs rounded to a 10-bit mantissa) and stay within TF32's rounding; off again,
/// they are the f32 products.
#[test]
fn tf32_products_round_their_inputs_and_can_be_turned_off() {
    let Some(g) = gpu() else { return };
    let (x, w) = (rand([64, 512]), rand([48, 512]));
    let want = host(&matmul_sum(&[Term::nt(&x, &w, 1.0)]));
    let (gx, gw) = (up(&g, &x), up(&g, &w));
    let product = |g: &Gpu| {
        let c = g
            .matmul_sum(&[(&gx, false, &gw, true, 1.0)], Dt::F32)
            .unwrap();
        g.download(&c).unwrap()
    };
    assert!(!g.tf32(), "TF32 is off by default");
    let f32 = product(&g);
    check("f32 product", &f32, &want, 1e-5);
    g.set_tf32(true);
    let tf32 = product(&g);
    g.set_tf32(false);
    check("TF32 product", &tf32, &want, 5e-3);
    assert_ne!(tf32, f32, "TF32 rounds the inputs");
    assert_eq!(product(&g), f32, "f32 again once TF32 is off");
}

#[test]
fn rmsnorm_rope_swiglu_and_nf4_match_the_host_kernels() {
    let Some(g) = gpu() else { return };
    let (x, p, w) = (rand([37, 200]), rand([37, 200]), rand([1, 200]));
    let w1: Tensor<1> = w.clone().reshape([200]);
    let (hh, hy, hr) = fused::add_rmsnorm(&x, &p, &w1, 1e-5);
    let (h, y, r) = g.rmsnorm(&up(&g, &x), Some(&up(&g, &p)), &up(&g, &w), 1e-5, true);
    check(
        "add+rmsnorm h",
        &g.download(&h.unwrap()).unwrap(),
        &host(&hh),
        1e-6,
    );
    check("add+rmsnorm y", &g.download(&y).unwrap(), &host(&hy), 1e-5);
    check(
        "add+rmsnorm r",
        &g.download_f32(&r.unwrap()).unwrap(),
        &host(&hr),
        1e-5,
    );
    // RoPE: 3 heads of 40, positions 5.., two sequences.
    let cfg =
        ModelConfig::from_file(&repo().join("testdata/tiny-llama/model/config.json")).unwrap();
    let rope = fedtune_engine::model::RotaryEmbedding::new(&ModelConfig {
        head_dim: 40,
        ..cfg
    });
    let pos = Positions::Range {
        start: 5,
        len: 11,
        batch: 2,
    };
    let (cos, sin) = rope.rows(&pos);
    let q = rand([22, 120]);
    let want = kernels::elementwise::rope_rows(&host(&q), 3, 40, &cos, &sin, false);
    let (gc, gs) = (g.upload_f32(&cos).unwrap(), g.upload_f32(&sin).unwrap());
    let got = g.rope(up(&g, &q), 3, &gc, &gs, false);
    check("rope", &g.download(&got).unwrap(), &want, 1e-6);
    let want = kernels::elementwise::rope_rows(&host(&q), 3, 40, &cos, &sin, true);
    let got = g.rope(up(&g, &q), 3, &gc, &gs, true);
    check("rope inverse", &g.download(&got).unwrap(), &want, 1e-6);
    let (gate, upm) = (rand([33, 70]), rand([33, 70]));
    let want = host(&fused::swiglu(&gate, &upm));
    let got = g.swiglu(&up(&g, &gate), &up(&g, &upm));
    check("swiglu", &g.download(&got).unwrap(), &want, 1e-6);
    for double in [false, true] {
        let v = host(&rand([48, 100]));
        let q = fedtune_engine::nf4::quantize(&v, 48, 100, double);
        let m = fedtune_engine::cuda::model::Nf4Gpu::upload(&g, &q).unwrap();
        let got = g.download(&g.nf4_dequant(&m, Dt::F32)).unwrap();
        let want = q.dequantize();
        let same = got
            .iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(
            same,
            "NF4 dequantisation (double = {double}) is not bit-identical"
        );
        println!("nf4 dequant (double = {double}): bit-identical");
    }
}

#[test]
fn backward_kernels_match_the_host_kernels() {
    let Some(g) = gpu() else { return };
    // RMSNorm backward (with the skip connection's gradient, and without), weight gradient
    // over more rows than one partial sum holds.
    let (n, d) = (600, 200);
    let (x, w, dy, res) = (rand([n, d]), rand([1, d]), rand([n, d]), rand([n, d]));
    let w1: Tensor<1> = w.clone().reshape([d]);
    let (_, r) = fused::rmsnorm(&x, &w1, 1e-5);
    let gr = g.upload_f32(&host(&r)).unwrap();
    for with_res in [false, true] {
        let (want_dx, want_dw) =
            fused::rmsnorm_backward(&x, &r, &w1, dy.clone(), with_res.then_some(&res), true);
        let gres = up(&g, &res);
        let (dx, dw) = g.rmsnorm_backward(
            &up(&g, &x),
            &gr,
            &up(&g, &w),
            &up(&g, &dy),
            with_res.then_some(&gres),
            true,
        );
        check(
            &format!("rmsnorm backward dx (residual: {with_res})"),
            &g.download(&dx).unwrap(),
            &host(&want_dx),
            1e-5,
        );
        let want_dw = to_f32_vec(want_dw.unwrap().to_data());
        check(
            "rmsnorm backward dw",
            &g.download(&dw.unwrap()).unwrap(),
            &want_dw,
            1e-5,
        );
    }
    // Bias gradient: column sums.
    let want: Vec<f32> = (0..d)
        .map(|j| host(&dy).chunks(d).map(|row| row[j]).sum())
        .collect();
    check(
        "column sums",
        &g.download(&g.col_sum(&up(&g, &dy))).unwrap(),
        &want,
        1e-5,
    );
    // SwiGLU backward.
    let (gt, ut, da) = (rand([33, 70]), rand([33, 70]), rand([33, 70]));
    let (want_dg, want_du) = fused::swiglu_backward(&gt, &ut, da.clone());
    let (dg, du) = g.swiglu_backward(&up(&g, &gt), &up(&g, &ut), &up(&g, &da));
    check(
        "swiglu backward dg",
        &g.download(&dg).unwrap(),
        &host(&want_dg),
        1e-5,
    );
    check(
        "swiglu backward du",
        &g.download(&du).unwrap(),
        &host(&want_du),
        1e-5,
    );
    // The LM head's log-probabilities and softmax gradient, against a direct f64 softmax.
    let (rows, vocab) = (5, 1000);
    let logits = rand([rows, vocab]);
    let targets: Vec<u32> = (0..rows as u32).map(|i| i * 193 % vocab as u32).collect();
    let lh = host(&logits);
    let (mut want_lp, mut want_grad, mut want_h) = (Vec::new(), Vec::new(), Vec::new());
    for (row, &t) in lh.chunks(vocab).zip(&targets) {
        let mx = row.iter().fold(f64::MIN, |m, &v| m.max(v as f64));
        let lse = mx + row.iter().map(|&v| (v as f64 - mx).exp()).sum::<f64>().ln();
        want_lp.push((row[t as usize] as f64 - lse) as f32);
        let logp = |v: f32| v as f64 - lse;
        want_h.push(-row.iter().map(|&v| logp(v).exp() * logp(v)).sum::<f64>() as f32);
        for (i, &v) in row.iter().enumerate() {
            let onehot = if i == t as usize { 1.0 } else { 0.0 };
            want_grad.push((onehot - (v as f64 - lse).exp()) as f32);
        }
    }
    let gl = up(&g, &logits);
    let (lp, entropy) = g.logprob_grad(&gl, &targets, true).unwrap();
    check(
        "logprob_grad log p",
        &g.download(&lp).unwrap(),
        &want_lp,
        1e-5,
    );
    check(
        "logprob_grad entropy",
        &g.download(&entropy.unwrap()).unwrap(),
        &want_h,
        1e-5,
    );
    // Without entropy: the same log-probabilities and gradient, no entropy.
    let again = up(&g, &logits);
    let (lp2, none) = g.logprob_grad(&again, &targets, false).unwrap();
    assert!(none.is_none());
    assert_eq!(g.download(&lp2).unwrap(), g.download(&lp).unwrap());
    assert_eq!(g.download(&again).unwrap(), g.download(&gl).unwrap());
    check(
        "logprob_grad e_y − p",
        &g.download(&gl).unwrap(),
        &want_grad,
        1e-5,
    );
    assert!(
        g.logprob_grad(&gl, &[0, 1, 2, 3, vocab as u32], false)
            .is_err()
    );
}

fn all_logits<B: Backend>(m: &B, ids: &[u32], b: usize, t: usize) -> Vec<f32> {
    let pos = Positions::Range {
        start: 0,
        len: t,
        batch: b,
    };
    let h = forward(m, ids, b, t, &pos, None, None);
    m.row_logits(&h, &(0..b * t).collect::<Vec<_>>())
}

#[test]
fn every_architecture_variant_matches_transformers_and_the_host_on_the_gpu() {
    let Some(g) = gpu() else { return };
    for name in [
        "qwen2_bias_untied",
        "mistral_sliding_window",
        "llama3_rope_bias_headdim",
        "llama_linear_rope_bf16_sharded",
    ] {
        let dir = format!("testdata/variants/{name}");
        let (model, _) = tiny(&dir);
        let reference =
            SafetensorsSource::open_file(&repo().join(&dir).join("reference.safetensors")).unwrap();
        let ids_data = reference.load("input_ids").unwrap().unwrap();
        let [b, t] = [ids_data.shape()[0], ids_data.shape()[1]];
        let ids: Vec<u32> = ids_data
            .convert::<i64>()
            .try_to_vec::<i64>()
            .unwrap()
            .iter()
            .map(|&v| v as u32)
            .collect();
        let cm = CudaModel::from_host(&model, g.clone(), Dt::F32).unwrap();
        let got = all_logits(&cm, &ids, b, t);
        let want = to_f32_vec(reference.load("logits").unwrap().unwrap());
        let max = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!("{name}: GPU vs transformers max abs diff {max:e}");
        assert!(max < 1e-4, "{name}: {max}");
        check(
            &format!("{name} GPU vs host"),
            &got,
            &all_logits(&model, &ids, b, t),
            1e-5,
        );
    }
}

#[test]
fn tiny_llama_logits_losses_adapter_nf4_and_generation_match_the_host() {
    let Some(g) = gpu() else { return };
    let (mut model, _) = tiny("testdata/tiny-llama/model");
    let tok = Tokenizer::from_dir(&repo().join("testdata/tiny-llama/model")).unwrap();
    let text = "<|im_start|>user\nWhat is the capital of France? Answer in one word.<|im_end|>\n<|im_start|>assistant\nParis<|im_end|>\n";
    let ids = tok.encode(text).unwrap();
    let t = ids.len();
    for adapter in [false, true] {
        if adapter {
            let a = PeftAdapter::load(&repo().join("testdata/tiny-llama/adapter")).unwrap();
            model.attach_adapter(&a).unwrap();
        }
        let cm = CudaModel::from_host(&model, g.clone(), Dt::F32).unwrap();
        let want = all_logits(&model, &ids, 1, t);
        check(
            &format!("tiny-llama logits (adapter {adapter})"),
            &all_logits(&cm, &ids, 1, t),
            &want,
            1e-5,
        );
        let enc = fedtune_engine::tokenizer::Encoded {
            ids: ids.clone(),
            mask: vec![1; t],
        };
        let batch = TokenBatch::pad(&[&enc, &enc], tok.pad_id);
        let (hs, _) = sequence_logprobs(&model, &batch);
        let (gs, _) = sequence_logprobs(&cm, &batch);
        let (hs, gs): (Vec<f32>, Vec<f32>) = (
            hs.iter().map(|&v| v as f32).collect(),
            gs.iter().map(|&v| v as f32).collect(),
        );
        check(
            &format!("tiny-llama sequence log-probs (adapter {adapter})"),
            &gs,
            &hs,
            1e-5,
        );
        let cfg = fedtune_engine::generate::GenerationConfig {
            max_new_tokens: 24,
            ..Default::default()
        };
        let prompt = &ids[..ids.len() / 2];
        let hg = fedtune_engine::generate::generate(&model, prompt, &cfg, |_| {});
        let gg = fedtune_engine::generate::generate(&cm, prompt, &cfg, |_| {});
        assert_eq!(gg, hg, "greedy generation differs (adapter {adapter})");
        println!(
            "greedy generation (adapter {adapter}): {} identical tokens",
            gg.len()
        );
        // Sampled groups: the host decodes every row as one batch (shorter prompts padded);
        // the GPU stacks prompts of one length together, else each prompt's rows alone. Each
        // row's own RNG stream draws the same tokens from the same logits.
        let cfg = fedtune_engine::generate::GenerationConfig {
            max_new_tokens: 8,
            temperature: 1.3,
            ..Default::default()
        };
        for prompts in [[&ids[..5], &ids[..9]], [&ids[..5], &ids[4..9]]] {
            let seeds = [3, 4];
            let hg = fedtune_engine::generate::generate_groups(&model, &prompts, &seeds, 3, &cfg);
            let gg = fedtune_engine::generate::generate_groups(&cm, &prompts, &seeds, 3, &cfg);
            assert_eq!(gg, hg, "sampled groups differ (adapter {adapter})");
        }
        // The GPU stacks caches of one length, not others.
        let prefilled = |len: usize| {
            let mut c = cm.new_cache();
            let at = Positions::Range {
                start: 0,
                len,
                batch: 1,
            };
            forward(&cm, &ids[..len], 1, len, &at, None, Some(&mut c));
            c
        };
        let (c5, c9) = (prefilled(5), prefilled(9));
        let stacked = cm
            .cache_stack(&[&c5, &c5], 3, 8)
            .expect("one length stacks");
        assert_eq!(CudaModel::cache_seen(&stacked), 5);
        assert!(cm.cache_stack(&[&c5, &c9], 3, 8).is_none());
    }
    model.quantize_nf4(true);
    let cm = CudaModel::from_host(&model, g.clone(), Dt::F32).unwrap();
    check(
        "tiny-llama NF4 + adapter logits",
        &all_logits(&cm, &ids, 1, t),
        &all_logits(&model, &ids, 1, t),
        1e-5,
    );
}

#[test]
fn gguf_and_directory_load_straight_to_the_gpu() {
    let Some(g) = gpu() else { return };
    for path in ["testdata/gguf/tiny.gguf", "testdata/tiny-llama/model"] {
        let host =
            fedtune_engine::load_model(&repo().join(path), &Device::flex(), DType::F32).unwrap();
        let (cm, _) =
            fedtune_engine::loader::load_model_cuda(&repo().join(path), g.clone(), Dt::F32, None)
                .unwrap();
        let ids: Vec<u32> = (0..40u32).map(|i| (i * 977) % 49_152).collect();
        check(
            &format!("{path} loaded on the GPU"),
            &all_logits(&cm, &ids, 2, 20),
            &all_logits(&host.model, &ids, 2, 20),
            1e-5,
        );
    }
}

/// transformers' own deviation of 16-bit logits from f32 on the tiny model (written by
/// `bench/gpu_forward.py bf16`, path in `FEDTUNE_HALF_REFERENCE`): `(max_abs, mean_abs)`.
fn transformers_half_deviation(dt: Dt) -> Option<(f32, f32)> {
    let path = std::env::var("FEDTUNE_HALF_REFERENCE").ok()?;
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    let e = &v[format!("{dt:?}")];
    Some((
        e["max_abs"].as_f64()? as f32,
        e["mean_abs"].as_f64()? as f32,
    ))
}

#[test]
fn bf16_and_f16_logits_deviate_from_f32_no_more_than_transformers_own() {
    let Some(g) = gpu() else { return };
    let (model, _) = tiny("testdata/tiny-llama/model");
    let ids: Vec<u32> = (0..64u32).map(|i| (i * 7919) % 49_152).collect();
    let want = all_logits(&model, &ids, 2, 32);
    for dt in [Dt::BF16, Dt::F16] {
        let cm = CudaModel::from_host(&model, g.clone(), dt).unwrap();
        let got = all_logits(&cm, &ids, 2, 32);
        let max = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let mean = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .sum::<f32>()
            / got.len() as f32;
        match transformers_half_deviation(dt) {
            Some((tmax, tmean)) => {
                println!(
                    "{dt:?} vs f32 logits: fedtune max {max:.4} mean {mean:.5}; transformers max {tmax:.4} mean {tmean:.5}"
                );
                // Same order as transformers' own rounding: within 1.5x of its deviation.
                assert!(
                    max <= 1.5 * tmax && mean <= 1.5 * tmean,
                    "{dt:?}: fedtune max {max} mean {mean}, transformers max {tmax} mean {tmean}"
                );
            }
            None => {
                println!(
                    "{dt:?} vs f32 logits: max abs diff {max:.4}, mean {mean:.5} (no transformers reference)"
                );
                assert!(max < 1.0 && mean < 0.1, "{dt:?}: max {max}, mean {mean}");
            }
        }
    }
}
