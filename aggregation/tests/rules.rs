//! FFA-LoRA, heterogeneous ranks (HetLoRA, FlexLoRA) and server optimisers through the strategy,
//! including saving and restoring the strategy's state between rounds.

use std::collections::BTreeMap;

use fedtune_aggregation::optim::ServerOptimizer;
use fedtune_aggregation::{
    Adapter, ClientResult, FedStrategy, LoraFactors, Matrix, Plan, Rule, Strategy, StrategyConfig,
    StrategyState,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn m(rng: &mut ChaCha8Rng, r: usize, c: usize) -> Matrix {
    Matrix::new(
        r,
        c,
        (0..r * c).map(|_| rng.random_range(-1.0f32..1.0)).collect(),
    )
}

fn one_module(a: Matrix, b: Matrix, scale: f32) -> Adapter {
    let mut ad = Adapter::default();
    ad.modules.insert("q".into(), LoraFactors { a, b, scale });
    ad
}

fn result(name: &str, adapter: Adapter, n: u64) -> ClientResult {
    ClientResult {
        client: name.into(),
        adapter,
        num_examples: n,
        metrics: BTreeMap::new(),
    }
}

fn plan(max_rank: usize) -> Plan {
    Plan {
        modules: BTreeMap::from([("q".to_string(), (6, 5))]),
        dense: BTreeMap::new(),
        max_rank,
        client_ranks: BTreeMap::new(),
    }
}

fn delta(a: &Adapter) -> Vec<f32> {
    a.modules["q"].delta().data
}

fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
    a.iter()
        .zip(b)
        .all(|(x, y)| (x - y).abs() <= tol * (1.0 + y.abs()))
}

#[test]
fn ffa_averages_b_exactly_and_rejects_a_changed_a() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let shared_a = m(&mut rng, 2, 5);
    let global = one_module(shared_a.clone(), Matrix::zeros(6, 2), 1.0);
    let clients: Vec<ClientResult> = (0..3)
        .map(|i| {
            result(
                &format!("c{i}"),
                one_module(shared_a.clone(), m(&mut rng, 6, 2), 1.0),
                1 + i,
            )
        })
        .collect();
    let mut s = FedStrategy::new(StrategyConfig::new(Rule::Ffa), global.clone(), plan(2)).unwrap();
    let out = s.aggregate_fit(1, &clients, &[]).unwrap().global.unwrap();
    // B̄A = Σ pₖBₖA exactly.
    let total = 6.0;
    let mut want = vec![0f32; 30];
    for (k, c) in clients.iter().enumerate() {
        for (w, v) in want.iter_mut().zip(delta(&c.adapter)) {
            *w += (k + 1) as f32 / total * v;
        }
    }
    assert!(close(&delta(&out.adapter), &want, 1e-5));
    assert_eq!(out.adapter.modules["q"].a, shared_a);
    // A client that trained A is incompatible under FFA-LoRA.
    let mut bad = clients.clone();
    bad[1].adapter.modules.get_mut("q").unwrap().a.data[0] += 1.0;
    let mut s = FedStrategy::new(StrategyConfig::new(Rule::Ffa), global, plan(2)).unwrap();
    assert!(s.aggregate_fit(1, &bad, &[]).is_err());
}

#[test]
fn median_under_ffa_works_on_b() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let a = m(&mut rng, 2, 5);
    let b = m(&mut rng, 6, 2);
    let mut clients: Vec<ClientResult> = (0..5)
        .map(|i| result(&format!("c{i}"), one_module(a.clone(), b.clone(), 1.0), 1))
        .collect();
    clients[0].adapter.modules.get_mut("q").unwrap().b = b.scaled(-50.0);
    let mut cfg = StrategyConfig::new(Rule::Median);
    cfg.frozen_a = true;
    let mut s = FedStrategy::new(
        cfg,
        one_module(a.clone(), Matrix::zeros(6, 2), 1.0),
        plan(2),
    )
    .unwrap();
    let out = s.aggregate_fit(1, &clients, &[]).unwrap().global.unwrap();
    assert_eq!(
        out.adapter.modules["q"].b, b,
        "the Byzantine B is out-voted coordinate-wise"
    );
}

#[test]
fn flexlora_hands_each_client_its_top_components() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let ranks = [1usize, 2, 4];
    let clients: Vec<ClientResult> = ranks
        .iter()
        .enumerate()
        .map(|(i, &r)| {
            result(
                &format!("c{i}"),
                one_module(m(&mut rng, r, 5), m(&mut rng, 6, r), 2.0 / r as f32),
                1,
            )
        })
        .collect();
    let mut s = FedStrategy::new(
        StrategyConfig::new(Rule::FlexLora),
        Adapter::default(),
        plan(4),
    )
    .unwrap();
    let out = s.aggregate_fit(1, &clients, &[]).unwrap().global.unwrap();
    // At the largest rank (≥ every client's) the global equals Σ pₖΔWₖ up to the dropped tail.
    let full: Vec<f32> = (0..30)
        .map(|j| clients.iter().map(|c| delta(&c.adapter)[j]).sum::<f32>() / 3.0)
        .collect();
    assert!(out.report.retained_energy.unwrap() > 0.9);
    let g = delta(&out.adapter);
    let err: f32 = g
        .iter()
        .zip(&full)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f32>()
        .sqrt();
    let norm: f32 = full.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!(err / norm < 0.35, "{}", err / norm);
    // Each client's share is the best approximation at its rank: errors shrink with rank.
    let errs: Vec<f32> = [1usize, 2, 4]
        .iter()
        .map(|&r| {
            let mine = s.global_for(r);
            assert_eq!(mine.modules["q"].rank(), r);
            delta(&mine)
                .iter()
                .zip(&full)
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f32>()
                .sqrt()
        })
        .collect();
    assert!(errs[0] >= errs[1] && errs[1] >= errs[2] - 1e-5, "{errs:?}");
    assert!((errs[2] - err).abs() < 1e-4);
}

#[test]
fn hetlora_pads_mixed_ranks_and_truncates_per_client() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let clients: Vec<ClientResult> = [2usize, 4]
        .iter()
        .enumerate()
        .map(|(i, &r)| {
            result(
                &format!("c{i}"),
                one_module(m(&mut rng, r, 5), m(&mut rng, 6, r), 1.0),
                1,
            )
        })
        .collect();
    let mut s = FedStrategy::new(
        StrategyConfig::new(Rule::HetLora),
        Adapter::default(),
        plan(4),
    )
    .unwrap();
    let out = s.aggregate_fit(1, &clients, &[]).unwrap().global.unwrap();
    assert_eq!(out.adapter.modules["q"].rank(), 4);
    assert_eq!(s.global_for(2).modules["q"].rank(), 2);
    // FedIT on mixed ranks is refused with a clear reason.
    let mut s = FedStrategy::new(
        StrategyConfig::new(Rule::FedAvgFactors),
        Adapter::default(),
        plan(4),
    )
    .unwrap();
    let err = s.aggregate_fit(1, &clients, &[]).unwrap_err().to_string();
    assert!(err.contains("equal ranks"), "{err}");
}

#[test]
fn server_optimizer_state_survives_save_and_restore() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let rounds: Vec<Vec<ClientResult>> = (0..3)
        .map(|_| {
            (0..3)
                .map(|i| {
                    result(
                        &format!("c{i}"),
                        one_module(m(&mut rng, 2, 5), m(&mut rng, 6, 2), 1.0),
                        1,
                    )
                })
                .collect()
        })
        .collect();
    for opt in [
        ServerOptimizer::FedAvgM {
            lr: 1.0,
            momentum: 0.9,
        },
        ServerOptimizer::FedAdam {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        },
        ServerOptimizer::FedYogi {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        },
        ServerOptimizer::FedAdagrad {
            lr: 0.1,
            beta1: 0.0,
            tau: 1e-3,
        },
    ] {
        let mut cfg = StrategyConfig::new(Rule::FedAvgExact);
        cfg.server_optimizer = Some(opt);
        cfg.target_rank = Some(2);
        let mut straight = FedStrategy::new(cfg.clone(), Adapter::default(), plan(2)).unwrap();
        let mut resumed = FedStrategy::new(cfg.clone(), Adapter::default(), plan(2)).unwrap();
        let mut last = (Vec::new(), Vec::new());
        for (round, results) in rounds.iter().enumerate() {
            let a = straight
                .aggregate_fit(round as u64, results, &[])
                .unwrap()
                .global
                .unwrap();
            // Save and restore the other strategy's state before every round.
            let saved = serde_json::to_string(&resumed.state).unwrap();
            let state: StrategyState = serde_json::from_str(&saved).unwrap();
            resumed = FedStrategy::from_state(cfg.clone(), state);
            let b = resumed
                .aggregate_fit(round as u64, results, &[])
                .unwrap()
                .global
                .unwrap();
            last = (delta(&a.adapter), delta(&b.adapter));
        }
        assert!(close(&last.0, &last.1, 1e-5), "{opt:?}");
        assert_eq!(straight.state.optimizer.m.len(), 1);
    }
}

#[test]
fn dora_magnitudes_are_averaged_with_the_factors_weights_and_directions_exactly() {
    // A DoRA update: LoRA factors plus a magnitude vector per module (a dense `[1, out]`
    // tensor under PEFT's name). Exact FedAvg gives Σ pₖsₖBₖAₖ; the magnitudes get the same
    // example weights pₖ, under every averaging rule.
    let key = "base_model.model.q.lora_magnitude_vector";
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let with_magnitude = |mut a: Adapter, mag: Matrix| {
        a.dense.insert(key.to_string(), mag);
        a
    };
    let global = with_magnitude(
        one_module(m(&mut rng, 2, 5), Matrix::zeros(6, 2), 1.0),
        Matrix::new(1, 6, vec![1.0; 6]),
    );
    let clients: Vec<ClientResult> = (0..3)
        .map(|i| {
            let ad = one_module(m(&mut rng, 2, 5), m(&mut rng, 6, 2), 1.0);
            result(
                &format!("c{i}"),
                with_magnitude(ad, m(&mut rng, 1, 6)),
                1 + i,
            )
        })
        .collect();
    let mut plan = plan(6);
    plan.dense.insert(key.to_string(), (1, 6));
    let total = 6.0;
    let mut want_delta = vec![0f32; 30];
    let mut want_mag = vec![0f32; 6];
    for (k, c) in clients.iter().enumerate() {
        let p = (k + 1) as f32 / total;
        for (w, v) in want_delta.iter_mut().zip(delta(&c.adapter)) {
            *w += p * v;
        }
        for (w, v) in want_mag.iter_mut().zip(&c.adapter.dense[key].data) {
            *w += p * v;
        }
    }
    for rule in [Rule::FedAvgExact, Rule::FedAvgFactors] {
        let mut s =
            FedStrategy::new(StrategyConfig::new(rule), global.clone(), plan.clone()).unwrap();
        let out = s.aggregate_fit(1, &clients, &[]).unwrap().global.unwrap();
        assert!(
            close(&out.adapter.dense[key].data, &want_mag, 1e-6),
            "{rule:?}"
        );
        if rule == Rule::FedAvgExact {
            assert!(close(&delta(&out.adapter), &want_delta, 1e-5));
        }
    }
}
