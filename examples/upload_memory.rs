//! Concurrent large uploads against a coordinator, as a black-box probe sent them: listed
//! clients that each upload one signed payload of MIB mebibytes at the same moment. The
//! payloads are random bytes with correctly signed headers and digests, so the coordinator
//! streams each to disk, reads it in once complete and only then finds that it is not an
//! adapter (a `rejected` line): every byte goes through the memory path an honest update takes.
//!
//! `cargo run --release --example upload_memory -- ADDR CA_DIR MIB NAME...`: connects as each
//! client NAME (`CA_DIR/NAME.{pem,key,id}` as written by `fedtune ca issue`), waits until every
//! client has its round plan, then uploads from all of them at once and waits for the
//! coordinator's answers. `bench/upload_memory.sh` runs it against `fedtune coord` and
//! measures the coordinator's peak memory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedtune_protocol::clock::now_ms;
use fedtune_protocol::envelope::{PayloadKind, Seal, seal};
use fedtune_protocol::messages::{decode, encode};
use fedtune_protocol::quic::{read_frame, write_frame};
use fedtune_protocol::tls::{self, CertPair};
use fedtune_protocol::{Identity, ToClient, ToCoordinator, digest, quic};

/// Reads control messages until a plan comes; returns it with its global header.
async fn plan(
    recv: &mut quinn::RecvStream,
) -> anyhow::Result<(fedtune_protocol::RoundPlan, fedtune_protocol::SignedHeader)> {
    loop {
        let b = read_frame(recv, 1 << 30)
            .await?
            .ok_or_else(|| anyhow::anyhow!("control stream closed before a plan"))?;
        if let ToClient::Plan { plan, global, .. } = decode(&b, 1 << 30, "message")? {
            return Ok((*plan, *global));
        }
    }
}

/// One client: connects, says hello, waits for its plan, waits for `go`, uploads `mib` MiB of
/// random bytes under a signed header and returns the coordinator's answer.
async fn client(
    addr: SocketAddr,
    ca: Arc<String>,
    dir: PathBuf,
    name: String,
    mib: usize,
    ready: tokio::sync::mpsc::Sender<()>,
    mut go: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<String> {
    let file = |ext: &str| dir.join(format!("{name}.{ext}"));
    let read =
        |p: &Path| std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()));
    let own = CertPair {
        cert_pem: read(&file("pem"))?,
        key_pem: read(&file("key"))?,
    };
    let id = Identity::load(&file("id"))?;
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    ep.set_default_client_config(quic::client_config(tls::client_config(&ca, &own)?)?);
    let conn = ep.connect(addr, tls::COORDINATOR_NAME)?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let hello = ToCoordinator::Hello {
        version: fedtune_protocol::PROTOCOL_VERSION,
        client: id.public(),
    };
    write_frame(&mut send, &encode(&hello)).await?;
    let (plan, global) = plan(&mut recv).await?;
    let mut payload = vec![0u8; mib << 20];
    let mut x = u64::from_le_bytes(*digest(name.as_bytes()).first_chunk().unwrap());
    for c in payload.chunks_mut(8) {
        // splitmix64: bytes no compression or deduplication can shrink.
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        c.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes()[..c.len()]);
    }
    let header = seal(
        &id,
        Seal {
            kind: PayloadKind::Update,
            federation: &plan.federation,
            round: plan.round,
            plan_hash: global.header.plan_hash,
            parent: plan.global_digest,
            nonce: *digest(name.as_bytes()).first_chunk().unwrap(),
            now_ms: now_ms(),
            ttl_ms: 600_000,
            num_examples: 1,
            metrics: vec![],
        },
        &payload,
    );
    ready.send(()).await?;
    go.wait_for(|g| *g).await?;
    let (mut s, mut r) = conn.open_bi().await?;
    write_frame(&mut s, &encode(&header)).await?;
    let offset = read_frame(&mut r, 8)
        .await?
        .ok_or_else(|| anyhow::anyhow!("{name}: upload refused before its payload"))?;
    anyhow::ensure!(offset == [0; 8], "{name}: resumed at {offset:?}");
    s.write_all(&payload).await?;
    s.finish()?;
    drop(payload);
    loop {
        let b = read_frame(&mut recv, 1 << 30)
            .await?
            .ok_or_else(|| anyhow::anyhow!("{name}: control stream closed"))?;
        match decode(&b, 1 << 30, "message")? {
            ToClient::Accepted { .. } => return Ok("accepted".into()),
            ToClient::Rejected { reason, .. } => return Ok(format!("rejected ({reason})")),
            _ => {}
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(
        args.len() >= 4,
        "usage: upload_memory ADDR CA_DIR MIB NAME..."
    );
    let addr: SocketAddr = args[0].parse()?;
    let dir = PathBuf::from(&args[1]);
    let mib: usize = args[2].parse()?;
    let ca = Arc::new(std::fs::read_to_string(dir.join("ca.pem"))?);
    let names = &args[3..];
    let (ready_tx, mut ready) = tokio::sync::mpsc::channel(names.len());
    let (go_tx, go) = tokio::sync::watch::channel(false);
    let tasks: Vec<_> = names
        .iter()
        .map(|n| {
            tokio::spawn(client(
                addr,
                ca.clone(),
                dir.clone(),
                n.clone(),
                mib,
                ready_tx.clone(),
                go.clone(),
            ))
        })
        .collect();
    for _ in names {
        tokio::time::timeout(Duration::from_secs(120), ready.recv())
            .await
            .map_err(|_| anyhow::anyhow!("not every client got a plan within 120 s"))?;
    }
    // Every client has its plan and its payload: the coordinator's memory before the uploads
    // can be read now.
    println!("ready");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let start = Instant::now();
    go_tx.send(true)?;
    let mut answers = std::collections::BTreeMap::<String, usize>::new();
    for t in tasks {
        let a = t.await??;
        let label = a.split(" (").next().unwrap_or(&a).to_string();
        *answers.entry(label).or_default() += 1;
    }
    println!(
        "{} uploads of {mib} MiB answered in {:.1} s: {answers:?}",
        names.len(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
