//! Command-line interface: one module per subcommand, each a thin layer over a library crate.

mod ca;
mod common;
mod distill;
mod dpo;
mod eval;
mod export;
mod fed;
mod fetch;
mod generate;
mod grpo;
mod kto;
mod merge;
mod plan;
mod reward;
mod run;
mod sim;
mod status;
mod target;
mod train;

use clap::{Parser, Subcommand};

/// Federated fine-tuning of language models: local LoRA/QLoRA SFT and DPO, signed adapter
/// updates over QUIC, exact and robust aggregation.
#[derive(Debug, Parser)]
#[command(name = "fedtune", version, about)]
pub struct Cli {
    /// More logging (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Evaluate a model (and adapter) on a dataset: loss, perplexity, and DPO metrics.
    Eval(eval::EvalArgs),
    /// Generate text from a prompt.
    Generate(generate::GenerateArgs),
    /// Train locally: supervised fine-tuning (LoRA, QLoRA, full) or preference alignment (DPO).
    #[command(subcommand)]
    Train(Box<train::TrainCommand>),
    /// Merge an adapter into its base and write a transformers-loadable model directory.
    Export(export::ExportArgs),
    /// Merge full-weight safetensors files (mergekit semantics: linear, task_arithmetic, ties,
    /// dare_ties, dare_linear).
    Merge(merge::MergeArgs),
    /// Combine PEFT adapters into one PEFT adapter with an aggregation rule.
    MergeAdapters(merge::MergeAdaptersArgs),
    /// Federation CA: certificates and identities for the coordinator and clients.
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// Run the coordinator daemon (QUIC, mutual TLS).
    Coord(fed::CoordArgs),
    /// Run a client daemon: train locally on private data, upload signed adapter updates.
    Client(fed::DaemonArgs),
    /// Simulate a whole federation on this machine (partitioned data, faults, report).
    Sim(sim::SimArgs),
    /// Write the quickstart's synthetic clinical notes (per hospital, seeded).
    GenClinical(sim::GenClinicalArgs),
}

/// Sets up `tracing` on stderr.
pub fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Eval(a) => eval::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Train(c) => train::run(*c),
        Command::Export(a) => export::run(a),
        Command::Merge(a) => merge::run_merge(a),
        Command::MergeAdapters(a) => merge::run_merge_adapters(a),
        Command::Ca(c) => ca::run_ca(c),
        Command::Coord(a) => fed::run_coord(a),
        Command::Client(a) => fed::run_client(a),
        Command::Sim(a) => sim::run(a),
        Command::GenClinical(a) => sim::run_gen_clinical(a),
    }
}

#[cfg(test)]
mod tests {
    /// clap's consistency checks (unique long names, valid conflicts) on every subcommand:
    /// they run by themselves only in debug builds, and the tests run in release.
    #[test]
    fn every_command_line_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
