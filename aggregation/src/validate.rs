//! Validation of client updates before aggregation: non-finite values, unexpected or missing
//! modules, shapes and ranks that do not fit the plan, duplicate senders, and norm outliers.
//! Each rejected update becomes a [`Failure`] with its reason; nothing here panics.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::lowrank::combination_norm_sq;
use crate::update::{Adapter, ClientId, ClientResult, Failure};

/// What a valid update looks like.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Plan {
    /// LoRA modules and the `(out, in)` shape of the weight each adapts.
    pub modules: BTreeMap<String, (usize, usize)>,
    /// Dense tensors and their shapes.
    pub dense: BTreeMap<String, (usize, usize)>,
    /// Largest rank accepted.
    pub max_rank: usize,
    /// Ranks assigned to clients (heterogeneous-rank rules); others may use any rank up to
    /// `max_rank`.
    pub client_ranks: BTreeMap<ClientId, usize>,
}

impl Plan {
    /// The plan an adapter satisfies (its modules, shapes and largest rank).
    pub fn from_adapter(a: &Adapter) -> Self {
        Plan {
            modules: a
                .modules
                .iter()
                .map(|(k, m)| (k.clone(), m.target_shape()))
                .collect(),
            dense: a
                .dense
                .iter()
                .map(|(k, d)| (k.clone(), d.shape()))
                .collect(),
            max_rank: a.modules.values().map(|m| m.rank()).max().unwrap_or(0),
            client_ranks: BTreeMap::new(),
        }
    }
}

/// Norm-based rejection thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct ValidationConfig {
    /// Reject an update whose norm (relative to the round's global adapter) exceeds this
    /// multiple of the round's median update norm (needs at least 3 updates).
    pub outlier_factor: Option<f64>,
    /// Reject an update whose norm exceeds this bound.
    pub max_norm: Option<f64>,
}

/// `‖Xₖ − G‖` over LoRA modules (product space) and dense tensors.
pub fn update_norm(x: &Adapter, global: &Adapter) -> f64 {
    let mut sq = 0.0;
    for (name, m) in &x.modules {
        sq += match global.modules.get(name) {
            Some(g) => combination_norm_sq(&[(1.0, m), (-1.0, g)]),
            None => combination_norm_sq(&[(1.0, m)]),
        };
    }
    for (name, d) in &x.dense {
        sq += match global.dense.get(name) {
            Some(g) => d
                .data
                .iter()
                .zip(&g.data)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>(),
            None => d.data.iter().map(|a| (*a as f64).powi(2)).sum(),
        };
    }
    sq.sqrt()
}

fn check_one(r: &ClientResult, plan: &Plan) -> Result<(), String> {
    let got: BTreeSet<&String> = r.adapter.modules.keys().collect();
    let want: BTreeSet<&String> = plan.modules.keys().collect();
    if let Some(extra) = got.difference(&want).next() {
        return Err(format!("unexpected module `{extra}`"));
    }
    if let Some(missing) = want.difference(&got).next() {
        return Err(format!("missing module `{missing}`"));
    }
    let got: BTreeSet<&String> = r.adapter.dense.keys().collect();
    let want: BTreeSet<&String> = plan.dense.keys().collect();
    if let Some(extra) = got.difference(&want).next() {
        return Err(format!("unexpected tensor `{extra}`"));
    }
    if let Some(missing) = want.difference(&got).next() {
        return Err(format!("missing tensor `{missing}`"));
    }
    let assigned = plan.client_ranks.get(&r.client).copied();
    for (name, m) in &r.adapter.modules {
        let (out, inp) = plan.modules[name];
        let rank = m.a.rows;
        if m.a.cols != inp || m.b.rows != out || m.b.cols != rank {
            return Err(format!(
                "module `{name}`: lora_A {:?} / lora_B {:?} do not fit a [{out}, {inp}] weight",
                m.a.shape(),
                m.b.shape()
            ));
        }
        if rank == 0 || rank > plan.max_rank.max(1) {
            return Err(format!(
                "module `{name}`: rank {rank} outside 1..={}",
                plan.max_rank
            ));
        }
        if let Some(a) = assigned
            && rank != a
        {
            return Err(format!(
                "module `{name}`: rank {rank}, but this client was assigned rank {a}"
            ));
        }
        if !m.scale.is_finite() || m.scale == 0.0 {
            return Err(format!("module `{name}`: invalid scale {}", m.scale));
        }
        if !m.a.is_finite() || !m.b.is_finite() {
            return Err(format!("module `{name}`: NaN or Inf"));
        }
    }
    for (name, d) in &r.adapter.dense {
        if d.shape() != plan.dense[name] {
            return Err(format!(
                "tensor `{name}`: shape {:?}, expected {:?}",
                d.shape(),
                plan.dense[name]
            ));
        }
        if !d.is_finite() {
            return Err(format!("tensor `{name}`: NaN or Inf"));
        }
    }
    Ok(())
}

/// Splits results into the indices of valid ones and failures with reasons.
pub fn validate(
    results: &[ClientResult],
    plan: &Plan,
    global: &Adapter,
    cfg: &ValidationConfig,
) -> (Vec<usize>, Vec<Failure>) {
    let mut failures = Vec::new();
    let mut seen = BTreeSet::new();
    let mut ok = Vec::new();
    for (i, r) in results.iter().enumerate() {
        if !seen.insert(r.client.clone()) {
            failures.push(Failure {
                client: r.client.clone(),
                reason: "duplicate update in this round".into(),
            });
            continue;
        }
        match check_one(r, plan) {
            Ok(()) => ok.push(i),
            Err(reason) => failures.push(Failure {
                client: r.client.clone(),
                reason,
            }),
        }
    }
    if cfg.outlier_factor.is_none() && cfg.max_norm.is_none() {
        return (ok, failures);
    }
    let norms: Vec<f64> = ok
        .iter()
        .map(|&i| update_norm(&results[i].adapter, global))
        .collect();
    let median = {
        let mut s = norms.clone();
        s.sort_by(f64::total_cmp);
        s.get(s.len() / 2).copied()
    };
    let mut kept = Vec::new();
    for (&i, &n) in ok.iter().zip(&norms) {
        let reason = if let Some(m) = cfg.max_norm.filter(|m| n > *m) {
            Some(format!("update norm {n:.4e} exceeds the bound {m:.4e}"))
        } else if let (Some(f), Some(med)) = (cfg.outlier_factor, median)
            && norms.len() >= 3
            && n > f * med
        {
            Some(format!(
                "update norm {n:.4e} is more than {f}x the round's median {med:.4e}"
            ))
        } else {
            None
        };
        match reason {
            Some(reason) => failures.push(Failure {
                client: results[i].client.clone(),
                reason,
            }),
            None => kept.push(i),
        }
    }
    (kept, failures)
}
