//! The coordinator's round log: `rounds.jsonl` records carry a timestamp (`time_ms`, and
//! `time`, UTC) and the configured names of the clients they mention beside their keys
//! (`client_name`, `sampled_names`, `used_names`), and each record is also one line on
//! stdout (`2026-12-06T04:20:01Z round 3 closed: …`), with clients named.

use std::collections::BTreeMap;
use std::io::Write;

use fedtune_protocol::PublicKey;
use fedtune_protocol::clock::utc;
use serde_json::{Value, json};

use crate::roundevent::RoundEvent;

/// The round log of a running coordinator.
pub struct RoundLog {
    file: std::fs::File,
    /// Key → configured name.
    names: BTreeMap<PublicKey, String>,
    /// Print each record as a line on stdout.
    console: bool,
    /// Counts each record for `/metrics`.
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
}

impl RoundLog {
    /// Appends to `file`, naming `clients` (name → key).
    pub fn new(file: std::fs::File, clients: &BTreeMap<String, PublicKey>, console: bool) -> Self {
        RoundLog {
            file,
            names: clients.iter().map(|(n, k)| (*k, n.clone())).collect(),
            console,
            metrics: None,
        }
    }

    /// Also counts each record in `metrics`.
    pub fn with_metrics(mut self, metrics: std::sync::Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// A client's configured name, or its key's hex for a client not configured.
    pub fn name_of(&self, k: &PublicKey) -> String {
        self.names.get(k).cloned().unwrap_or_else(|| k.to_hex())
    }

    /// The JSON line of `e`: its record with the time and the client names added.
    pub fn annotate(&self, e: &RoundEvent, now_ms: u64) -> Value {
        let mut v = e.to_json();
        let Some(o) = v.as_object_mut() else {
            return v;
        };
        o.insert("time_ms".into(), json!(now_ms));
        o.insert("time".into(), json!(utc(now_ms)));
        if let Some(c) = e.client() {
            o.insert("client_name".into(), json!(self.name_of(&c)));
        }
        let lists: Vec<(&str, &[PublicKey])> = match e {
            RoundEvent::RoundOpen { sampled, .. } => vec![("sampled", sampled)],
            RoundEvent::RoundClosed(c) => vec![("sampled", &c.sampled), ("used", &c.used)],
            _ => Vec::new(),
        };
        for (field, keys) in lists {
            let names: Vec<String> = keys.iter().map(|k| self.name_of(k)).collect();
            o.insert(format!("{field}_names"), json!(names));
        }
        v
    }

    /// Writes `e` (annotated) as one JSON line, and to the console.
    pub fn write(&mut self, e: &RoundEvent, now_ms: u64) -> std::io::Result<()> {
        let v = self.annotate(e, now_ms);
        // One write of the whole line; a write cut short (a full disk) is cut back off, so
        // that the log never holds half a record and the record can be written again whole.
        let line = format!("{v}\n");
        let len = self.file.metadata()?.len();
        if let Err(e) = self.file.write_all(line.as_bytes()) {
            let _ = self.file.set_len(len);
            return Err(e);
        }
        let name = |k: &PublicKey| self.name_of(k);
        if let Some(m) = &self.metrics {
            m.record(e, &name);
        }
        if self.console {
            println!("{} {}", utc(now_ms), describe(e, &name));
        }
        Ok(())
    }
}

/// One line about a record: its event, round and what it says, clients by `name`.
pub fn describe(e: &RoundEvent, name: &dyn Fn(&PublicKey) -> String) -> String {
    let names = |l: &[PublicKey]| l.iter().map(name).collect::<Vec<_>>().join(", ");
    match e {
        RoundEvent::RoundOpen { round, sampled, .. } => {
            format!("round {round} open: sampled {}", names(sampled))
        }
        RoundEvent::Accepted { round, client, .. } => {
            format!("round {round}: update of {} accepted", name(client))
        }
        RoundEvent::Rejected {
            round,
            client,
            reason,
            ..
        } => {
            let round = round.map_or("-".to_string(), |r| r.to_string());
            format!(
                "round {round}: update of {} rejected: {reason}",
                name(client)
            )
        }
        RoundEvent::Declined {
            round,
            client,
            reason,
            detail,
        } => format!(
            "round {round}: {} declined ({reason}): {detail}",
            name(client)
        ),
        RoundEvent::RoundClosed(c) => format!(
            "round {} closed after {:.1} s: aggregated {}",
            c.round,
            c.seconds,
            names(&c.used)
        ),
        RoundEvent::RoundRetry { round, .. } => {
            format!("round {round} sampled again: too few updates by the deadline")
        }
        RoundEvent::UploadRefused { round, client, why } => {
            format!(
                "round {round}: upload of {} refused for now ({why})",
                name(client)
            )
        }
        RoundEvent::StorageRecovered { failed_seconds } => {
            format!("writes succeed again after {failed_seconds:.1} s of failing")
        }
        RoundEvent::UploadAbandoned {
            round, client, why, ..
        } => format!(
            "round {round}: partial upload of {} removed ({why})",
            name(client)
        ),
        RoundEvent::AggregationFailed { round, error } => {
            format!("round {round}: aggregation failed: {error}")
        }
        RoundEvent::StoredUpdateInvalid { round, key, reason } => {
            format!("round {round}: stored update {key} dropped: {reason}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::roundevent::RoundClosed;

    #[test]
    fn named_records() {
        let a = fedtune_protocol::Identity::from_seed([1; 32]).public();
        let b = fedtune_protocol::Identity::from_seed([2; 32]).public();
        let clients = BTreeMap::from([("hospital".to_string(), a)]);
        let file = tempfile_in_target();
        let log = RoundLog::new(file, &clients, false);
        let closed = RoundEvent::RoundClosed(Box::new(RoundClosed {
            round: 2,
            phase: fedtune_protocol::Phase::Sft,
            sampled: vec![a, b],
            used: vec![a],
            failures: vec![],
            metrics: BTreeMap::new(),
            report: None,
            seconds: 1.5,
            global_digest: "00".into(),
            rejections: BTreeMap::new(),
        }));
        let v = log.annotate(&closed, 1_796_529_078_123);
        assert_eq!(v["event"], "round_closed");
        assert_eq!(v["sampled"], json!([a.to_hex(), b.to_hex()]));
        assert_eq!(v["sampled_names"], json!(["hospital", b.to_hex()]));
        assert_eq!(v["used_names"], json!(["hospital"]));
        assert_eq!(v["report"], Value::Null);
        assert_eq!(v["time"], "2026-12-06T03:51:18Z");
        // The annotated line reads back as the event it was made of.
        let back: RoundEvent = serde_json::from_value(v).unwrap();
        assert_eq!(back, closed);
        let name = |k: &PublicKey| log.name_of(k);
        assert_eq!(
            describe(&closed, &name),
            "round 2 closed after 1.5 s: aggregated hospital"
        );
        let accepted = RoundEvent::Accepted {
            round: 2,
            client: a,
            num_examples: 3,
            bytes: 10,
            metrics: BTreeMap::new(),
        };
        assert_eq!(
            describe(&accepted, &name),
            "round 2: update of hospital accepted"
        );
    }

    #[test]
    fn a_record_that_cannot_be_written_is_an_error_and_leaves_no_half_line() {
        let Ok(full) = std::fs::OpenOptions::new().append(true).open("/dev/full") else {
            return;
        };
        let mut log = RoundLog::new(full, &BTreeMap::new(), false);
        let rec = RoundEvent::StorageRecovered {
            failed_seconds: 1.0,
        };
        let e = log.write(&rec, 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(28), "{e}");
        // A real file: written whole.
        let p = std::env::temp_dir().join(format!("fedtune-roundlog-w-{}", std::process::id()));
        let mut log = RoundLog::new(std::fs::File::create(&p).unwrap(), &BTreeMap::new(), false);
        log.write(&rec, 0).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.ends_with("}\n") && text.lines().count() == 1, "{text}");
        let _ = std::fs::remove_file(p);
    }

    fn tempfile_in_target() -> std::fs::File {
        let p = std::env::temp_dir().join(format!("fedtune-roundlog-{}", std::process::id()));
        std::fs::File::create(p).unwrap()
    }
}
