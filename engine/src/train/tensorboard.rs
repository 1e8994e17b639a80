//! TensorBoard event files of a run (`report_to = "tensorboard"`), beside `train_log.jsonl`:
//! `<output>/runs/events.out.tfevents.<seconds>.<host>.<pid>` (a resumed run adds a file, as
//! transformers does), with the tags transformers' `TensorBoardCallback` writes:
//! `train/loss`, `train/learning_rate`, `train/grad_norm`, `train/epoch`, the objective's
//! metrics as `train/<name>` (`train/rewards/margins`, ...), and `eval/loss`,
//! `eval/perplexity` and `eval/<name>` for evaluations. TFRecord framing and the protobufs
//! come from the `tfrecord` crate; each event is flushed as it is written.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use tfrecord::{EventMeta, EventWriter, EventWriterConfig};

use super::state::LogEntry;
use crate::error::{Error, Result};

/// An open event file.
pub struct Board {
    writer: EventWriter<BufWriter<File>>,
    path: PathBuf,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().replace(['/', '.'], "_"))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

impl Board {
    /// A new event file under `<output>/runs/`.
    pub fn open(output: &Path) -> Result<Board> {
        let dir = output.join("runs");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let path = dir.join(format!(
            "events.out.tfevents.{}.{}.{}",
            now() as u64,
            hostname(),
            std::process::id()
        ));
        let writer =
            EventWriter::create(&path, EventWriterConfig { auto_flush: true }).map_err(|e| {
                Error::Invalid(format!("TensorBoard: creating {}: {e}", path.display()))
            })?;
        Ok(Board { writer, path })
    }

    /// The event file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one log entry's values as scalars at its step.
    pub fn log(&mut self, e: &LogEntry) -> Result<()> {
        let wall = now();
        let eval = e.eval_loss.is_some();
        let mut scalars: Vec<(String, f64)> = Vec::new();
        let mut put = |tag: &str, v: Option<f64>| {
            if let Some(v) = v.filter(|v| v.is_finite()) {
                scalars.push((tag.to_string(), v));
            }
        };
        if eval {
            put("eval/loss", e.eval_loss);
            put("eval/perplexity", e.eval_perplexity);
        } else {
            put("train/loss", e.loss);
            put("train/learning_rate", e.learning_rate);
            put("train/grad_norm", e.grad_norm);
            put("train/epoch", Some(e.epoch));
            put("train/tokens_per_second", e.tokens_per_second);
            put("train/loss_scale", e.loss_scale);
        }
        for (k, v) in &e.metrics {
            let tag = match k.strip_prefix("eval_") {
                Some(rest) if eval => format!("eval/{rest}"),
                _ if eval => format!("eval/{k}"),
                _ => format!("train/{k}"),
            };
            if v.is_finite() {
                scalars.push((tag, *v));
            }
        }
        self.scalars_at(e.step, wall, &scalars)
    }

    /// Writes `values` (tag, value) as scalars at `step`.
    pub fn scalars(&mut self, step: u64, values: &[(String, f64)]) -> Result<()> {
        self.scalars_at(step, now(), values)
    }

    fn scalars_at(&mut self, step: u64, wall: f64, values: &[(String, f64)]) -> Result<()> {
        for (tag, v) in values.iter().filter(|(_, v)| v.is_finite()) {
            self.writer
                .write_scalar(tag, EventMeta::new(step as i64, wall), *v as f32)
                .map_err(|err| {
                    Error::Invalid(format!(
                        "TensorBoard: writing {}: {err}",
                        self.path.display()
                    ))
                })?;
        }
        Ok(())
    }
}
