//! Aggregation throughput: 10 clients × 256 MiB of updates, as GB/s of input processed,
//! against a plain memcpy of the same bytes in the same run.
//!
//! `cargo bench -p fedtune-aggregation --bench throughput [-- MIB CLIENTS]`

use std::hint::black_box;
use std::time::Instant;

use fedtune_aggregation::fedavg::{Input, fedavg_exact, weighted_average};
use fedtune_aggregation::merge::{MergeMethod, MergeParams, merge};
use fedtune_aggregation::robust::median;
use fedtune_aggregation::{Adapter, ClientResult, LoraFactors, Matrix};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut out = vec![0f32; n];
    out.par_chunks_mut(1 << 16).enumerate().for_each(|(c, o)| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (c as u64) << 20);
        o.iter_mut().for_each(|v| *v = rng.random_range(-1.0..1.0));
    });
    out
}

fn time<T>(
    label: &str,
    bytes: f64,
    reps: usize,
    memcpy: Option<f64>,
    mut f: impl FnMut() -> T,
) -> f64 {
    black_box(f());
    let t = Instant::now();
    for _ in 0..reps {
        black_box(f());
    }
    let s = t.elapsed().as_secs_f64() / reps as f64;
    let gbs = bytes / s / 1e9;
    match memcpy {
        Some(m) => println!(
            "{label:<34} {s:>8.3} s  {gbs:>6.2} GB/s  {:>5.1}% of memcpy",
            100.0 * gbs / m
        ),
        None => println!("{label:<34} {s:>8.3} s  {gbs:>6.2} GB/s"),
    }
    gbs
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let mib = args.first().copied().unwrap_or(256);
    let clients = args.get(1).copied().unwrap_or(10);
    let n = mib * (1 << 20) / 4;
    println!(
        "{clients} clients x {mib} MiB (f32), {} threads",
        rayon::current_num_threads()
    );
    let data: Vec<Vec<f32>> = (0..clients).map(|k| random(n, k as u64)).collect();
    let base = random(n, 99);
    let inputs: Vec<&[f32]> = data.iter().map(|d| d.as_slice()).collect();
    let weights: Vec<f64> = (0..clients).map(|k| (k + 1) as f64).collect();
    let total: f64 = weights.iter().sum();
    let p: Vec<f64> = weights.iter().map(|w| w / total).collect();
    let bytes = (clients * n * 4) as f64;

    let mut dst = vec![0f32; n];
    let memcpy = time("memcpy (same bytes)", bytes, 3, None, || {
        for x in &inputs {
            dst.par_chunks_mut(1 << 16)
                .zip(x.par_chunks(1 << 16))
                .for_each(|(d, s)| d.copy_from_slice(s));
        }
        dst[0]
    });
    time(
        "fedavg (dense weighted mean)",
        bytes,
        3,
        Some(memcpy),
        || weighted_average(&inputs, &p),
    );
    let ties = MergeParams {
        density: 0.2,
        ..MergeParams::new(MergeMethod::Ties)
    };
    if std::env::var("TIES_PHASES").is_ok() {
        let all = MergeParams {
            density: 1.0,
            ..ties
        };
        time(
            "ties main pass only (density 1)",
            bytes,
            1,
            Some(memcpy),
            || merge(Some(&base), &inputs, &weights, &all, 0).unwrap(),
        );
    }
    time("ties (density 0.2)", bytes, 1, Some(memcpy), || {
        merge(Some(&base), &inputs, &weights, &ties, 0).unwrap()
    });
    time("median", bytes, 1, Some(memcpy), || median(&inputs));

    // Exact FedAvg on LoRA factors: modules of a 4096×14336 projection at rank 16,
    // as many as fill `mib` per client.
    let (out, inp, r) = (4096, 14336, 16);
    let per_module = (out + inp) * r * 4;
    let modules = (mib << 20) / per_module;
    let results: Vec<ClientResult> = (0..clients)
        .map(|k| {
            let mut a = Adapter::default();
            for m in 0..modules {
                let s = (k * 1000 + m) as u64;
                a.modules.insert(
                    format!("m{m:04}"),
                    LoraFactors {
                        a: Matrix::new(r, inp, random(r * inp, s)),
                        b: Matrix::new(out, r, random(out * r, s ^ 1)),
                        scale: 2.0,
                    },
                );
            }
            ClientResult {
                client: format!("c{k}"),
                adapter: a,
                num_examples: (k + 1) as u64,
                metrics: Default::default(),
            }
        })
        .collect();
    let lora_bytes = (clients * modules * per_module) as f64;
    println!("exact FedAvg: {modules} modules of [{out}, {inp}] at rank {r} per client");
    let global = Adapter::default();
    let input = Input {
        global: &global,
        results: results.iter().collect(),
        weights: p.clone(),
    };
    let ones = vec![1.0; clients];
    time(
        "fedavg-exact (stacked, rank 160)",
        lora_bytes,
        1,
        Some(memcpy),
        || fedavg_exact(&input, &ones, None),
    );
    let few = Input {
        global: &global,
        results: results.iter().collect(),
        weights: p.clone(),
    };
    let t = Instant::now();
    let one: Vec<ClientResult> = results
        .iter()
        .map(|r| ClientResult {
            adapter: Adapter {
                modules: r
                    .adapter
                    .modules
                    .iter()
                    .take(4)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                dense: Default::default(),
            },
            ..r.clone()
        })
        .collect();
    let four = Input {
        global: &global,
        results: one.iter().collect(),
        weights: p.clone(),
    };
    black_box(fedavg_exact(&four, &ones, Some(r)));
    let per = t.elapsed().as_secs_f64() / 4.0;
    println!(
        "fedavg-exact re-factorised to rank {r}: {per:.3} s per module ({:.2} GB/s of factors)",
        (clients * per_module) as f64 / per / 1e9
    );
    drop(few);
}
