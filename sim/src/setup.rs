//! A run's clients and coordinator from a [`SimConfig`]: each client's data (partitioned or
//! per file, tokenised), identities derived from the seed, and the coordinator's configuration.

use std::path::Path;

use fedtune_aggregation::strategy::{Sampling, StrategyConfig};
use fedtune_aggregation::update::Adapter;
use fedtune_client::trainer::{LocalData, PromptData};
use fedtune_client::{ClientConfig, LoraPin};
use fedtune_coordinator::{CoordConfig, Stage};
use fedtune_engine::LoadedModel;
use fedtune_engine::data::read::{RawRecord, read_records};
use fedtune_engine::data::{Dataset, Example, LoadOptions, Prompt};
use fedtune_engine::train::TrainConfig;
use fedtune_engine::train::grpo::GrpoPrompt;
use fedtune_engine::train::lora::init_adapter;
use fedtune_protocol::{Digest, Hyper, Identity, LoraPlan, Phase, PublicKey, digest, plan_hash};

use crate::config::{Partition, SimConfig, StageSection};
use crate::partition::{hold_out, split};

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

/// GRPO prompts from SFT examples: each conversation up to its answer (or a prompt/completion
/// example's prompt), the answer as the `reference` field that `field_match` and
/// `exact_match` read; other kinds of examples are left out.
pub fn grpo_prompts(
    m: &LoadedModel,
    examples: &[Example],
) -> Result<PromptData, fedtune_engine::Error> {
    let tok = &m.tokenizer;
    let mut prompts = Vec::new();
    for ex in examples {
        let Some((prompt, reference)) = crate::evaluate::prompt_and_reference(ex) else {
            continue;
        };
        let mut fields = serde_json::Map::new();
        fields.insert("reference".into(), reference.into());
        prompts.push(match prompt {
            Prompt::Chat(messages) => GrpoPrompt::chat(messages, fields, tok)?,
            Prompt::Text(text) => GrpoPrompt::text(text, fields, tok)?,
        });
    }
    let mut stop_ids = m.model.config.eos_token_ids.clone();
    stop_ids.extend(tok.eos_id);
    Ok(PromptData {
        prompts,
        tokenizer: Some(std::sync::Arc::new(tok.clone())),
        stop_ids,
    })
}

/// Every client's data, tokenised with `m`'s tokenizer (GRPO prompts from its SFT training
/// examples when the run has GRPO rounds).
pub fn prepare_clients(cfg: &SimConfig, m: &LoadedModel) -> Result<Vec<ClientSetup>, String> {
    let tok = &m.tokenizer;
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
    let with_grpo = cfg.grpo.as_ref().is_some_and(|g| g.rounds > 0);
    let prompts = |examples: &[Example]| -> Result<PromptData, String> {
        if !with_grpo {
            return Ok(PromptData::default());
        }
        grpo_prompts(m, examples).map_err(|e| format!("grpo prompts: {e}"))
    };
    let client = |name, (train, eval), (pairs, eval_pairs), eval_examples, prompts| ClientSetup {
        name,
        data: LocalData {
            train,
            eval,
            pairs,
            eval_pairs,
            prompts,
            pad: tok.pad_id,
            ..Default::default()
        },
        eval_examples,
    };
    let mut out = Vec::with_capacity(n);
    if cfg.data.partition == Partition::PerFile {
        for c in &cfg.data.clients {
            let (train, eval) = match &c.eval {
                Some(e) => (read(&c.train)?, read(e)?),
                None => hold_out(read(&c.train)?, cfg.data.eval_fraction),
            };
            let (train_enc, train_examples) = sft(&c.train, train)?;
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
            out.push(client(
                c.name.clone(),
                (train_enc, eval_enc),
                (p, ep),
                eval_examples,
                prompts(&train_examples)?,
            ));
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
        let (train_enc, train_examples) = sft(path, train)?;
        let (eval_enc, eval_examples) = sft(path, eval)?;
        let (p, ep) = match &pref_shares {
            Some((pp, s)) => (pairs(pp, s[k].0.clone())?, pairs(pp, s[k].1.clone())?),
            None => (Vec::new(), Vec::new()),
        };
        out.push(client(
            format!("client-{k}"),
            (train_enc, eval_enc),
            (p, ep),
            eval_examples,
            prompts(&train_examples)?,
        ));
    }
    Ok(out)
}

fn hyper(s: &StageSection, seed: u64) -> Hyper {
    Hyper {
        beta: s.beta,
        seed,
        ..Hyper::new(s.learning_rate, s.local_steps, s.batch_size)
    }
}

/// The stages of `cfg` with rounds, in order: SFT, DPO, GRPO.
fn stages(cfg: &SimConfig) -> Vec<Stage> {
    let mut out = Vec::new();
    let mut push = |phase, s: &StageSection| {
        if s.rounds > 0 {
            out.push(Stage {
                phase,
                rounds: s.rounds,
                hyper: hyper(s, cfg.seed),
            });
        }
    };
    push(Phase::Sft, &cfg.sft);
    if let Some(d) = &cfg.dpo {
        push(Phase::Dpo, d);
    }
    if let Some(g) = cfg.grpo.as_ref().filter(|g| g.rounds > 0) {
        out.push(Stage {
            phase: Phase::Grpo,
            rounds: g.rounds,
            hyper: Hyper {
                seed: cfg.seed,
                grpo: Some(Box::new(g.plan())),
                ..Hyper::new(g.learning_rate, g.local_steps, g.batch_size)
            },
        });
    }
    out
}

/// The identity of the coordinator (`None`) or of client `k`, derived from the seed.
fn identity(seed: u64, k: Option<usize>) -> Identity {
    let mut s = [0u8; 32];
    s[..8].copy_from_slice(&seed.to_le_bytes());
    s[8..16].copy_from_slice(&k.map_or(u64::MAX, |k| k as u64).to_le_bytes());
    s[16..24].copy_from_slice(b"fedtune!");
    Identity::from_seed(*blake3::hash(&s).as_bytes())
}

/// The coordinator's configuration for `cfg` (clients `admitted`, base pinned by `plan_hash`).
fn coord_config(
    cfg: &SimConfig,
    lora: LoraPlan,
    plan_hash: fedtune_protocol::Digest,
    admitted: &[PublicKey],
) -> CoordConfig {
    let n = admitted.len();
    let s = &cfg.strategy;
    let mut strategy = StrategyConfig::new(s.rule);
    strategy.target_rank = Some(s.target_rank.unwrap_or(cfg.model.rank));
    strategy.norm_bound = s.norm_bound;
    strategy.dp = s.dp;
    strategy.server_optimizer = s.server_optimizer;
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
    let mut stages = stages(cfg).into_iter();
    let first = stages.next().expect("checked: some stage has rounds");
    let timeout_ms = (s.round_timeout_s * 1000.0) as u64;
    let mut coord = CoordConfig::new(
        cfg.name.clone(),
        first.phase,
        first.rounds,
        first.hyper,
        lora,
        strategy,
        timeout_ms,
        plan_hash,
        admitted.iter().copied().collect(),
    );
    coord.then = stages.collect();
    coord.min_results = s.min_results.unwrap_or(sampled.div_ceil(2)).max(1);
    // Simulated clients' updates are held in memory, not streamed: no transport limit.
    coord.max_payload = 1 << 30;
    coord
}

/// The parties of a run, whatever the transport: identities derived from the seed, the plan
/// hash every party pins, the coordinator's configuration and the initial global adapter.
pub struct Parties {
    /// The digest every party takes for the base model (the simulator's stands for the run's
    /// name and model path: every client shares one model).
    pub model_digest: Digest,
    /// Hash of the base model and LoRA configuration.
    pub plan_hash: Digest,
    /// The coordinator's identity.
    pub coord_id: Identity,
    /// The clients' identities.
    pub ids: Vec<Identity>,
    /// The clients' public keys.
    pub admitted: Vec<PublicKey>,
    /// The coordinator's configuration.
    pub coord: CoordConfig,
    /// The first global adapter (`B = 0`).
    pub initial: Adapter,
}

impl Parties {
    /// The parties of `cfg` with `n` clients on `model`.
    pub fn new(cfg: &SimConfig, model: &LoadedModel, n: usize) -> Self {
        let model_digest = digest(format!("{}|{:?}", cfg.name, cfg.model.path).as_bytes());
        let ids: Vec<Identity> = (0..n).map(|k| identity(cfg.seed, Some(k))).collect();
        let admitted: Vec<PublicKey> = ids.iter().map(|i| i.public()).collect();
        let lora = TrainConfig {
            lora_r: cfg.model.rank,
            lora_alpha: cfg.model.lora_alpha,
            target_modules: cfg
                .model
                .target_modules
                .clone()
                .unwrap_or_else(|| TrainConfig::default().target_modules),
            use_dora: cfg.model.use_dora,
            seed: cfg.seed,
            ..Default::default()
        };
        let plan = LoraPlan {
            rank: lora.lora_r,
            lora_alpha: lora.lora_alpha,
            target_modules: lora.target_modules.clone(),
        };
        let plan_hash = plan_hash(&model_digest, &plan);
        Parties {
            model_digest,
            plan_hash,
            coord_id: identity(cfg.seed, None),
            coord: coord_config(cfg, plan, plan_hash, &admitted),
            ids,
            admitted,
            initial: init_adapter(&model.model, &lora),
        }
    }

    /// What every client knows before it connects.
    pub fn client_config(&self, cfg: &SimConfig) -> ClientConfig {
        ClientConfig {
            federation: cfg.name.clone(),
            coordinator: self.coord_id.public(),
            model_digest: self.model_digest,
            lora_pin: LoraPin::default(),
            header_ttl_ms: self.coord.header_ttl_ms,
            max_payload: self.coord.max_payload,
        }
    }
}
