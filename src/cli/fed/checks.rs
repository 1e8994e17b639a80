//! The checks of `coord.toml` and `client.toml` that need no other file, and a client's local
//! data loaded as its TOML file names it.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::Context;
use fedtune_client::trainer::{LocalData, LocalTraining};
use fedtune_engine::data::{Dataset, LoadOptions};
use fedtune_protocol::Phase;

use super::{ClientFile, CoordFile};

/// The checks of `coord.toml` (`file`) that need no other file: unique client names and keys,
/// positive counts, each stage's GRPO and distillation settings.
pub(super) fn check_coord_file(f: &CoordFile, file: &str) -> anyhow::Result<()> {
    let mut names = BTreeSet::new();
    let mut keys = BTreeSet::new();
    for c in &f.clients {
        anyhow::ensure!(
            names.insert(c.name.as_str()),
            "{file}: clients: the name `{}` is listed twice",
            c.name
        );
        anyhow::ensure!(
            keys.insert(c.key.as_str()),
            "{file}: clients.{}: its key is also another client's",
            c.name
        );
    }
    for (field, v) in [
        ("rank", f.rank as u64),
        ("min_results", f.min_results as u64),
        ("rounds", f.rounds),
        ("upload_memory_mb", f.upload_memory_mb),
    ] {
        anyhow::ensure!(v > 0, "{file}: {field} must be positive");
    }
    let phase = f.phase.unwrap_or(Phase::Sft);
    let stages = std::iter::once((phase, &f.local, "local".to_string())).chain(
        f.then
            .iter()
            .enumerate()
            .map(|(i, s)| (s.phase, &s.local, format!("then[{i}].local"))),
    );
    for (p, local, where_) in stages {
        if p == Phase::Distill {
            let d = local.distill.clone().unwrap_or_default();
            fedtune_engine::train::distill::DistillOptions {
                beta: d.beta,
                lmbda: d.lmbda,
                temperature: d.temperature,
                max_new_tokens: d.max_new_tokens as usize,
                ..Default::default()
            }
            .validate()
            .map_err(|e| anyhow::anyhow!("{file}: {where_}.distill: {e}"))?;
        }
        if p == Phase::Grpo {
            let g = local.grpo.as_ref().with_context(|| {
                format!("{file}: phase grpo needs [{where_}.grpo] with its rewards")
            })?;
            anyhow::ensure!(
                !g.rewards.is_empty(),
                "{file}: {where_}.grpo.rewards: name at least one reward"
            );
            anyhow::ensure!(
                g.num_generations >= 2 && local.batch_size % g.num_generations as usize == 0,
                "{file}: {where_}: batch_size ({}, completions) must be a multiple of grpo.num_generations ({}, at least 2)",
                local.batch_size,
                g.num_generations
            );
        }
    }
    Ok(())
}

/// The checks of `client.toml` (`file`) that need no other file; the training device, its
/// precision and the data format they name.
/// How a client trains, from its `client.toml`.
pub(super) struct Training {
    /// Where.
    pub device: fedtune_engine::device::Device,
    /// The GPU's precision (`bf16`, `fp16`; f32 otherwise, and on the CPU).
    pub dt: fedtune_engine::cuda::Dt,
    /// On the CPU, the frozen base held in bf16 (`Some(true)`: `dtype = "bf16"` or
    /// `bf16 = true`) or f16 (`dtype = "f16"`).
    pub half: Option<bool>,
    /// The data files' format, when not detected.
    pub format: Option<fedtune_engine::data::Format>,
}

pub(super) fn check_client_file(f: &ClientFile, file: &str) -> anyhow::Result<Training> {
    let device: fedtune_engine::device::Device = f
        .device
        .as_deref()
        .unwrap_or("cpu")
        .parse()
        .with_context(|| format!("{}: device", file))?;
    anyhow::ensure!(f.max_length >= 2, "{file}: max_length must be at least 2");
    anyhow::ensure!(
        f.output_dir.is_some()
            || !f
                .report_to
                .contains(&fedtune_engine::train::config::ReportTo::Tensorboard),
        "{file}: report_to = \"tensorboard\" needs output_dir (where each round's event files go)"
    );
    anyhow::ensure!(
        !(f.bf16 && f.fp16),
        "{file}: bf16 and fp16 exclude each other"
    );
    let cpu = device == fedtune_engine::device::Device::Cpu;
    let dt = if cpu {
        fedtune_engine::cuda::Dt::F32
    } else if f.bf16 {
        fedtune_engine::cuda::Dt::BF16
    } else if f.fp16 {
        fedtune_engine::cuda::Dt::F16
    } else {
        fedtune_engine::cuda::Dt::F32
    };
    anyhow::ensure!(
        !(cpu && f.fp16),
        "{file}: fp16 mixed precision trains on a GPU (device = \"cuda\"); on the CPU, \
         bf16 = true (or dtype = \"bf16\") holds the frozen base in bf16"
    );
    let half = match f.dtype.as_deref() {
        None | Some("f32" | "float32") => None,
        Some("bf16" | "bfloat16") => Some(true),
        Some("f16" | "float16") => Some(false),
        Some(other) => anyhow::bail!("{file}: dtype = {other:?}: expected f32, bf16 or f16"),
    };
    anyhow::ensure!(
        half.is_none() || cpu,
        "{file}: dtype holds the frozen base in 16 bits on the CPU; on a GPU set bf16 = true \
         (or fp16 = true) for mixed precision"
    );
    // TRL's bf16 on the CPU: the same as dtype = "bf16".
    anyhow::ensure!(
        !(cpu && f.bf16 && half == Some(false)),
        "{file}: bf16 = true with dtype = \"f16\": pick one 16-bit type for the frozen base"
    );
    let half = half.or((cpu && f.bf16).then_some(true));
    anyhow::ensure!(
        f.gradient_accumulation_steps.is_none(),
        "{file}: gradient_accumulation_steps: the round plan sets it for every client \
         (gradient_accumulation_steps in coord.toml's [local]); remove it here"
    );
    anyhow::ensure!(
        f.rank.is_none_or(|r| r > 0),
        "{file}: rank must be positive"
    );
    anyhow::ensure!(
        f.load_in_4bit || !f.bnb_4bit_use_double_quant,
        "{file}: bnb_4bit_use_double_quant needs load_in_4bit = true"
    );
    let format = f
        .format
        .as_deref()
        .map(str::parse::<fedtune_engine::data::Format>)
        .transpose()
        .map_err(|e| anyhow::anyhow!("{file}: format: {e}"))?;
    Ok(Training {
        device,
        dt,
        half,
        format,
    })
}

/// The client's local data for every kind of round, encoded with `m`'s tokenizer (which GRPO
/// rounds keep); gives the model back.
pub(super) fn local_data(
    f: &ClientFile,
    file: &str,
    m: fedtune_engine::LoadedModel,
    format: Option<fedtune_engine::data::Format>,
    dt: fedtune_engine::cuda::Dt,
) -> anyhow::Result<(LocalData, fedtune_engine::LlamaModel)> {
    let opts = LoadOptions {
        format,
        ..LoadOptions::default()
    };
    let max_length = f.max_length;
    let sft = |p: &Path| -> anyhow::Result<_> {
        Ok(Dataset::load(p, opts)?.encode_sft(&m.tokenizer, Some(max_length))?)
    };
    let pairs = |p: &Path| -> anyhow::Result<_> {
        Ok(Dataset::load(p, opts)?
            .encode_pairs(&m.tokenizer, Some(max_length / 2), Some(max_length))?
            .0)
    };
    let mut data = LocalData {
        train: sft(&f.train_data)?,
        eval: f
            .eval_data
            .as_deref()
            .map(sft)
            .transpose()?
            .unwrap_or_default(),
        pairs: f
            .preference_data
            .as_deref()
            .map(pairs)
            .transpose()?
            .unwrap_or_default(),
        eval_pairs: Vec::new(),
        reward_pairs: f
            .preference_data
            .as_deref()
            .map(|p| -> anyhow::Result<_> {
                Ok(Dataset::load(p, opts)?
                    .encode_reward_pairs(&m.tokenizer, Some(max_length))?
                    .0)
            })
            .transpose()?
            .unwrap_or_default(),
        eval_reward_pairs: Vec::new(),
        feedback: f
            .feedback_data
            .as_deref()
            .map(|p| -> anyhow::Result<_> {
                Ok(Dataset::load(p, opts)?
                    .encode_feedback(&m.tokenizer, max_length)?
                    .0)
            })
            .transpose()?
            .unwrap_or_default(),
        prompts: Default::default(),
        distill: Default::default(),
        pad: m.tokenizer.pad_id,
        local: LocalTraining {
            gradient_checkpointing: f.gradient_checkpointing,
            max_length,
            dt,
            output_dir: f.output_dir.clone(),
            report_to: f.report_to.clone(),
        },
    };
    if let Some(t) = &f.teacher {
        data.distill = super::super::distill::client_data(
            file,
            t,
            f.teacher_adapter.as_deref(),
            f.distill_data.as_deref().unwrap_or(&f.train_data),
            f.eval_data.as_deref(),
            f.max_length,
            &m,
            opts,
        )?;
    }
    if let Some(p) = &f.prompt_data {
        data.prompts.prompts = fedtune_engine::train::grpo::load_prompts(p, &m.tokenizer)
            .with_context(|| format!("{file}: prompt_data"))?;
        data.prompts.stop_ids = m.model.config.eos_token_ids.clone();
        data.prompts.stop_ids.extend(m.tokenizer.eos_id);
        data.prompts.tokenizer = Some(std::sync::Arc::new(m.tokenizer));
    }
    Ok((data, m.model))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedtune_engine::cuda::Dt;

    fn training(extra: &str) -> anyhow::Result<Training> {
        let text = format!(
            "federation = \"demo\"\ncoordinator = \"127.0.0.1:9\"\nca = \"ca\"\nname = \"a\"\n\
             coordinator_key = \"k\"\nmodel = \"m\"\ntrain_data = \"d.jsonl\"\n{extra}"
        );
        let f: ClientFile = toml::from_str(&text).expect("parses");
        check_client_file(&f, "a.toml")
    }

    #[test]
    fn bf16_on_the_cpu_is_a_bf16_base_and_mixed_precision_on_a_gpu() {
        let t = training("bf16 = true\n").unwrap();
        assert_eq!((t.dt, t.half), (Dt::F32, Some(true)));
        let t = training("dtype = \"bf16\"\n").unwrap();
        assert_eq!((t.dt, t.half), (Dt::F32, Some(true)));
        let t = training("dtype = \"f16\"\n").unwrap();
        assert_eq!((t.dt, t.half), (Dt::F32, Some(false)));
        let t = training("bf16 = true\ndevice = \"cuda\"\n").unwrap();
        assert_eq!((t.dt, t.half), (Dt::BF16, None));
        let t = training("").unwrap();
        assert_eq!((t.dt, t.half), (Dt::F32, None));
        for (extra, want) in [
            (
                "fp16 = true\n",
                "a.toml: fp16 mixed precision trains on a GPU",
            ),
            (
                "bf16 = true\ndtype = \"f16\"\n",
                "a.toml: bf16 = true with dtype",
            ),
            (
                "bf16 = true\nfp16 = true\n",
                "a.toml: bf16 and fp16 exclude",
            ),
        ] {
            let e = training(extra).err().expect(extra).to_string();
            assert!(e.contains(want), "{extra}: {e}");
        }
    }
}
