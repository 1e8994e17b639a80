//! GPU training against the host engine: the whole training step (forward, backward, every
//! gradient) through [`TrainBackend`] on the GPU and on the host, for LoRA, QLoRA, full and
//! partial fine-tuning, packed sequences, GQA and sliding windows, gradient checkpointing;
//! the device kernels of training (dropout, row scatter) and the device optimiser against the
//! host's. Whole runs are in `cuda_train_runs.rs`. Runs where a CUDA device is found
//! (`scripts/gpu_check.sh`); elsewhere every test says so and passes, unless
//! `FEDTUNE_REQUIRE_GPU=1`.

mod gpu_common;

use std::collections::BTreeSet;

use burn::tensor::{Device, Tensor};
use fedtune_aggregation::{Adapter, LoraFactors, Matrix};
use fedtune_engine::cuda::{CudaModel, Dt, GTensor, Gpu};
use fedtune_engine::device::{Grads, TrainBackend};
use fedtune_engine::model::Positions;
use fedtune_engine::train::params::TrainModel;
use fedtune_engine::train::step::{StepBatch, StepOptions, Target, Trainable, backward, forward};
use fedtune_engine::{LlamaModel, PeftAdapter};
use gpu_common::{check, gpu, host, packed_segments, rand, repo, tiny, up};
use rand::{Rng, SeedableRng};

/// Two rows of `t` tokens (packed into two sequences each, padding at the end of the second
/// row when `packed`), every position inside a sequence trained on the next token, with
/// random upstream gradients.
fn batch(vocab: usize, t: usize, packed: bool) -> (StepBatch, Vec<f32>) {
    let b = 2;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let ids: Vec<u32> = (0..b * t)
        .map(|_| rng.random_range(3..vocab as u32))
        .collect();
    let segments = packed.then(|| packed_segments(b, t));
    let seg = |i: usize| segments.as_ref().map_or(1, |s| s[i]);
    let mut targets = Vec::new();
    for row in 0..b {
        for pos in 0..t - 1 {
            let i = row * t + pos;
            if seg(i) != 0 && seg(i) == seg(i + 1) {
                targets.push(Target {
                    pos: i,
                    id: ids[i + 1],
                    seq: row,
                });
            }
        }
    }
    let positions = match &segments {
        Some(s) => {
            // Positions restart with each packed sequence.
            let mut ids = Vec::with_capacity(b * t);
            for row in 0..b {
                let mut p = 0;
                for pos in 0..t {
                    if pos > 0 && s[row * t + pos] != s[row * t + pos - 1] {
                        p = 0;
                    }
                    ids.push(p);
                    p += 1;
                }
            }
            Positions::Explicit {
                ids,
                batch: b,
                len: t,
            }
        }
        None => Positions::Range {
            start: 0,
            len: t,
            batch: b,
        },
    };
    let g = (0..targets.len())
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    (
        StepBatch {
            ids,
            batch: b,
            len: t,
            positions,
            segments,
            targets,
            real_tokens: b * t,
        },
        g,
    )
}

/// A random adapter of rank `r` on every projection (B non-zero, so every gradient is).
fn random_adapter(m: &LlamaModel, r: usize, seed: u64) -> Adapter {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut adapter = Adapter::default();
    for (name, lin) in m.linears() {
        let mut mat = |rows: usize, cols: usize| {
            let v = (0..rows * cols)
                .map(|_| rng.random_range(-0.1f32..0.1))
                .collect();
            Matrix::new(rows, cols, v)
        };
        let (a, b) = (mat(r, lin.in_features()), mat(lin.out_features(), r));
        adapter
            .modules
            .insert(name, LoraFactors { a, b, scale: 2.0 });
    }
    adapter
}

/// One step on the host and on the GPU (f32): the same log-probabilities and gradients.
fn same_step(
    what: &str,
    model: &LlamaModel,
    g: &std::sync::Arc<Gpu>,
    t: usize,
    packed: bool,
    trainable: &Trainable,
) {
    let cm = CudaModel::from_host(model, g.clone(), Dt::F32).unwrap();
    same_step_on(
        what,
        model,
        &cm,
        g,
        t,
        packed,
        trainable,
        &StepOptions::default(),
    );
}

/// [`same_step`] against a given GPU model, with `gpu_options` for its step (the host's has
/// the defaults).
#[allow(clippy::too_many_arguments)]
fn same_step_on(
    what: &str,
    model: &LlamaModel,
    cm: &CudaModel,
    g: &std::sync::Arc<Gpu>,
    t: usize,
    packed: bool,
    trainable: &Trainable,
    gpu_options: &StepOptions,
) {
    cm.can_train(trainable.trains_weights()).unwrap();
    let (sb, d) = batch(model.config.vocab_size, t, packed);
    let hf = forward(model, &sb, trainable, &StepOptions::default());
    let gf = forward(cm, &sb, trainable, gpu_options);
    check(
        &format!("{what}: log p"),
        &gf.target_logps,
        &hf.target_logps,
        1e-5,
    );
    let want: Grads = backward(model, hf, &d, trainable);
    let got: Grads<GTensor> = backward(cm, gf, &d, trainable);
    let keys = |m: &dyn Fn() -> Vec<String>| m().into_iter().collect::<BTreeSet<_>>();
    assert_eq!(
        keys(&|| got.keys().cloned().collect()),
        keys(&|| want.keys().cloned().collect()),
        "{what}: the same parameters receive gradients"
    );
    assert!(!want.is_empty(), "{what}: something is trained");
    for (name, w) in &want {
        let gt = &got[name];
        assert_eq!([gt.rows, gt.cols], w.dims(), "{what}: {name} shape");
        check(
            &format!("{what}: {name}"),
            &g.download(gt).unwrap(),
            &host(w),
            1e-4,
        );
    }
}

#[test]
fn lora_step_matches_the_host_with_packing_and_gqa() {
    let Some(g) = gpu() else { return };
    let (mut model, _) = tiny("testdata/tiny-llama/model");
    model
        .attach_adapter(&PeftAdapter::load(&repo().join("testdata/tiny-llama/adapter")).unwrap())
        .unwrap();
    same_step("LoRA, packed", &model, &g, 48, true, &Trainable::lora());
    same_step("LoRA", &model, &g, 40, false, &Trainable::lora());
    let r8 = random_adapter(&model, 8, 3);
    model.attach_weights(&r8, 0.0).unwrap();
    same_step("LoRA r8, packed", &model, &g, 48, true, &Trainable::lora());
    // QLoRA: NF4 frozen weights with double quantisation, dequantised per use on the device.
    model.quantize_nf4(true);
    same_step("QLoRA r8, packed", &model, &g, 48, true, &Trainable::lora());
}

#[test]
fn sliding_window_biases_and_untied_heads_train_as_on_the_host() {
    let Some(g) = gpu() else { return };
    for dir in [
        "testdata/variants/mistral_sliding_window",
        "testdata/variants/qwen2_bias_untied",
        "testdata/variants/llama3_rope_bias_headdim",
    ] {
        let (mut model, _) = tiny(dir);
        let a = random_adapter(&model, 4, 9);
        model.attach_weights(&a, 0.0).unwrap();
        same_step(
            &format!("{dir} LoRA"),
            &model,
            &g,
            24,
            false,
            &Trainable::lora(),
        );
        let n = model.config.num_hidden_layers;
        same_step(
            &format!("{dir} last layer"),
            &model,
            &g,
            24,
            false,
            &Trainable::last_layers(1, n),
        );
    }
}

#[test]
fn full_fine_tuning_matches_the_host_with_a_tied_head() {
    let Some(g) = gpu() else { return };
    let (model, _) = tiny("testdata/tiny-llama/model");
    // Tied head: the embedding's gradient sums the head's and the input rows'.
    same_step("full, packed", &model, &g, 48, true, &Trainable::full());
}

#[test]
fn the_device_refuses_what_it_cannot_train_with_a_clear_error() {
    let Some(g) = gpu() else { return };
    let (model, _) = tiny("testdata/tiny-llama/model");
    let bf16 = CudaModel::from_host(&model, g.clone(), Dt::BF16).unwrap();
    bf16.can_train(false).unwrap();
    let e = bf16.can_train(true).unwrap_err().to_string();
    assert!(e.contains("f32") && e.contains("LoRA"), "{e}");
    // fp16 trains LoRA adapters (the trainer scales the loss), not the weights.
    let f16 = CudaModel::from_host(&model, g, Dt::F16).unwrap();
    f16.can_train(false).unwrap();
    let e = f16.can_train(true).unwrap_err().to_string();
    assert!(e.contains("f32") && e.contains("LoRA"), "{e}");
}

/// Cosine similarity of two vectors.
fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let n = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b)).max(1e-30)
}

#[test]
fn a_bf16_mixed_precision_step_stays_near_the_f32_step_with_f32_gradients() {
    let Some(g) = gpu() else { return };
    let (mut model, _) = tiny("testdata/tiny-llama/model");
    let a = random_adapter(&model, 8, 5);
    model.attach_weights(&a, 0.0).unwrap();
    let trainable = Trainable::lora();
    let f32m = CudaModel::from_host(&model, g.clone(), Dt::F32).unwrap();
    let bf16 = CudaModel::from_host(&model, g.clone(), Dt::BF16).unwrap();
    let (sb, d) = batch(model.config.vocab_size, 48, true);
    let (wf, gf) = (
        forward(&f32m, &sb, &trainable, &StepOptions::default()),
        forward(&bf16, &sb, &trainable, &StepOptions::default()),
    );
    let max = wf
        .target_logps
        .iter()
        .zip(&gf.target_logps)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    println!("bf16 vs f32 log p: max abs diff {max:.4}");
    assert!(max < 0.5, "bf16 log p off by {max}");
    let want: Grads<GTensor> = backward(&f32m, wf, &d, &trainable);
    let got: Grads<GTensor> = backward(&bf16, gf, &d, &trainable);
    let mut worst = 1f64;
    for (name, w) in &want {
        let gt = &got[name];
        assert_eq!(
            gt.dt,
            Dt::F32,
            "{name}: gradients are f32 in mixed precision"
        );
        let c = cosine(&g.download(gt).unwrap(), &g.download(w).unwrap());
        worst = worst.min(c);
    }
    println!("bf16 vs f32 LoRA gradients: lowest cosine similarity {worst:.5}");
    assert!(worst > 0.99, "{worst}");
    // The trained tensors are the f32 masters, and the adapter read back is theirs.
    let name = "model.layers.1.mlp.up_proj.lora_B";
    assert_eq!(bf16.param(name).unwrap().dt, Dt::F32);
    let back = bf16.lora_weights().unwrap();
    let want_b = &a.modules["model.layers.1.mlp.up_proj"].b.data;
    assert_eq!(&back.modules["model.layers.1.mlp.up_proj"].b.data, want_b);
}

#[test]
fn dropout_keeps_one_minus_p_of_the_values_scaled_and_repeats_for_a_seed() {
    let Some(g) = gpu() else { return };
    let x = rand([64, 129]);
    let gx = up(&g, &x);
    let p = 0.25f32;
    let y = g.download(&g.dropout(&gx, p, 7)).unwrap();
    let xs = host(&x);
    let mut kept = 0usize;
    for (a, b) in y.iter().zip(&xs) {
        if *a != 0.0 {
            kept += 1;
            assert!(
                (a - b / (1.0 - p)).abs() <= 1e-6 * b.abs().max(1.0),
                "{a} vs {b}"
            );
        }
    }
    let frac = kept as f64 / xs.len() as f64;
    println!("dropout p = {p}: kept {frac:.4}");
    assert!((frac - 0.75).abs() < 0.02, "kept {frac}");
    assert_eq!(
        g.download(&g.dropout(&gx, p, 7)).unwrap(),
        y,
        "same seed, same mask"
    );
    assert_ne!(
        g.download(&g.dropout(&gx, p, 8)).unwrap(),
        y,
        "another seed, another mask"
    );
}

/// The analytic gradients of `Σ d·log p` under dropout (seed 99) on the GPU against central
/// differences of step `eps`, for entries `idx` of each parameter of `names`.
fn dropout_gradients_agree_with_finite_differences(
    cm: &mut CudaModel,
    g: &std::sync::Arc<Gpu>,
    names: &[&str],
    idx: &[usize],
    eps: f32,
) {
    let (sb, d) = batch(cm.config.vocab_size, 24, true);
    let trainable = Trainable::lora();
    let seed = &StepOptions {
        dropout_seed: Some(99),
        ..Default::default()
    };
    let weighted = |lp: Vec<f32>| -> f64 {
        lp.iter()
            .zip(&d)
            .map(|(l, g)| f64::from(*l) * f64::from(*g))
            .sum()
    };
    let objective = |m: &CudaModel| weighted(forward(m, &sb, &trainable, seed).target_logps);
    let plain = weighted(forward(&*cm, &sb, &trainable, &StepOptions::default()).target_logps);
    assert!(
        (objective(cm) - plain).abs() > 1e-6,
        "dropout changes the objective"
    );
    let grads = backward(&*cm, forward(&*cm, &sb, &trainable, seed), &d, &trainable);
    for name in names {
        let analytic = g.download(&grads[*name]).unwrap();
        let p0 = cm.host_params(&[name.to_string()]).unwrap().remove(0).1;
        for &i in idx {
            let mut shifted = |delta: f32| {
                let mut v = host(&p0);
                v[i] += delta;
                let t =
                    Tensor::from_data(burn::tensor::TensorData::new(v, p0.dims()), &Device::flex());
                cm.set_params(vec![(name.to_string(), t)]).unwrap();
                objective(cm)
            };
            let numeric = (shifted(eps) - shifted(-eps)) / (2.0 * f64::from(eps));
            let an = f64::from(analytic[i]);
            println!("{name}[{i}]: analytic {an:.6} numeric {numeric:.6}");
            assert!(
                (an - numeric).abs() <= 2e-2 * an.abs().max(0.05),
                "{name}[{i}]: {an} vs {numeric}"
            );
        }
        cm.set_params(vec![(name.to_string(), p0)]).unwrap();
    }
}

#[test]
fn lora_dropout_gradients_on_the_gpu_agree_with_finite_differences() {
    let Some(g) = gpu() else { return };
    let (mut model, _) = tiny("testdata/tiny-llama/model");
    let a = random_adapter(&model, 4, 21);
    model.attach_weights(&a, 0.1).unwrap();
    let mut cm = CudaModel::from_host(&model, g.clone(), Dt::F32).unwrap();
    assert!((cm.lora_dropout() - 0.1).abs() < 1e-6);
    let name = "model.layers.0.self_attn.k_proj.lora_A";
    dropout_gradients_agree_with_finite_differences(&mut cm, &g, &[name], &[0, 7, 33, 101], 1e-3);
}

/// DoRA on the GPU: PEFT's initial magnitudes (the norms of `W + s·B·A`, computed on the
/// device) equal the host's; a step's gradients (magnitudes included) equal the host's; with
/// dropout, they agree with finite differences.
#[test]
fn dora_steps_on_the_gpu_match_the_host_and_agree_with_finite_differences() {
    use fedtune_engine::train::lora::init_dora;
    let Some(g) = gpu() else { return };
    let (mut model, _) = tiny("testdata/tiny-llama/model");
    let mut adapter = random_adapter(&model, 4, 31);
    let mut on_host = adapter.clone();
    init_dora(&model, &mut on_host);
    CudaModel::from_host(&model, g.clone(), Dt::F32)
        .unwrap()
        .init_dora(&mut adapter)
        .unwrap();
    assert_eq!(
        adapter.dense.len(),
        14,
        "one magnitude per adapted projection"
    );
    for (k, want) in &on_host.dense {
        check(
            &format!("initial {k}"),
            &adapter.dense[k].data,
            &want.data,
            1e-5,
        );
    }
    // Magnitudes away from the norms, so that m/‖·‖ is not 1.
    for v in adapter.dense.values_mut() {
        for (i, x) in v.data.iter_mut().enumerate() {
            *x *= 1.0 + 0.1 * ((i % 5) as f32 - 2.0);
        }
    }
    model.attach_weights(&adapter, 0.0).unwrap();
    same_step("DoRA, packed", &model, &g, 48, true, &Trainable::lora());
    // The GPU model writes the magnitudes it trains, and its inference forward (eval,
    // generation) gives the host's logits.
    let cm = CudaModel::from_host(&model, g.clone(), Dt::F32).unwrap();
    let back = cm.lora_weights().unwrap();
    assert_eq!(back.dense, adapter.dense);
    {
        use fedtune_engine::device::{Backend, forward as infer};
        let vocab = model.config.vocab_size as u32;
        let ids: Vec<u32> = (0..20u32).map(|i| (i * 37 + 5) % vocab).collect();
        let at = Positions::Range {
            start: 0,
            len: 20,
            batch: 1,
        };
        let rows: Vec<usize> = (0..20).collect();
        let want = model.row_logits(&infer(&model, &ids, 1, 20, &at, None, None), &rows);
        let got = cm.row_logits(&infer(&cm, &ids, 1, 20, &at, None, None), &rows);
        check("DoRA logits", &got, &want, 1e-5);
    }
    // The dropout path's algebra (x·Wᵀ − x̃·Wᵀ + c⊙p forward; the masked (c − 1)⊙dy·W term
    // backward): with a drop probability of 1e-9 every value is kept, and the step is the
    // host's step without dropout.
    let mut keep_all = CudaModel::from_host(&model, g.clone(), Dt::F32).unwrap();
    keep_all.set_lora_dropout(1e-9);
    let seeded = StepOptions {
        dropout_seed: Some(5),
        ..Default::default()
    };
    let lora = Trainable::lora();
    same_step_on(
        "DoRA, dropout path",
        &model,
        &keep_all,
        &g,
        48,
        true,
        &lora,
        &seeded,
    );
    // Real dropout: the GPU's masks are its own; the magnitudes' gradients follow its
    // objective (the factors' do not: PEFT's norm is a constant in backward, not in the
    // objective's finite differences).
    model.attach_weights(&adapter, 0.1).unwrap();
    let mut cm = CudaModel::from_host(&model, g.clone(), Dt::F32).unwrap();
    let names = [
        "model.layers.0.self_attn.q_proj.lora_magnitude_vector",
        "model.layers.1.mlp.up_proj.lora_magnitude_vector",
    ];
    // (Magnitudes are row norms, of order 1: a wider step keeps f32 rounding out.)
    dropout_gradients_agree_with_finite_differences(&mut cm, &g, &names, &[0, 7, 33], 1e-2);
    // A magnitude of the wrong length, or for a module without factors, is refused.
    let mut bad = adapter.clone();
    let key = fedtune_peft::magnitude_key("model.layers.0.self_attn.q_proj");
    bad.dense.insert(key, Matrix::new(1, 3, vec![1.0; 3]));
    let e = cm.attach_weights(&bad).unwrap_err().to_string();
    assert!(e.contains("DoRA magnitude has 3 values"), "{e}");
}

#[test]
fn scatter_rows_sums_repeated_rows_in_order_and_zeroes_the_rest() {
    let Some(g) = gpu() else { return };
    let src = rand([7, 33]);
    let dest = [4usize, 0, 4, 2, 4, 0, 6];
    let scale = [0.5f32, -1.0, 2.0, 1.0, 0.25, 3.0, -2.0];
    let got = g
        .scatter_rows(&up(&g, &src), Some(&scale), &dest, 9)
        .unwrap();
    let s = host(&src);
    let mut want = vec![0f32; 9 * 33];
    for (i, (&r, &c)) in dest.iter().zip(&scale).enumerate() {
        for j in 0..33 {
            want[r * 33 + j] += c * s[i * 33 + j];
        }
    }
    check("scatter_rows", &g.download(&got).unwrap(), &want, 1e-6);
    assert!(g.scatter_rows(&up(&g, &src), None, &dest, 5).is_err());
    let mut y = up(&g, &src);
    let y0 = y.clone();
    g.add_assign(&mut y, &y0);
    let doubled: Vec<f32> = s.iter().map(|v| 2.0 * v).collect();
    check("add_assign", &g.download(&y).unwrap(), &doubled, 0.0);
    check(
        "add_assign leaves a shared operand",
        &g.download(&y0).unwrap(),
        &s,
        0.0,
    );
}
#[test]
fn adamw_with_clipping_on_the_device_matches_the_host_optimiser() {
    use fedtune_engine::cuda::optim::DeviceParam;
    use fedtune_engine::train::optim::{AdamW, AdamWConfig, clip_grad_norm};
    use std::collections::BTreeMap;
    let Some(g) = gpu() else { return };
    let config = AdamWConfig {
        weight_decay: 0.01,
        ..AdamWConfig::default()
    };
    // Three tensors, one longer than a partial sum (4096), one exempt from decay.
    let shapes = [([64, 80], true), ([3, 7], false), ([16, 33], true)];
    let mut host_p: Vec<Tensor<2>> = shapes.iter().map(|(s, _)| rand(*s)).collect();
    let dev_p: Vec<GTensor> = host_p.iter().map(|p| up(&g, p)).collect();
    let zeros = |t: &GTensor| g.zeros(t.rows, t.cols, Dt::F32);
    let dev_m: Vec<GTensor> = dev_p.iter().map(zeros).collect();
    let dev_v: Vec<GTensor> = dev_p.iter().map(zeros).collect();
    let mut opt = AdamW::new(config);
    // Step 1 without clipping (max 100), steps 2-3 clipped (max 0.5), step 4 clipped with
    // gradients that come scaled by an fp16 loss scale of 2^12 (the step divides it out).
    for (step, max, loss_scale) in [
        (1u64, 100.0, None),
        (2, 0.5, None),
        (3, 0.5, None),
        (4, 0.5, Some(4096f32)),
    ] {
        let grads: Vec<Tensor<2>> = shapes.iter().map(|(s, _)| rand(*s) * 0.3).collect();
        let dev_g: Vec<GTensor> = grads
            .iter()
            .map(|t| up(&g, &(t.clone() * loss_scale.unwrap_or(1.0))))
            .collect();
        let mut map: BTreeMap<String, Tensor<2>> = grads
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("t{i}"), t.clone()))
            .collect();
        let want_norm = clip_grad_norm(&mut map, max);
        opt.begin_step();
        let lr = 1e-3 * step as f64;
        for (i, p) in host_p.iter_mut().enumerate() {
            let gi = map[&format!("t{i}")].clone();
            *p = opt.update(&format!("t{i}"), p.clone(), gi, lr, shapes[i].1);
        }
        let params: Vec<DeviceParam<'_>> = (0..shapes.len())
            .map(|i| DeviceParam {
                p: &dev_p[i],
                g: &dev_g[i],
                m: &dev_m[i],
                v: &dev_v[i],
                decay: shapes[i].1,
            })
            .collect();
        let norm = g
            .adamw_step(&params, config, lr, step, max, loss_scale)
            .unwrap();
        assert!(
            ((norm - want_norm) / want_norm).abs() < 1e-6,
            "step {step}: norm {norm} vs {want_norm}"
        );
        for (i, p) in host_p.iter().enumerate() {
            let (got, want) = (g.download(&dev_p[i]).unwrap(), host(p));
            let same = got == want;
            println!("adamw step {step} tensor {i}: bit-identical to the host: {same}");
            check(&format!("adamw step {step} tensor {i}"), &got, &want, 1e-6);
        }
    }
    // An overflowed fp16 step (an infinite gradient under loss scaling) changes nothing.
    let before: Vec<Vec<f32>> = dev_p.iter().map(|t| g.download(t).unwrap()).collect();
    let moments: Vec<Vec<f32>> = dev_m.iter().map(|t| g.download(t).unwrap()).collect();
    let mut bad = host(&rand(shapes[0].0));
    bad[7] = f32::INFINITY;
    let dev_g: Vec<GTensor> = std::iter::once(g.upload(&bad, 64, 80, Dt::F32).unwrap())
        .chain(shapes[1..].iter().map(|(s, _)| up(&g, &rand(*s))))
        .collect();
    let params: Vec<DeviceParam<'_>> = (0..shapes.len())
        .map(|i| DeviceParam {
            p: &dev_p[i],
            g: &dev_g[i],
            m: &dev_m[i],
            v: &dev_v[i],
            decay: shapes[i].1,
        })
        .collect();
    let norm = g
        .adamw_step(&params, config, 1e-3, 5, 0.5, Some(65536.0))
        .unwrap();
    assert!(!norm.is_finite(), "norm {norm}");
    for i in 0..shapes.len() {
        assert_eq!(g.download(&dev_p[i]).unwrap(), before[i], "parameter {i}");
        assert_eq!(g.download(&dev_m[i]).unwrap(), moments[i], "moment {i}");
    }
}

/// Gradient checkpointing on the GPU, in f32 and bf16, LoRA dropout on: forward keeps only each
/// block's input, and backward's recomputed blocks (same dropout masks) give the plain pass's
/// gradients.
#[test]
fn gradient_checkpointing_on_the_gpu_gives_the_plain_gradients() {
    let Some(g) = gpu() else { return };
    let (mut model, _) = tiny("testdata/tiny-llama/model");
    let a = random_adapter(&model, 8, 5);
    model.attach_weights(&a, 0.1).unwrap();
    let layers = model.config.num_hidden_layers;
    let (sb, d) = batch(model.config.vocab_size, 40, true);
    for dt in [Dt::F32, Dt::BF16] {
        let cm = CudaModel::from_host(&model, g.clone(), dt).unwrap();
        for trainable in [Trainable::lora(), Trainable::last_layers(1, layers)] {
            let plain = StepOptions {
                dropout_seed: Some(3),
                ..StepOptions::default()
            };
            let ckpt = StepOptions {
                gradient_checkpointing: true,
                ..plain
            };
            if dt == Dt::BF16 && trainable.trains_weights() {
                continue;
            }
            let f0 = forward(&cm, &sb, &trainable, &plain);
            let f1 = forward(&cm, &sb, &trainable, &ckpt);
            assert_eq!(f1.kept_layers().1, 0, "{dt:?} {trainable:?}");
            assert_eq!(f1.kept_layers().0, f0.kept_layers().1);
            let what = format!("checkpointing, {dt:?}, {trainable:?}");
            check(
                &format!("{what}: log p"),
                &f1.target_logps,
                &f0.target_logps,
                1e-6,
            );
            let g0: Grads<GTensor> = backward(&cm, f0, &d, &trainable);
            let g1: Grads<GTensor> = backward(&cm, f1, &d, &trainable);
            assert_eq!(g0.keys().collect::<Vec<_>>(), g1.keys().collect::<Vec<_>>());
            for (name, want) in &g0 {
                let (got, want) = (g.download(&g1[name]).unwrap(), g.download(want).unwrap());
                check(&format!("{what}: {name}"), &got, &want, 1e-5);
            }
        }
    }
}
