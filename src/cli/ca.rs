//! `fedtune ca init|issue`: a federation CA, the coordinator's and the clients' certificates
//! and ed25519 identities, written once with mode 0600 and never overwritten.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;
use fedtune_protocol::Identity;
use fedtune_protocol::tls::{self, CertPair};

/// `fedtune ca ...`.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a federation CA, the coordinator's certificate and its ed25519 identity.
    Init {
        /// Directory for the files (created; existing files are never overwritten).
        #[arg(long)]
        dir: PathBuf,
        /// Federation id.
        #[arg(long)]
        federation: String,
        /// Extra DNS names or IPs of the coordinator's certificate.
        #[arg(long, value_delimiter = ',')]
        host: Vec<String>,
    },
    /// Issue a client's certificate and ed25519 identity.
    Issue {
        /// The CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// Client name (its certificate's common name).
        #[arg(long)]
        client: String,
    },
}

fn write_new(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        if path.extension().is_some_and(|e| e == "key") {
            opts.mode(0o600);
        }
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("creating {} (it must not exist yet)", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

pub(super) fn read_pair(dir: &Path, name: &str) -> anyhow::Result<CertPair> {
    let read = |ext: &str| {
        let p = dir.join(format!("{name}.{ext}"));
        std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
    };
    Ok(CertPair {
        cert_pem: read("pem")?,
        key_pem: read("key")?,
    })
}

fn valid_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty()
        || name == "ca"
        || name == "coordinator"
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        bail!(
            "client name {name:?}: use letters, digits, '-', '_' or '.', and not `ca` or `coordinator`"
        );
    }
    Ok(())
}

/// Runs `fedtune ca`.
pub fn run_ca(c: CaCommand) -> anyhow::Result<()> {
    match c {
        CaCommand::Init {
            dir,
            federation,
            host,
        } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let ca = tls::new_ca(&federation)?;
            let mut hosts = vec!["localhost".to_string()];
            hosts.extend(host);
            let server = tls::issue(&ca, "coordinator", true, &hosts)?;
            write_new(&dir.join("ca.pem"), &ca.cert_pem)?;
            write_new(&dir.join("ca.key"), &ca.key_pem)?;
            write_new(&dir.join("coordinator.pem"), &server.cert_pem)?;
            write_new(&dir.join("coordinator.key"), &server.key_pem)?;
            let id = Identity::generate()?;
            id.save(&dir.join("coordinator.id"))
                .with_context(|| format!("writing {}", dir.join("coordinator.id").display()))?;
            println!("coordinator_key = \"{}\"", id.public());
        }
        CaCommand::Issue { dir, client } => {
            valid_name(&client)?;
            let ca = read_pair(&dir, "ca")?;
            let pair = tls::issue(&ca, &client, false, &[])?;
            write_new(&dir.join(format!("{client}.pem")), &pair.cert_pem)?;
            write_new(&dir.join(format!("{client}.key")), &pair.key_pem)?;
            let id = Identity::generate()?;
            let p = dir.join(format!("{client}.id"));
            id.save(&p)
                .with_context(|| format!("writing {}", p.display()))?;
            println!(
                "[[clients]]\nname = \"{client}\"\nkey = \"{}\"",
                id.public()
            );
        }
    }
    Ok(())
}
