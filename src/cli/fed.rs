//! The federation daemons: `fedtune coord --config coord.toml` and `fedtune client --config
//! client.toml` (over QUIC with mutual TLS; the CA and identities come from `fedtune ca`,
//! [`super::ca`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use burn::tensor::{DType, Device};
use clap::Args;
use fedtune_aggregation::dp::DpConfig;
use fedtune_aggregation::optim::ServerOptimizer;
use fedtune_aggregation::strategy::{Rule, Sampling, StrategyConfig};
use fedtune_client::LoraPin;
use fedtune_client::{Client, ClientConfig};
use fedtune_coordinator::admission::HandshakeLimits;
use fedtune_coordinator::daemon::{ConnectionLimits, DaemonOptions, bind, serve};
use fedtune_coordinator::store::FileStore;
use fedtune_coordinator::{CoordConfig, Coordinator, Stage};
use fedtune_engine::train::TrainConfig;
use fedtune_engine::train::lora::init_adapter;
use fedtune_engine::train::reward::add_score_head;
use fedtune_protocol::clock::now_ms;
use fedtune_protocol::tls;
use fedtune_protocol::{Identity, LoraPlan, Phase, PublicKey, model_digest, plan_hash, quic};
use serde::Deserialize;

use super::ca::read_pair;
use super::plan::LocalFile;

fn default_payload() -> u64 {
    256
}
fn default_upload_memory() -> u64 {
    ConnectionLimits::default().upload_memory >> 20
}
fn default_timeout() -> u64 {
    3600
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientEntry {
    name: String,
    key: String,
}

/// `[handshakes]` of `coord.toml`: bounds on unfinished QUIC handshakes (defaults in
/// [`HandshakeLimits`]).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HandshakeFile {
    retry_above: Option<usize>,
    max_pending: Option<usize>,
    per_address: Option<usize>,
    timeout_s: Option<f64>,
}

impl HandshakeFile {
    fn limits(&self, file: &str) -> anyhow::Result<HandshakeLimits> {
        let d = HandshakeLimits::default();
        for (field, v) in [
            ("max_pending", self.max_pending),
            ("per_address", self.per_address),
        ] {
            anyhow::ensure!(
                v.is_none_or(|v| v > 0),
                "{file}: handshakes.{field} must be positive"
            );
        }
        let timeout = match self.timeout_s {
            Some(t) if !(t > 0.0 && t <= 3600.0) => {
                bail!("{file}: handshakes.timeout_s must be in (0, 3600]")
            }
            Some(t) => Duration::from_secs_f64(t),
            None => d.timeout,
        };
        Ok(HandshakeLimits {
            retry_above: self.retry_above.unwrap_or(d.retry_above),
            max_pending: self.max_pending.unwrap_or(d.max_pending),
            per_address: self.per_address.unwrap_or(d.per_address),
            timeout,
        })
    }
}

/// A later stage of `coord.toml` (`[[then]]`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StageFile {
    phase: Phase,
    rounds: u64,
    local: LocalFile,
}

/// `coord.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CoordFile {
    federation: String,
    model: PathBuf,
    listen: SocketAddr,
    data_dir: PathBuf,
    ca: PathBuf,
    rounds: u64,
    #[serde(default)]
    phase: Option<Phase>,
    #[serde(default)]
    then: Vec<StageFile>,
    rank: usize,
    lora_alpha: f64,
    #[serde(default)]
    target_modules: Option<Vec<String>>,
    /// DoRA: the initial global carries magnitude vectors, which clients train and the
    /// coordinator averages with the factors' weights.
    #[serde(default)]
    use_dora: bool,
    min_results: usize,
    #[serde(default = "default_timeout")]
    round_timeout_s: u64,
    #[serde(default = "default_payload")]
    max_payload_mb: u64,
    /// MiB of completed uploads held in memory at once, all connections together.
    #[serde(default = "default_upload_memory")]
    upload_memory_mb: u64,
    local: LocalFile,
    rule: Rule,
    #[serde(default)]
    target_rank: Option<usize>,
    #[serde(default)]
    norm_bound: Option<f64>,
    #[serde(default)]
    dp: Option<DpConfig>,
    #[serde(default)]
    server_optimizer: Option<ServerOptimizer>,
    #[serde(default)]
    sampling: Option<Sampling>,
    #[serde(default)]
    handshakes: HandshakeFile,
    /// Serve Prometheus metrics at `GET /metrics` on this address (off without it).
    #[serde(default)]
    metrics_listen: Option<SocketAddr>,
    #[serde(default)]
    seed: u64,
    clients: Vec<ClientEntry>,
}

/// `client.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientFile {
    federation: String,
    coordinator: SocketAddr,
    coordinator_key: String,
    ca: PathBuf,
    name: String,
    model: PathBuf,
    /// LoRA settings this site insists on (the plan's are taken where these are absent).
    #[serde(default)]
    rank: Option<usize>,
    #[serde(default)]
    lora_alpha: Option<f64>,
    #[serde(default)]
    target_modules: Option<Vec<String>>,
    train_data: PathBuf,
    #[serde(default)]
    eval_data: Option<PathBuf>,
    #[serde(default)]
    preference_data: Option<PathBuf>,
    /// Unpaired feedback (prompt, completion, true/false label) for KTO rounds.
    #[serde(default)]
    feedback_data: Option<PathBuf>,
    /// Prompts (with the fields the plan's rewards read) for GRPO rounds.
    #[serde(default)]
    prompt_data: Option<PathBuf>,
    /// The teacher of distillation rounds (a model directory or GGUF file sharing the base
    /// model's tokenizer); it stays on this site.
    #[serde(default)]
    teacher: Option<PathBuf>,
    /// A PEFT adapter applied to the teacher.
    #[serde(default)]
    teacher_adapter: Option<PathBuf>,
    /// Prompts with completions for distillation rounds (default: train_data).
    #[serde(default)]
    distill_data: Option<PathBuf>,
    #[serde(default)]
    log: Option<PathBuf>,
    /// Each round's local training log (TRL's `output_dir`): `round-NNN/train_log.jsonl`, and
    /// TensorBoard event files under `round-NNN/runs/` with `report_to = "tensorboard"`.
    #[serde(default)]
    output_dir: Option<PathBuf>,
    /// `"tensorboard"` (one name or a list, transformers' `report_to`); needs `output_dir`.
    #[serde(
        default,
        deserialize_with = "fedtune_engine::train::config::one_or_many"
    )]
    report_to: Vec<fedtune_engine::train::config::ReportTo>,
    #[serde(default = "default_payload")]
    max_payload_mb: u64,
    /// Serve Prometheus metrics at `GET /metrics` on this address (off without it).
    #[serde(default)]
    metrics_listen: Option<SocketAddr>,
    /// On the CPU, `bf16` or `f16` holds the frozen base projections in 16 bits (f32
    /// arithmetic, f32 LoRA factors); `f32` (default).
    #[serde(default)]
    dtype: Option<String>,
    /// Where local training runs: `cpu` (default) or `cuda[:N]`.
    #[serde(default)]
    device: Option<String>,
    /// QLoRA: the local base's projections in NF4 (the adapter and the update are the same).
    #[serde(default)]
    load_in_4bit: bool,
    /// Double-quantise the NF4 scales.
    #[serde(default)]
    bnb_4bit_use_double_quant: bool,
    /// Longest training sequence (TRL's `max_length`; longer ones are truncated).
    #[serde(default = "default_max_length")]
    max_length: usize,
    /// The data files' format, when detection per record is not wanted (`alpaca`, `sharegpt`,
    /// `openai`, `prompt_completion`, ...).
    #[serde(default)]
    format: Option<String>,
    /// Refused with a pointer to coord.toml: the round plan sets it.
    #[serde(default)]
    gradient_accumulation_steps: Option<usize>,
    /// Recompute each block in backward (less memory, more compute).
    #[serde(default)]
    gradient_checkpointing: bool,
    /// bf16 mixed precision on a GPU (TRL's `bf16`).
    #[serde(default)]
    bf16: bool,
    /// f16 mixed precision with loss scaling on a GPU (TRL's `fp16`).
    #[serde(default)]
    fp16: bool,
}

fn default_max_length() -> usize {
    1024
}

pub(super) fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("{}", path.display()))
}

fn targets(t: &Option<Vec<String>>) -> Vec<String> {
    t.clone()
        .unwrap_or_else(|| TrainConfig::default().target_modules)
}

/// Arguments of `fedtune coord` and `fedtune client`.
#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// TOML configuration.
    #[arg(long)]
    config: PathBuf,
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// Arguments of `fedtune coord`.
#[derive(Debug, Args)]
#[command(subcommand_negates_reqs = true, args_conflicts_with_subcommands = true)]
pub struct CoordArgs {
    #[command(subcommand)]
    command: Option<super::status::CoordCommand>,
    /// TOML configuration.
    #[arg(long, required = true)]
    config: Option<PathBuf>,
    /// Start a new federation although `data_dir/store` holds rounds but no state file (the
    /// old store is moved aside to `store.old-<seconds>`, not deleted).
    #[arg(long)]
    new_federation: bool,
}

/// The coordinator's configuration from `coord.toml` (checked), and the admitted clients by
/// name.
fn coord_config(
    f: &CoordFile,
    file: &str,
) -> anyhow::Result<(CoordConfig, BTreeMap<String, PublicKey>)> {
    let mut admitted = BTreeSet::new();
    let mut clients = BTreeMap::new();
    for c in &f.clients {
        let pk = PublicKey::from_hex(&c.key)
            .with_context(|| format!("{file}: clients.{}.key", c.name))?;
        admitted.insert(pk);
        clients.insert(c.name.clone(), pk);
    }
    let lora = LoraPlan {
        rank: f.rank,
        lora_alpha: f.lora_alpha,
        target_modules: targets(&f.target_modules),
    };
    let model_digest = model_digest(&f.model)
        .with_context(|| format!("{file}: model: hashing {}", f.model.display()))?;
    let hash = plan_hash(&model_digest, &lora);
    let mut strategy = StrategyConfig::new(f.rule);
    strategy.target_rank = f.target_rank;
    strategy.norm_bound = f.norm_bound;
    strategy.dp = f.dp;
    strategy.server_optimizer = f.server_optimizer;
    strategy.seed = f.seed;
    if let Some(s) = f.sampling {
        strategy.sampling = s;
    }
    let mut cfg = CoordConfig::new(
        f.federation.clone(),
        f.phase.unwrap_or(Phase::Sft),
        f.rounds,
        f.local.hyper(file, "local")?,
        lora,
        strategy,
        f.round_timeout_s * 1000,
        hash,
        admitted,
    );
    cfg.then = f
        .then
        .iter()
        .enumerate()
        .map(|(i, s)| {
            Ok(Stage {
                phase: s.phase,
                rounds: s.rounds,
                hyper: s.local.hyper(file, &format!("then[{i}].local"))?,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    cfg.min_results = f.min_results;
    cfg.max_payload = f.max_payload_mb << 20;
    cfg.validate().map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
    Ok((cfg, clients))
}

/// The coordinator's state machine: resumed from `data_dir/store`, or a new federation from
/// the base model's freshly initialised adapter (with a score head when a stage trains a
/// reward model). A store with rounds but no state is refused unless `new_federation`, which
/// moves it aside.
fn coord_machine(
    f: &CoordFile,
    file: &str,
    cfg: CoordConfig,
    id: Identity,
    new_federation: bool,
) -> anyhow::Result<Coordinator> {
    let store_dir = f.data_dir.join("store");
    let store = FileStore::open(&store_dir)
        .with_context(|| format!("{file}: data_dir: opening {}", store_dir.display()))?;
    let mut stored = store
        .load_all()
        .with_context(|| format!("reading {}", store_dir.display()))?;
    if !stored.contains_key("state") && !stored.is_empty() {
        // Rounds without the state that says where the federation stands: starting over would
        // silently begin again at round 1 beside them.
        anyhow::ensure!(
            new_federation,
            "{}: holds {} stored files (global adapters, updates) but no `state` file: refusing to \
             start a new federation over them. Restore {} from a backup, or pass --new-federation \
             to move the old store aside and start at round 1",
            store_dir.display(),
            stored.len(),
            store_dir.join("state").display()
        );
        let aside = f.data_dir.join(format!("store.old-{}", now_ms() / 1000));
        std::fs::rename(&store_dir, &aside)
            .with_context(|| format!("moving {} to {}", store_dir.display(), aside.display()))?;
        eprintln!("moved the old store to {}", aside.display());
        // The daemon opens (creates) the new store.
        stored.clear();
    }
    if stored.contains_key("state") {
        eprintln!("resuming from {}", f.data_dir.display());
        return Coordinator::recover(cfg, id, &stored)
            .with_context(|| format!("resuming from {}", store_dir.display()));
    }
    let m = fedtune_engine::load_model(&f.model, &Device::flex(), DType::F32)
        .with_context(|| format!("{file}: model: loading {}", f.model.display()))?;
    let lora = TrainConfig {
        lora_r: cfg.lora.rank,
        lora_alpha: cfg.lora.lora_alpha,
        target_modules: cfg.lora.target_modules.clone(),
        use_dora: f.use_dora,
        seed: f.seed,
        ..TrainConfig::default()
    };
    let mut initial = init_adapter(&m.model, &lora);
    if cfg.trains_reward_model() {
        add_score_head(&mut initial, &m.model.config, f.seed);
    }
    Coordinator::new(cfg, id, initial, now_ms()).with_context(|| file.to_string())
}

/// Runs `fedtune coord`.
pub fn run_coord(a: CoordArgs) -> anyhow::Result<()> {
    if let Some(super::status::CoordCommand::Status(s)) = a.command {
        return super::status::run(s);
    }
    let config = a.config.context("--config is required")?;
    let f: CoordFile = read_toml(&config)?;
    let file = config.display().to_string();
    checks::check_coord_file(&f, &file)?;
    let handshakes = f.handshakes.limits(&file)?;
    let (cfg, clients) = coord_config(&f, &file)?;
    let id = Identity::load(&f.ca.join("coordinator.id"))?;
    let reset_id = id.clone();
    let machine = coord_machine(&f, &file, cfg, id, a.new_federation)?;
    let ca = std::fs::read_to_string(f.ca.join("ca.pem"))
        .with_context(|| format!("reading {}", f.ca.join("ca.pem").display()))?;
    let server = quic::server_config(tls::server_config(&ca, &read_pair(&f.ca, "coordinator")?)?)?;
    let rt = tokio::runtime::Runtime::new()?;
    let summary = rt.block_on(async {
        let endpoint = bind(server, f.listen, &reset_id)?;
        println!("coordinator of {} listening on {}", f.federation, f.listen);
        serve(
            machine,
            endpoint,
            DaemonOptions {
                data_dir: f.data_dir.clone(),
                clients,
                linger: Duration::from_secs(5),
                console: true,
                metrics: f.metrics_listen,
                limits: ConnectionLimits {
                    handshakes,
                    upload_memory: f.upload_memory_mb << 20,
                    ..Default::default()
                },
            },
            shutdown_signal(),
        )
        .await
    })?;
    let h = summary.handshakes;
    println!(
        "{} rounds done; rejections {:?}; QUIC attempts: {} accepted, {} retried, {} refused, \
         {} handshakes timed out, at most {} pending; round log {}",
        summary.rounds,
        summary.rejections,
        h.accepted,
        h.retried,
        h.refused,
        h.timed_out,
        h.peak_pending,
        f.data_dir.join("rounds.jsonl").display()
    );
    Ok(())
}

/// Runs `fedtune client`.
pub fn run_client(a: DaemonArgs) -> anyhow::Result<()> {
    let f: ClientFile = read_toml(&a.config)?;
    let coordinator = PublicKey::from_hex(&f.coordinator_key)
        .with_context(|| format!("{}: coordinator_key", a.config.display()))?;
    let model_digest = model_digest(&f.model).with_context(|| {
        format!(
            "{}: model: hashing {}",
            a.config.display(),
            f.model.display()
        )
    })?;
    let file = a.config.display().to_string();
    let checks::Training {
        device,
        dt,
        half,
        format,
    } = checks::check_client_file(&f, &file)?;
    let half = half.filter(|_| !f.load_in_4bit);
    let mut m = match half {
        Some(bf16) => fedtune_engine::load_model_half(&f.model, &Device::flex(), bf16),
        None => fedtune_engine::load_model(&f.model, &Device::flex(), DType::F32),
    }
    .with_context(|| format!("{file}: model: loading {}", f.model.display()))?;
    if f.load_in_4bit {
        m.model.quantize_nf4(f.bnb_4bit_use_double_quant);
    }
    let (data, model) = checks::local_data(&f, &file, m, format, dt)?;
    let id = Identity::load(&f.ca.join(format!("{}.id", f.name)))?;
    let ca = std::fs::read_to_string(f.ca.join("ca.pem"))
        .with_context(|| format!("reading {}", f.ca.join("ca.pem").display()))?;
    let quic = quic::client_config(tls::client_config(&ca, &read_pair(&f.ca, &f.name)?)?)?;
    let machine = Client::new(
        ClientConfig {
            federation: f.federation.clone(),
            coordinator,
            model_digest,
            lora_pin: LoraPin {
                rank: f.rank,
                lora_alpha: f.lora_alpha,
                target_modules: f.target_modules.clone(),
            },
            header_ttl_ms: 24 * 3600 * 1000,
            max_payload: f.max_payload_mb << 20,
        },
        id,
    );
    let held = match half {
        Some(bf16) => format!(
            "; frozen base in {}, {}",
            if bf16 { "bf16" } else { "f16" },
            fedtune_engine::kernels::blas::half_products(bf16)
        ),
        None => String::new(),
    };
    println!(
        "client {} of {} → {}{held}",
        f.name, f.federation, f.coordinator
    );
    let rt = tokio::runtime::Runtime::new()?;
    let base = fedtune_client::trainer::Base::on(model, device, dt)
        .with_context(|| format!("{}: device", a.config.display()))?;
    if let fedtune_client::trainer::Base::Gpu(m) = &base {
        println!("training on {:?} in {:?}", m.gpu, m.dt);
    }
    let digest = rt.block_on(fedtune_client::daemon::run(
        machine,
        quic,
        Arc::new(base),
        Arc::new(data),
        fedtune_client::daemon::ClientOptions {
            coordinator: f.coordinator,
            server_name: tls::COORDINATOR_NAME.into(),
            max_payload: f.max_payload_mb << 20,
            log: f.log.clone(),
            max_attempts: 20,
            metrics: f.metrics_listen,
        },
    ))?;
    let hex = hex::encode(digest);
    println!("federation finished; final global adapter blake3 {hex}");
    Ok(())
}

mod checks;
#[cfg(test)]
mod config_examples;
