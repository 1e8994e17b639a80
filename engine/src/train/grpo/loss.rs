//! GRPO's loss (TRL 1.16's `GRPOTrainer`): group-relative advantages and the clipped policy
//! objective over per-token log-probabilities, with their gradient, for every loss type TRL
//! 1.16 accepts.
//!
//! Per completion `i` with advantage `Aᵢ` and per-token log-probabilities `p` (policy), `o`
//! (the policy that generated it; `o = p` with one iteration per generation) and `r` (the
//! reference, when `beta ≠ 0`): `c₁ = exp(p − o)` per token (or per sequence, exp of the
//! masked mean, with `importance_sampling_level = "sequence"`), and the per-token loss
//! - `grpo`, `bnpo`, `dr_grpo`, `dapo`, `luspo`: `−min(c₁A, clip(c₁, 1−ε, 1+ε_high)·A)`
//!   (`c₁` capped at `delta` when set);
//! - `cispo`: `−sg(min(c₁, ε_high))·A·p`;
//! - `sapo`: `−σ(τ(c₁ − 1))·4/τ·A`, τ `sapo_temperature_pos` for `A > 0`, else `_neg`;
//! - `vespo`: `−sg(φ(w))·A·p` with `w` the sequence's ratio `exp(Σ (p − o))` (clamped as TRL
//!   does) and `φ(w) = e^λ·w^k·e^(−λw)`, `k`, `λ` by the advantage's sign;
//!
//! plus `β·(exp(r − p) − (r − p) − 1)`. Aggregated over the completion tokens: `grpo`, `sapo`:
//! the mean over sequences of each sequence's token mean; `bnpo`: the micro-batch's token mean;
//! `dr_grpo`: the micro-batch's sum over `sequences · max_completion_length`; `dapo`, `cispo`:
//! the sum over the active tokens of the whole optimiser step (so does `vespo`); `luspo`: the
//! mean over sequences of
//! each sequence's sum. Per-micro-batch losses are divided by the number of micro-batches, as
//! TRL divides them by the gradient-accumulation steps.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::Result;

/// TRL's `loss_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrpoLoss {
    /// Sequence means, averaged.
    Grpo,
    /// Token mean of the micro-batch.
    Bnpo,
    /// Sum over `sequences · max_completion_length`.
    DrGrpo,
    /// Token mean over the optimiser step (TRL's default).
    Dapo,
    /// Clipped importance weights times the log-probability.
    Cispo,
    /// A soft gate instead of clipping.
    Sapo,
    /// Sequence sums, averaged.
    Luspo,
    /// Gamma-weighted sequence ratios (VESPO).
    Vespo,
}

impl std::str::FromStr for GrpoLoss {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "grpo" => GrpoLoss::Grpo,
            "bnpo" => GrpoLoss::Bnpo,
            "dr_grpo" => GrpoLoss::DrGrpo,
            "dapo" => GrpoLoss::Dapo,
            "cispo" => GrpoLoss::Cispo,
            "sapo" => GrpoLoss::Sapo,
            "luspo" => GrpoLoss::Luspo,
            "vespo" => GrpoLoss::Vespo,
            other => {
                return Err(format!(
                    "unknown loss_type `{other}` (grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo)"
                ));
            }
        })
    }
}

/// TRL's `scale_rewards`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    /// By the standard deviation within each prompt's group (TRL's default).
    Group,
    /// By the standard deviation over the batch.
    Batch,
    /// Not scaled (Dr. GRPO).
    None,
}

impl std::str::FromStr for ScaleRewards {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "group" | "true" => ScaleRewards::Group,
            "batch" => ScaleRewards::Batch,
            "none" | "false" => ScaleRewards::None,
            other => return Err(format!("scale_rewards `{other}`: group, batch or none")),
        })
    }
}

impl std::str::FromStr for SamplingLevel {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "token" => SamplingLevel::Token,
            "sequence" => SamplingLevel::Sequence,
            other => {
                return Err(format!(
                    "importance_sampling_level `{other}`: token or sequence"
                ));
            }
        })
    }
}

/// TRL's `importance_sampling_level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SamplingLevel {
    /// One ratio per token.
    Token,
    /// One ratio per sequence (GSPO).
    Sequence,
}

/// The options GRPO's loss reads (TRL's names and defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpoLossOptions {
    /// The loss (default `dapo`).
    pub loss_type: GrpoLoss,
    /// KL coefficient against the reference (default 0: no reference pass).
    pub beta: f64,
    /// Lower clipping range ε (default 0.2).
    pub epsilon: f64,
    /// Upper clipping range (default: ε).
    pub epsilon_high: Option<f64>,
    /// Cap on the importance ratio (two-sided clipping; default none).
    pub delta: Option<f64>,
    /// Per token or per sequence ratios.
    pub importance_sampling_level: SamplingLevel,
    /// SAPO's temperature for positive advantages (default 1).
    pub sapo_temperature_pos: f64,
    /// SAPO's temperature for negative advantages (default 1.05).
    pub sapo_temperature_neg: f64,
    /// `dr_grpo`'s constant (default 512).
    pub max_completion_length: usize,
    /// Multiply the KL term by the importance ratio `c₁` (the unbiased reverse-KL gradient of
    /// DeepSeek-V3.2; TRL's default, true).
    pub use_bias_correction_kl: bool,
    /// VESPO's `k` and `λ` for advantages ≥ 0 (defaults 2, 3) and < 0 (3, 2).
    pub vespo_k_pos: f64,
    /// VESPO's λ for advantages ≥ 0.
    pub vespo_lambda_pos: f64,
    /// VESPO's k for negative advantages.
    pub vespo_k_neg: f64,
    /// VESPO's λ for negative advantages.
    pub vespo_lambda_neg: f64,
    /// The sampling temperature: log-probabilities (and the entropy metric) are those of the
    /// logits divided by it, as TRL computes them (default 1).
    pub temperature: f64,
}

impl Default for GrpoLossOptions {
    fn default() -> Self {
        GrpoLossOptions {
            loss_type: GrpoLoss::Dapo,
            beta: 0.0,
            epsilon: 0.2,
            epsilon_high: None,
            delta: None,
            importance_sampling_level: SamplingLevel::Token,
            sapo_temperature_pos: 1.0,
            sapo_temperature_neg: 1.05,
            max_completion_length: 512,
            use_bias_correction_kl: true,
            vespo_k_pos: 2.0,
            vespo_lambda_pos: 3.0,
            vespo_k_neg: 3.0,
            vespo_lambda_neg: 2.0,
            temperature: 1.0,
        }
    }
}

impl GrpoLossOptions {
    fn eps_high(&self) -> f64 {
        self.epsilon_high.unwrap_or(self.epsilon)
    }
}

pub(super) use crate::rewards::std_dev;

/// Advantages of `rewards` laid out as consecutive groups of `group` completions of one prompt
/// (TRL's `sum_then_normalize`): reward minus its group's mean, divided by the group's (or the
/// batch's) standard deviation + 1e-4 unless `scale` is `None`. Also the share of groups whose
/// rewards do not vary (TRL's `frac_reward_zero_std`, counted per completion).
pub fn advantages(rewards: &[f64], group: usize, scale: ScaleRewards) -> (Vec<f64>, f64) {
    let group = group.max(1);
    let batch_std = std_dev(rewards);
    let mut out = Vec::with_capacity(rewards.len());
    let mut zero = 0usize;
    for g in rewards.chunks(group) {
        let mean = g.iter().sum::<f64>() / g.len() as f64;
        let std = match scale {
            ScaleRewards::Batch => batch_std,
            _ => std_dev(g),
        };
        if std.abs() <= 1e-8 {
            zero += g.len();
        }
        for r in g {
            let a = r - mean;
            out.push(match scale {
                ScaleRewards::None => a,
                _ => a / (std + 1e-4),
            });
        }
    }
    (out, zero as f64 / rewards.len().max(1) as f64)
}

/// One completion's per-token log-probabilities (its active tokens only: a completion masked
/// out, e.g. a truncated one with `mask_truncated_completions`, has none).
#[derive(Debug, Clone)]
pub struct SeqLogps<'a> {
    /// Under the policy being trained.
    pub policy: &'a [f32],
    /// Under the policy that generated it (`None`: the same as `policy`, not differentiated).
    pub old: Option<&'a [f32]>,
    /// Under the reference (needed when `beta ≠ 0`).
    pub reference: Option<&'a [f32]>,
    /// Its advantage.
    pub advantage: f64,
}

/// A micro-batch's share of the step's loss, its gradient and the sums TRL's metrics average.
#[derive(Debug, Clone, Default)]
pub struct GrpoMicro {
    /// This micro-batch's contribution to the step's loss.
    pub loss: f64,
    /// `∂loss/∂p` per sequence and token.
    pub d_policy: Vec<Vec<f64>>,
    /// Sums over tokens (or sequences, at sequence level) for the step's metrics: `kl`,
    /// `clip_ratio/low_mean`, `clip_ratio/high_mean`, `clip_ratio/region_mean`,
    /// `cispo_clip_ratio`, with the count they are divided by.
    pub sums: BTreeMap<String, (f64, f64)>,
    /// TRL's `clip_ratio/low_min`: the smallest per-sequence share of low-clipped tokens.
    pub low_min: Option<f64>,
    /// TRL's `clip_ratio/high_max`: the largest per-sequence share of high-clipped tokens.
    pub high_max: Option<f64>,
}

/// σ.
fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// VESPO's weight φ of a sequence's summed log-ratio (not differentiated), for advantage `a`.
fn vespo_phi(o: &GrpoLossOptions, log_ratio: &[f64], a: f64) -> f64 {
    let lower = 1e-8f64.ln();
    let sum: f64 = log_ratio.iter().map(|l| l.clamp(-20.0, 20.0)).sum();
    let log_w = sum.clamp(lower, 20.0);
    let (k, lambda) = if a >= 0.0 {
        (o.vespo_k_pos, o.vespo_lambda_pos)
    } else {
        (o.vespo_k_neg, o.vespo_lambda_neg)
    };
    let lambda = lambda.max(1e-4);
    let v = (lambda + k * log_w - lambda * log_w.exp()).exp();
    if v.is_finite() { v } else { 0.0 }
}

/// One token's policy loss for ratio `c1`, advantage `a`, log-probability `p` (and VESPO's
/// `phi`): `(ℓ, ∂ℓ/∂log c₁, ∂ℓ/∂p directly)`.
fn policy_term(o: &GrpoLossOptions, c1: f64, a: f64, p: f64, phi: f64) -> (f64, f64, f64) {
    let (lo, hi) = (1.0 - o.epsilon, 1.0 + o.eps_high());
    match o.loss_type {
        GrpoLoss::Cispo => {
            let weight = c1.min(o.eps_high());
            (-weight * a * p, 0.0, -weight * a)
        }
        GrpoLoss::Vespo => (-phi * a * p, 0.0, -phi * a),
        GrpoLoss::Sapo => {
            let tau = if a > 0.0 {
                o.sapo_temperature_pos
            } else {
                o.sapo_temperature_neg
            };
            let sg = sigmoid(tau * (c1 - 1.0));
            (-sg * 4.0 / tau * a, -4.0 * a * sg * (1.0 - sg) * c1, 0.0)
        }
        _ => {
            let c2 = c1.clamp(lo, hi);
            let d_c2 = if (lo..=hi).contains(&c1) { c1 } else { 0.0 };
            let (c1c, d_c1) = match o.delta {
                Some(delta) if c1 > delta => (delta, 0.0),
                _ => (c1, c1),
            };
            let (u1, u2) = (c1c * a, c2 * a);
            // torch.min's gradient: to the smaller, split evenly on a tie.
            let d = if u1 < u2 {
                -a * d_c1
            } else if u2 < u1 {
                -a * d_c2
            } else {
                -a * 0.5 * (d_c1 + d_c2)
            };
            (-u1.min(u2), d, 0.0)
        }
    }
}

/// GRPO's loss on one micro-batch of `seqs`: `step_tokens` is the number of active tokens in
/// the whole optimiser step (`dapo`, `cispo`), `micro_batches` the number of micro-batches in it.
pub fn micro_loss(
    o: &GrpoLossOptions,
    seqs: &[SeqLogps<'_>],
    step_tokens: usize,
    micro_batches: usize,
) -> GrpoMicro {
    let (lo, hi) = (1.0 - o.epsilon, 1.0 + o.eps_high());
    let n_seq = seqs.len().max(1) as f64;
    let accum = micro_batches.max(1) as f64;
    let micro_tokens: usize = seqs.iter().map(|s| s.policy.len()).sum();
    let sequence_level = o.importance_sampling_level == SamplingLevel::Sequence;
    let mut out = GrpoMicro::default();
    let mut add = |k: &str, v: f64, n: f64| {
        let e = out.sums.entry(k.to_string()).or_insert((0.0, 0.0));
        e.0 += v;
        e.1 += n;
    };
    let mut d_all = Vec::with_capacity(seqs.len());
    let (mut seq_low, mut seq_high) = (Vec::new(), Vec::new());
    let mut loss = 0.0;
    for s in seqs {
        let len = s.policy.len();
        let a = s.advantage;
        // The weight each token's loss gets in the aggregate.
        let w = match o.loss_type {
            GrpoLoss::Grpo | GrpoLoss::Sapo => 1.0 / (len.max(1) as f64 * n_seq * accum),
            GrpoLoss::Bnpo => 1.0 / (micro_tokens.max(1) as f64 * accum),
            GrpoLoss::DrGrpo => 1.0 / (n_seq * o.max_completion_length as f64 * accum),
            GrpoLoss::Dapo | GrpoLoss::Cispo | GrpoLoss::Vespo => 1.0 / step_tokens.max(1) as f64,
            GrpoLoss::Luspo => 1.0 / (n_seq * accum),
        };
        let p: Vec<f64> = s.policy.iter().map(|v| f64::from(*v)).collect();
        let old: Vec<f64> = match s.old {
            Some(x) => x.iter().map(|v| f64::from(*v)).collect(),
            None => p.clone(),
        };
        // log c₁ per token, or the sequence's masked mean at sequence level.
        let log_ratio: Vec<f64> = p.iter().zip(&old).map(|(a, b)| a - b).collect();
        let seq_log = log_ratio.iter().sum::<f64>() / len.max(1) as f64;
        let phi = vespo_phi(o, &log_ratio, a);
        let mut d = vec![0f64; len];
        // ∂ℓ_t/∂(log c₁) per token (at sequence level, summed onto the sequence's ratio).
        let mut d_log_seq = 0.0;
        let (mut low, mut high) = (0.0, 0.0);
        for t in 0..len {
            let log_c1 = if sequence_level {
                seq_log
            } else {
                log_ratio[t]
            };
            let c1 = log_c1.exp();
            let (mut l, mut dl_dlogc1, mut dp) = policy_term(o, c1, a, p[t], phi);
            if o.beta != 0.0 {
                let r = f64::from(s.reference.expect("reference log-probabilities with beta")[t]);
                let x = r - p[t];
                let kl = x.exp() - x - 1.0;
                // With the bias correction the term is kl·c₁ (c₁ before delta's cap).
                let (w_kl, kl_logged) = if o.use_bias_correction_kl {
                    dl_dlogc1 += o.beta * kl * c1;
                    (c1, kl * c1)
                } else {
                    (1.0, kl)
                };
                l += o.beta * kl * w_kl;
                dp += o.beta * (1.0 - x.exp()) * w_kl;
                add("kl", kl_logged, 1.0);
            }
            loss += w * l;
            if sequence_level {
                d_log_seq += w * dl_dlogc1;
            } else {
                dp += dl_dlogc1;
            }
            d[t] = w * dp;
            if !sequence_level {
                // TRL measures clipping on the ratio after `delta`'s cap.
                let c1m = o.delta.map_or(c1, |d| c1.min(d));
                low += f64::from(u8::from(c1m < lo && a < 0.0));
                high += f64::from(u8::from(c1m > hi && a > 0.0));
            }
        }
        if sequence_level {
            // log c₁ = mean_t (p_t − o_t): each token gets 1/len of the sequence's gradient.
            for dt in d.iter_mut() {
                *dt += d_log_seq / len.max(1) as f64;
            }
            let c1 = o.delta.map_or(seq_log.exp(), |d| seq_log.exp().min(d));
            low = f64::from(u8::from(c1 < lo && a < 0.0));
            high = f64::from(u8::from(c1 > hi && a > 0.0));
        }
        let count = if sequence_level { 1.0 } else { len as f64 };
        if o.loss_type == GrpoLoss::Cispo {
            let clipped = if sequence_level {
                f64::from(u8::from(seq_log.exp() > o.eps_high() && a > 0.0))
            } else {
                log_ratio
                    .iter()
                    .filter(|l| l.exp() > o.eps_high() && a > 0.0)
                    .count() as f64
            };
            add("cispo_clip_ratio", clipped, count);
        } else if o.loss_type == GrpoLoss::Vespo {
            if len > 0 {
                add("vespo/phi_seq_mean", phi, 1.0);
            }
        } else if o.loss_type != GrpoLoss::Sapo {
            add("clip_ratio/low_mean", low, count);
            add("clip_ratio/high_mean", high, count);
            add("clip_ratio/region_mean", low + high, count);
            if len > 0 {
                seq_low.push(low / count);
                seq_high.push(high / count);
            }
        }
        d_all.push(d);
    }
    out.loss = loss;
    out.d_policy = d_all;
    out.low_min = seq_low.iter().copied().reduce(f64::min);
    out.high_max = seq_high.iter().copied().reduce(f64::max);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advantages_are_group_relative() {
        let (a, zero) = advantages(&[1.0, 0.0, 1.0, 0.0, 0.5, 0.5], 2, ScaleRewards::Group);
        let s = std_dev(&[1.0, 0.0]);
        assert!((a[0] - 0.5 / (s + 1e-4)).abs() < 1e-12);
        assert!((a[1] + 0.5 / (s + 1e-4)).abs() < 1e-12);
        assert_eq!(&a[4..], &[0.0, 0.0]);
        assert!((zero - 2.0 / 6.0).abs() < 1e-12);
        let (n, _) = advantages(&[3.0, 1.0], 2, ScaleRewards::None);
        assert_eq!(n, vec![1.0, -1.0]);
    }

    /// Central differences of the loss against `micro_loss`'s gradient, for every loss type,
    /// with ratios inside and outside the clipping range and a KL term.
    #[test]
    fn gradients_match_finite_differences() {
        let policy = [vec![-1.2f32, -0.3, -2.0], vec![-0.7f32, -0.1]];
        let old = [vec![-1.0f32, -0.6, -2.0], vec![-0.9f32, -0.1]];
        let reference = [vec![-1.1f32, -0.5, -1.5], vec![-0.8f32, -0.3]];
        for loss_type in [
            GrpoLoss::Grpo,
            GrpoLoss::Bnpo,
            GrpoLoss::DrGrpo,
            GrpoLoss::Dapo,
            GrpoLoss::Cispo,
            GrpoLoss::Sapo,
            GrpoLoss::Luspo,
            GrpoLoss::Vespo,
        ] {
            for level in [SamplingLevel::Token, SamplingLevel::Sequence] {
                let o = GrpoLossOptions {
                    loss_type,
                    beta: 0.04,
                    use_bias_correction_kl: level == SamplingLevel::Token,
                    importance_sampling_level: level,
                    max_completion_length: 8,
                    ..Default::default()
                };
                let eval = |pol: &[Vec<f32>]| {
                    let seqs: Vec<SeqLogps<'_>> = (0..2)
                        .map(|i| SeqLogps {
                            policy: &pol[i],
                            old: Some(&old[i]),
                            reference: Some(&reference[i]),
                            advantage: if i == 0 { 0.8 } else { -0.6 },
                        })
                        .collect();
                    micro_loss(&o, &seqs, 5, 1)
                };
                let base = eval(&policy);
                for i in 0..2 {
                    for t in 0..policy[i].len() {
                        let h = 1e-3f32;
                        let (mut up, mut down) = (policy.clone(), policy.clone());
                        up[i][t] += h;
                        down[i][t] -= h;
                        let fd = (eval(&up).loss - eval(&down).loss) / (2.0 * f64::from(h));
                        let g = base.d_policy[i][t];
                        // cispo's and vespo's weights are detached: their gradient is not the
                        // loss's derivative.
                        if matches!(loss_type, GrpoLoss::Cispo | GrpoLoss::Vespo) {
                            continue;
                        }
                        assert!(
                            (fd - g).abs() < 2e-4,
                            "{loss_type:?} {level:?} [{i}][{t}]: {g} vs {fd}"
                        );
                    }
                }
            }
        }
    }
}
