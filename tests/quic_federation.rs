//! The daemons over real QUIC on loopback with mutual TLS: a coordinator and three clients
//! (each training the tiny model through the engine) complete two rounds, the final global
//! adapter beats the base model on every client's held-out data; meanwhile a client whose
//! certificate comes from another CA never gets in, and a connection that opens 200 upload
//! streams and never completes a header gets at most the 4 streams the transport allows
//! while the federation carries on.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use burn::tensor::{DType, Device};
use fedtune_aggregation::strategy::{Rule, StrategyConfig};
use fedtune_client::daemon::{ClientOptions, run};
use fedtune_client::{Client, ClientConfig};
use fedtune_coordinator::daemon::{DaemonOptions, bind, serve};
use fedtune_coordinator::{CoordConfig, Coordinator};
use fedtune_engine::eval::sft_loss;
use fedtune_engine::train::TrainConfig;
use fedtune_engine::train::lora::init_adapter;
use fedtune_engine::{LoadedModel, load_model};
use fedtune_protocol::clock::now_ms;
use fedtune_protocol::tls::{self, CertPair};
use fedtune_protocol::{
    Hyper, Identity, LoraPlan, PROTOCOL_VERSION, Phase, digest, model_digest, peft, plan_hash, quic,
};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tiny() -> LoadedModel {
    load_model(
        &root().join("testdata/tiny-llama/model"),
        &Device::flex(),
        DType::F32,
    )
    .unwrap()
}

fn client_quic(ca: &CertPair, own: &CertPair) -> quinn::ClientConfig {
    quic::client_config(tls::client_config(&ca.cert_pem, own).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clients_complete_two_rounds_over_mutual_tls_quic() {
    let m = tiny();
    let lora = TrainConfig {
        lora_r: 4,
        lora_alpha: 8.0,
        seed: 3,
        ..TrainConfig::default()
    };
    let ca = tls::new_ca("quic-test").unwrap();
    let server_cert = tls::issue(&ca, "coordinator", true, &["localhost".into()]).unwrap();
    let coord_id = Identity::from_seed([100; 32]);
    let names = ["hospital-a", "bank-b", "desk-c"];
    let ids: Vec<Identity> = (0..3).map(|i| Identity::from_seed([i + 1; 32])).collect();
    let certs: Vec<CertPair> = names
        .iter()
        .map(|n| tls::issue(&ca, n, false, &[]).unwrap())
        .collect();
    let model = model_digest(&root().join("testdata/tiny-llama/model")).unwrap();
    let lora_plan = LoraPlan {
        rank: 4,
        lora_alpha: 8.0,
        target_modules: lora.target_modules.clone(),
    };
    let hash = plan_hash(&model, &lora_plan);
    let mut strategy = StrategyConfig::new(Rule::FedAvgExact);
    strategy.target_rank = Some(4);
    strategy.sampling.min_clients = 3;
    let mut cfg = CoordConfig::new(
        "quic-test".into(),
        Phase::Sft,
        2,
        Hyper {
            seed: 11,
            ..Hyper::new(5e-3, 4, 4)
        },
        lora_plan,
        strategy,
        300_000,
        hash,
        ids.iter().map(|i| i.public()).collect::<BTreeSet<_>>(),
    );
    cfg.min_results = 3;
    cfg.max_payload = 64 << 20;
    let machine = Coordinator::new(
        cfg.clone(),
        coord_id.clone(),
        init_adapter(&m.model, &lora),
        now_ms(),
    )
    .unwrap();
    let data_dir = std::env::temp_dir().join(format!("fedtune-quic-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data_dir);
    let server =
        quic::server_config(tls::server_config(&ca.cert_pem, &server_cert).unwrap()).unwrap();
    let endpoint = bind(server, "127.0.0.1:0".parse().unwrap(), &coord_id).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let rogue_id = Identity::from_seed([55; 32]);
    let rogue_cert = tls::issue(&ca, "rogue", false, &[]).unwrap();
    let mut admitted_names = names
        .iter()
        .zip(&ids)
        .map(|(n, i)| (n.to_string(), i.public()))
        .collect::<BTreeMap<_, _>>();
    // The rogue has a certificate and a listed name, but its key is not admitted to rounds.
    admitted_names.insert("rogue".into(), rogue_id.public());
    let opts = DaemonOptions {
        data_dir: data_dir.clone(),
        clients: admitted_names,
        linger: Duration::from_secs(2),
        limits: Default::default(),
        console: false,
        metrics: None,
    };
    let coordinator = tokio::spawn(serve(machine, endpoint, opts, std::future::pending()));

    let base = Arc::new(fedtune_client::trainer::Base::from(m.model.clone()));
    let client_opts = ClientOptions {
        coordinator: addr,
        server_name: tls::COORDINATOR_NAME.into(),
        max_payload: 64 << 20,
        log: None,
        max_attempts: 5,
        metrics: None,
    };
    let ccfg = ClientConfig {
        federation: "quic-test".into(),
        coordinator: coord_id.public(),
        model_digest: model,
        lora_pin: Default::default(),
        header_ttl_ms: 3_600_000,
        max_payload: 64 << 20,
    };
    let mut data = Vec::new();
    let mut clients = Vec::new();
    for k in 0..3 {
        let d = Arc::new(fedtune_sim::demo::client_data(&m, &root(), k, None));
        data.push(d.clone());
        clients.push(tokio::spawn(run(
            Client::new(ccfg.clone(), ids[k].clone()),
            client_quic(&ca, &certs[k]),
            base.clone(),
            d,
            client_opts.clone(),
        )));
    }
    // An intruder: a valid-looking certificate from another CA, with an admitted name.
    let other_ca = tls::new_ca("intruder").unwrap();
    let fake = tls::issue(&other_ca, "hospital-a", false, &[]).unwrap();
    let intruder = tokio::spawn(run(
        Client::new(ccfg.clone(), Identity::from_seed([66; 32])),
        client_quic(&ca, &fake),
        base.clone(),
        data[0].clone(),
        ClientOptions {
            max_attempts: 2,
            metrics: None,
            ..client_opts.clone()
        },
    ));

    let rogue = {
        let quic = client_quic(&ca, &rogue_cert);
        let pk = rogue_id.public();
        tokio::spawn(async move {
            let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            ep.set_default_client_config(quic);
            let conn = ep
                .connect(addr, tls::COORDINATOR_NAME)
                .unwrap()
                .await
                .unwrap();
            let (mut send, _recv) = conn.open_bi().await.unwrap();
            let hello = fedtune_protocol::ToCoordinator::Hello {
                version: PROTOCOL_VERSION,
                client: pk,
            };
            quic::write_frame(&mut send, &fedtune_protocol::messages::encode(&hello))
                .await
                .unwrap();
            let mut open = Vec::new();
            for _ in 0..200 {
                match tokio::time::timeout(Duration::from_millis(50), conn.open_bi()).await {
                    Ok(Ok((mut s, _))) => {
                        // One byte of a length prefix, then silence.
                        let _ = s.write_all(&[7]).await;
                        open.push(s);
                    }
                    _ => continue,
                }
            }
            open.len()
        })
    };
    let summary = tokio::time::timeout(Duration::from_secs(600), coordinator)
        .await
        .expect("the federation finishes")
        .unwrap()
        .unwrap();
    assert_eq!(summary.rounds, 2);
    let want = digest(&summary.global);
    for c in clients {
        assert_eq!(c.await.unwrap().unwrap(), want);
    }
    assert!(intruder.await.unwrap().is_err(), "the intruder got in");
    let streams = rogue.await.unwrap();
    assert!(streams <= 8, "the rogue held {streams} streams open");
    let log = std::fs::read_to_string(data_dir.join("rounds.jsonl")).unwrap();
    assert_eq!(log.matches("\"round_closed\"").count(), 2);
    assert!(
        data_dir
            .join("store/global/000002/adapter_model.safetensors")
            .is_file()
    );

    // The stored global adapter is a PEFT directory (config + weights) equal to the summary's.
    let dir2 = data_dir.join("store/global/000002");
    let loaded = fedtune_engine::PeftAdapter::load(&dir2).unwrap();
    assert_eq!(
        std::fs::read(dir2.join("adapter_model.safetensors")).unwrap(),
        summary.global
    );
    let global = peft::decode(&summary.global, &Default::default(), |_, r| 8.0 / r as f32).unwrap();
    assert_eq!(loaded.weights, global);
    let mut tuned = m.model.clone();
    tuned.attach_adapter(&loaded).unwrap();
    for (k, d) in data.iter().enumerate() {
        let b = sft_loss(&m.model, &d.eval, 8, d.pad).mean();
        let t = sft_loss(&tuned, &d.eval, 8, d.pad).mean();
        assert!(t < b, "client {k}: {b} -> {t}");
    }
    let _ = std::fs::remove_dir_all(&data_dir);
}
