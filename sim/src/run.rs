//! Running a [`SimConfig`]: the clients' data (partitioned or per file), the coordinator's
//! configuration, the seeded faults as hooks of the in-memory [`Federation`], and per-round
//! evaluation of the global adapter on every client's held-out data into `metrics.jsonl`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use fedtune_aggregation::strategy::{Sampling, StrategyConfig};
use fedtune_aggregation::update::Adapter;
use fedtune_client::trainer::LocalData;
use fedtune_client::{Client, ClientConfig};
use fedtune_coordinator::{CoordConfig, Coordinator, Stage};
use fedtune_engine::data::read::{RawRecord, read_records};
use fedtune_engine::data::{Dataset, Example, LoadOptions};
use fedtune_engine::{LoadedModel, Tokenizer};
use fedtune_protocol::{Hyper, Identity, Phase, PublicKey, ToCoordinator, digest};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Exp, Normal};

use crate::config::{Attack, Partition, SimConfig, StageSection};
use crate::evaluate::{GenerationScores, generations, held_out_loss};
use crate::memory::{Fate, Federation, SimClient, SimError};
use crate::partition::{hold_out, split};

/// Simulated start time (ms since the Unix epoch): 2026-01-01.
pub const T0: u64 = 1_767_225_600_000;

/// A client's data before the simulation.
pub struct ClientSetup {
    /// Name in reports.
    pub name: String,
    /// Tokenised data.
    pub data: LocalData,
    /// Held-out examples as text (for generations).
    pub eval_examples: Vec<Example>,
}

fn read(path: &Path) -> Result<Vec<RawRecord>, String> {
    let (records, errors) = read_records(path).map_err(|e| e.to_string())?;
    if let Some(e) = errors.into_iter().next() {
        return Err(e.to_string());
    }
    Ok(records)
}

fn dataset(path: &Path, records: Vec<RawRecord>) -> Result<Dataset, String> {
    Dataset::from_records(path, records, Vec::new(), LoadOptions::default())
        .map_err(|e| e.to_string())
}

/// A client's share: `(train, eval)` records.
type Share = (Vec<RawRecord>, Vec<RawRecord>);

/// Shares of `path` for `n` clients.
fn shares(cfg: &SimConfig, path: &Path, n: usize, salt: u64) -> Result<Vec<Share>, String> {
    let parts = split(read(path)?, &cfg.data.partition, n, cfg.seed ^ salt)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(parts
        .into_iter()
        .map(|p| hold_out(p, cfg.data.eval_fraction))
        .collect())
}

/// Every client's data, tokenised with `tok`.
pub fn prepare_clients(cfg: &SimConfig, tok: &Tokenizer) -> Result<Vec<ClientSetup>, String> {
    let n = cfg.num_clients();
    let max_len = Some(cfg.data.max_seq_length);
    let sft = |path: &Path, recs: Vec<RawRecord>| -> Result<(Vec<_>, Vec<Example>), String> {
        let d = dataset(path, recs)?;
        let enc = d.encode_sft(tok, max_len).map_err(|e| e.to_string())?;
        Ok((enc, d.examples.into_iter().map(|(_, e)| e).collect()))
    };
    let pairs = |path: &Path, recs: Vec<RawRecord>| -> Result<Vec<_>, String> {
        if recs.is_empty() {
            return Ok(Vec::new());
        }
        let d = dataset(path, recs)?;
        d.encode_pairs(tok, None, max_len)
            .map(|(p, _)| p)
            .map_err(|e| e.to_string())
    };
    let mut out = Vec::with_capacity(n);
    if cfg.data.partition == Partition::PerFile {
        for c in &cfg.data.clients {
            let (train, eval) = match &c.eval {
                Some(e) => (read(&c.train)?, read(e)?),
                None => hold_out(read(&c.train)?, cfg.data.eval_fraction),
            };
            let (train_enc, _) = sft(&c.train, train)?;
            let eval_path = c.eval.as_ref().unwrap_or(&c.train);
            let (eval_enc, eval_examples) = sft(eval_path, eval)?;
            let (p, ep) = match (&c.preferences, &c.eval_preferences) {
                (Some(p), Some(e)) => (pairs(p, read(p)?)?, pairs(e, read(e)?)?),
                (Some(p), None) => {
                    let (t, e) = hold_out(read(p)?, cfg.data.eval_fraction);
                    (pairs(p, t)?, pairs(p, e)?)
                }
                _ => (Vec::new(), Vec::new()),
            };
            out.push(ClientSetup {
                name: c.name.clone(),
                data: LocalData {
                    train: train_enc,
                    eval: eval_enc,
                    pairs: p,
                    eval_pairs: ep,
                    pad: tok.pad_id,
                },
                eval_examples,
            });
        }
        return Ok(out);
    }
    let path = cfg.data.train.as_ref().expect("checked");
    let sft_shares = shares(cfg, path, n, 0)?;
    let pref_shares = match &cfg.data.preferences {
        Some(p) => Some((p.clone(), shares(cfg, p, n, 1)?)),
        None => None,
    };
    for (k, (train, eval)) in sft_shares.into_iter().enumerate() {
        let (train_enc, _) = sft(path, train)?;
        let (eval_enc, eval_examples) = sft(path, eval)?;
        let (p, ep) = match &pref_shares {
            Some((pp, s)) => (pairs(pp, s[k].0.clone())?, pairs(pp, s[k].1.clone())?),
            None => (Vec::new(), Vec::new()),
        };
        out.push(ClientSetup {
            name: format!("client-{k}"),
            data: LocalData {
                train: train_enc,
                eval: eval_enc,
                pairs: p,
                eval_pairs: ep,
                pad: tok.pad_id,
            },
            eval_examples,
        });
    }
    Ok(out)
}

fn hyper(s: &StageSection, seed: u64) -> Hyper {
    Hyper {
        learning_rate: s.learning_rate,
        local_steps: s.local_steps,
        batch_size: s.batch_size,
        beta: s.beta,
        seed,
    }
}

/// The identity of the coordinator (`None`) or of client `k`, derived from the seed.
pub fn identity(seed: u64, k: Option<usize>) -> Identity {
    let mut s = [0u8; 32];
    s[..8].copy_from_slice(&seed.to_le_bytes());
    s[8..16].copy_from_slice(&k.map_or(u64::MAX, |k| k as u64).to_le_bytes());
    s[16..24].copy_from_slice(b"fedtune!");
    Identity::from_seed(*blake3::hash(&s).as_bytes())
}

/// The coordinator's configuration for `cfg` (clients `admitted`, base pinned by `plan_hash`).
pub fn coord_config(
    cfg: &SimConfig,
    plan_hash: fedtune_protocol::Digest,
    admitted: &[PublicKey],
) -> CoordConfig {
    let n = admitted.len();
    let s = &cfg.strategy;
    let mut strategy = StrategyConfig::new(s.rule);
    strategy.target_rank = Some(s.target_rank.unwrap_or(cfg.model.rank));
    strategy.norm_bound = s.norm_bound;
    strategy.dp = s.dp;
    strategy.seed = cfg.seed;
    let expected = ((n as f64 * s.fraction).ceil() as usize)
        .min(s.max_clients.unwrap_or(n))
        .clamp(1, n);
    // By default a round opens once the expected sample is connected.
    let min_clients = s.min_clients.unwrap_or(expected).clamp(1, n);
    strategy.sampling = Sampling {
        fraction: s.fraction,
        min_clients,
        max_clients: s.max_clients,
    };
    let sampled = expected.max(min_clients);
    let (first, then) = match (&cfg.dpo, cfg.sft.rounds) {
        (Some(d), 0) => ((Phase::Dpo, d), Vec::new()),
        (Some(d), _) if d.rounds > 0 => (
            (Phase::Sft, &cfg.sft),
            vec![Stage {
                phase: Phase::Dpo,
                rounds: d.rounds,
                hyper: hyper(d, cfg.seed),
            }],
        ),
        _ => ((Phase::Sft, &cfg.sft), Vec::new()),
    };
    let timeout_ms = (s.round_timeout_s * 1000.0) as u64;
    CoordConfig {
        federation: cfg.name.clone(),
        rounds: first.1.rounds,
        phase: first.0,
        hyper: hyper(first.1, cfg.seed),
        then,
        rank: cfg.model.rank,
        lora_alpha: cfg.model.lora_alpha,
        strategy,
        min_results: s.min_results.unwrap_or(sampled.div_ceil(2)).max(1),
        round_timeout_ms: timeout_ms,
        max_payload: 1 << 30,
        header_ttl_ms: timeout_ms.saturating_mul(4).max(3_600_000),
        max_skew_ms: 60_000,
        plan_hash,
        admitted: admitted.iter().copied().collect(),
    }
}

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
            let n = Normal::new(0.0f64, std).expect("std is finite");
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
    pub coordinator_log: Vec<serde_json::Value>,
    /// Injected-fault events.
    pub events: Vec<serde_json::Value>,
    /// Rejections by reason.
    pub rejections: BTreeMap<String, u64>,
    /// Generations before (base) and after (final global), per client.
    pub generations: Vec<(String, GenerationScores, GenerationScores)>,
    /// Client names.
    pub names: Vec<String>,
    /// Wall-clock seconds of the whole run.
    pub wall_s: f64,
}

/// Progress of a run.
#[derive(Debug, Clone)]
pub enum Progress {
    /// A round closed.
    Round {
        /// Rounds done.
        done: u64,
        /// Rounds in all.
        total: u64,
        /// Global held-out loss.
        loss: f64,
    },
    /// Free text (evaluation, restarts).
    Note(String),
}

/// Held-out loss of the model with `adapter` (or the base) for each client, and the
/// token-weighted mean.
pub(crate) fn evaluate_losses(
    m: &LoadedModel,
    clients: &[&LocalData],
    adapter: Option<&Adapter>,
) -> Result<(Vec<f64>, f64), SimError> {
    let mut model = m.model.clone();
    if let Some(a) = adapter {
        model
            .attach_weights(a, 0.0)
            .map_err(|source| SimError::Train { client: 0, source })?;
    }
    let mut per = Vec::new();
    let (mut sum, mut toks) = (0.0, 0usize);
    for c in clients {
        let (l, t) = held_out_loss(&model, &c.eval, c.pad);
        per.push(l);
        if l.is_finite() {
            sum += l * t as f64;
            toks += t;
        }
    }
    Ok((
        per,
        if toks > 0 {
            sum / toks as f64
        } else {
            f64::NAN
        },
    ))
}

/// The output directory writer.
pub(crate) struct Output {
    dir: Option<PathBuf>,
    metrics: Option<std::fs::File>,
}

impl Output {
    pub(crate) fn new(dir: Option<&Path>) -> Result<Self, SimError> {
        let Some(d) = dir else {
            return Ok(Output {
                dir: None,
                metrics: None,
            });
        };
        std::fs::create_dir_all(d).map_err(|e| SimError::Io(format!("{}: {e}", d.display())))?;
        let p = d.join("metrics.jsonl");
        let f =
            std::fs::File::create(&p).map_err(|e| SimError::Io(format!("{}: {e}", p.display())))?;
        Ok(Output {
            dir: Some(d.to_path_buf()),
            metrics: Some(f),
        })
    }

    pub(crate) fn record(&mut self, v: &serde_json::Value) -> Result<(), SimError> {
        if let Some(f) = &mut self.metrics {
            writeln!(f, "{v}").map_err(|e| SimError::Io(format!("metrics.jsonl: {e}")))?;
        }
        Ok(())
    }

    pub(crate) fn file(&self, rel: &str, bytes: &[u8]) -> Result<(), SimError> {
        if let Some(d) = &self.dir {
            let p = d.join(rel);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| SimError::Io(format!("{}: {e}", parent.display())))?;
            }
            std::fs::write(&p, bytes).map_err(|e| SimError::Io(format!("{}: {e}", p.display())))?;
        }
        Ok(())
    }
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
    let n = clients.len();
    let mut output = Output::new(out)?;
    let plan_hash = digest(format!("{}|{:?}", cfg.name, cfg.model.path).as_bytes());
    let coord_id = identity(cfg.seed, None);
    let ids: Vec<Identity> = (0..n).map(|k| identity(cfg.seed, Some(k))).collect();
    let admitted: Vec<PublicKey> = ids.iter().map(|i| i.public()).collect();
    let ccfg = coord_config(cfg, plan_hash, &admitted);
    let total = ccfg.total_rounds();
    let lora = fedtune_engine::train::TrainConfig {
        lora_r: cfg.model.rank,
        lora_alpha: cfg.model.lora_alpha,
        target_modules: cfg
            .model
            .target_modules
            .clone()
            .unwrap_or_else(|| fedtune_engine::train::TrainConfig::default().target_modules),
        seed: cfg.seed,
        ..Default::default()
    };
    let initial = fedtune_engine::train::lora::init_adapter(&model.model, &lora);
    let coordinator = Coordinator::new(ccfg.clone(), coord_id.clone(), initial, T0)?;
    let attacks: BTreeMap<usize, Attack> = cfg
        .faults
        .byzantine
        .iter()
        .map(|b| (b.client, b.attack))
        .collect();
    let names: Vec<String> = clients.iter().map(|c| c.name.clone()).collect();
    let eval_examples: Vec<Vec<Example>> =
        clients.iter().map(|c| c.eval_examples.clone()).collect();
    let sim_clients: Vec<SimClient> = clients
        .into_iter()
        .enumerate()
        .map(|(k, c)| {
            let wrong = attacks.get(&k) == Some(&Attack::WrongBase);
            let machine = Client::new(
                ClientConfig {
                    federation: cfg.name.clone(),
                    coordinator: coord_id.public(),
                    plan_hash: if wrong {
                        digest(b"another base model")
                    } else {
                        plan_hash
                    },
                    header_ttl_ms: ccfg.header_ttl_ms,
                    max_payload: 1 << 30,
                    lora_alpha: cfg.model.lora_alpha,
                },
                ids[k].clone(),
            );
            SimClient::new(machine, c.data, (cfg.faults.train_time_s * 1000.0) as u64)
        })
        .collect();
    let mut f = Federation::new(
        coordinator,
        sim_clients,
        &model.model,
        cfg.model.lora_alpha,
        T0,
    );
    f.parallel = cfg.parallel;
    let faults = cfg.faults.clone();
    let seed = cfg.seed;
    let byz = attacks.clone();
    f.fate = Some(Box::new(move |k, job, _now| {
        let mut rng = rng_for(seed, k, job.plan.round, 1);
        let ms = faults.train_time_s * 1000.0 * rng.random_range(0.8..1.2);
        if !byz.contains_key(&k) && rng.random_bool(faults.dropout) {
            return Fate::DropOut;
        }
        let mut ms = ms;
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
    let mut last: BTreeMap<usize, ToCoordinator> = BTreeMap::new();
    f.tamper = Some(Box::new(move |k, _now, msg| {
        if !replayers.contains(&k) || !matches!(msg, ToCoordinator::Update { .. }) {
            return vec![msg];
        }
        // Send the previous round's signed update instead of this one.
        match last.insert(k, msg.clone()) {
            Some(old) => vec![old],
            None => vec![msg],
        }
    }));
    f.connect_all();

    let data: Vec<LocalData> = f.clients.iter().map(|c| c.data.clone()).collect();
    let data: Vec<&LocalData> = data.iter().collect();
    let mut rounds = vec![base_record(model, &data, &names, &mut output)?];
    let base_mean = num(&rounds[0]["global_eval_loss"]);
    progress(Progress::Round {
        done: 0,
        total,
        loss: base_mean,
    });
    let mut restarted = false;
    let mut seen_closed = 0usize;
    let mut coord_s_at = 0.0;
    let mut train_at: Vec<f64> = vec![0.0; n];
    while !f.coordinator.is_finished() {
        let restart_round = cfg.faults.coordinator_restart_round.filter(|_| !restarted);
        let closed_before = seen_closed;
        f.run_until(1_000_000, |log| {
            let closed = log.iter().filter(|e| e["event"] == "round_closed").count();
            if closed > closed_before {
                return true;
            }
            // Mid-round: the restart round is open and has at least one accepted update.
            restart_round.is_some_and(|r| {
                log.iter()
                    .any(|e| e["event"] == "accepted" && e["round"] == r)
            })
        })?;
        let closed: Vec<serde_json::Value> = f
            .log
            .iter()
            .filter(|e| e["event"] == "round_closed")
            .cloned()
            .collect();
        if closed.len() == seen_closed {
            if let Some(r) = restart_round
                && !f.coordinator.is_finished()
            {
                progress(Progress::Note(format!(
                    "killing the coordinator in round {r} and restarting it from its store"
                )));
                f.crash_and_restart(ccfg.clone(), coord_id.clone())?;
                restarted = true;
                continue;
            }
            if f.coordinator.is_finished() {
                break;
            }
            continue;
        }
        seen_closed = closed.len();
        let rec = closed.last().expect("one closed").clone();
        let round = rec["round"].as_u64().unwrap_or(0);
        // The entries of this round: from its first opening to its closing.
        let start = f
            .log
            .iter()
            .position(|e| e["event"] == "round_open" && e["round"] == round)
            .unwrap_or(0);
        let new_log = &f.log[start..];
        let global = f.coordinator.global_adapter().clone();
        let (per, mean) = evaluate_losses(model, &data, Some(&global))?;
        let round_record = round_metrics(
            &names,
            &admitted,
            &rec,
            new_log,
            &f.events,
            &per,
            mean,
            f.coordinator_s - coord_s_at,
            &f.clients
                .iter()
                .zip(&train_at)
                .map(|(c, t)| c.train_wall_s - t)
                .collect::<Vec<_>>(),
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
    f.run(1_000)?;
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
    Ok(SimOutcome {
        rounds,
        global,
        global_bytes,
        coordinator_log: f.log.clone(),
        events: f.events.clone(),
        rejections: f.coordinator.rejections().clone(),
        generations: gens,
        names,
        wall_s: started.elapsed().as_secs_f64(),
    })
}

fn num(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// Round 0 of `metrics.jsonl`: the base model on every client's held-out data.
pub(crate) fn base_record(
    model: &LoadedModel,
    data: &[&LocalData],
    names: &[String],
    output: &mut Output,
) -> Result<serde_json::Value, SimError> {
    let (per, mean) = evaluate_losses(model, data, None)?;
    output.record(&serde_json::json!({
        "round": 0, "phase": "base", "global_eval_loss": mean,
        "clients": names.iter().zip(&per).map(|(name, l)| serde_json::json!({
            "name": name, "global_eval_loss": l,
        })).collect::<Vec<_>>(),
    }))?;
    Ok(serde_json::json!({
        "round": 0, "phase": "base", "global_eval_loss": mean, "per_client": per,
    }))
}

/// Greedy generations of the base model and of `global` on each client's held-out prompts.
pub(crate) fn generations_before_after(
    cfg: &SimConfig,
    model: &LoadedModel,
    global: &Adapter,
    names: &[String],
    eval_examples: &[Vec<Example>],
    progress: &mut dyn FnMut(Progress),
) -> Result<Vec<(String, GenerationScores, GenerationScores)>, SimError> {
    let mut gens = Vec::new();
    if cfg.eval.generations == 0 {
        return Ok(gens);
    }
    progress(Progress::Note("generating on held-out prompts".into()));
    let base = &model.model;
    let mut tuned = model.model.clone();
    tuned
        .attach_weights(global, 0.0)
        .map_err(|source| SimError::Train { client: 0, source })?;
    for (k, ex) in eval_examples.iter().enumerate() {
        let g = |m| {
            generations(
                m,
                &model.tokenizer,
                ex,
                cfg.eval.generations,
                cfg.eval.max_new_tokens,
            )
            .map_err(|source| SimError::Train { client: k, source })
        };
        gens.push((names[k].clone(), g(base)?, g(&tuned)?));
    }
    Ok(gens)
}

/// The `metrics.jsonl` record of one closed round.
#[allow(clippy::too_many_arguments)]
pub(crate) fn round_metrics(
    names: &[String],
    keys: &[PublicKey],
    closed: &serde_json::Value,
    log: &[serde_json::Value],
    events: &[serde_json::Value],
    per: &[f64],
    mean: f64,
    coordinator_s: f64,
    train_s: &[f64],
) -> serde_json::Value {
    let round = closed["round"].as_u64().unwrap_or(0);
    let index: BTreeMap<String, usize> = keys
        .iter()
        .enumerate()
        .map(|(k, pk)| (pk.to_hex(), k))
        .collect();
    let name_of = |hex: &serde_json::Value| {
        hex.as_str()
            .and_then(|h| index.get(h))
            .map(|&k| names[k].clone())
            .unwrap_or_else(|| hex.to_string())
    };
    let used: Vec<String> = closed["used"]
        .as_array()
        .map(|a| a.iter().map(&name_of).collect())
        .unwrap_or_default();
    let mut clients = Vec::new();
    for (k, name) in names.iter().enumerate() {
        let hex = keys[k].to_hex();
        let mut c = serde_json::json!({"name": name, "global_eval_loss": per[k]});
        if let Some(t) = train_s.get(k).filter(|t| **t > 0.0) {
            c["train_wall_s"] = (*t).into();
        }
        for e in log.iter().filter(|e| e["client"] == hex.as_str()) {
            match e["event"].as_str() {
                Some("accepted") if e["round"] == round => {
                    c["status"] = "accepted".into();
                    c["num_examples"] = e["num_examples"].clone();
                    c["upload_bytes"] = e["bytes"].clone();
                    for (m, v) in e["metrics"].as_object().into_iter().flatten() {
                        c[m] = v.clone();
                    }
                }
                Some("rejected") => {
                    c["status"] = "rejected".into();
                    c["reason"] = e["detail"].clone();
                }
                Some("declined") => {
                    c["status"] = "declined".into();
                    c["reason"] = e["reason"].clone();
                }
                _ => {}
            }
        }
        for e in events
            .iter()
            .filter(|e| e["client"] == k && e["round"] == round)
        {
            if c.get("status").is_none() || e["event"] == "dropout" {
                c["status"] = e["event"].clone();
            }
        }
        clients.push(c);
    }
    serde_json::json!({
        "round": round,
        "phase": closed["phase"],
        "global_eval_loss": mean,
        "used": used,
        "failures": closed["failures"].as_array().map(|a| a.iter().map(|f| serde_json::json!({
            "client": name_of(&f["client"]), "reason": f["reason"],
        })).collect::<Vec<_>>()),
        "metrics": closed["metrics"],
        "dp_epsilon": closed["report"]["epsilon"],
        "sim_seconds": closed["seconds"],
        "coordinator_seconds": coordinator_s,
        "rejections": closed["rejections"],
        "clients": clients,
    })
}
