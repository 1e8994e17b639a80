//! The QUIC transport of the simulator: the real coordinator daemon and one real client daemon
//! per simulated client, in this process on loopback, with a fresh federation CA, mutual TLS,
//! signed updates and the durable store: everything a deployment does, on real time. Faults
//! are the memory transport's business; here the run is checked end to end. After the run each
//! stored global adapter is evaluated on every client's held-out data.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedtune_aggregation::update::Adapter;
use fedtune_client::Client;
use fedtune_client::daemon::{ClientOptions, run as run_client};
use fedtune_client::trainer::LocalData;
use fedtune_coordinator::daemon::{DaemonOptions, RunSummary, bind, serve};
use fedtune_coordinator::roundevent::parse_log;
use fedtune_coordinator::{Coordinator, RoundEvent};
use fedtune_engine::LoadedModel;
use fedtune_engine::data::Example;
use fedtune_protocol::clock::now_ms;
use fedtune_protocol::tls::{self, CertPair};
use fedtune_protocol::{digest, peft, quic};

use crate::config::SimConfig;
use crate::memory::SimError;
use crate::metrics::{
    Output, StageGlobals, base_record, evaluate_losses, generations_before_after,
    generations_by_stage, round_metrics, stage_ends,
};
use crate::progress::Progress;
use crate::run::SimOutcome;
use crate::setup::{ClientSetup, Parties};

fn err(what: &str) -> impl Fn(&dyn std::fmt::Display) -> SimError + '_ {
    move |e| SimError::Io(format!("{what}: {e}"))
}

/// Runs `cfg` over QUIC on loopback; `out` holds the coordinator's data directory
/// (`coord-data/`), `metrics.jsonl` and the global adapters.
pub fn run_quic(
    cfg: &SimConfig,
    model: &LoadedModel,
    clients: Vec<ClientSetup>,
    out: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<SimOutcome, SimError> {
    no_faults(cfg)?;
    let started = Instant::now();
    let n = clients.len();
    let mut output = Output::new(Some(out))?;
    if cfg
        .report_to
        .contains(&fedtune_engine::train::config::ReportTo::Tensorboard)
    {
        output = output.with_tensorboard()?;
    }
    let data_dir = out.join("coord-data");
    if data_dir.exists() {
        std::fs::remove_dir_all(&data_dir).map_err(|e| err("clearing coord-data")(&e))?;
    }
    let p = Parties::new(cfg, model, n);
    let names: Vec<String> = clients.iter().map(|c| c.name.clone()).collect();
    let eval_examples: Vec<Vec<Example>> =
        clients.iter().map(|c| c.eval_examples.clone()).collect();
    let data: Vec<Arc<LocalData>> = clients.into_iter().map(|c| Arc::new(c.data)).collect();
    let data_refs: Vec<&LocalData> = data.iter().map(|d| d.as_ref()).collect();
    let mut rounds = vec![base_record(model, &data_refs, &names, &mut output)?];
    progress(Progress::Note(format!(
        "QUIC on loopback: coordinator and {n} client daemons, mutual TLS"
    )));
    let base = Arc::new(crate::run::training_base(cfg, model, progress)?);
    let summary = run_daemons(cfg, &p, &data_dir, &data, &names, base)?;

    // Per-round evaluation of the stored global adapters.
    let log_text = std::fs::read_to_string(data_dir.join("rounds.jsonl"))
        .map_err(|e| err("rounds.jsonl")(&e))?;
    let log = parse_log(&log_text).map_err(|e| SimError::Io(format!("rounds.jsonl: {e}")))?;
    let stored = StoredRounds {
        model,
        p: &p,
        data_dir: &data_dir,
        data: &data_refs,
        names: &names,
    };
    let (global, stage_globals) = stored.evaluate(&log, &mut rounds, &mut output, progress)?;
    output.file("global/final/adapter_model.safetensors", &summary.global)?;
    let gens = generations_before_after(cfg, model, &global, &names, &eval_examples, progress)?;
    let stages = generations_by_stage(cfg, model, &stage_globals, &eval_examples, progress)?;
    Ok(SimOutcome {
        rounds,
        global,
        global_bytes: summary.global,
        coordinator_log: log,
        events: Vec::new(),
        rejections: summary.rejections,
        generations: gens,
        stages,
        names,
        wall_s: started.elapsed().as_secs_f64(),
    })
}

/// Refuses injected faults: the QUIC transport runs the daemons as deployed.
fn no_faults(cfg: &SimConfig) -> Result<(), SimError> {
    let f = &cfg.faults;
    if f.dropout > 0.0
        || f.straggler > 0.0
        || f.crash_mid_upload > 0.0
        || !f.byzantine.is_empty()
        || f.coordinator_restart_round.is_some()
    {
        return Err(SimError::Io(
            "faults: injected faults need transport = \"memory\" (the QUIC transport runs the \
             daemons as deployed)"
                .into(),
        ));
    }
    Ok(())
}

/// Runs the coordinator daemon and one client daemon per client (a fresh CA, mutual TLS) on
/// loopback until the federation finishes; checks that every client ended with the
/// coordinator's final global adapter.
fn run_daemons(
    cfg: &SimConfig,
    p: &Parties,
    data_dir: &Path,
    data: &[Arc<LocalData>],
    names: &[String],
    base: Arc<fedtune_client::trainer::Base>,
) -> Result<RunSummary, SimError> {
    let n = data.len();
    let machine = Coordinator::new(
        p.coord.clone(),
        p.coord_id.clone(),
        p.initial.clone(),
        now_ms(),
    )?;
    let ca = tls::new_ca(&cfg.name).map_err(|e| err("CA")(&e))?;
    let server_cert =
        tls::issue(&ca, "coordinator", true, &["localhost".into()]).map_err(|e| err("CA")(&e))?;
    let cn = |k: usize| format!("client-{k}");
    let certs: Vec<CertPair> = (0..n)
        .map(|k| tls::issue(&ca, &cn(k), false, &[]))
        .collect::<Result<_, _>>()
        .map_err(|e| err("CA")(&e))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| err("tokio runtime")(&e))?;
    rt.block_on(async {
        let server = quic::server_config(
            tls::server_config(&ca.cert_pem, &server_cert).map_err(|e| err("TLS")(&e))?,
        )
        .map_err(|e| err("QUIC")(&e))?;
        let endpoint = bind(server, "127.0.0.1:0".parse().expect("valid"), &p.coord_id)
            .map_err(|e| err("bind")(&e))?;
        let addr = endpoint.local_addr().map_err(|e| err("bind")(&e))?;
        let opts = DaemonOptions {
            data_dir: data_dir.to_path_buf(),
            clients: (0..n).map(|k| (cn(k), p.admitted[k])).collect(),
            linger: Duration::from_secs(2),
            console: false,
            metrics: None,
            limits: Default::default(),
        };
        let coordinator = tokio::spawn(serve(machine, endpoint, opts, std::future::pending()));
        let mut handles = Vec::new();
        for k in 0..n {
            let quic_cfg = quic::client_config(
                tls::client_config(&ca.cert_pem, &certs[k]).map_err(|e| err("TLS")(&e))?,
            )
            .map_err(|e| err("QUIC")(&e))?;
            let machine = Client::new(p.client_config(cfg), p.ids[k].clone());
            handles.push(tokio::spawn(run_client(
                machine,
                quic_cfg,
                base.clone(),
                data[k].clone(),
                ClientOptions {
                    coordinator: addr,
                    server_name: tls::COORDINATOR_NAME.into(),
                    max_payload: p.coord.max_payload,
                    log: None,
                    max_attempts: 10,
                    metrics: None,
                },
            )));
        }
        let summary = coordinator
            .await
            .map_err(|e| err("coordinator task")(&e))?
            .map_err(|e| err("coordinator")(&e))?;
        let want = digest(&summary.global);
        for (k, h) in handles.into_iter().enumerate() {
            let got = h
                .await
                .map_err(|e| err("client task")(&e))?
                .map_err(|e| err(&names[k])(&e))?;
            if got != want {
                return Err(SimError::Io(format!(
                    "{}: finished with another global adapter",
                    names[k]
                )));
            }
        }
        Ok(summary)
    })
}

/// The global adapters a finished QUIC run stored, and what they are evaluated on.
struct StoredRounds<'a> {
    model: &'a LoadedModel,
    p: &'a Parties,
    data_dir: &'a Path,
    data: &'a [&'a LocalData],
    names: &'a [String],
}

impl StoredRounds<'_> {
    /// Evaluates the global adapter of every round `log` shows closed on each client's
    /// held-out data, appends its `metrics.jsonl` record to `rounds` (also written to
    /// `output`, with the adapter); returns the last one, and the last of each stage but the
    /// final one with its label.
    fn evaluate(
        &self,
        log: &[RoundEvent],
        rounds: &mut Vec<serde_json::Value>,
        output: &mut Output,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<(Adapter, StageGlobals), SimError> {
        let lora = &self.p.coord.lora;
        let ends: std::collections::BTreeMap<u64, String> =
            stage_ends(&self.p.coord).into_iter().collect();
        let mut stage_globals = Vec::new();
        let mut global = None;
        let closed_rounds = log.iter().filter_map(|e| match e {
            RoundEvent::RoundClosed(c) => Some(c),
            _ => None,
        });
        for closed in closed_rounds {
            let round = closed.round;
            let dir = self.data_dir.join(format!("store/global/{round:06}"));
            let bytes = std::fs::read(dir.join("adapter_model.safetensors"))
                .map_err(|e| err(&dir.display().to_string())(&e))?;
            let adapter = peft::decode(&bytes, &peft::Limits::default(), |_, r| lora.scale(r))
                .map_err(|e| err("stored global adapter")(&e))?;
            let (per, mean) = evaluate_losses(self.model, self.data, Some(&adapter))?;
            let start = log
                .iter()
                .position(|e| matches!(e, RoundEvent::RoundOpen { round: r, .. } if *r == round))
                .unwrap_or(0);
            let rec = round_metrics(
                self.names,
                &self.p.admitted,
                closed,
                &log[start..],
                &[],
                &per,
                mean,
                f64::NAN,
                &[],
            );
            output.record(&rec)?;
            output.file(
                &format!("global/round-{round:03}/adapter_model.safetensors"),
                &bytes,
            )?;
            if let Ok(c) = std::fs::read(dir.join("adapter_config.json")) {
                output.file(&format!("global/round-{round:03}/adapter_config.json"), &c)?;
            }
            rounds.push(rec);
            progress(Progress::Round {
                done: round,
                total: self.p.coord.total_rounds(),
                loss: mean,
            });
            if let Some(label) = ends.get(&round) {
                stage_globals.push((label.clone(), adapter.clone()));
            }
            global = Some(adapter);
        }
        let global = global.ok_or_else(|| SimError::Io("no round closed".into()))?;
        Ok((global, stage_globals))
    }
}
