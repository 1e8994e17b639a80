//! Reward functions for learning from rewards (GRPO): each a function of (prompt, completion,
//! the example's other fields) → f32, combined with weights (TRL's `reward_weights`).
//!
//! Written on the command line as `NAME[:ARG]` ([`RewardFn::parse`]):
//! - `json_valid`: 1 when the completion parses as JSON, else 0.
//! - `json_schema:FILE`: 1 when it parses and validates against the JSON Schema in FILE (drafts
//!   4 to 2020-12, by the `jsonschema` crate), else 0.
//! - `field_match[:FIELD]`: the fraction of the fields of the example's reference object
//!   (`FIELD`, default `reference`: an object, or a string holding one) that the completion's
//!   JSON object has with equal values; 0 when it does not parse as an object.
//! - `exact_match[:FIELD]`: 1 when the trimmed completion equals the example's `FIELD` (default
//!   `reference`; a string, or any JSON value compared as parsed JSON), else 0.
//! - `regex:PATTERN`: 1 when PATTERN matches somewhere in the completion (anchor it with `^…$`
//!   for a whole-completion format check), else 0.
//! - `length:MIN:MAX`: 0 for a completion of MIN to MAX characters; outside, minus the distance
//!   to the range over MAX, down to −1.
//! - `command:PROGRAM [ARGS…]`: a program of the site's own, run once per batch: it reads one
//!   JSON object per line on stdin (`prompt`, `completion` and the example's other fields) and
//!   writes one number per line on stdout, within a timeout (default 30 s).
//! - `reward_model:DIR`: the score of a reward model trained with `fedtune train reward` (DIR,
//!   its adapter) on the run's base model, of the prompt and the completion
//!   ([`crate::train::reward::RewardModel`]; loaded by [`Rewards::load_models`]).
//!
//! A completion wrapped in a Markdown code fence (```` ```json … ``` ````) is read without it by
//! the JSON rewards.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// What a reward function scores.
#[derive(Debug, Clone, Copy)]
pub struct RewardInput<'a> {
    /// The prompt as text (a conversation's rendered prompt).
    pub prompt: &'a str,
    /// A conversation's messages (`None` for a text prompt).
    pub messages: Option<&'a [crate::template::Message]>,
    /// The generated completion.
    pub completion: &'a str,
    /// The example's other fields (a reference answer, a schema name, ...).
    pub fields: &'a Map<String, Value>,
}

/// One reward function.
#[derive(Debug)]
pub enum RewardFn {
    /// The completion parses as JSON.
    JsonValid,
    /// The completion validates against a JSON Schema.
    JsonSchema {
        /// The schema's file.
        path: PathBuf,
        /// The compiled validator.
        validator: Box<jsonschema::Validator>,
    },
    /// Fraction of a reference object's fields that the completion's JSON matches.
    FieldMatch {
        /// The example's field holding the reference object.
        field: String,
    },
    /// The completion equals a reference.
    ExactMatch {
        /// The example's field holding the reference.
        field: String,
    },
    /// A regular expression matches the completion.
    Regex(regex::Regex),
    /// A penalty outside a length range (characters).
    Length {
        /// Shortest completion without penalty.
        min: usize,
        /// Longest completion without penalty.
        max: usize,
    },
    /// A program that scores JSON lines.
    Command {
        /// Program and arguments.
        argv: Vec<String>,
        /// Longest run per batch.
        timeout: Duration,
    },
    /// A reward model's score.
    Model {
        /// The reward model's adapter directory.
        path: PathBuf,
        /// The model, once loaded on the run's base ([`Rewards::load_models`]).
        model: Option<Box<crate::train::reward::RewardModel>>,
    },
}

/// The JSON text of a completion: trimmed, without a Markdown code fence around it.
fn json_text(completion: &str) -> &str {
    let t = completion.trim();
    if let Some(rest) = t.strip_prefix("```")
        && let Some(body) = rest.strip_suffix("```")
    {
        // Drop the fence's language tag (` ```json `).
        let body = body.split_once('\n').map_or(body, |(first, tail)| {
            if first.trim().chars().all(|c| c.is_ascii_alphanumeric()) {
                tail
            } else {
                body
            }
        });
        return body.trim();
    }
    t
}

fn parse_json(completion: &str) -> Option<Value> {
    serde_json::from_str(json_text(completion)).ok()
}

/// Numbers equal as numbers (`3` and `3.0`), everything else as JSON values.
fn json_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

impl RewardFn {
    /// Parses `NAME[:ARG]` (see the module's documentation); files are read relative to the
    /// working directory.
    pub fn parse(spec: &str) -> Result<RewardFn> {
        let (name, arg) = match spec.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (spec, None),
        };
        let bad = |msg: String| Error::Invalid(format!("--reward {spec}: {msg}"));
        Ok(match (name, arg) {
            ("json_valid", None) => RewardFn::JsonValid,
            ("json_schema", Some(file)) => {
                let path = PathBuf::from(file);
                let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
                let schema: Value =
                    serde_json::from_str(&text).map_err(|e| Error::parse(&path, e))?;
                let validator = jsonschema::validator_for(&schema)
                    .map_err(|e| Error::parse(&path, format!("not a valid JSON Schema: {e}")))?;
                RewardFn::JsonSchema {
                    path,
                    validator: Box::new(validator),
                }
            }
            ("json_schema", None) => {
                return Err(bad("needs the schema's file: json_schema:FILE".into()));
            }
            ("field_match", f) => RewardFn::FieldMatch {
                field: f.unwrap_or("reference").to_string(),
            },
            ("exact_match", f) => RewardFn::ExactMatch {
                field: f.unwrap_or("reference").to_string(),
            },
            ("regex", Some(p)) => RewardFn::Regex(
                regex::Regex::new(p).map_err(|e| bad(format!("not a regular expression: {e}")))?,
            ),
            ("length", Some(range)) => {
                let (lo, hi) = range
                    .split_once(':')
                    .ok_or_else(|| bad("expected length:MIN:MAX".into()))?;
                let num = |s: &str| {
                    s.trim()
                        .parse::<usize>()
                        .map_err(|_| bad(format!("`{s}` is not a length")))
                };
                let (min, max) = (num(lo)?, num(hi)?);
                if min > max {
                    return Err(bad(format!("MIN {min} is above MAX {max}")));
                }
                RewardFn::Length { min, max }
            }
            ("command", Some(cmd)) => {
                let argv: Vec<String> = cmd.split_whitespace().map(str::to_string).collect();
                if argv.is_empty() {
                    return Err(bad("expected command:PROGRAM [ARGS...]".into()));
                }
                RewardFn::Command {
                    argv,
                    timeout: Duration::from_secs(30),
                }
            }
            ("reward_model", Some(dir)) if !dir.is_empty() => RewardFn::Model {
                path: PathBuf::from(dir),
                model: None,
            },
            _ => {
                return Err(bad(
                    "unknown reward (json_valid, json_schema:FILE, field_match[:FIELD], \
                     exact_match[:FIELD], regex:PATTERN, length:MIN:MAX, command:PROGRAM, \
                     reward_model:DIR)"
                        .into(),
                ));
            }
        })
    }

    /// The name metrics carry (TRL logs `rewards/<name>/mean`).
    pub fn name(&self) -> &'static str {
        match self {
            RewardFn::JsonValid => "json_valid",
            RewardFn::JsonSchema { .. } => "json_schema",
            RewardFn::FieldMatch { .. } => "field_match",
            RewardFn::ExactMatch { .. } => "exact_match",
            RewardFn::Regex(_) => "regex",
            RewardFn::Length { .. } => "length",
            RewardFn::Command { .. } => "command",
            RewardFn::Model { .. } => "reward_model",
        }
    }

    /// The score of a completion that fully passes: 1 for the yes/no checks and
    /// `field_match` (every field equal), 0 (no penalty) for `length`; `None` for commands
    /// and reward models, whose scale is their own.
    pub fn full_score(&self) -> Option<f32> {
        match self {
            RewardFn::JsonValid
            | RewardFn::JsonSchema { .. }
            | RewardFn::FieldMatch { .. }
            | RewardFn::ExactMatch { .. }
            | RewardFn::Regex(_) => Some(1.0),
            RewardFn::Length { .. } => Some(0.0),
            RewardFn::Command { .. } | RewardFn::Model { .. } => None,
        }
    }

    /// The rewards of a batch of completions, one per input.
    pub fn score(&self, inputs: &[RewardInput<'_>]) -> Result<Vec<f32>> {
        match self {
            RewardFn::Command { argv, timeout } => run_command(argv, *timeout, inputs),
            RewardFn::Model { model: Some(m), .. } => m.score(inputs),
            RewardFn::Model { path, model: None } => Err(Error::Invalid(format!(
                "reward_model:{}: the reward model is not loaded (Rewards::load_models)",
                path.display()
            ))),
            _ => Ok(inputs.iter().map(|i| self.score_one(i)).collect()),
        }
    }

    fn score_one(&self, i: &RewardInput<'_>) -> f32 {
        let hit = |b: bool| if b { 1.0 } else { 0.0 };
        match self {
            RewardFn::JsonValid => hit(parse_json(i.completion).is_some()),
            RewardFn::JsonSchema { validator, .. } => {
                hit(parse_json(i.completion).is_some_and(|v| validator.is_valid(&v)))
            }
            RewardFn::FieldMatch { field } => {
                let reference = match i.fields.get(field) {
                    Some(Value::Object(o)) => Some(o.clone()),
                    Some(Value::String(s)) => match serde_json::from_str(s) {
                        Ok(Value::Object(o)) => Some(o),
                        _ => None,
                    },
                    _ => None,
                };
                let (Some(reference), Some(Value::Object(got))) =
                    (reference, parse_json(i.completion))
                else {
                    return 0.0;
                };
                if reference.is_empty() {
                    return 0.0;
                }
                let equal = reference
                    .iter()
                    .filter(|(k, v)| got.get(*k).is_some_and(|g| json_equal(g, v)))
                    .count();
                equal as f32 / reference.len() as f32
            }
            RewardFn::ExactMatch { field } => match i.fields.get(field) {
                Some(Value::String(s)) => hit(i.completion.trim() == s.trim()),
                Some(v) => hit(parse_json(i.completion).is_some_and(|g| json_equal(&g, v))),
                None => 0.0,
            },
            RewardFn::Regex(re) => hit(re.is_match(i.completion)),
            RewardFn::Length { min, max } => {
                let n = i.completion.chars().count();
                let d = if n < *min {
                    min - n
                } else if n > *max {
                    n - max
                } else {
                    0
                };
                -((d as f32 / (*max).max(1) as f32).min(1.0))
            }
            RewardFn::Command { .. } | RewardFn::Model { .. } => {
                unreachable!("scored per batch")
            }
        }
    }

    /// Checks what a reward needs of the data (`field_match`, `exact_match`: the field),
    /// naming the file and line of the first example without it.
    pub fn check_fields(&self, path: &Path, fields: &[(usize, &Map<String, Value>)]) -> Result<()> {
        let field = match self {
            RewardFn::FieldMatch { field } | RewardFn::ExactMatch { field } => field,
            _ => return Ok(()),
        };
        for (line, f) in fields {
            if !f.contains_key(field) {
                return Err(Error::Data {
                    path: path.to_path_buf(),
                    line: *line,
                    message: format!("{} needs the field `{field}`", self.name()),
                });
            }
        }
        Ok(())
    }
}

/// Runs a command reward on a batch.
fn run_command(argv: &[String], timeout: Duration, inputs: &[RewardInput<'_>]) -> Result<Vec<f32>> {
    let what = argv.join(" ");
    let fail = |msg: String| Error::Invalid(format!("reward command `{what}`: {msg}"));
    let mut child = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot start: {e}")))?;
    let mut lines = String::new();
    for i in inputs {
        let mut obj = i.fields.clone();
        obj.insert("prompt".into(), Value::String(i.prompt.into()));
        obj.insert("completion".into(), Value::String(i.completion.into()));
        lines.push_str(&Value::Object(obj).to_string());
        lines.push('\n');
    }
    // Written from a thread, so that a program that writes before it has read everything
    // cannot deadlock against a full pipe.
    let mut stdin = child.stdin.take().expect("piped");
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(lines.as_bytes());
    });
    let stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .collect::<std::io::Result<Vec<String>>>()
    });
    let stderr = child.stderr.take().expect("piped");
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut std::io::BufReader::new(stderr), &mut s);
        s
    });
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| fail(e.to_string()))? {
            break s;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Err(fail(format!(
                "no answer within {:.0} s (killed)",
                timeout.as_secs_f64()
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let _ = writer.join();
    let out = reader
        .join()
        .map_err(|_| fail("reading its output failed".into()))?
        .map_err(|e| fail(format!("reading its output: {e}")))?;
    let err = err_reader.join().unwrap_or_default();
    if !status.success() {
        let tail: String = err.lines().last().unwrap_or("").chars().take(200).collect();
        return Err(fail(format!("exited with {status}: {tail}")));
    }
    let scores: Vec<&str> = out
        .iter()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .collect();
    if scores.len() != inputs.len() {
        return Err(fail(format!(
            "wrote {} scores for {} completions (one number per line expected)",
            scores.len(),
            inputs.len()
        )));
    }
    scores
        .iter()
        .enumerate()
        .map(|(k, s)| {
            s.parse::<f32>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| fail(format!("line {}: `{s}` is not a finite number", k + 1)))
        })
        .collect()
}

/// Reward functions with their weights (TRL's `reward_funcs` and `reward_weights`).
#[derive(Debug)]
pub struct Rewards {
    /// Functions and weights.
    pub fns: Vec<(RewardFn, f64)>,
}

/// The rewards of a batch: the weighted total per completion, and each function's own.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// `Σ wᵢ·rᵢ` per completion.
    pub total: Vec<f32>,
    /// Per function (in order): its rewards.
    pub each: Vec<Vec<f32>>,
}

impl Scored {
    /// Metrics with TRL's names: `reward` and `reward_std` of the weighted total, and
    /// `rewards/<name>/mean` and `rewards/<name>/std` per function of `rewards` (which scored
    /// this batch).
    pub fn metrics(&self, rewards: &Rewards) -> BTreeMap<String, f64> {
        let wide = |v: &[f32]| -> Vec<f64> { v.iter().map(|x| f64::from(*x)).collect() };
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let total = wide(&self.total);
        let mut m = BTreeMap::new();
        m.insert("reward".into(), mean(&total));
        m.insert("reward_std".into(), std_dev(&total));
        for ((f, _), r) in rewards.fns.iter().zip(&self.each) {
            let r = wide(r);
            m.insert(format!("rewards/{}/mean", f.name()), mean(&r));
            m.insert(format!("rewards/{}/std", f.name()), std_dev(&r));
        }
        m
    }

    /// `rewards/<name>/pass_rate`: the share of completions that reach a function's full score
    /// ([`RewardFn::full_score`]), for every function that has one.
    pub fn pass_rates(&self, rewards: &Rewards) -> BTreeMap<String, f64> {
        rewards
            .fns
            .iter()
            .zip(&self.each)
            .filter_map(|((f, _), r)| {
                let full = f.full_score()?;
                let passed = r.iter().filter(|&&x| x >= full).count();
                Some((
                    format!("rewards/{}/pass_rate", f.name()),
                    passed as f64 / r.len().max(1) as f64,
                ))
            })
            .collect()
    }
}

/// Unbiased standard deviation (TRL's `nanstd` without NaNs); 0 for fewer than two values.
pub(crate) fn std_dev(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return 0.0;
    }
    let m = v.iter().sum::<f64>() / v.len() as f64;
    (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
}

/// Completion metrics with TRL's names: `completions/mean_length`, `min_length`,
/// `max_length` (tokens) and `clipped_ratio` (the share that ended without a stop id).
pub fn completion_metrics(completions: &[&Vec<u32>], stop_ids: &[u32]) -> BTreeMap<String, f64> {
    let ended = |c: &Vec<u32>| c.last().is_some_and(|t| stop_ids.contains(t));
    let lens: Vec<f64> = completions.iter().map(|c| c.len() as f64).collect();
    let mut m = BTreeMap::new();
    m.insert(
        "completions/mean_length".into(),
        lens.iter().sum::<f64>() / lens.len().max(1) as f64,
    );
    m.insert(
        "completions/min_length".into(),
        lens.iter().copied().fold(f64::INFINITY, f64::min),
    );
    m.insert(
        "completions/max_length".into(),
        lens.iter().copied().fold(0.0, f64::max),
    );
    m.insert(
        "completions/clipped_ratio".into(),
        completions.iter().filter(|c| !ended(c)).count() as f64 / completions.len().max(1) as f64,
    );
    m
}

impl Rewards {
    /// `specs` with `weights` (default: 1 each).
    pub fn parse(specs: &[String], weights: &[f64]) -> Result<Rewards> {
        if specs.is_empty() {
            return Err(Error::Invalid("at least one --reward is needed".into()));
        }
        if !weights.is_empty() && weights.len() != specs.len() {
            return Err(Error::Invalid(format!(
                "{} reward weights for {} rewards",
                weights.len(),
                specs.len()
            )));
        }
        let fns = specs
            .iter()
            .enumerate()
            .map(|(k, s)| Ok((RewardFn::parse(s)?, weights.get(k).copied().unwrap_or(1.0))))
            .collect::<Result<_>>()?;
        Ok(Rewards { fns })
    }

    /// Loads every `reward_model:DIR` reward onto `base` (the run's base model; its own
    /// adapter is left out), tokenising with `tokenizer`.
    pub fn load_models<B: crate::train::reward::RewardBase + ?Sized>(
        &mut self,
        base: &B,
        tokenizer: &std::sync::Arc<crate::Tokenizer>,
    ) -> Result<()> {
        for (f, _) in &mut self.fns {
            if let RewardFn::Model { path, model } = f {
                *model = Some(Box::new(crate::train::reward::RewardModel::load(
                    base,
                    tokenizer.clone(),
                    path,
                )?));
            }
        }
        Ok(())
    }

    /// Scores a batch.
    pub fn score(&self, inputs: &[RewardInput<'_>]) -> Result<Scored> {
        let each: Vec<Vec<f32>> = self
            .fns
            .iter()
            .map(|(f, _)| f.score(inputs))
            .collect::<Result<_>>()?;
        let total = (0..inputs.len())
            .map(|k| {
                self.fns
                    .iter()
                    .zip(&each)
                    .map(|((_, w), r)| *w as f32 * r[k])
                    .sum()
            })
            .collect();
        Ok(Scored { total, each })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input<'a>(completion: &'a str, fields: &'a Map<String, Value>) -> RewardInput<'a> {
        RewardInput {
            prompt: "Note: 71-year-old woman, fever.",
            messages: None,
            completion,
            fields,
        }
    }

    fn fields(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(o) => o,
            _ => unreachable!(),
        }
    }

    #[test]
    fn json_rewards() {
        let f = fields(serde_json::json!({
            "reference": {"age": 71, "sex": "F", "symptom": "fever"}
        }));
        let score = |spec: &str, c: &str| {
            RewardFn::parse(spec)
                .unwrap()
                .score(&[input(c, &f)])
                .unwrap()[0]
        };
        assert_eq!(score("json_valid", r#" {"age": 71} "#), 1.0);
        assert_eq!(score("json_valid", "```json\n{\"age\": 71}\n```"), 1.0);
        assert_eq!(score("json_valid", "Sure! {\"age\": 71}"), 0.0);
        let fm = |c: &str| score("field_match", c);
        assert_eq!(fm(r#"{"age": 71.0, "sex": "F", "symptom": "fever"}"#), 1.0);
        assert!((fm(r#"{"age": 71, "sex": "M"}"#) - 1.0 / 3.0).abs() < 1e-6);
        assert_eq!(fm("not json"), 0.0);
        assert_eq!(fm("[1, 2]"), 0.0);
        let g = fields(serde_json::json!({"answer": "42", "n": 3}));
        let em = |spec: &str, c: &str| {
            RewardFn::parse(spec)
                .unwrap()
                .score(&[input(c, &g)])
                .unwrap()[0]
        };
        assert_eq!(em("exact_match:answer", " 42\n"), 1.0);
        assert_eq!(em("exact_match:answer", "41"), 0.0);
        assert_eq!(em("exact_match:n", "3.0"), 1.0);
        assert_eq!(em("exact_match:missing", "3"), 0.0);
    }

    #[test]
    fn json_schema_validates_with_the_crate() {
        let dir = std::env::temp_dir().join(format!("fedtune-schema-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("note.json");
        std::fs::write(
            &path,
            r#"{"type": "object", "required": ["age", "sex"],
                "properties": {"age": {"type": "integer", "minimum": 0},
                               "sex": {"enum": ["F", "M"]}}}"#,
        )
        .unwrap();
        let r = RewardFn::parse(&format!("json_schema:{}", path.display())).unwrap();
        let f = Map::new();
        let s = |c: &str| r.score(&[input(c, &f)]).unwrap()[0];
        assert_eq!(s(r#"{"age": 71, "sex": "F"}"#), 1.0);
        assert_eq!(s(r#"{"age": -1, "sex": "F"}"#), 0.0);
        assert_eq!(s(r#"{"age": 71, "sex": "X"}"#), 0.0);
        assert_eq!(s(r#"{"age": 71}"#), 0.0);
        std::fs::write(&path, r#"{"type": 12}"#).unwrap();
        let err = RewardFn::parse(&format!("json_schema:{}", path.display()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("note.json") && err.contains("JSON Schema"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn regex_length_weights_and_bad_specs() {
        let f = Map::new();
        let r = Rewards::parse(
            &["regex:^\\{.*\\}$".into(), "length:5:10".into()],
            &[2.0, 0.5],
        )
        .unwrap();
        let out = r
            .score(&[
                input("{abc}", &f),
                input("{abcdefghijklmno}", &f),
                input("x", &f),
            ])
            .unwrap();
        assert_eq!(out.each[0], vec![1.0, 1.0, 0.0]);
        assert_eq!(out.each[1], vec![0.0, -0.7, -0.4]);
        assert_eq!(out.total, vec![2.0, 2.0 - 0.35, -0.2]);
        for (bad, what) in [
            ("nonsense", "unknown reward"),
            ("regex:(", "regular expression"),
            ("length:9:3", "above"),
            ("json_schema", "schema's file"),
            ("json_schema:/nowhere/schema.json", "/nowhere/schema.json"),
        ] {
            let err = RewardFn::parse(bad).unwrap_err().to_string();
            assert!(err.contains(what), "{bad}: {err}");
        }
        assert!(Rewards::parse(&["json_valid".into()], &[1.0, 2.0]).is_err());
        assert!(Rewards::parse(&[], &[]).is_err());
    }

    #[cfg(unix)]
    #[test]
    fn a_command_scores_json_lines_and_its_mistakes_are_named() {
        let f = fields(serde_json::json!({"reference": "yes"}));
        let inputs = [input("yes", &f), input("no", &f)];
        // Scores 1 when the completion equals the reference, read from the JSON lines.
        let cmd = |script: &str, timeout_ms: u64| RewardFn::Command {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            timeout: Duration::from_millis(timeout_ms),
        };
        let good = cmd(
            r#"while read -r l; do case "$l" in *'"completion":"yes"'*) echo 1;; *) echo 0.25;; esac; done"#,
            5000,
        );
        assert_eq!(good.score(&inputs).unwrap(), vec![1.0, 0.25]);
        for (script, timeout, what) in [
            ("cat > /dev/null; echo 1", 5000, "wrote 1 scores for 2"),
            ("cat > /dev/null; echo 1; echo x", 5000, "line 2: `x`"),
            ("cat > /dev/null; echo oops >&2; exit 3", 5000, "oops"),
            ("sleep 5", 200, "no answer within"),
        ] {
            let err = cmd(script, timeout).score(&inputs).unwrap_err().to_string();
            assert!(err.contains(what), "{script}: {err}");
        }
        let err = RewardFn::parse("command:/nowhere/scorer")
            .unwrap()
            .score(&inputs)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot start"), "{err}");
    }
}
