//! Preference losses on sequence log-probabilities.
//!
//! DPO (Rafailov et al. 2023), TRL's `sigmoid` loss:
//! `z = β·((π_c − ref_c) − (π_r − ref_r))`, `loss = −log σ(z)`; the implicit rewards are
//! `β·(π − ref)` for chosen and rejected completions.

/// Numerically stable `log σ(x)`.
pub fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

/// Sequence log-probabilities of one preference pair under the policy and the reference.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairLogps {
    /// Policy, chosen completion.
    pub policy_chosen: f64,
    /// Policy, rejected completion.
    pub policy_rejected: f64,
    /// Reference, chosen completion.
    pub reference_chosen: f64,
    /// Reference, rejected completion.
    pub reference_rejected: f64,
}

/// DPO metrics averaged over pairs, with TRL's names in [`DpoMetrics::to_json`].
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DpoMetrics {
    /// Mean `−log σ(z)`.
    pub loss: f64,
    /// Mean `z` (the β-scaled margin).
    pub reward_margin: f64,
    /// Fraction of pairs whose chosen reward exceeds the rejected one.
    pub reward_accuracy: f64,
    /// Mean `β·(π_c − ref_c)`.
    pub rewards_chosen: f64,
    /// Mean `β·(π_r − ref_r)`.
    pub rewards_rejected: f64,
    /// Mean policy log-probability of chosen completions.
    pub logps_chosen: f64,
    /// Mean policy log-probability of rejected completions.
    pub logps_rejected: f64,
    /// Number of pairs.
    pub pairs: usize,
}

impl DpoMetrics {
    /// Sigmoid-DPO metrics of `pairs` at temperature `beta`.
    pub fn sigmoid(pairs: &[PairLogps], beta: f64) -> Self {
        let n = pairs.len().max(1) as f64;
        let mut m = DpoMetrics {
            pairs: pairs.len(),
            ..Default::default()
        };
        for p in pairs {
            let rc = beta * (p.policy_chosen - p.reference_chosen);
            let rr = beta * (p.policy_rejected - p.reference_rejected);
            let z = rc - rr;
            m.loss += -log_sigmoid(z) / n;
            m.reward_margin += z / n;
            m.reward_accuracy += f64::from(u8::from(rc > rr)) / n;
            m.rewards_chosen += rc / n;
            m.rewards_rejected += rr / n;
            m.logps_chosen += p.policy_chosen / n;
            m.logps_rejected += p.policy_rejected / n;
        }
        m
    }

    /// The metrics under TRL's names.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "dpo_loss": self.loss,
            "reward_margin": self.reward_margin,
            "reward_accuracy": self.reward_accuracy,
            "rewards/chosen": self.rewards_chosen,
            "rewards/rejected": self.rewards_rejected,
            "rewards/margins": self.reward_margin,
            "rewards/accuracies": self.reward_accuracy,
            "logps/chosen": self.logps_chosen,
            "logps/rejected": self.logps_rejected,
            "pairs": self.pairs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_sigmoid_is_stable_at_both_tails() {
        assert!((log_sigmoid(0.0) - (0.5f64).ln()).abs() < 1e-15);
        assert!((log_sigmoid(-800.0) + 800.0).abs() < 1e-9);
        assert!(log_sigmoid(800.0).abs() < 1e-300);
    }
}
