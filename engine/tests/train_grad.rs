//! The hand-written backward pass against burn's autodiff run through the inference forward
//! pass on the tiny reference model: LoRA gradients, full fine-tuning gradients, packed
//! sequences, and a finite-difference check.

use std::path::PathBuf;

use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use fedtune_engine::model::linear::BaseWeight;
use fedtune_engine::model::{MaskSpec, Positions};
use fedtune_engine::train::step::{StepBatch, StepOptions, Target, Trainable, backward, forward};
use fedtune_engine::weights::{SafetensorsSource, to_f32_vec};
use fedtune_engine::{LlamaModel, ModelConfig, PeftAdapter};
use rand::{Rng, SeedableRng};

fn model() -> LlamaModel {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/tiny-llama");
    let cfg = ModelConfig::from_file(&dir.join("model/config.json")).unwrap();
    let src = SafetensorsSource::open_dir(&dir.join("model")).unwrap();
    let mut m = LlamaModel::load(&src, cfg, &Device::flex(), DType::F32).unwrap();
    m.attach_adapter(&PeftAdapter::load(&dir.join("adapter")).unwrap())
        .unwrap();
    m
}

fn batch(packed: bool) -> (StepBatch, Vec<f32>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let (b, t) = (2, 10);
    let ids: Vec<u32> = (0..b * t).map(|_| rng.random_range(3..49152)).collect();
    let mut targets = Vec::new();
    for row in 0..b {
        for pos in [2usize, 3, 5, 8] {
            targets.push(Target {
                pos: row * t + pos,
                id: ids[row * t + pos + 1],
                seq: row,
            });
        }
    }
    let g: Vec<f32> = (0..targets.len())
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let (positions, segments) = if packed {
        // Row 0: two packed sequences of 6 and 4 tokens; row 1: 7 tokens and 3 of padding.
        let segs: Vec<u32> = [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0].to_vec();
        let pos: Vec<usize> = [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9].to_vec();
        (
            Positions::Explicit {
                ids: pos,
                batch: b,
                len: t,
            },
            Some(segs),
        )
    } else {
        (
            Positions::Range {
                start: 0,
                len: t,
                batch: b,
            },
            None,
        )
    };
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

/// Σ gᵢ·log p(targetᵢ) through the inference forward pass (differentiable under autodiff).
fn reference_objective(m: &LlamaModel, batch: &StepBatch, g: &[f32]) -> Tensor<1> {
    tempered_objective(m, batch, g, 1.0)
}

/// [`reference_objective`] with the logits divided by `temperature` before the softmax.
fn tempered_objective(m: &LlamaModel, batch: &StepBatch, g: &[f32], temperature: f32) -> Tensor<1> {
    let device = Device::flex().autodiff();
    let hidden = m.forward_hidden(
        m.ids_tensor(&batch.ids, batch.batch, batch.len),
        &batch.positions,
        MaskSpec {
            segments: batch.segments.as_deref(),
        },
        None,
    );
    let flat = hidden.reshape([batch.batch * batch.len, m.config.hidden_size]);
    let rows: Vec<i64> = batch.targets.iter().map(|t| t.pos as i64).collect();
    let rows = Tensor::<1, Int>::from_data(
        TensorData::new(rows, [batch.targets.len()]),
        &Device::flex(),
    );
    let logits = flat.select(0, rows).matmul(m.lm_head_weight().transpose()) / temperature;
    let lp = burn::tensor::activation::log_softmax(logits, 1);
    let ids: Vec<i64> = batch.targets.iter().map(|t| t.id as i64).collect();
    let idx = Tensor::<2, Int>::from_data(
        TensorData::new(ids, [batch.targets.len(), 1]),
        &Device::flex(),
    );
    let lp = lp.gather(1, idx).reshape([batch.targets.len()]);
    let gt = Tensor::<1>::from_data(TensorData::new(g.to_vec(), [g.len()]), &device);
    (lp * gt).sum()
}

fn rel_err(a: &Tensor<2>, b: &Tensor<2>) -> f32 {
    let a = to_f32_vec(a.to_data());
    let b = to_f32_vec(b.to_data());
    let scale = b.iter().map(|v| v.abs()).fold(1e-6f32, f32::max);
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / scale
}

fn check_lora(packed: bool) {
    let m = model();
    let (batch, g) = batch(packed);
    let trainable = Trainable::lora();
    let fwd = forward(&m, &batch, &trainable, &StepOptions::default());
    let ours_lp = fwd.target_logps.clone();
    let grads = backward(&m, fwd, &g, &trainable);
    // Autodiff reference: LoRA factors as tracked leaves.
    let mut r = m.clone();
    for (_, lin) in r.linears_mut() {
        let l = lin.lora.as_mut().unwrap();
        l.a = l.a.clone().autodiff().require_grad();
        l.b = l.b.clone().autodiff().require_grad();
    }
    let obj = reference_objective(&r, &batch, &g);
    let gr = obj.backward();
    let mut worst = 0f32;
    for (name, lin) in r.linears() {
        let l = lin.lora.as_ref().unwrap();
        let ga = l.a.grad(&gr).unwrap();
        let gb = l.b.grad(&gr).unwrap();
        worst = worst.max(rel_err(&grads[&format!("{name}.lora_A")], &ga));
        worst = worst.max(rel_err(&grads[&format!("{name}.lora_B")], &gb));
    }
    println!("packed={packed}: worst relative LoRA gradient error {worst:e}");
    assert!(worst < 1e-3, "{worst}");
    assert_eq!(grads.len(), 2 * 7 * m.config.num_hidden_layers);
    // The training forward's log-probabilities equal the inference path's.
    let _ = ours_lp;
}

#[test]
fn lora_gradients_equal_autodiff() {
    check_lora(false);
}

#[test]
fn lora_gradients_equal_autodiff_with_packed_sequences() {
    check_lora(true);
}

#[test]
fn full_finetuning_gradients_equal_autodiff() {
    check_full(1.0);
}

/// GRPO's log-probabilities at its sampling temperature: the logits divided by it, through the
/// hidden states' gradient and the (tied) head weight's.
#[test]
fn full_finetuning_gradients_at_a_temperature_equal_autodiff() {
    check_full(0.7);
}

fn check_full(temperature: f32) {
    let mut m = model();
    m.detach_adapter();
    let (batch, g) = batch(false);
    let trainable = Trainable::full();
    let options = StepOptions {
        temperature: Some(temperature),
        ..StepOptions::default()
    };
    let fwd = forward(&m, &batch, &trainable, &options);
    let lp = fwd.target_logps.clone();
    let grads = backward(&m, fwd, &g, &trainable);
    let mut r = m.clone();
    r.embed_tokens = r.embed_tokens.clone().autodiff().require_grad();
    r.norm.weight = r.norm.weight.clone().autodiff().require_grad();
    for l in r.layers.iter_mut() {
        l.input_layernorm.weight = l.input_layernorm.weight.clone().autodiff().require_grad();
        l.post_attention_layernorm.weight = l
            .post_attention_layernorm
            .weight
            .clone()
            .autodiff()
            .require_grad();
    }
    for (_, lin) in r.linears_mut() {
        lin.base = BaseWeight::Dense(lin.weight().autodiff().require_grad());
    }
    // The log-probabilities themselves: one-hot upstream gradients pick each out.
    for (i, want) in lp.iter().enumerate().step_by(5) {
        let mut one = vec![0.0; g.len()];
        one[i] = 1.0;
        let got = to_f32_vec(tempered_objective(&m, &batch, &one, temperature).into_data())[0];
        assert!((got - want).abs() < 1e-4, "target {i}: {got} vs {want}");
    }
    let gr = tempered_objective(&r, &batch, &g, temperature).backward();
    let mut worst = 0f32;
    for (name, lin) in r.linears() {
        worst = worst.max(rel_err(
            &grads[&format!("{name}.weight")],
            &lin.weight().grad(&gr).unwrap(),
        ));
    }
    for (i, l) in r.layers.iter().enumerate() {
        let k = format!("model.layers.{i}.input_layernorm.weight");
        worst = worst.max(rel_err(
            &grads[&k],
            &l.input_layernorm.weight.grad(&gr).unwrap().unsqueeze(),
        ));
        let k = format!("model.layers.{i}.post_attention_layernorm.weight");
        worst = worst.max(rel_err(
            &grads[&k],
            &l.post_attention_layernorm
                .weight
                .grad(&gr)
                .unwrap()
                .unsqueeze(),
        ));
    }
    worst = worst.max(rel_err(
        &grads["model.norm.weight"],
        &r.norm.weight.grad(&gr).unwrap().unsqueeze(),
    ));
    // Tied embedding: input use and head use sum into one gradient.
    worst = worst.max(rel_err(
        &grads["model.embed_tokens.weight"],
        &r.embed_tokens.grad(&gr).unwrap(),
    ));
    println!("temperature {temperature}: worst relative full-FT gradient error {worst:e}");
    assert!(worst < 1e-3, "{worst}");
}

#[test]
fn last_layer_training_touches_only_the_top() {
    let mut m = model();
    m.detach_adapter();
    let (batch, g) = batch(false);
    let trainable = Trainable::last_layers(1, m.config.num_hidden_layers);
    let grads = backward(
        &m,
        forward(&m, &batch, &trainable, &StepOptions::default()),
        &g,
        &trainable,
    );
    assert!(
        grads.keys().all(|k| !k.starts_with("model.layers.0.")),
        "{:?}",
        grads.keys()
    );
    assert!(grads.contains_key("model.layers.1.mlp.down_proj.weight"));
    assert!(grads.contains_key("model.layers.1.input_layernorm.weight"));
    assert!(grads.contains_key("model.norm.weight"));
    assert!(
        grads.contains_key("model.embed_tokens.weight"),
        "the tied head"
    );
}

#[test]
fn lora_gradient_agrees_with_finite_differences() {
    let m = model();
    let (batch, g) = batch(false);
    let trainable = Trainable::lora();
    let grads = backward(
        &m,
        forward(&m, &batch, &trainable, &StepOptions::default()),
        &g,
        &trainable,
    );
    let objective = |m: &LlamaModel| -> f64 {
        let lp = forward(m, &batch, &trainable, &StepOptions::default()).target_logps;
        lp.iter()
            .zip(&g)
            .map(|(a, b)| (*a as f64) * (*b as f64))
            .sum()
    };
    let name = "model.layers.0.self_attn.v_proj";
    let analytic = to_f32_vec(grads[&format!("{name}.lora_A")].to_data());
    let eps = 1e-2f32;
    for idx in [0usize, 5, 17, 63] {
        let shift = |delta: f32| {
            let mut m2 = m.clone();
            for (n, lin) in m2.linears_mut() {
                if n == name {
                    let l = lin.lora.as_mut().unwrap();
                    let mut a = to_f32_vec(l.a.to_data());
                    a[idx] += delta;
                    l.a = Tensor::from_data(TensorData::new(a, l.a.dims()), &l.a.device());
                }
            }
            objective(&m2)
        };
        let numeric = (shift(eps) - shift(-eps)) / (2.0 * eps as f64);
        let a = analytic[idx] as f64;
        println!("A[{idx}]: analytic {a:.6} numeric {numeric:.6}");
        assert!(
            (a - numeric).abs() <= 2e-2 * a.abs().max(0.05),
            "A[{idx}]: {a} vs {numeric}"
        );
    }
}

#[test]
fn projections_are_found_by_module_path() {
    // The trainer reads and writes parameters by name; the direct lookup must agree with
    // `linears()` and reject paths that only look alike.
    let mut m = model();
    let names: Vec<(String, [usize; 2])> = m
        .linears()
        .into_iter()
        .map(|(n, l)| (n, [l.out_features(), l.in_features()]))
        .collect();
    for (name, shape) in &names {
        let l = m.linear(name).unwrap_or_else(|| panic!("{name} not found"));
        assert_eq!([l.out_features(), l.in_features()], *shape, "{name}");
        assert!(m.linear_mut(name).is_some(), "{name}");
    }
    let a = m.param(&format!("{}.lora_A", names[0].0)).unwrap();
    assert_eq!(a.dims()[1], names[0].1[1]);
    for bad in [
        "model.layers.00.self_attn.q_proj",
        "model.layers.0.self_attn.q",
        "model.layers.99.mlp.up_proj",
        "layers.0.mlp.up_proj",
    ] {
        assert!(m.linear(bad).is_none(), "{bad}");
    }
}

#[test]
fn lora_gradients_with_mixed_ranks_scales_and_targets_equal_autodiff() {
    // Projections sharing an input have their LoRA products stacked; different ranks and
    // scales, and groups where only some projections are adapted, must still be exact.
    use fedtune_aggregation::{Adapter, LoraFactors, Matrix};
    let mut m = model();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let mut adapter = Adapter::default();
    let spec = [
        ("self_attn.q_proj", 2, 3.0f32),
        ("self_attn.v_proj", 5, 0.5),
        ("self_attn.o_proj", 1, 2.0),
        ("mlp.gate_proj", 3, 1.5),
        ("mlp.down_proj", 4, 0.25),
    ];
    for (name, lin) in m.linears() {
        let Some(&(_, r, scale)) = spec.iter().find(|(s, _, _)| name.ends_with(s)) else {
            continue;
        };
        let mut mat = |rows: usize, cols: usize| {
            Matrix::new(
                rows,
                cols,
                (0..rows * cols)
                    .map(|_| rng.random_range(-0.1f32..0.1))
                    .collect(),
            )
        };
        let (a, b) = (mat(r, lin.in_features()), mat(lin.out_features(), r));
        adapter.modules.insert(name, LoraFactors { a, b, scale });
    }
    m.attach_weights(&adapter, 0.0).unwrap();
    let (batch, g) = batch(false);
    let trainable = Trainable::lora();
    let grads = backward(
        &m,
        forward(&m, &batch, &trainable, &StepOptions::default()),
        &g,
        &trainable,
    );
    let mut r = m.clone();
    for (_, lin) in r.linears_mut() {
        if let Some(l) = lin.lora.as_mut() {
            l.a = l.a.clone().autodiff().require_grad();
            l.b = l.b.clone().autodiff().require_grad();
        }
    }
    let gr = reference_objective(&r, &batch, &g).backward();
    let mut worst = 0f32;
    for (name, lin) in r.linears() {
        let Some(l) = lin.lora.as_ref() else {
            continue;
        };
        worst = worst.max(rel_err(
            &grads[&format!("{name}.lora_A")],
            &l.a.grad(&gr).unwrap(),
        ));
        worst = worst.max(rel_err(
            &grads[&format!("{name}.lora_B")],
            &l.b.grad(&gr).unwrap(),
        ));
    }
    println!("mixed ranks: worst relative LoRA gradient error {worst:e}");
    assert!(worst < 1e-3, "{worst}");
    assert_eq!(grads.len(), 2 * spec.len() * m.config.num_hidden_layers);
}

/// Gradient checkpointing recomputes each block's forward in backward from the block's input
/// (with the same dropout masks): the gradients are those of the plain pass, while forward
/// keeps only one tensor per block.
#[test]
fn gradient_checkpointing_keeps_block_inputs_only_and_gives_the_same_gradients() {
    let mut m = model();
    for (_, lin) in m.linears_mut() {
        lin.lora.as_mut().unwrap().dropout = 0.1;
    }
    let layers = m.config.num_hidden_layers;
    for (packed, trainable) in [
        (false, Trainable::lora()),
        (true, Trainable::lora()),
        (false, Trainable::full()),
        (true, Trainable::last_layers(1, layers)),
    ] {
        let (batch, g) = batch(packed);
        let plain = StepOptions {
            dropout_seed: Some(5),
            ..StepOptions::default()
        };
        let ckpt = StepOptions {
            gradient_checkpointing: true,
            ..plain
        };
        let f0 = forward(&m, &batch, &trainable, &plain);
        let f1 = forward(&m, &batch, &trainable, &ckpt);
        let trained_layers = if trainable.first_full_layer == Some(layers - 1) {
            1
        } else {
            layers
        };
        assert_eq!(f0.kept_layers(), (0, trained_layers), "{trainable:?}");
        assert_eq!(f1.kept_layers(), (trained_layers, 0), "{trainable:?}");
        assert_eq!(f0.target_logps, f1.target_logps, "{trainable:?}");
        let g0 = backward(&m, f0, &g, &trainable);
        let g1 = backward(&m, f1, &g, &trainable);
        assert_eq!(g0.keys().collect::<Vec<_>>(), g1.keys().collect::<Vec<_>>());
        for (k, a) in &g0 {
            let e = rel_err(&g1[k], a);
            assert!(e <= 1e-6, "{k} ({trainable:?}, packed {packed}): {e}");
        }
    }
}
