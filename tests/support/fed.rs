//! A coordinator daemon on loopback for one client, and a client that speaks the protocol
//! directly (hello, plans, signed updates on upload streams), for the tests of the upload path
//! (`tests/quic_resume.rs`).

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use burn::tensor::{DType, Device};
use fedtune_aggregation::strategy::{Rule, StrategyConfig};
use fedtune_coordinator::daemon::{ConnectionLimits, DaemonOptions, bind, serve};
use fedtune_coordinator::{CoordConfig, Coordinator};
use fedtune_engine::load_model;
use fedtune_engine::train::TrainConfig;
use fedtune_engine::train::lora::init_adapter;
use fedtune_protocol::clock::now_ms;
use fedtune_protocol::envelope::{PayloadKind, Seal, seal};
use fedtune_protocol::messages::{decode, encode};
use fedtune_protocol::quic::{read_frame, write_frame};
use fedtune_protocol::tls::{self, CertPair};
use fedtune_protocol::{
    Hyper, Identity, LoraPlan, Phase, ToClient, ToCoordinator, digest, peft, quic,
};

pub async fn next_plan(recv: &mut quinn::RecvStream) -> (fedtune_protocol::RoundPlan, Vec<u8>) {
    loop {
        let b = read_frame(recv, 256 << 20).await.unwrap().unwrap();
        if let ToClient::Plan { plan, payload, .. } = decode(&b, 256 << 20, "m").unwrap() {
            return (*plan, payload);
        }
    }
}

pub async fn connect(
    addr: std::net::SocketAddr,
    ca: &CertPair,
    own: &CertPair,
    id: &Identity,
) -> (
    quinn::Endpoint,
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
) {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(
        quic::client_config(tls::client_config(&ca.cert_pem, own).unwrap()).unwrap(),
    );
    let conn = ep
        .connect(addr, tls::COORDINATOR_NAME)
        .unwrap()
        .await
        .unwrap();
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let hello = ToCoordinator::Hello {
        version: fedtune_protocol::PROTOCOL_VERSION,
        client: id.public(),
    };
    write_frame(&mut send, &encode(&hello)).await.unwrap();
    (ep, conn, send, recv)
}

/// A coordinator on loopback for one client `site` (plan hash `[3; 32]`, FedIT, one result per
/// round), and what a client needs to reach it.
pub struct Fed {
    pub addr: std::net::SocketAddr,
    pub coordinator: tokio::task::JoinHandle<
        Result<fedtune_coordinator::daemon::RunSummary, fedtune_coordinator::daemon::DaemonError>,
    >,
    pub data_dir: PathBuf,
    pub ca: CertPair,
    pub own: CertPair,
    pub id: Identity,
}

impl Fed {
    /// A connection of the client that said hello.
    pub async fn client(
        &self,
    ) -> (
        quinn::Endpoint,
        quinn::Connection,
        quinn::SendStream,
        quinn::RecvStream,
    ) {
        connect(self.addr, &self.ca, &self.own, &self.id).await
    }

    /// The coordinator's summary once it finished (within a minute).
    pub async fn finish(&mut self) -> fedtune_coordinator::daemon::RunSummary {
        tokio::time::timeout(Duration::from_secs(60), &mut self.coordinator)
            .await
            .expect("the coordinator finishes")
            .unwrap()
            .unwrap()
    }
}

pub fn start(name: &str, rounds: u64, limits: ConnectionLimits) -> Fed {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let m = load_model(
        &root.join("testdata/tiny-llama/model"),
        &Device::flex(),
        DType::F32,
    )
    .unwrap();
    let lora = TrainConfig {
        lora_r: 4,
        lora_alpha: 8.0,
        ..TrainConfig::default()
    };
    let ca = tls::new_ca(name).unwrap();
    let server_pair = tls::issue(&ca, "coordinator", true, &[]).unwrap();
    let own = tls::issue(&ca, "site", false, &[]).unwrap();
    let id = Identity::from_seed([9; 32]);
    let mut strategy = StrategyConfig::new(Rule::FedAvgFactors);
    strategy.sampling.min_clients = 1;
    let mut cfg = CoordConfig::new(
        "resume".into(),
        Phase::Sft,
        rounds,
        Hyper {
            seed: 0,
            ..Hyper::new(1e-3, 1, 1)
        },
        LoraPlan {
            rank: 4,
            lora_alpha: 8.0,
            target_modules: lora.target_modules.clone(),
        },
        strategy,
        300_000,
        [3; 32],
        BTreeSet::from([id.public()]),
    );
    cfg.min_results = 1;
    cfg.max_payload = 64 << 20;
    let machine = Coordinator::new(
        cfg,
        Identity::from_seed([1; 32]),
        init_adapter(&m.model, &lora),
        now_ms(),
    )
    .unwrap();
    let data_dir = std::env::temp_dir().join(format!("fedtune-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data_dir);
    let endpoint = bind(
        quic::server_config(tls::server_config(&ca.cert_pem, &server_pair).unwrap()).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
        &Identity::from_seed([1; 32]),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();
    let coordinator = tokio::spawn(serve(
        machine,
        endpoint,
        DaemonOptions {
            data_dir: data_dir.clone(),
            clients: BTreeMap::from([("site".to_string(), id.public())]),
            linger: Duration::from_millis(500),
            limits,
            console: false,
            metrics: None,
        },
        std::future::pending(),
    ));
    Fed {
        addr,
        coordinator,
        data_dir,
        ca,
        own,
        id,
    }
}

/// A signed update of the global adapter `global` (every `B` set to a fixed pattern plus
/// `salt`).
pub fn update(
    salt: f32,
    id: &Identity,
    plan: &fedtune_protocol::RoundPlan,
    global: &[u8],
) -> (fedtune_protocol::SignedHeader, Vec<u8>) {
    let mut update = peft::decode(global, &Default::default(), |_, r| 8.0 / r as f32).unwrap();
    for f in update.modules.values_mut() {
        for (i, v) in f.b.data.iter_mut().enumerate() {
            *v = (i % 7) as f32 * 1e-3 + salt;
        }
    }
    let payload = peft::encode(&update);
    let header = seal(
        id,
        Seal {
            kind: PayloadKind::Update,
            federation: "resume",
            round: plan.round,
            plan_hash: [3; 32],
            parent: plan.global_digest,
            nonce: [plan.round as u8; 16],
            now_ms: now_ms(),
            ttl_ms: 600_000,
            num_examples: 5,
            metrics: vec![],
        },
        &payload,
    );
    (header, payload)
}

/// Opens an upload stream, sends the signed header and reads the coordinator's resume offset
/// (the receiving half is returned so that it stays open).
pub async fn open_upload(
    conn: &quinn::Connection,
    header: &fedtune_protocol::SignedHeader,
) -> (quinn::SendStream, quinn::RecvStream, u64) {
    let (mut s, mut r) = conn.open_bi().await.unwrap();
    write_frame(&mut s, &encode(header)).await.unwrap();
    let reply = read_frame(&mut r, 8).await.unwrap().unwrap();
    (s, r, u64::from_le_bytes(reply.try_into().unwrap()))
}

/// Uploads the client's signed update of `global` whole, on a stream of its own; returns the
/// payload.
pub async fn upload_whole(
    f: &Fed,
    conn: &quinn::Connection,
    plan: &fedtune_protocol::RoundPlan,
    global: &[u8],
) -> Vec<u8> {
    let (header, payload) = update(0.0, &f.id, plan, global);
    let (mut s, _r, _) = open_upload(conn, &header).await;
    s.write_all(&payload).await.unwrap();
    s.finish().unwrap();
    payload
}

/// Sends the whole update again, which the coordinator must take from offset 0 (`why`), and
/// checks that it is the one-round federation's result.
pub async fn send_again_and_finish(
    f: &mut Fed,
    conn: &quinn::Connection,
    header: &fedtune_protocol::SignedHeader,
    payload: &[u8],
    why: &str,
) {
    let (mut s, _r, offset) = open_upload(conn, header).await;
    assert_eq!(offset, 0, "{why}");
    s.write_all(payload).await.unwrap();
    s.finish().unwrap();
    let summary = f.finish().await;
    assert_eq!(summary.rounds, 1);
    assert_eq!(digest(&summary.global), digest(payload));
    let _ = std::fs::remove_dir_all(&f.data_dir);
}

/// How the coordinator closed `conn`, as `(code, reason)`, waiting at most `secs`.
pub async fn closed_by_peer(conn: &quinn::Connection, secs: u64) -> (u64, String) {
    match tokio::time::timeout(Duration::from_secs(secs), conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => (
            c.error_code.into_inner(),
            String::from_utf8_lossy(&c.reason).into_owned(),
        ),
        Ok(other) => panic!("closed otherwise: {other}"),
        Err(_) => panic!("still open after {secs} s"),
    }
}

/// The `.part` files under the coordinator's `incoming/`.
pub fn parts(data_dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(data_dir.join("incoming"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".part"))
                .collect()
        })
        .unwrap_or_default()
}
