//! Evaluation of global adapters into `metrics.jsonl` records, and the output directory.

use std::io::Write;
use std::path::{Path, PathBuf};

use fedtune_aggregation::update::Adapter;
use fedtune_client::trainer::LocalData;
use fedtune_coordinator::{RoundClosed, RoundEvent};
use fedtune_engine::LoadedModel;
use fedtune_engine::data::Example;
use fedtune_protocol::PublicKey;

use crate::config::SimConfig;
use crate::evaluate::{GenerationScores, generations, held_out_loss};
use crate::memory::SimError;
use crate::progress::Progress;

/// Held-out loss of the model with `adapter` (or the base) for each client, and the
/// token-weighted mean.
pub(crate) fn evaluate_losses(
    m: &LoadedModel,
    clients: &[&LocalData],
    adapter: Option<&Adapter>,
) -> Result<(Vec<f64>, f64), SimError> {
    let mut model = m.model.clone();
    if let Some(a) = adapter {
        model
            .attach_weights(a, 0.0)
            .map_err(|source| SimError::Train { client: 0, source })?;
    }
    let mut per = Vec::new();
    let (mut sum, mut toks) = (0.0, 0usize);
    for c in clients {
        let (l, t) = held_out_loss(&model, &c.eval, c.pad);
        per.push(l);
        if l.is_finite() {
            sum += l * t as f64;
            toks += t;
        }
    }
    Ok((
        per,
        if toks > 0 {
            sum / toks as f64
        } else {
            f64::NAN
        },
    ))
}

/// The output directory writer.
pub(crate) struct Output {
    dir: Option<PathBuf>,
    metrics: Option<std::fs::File>,
    /// TensorBoard event files of the records (`report_to = "tensorboard"`).
    board: Option<fedtune_engine::train::tensorboard::Board>,
}

/// A round record's numbers as TensorBoard scalars: `federation/<field>` for its own numbers
/// (one level into objects: `federation/<field>/<key>`), `clients/<name>/<field>` for each
/// client's.
fn record_scalars(v: &serde_json::Value) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    let Some(o) = v.as_object() else {
        return out;
    };
    for (k, x) in o {
        match x {
            serde_json::Value::Number(n) if k != "round" => {
                out.extend(n.as_f64().map(|f| (format!("federation/{k}"), f)))
            }
            serde_json::Value::Object(inner) => out.extend(
                inner
                    .iter()
                    .filter_map(|(k2, y)| Some((format!("federation/{k}/{k2}"), y.as_f64()?))),
            ),
            serde_json::Value::Array(items) if k == "clients" => {
                for c in items {
                    let name = c["name"].as_str().unwrap_or("?");
                    for (k2, y) in c.as_object().into_iter().flatten() {
                        if let Some(f) = y.as_f64() {
                            out.push((format!("clients/{name}/{k2}"), f));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    out
}

impl Output {
    pub(crate) fn new(dir: Option<&Path>) -> Result<Self, SimError> {
        let Some(d) = dir else {
            return Ok(Output {
                dir: None,
                metrics: None,
                board: None,
            });
        };
        std::fs::create_dir_all(d).map_err(|e| SimError::Io(format!("{}: {e}", d.display())))?;
        let p = d.join("metrics.jsonl");
        let f =
            std::fs::File::create(&p).map_err(|e| SimError::Io(format!("{}: {e}", p.display())))?;
        Ok(Output {
            dir: Some(d.to_path_buf()),
            metrics: Some(f),
            board: None,
        })
    }

    /// Also writes each record to TensorBoard event files under `<dir>/runs/` (nothing
    /// without an output directory).
    pub(crate) fn with_tensorboard(mut self) -> Result<Self, SimError> {
        if let Some(d) = &self.dir {
            self.board = Some(
                fedtune_engine::train::tensorboard::Board::open(d)
                    .map_err(|e| SimError::Io(e.to_string()))?,
            );
        }
        Ok(self)
    }

    pub(crate) fn record(&mut self, v: &serde_json::Value) -> Result<(), SimError> {
        if let Some(f) = &mut self.metrics {
            writeln!(f, "{v}").map_err(|e| SimError::Io(format!("metrics.jsonl: {e}")))?;
        }
        if let Some(b) = &mut self.board {
            let round = v["round"].as_u64().unwrap_or(0);
            b.scalars(round, &record_scalars(v))
                .map_err(|e| SimError::Io(e.to_string()))?;
        }
        Ok(())
    }

    pub(crate) fn file(&self, rel: &str, bytes: &[u8]) -> Result<(), SimError> {
        if let Some(d) = &self.dir {
            let p = d.join(rel);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| SimError::Io(format!("{}: {e}", parent.display())))?;
            }
            std::fs::write(&p, bytes).map_err(|e| SimError::Io(format!("{}: {e}", p.display())))?;
        }
        Ok(())
    }
}

pub(crate) fn num(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// Round 0 of `metrics.jsonl`: the base model on every client's held-out data.
pub(crate) fn base_record(
    model: &LoadedModel,
    data: &[&LocalData],
    names: &[String],
    output: &mut Output,
) -> Result<serde_json::Value, SimError> {
    let (per, mean) = evaluate_losses(model, data, None)?;
    let record = serde_json::json!({
        "round": 0, "phase": "base", "global_eval_loss": mean,
        "clients": names.iter().zip(&per).map(|(name, l)| serde_json::json!({
            "name": name, "global_eval_loss": l,
        })).collect::<Vec<_>>(),
    });
    output.record(&record)?;
    Ok(record)
}

/// Greedy generations of the base model and of `global` on each client's held-out prompts.
pub(crate) fn generations_before_after(
    cfg: &SimConfig,
    model: &LoadedModel,
    global: &Adapter,
    names: &[String],
    eval_examples: &[Vec<Example>],
    progress: &mut dyn FnMut(Progress),
) -> Result<Vec<(String, GenerationScores, GenerationScores)>, SimError> {
    let mut gens = Vec::new();
    if cfg.eval.generations == 0 {
        return Ok(gens);
    }
    progress(Progress::Note("generating on held-out prompts".into()));
    let base = &model.model;
    let mut tuned = model.model.clone();
    tuned
        .attach_weights(global, 0.0)
        .map_err(|source| SimError::Train { client: 0, source })?;
    for (k, ex) in eval_examples.iter().enumerate() {
        let g = |m| {
            generations(
                m,
                &model.tokenizer,
                ex,
                cfg.eval.generations,
                cfg.eval.max_new_tokens,
            )
            .map_err(|source| SimError::Train { client: k, source })
        };
        gens.push((names[k].clone(), g(base)?, g(&tuned)?));
    }
    Ok(gens)
}

/// Each stage's label and its last global adapter (the stages before the final one).
pub(crate) type StageGlobals = Vec<(String, Adapter)>;

/// The last round of every stage but the final one, with the stage's phase as a label
/// (`SFT`, `DPO`, ...): the rounds whose global adapter the report also scores.
pub(crate) fn stage_ends(coord: &fedtune_coordinator::CoordConfig) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut end = coord.rounds;
    let label = |p: fedtune_protocol::Phase| {
        serde_json::to_value(p)
            .ok()
            .and_then(|v| v.as_str().map(str::to_uppercase))
            .unwrap_or_default()
    };
    let mut phase = coord.phase;
    for s in &coord.then {
        if end > 0 {
            out.push((end, label(phase)));
        }
        end += s.rounds;
        phase = s.phase;
    }
    out
}

/// Generation scores of each of `globals` (a stage's label and its last global adapter), per
/// client, on the same held-out prompts as [`generations_before_after`].
pub(crate) fn generations_by_stage(
    cfg: &SimConfig,
    model: &LoadedModel,
    globals: &StageGlobals,
    eval_examples: &[Vec<Example>],
    progress: &mut dyn FnMut(Progress),
) -> Result<Vec<(String, Vec<GenerationScores>)>, SimError> {
    if cfg.eval.generations == 0 {
        return Ok(Vec::new());
    }
    let mut out = Vec::with_capacity(globals.len());
    for (label, global) in globals {
        progress(Progress::Note(format!(
            "generating on held-out prompts after the {label} rounds"
        )));
        let mut tuned = model.model.clone();
        tuned
            .attach_weights(global, 0.0)
            .map_err(|source| SimError::Train { client: 0, source })?;
        let scores = eval_examples
            .iter()
            .enumerate()
            .map(|(k, ex)| {
                generations(
                    &tuned,
                    &model.tokenizer,
                    ex,
                    cfg.eval.generations,
                    cfg.eval.max_new_tokens,
                )
                .map_err(|source| SimError::Train { client: k, source })
            })
            .collect::<Result<_, _>>()?;
        out.push((label.clone(), scores));
    }
    Ok(out)
}

/// The `metrics.jsonl` record of one closed round.
#[allow(clippy::too_many_arguments)]
pub(crate) fn round_metrics(
    names: &[String],
    keys: &[PublicKey],
    closed: &RoundClosed,
    log: &[RoundEvent],
    events: &[serde_json::Value],
    per: &[f64],
    mean: f64,
    coordinator_s: f64,
    train_s: &[f64],
) -> serde_json::Value {
    let round = closed.round;
    let name_of = |c: &PublicKey| {
        keys.iter()
            .position(|k| k == c)
            .map(|k| names[k].clone())
            .unwrap_or_else(|| c.to_hex())
    };
    let used: Vec<String> = closed.used.iter().map(name_of).collect();
    let mut clients = Vec::new();
    for (k, name) in names.iter().enumerate() {
        let mut c = serde_json::json!({"name": name, "global_eval_loss": per[k]});
        if let Some(t) = train_s.get(k).filter(|t| **t > 0.0) {
            c["train_wall_s"] = (*t).into();
        }
        for e in log.iter().filter(|e| e.client() == Some(keys[k])) {
            match e {
                RoundEvent::Accepted {
                    round: r,
                    num_examples,
                    bytes,
                    metrics,
                    ..
                } if *r == round => {
                    c["status"] = "accepted".into();
                    c["num_examples"] = (*num_examples).into();
                    c["upload_bytes"] = (*bytes).into();
                    for (m, v) in metrics {
                        c[m] = (*v).into();
                    }
                }
                RoundEvent::Rejected { detail, .. } => {
                    c["status"] = "rejected".into();
                    c["reason"] = detail.clone().into();
                }
                RoundEvent::Declined { detail, .. } => {
                    c["status"] = "declined".into();
                    c["reason"] = detail.clone().into();
                }
                _ => {}
            }
        }
        for e in events
            .iter()
            .filter(|e| e["client"] == k && e["round"] == round)
        {
            if c.get("status").is_none() || e["event"] == "dropout" {
                c["status"] = e["event"].clone();
            }
        }
        clients.push(c);
    }
    serde_json::json!({
        "round": round,
        "phase": closed.phase,
        "global_eval_loss": mean,
        "used": used,
        "failures": closed.failures.iter().map(|f| serde_json::json!({
            "client": name_of(&f.client), "reason": f.reason,
        })).collect::<Vec<_>>(),
        "metrics": closed.metrics,
        "dp_epsilon": closed.report.as_ref().and_then(|r| r.epsilon),
        "sim_seconds": closed.seconds,
        "coordinator_seconds": coordinator_s,
        "rejections": closed.rejections,
        "clients": clients,
    })
}
