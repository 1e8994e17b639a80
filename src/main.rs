//! `fedtune`: federated LoRA/QLoRA fine-tuning of language models. This binary only parses
//! arguments and calls into the workspace crates; see ARCHITECTURE.md for the map.

mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    cli::init_logging(args.verbose);
    match cli::run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
