//! Preference losses on sequence log-probabilities, with their gradients.
//!
//! With `S` the summed completion log-probability under the policy, `R` under the reference,
//! `n` the completion length and `h = (S_c − R_c) − (S_r − R_r)` (TRL 1.16's `DPOTrainer` and
//! the experimental `CPOTrainer`/`ORPOTrainer`, whose code these follow):
//!
//! | loss | per pair | rewards |
//! |---|---|---|
//! | `sigmoid` (DPO) | `−(1−ε)·log σ(βh) − ε·log σ(−βh)` (cDPO smoothing ε; TRL: ε = 0) | `β(S − R)` |
//! | `ipo` | `(h̄ − 1/(2β))²`, `h̄ = (S_c−R_c)/n_c − (S_r−R_r)/n_r` (TRL's length normalisation) | `β(S − R)` |
//! | `hinge` | `max(0, 1 − βh)` | `β(S − R)` |
//! | `simpo` | `−(1−ε)·log σ(β(S_c/n_c − S_r/n_r) − γ) − ε·log σ(−…)`, no reference (CPO's `simpo` with `cpo_alpha = 0`) | `β·S/n` |
//! | `orpo` | `NLL(chosen) − λ·log σ(log odds)`, odds of the mean log-probabilities, no reference | `λ·S/n` |
//!
//! The loss of a batch is the mean over its pairs (ORPO's NLL is the mean over all chosen
//! tokens of the batch).

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

/// A preference loss (`--loss-type`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase", tag = "type")]
pub enum PreferenceLoss {
    /// DPO.
    Sigmoid,
    /// IPO (length-normalised, as TRL).
    Ipo,
    /// Hinge (SLiC).
    Hinge,
    /// SimPO with target margin `gamma`.
    Simpo {
        /// Target reward margin γ.
        gamma: f64,
    },
    /// ORPO with odds-ratio weight `lambda`.
    Orpo {
        /// Weight λ of the odds-ratio term.
        lambda: f64,
    },
}

impl PreferenceLoss {
    /// Whether the loss needs reference log-probabilities.
    pub fn needs_reference(&self) -> bool {
        !matches!(
            self,
            PreferenceLoss::Simpo { .. } | PreferenceLoss::Orpo { .. }
        )
    }

    /// TRL's name.
    pub fn name(&self) -> &'static str {
        match self {
            PreferenceLoss::Sigmoid => "sigmoid",
            PreferenceLoss::Ipo => "ipo",
            PreferenceLoss::Hinge => "hinge",
            PreferenceLoss::Simpo { .. } => "simpo",
            PreferenceLoss::Orpo { .. } => "orpo",
        }
    }
}

/// Log-probability sums and completion lengths of one pair.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PairStats {
    /// Policy sum over the chosen completion.
    pub policy_chosen: f64,
    /// Policy sum over the rejected completion.
    pub policy_rejected: f64,
    /// Reference sum over the chosen completion (0 without a reference).
    pub reference_chosen: f64,
    /// Reference sum over the rejected completion.
    pub reference_rejected: f64,
    /// Chosen completion tokens.
    pub n_chosen: usize,
    /// Rejected completion tokens.
    pub n_rejected: usize,
}

/// The loss of one pair, its gradient with respect to the two policy sums, and the rewards.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PairLoss {
    /// The pair's loss (for ORPO without the NLL term, which is per token).
    pub loss: f64,
    /// `∂loss/∂S_c`.
    pub d_chosen: f64,
    /// `∂loss/∂S_r`.
    pub d_rejected: f64,
    /// Reward of the chosen completion.
    pub reward_chosen: f64,
    /// Reward of the rejected completion.
    pub reward_rejected: f64,
}

/// `log(1 − eˣ)` for `x < 0`, stable at both ends.
fn log1mexp(x: f64) -> f64 {
    if x > -std::f64::consts::LN_2 {
        (-x.exp_m1()).ln()
    } else {
        (-x.exp()).ln_1p()
    }
}

fn sigmoid(x: f64) -> f64 {
    log_sigmoid(x).exp()
}

/// The loss of one pair under `kind` at temperature `beta` with label smoothing `eps`.
pub fn pair_loss(kind: PreferenceLoss, p: &PairStats, beta: f64, eps: f64) -> PairLoss {
    let nc = p.n_chosen.max(1) as f64;
    let nr = p.n_rejected.max(1) as f64;
    let h = (p.policy_chosen - p.reference_chosen) - (p.policy_rejected - p.reference_rejected);
    let dpo_rewards = (
        beta * (p.policy_chosen - p.reference_chosen),
        beta * (p.policy_rejected - p.reference_rejected),
    );
    // −(1−ε)·log σ(z) − ε·log σ(−z) and its derivative in z.
    let smoothed = |z: f64| {
        let loss = -(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z);
        let dz = -(1.0 - eps) * sigmoid(-z) + eps * sigmoid(z);
        (loss, dz)
    };
    let (loss, d_chosen, d_rejected, (reward_chosen, reward_rejected)) = match kind {
        PreferenceLoss::Sigmoid => {
            let (l, dz) = smoothed(beta * h);
            (l, beta * dz, -beta * dz, dpo_rewards)
        }
        PreferenceLoss::Hinge => {
            let z = beta * h;
            let dz = if z < 1.0 { -1.0 } else { 0.0 };
            ((1.0 - z).max(0.0), beta * dz, -beta * dz, dpo_rewards)
        }
        PreferenceLoss::Ipo => {
            let a = (p.policy_chosen - p.reference_chosen) / nc
                - (p.policy_rejected - p.reference_rejected) / nr;
            let e = a - 1.0 / (2.0 * beta);
            (e * e, 2.0 * e / nc, -2.0 * e / nr, dpo_rewards)
        }
        PreferenceLoss::Simpo { gamma } => {
            let (ac, ar) = (p.policy_chosen / nc, p.policy_rejected / nr);
            let (l, dz) = smoothed(beta * (ac - ar) - gamma);
            (l, beta * dz / nc, -beta * dz / nr, (beta * ac, beta * ar))
        }
        PreferenceLoss::Orpo { lambda } => {
            let (ac, ar) = (p.policy_chosen / nc, p.policy_rejected / nr);
            let odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar));
            let l = -lambda * log_sigmoid(odds);
            let d_odds = -lambda * sigmoid(-odds);
            // d odds / d ac = 1/(1 − e^ac); d odds / d ar = −1/(1 − e^ar).
            let dc = d_odds / (-ac.exp_m1()) / nc;
            let dr = -d_odds / (-ar.exp_m1()) / nr;
            (l, dc, dr, (lambda * ac, lambda * ar))
        }
    };
    PairLoss {
        loss,
        d_chosen,
        d_rejected,
        reward_chosen,
        reward_rejected,
    }
}

/// Averages of a batch of pairs under TRL's metric names.
pub fn batch_metrics(
    kind: PreferenceLoss,
    pairs: &[PairStats],
    beta: f64,
    eps: f64,
) -> (f64, std::collections::BTreeMap<String, f64>) {
    let n = pairs.len().max(1) as f64;
    let mut m = std::collections::BTreeMap::new();
    let mut add = |k: &str, v: f64| *m.entry(k.to_string()).or_insert(0.0) += v / n;
    let mut loss = 0.0;
    for p in pairs {
        let l = pair_loss(kind, p, beta, eps);
        loss += l.loss / n;
        add("rewards/chosen", l.reward_chosen);
        add("rewards/rejected", l.reward_rejected);
        add("rewards/margins", l.reward_chosen - l.reward_rejected);
        add(
            "rewards/accuracies",
            f64::from(u8::from(l.reward_chosen > l.reward_rejected)),
        );
        add("logps/chosen", p.policy_chosen);
        add("logps/rejected", p.policy_rejected);
    }
    if let PreferenceLoss::Orpo { .. } = kind {
        let tokens: usize = pairs.iter().map(|p| p.n_chosen).sum();
        let nll = -pairs.iter().map(|p| p.policy_chosen).sum::<f64>() / tokens.max(1) as f64;
        m.insert("nll_loss".into(), nll);
        loss += nll;
    }
    (loss, m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats() -> PairStats {
        PairStats {
            policy_chosen: -12.3,
            policy_rejected: -15.1,
            reference_chosen: -13.0,
            reference_rejected: -14.2,
            n_chosen: 7,
            n_rejected: 9,
        }
    }

    #[test]
    fn gradients_agree_with_finite_differences_for_every_loss() {
        for kind in [
            PreferenceLoss::Sigmoid,
            PreferenceLoss::Ipo,
            PreferenceLoss::Hinge,
            PreferenceLoss::Simpo { gamma: 0.5 },
            PreferenceLoss::Orpo { lambda: 0.1 },
        ] {
            for (beta, eps) in [(0.1, 0.0), (0.5, 0.1), (2.0, 0.0)] {
                let p = stats();
                let l = pair_loss(kind, &p, beta, eps);
                let h = 1e-5;
                let f = |dc: f64, dr: f64| {
                    let mut q = p;
                    q.policy_chosen += dc;
                    q.policy_rejected += dr;
                    pair_loss(kind, &q, beta, eps).loss
                };
                let fc = (f(h, 0.0) - f(-h, 0.0)) / (2.0 * h);
                let fr = (f(0.0, h) - f(0.0, -h)) / (2.0 * h);
                assert!(
                    (fc - l.d_chosen).abs() < 1e-6,
                    "{kind:?} {beta}: {fc} vs {}",
                    l.d_chosen
                );
                assert!(
                    (fr - l.d_rejected).abs() < 1e-6,
                    "{kind:?} {beta}: {fr} vs {}",
                    l.d_rejected
                );
            }
        }
    }

    #[test]
    fn closed_forms_match_trl() {
        let p = stats();
        let h = (p.policy_chosen - p.reference_chosen) - (p.policy_rejected - p.reference_rejected);
        let l = pair_loss(PreferenceLoss::Sigmoid, &p, 0.1, 0.0);
        assert!((l.loss + log_sigmoid(0.1 * h)).abs() < 1e-15);
        let l = pair_loss(PreferenceLoss::Hinge, &p, 0.1, 0.0);
        assert!((l.loss - (1.0 - 0.1 * h)).abs() < 1e-15);
        let a: f64 = 0.7 / 7.0 + 0.9 / 9.0;
        let l = pair_loss(PreferenceLoss::Ipo, &p, 0.1, 0.0);
        assert!((l.loss - (a - 5.0).powi(2)).abs() < 1e-12);
        // At equal policy and reference the DPO loss is log 2 and the rewards vanish.
        let mut q = p;
        q.reference_chosen = q.policy_chosen;
        q.reference_rejected = q.policy_rejected;
        let l = pair_loss(PreferenceLoss::Sigmoid, &q, 0.1, 0.0);
        assert!((l.loss - std::f64::consts::LN_2).abs() < 1e-15);
        assert_eq!((l.reward_chosen, l.reward_rejected), (0.0, 0.0));
        // SimPO (Meng et al. 2024, eq. 6): −log σ(β/|y_w|·log π(y_w) − β/|y_l|·log π(y_l) − γ).
        let (ac, ar) = (-12.3f64 / 7.0, -15.1f64 / 9.0);
        let l = pair_loss(PreferenceLoss::Simpo { gamma: 0.5 }, &p, 2.0, 0.0);
        assert!((l.loss + log_sigmoid(2.0 * ac - 2.0 * ar - 0.5)).abs() < 1e-12);
        assert!((l.reward_chosen - 2.0 * ac).abs() < 1e-12);
        // ORPO: the log odds of the mean log-probabilities, λ-weighted.
        let (ac, ar) = (-12.3f64 / 7.0, -15.1f64 / 9.0);
        let odds = (ac - ar) - ((1.0 - ac.exp()).ln() - (1.0 - ar.exp()).ln());
        let l = pair_loss(PreferenceLoss::Orpo { lambda: 0.1 }, &p, 0.1, 0.0);
        assert!((l.loss + 0.1 * log_sigmoid(odds)).abs() < 1e-12);
        let (loss, m) = batch_metrics(PreferenceLoss::Orpo { lambda: 0.1 }, &[p], 0.1, 0.0);
        assert!((m["nll_loss"] - 12.3 / 7.0).abs() < 1e-12);
        assert!((loss - l.loss - 12.3 / 7.0).abs() < 1e-12);
    }

    #[test]
    fn log_sigmoid_is_stable_at_both_tails() {
        assert!((log_sigmoid(0.0) - (0.5f64).ln()).abs() < 1e-15);
        assert!((log_sigmoid(-800.0) + 800.0).abs() < 1e-9);
        assert!(log_sigmoid(800.0).abs() < 1e-300);
    }
}
