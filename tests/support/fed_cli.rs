//! What the CLI federation tests share: `fedtune` runs that must succeed, a federation CA in a
//! fresh directory, client certificates, a free UDP port for the coordinator.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// `fedtune <args>`, which must succeed: its stdout.
pub fn fedtune(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_fedtune"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fedtune {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A fresh temporary directory with a federation CA `demo` in `ca/`: `(dir, ca, the printed
/// coordinator_key line)`.
pub fn federation_dir(name: &str) -> (PathBuf, PathBuf, String) {
    let dir = std::env::temp_dir().join(format!("fedtune-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca");
    let init = fedtune(&[
        "ca",
        "init",
        "--dir",
        ca.to_str().unwrap(),
        "--federation",
        "demo",
    ]);
    (dir, ca, init)
}

/// `fedtune ca issue` for client `name`: its `[[clients]]` entry.
pub fn issue(ca: &Path, name: &str) -> String {
    fedtune(&[
        "ca",
        "issue",
        "--dir",
        ca.to_str().unwrap(),
        "--client",
        name,
    ])
}

/// A UDP port free on loopback (for the coordinator's QUIC endpoint).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
