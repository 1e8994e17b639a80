//! Property tests of the aggregation rules (proptest).

use std::collections::BTreeMap;

use fedtune_aggregation::dp::DpConfig;
use fedtune_aggregation::fedavg::{Input, fedavg_exact};
use fedtune_aggregation::lowrank::combine;
use fedtune_aggregation::matrix::{Matrix, refactor};
use fedtune_aggregation::merge::{MergeMethod, MergeParams, merge};
use fedtune_aggregation::{
    Adapter, ClientResult, FedStrategy, LoraFactors, Plan, Rule, Strategy, StrategyConfig,
};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn matrix(rng: &mut ChaCha8Rng, rows: usize, cols: usize, scale: f32) -> Matrix {
    Matrix::new(
        rows,
        cols,
        (0..rows * cols)
            .map(|_| rng.random_range(-1.0f32..1.0) * scale)
            .collect(),
    )
}

const SHAPES: [(&str, usize, usize); 2] =
    [("layers.0.q_proj", 12, 10), ("layers.0.down_proj", 8, 14)];

fn adapter(seed: u64, rank: usize) -> Adapter {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let modules = SHAPES
        .iter()
        .map(|&(name, out, inp)| {
            (
                name.to_string(),
                LoraFactors {
                    a: matrix(&mut rng, rank, inp, 1.0),
                    b: matrix(&mut rng, out, rank, 1.0),
                    scale: 2.0 / rank as f32,
                },
            )
        })
        .collect();
    Adapter {
        modules,
        dense: BTreeMap::new(),
    }
}

fn result(name: &str, adapter: Adapter, n: u64) -> ClientResult {
    ClientResult {
        client: name.into(),
        adapter,
        num_examples: n,
        metrics: BTreeMap::from([("loss".to_string(), n as f64)]),
    }
}

fn plan(max_rank: usize) -> Plan {
    Plan {
        modules: SHAPES
            .iter()
            .map(|&(n, o, i)| (n.to_string(), (o, i)))
            .collect(),
        dense: BTreeMap::new(),
        max_rank,
        client_ranks: BTreeMap::new(),
    }
}

fn dense(a: &Adapter) -> Vec<f32> {
    a.modules.values().flat_map(|m| m.delta().data).collect()
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().map(|v| v.abs()).fold(1e-6, f32::max);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / scale
}

fn aggregate(rule: Rule, results: &[ClientResult], rank: usize) -> Option<Adapter> {
    let mut cfg = StrategyConfig::new(rule);
    cfg.target_rank = Some(rank);
    let mut s = FedStrategy::new(cfg, Adapter::default(), plan(rank)).unwrap();
    s.aggregate_fit(1, results, &[])
        .unwrap()
        .global
        .map(|g| g.adapter)
}

fn rules() -> Vec<Rule> {
    vec![
        Rule::FedAvgFactors,
        Rule::FedAvgExact,
        Rule::FlexLora,
        Rule::Ties {
            density: 1.0,
            lambda: 1.0,
        },
        Rule::DareLinear {
            drop_rate: 0.0,
            lambda: 1.0,
        },
        Rule::TaskArithmetic { lambda: 1.0 },
        Rule::Median,
        Rule::TrimmedMean { beta: 0.2 },
        Rule::MultiKrum { f: 1, m: 3 },
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn identical_updates_aggregate_to_themselves(seed in any::<u64>(), n in 5usize..8) {
        let a = adapter(seed, 3);
        let results: Vec<ClientResult> = (0..n)
            .map(|i| result(&format!("c{i}"), a.clone(), 1 + i as u64))
            .collect();
        for rule in rules() {
            let got = aggregate(rule, &results, 3).unwrap();
            let d = max_rel(&dense(&got), &dense(&a));
            prop_assert!(d < 1e-4, "{}: {}", rule.name(), d);
        }
    }

    #[test]
    fn client_order_does_not_matter(seed in any::<u64>()) {
        let results: Vec<ClientResult> = (0..6)
            .map(|i| result(&format!("c{i}"), adapter(seed ^ i, 3), 10 + i))
            .collect();
        let mut reversed = results.clone();
        reversed.reverse();
        for rule in rules() {
            let x = dense(&aggregate(rule, &results, 3).unwrap());
            let y = dense(&aggregate(rule, &reversed, 3).unwrap());
            prop_assert!(max_rel(&x, &y) < 1e-4, "{}", rule.name());
        }
    }

    #[test]
    fn zero_total_weight_yields_none(seed in any::<u64>()) {
        let results: Vec<ClientResult> = (0..4)
            .map(|i| result(&format!("c{i}"), adapter(seed ^ i, 2), 0))
            .collect();
        for rule in rules() {
            prop_assert!(aggregate(rule, &results, 2).is_none(), "{}", rule.name());
        }
        prop_assert!(aggregate(Rule::FedAvgExact, &[], 2).is_none());
    }

    #[test]
    fn exact_fedavg_equals_the_weighted_sum_of_products_for_mixed_ranks(
        seed in any::<u64>(),
        ranks in proptest::collection::vec(1usize..6, 2..6),
    ) {
        let results: Vec<ClientResult> = ranks
            .iter()
            .enumerate()
            .map(|(i, &r)| result(&format!("c{i}"), adapter(seed ^ i as u64, r), 1 + 3 * i as u64))
            .collect();
        let refs: Vec<&ClientResult> = results.iter().collect();
        let total: f64 = results.iter().map(|r| r.num_examples as f64).sum();
        let weights: Vec<f64> = results.iter().map(|r| r.num_examples as f64 / total).collect();
        let global = Adapter::default();
        let input = Input { global: &global, results: refs, weights: weights.clone() };
        let (got, energy) = fedavg_exact(&input, &vec![1.0; results.len()], None);
        prop_assert_eq!(energy, 1.0);
        for (name, m) in &got.modules {
            prop_assert_eq!(m.rank(), ranks.iter().sum::<usize>(), "stacked rank is Σ rₖ");
            let mut want = vec![0f64; m.b.rows * m.a.cols];
            for (r, p) in results.iter().zip(&weights) {
                for (w, v) in want.iter_mut().zip(r.adapter.modules[name].delta().data) {
                    *w += p * v as f64;
                }
            }
            let want: Vec<f32> = want.into_iter().map(|v| v as f32).collect();
            let d = max_rel(&m.delta().data, &want);
            prop_assert!(d < 1e-5, "{}", d);
        }
    }

    #[test]
    fn svd_refactorisation_at_full_rank_is_exact(seed in any::<u64>(), r in 1usize..8) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let b = matrix(&mut rng, 20, r, 1.0);
        let a = matrix(&mut rng, r, 17, 1.0);
        let f = refactor(&b, &a, Some(r));
        prop_assert!((f.retained_energy - 1.0).abs() < 1e-9);
        let d = max_rel(&f.b.matmul(&f.a).data, &b.matmul(&a).data);
        prop_assert!(d < 1e-5, "{}", d);
        let terms = [(1.0, &LoraFactors { a: a.clone(), b: b.clone(), scale: 0.5 })];
        let (c, _) = combine(&terms, Some(r), 0.5);
        prop_assert!(max_rel(&c.delta().data, &b.matmul(&a).scaled(0.5).data) < 1e-5);
    }

    #[test]
    fn krum_never_selects_an_outlier_when_n_is_at_least_2f_plus_3(
        seed in any::<u64>(),
        f in 1usize..3,
        extra in 0usize..3,
        blowup in 5.0f32..50.0,
    ) {
        let n = 2 * f + 3 + extra;
        let honest = adapter(seed, 3);
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 77);
        let results: Vec<ClientResult> = (0..n)
            .map(|i| {
                let mut a = honest.clone();
                let outlier = i < f;
                for m in a.modules.values_mut() {
                    for v in m.b.data.iter_mut() {
                        let noise = rng.random_range(-0.05f32..0.05);
                        *v = if outlier { -*v * blowup + noise } else { *v + noise };
                    }
                }
                result(&format!("c{i}"), a, 10)
            })
            .collect();
        let mut cfg = StrategyConfig::new(Rule::Krum { f });
        cfg.target_rank = None;
        let mut s = FedStrategy::new(cfg, Adapter::default(), plan(3)).unwrap();
        let out = s.aggregate_fit(1, &results, &[]).unwrap().global.unwrap();
        let chosen = &out.report.used;
        prop_assert_eq!(chosen.len(), 1);
        let idx: usize = chosen[0][1..].parse().unwrap();
        prop_assert!(idx >= f, "Krum picked outlier {}", idx);
    }

    #[test]
    fn dare_with_p_zero_is_the_identity(seed in any::<u64>()) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let base = matrix(&mut rng, 5, 9, 1.0).data;
        let x = matrix(&mut rng, 5, 9, 1.0).data;
        for method in [MergeMethod::DareLinear, MergeMethod::DareTies] {
            let p = MergeParams { drop_rate: 0.0, seed, ..MergeParams::new(method) };
            let got = merge(Some(&base), &[&x], &[1.0], &p, 0).unwrap();
            prop_assert!(max_rel(&got, &x) < 1e-6);
        }
    }
}

#[test]
fn dare_masks_are_seeded_and_rescale_by_one_over_one_minus_p() {
    let x: Vec<f32> = (0..100_000).map(|i| 1.0 + (i % 7) as f32).collect();
    let p = MergeParams {
        drop_rate: 0.3,
        seed: 42,
        ..MergeParams::new(MergeMethod::DareLinear)
    };
    let a = merge(None, &[&x], &[1.0], &p, 0).unwrap();
    let b = merge(None, &[&x], &[1.0], &p, 0).unwrap();
    assert_eq!(a, b, "same seed, same masks");
    let kept = a.iter().filter(|v| **v != 0.0).count() as f64 / a.len() as f64;
    assert!((kept - 0.7).abs() < 0.01, "{kept}");
    let rescaled = a.iter().zip(&x).find(|(v, _)| **v != 0.0).unwrap();
    assert!((rescaled.0 - rescaled.1 / 0.7).abs() < 1e-5);
}

#[test]
fn fedit_is_inexact_while_exact_fedavg_is_not() {
    let results: Vec<ClientResult> = (0..3)
        .map(|i| result(&format!("c{i}"), adapter(100 + i, 2), 1))
        .collect();
    let want: Vec<f32> = {
        let d: Vec<Vec<f32>> = results.iter().map(|r| dense(&r.adapter)).collect();
        (0..d[0].len())
            .map(|j| d.iter().map(|v| v[j]).sum::<f32>() / 3.0)
            .collect()
    };
    let fedit = dense(&aggregate(Rule::FedAvgFactors, &results, 2).unwrap());
    let mut cfg = StrategyConfig::new(Rule::FedAvgExact);
    cfg.target_rank = None;
    let mut s = FedStrategy::new(cfg, Adapter::default(), plan(6)).unwrap();
    let exact = dense(
        &s.aggregate_fit(1, &results, &[])
            .unwrap()
            .global
            .unwrap()
            .adapter,
    );
    assert!(max_rel(&exact, &want) < 1e-5);
    assert!(
        max_rel(&fedit, &want) > 1e-2,
        "FedIT's cross terms should show"
    );
}

#[test]
fn validation_turns_bad_updates_into_failures_with_reasons() {
    let good = adapter(1, 2);
    let mut nan = adapter(2, 2);
    nan.modules.values_mut().next().unwrap().a.data[0] = f32::NAN;
    let mut extra = adapter(3, 2);
    extra.modules.insert(
        "layers.9.v_proj".into(),
        adapter(4, 2).modules.values().next().unwrap().clone(),
    );
    let mut shape = adapter(5, 2);
    shape.modules.values_mut().next().unwrap().a = Matrix::zeros(2, 3);
    let big = adapter(6, 4);
    let results = vec![
        result("good", good.clone(), 5),
        result("nan", nan, 5),
        result("extra", extra, 5),
        result("shape", shape, 5),
        result("rank", big, 5),
        result("good", good, 5),
    ];
    let mut s = FedStrategy::new(
        StrategyConfig::new(Rule::FedAvgExact),
        Adapter::default(),
        plan(2),
    )
    .unwrap();
    let out = s.aggregate_fit(1, &results, &[]).unwrap();
    let reasons: BTreeMap<String, String> = out
        .failures
        .iter()
        .map(|f| (f.client.clone(), f.reason.clone()))
        .collect();
    assert!(reasons["nan"].contains("NaN"));
    assert!(reasons["extra"].contains("unexpected module"));
    assert!(reasons["shape"].contains("do not fit"));
    assert!(reasons["rank"].contains("rank 4"));
    assert!(reasons["good"].contains("duplicate"));
    assert_eq!(out.global.unwrap().report.used, vec!["good".to_string()]);
}

#[test]
fn norm_outliers_are_rejected_and_norm_bounding_clips() {
    let mut results: Vec<ClientResult> = (0..5)
        .map(|i| result(&format!("c{i}"), adapter(10, 2), 1))
        .collect();
    for m in results[4].adapter.modules.values_mut() {
        m.b = m.b.scaled(100.0);
    }
    let mut cfg = StrategyConfig::new(Rule::FedAvgExact);
    cfg.validation.outlier_factor = Some(5.0);
    let mut s = FedStrategy::new(cfg.clone(), Adapter::default(), plan(2)).unwrap();
    let out = s.aggregate_fit(1, &results, &[]).unwrap();
    assert_eq!(out.failures.len(), 1);
    assert!(
        out.failures[0].reason.contains("median"),
        "{}",
        out.failures[0].reason
    );
    let mut cfg = StrategyConfig::new(Rule::FedAvgExact);
    cfg.norm_bound = Some(1.0);
    let mut s = FedStrategy::new(cfg, Adapter::default(), plan(2)).unwrap();
    let out = s.aggregate_fit(1, &results, &[]).unwrap().global.unwrap();
    assert_eq!(out.report.clipped.len(), 5);
    let norm: f64 = dense(&out.adapter)
        .iter()
        .map(|v| (*v as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!(norm <= 1.0 + 1e-4, "{norm}");
}

#[test]
fn dp_reports_epsilon_every_round_and_noise_is_seeded() {
    let results: Vec<ClientResult> = (0..4)
        .map(|i| result(&format!("c{i}"), adapter(i, 2), 1))
        .collect();
    let mut cfg = StrategyConfig::new(Rule::FedAvgExact);
    cfg.dp = Some(DpConfig {
        clip_norm: 1.0,
        noise_multiplier: 1.0,
        delta: 1e-5,
        population: 100,
    });
    cfg.target_rank = Some(2);
    let run = || {
        let mut s = FedStrategy::new(cfg.clone(), Adapter::default(), plan(2)).unwrap();
        let ids: Vec<String> = (0..100).map(|i| format!("c{i}")).collect();
        let mut eps = Vec::new();
        let mut last = None;
        for round in 1..=3 {
            s.configure_fit(round, &ids[..4]);
            let out = s
                .aggregate_fit(round, &results, &[])
                .unwrap()
                .global
                .unwrap();
            assert!(
                (out.report.noise_std.unwrap() - 0.25).abs() < 1e-12,
                "σ = z·C/m"
            );
            eps.push(out.report.epsilon.unwrap());
            last = Some(dense(&out.adapter));
        }
        (eps, last.unwrap())
    };
    let (eps, a) = run();
    let (_, b) = run();
    assert!(
        eps[0] > 0.0 && eps[1] > eps[0] && eps[2] > eps[1],
        "{eps:?}"
    );
    assert_eq!(a, b, "same seed, same noise");
}

#[test]
fn sampling_is_seeded_and_respects_fraction_and_bounds() {
    let ids: Vec<String> = (0..50).map(|i| format!("c{i:02}")).collect();
    let mut cfg = StrategyConfig::new(Rule::FedAvgExact);
    cfg.sampling.fraction = 0.1;
    cfg.sampling.min_clients = 8;
    cfg.seed = 3;
    let mut s = FedStrategy::new(cfg.clone(), Adapter::default(), plan(2)).unwrap();
    let a = s.configure_fit(1, &ids);
    let b = FedStrategy::new(cfg, Adapter::default(), plan(2))
        .unwrap()
        .configure_fit(1, &ids);
    assert_eq!(a, b);
    assert_eq!(a.len(), 8);
    assert_ne!(a, s.configure_fit(2, &ids), "rounds sample differently");
}
