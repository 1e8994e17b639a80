//! Fresh LoRA adapters as PEFT initialises them (`init_lora_weights=True`): `A` from
//! `kaiming_uniform_(a=√5)`, i.e. `U(−1/√in, 1/√in)`, and `B = 0`, so that the adapted model
//! starts exactly at the base model. Seeded, so every run and every client starting from the
//! same seed gets the same `A` (FFA-LoRA relies on this).

use fedtune_aggregation::{Adapter, LoraFactors, Matrix};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::config::TrainConfig;
use crate::adapter::{LoraConfig, PeftAdapter};
use crate::config::ModelConfig;
use crate::model::LlamaModel;

/// A fresh adapter for every targeted projection of `model` (with DoRA's magnitudes when
/// `cfg.use_dora`).
pub fn init_adapter(model: &LlamaModel, cfg: &TrainConfig) -> Adapter {
    let mut out = init_adapter_for(&model.config, cfg);
    if cfg.use_dora {
        init_dora(model, &mut out);
    }
    out
}

/// Adds DoRA's magnitude vectors to `adapter` as PEFT initialises them: each projection's
/// `‖W + s·B·A‖` per output row (`‖W‖` for a fresh adapter, whose `B` is zero), `W`
/// dequantised when it is NF4.
pub fn init_dora(model: &LlamaModel, adapter: &mut Adapter) {
    for (name, f) in &adapter.modules {
        let Some(lin) = model.linear(name) else {
            continue;
        };
        let w = lin.weight();
        let [out, inp] = w.dims();
        let w = crate::weights::to_f32_vec(w.to_data());
        let ba = f.b.matmul(&f.a);
        let norms: Vec<f32> = (0..out)
            .map(|o| {
                (0..inp)
                    .map(|i| {
                        let v = (w[o * inp + i] + f.scale * ba.data[o * inp + i]) as f64;
                        v * v
                    })
                    .sum::<f64>()
                    .sqrt() as f32
            })
            .collect();
        adapter.dense.insert(
            fedtune_peft::magnitude_key(name),
            Matrix::new(1, out, norms),
        );
    }
}

/// [`init_adapter`] from the model's configuration alone (the same factors), for a model
/// that lives on a GPU and was never held on the host.
pub fn init_adapter_for(config: &ModelConfig, cfg: &TrainConfig) -> Adapter {
    let lc = lora_config(cfg, None);
    let mut out = Adapter::default();
    for (i, (name, o, inp)) in config.projections().into_iter().enumerate() {
        if !lc.targets(&name) {
            continue;
        }
        let r = lc.rank_for(&name);
        let bound = 1.0 / (inp as f32).sqrt();
        let mut rng =
            ChaCha8Rng::seed_from_u64(cfg.seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let a = Matrix::new(
            r,
            inp,
            (0..r * inp)
                .map(|_| rng.random_range(-bound..bound))
                .collect(),
        );
        out.modules.insert(
            name.clone(),
            LoraFactors {
                a,
                b: Matrix::zeros(o, r),
                scale: lc.scale_for(&name, r) as f32,
            },
        );
    }
    out
}

/// The PEFT config of a run.
pub fn lora_config(cfg: &TrainConfig, base: Option<String>) -> LoraConfig {
    LoraConfig {
        r: cfg.lora_r,
        lora_alpha: cfg.lora_alpha,
        lora_dropout: cfg.lora_dropout,
        target_modules: cfg.target_modules.clone(),
        use_rslora: cfg.use_rslora,
        base_model_name_or_path: base,
        rank_pattern: Default::default(),
        alpha_pattern: Default::default(),
        use_dora: cfg.use_dora,
    }
}

/// The model's current adapter in PEFT form, recording a quantised base when there is one.
pub fn to_peft(model: &LlamaModel, cfg: &TrainConfig, base: Option<String>) -> PeftAdapter {
    peft_adapter(model.lora_weights(), cfg, base)
}

/// [`to_peft`] from the factors themselves (a model trained on a GPU downloads them).
pub fn peft_adapter(weights: Adapter, cfg: &TrainConfig, base: Option<String>) -> PeftAdapter {
    let mut metadata = serde_json::Map::new();
    if cfg.load_in_4bit {
        metadata.insert(
            "quantization".into(),
            serde_json::json!({
                "load_in_4bit": true,
                "bnb_4bit_quant_type": "nf4",
                "bnb_4bit_use_double_quant": cfg.bnb_4bit_use_double_quant,
                "blocksize": crate::nf4::BLOCK,
            }),
        );
    }
    let mut config = lora_config(cfg, base);
    // An adapter trained from a DoRA adapter is one, whatever the flags said.
    config.use_dora |= fedtune_peft::is_dora(&weights);
    PeftAdapter {
        config,
        weights,
        metadata,
    }
}

/// `template` (a PEFT adapter: configuration, scales, metadata) with the LoRA factors of
/// `params` (trained parameters by name, `{module}.lora_A` / `.lora_B`, as checkpoints hold
/// them): what a checkpoint's loadable adapter is.
pub fn with_factors(
    template: &PeftAdapter,
    params: &[(String, burn::tensor::Tensor<2>)],
) -> crate::error::Result<PeftAdapter> {
    let by_name: std::collections::BTreeMap<&str, &burn::tensor::Tensor<2>> =
        params.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut out = template.clone();
    for (module, f) in out.weights.modules.iter_mut() {
        for (suffix, m) in [("lora_A", &mut f.a), ("lora_B", &mut f.b)] {
            let name = format!("{module}.{suffix}");
            let t = by_name.get(name.as_str()).ok_or_else(|| {
                crate::error::Error::Invalid(format!("no trained parameter `{name}`"))
            })?;
            let [r, c] = t.dims();
            *m = fedtune_aggregation::Matrix::new(r, c, crate::weights::to_f32_vec(t.to_data()));
        }
    }
    // DoRA's magnitudes.
    for (key, mag) in out.weights.dense.iter_mut() {
        let Some(module) = fedtune_peft::parse_magnitude_key(key) else {
            continue;
        };
        let name = format!("{module}.lora_magnitude_vector");
        let t = by_name.get(name.as_str()).ok_or_else(|| {
            crate::error::Error::Invalid(format!("no trained parameter `{name}`"))
        })?;
        let [r, c] = t.dims();
        *mag = fedtune_aggregation::Matrix::new(r, c, crate::weights::to_f32_vec(t.to_data()));
    }
    // A reward model's score head, trained in full.
    if let Some(score) = out.weights.dense.get_mut(crate::adapter::SCORE_KEY) {
        let t = by_name.get("score.weight").ok_or_else(|| {
            crate::error::Error::Invalid("no trained parameter `score.weight`".into())
        })?;
        let [r, c] = t.dims();
        *score = fedtune_aggregation::Matrix::new(r, c, crate::weights::to_f32_vec(t.to_data()));
    }
    Ok(out)
}
