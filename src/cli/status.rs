//! `fedtune coord status`: a federation's state read from its coordinator's store and round
//! log, whether the coordinator runs or not — rounds completed, the open round (who sent an
//! update, who is awaited, the deadline), the global adapter, accepted updates per client,
//! rejections by reason and the last closed round — with clients named as in `coord.toml`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use fedtune_coordinator::Coordinator;
use fedtune_coordinator::store::FileStore;
use fedtune_protocol::PublicKey;
use fedtune_protocol::clock::now_ms;
use serde::Deserialize;
use serde_json::{Value, json};

/// `fedtune coord ...`.
#[derive(Debug, Subcommand)]
pub enum CoordCommand {
    /// The federation's state from the coordinator's store (running or stopped).
    Status(StatusArgs),
}

/// Arguments of `fedtune coord status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The coordinator's TOML configuration.
    #[arg(long)]
    config: PathBuf,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// What the status needs of `coord.toml` (other fields are the daemon's).
#[derive(Debug, Deserialize)]
struct CoordView {
    federation: String,
    data_dir: PathBuf,
    rounds: u64,
    #[serde(default)]
    then: Vec<StageView>,
    #[serde(default)]
    clients: Vec<ClientView>,
}

#[derive(Debug, Deserialize)]
struct StageView {
    rounds: u64,
}

#[derive(Debug, Deserialize)]
struct ClientView {
    name: String,
    key: String,
}

/// `ms` (since the epoch) from now, in words.
fn when(ms: u64, now: u64) -> String {
    let s = |d: u64| format!("{:.0} s", d as f64 / 1000.0);
    if ms >= now {
        format!("in {}", s(ms - now))
    } else {
        format!("{} ago", s(now - ms))
    }
}

/// The last `round_closed` record of the round log, if any.
fn last_closed(path: &std::path::Path) -> Option<Value> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "round_closed")
}

/// Runs `fedtune coord status`.
pub fn run(a: StatusArgs) -> anyhow::Result<()> {
    let f: CoordView = super::fed::read_toml(&a.config)?;
    let file = a.config.display().to_string();
    let store_dir = f.data_dir.join("store");
    anyhow::ensure!(
        store_dir.is_dir(),
        "{file}: data_dir: no store at {} (has the coordinator run?)",
        store_dir.display()
    );
    // The state and the keys only: stored updates can be large and are not read.
    let store =
        FileStore::open(&store_dir).with_context(|| format!("opening {}", store_dir.display()))?;
    let (state, keys) = store
        .get("state")
        .and_then(|state| Ok((state, store.keys()?)))
        .with_context(|| format!("reading {}", store_dir.display()))?;
    let s = Coordinator::stored_status(state.as_deref(), &keys)
        .with_context(|| format!("reading the state in {}", store_dir.display()))?;
    let names: BTreeMap<String, String> = f
        .clients
        .iter()
        .map(|c| (c.key.to_lowercase(), c.name.clone()))
        .collect();
    let name = |k: &PublicKey| {
        names
            .get(&k.to_hex())
            .cloned()
            .unwrap_or_else(|| k.to_hex())
    };
    let name_hex = |v: &Value| {
        v.as_str()
            .map(|h| names.get(h).cloned().unwrap_or_else(|| h.to_string()))
            .unwrap_or_default()
    };
    let total = f.rounds + f.then.iter().map(|t| t.rounds).sum::<u64>();
    let mut closed = last_closed(&f.data_dir.join("rounds.jsonl"));
    if let Some(c) = closed.as_mut() {
        for field in ["sampled", "used"] {
            if let Some(list) = c[field].as_array() {
                c[field] = json!(list.iter().map(name_hex).collect::<Vec<_>>());
            }
        }
    }
    let open = s.open_round.as_ref().map(|o| {
        let waiting: Vec<String> = o
            .sampled
            .iter()
            .filter(|c| !o.updates.contains(c))
            .map(name)
            .collect();
        json!({
            "round": o.round,
            "sampled": o.sampled.iter().map(name).collect::<Vec<_>>(),
            "updates": o.updates.iter().map(name).collect::<Vec<_>>(),
            "waiting": waiting,
            "opened_ms": o.opened_ms,
            "deadline_ms": o.deadline_ms,
        })
    });
    let accepted: BTreeMap<String, u64> = s
        .accepted_rounds
        .iter()
        .map(|(k, n)| (name(k), *n))
        .collect();
    let report = json!({
        "federation": f.federation,
        "rounds": total,
        "completed_rounds": s.completed_rounds,
        "finished": s.finished,
        "open_round": open,
        "global": {"round": s.global_round, "blake3": s.global_digest},
        "accepted_rounds": accepted,
        "rejections": s.rejections,
        "last_closed": closed,
    });
    if a.json {
        println!("{report}");
        return Ok(());
    }
    let now = now_ms();
    println!(
        "federation {}: {} of {total} rounds completed{}",
        f.federation,
        s.completed_rounds,
        if s.finished { ", finished" } else { "" }
    );
    if let Some(o) = &open {
        let list = |k: &str| {
            let v: Vec<&str> = o[k]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join(", ")
            }
        };
        println!(
            "open round {}: opened {}, deadline {}; updates from {}; waiting for {}",
            o["round"],
            when(o["opened_ms"].as_u64().unwrap_or(0), now),
            when(o["deadline_ms"].as_u64().unwrap_or(0), now),
            list("updates"),
            list("waiting")
        );
    }
    println!(
        "global adapter: round {}, blake3 {}",
        s.global_round, s.global_digest
    );
    let accepted_line: Vec<String> = accepted.iter().map(|(n, r)| format!("{n} {r}")).collect();
    println!(
        "rounds with an accepted update: {}",
        if accepted_line.is_empty() {
            "none yet".to_string()
        } else {
            accepted_line.join(", ")
        }
    );
    if !s.rejections.is_empty() {
        let r: Vec<String> = s
            .rejections
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        println!("rejected updates: {}", r.join(", "));
    }
    if let Some(c) = &closed {
        let used: Vec<&str> = c["used"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        println!(
            "last closed: round {} ({}), {:.1} s, aggregated {}; metrics {}",
            c["round"],
            c["phase"].as_str().unwrap_or("?"),
            c["seconds"].as_f64().unwrap_or(f64::NAN),
            used.join(", "),
            c["metrics"]
        );
    }
    Ok(())
}
