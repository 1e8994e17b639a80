//! Whole GPU training runs against the host engine: 20 SFT steps and 5 DPO steps against the
//! host's loss curve with checkpoints resumed across devices, bf16 and fp16 (loss-scaled) mixed
//! precision against f32, gradient checkpointing against the plain run, and a distillation step
//! (student and teacher on the GPU) against the host's. Runs where a CUDA device is found
//! (`scripts/gpu_check.sh`); elsewhere every test says so and passes, unless
//! `FEDTUNE_REQUIRE_GPU=1`.

mod gpu_common;

use fedtune_engine::cuda::{CudaModel, Dt};
use fedtune_engine::data::{Dataset, LoadOptions};
use fedtune_engine::train::TrainConfig;
use fedtune_engine::train::dpo::{DpoObjective, DpoOptions};
use fedtune_engine::train::lora::init_adapter;
use fedtune_engine::train::params::TrainModel;
use fedtune_engine::train::reward::{RewardObjective, RewardOptions, score_pairs};
use fedtune_engine::train::sft::{
    Callback, LogEntry, RunOptions, SftObjective, TrainerState, train,
};
use fedtune_engine::train::step::Trainable;
use fedtune_engine::{Encoded, LoadedModel, PeftAdapter};
use gpu_common::{check, gpu, host, repo, tiny_loaded};

/// Keeps every log entry.
struct Keep(Vec<LogEntry>);
impl Callback for Keep {
    fn on_log(&mut self, e: &LogEntry, _: &TrainerState) {
        self.0.push(e.clone());
    }
}

fn sft_data(m: &LoadedModel) -> Vec<Encoded> {
    let mut v = Vec::new();
    for f in [
        "testdata/formats/openai.jsonl",
        "testdata/formats/alpaca.json",
    ] {
        let d = Dataset::load(&repo().join(f), LoadOptions::default()).unwrap();
        v.extend(d.encode_sft(&m.tokenizer, None).unwrap());
    }
    v
}

/// LoRA r = 8 on the tiny model, 20 steps of 2 examples.
fn twenty_steps() -> TrainConfig {
    TrainConfig {
        lora_r: 8,
        lora_alpha: 16.0,
        learning_rate: 5e-3,
        max_steps: Some(20),
        per_device_train_batch_size: 2,
        ..Default::default()
    }
}

/// `base` with a fresh LoRA adapter of `cfg` attached.
fn with_fresh_adapter(
    mut base: fedtune_engine::LlamaModel,
    cfg: &TrainConfig,
) -> fedtune_engine::LlamaModel {
    let adapter = init_adapter(&base, cfg);
    base.attach_weights(&adapter, 0.0).unwrap();
    base
}

fn run_sft<M: TrainModel>(
    model: &mut M,
    seqs: &[Encoded],
    cfg: &TrainConfig,
    out: Option<&std::path::Path>,
    resume: Option<&std::path::Path>,
) -> Vec<LogEntry> {
    let objective = SftObjective::new(cfg, seqs, &[], 2);
    let run = RunOptions {
        config: cfg,
        output: out,
        resume,
        cancel: None,
    };
    let mut log = Keep(Vec::new());
    train(model, &run, &objective, &mut log).unwrap();
    log.0
}

/// Training entries' `(step, loss, grad_norm)`.
fn curve(log: &[LogEntry]) -> Vec<(u64, f32, f32)> {
    log.iter()
        .filter_map(|e| Some((e.step, e.loss? as f32, e.grad_norm? as f32)))
        .collect()
}

fn same_curve(what: &str, got: &[(u64, f32, f32)], want: &[(u64, f32, f32)]) {
    assert_eq!(
        got.iter().map(|c| c.0).collect::<Vec<_>>(),
        want.iter().map(|c| c.0).collect::<Vec<_>>(),
        "{what}: steps"
    );
    let losses = |c: &[(u64, f32, f32)]| c.iter().map(|c| c.1).collect::<Vec<_>>();
    let norms = |c: &[(u64, f32, f32)]| c.iter().map(|c| c.2).collect::<Vec<_>>();
    check(
        &format!("{what}: losses"),
        &losses(got),
        &losses(want),
        1e-4,
    );
    check(
        &format!("{what}: gradient norms"),
        &norms(got),
        &norms(want),
        1e-4,
    );
}

/// Each of `keys`, logged at every one of `steps` steps, within 1e-4 of the host's values.
fn same_metrics(what: &str, keys: &[&str], got: &[LogEntry], want: &[LogEntry], steps: usize) {
    for key in keys {
        let get = |l: &[LogEntry]| {
            l.iter()
                .filter_map(|e| e.metrics.get(*key).map(|v| *v as f32))
                .collect::<Vec<_>>()
        };
        assert_eq!(get(want).len(), steps, "{what}: {key} logged every step");
        check(&format!("{what} {key}"), &get(got), &get(want), 1e-4);
    }
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("fedtune-gpu-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn twenty_sft_steps_on_the_gpu_follow_the_host_and_checkpoints_cross_devices() {
    let Some(g) = gpu() else { return };
    let loaded = tiny_loaded();
    let seqs = sft_data(&loaded);
    let cfg = TrainConfig {
        warmup_ratio: 0.1,
        save_steps: Some(10),
        ..twenty_steps()
    };
    let base = with_fresh_adapter(loaded.model.clone(), &cfg);
    let mut host_model = base.clone();
    let cpu_out = tmp("sft-cpu-first");
    let host_log = run_sft(&mut host_model, &seqs, &cfg, Some(&cpu_out), None);
    let gpu_out = tmp("sft");
    let mut cm = CudaModel::from_host(&base, g.clone(), Dt::F32).unwrap();
    let gpu_log = run_sft(&mut cm, &seqs, &cfg, Some(&gpu_out), None);
    same_curve("SFT, 20 steps", &curve(&gpu_log), &curve(&host_log));
    let names = host_model.trainable_names(&Trainable::lora());
    for (name, want) in host_model.host_params(&names).unwrap() {
        let got = cm.param(&name).unwrap();
        check(
            &format!("after 20 steps: {name}"),
            &g.download(got).unwrap(),
            &host(&want),
            1e-3,
        );
    }
    // The GPU's checkpoint at step 10 resumes on the CPU, and the CPU's on the GPU.
    let mut cpu_resumed = base.clone();
    let log = run_sft(
        &mut cpu_resumed,
        &seqs,
        &cfg,
        Some(&tmp("sft-cpu")),
        Some(&gpu_out.join("checkpoint-10")),
    );
    same_curve(
        "GPU checkpoint resumed on the CPU",
        &curve(&log),
        &curve(&host_log)[10..],
    );
    // (The checkpoint of the same 20-step run: a 10-step run would have another schedule.)
    let mut gpu_resumed = CudaModel::from_host(&base, g.clone(), Dt::F32).unwrap();
    let log = run_sft(
        &mut gpu_resumed,
        &seqs,
        &cfg,
        None,
        Some(&cpu_out.join("checkpoint-10")),
    );
    same_curve(
        "CPU checkpoint resumed on the GPU",
        &curve(&log),
        &curve(&host_log)[10..],
    );
}

#[test]
fn dpo_steps_on_the_gpu_match_the_host_loss_and_rewards() {
    let Some(g) = gpu() else { return };
    let mut m = tiny_loaded();
    m.model
        .attach_adapter(&PeftAdapter::load(&repo().join("testdata/tiny-llama/adapter")).unwrap())
        .unwrap();
    let opts = DpoOptions::default();
    let d = Dataset::load(
        &repo().join("testdata/demo/prefs.jsonl"),
        LoadOptions::default(),
    )
    .unwrap();
    let pairs = d
        .encode_pairs(
            &m.tokenizer,
            Some(opts.max_prompt_length),
            Some(opts.max_length),
        )
        .unwrap()
        .0;
    let pairs: Vec<_> = pairs.into_iter().take(12).collect();
    let cfg = TrainConfig {
        learning_rate: 5e-4,
        max_steps: Some(5),
        per_device_train_batch_size: 4,
        ..Default::default()
    };
    let run = RunOptions {
        config: &cfg,
        output: None,
        resume: None,
        cancel: None,
    };
    let pad = m.tokenizer.pad_id;
    let mut host_model = m.model.clone();
    let obj = DpoObjective::new(&host_model, opts, pairs.clone(), Vec::new(), 4, pad);
    let mut host_log = Keep(Vec::new());
    train(&mut host_model, &run, &obj, &mut host_log).unwrap();
    let mut cm = CudaModel::from_host(&m.model, g, Dt::F32).unwrap();
    let obj = DpoObjective::new(&cm, opts, pairs, Vec::new(), 4, pad);
    let mut gpu_log = Keep(Vec::new());
    train(&mut cm, &run, &obj, &mut gpu_log).unwrap();
    same_curve("DPO, 5 steps", &curve(&gpu_log.0), &curve(&host_log.0));
    let keys = ["rewards/chosen", "rewards/rejected", "rewards/margins"];
    same_metrics("DPO", &keys, &gpu_log.0, &host_log.0, 5);
}

#[test]
fn a_reward_model_trains_on_the_gpu_as_on_the_host_with_its_score_head() {
    let Some(g) = gpu() else { return };
    let m = tiny_loaded();
    let d = Dataset::load(
        &repo().join("testdata/demo/prefs.jsonl"),
        LoadOptions::default(),
    )
    .unwrap();
    let (pairs, _) = d.encode_reward_pairs(&m.tokenizer, None).unwrap();
    let pairs: Vec<_> = pairs.into_iter().take(12).collect();
    let cfg = TrainConfig {
        learning_rate: 1e-3,
        max_steps: Some(6),
        per_device_train_batch_size: 4,
        ..twenty_steps()
    };
    let run = RunOptions {
        config: &cfg,
        output: None,
        resume: None,
        cancel: None,
    };
    let pad = m.tokenizer.pad_id;
    let mut base = with_fresh_adapter(m.model.clone(), &cfg);
    base.init_score(7);
    let objective = || {
        let options = RewardOptions {
            center_rewards_coefficient: Some(0.01),
            ..RewardOptions::default()
        };
        RewardObjective::new(options, pairs.clone(), pairs[..4].to_vec(), 4, pad)
    };
    let mut host_model = base.clone();
    let mut host_log = Keep(Vec::new());
    train(&mut host_model, &run, &objective(), &mut host_log).unwrap();
    // A fresh GPU model given the same head from the seed, and one copied from the host.
    let mut fresh = CudaModel::from_host(&m.model, g.clone(), Dt::F32).unwrap();
    let mut no_score = base.clone();
    no_score.score = None;
    fresh.attach_weights(&no_score.lora_weights()).unwrap();
    assert!(!fresh.has_score());
    fresh.init_score(7).unwrap();
    let mut cm = CudaModel::from_host(&base, g.clone(), Dt::F32).unwrap();
    let key = fedtune_engine::adapter::SCORE_KEY;
    assert_eq!(
        fresh.lora_weights().unwrap().dense[key],
        cm.lora_weights().unwrap().dense[key],
        "init_score draws the host's head"
    );
    assert!(
        cm.trainable_names(&Trainable::lora())
            .contains(&"score.weight".to_string())
    );
    let mut gpu_log = Keep(Vec::new());
    train(&mut cm, &run, &objective(), &mut gpu_log).unwrap();
    same_curve(
        "reward model, 6 steps",
        &curve(&gpu_log.0),
        &curve(&host_log.0),
    );
    let keys = ["accuracy", "margin", "mean_reward"];
    same_metrics("reward", &keys, &gpu_log.0, &host_log.0, 6);
    // The trained head and factors, and the rewards the trained models give.
    let (got, want) = (cm.lora_weights().unwrap(), host_model.lora_weights());
    assert_eq!(got.dense.keys().collect::<Vec<_>>(), [key]);
    check(
        "trained score head",
        &got.dense[key].data,
        &want.dense[key].data,
        1e-4,
    );
    for (name, f) in &want.modules {
        check(
            &format!("{name}.lora_B"),
            &got.modules[name].b.data,
            &f.b.data,
            1e-3,
        );
    }
    let rewards = |r: Vec<(f64, f64)>| -> Vec<f32> {
        r.into_iter()
            .flat_map(|(c, r)| [c as f32, r as f32])
            .collect()
    };
    check(
        "rewards of the trained model",
        &rewards(score_pairs(&cm, &pairs, 4, pad).unwrap()),
        &rewards(score_pairs(&host_model, &pairs, 4, pad).unwrap()),
        1e-4,
    );
    // The adapter it writes attaches on either device; a head of another width is refused.
    let mut back = CudaModel::from_host(&m.model, g.clone(), Dt::F32).unwrap();
    back.attach_weights(&got).unwrap();
    assert_eq!(back.lora_weights().unwrap().dense[key], got.dense[key]);
    let mut bad = got.clone();
    bad.dense.insert(
        key.into(),
        fedtune_aggregation::Matrix::new(1, 3, vec![0.0; 3]),
    );
    let e = back.attach_weights(&bad).unwrap_err().to_string();
    assert!(e.contains("score head is [1, 3]"), "{e}");
    // bf16 mixed precision: the head and its gradient stay f32.
    let mut half = CudaModel::from_host(&base, g, Dt::BF16).unwrap();
    let mut half_log = Keep(Vec::new());
    train(&mut half, &run, &objective(), &mut half_log).unwrap();
    let (h, f) = (curve(&half_log.0), curve(&host_log.0));
    for (a, b) in h.iter().zip(&f) {
        assert!(
            (a.1 - b.1).abs() < 2e-2 * b.1.abs().max(1.0),
            "bf16 loss {a:?} vs f32 {b:?}"
        );
    }
}

#[test]
fn grpo_steps_on_the_gpu_follow_the_host_with_the_reward_model_on_the_device() {
    use fedtune_engine::rewards::Rewards;
    use fedtune_engine::train::grpo::{GrpoObjective, GrpoOptions, GrpoPrompt};
    use fedtune_engine::train::reward::RewardBase;
    let Some(g) = gpu() else { return };
    let m = tiny_loaded();
    let tok = std::sync::Arc::new(m.tokenizer.clone());
    let prompts: Vec<GrpoPrompt> = ["Clinical note: fever.", "Note: cough.", "Patient: rash."]
        .iter()
        .map(|t| GrpoPrompt {
            ids: tok.encode_with_special(t).unwrap(),
            text: t.to_string(),
            messages: None,
            fields: Default::default(),
        })
        .collect();
    let cfg = TrainConfig {
        learning_rate: 1e-2,
        max_steps: Some(3),
        per_device_train_batch_size: 8,
        ..twenty_steps()
    };
    let options = GrpoOptions {
        num_generations: 4,
        max_completion_length: 4,
        temperature: 0.9,
        beta: 0.04,
        ..Default::default()
    };
    let reward_model = repo().join("testdata/reward/start_adapter");
    // The same rewards on each device: a rule, and the reward model on the policy's device.
    let objective = |base: &dyn RewardBase| {
        let mut rewards = Rewards::parse(
            &[
                "regex:^\\s*[A-Z]".into(),
                format!("reward_model:{}", reward_model.display()),
            ],
            &[1.0, 0.5],
        )
        .unwrap();
        rewards.load_models(base, &tok).unwrap();
        GrpoObjective::new(
            prompts.clone(),
            rewards,
            options,
            8,
            tok.pad_id,
            tok.eos_id.into_iter().collect(),
            tok.clone(),
            5,
        )
    };
    let run = RunOptions {
        config: &cfg,
        output: None,
        resume: None,
        cancel: None,
    };
    let base = with_fresh_adapter(m.model.clone(), &cfg);
    let mut host_model = base.clone();
    let mut host_log = Keep(Vec::new());
    let host_objective = objective(&base);
    train(&mut host_model, &run, &host_objective, &mut host_log).unwrap();
    let mut cm = CudaModel::from_host(&base, g, Dt::F32).unwrap();
    let mut gpu_log = Keep(Vec::new());
    let gpu_objective = objective(&cm);
    train(&mut cm, &run, &gpu_objective, &mut gpu_log).unwrap();
    same_curve("GRPO, 3 steps", &curve(&gpu_log.0), &curve(&host_log.0));
    let keys = [
        "reward",
        "rewards/reward_model/mean",
        "entropy",
        "kl",
        "completions/mean_length",
    ];
    same_metrics("GRPO", &keys, &gpu_log.0, &host_log.0, 3);
}

#[test]
fn twenty_bf16_and_fp16_sft_steps_follow_the_f32_curve_for_lora_and_qlora() {
    let Some(g) = gpu() else { return };
    let loaded = tiny_loaded();
    let seqs = sft_data(&loaded);
    let cfg = twenty_steps();
    for nf4 in [false, true] {
        let mut base = loaded.model.clone();
        if nf4 {
            base.quantize_nf4(true);
        }
        let base = with_fresh_adapter(base, &cfg);
        let mut f = CudaModel::from_host(&base, g.clone(), Dt::F32).unwrap();
        let want = curve(&run_sft(&mut f, &seqs, &cfg, None, None));
        // bf16, and fp16 with dynamic loss scaling (the loop's GradScaler).
        for (name, dt, run_cfg) in [
            ("bf16", Dt::BF16, cfg.clone()),
            (
                "fp16",
                Dt::F16,
                TrainConfig {
                    fp16: true,
                    ..cfg.clone()
                },
            ),
        ] {
            let mut h = CudaModel::from_host(&base, g.clone(), dt).unwrap();
            let log = run_sft(&mut h, &seqs, &run_cfg, None, None);
            let got = curve(&log);
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| ((a.1 - b.1) / b.1).abs())
                .fold(0f32, f32::max);
            println!(
                "{name} vs f32 SFT loss (NF4 base: {nf4}), 20 steps: largest relative gap {worst:.4}"
            );
            println!("  f32 {:?}", want.iter().map(|c| c.1).collect::<Vec<_>>());
            println!("  {name} {:?}", got.iter().map(|c| c.1).collect::<Vec<_>>());
            if run_cfg.fp16 {
                let skipped = log
                    .iter()
                    .filter(|e| e.grad_norm.is_none_or(|n| !n.is_finite()))
                    .count();
                println!("  fp16: {skipped} steps skipped by the loss scaler");
                assert!(skipped < 5, "fp16 skipped {skipped} of 20 steps");
            }
            assert!(worst < 0.05, "{name} curve {worst} from f32");
            assert!(
                got.last().unwrap().1 < got[0].1,
                "{name} training lowers the loss"
            );
        }
    }
}

/// A distillation step on the GPU (student and teacher there) against the host's: the same
/// divergence (the teacher's and the student's heads read in chunks there) and LoRA gradients.
#[test]
fn a_distillation_step_on_the_gpu_matches_the_host() {
    use fedtune_engine::train::distill::{DistillObjective, DistillOptions};
    use fedtune_engine::train::sft::Objective;
    use fedtune_engine::train::step::StepOptions;
    let Some(g) = gpu() else { return };
    let m = tiny_loaded();
    let teacher = tiny_loaded().model;
    let mut student = tiny_loaded().model;
    let a = PeftAdapter::load(&repo().join("testdata/tiny-llama/adapter")).unwrap();
    student.attach_adapter(&a).unwrap();
    let gpu_teacher = CudaModel::from_host(&teacher, g.clone(), Dt::F32).unwrap();
    let gpu_student = CudaModel::from_host(&student, g.clone(), Dt::F32).unwrap();
    let data = Dataset::load(
        &repo().join("testdata/gkd/chat.jsonl"),
        LoadOptions::default(),
    )
    .unwrap();
    let (examples, _) = data.encode_completions(&m.tokenizer, 1024).unwrap();
    let opts = DistillOptions {
        lmbda: 0.0,
        ..DistillOptions::default()
    };
    let host_obj = DistillObjective::new(
        &teacher,
        student.config.vocab_size,
        opts,
        examples.clone(),
        Vec::new(),
        3,
        m.tokenizer.pad_id,
        vec![],
        0,
    )
    .unwrap();
    // The same objective with the teacher on the GPU.
    let gpu_obj = DistillObjective::new(
        &gpu_teacher,
        student.config.vocab_size,
        opts,
        examples.clone(),
        Vec::new(),
        3,
        m.tokenizer.pad_id,
        vec![],
        0,
    )
    .unwrap();
    let order: Vec<usize> = (0..examples.len()).collect();
    let micro = Objective::<fedtune_engine::LlamaModel>::batches(&host_obj, &order);
    let want = host_obj
        .step(
            &student,
            &micro[..1],
            &Trainable::lora(),
            &StepOptions::default(),
        )
        .unwrap();
    let got = gpu_obj
        .step(
            &gpu_student,
            &micro[..1],
            &Trainable::lora(),
            &StepOptions::default(),
        )
        .unwrap();
    println!("distillation loss: GPU {} vs host {}", got.loss, want.loss);
    assert!(
        (got.loss - want.loss).abs() < 1e-4,
        "{} vs {}",
        got.loss,
        want.loss
    );
    assert_eq!(got.grads.len(), want.grads.len());
    for (name, w) in &want.grads {
        check(
            &format!("distillation: {name}"),
            &g.download(&got.grads[name]).unwrap(),
            &host(w),
            1e-3,
        );
    }
}

/// Clients of a simulated federation train side by side on one GPU from threads of their own
/// (one stream, a shared read-only base): each job's trained adapter is bit for bit the one it
/// trains alone, and the pool's peak for three jobs together stays within three single jobs.
#[test]
fn jobs_training_side_by_side_on_one_gpu_get_what_they_get_alone() {
    let Some(g) = gpu() else { return };
    let loaded = tiny_loaded();
    let seqs = sft_data(&loaded);
    let cfg = TrainConfig {
        max_steps: Some(6),
        ..twenty_steps()
    };
    let host_base = with_fresh_adapter(loaded.model.clone(), &cfg);
    let base = CudaModel::from_host(&host_base, g.clone(), Dt::F32).unwrap();
    let parts: Vec<Vec<Encoded>> = (0..3)
        .map(|k| seqs.iter().skip(k).step_by(3).cloned().collect())
        .collect();
    let job = |data: &[Encoded]| -> Vec<Vec<u32>> {
        g.bind().unwrap();
        let mut m = base.clone();
        run_sft(&mut m, data, &cfg, None, None);
        let names = m.trainable_names(&Trainable::lora());
        names
            .iter()
            .map(|n| {
                let v = g.download(m.param(n).unwrap()).unwrap();
                v.iter().map(|x| x.to_bits()).collect()
            })
            .collect()
    };
    g.synchronize().unwrap();
    g.reset_peak().unwrap();
    let before = g.used_bytes().unwrap();
    let alone: Vec<_> = parts.iter().map(|d| job(d)).collect();
    let one = g.peak_bytes().unwrap().saturating_sub(before);
    g.synchronize().unwrap();
    g.reset_peak().unwrap();
    let together: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = parts.iter().map(|d| s.spawn(|| job(d))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let three = g.peak_bytes().unwrap().saturating_sub(before);
    for (k, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert!(a == t, "job {k}: the adapter trained side by side differs");
    }
    assert_ne!(alone[0], alone[1], "different data, different adapters");
    eprintln!("pool peak: one job {one} B, three side by side {three} B");
    assert!(
        three <= 3 * one + (64 << 20),
        "{three} B for three jobs, {one} B for one"
    );
}
