//! Running a [`SimConfig`] in memory: the seeded faults as hooks of the [`Federation`], the
//! loop over rounds (with a coordinator restart when asked), and per-round evaluation of the
//! global adapter on every client's held-out data into `metrics.jsonl`.

use crate::metrics::{
    Output, StageGlobals, base_record, evaluate_losses, generations_before_after,
    generations_by_stage, num, round_metrics, stage_ends,
};
pub use crate::setup::{ClientSetup, Parties, prepare_clients};

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use fedtune_aggregation::update::Adapter;
use fedtune_client::Client;
use fedtune_client::trainer::{Base, LocalData};
use fedtune_coordinator::{Coordinator, RoundEvent};
use fedtune_engine::LoadedModel;
use fedtune_engine::data::Example;
use fedtune_protocol::digest;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Exp, Normal};

use crate::config::{Attack, SimConfig};
use crate::evaluate::GenerationScores;
use crate::memory::{Fate, Federation, Sent, SimClient, SimError};

/// Passes of the simulation after which a run counts as stalled.
const MAX_PASSES: usize = 1_000_000;

/// Simulated start time (ms since the Unix epoch): 2026-01-01.
pub const T0: u64 = 1_767_225_600_000;

/// A per-(client, round) random stream.
fn rng_for(seed: u64, client: usize, round: u64, salt: u64) -> ChaCha8Rng {
    let mut b = Vec::with_capacity(32);
    for v in [seed, client as u64, round, salt] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    ChaCha8Rng::from_seed(*blake3::hash(&b).as_bytes())
}

/// Applies a Byzantine attack to a trained adapter.
pub fn corrupt(a: &mut Adapter, attack: Attack, rng: &mut impl Rng) {
    match attack {
        Attack::SignFlip { scale } => {
            for m in a.modules.values_mut() {
                m.b.data.iter_mut().for_each(|x| *x *= -(scale as f32));
            }
        }
        Attack::Scale { factor } => {
            for m in a.modules.values_mut() {
                m.b.data.iter_mut().for_each(|x| *x *= factor as f32);
            }
        }
        Attack::Noise { std } => {
            // `SimConfig::check` rejects a negative or non-finite std; such a value given
            // through the library leaves the update unchanged instead of panicking.
            let Ok(n) = Normal::new(0.0f64, std) else {
                return;
            };
            for m in a.modules.values_mut() {
                for x in m.a.data.iter_mut().chain(m.b.data.iter_mut()) {
                    *x += n.sample(rng) as f32;
                }
            }
        }
        Attack::Nan => {
            if let Some(m) = a.modules.values_mut().next() {
                m.b.data[0] = f32::NAN;
            }
        }
        Attack::Replay | Attack::WrongBase => {}
    }
}

/// What a finished simulation reports.
#[derive(Debug, Clone)]
pub struct SimOutcome {
    /// One `metrics.jsonl` record per round (round 0: the base model).
    pub rounds: Vec<serde_json::Value>,
    /// The final global adapter.
    pub global: Adapter,
    /// Its PEFT safetensors bytes.
    pub global_bytes: Vec<u8>,
    /// The coordinator's round log.
    pub coordinator_log: Vec<RoundEvent>,
    /// Injected-fault events.
    pub events: Vec<serde_json::Value>,
    /// Rejections by reason.
    pub rejections: BTreeMap<String, u64>,
    /// Generations before (base) and after (final global), per client.
    pub generations: Vec<(String, GenerationScores, GenerationScores)>,
    /// The same scores for the global adapter at the end of each stage before the last
    /// (`SFT`, `DPO`, ...), per client in [`SimOutcome::names`]' order.
    pub stages: Vec<(String, Vec<GenerationScores>)>,
    /// Client names.
    pub names: Vec<String>,
    /// Wall-clock seconds of the whole run.
    pub wall_s: f64,
}

pub use crate::progress::Progress;

/// The base model where `cfg` trains (the `device` field): the host model itself, or a copy
/// on the GPU shared by every client, whose jobs run side by side there as `parallel` and the
/// device's memory allow.
pub fn training_base(
    cfg: &SimConfig,
    model: &LoadedModel,
    progress: &mut dyn FnMut(Progress),
) -> Result<Base, SimError> {
    let device = cfg.engine_device().map_err(SimError::Io)?;
    let base = Base::on(model.model.clone(), device, fedtune_engine::cuda::Dt::F32)
        .map_err(|e| SimError::Io(format!("device: {e}")))?;
    if base.host().is_none() {
        progress(Progress::Note(format!(
            "clients train on {} (one base model on the device; up to {} jobs side by side as its memory allows)",
            cfg.device.as_deref().unwrap_or("cuda"),
            cfg.parallel
        )));
    }
    Ok(base)
}

/// Runs `cfg` in memory on `model` with `clients`; writes `metrics.jsonl` and the global
/// adapter of every round (PEFT directories under `global/round-NNN/`) into `out`.
pub fn run_memory(
    cfg: &SimConfig,
    model: &LoadedModel,
    clients: Vec<ClientSetup>,
    out: Option<&Path>,
    progress: &mut dyn FnMut(Progress),
) -> Result<SimOutcome, SimError> {
    let started = Instant::now();
    let mut output = Output::new(out)?;
    if cfg
        .report_to
        .contains(&fedtune_engine::train::config::ReportTo::Tensorboard)
    {
        output = output.with_tensorboard()?;
    }
    let p = Parties::new(cfg, model, clients.len());
    let names: Vec<String> = clients.iter().map(|c| c.name.clone()).collect();
    let eval_examples: Vec<Vec<Example>> =
        clients.iter().map(|c| c.eval_examples.clone()).collect();
    let data = clients.into_iter().map(|c| c.data).collect();
    let base = training_base(cfg, model, progress)?;
    let mut f = faulty_federation(cfg, &p, data, &base)?;
    let (rounds, stage_globals) = drive(cfg, model, &mut f, &p, &names, &mut output, progress)?;
    let total = p.coord.total_rounds();
    let global = f.coordinator.global_adapter().clone();
    let global_bytes = f.coordinator.global().1.to_vec();
    output.file("global/final/adapter_model.safetensors", &global_bytes)?;
    if let Some(b) = f
        .store
        .get(&format!("global/{:06}/adapter_config.json", total))
    {
        output.file("global/final/adapter_config.json", b)?;
    }
    let gens = generations_before_after(cfg, model, &global, &names, &eval_examples, progress)?;
    let stages = generations_by_stage(cfg, model, &stage_globals, &eval_examples, progress)?;
    Ok(SimOutcome {
        rounds,
        global,
        global_bytes,
        coordinator_log: f.log.clone(),
        events: f.events.clone(),
        rejections: f.coordinator.rejections().clone(),
        generations: gens,
        stages,
        names,
        wall_s: started.elapsed().as_secs_f64(),
    })
}

/// The federation of `cfg` in memory on `base`, its clients connected, with the faults `cfg`
/// injects as hooks: dropouts, stragglers and crashes mid-upload (seeded per client and
/// round), Byzantine updates, replays and a wrong base model.
fn faulty_federation<'a>(
    cfg: &SimConfig,
    p: &Parties,
    data: Vec<LocalData>,
    base: &'a Base,
) -> Result<Federation<'a>, SimError> {
    let coordinator = Coordinator::new(p.coord.clone(), p.coord_id.clone(), p.initial.clone(), T0)?;
    let attacks: BTreeMap<usize, Attack> = cfg
        .faults
        .byzantine
        .iter()
        .map(|b| (b.client, b.attack))
        .collect();
    let sim_clients: Vec<SimClient> = data
        .into_iter()
        .enumerate()
        .map(|(k, data)| {
            let mut client_cfg = p.client_config(cfg);
            if attacks.get(&k) == Some(&Attack::WrongBase) {
                client_cfg.model_digest = digest(b"another base model");
            }
            let machine = Client::new(client_cfg, p.ids[k].clone());
            SimClient::new(machine, data, (cfg.faults.train_time_s * 1000.0) as u64)
        })
        .collect();
    let mut f = Federation::new(coordinator, sim_clients, base, T0);
    f.parallel = cfg.parallel;
    f.memory_budget = cfg.memory_budget_mb.map(|m| m << 20);
    let faults = cfg.faults.clone();
    let seed = cfg.seed;
    let byz = attacks.clone();
    f.fate = Some(Box::new(move |k, job, _now| {
        let mut rng = rng_for(seed, k, job.plan.round, 1);
        let mut ms = faults.train_time_s * 1000.0 * rng.random_range(0.8..1.2);
        if !byz.contains_key(&k) && rng.random_bool(faults.dropout) {
            return Fate::DropOut;
        }
        if rng.random_bool(faults.straggler) && faults.straggler_delay_s > 0.0 {
            let e = Exp::new(1.0 / (faults.straggler_delay_s * 1000.0)).expect("positive");
            ms += e.sample(&mut rng);
        }
        if rng.random_bool(faults.crash_mid_upload) {
            return Fate::CrashMidUpload {
                ms: ms as u64,
                reconnect_ms: 5_000,
            };
        }
        Fate::Train { ms: ms as u64 }
    }));
    let byz = attacks.clone();
    f.corrupt = Some(Box::new(move |k, round, outcome| {
        if let Some(&a) = byz.get(&k) {
            corrupt(&mut outcome.adapter, a, &mut rng_for(seed, k, round, 2));
        }
    }));
    let replayers: Vec<usize> = attacks
        .iter()
        .filter(|(_, a)| **a == Attack::Replay)
        .map(|(k, _)| *k)
        .collect();
    let mut last: BTreeMap<usize, Sent> = BTreeMap::new();
    f.tamper = Some(Box::new(move |k, _now, sent| {
        if !replayers.contains(&k) || !matches!(sent, Sent::Upload(_)) {
            return vec![sent];
        }
        // Send the previous round's signed update instead of this one.
        match last.insert(k, sent.clone()) {
            Some(old) => vec![old],
            None => vec![sent],
        }
    }));
    f.connect_all();
    Ok(f)
}

/// Runs `f` until its coordinator finishes (killing and restarting the coordinator in the
/// round `cfg` names), evaluating every closed round's global adapter on each client's
/// held-out data; returns the rounds' `metrics.jsonl` records, the base model's first, each
/// also written to `output` with its global adapter, and the global adapter at the end of each
/// stage but the last, with its label.
fn drive(
    cfg: &SimConfig,
    model: &LoadedModel,
    f: &mut Federation<'_>,
    p: &Parties,
    names: &[String],
    output: &mut Output,
    progress: &mut dyn FnMut(Progress),
) -> Result<(Vec<serde_json::Value>, StageGlobals), SimError> {
    let total = p.coord.total_rounds();
    let mut rounds = vec![base_record(model, &f.client_data(), names, output)?];
    let ends: BTreeMap<u64, String> = stage_ends(&p.coord).into_iter().collect();
    let mut stage_globals = Vec::new();
    progress(Progress::Round {
        done: 0,
        total,
        loss: num(&rounds[0]["global_eval_loss"]),
    });
    let mut restart = cfg.faults.coordinator_restart_round;
    // Coordinator and training seconds at the last close, for per-round figures.
    let mut coord_s_at = 0.0;
    let mut train_at: Vec<f64> = vec![0.0; f.clients.len()];
    // Log entries read so far, and where each round first opened.
    let mut scanned = 0;
    let mut opened: BTreeMap<u64, usize> = BTreeMap::new();
    let mut passes = 0usize;
    // One job's measured memory is said once (runs that measure it: a budget, or a GPU).
    let mut memory_said = false;
    loop {
        let finished = f.coordinator.is_finished();
        if finished {
            // Deliver what the last round's closing left pending (its log record included).
            f.run(1_000)?;
        }
        let mut restart_now = false;
        while scanned < f.log.len() {
            let at = scanned;
            scanned += 1;
            match &f.log[at] {
                RoundEvent::RoundOpen { round, .. } => {
                    opened.entry(*round).or_insert(at);
                }
                // Mid-round: the restart round has its first accepted update.
                RoundEvent::Accepted { round, .. } => restart_now |= restart == Some(*round),
                RoundEvent::RoundClosed(closed) => {
                    let round = closed.round;
                    let global = f.coordinator.global_adapter().clone();
                    let (per, mean) = evaluate_losses(model, &f.client_data(), Some(&global))?;
                    if let Some(label) = ends.get(&round) {
                        stage_globals.push((label.clone(), global));
                    }
                    let train_s: Vec<f64> = f
                        .clients
                        .iter()
                        .zip(&train_at)
                        .map(|(c, t)| c.train_wall_s - t)
                        .collect();
                    let round_record = round_metrics(
                        names,
                        &p.admitted,
                        closed,
                        &f.log[opened.get(&round).copied().unwrap_or(0)..=at],
                        &f.events,
                        &per,
                        mean,
                        f.coordinator_s - coord_s_at,
                        &train_s,
                    );
                    coord_s_at = f.coordinator_s;
                    train_at = f.clients.iter().map(|c| c.train_wall_s).collect();
                    output.record(&round_record)?;
                    for file in ["adapter_model.safetensors", "adapter_config.json"] {
                        if let Some(b) = f.store.get(&format!("global/{round:06}/{file}")) {
                            output.file(&format!("global/round-{round:03}/{file}"), b)?;
                        }
                    }
                    rounds.push(round_record);
                    progress(Progress::Round {
                        done: round,
                        total,
                        loss: mean,
                    });
                }
                _ => {}
            }
        }
        if finished {
            return Ok((rounds, stage_globals));
        }
        if restart_now {
            progress(Progress::Note(format!(
                "killing the coordinator in round {} and restarting it from its store",
                restart.unwrap_or(0)
            )));
            f.crash_and_restart(p.coord.clone(), p.coord_id.clone())?;
            restart = None;
        }
        passes += 1;
        if passes > MAX_PASSES {
            return Err(SimError::Stalled(MAX_PASSES));
        }
        f.pass()?;
        // Known once `per_job_bytes` is set: the events are not searched on every pass.
        if !memory_said
            && f.per_job_bytes.is_some()
            && let Some(e) = f.events.iter().find(|e| e["event"] == "job_memory")
        {
            memory_said = true;
            progress(Progress::Note(format!(
                "one training job peaks at {:.0} MiB of {} memory: up to {} side by side",
                e["bytes"].as_f64().unwrap_or(0.0) / (1u64 << 20) as f64,
                e["device"].as_str().unwrap_or("host"),
                e["side_by_side"]
            )));
        }
    }
}
