//! The BLAS products against naive ones, on every library this machine can load.

use super::load::openblas_coretype;
use super::*;

fn naive(m: usize, n: usize, k: usize, a: &[f32], ta: bool, b: &[f32], tb: bool) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f64;
            for p in 0..k {
                let x = if ta { a[p * m + i] } else { a[i * k + p] };
                let y = if tb { b[j * k + p] } else { b[p * n + j] };
                s += x as f64 * y as f64;
            }
            c[i * n + j] = s as f32;
        }
    }
    c
}

#[test]
fn openblas_runs_the_cpus_vector_kernels() {
    let Some(blas) = get() else {
        eprintln!("no BLAS installed; nothing to check");
        return;
    };
    let (Some(core), Some(want)) = (&blas.core, openblas_coretype()) else {
        eprintln!("not OpenBLAS, or a CPU without AVX2: nothing to check");
        return;
    };
    // The generic pre-AVX kernels OpenBLAS falls back to on CPUs it does not know.
    let generic = [
        "prescott",
        "core2",
        "penryn",
        "dunnington",
        "nehalem",
        "atom",
    ];
    assert!(
        !generic.contains(&core.to_lowercase().as_str()),
        "OpenBLAS runs its generic {core} kernels on a CPU that has {want}'s"
    );
}

#[test]
fn every_transpose_matches_a_naive_product() {
    let all = every_blas();
    if all.is_empty() {
        eprintln!("no BLAS installed; nothing to compare");
    }
    for blas in &all {
        eprintln!("checking {} ({:?}, {:?})", blas.name, blas.mkl, blas.core);
        check_products(blas);
    }
}

#[test]
fn every_blas_runs_one_thread_per_call_and_repeats_on_any_pool() {
    // Split by rows, then by columns.
    for (m, n, k) in [(515, 200, 96), (200, 515, 96)] {
        same_result_on_any_pool(m, n, k);
    }
}

/// Whether two results of one product agree to float rounding: within `2⁻¹⁸` of the
/// largest magnitude (a few units in the last place of the sums, whatever order a
/// library's kernel adds them in).
fn agree(x: &[f32], y: &[f32]) -> bool {
    let scale = x.iter().fold(1f32, |s, v| s.max(v.abs()));
    x.len() == y.len()
        && x.iter()
            .zip(y)
            .all(|(a, b)| (a - b).abs() <= scale * f32::EPSILON * 32.0)
}

fn same_result_on_any_pool(m: usize, n: usize, k: usize) {
    let a: Vec<f32> = (0..m * k).map(|i| ((i * 31 % 97) as f32).sin()).collect();
    let w: Vec<f32> = (0..n * k).map(|i| ((i * 17 % 89) as f32).cos()).collect();
    for blas in every_blas() {
        if blas.mkl.is_some() {
            type MaxThreads = unsafe extern "C" fn() -> i32;
            // SAFETY: oneMKL's `int MKL_Get_Max_Threads(void)`.
            let f = unsafe { blas._lib.get::<MaxThreads>(b"MKL_Get_Max_Threads\0") }
                .expect("oneMKL exports MKL_Get_Max_Threads");
            assert_eq!(unsafe { f() }, 1, "{}: oneMKL threads", blas.name);
        }
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool")
                .install(|| {
                    blas.product(
                        m,
                        n,
                        k,
                        1.0,
                        Operand::plain(&a, k),
                        Operand::transposed(&w, k),
                    )
                })
        };
        let one = run(1);
        // The bound holds between f32 BLAS and the exact (f64) product, so it is no
        // looser than one library's own rounding.
        assert!(
            agree(&naive(m, n, k, &a, false, &w, true), &one),
            "{}: {m}x{n} differs from the exact product beyond rounding",
            blas.name
        );
        for t in [2, 3, 5] {
            let got = run(t);
            // Bit for bit on the same pool; to rounding across pools.
            assert!(got == run(t), "{}: {t} threads did not repeat", blas.name);
            assert!(
                agree(&one, &got),
                "{}: {t} threads changed the {m}x{n} result beyond rounding",
                blas.name
            );
        }
    }
}

#[test]
fn product_sum_adds_every_part_and_repeats_on_any_pool() {
    for blas in every_blas() {
        // Row blocks, column blocks, one block.
        for (m, n) in [(197, 35), (150, 260), (20, 30)] {
            // (k, alpha, op(a) transposed, op(b) transposed, a, b)
            type Stored = (usize, f32, bool, bool, Vec<f32>, Vec<f32>);
            let data: Vec<Stored> = [
                (16, 0.5, false, true),
                (70, 1.0, true, false),
                (0, 2.0, false, false),
            ]
            .into_iter()
            .map(|(k, alpha, ta, tb)| {
                let a = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0);
                let b = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 3.0);
                (k, alpha, ta, tb, a.collect(), b.collect())
            })
            .collect();
            let parts: Vec<Part<'_>> = data
                .iter()
                .map(|(k, alpha, ta, tb, a, b)| Part {
                    k: *k,
                    alpha: *alpha,
                    a: Operand {
                        data: Values::F32(a),
                        ld: if *ta { m } else { *k },
                        trans: *ta,
                    },
                    b: Operand {
                        data: Values::F32(b),
                        ld: if *tb { *k } else { n },
                        trans: *tb,
                    },
                })
                .collect();
            let mut want = vec![0f32; m * n];
            for (k, alpha, ta, tb, a, b) in &data {
                for (w, x) in want.iter_mut().zip(naive(m, n, *k, a, *ta, b, *tb)) {
                    *w += alpha * x;
                }
            }
            let on = |threads: usize| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("pool")
                    .install(|| blas.product_sum(m, n, &parts))
            };
            let got = on(2);
            for (x, y) in got.iter().zip(&want) {
                assert!((x - y).abs() < 2e-3, "{}: {m}x{n}: {x} vs {y}", blas.name);
            }
            assert!(got == on(2), "{}: {m}x{n} did not repeat", blas.name);
            for t in [1, 3] {
                assert!(agree(&got, &on(t)), "{}: {m}x{n}: pool of {t}", blas.name);
            }
        }
    }
}

#[test]
fn bf16_parts_multiply_the_rounded_values_with_f32_accumulation() {
    let all: Vec<Blas> = every_blas().into_iter().filter(Blas::has_bf16).collect();
    if all.is_empty() {
        eprintln!("no BLAS with a bf16 product here; nothing to check");
    }
    let round =
        |v: &[f32]| -> Vec<half::bf16> { v.iter().map(|&x| half::bf16::from_f32(x)).collect() };
    let widen = |v: &[half::bf16]| -> Vec<f32> { v.iter().map(|x| x.to_f32()).collect() };
    for blas in &all {
        eprintln!("checking bf16 products of {}", blas.name);
        // Row blocks, column blocks.
        for (m, n, k) in [(197, 35, 70), (16, 300, 40), (150, 260, 33)] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7 % 13) as f32 - 6.1) / 5.3)
                .collect();
            let b: Vec<f32> = (0..k * n)
                .map(|i| ((i * 5 % 11) as f32 - 5.2) / 3.1)
                .collect();
            let (ab, bb) = (round(&a), round(&b));
            // An f32 rank-4 part accumulated with the bf16 one, as a LoRA term is.
            let u: Vec<f32> = (0..m * 4).map(|i| (i % 7) as f32 / 7.0).collect();
            let v: Vec<f32> = (0..4 * n).map(|i| (i % 5) as f32 / 5.0).collect();
            let lora = naive(m, n, 4, &u, false, &v, false);
            for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                let parts = [
                    Part {
                        k: 4,
                        alpha: 1.0,
                        a: Operand::plain(&u, 4),
                        b: Operand::plain(&v, n),
                    },
                    Part {
                        k,
                        alpha: 0.5,
                        a: Operand {
                            data: Values::Bf16(&ab),
                            ld: if ta { m } else { k },
                            trans: ta,
                        },
                        b: Operand {
                            data: Values::Bf16(&bb),
                            ld: if tb { k } else { n },
                            trans: tb,
                        },
                    },
                ];
                let got = blas.product_sum(m, n, &parts);
                let exact = naive(m, n, k, &widen(&ab), ta, &widen(&bb), tb);
                let unrounded = naive(m, n, k, &a, ta, &b, tb);
                let mut off_exact = 0f32;
                let mut off_f32 = 0f32;
                for i in 0..m * n {
                    off_exact = off_exact.max((got[i] - (0.5 * exact[i] + lora[i])).abs());
                    off_f32 = off_f32.max((got[i] - (0.5 * unrounded[i] + lora[i])).abs());
                }
                // Products of bf16 values are exact in f32; only the sums round.
                assert!(off_exact < 1e-4, "{}: {ta} {tb}: {off_exact}", blas.name);
                // And the operands were rounded to bf16, not read as f32.
                assert!(off_f32 > 1e-3, "{}: {ta} {tb}: not bf16", blas.name);
            }
        }
    }
}

fn check_products(blas: &Blas) {
    // Row blocks, column blocks (also with many rows: the LM head's shape), nothing.
    for (m, n, k) in [(197, 35, 70), (16, 300, 40), (150, 260, 33), (3, 2, 0)] {
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) / 3.0)
            .collect();
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let oa = Operand {
                data: Values::F32(&a),
                ld: if ta { m } else { k },
                trans: ta,
            };
            let ob = Operand {
                data: Values::F32(&b),
                ld: if tb { k } else { n },
                trans: tb,
            };
            let mut c = vec![1f32; m * n];
            blas.sgemm(m, n, k, 1.0, oa, ob, 0.0, &mut c);
            let want = naive(m, n, k, &a, ta, &b, tb);
            for (x, y) in c.iter().zip(&want) {
                assert!((x - y).abs() < 1e-3, "{ta} {tb}: {x} vs {y}");
            }
            // beta = 1 accumulates.
            blas.sgemm(m, n, k, 0.5, oa, ob, 1.0, &mut c);
            for (x, y) in c.iter().zip(&want) {
                assert!((x - 1.5 * y).abs() < 2e-3, "{ta} {tb} accumulate");
            }
            let fresh = blas.product(m, n, k, 1.0, oa, ob);
            assert_eq!(fresh.len(), m * n);
            for (x, y) in fresh.iter().zip(&want) {
                assert!((x - y).abs() < 1e-3, "{ta} {tb} product");
            }
        }
    }
}
