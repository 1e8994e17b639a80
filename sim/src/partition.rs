//! Splitting one dataset among simulated clients: IID, Dirichlet(α) over a label field (label
//! skew), Dirichlet(α) over share sizes (quantity skew). Every split is a function of the seed.

use std::collections::BTreeMap;

use fedtune_engine::data::read::RawRecord;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};

use crate::config::Partition;

/// Splits `records` among `n` clients under `p` (every record goes to exactly one client).
pub fn split(
    records: Vec<RawRecord>,
    p: &Partition,
    n: usize,
    seed: u64,
) -> Result<Vec<Vec<RawRecord>>, String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_9a27);
    let mut records = records;
    records.shuffle(&mut rng);
    let mut out: Vec<Vec<RawRecord>> = vec![Vec::new(); n];
    match p {
        Partition::Iid | Partition::PerFile => {
            for (i, r) in records.into_iter().enumerate() {
                out[i % n].push(r);
            }
        }
        Partition::Quantity { alpha } => {
            let shares = dirichlet(&mut rng, *alpha, n)?;
            let counts = apportion(records.len(), &shares, 1);
            let mut it = records.into_iter();
            for (k, c) in counts.into_iter().enumerate() {
                out[k].extend(it.by_ref().take(c));
            }
        }
        Partition::Dirichlet { alpha, field } => {
            let mut by_label: BTreeMap<String, Vec<RawRecord>> = BTreeMap::new();
            for r in records {
                let label = match r.value.get(field) {
                    Some(serde_json::Value::String(s)) => s.clone(),
                    Some(v) if !v.is_null() => v.to_string(),
                    _ => {
                        return Err(format!(
                            "line {}: no `{field}` field to partition by",
                            r.line
                        ));
                    }
                };
                by_label.entry(label).or_default().push(r);
            }
            for (_, rs) in by_label {
                let shares = dirichlet(&mut rng, *alpha, n)?;
                let counts = apportion(rs.len(), &shares, 0);
                let mut it = rs.into_iter();
                for (k, c) in counts.into_iter().enumerate() {
                    out[k].extend(it.by_ref().take(c));
                }
            }
            // Every client needs something to train on: the largest shares give one record
            // to each empty client.
            for k in 0..n {
                if out[k].is_empty() {
                    let donor = (0..n).max_by_key(|&j| out[j].len()).unwrap_or(k);
                    if out[donor].len() > 1 {
                        let r = out[donor].pop().expect("non-empty");
                        out[k].push(r);
                    }
                }
            }
            for o in &mut out {
                o.shuffle(&mut rng);
            }
        }
    }
    if let Some(k) = out.iter().position(|o| o.is_empty()) {
        return Err(format!(
            "client {k} gets no records: the dataset is too small for {n} clients"
        ));
    }
    Ok(out)
}

/// Holds out the last `fraction` of `records` (at least one when there are two or more and
/// `fraction > 0`): `(train, eval)`.
pub fn hold_out(mut records: Vec<RawRecord>, fraction: f64) -> (Vec<RawRecord>, Vec<RawRecord>) {
    let mut k = (records.len() as f64 * fraction).round() as usize;
    if fraction > 0.0 && k == 0 && records.len() >= 2 {
        k = 1;
    }
    let eval = records.split_off(records.len() - k.min(records.len().saturating_sub(1)));
    (records, eval)
}

/// A draw from a symmetric Dirichlet(α) over `n` categories.
pub fn dirichlet(rng: &mut impl Rng, alpha: f64, n: usize) -> Result<Vec<f64>, String> {
    let g = Gamma::new(alpha, 1.0).map_err(|e| format!("Dirichlet α = {alpha}: {e}"))?;
    let mut x: Vec<f64> = (0..n).map(|_| g.sample(rng)).collect();
    let sum: f64 = x.iter().sum();
    if sum <= 0.0 || !sum.is_finite() {
        // Tiny α can underflow every draw: fall back to one category.
        x = vec![0.0; n];
        x[rng.random_range(0..n)] = 1.0;
        return Ok(x);
    }
    Ok(x.into_iter().map(|v| v / sum).collect())
}

/// Integer counts summing to `total` in proportion to `shares`, each at least `min` when
/// `total` allows (largest remainders).
fn apportion(total: usize, shares: &[f64], min: usize) -> Vec<usize> {
    let n = shares.len();
    let floor = if total >= min * n { min } else { 0 };
    let rest = total - floor * n;
    let raw: Vec<f64> = shares.iter().map(|s| s * rest as f64).collect();
    let mut counts: Vec<usize> = raw.iter().map(|r| r.floor() as usize).collect();
    let mut left = rest - counts.iter().sum::<usize>();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| {
        let fa = raw[a] - raw[a].floor();
        let fb = raw[b] - raw[b].floor();
        fb.total_cmp(&fa).then(a.cmp(&b))
    });
    for &k in order.iter().cycle() {
        if left == 0 {
            break;
        }
        counts[k] += 1;
        left -= 1;
    }
    counts.into_iter().map(|c| c + floor).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(n: usize) -> Vec<RawRecord> {
        (0..n)
            .map(|i| RawRecord {
                line: i + 1,
                value: serde_json::json!({"text": format!("r{i}"), "topic": format!("t{}", i % 4)}),
            })
            .collect()
    }

    fn lines(parts: &[Vec<RawRecord>]) -> Vec<usize> {
        let mut l: Vec<usize> = parts.iter().flatten().map(|r| r.line).collect();
        l.sort();
        l
    }

    #[test]
    fn every_split_is_a_partition_and_a_function_of_the_seed() {
        let all: Vec<usize> = (1..=200).collect();
        for p in [
            Partition::Iid,
            Partition::Quantity { alpha: 0.5 },
            Partition::Dirichlet {
                alpha: 0.3,
                field: "topic".into(),
            },
        ] {
            let a = split(records(200), &p, 5, 7).unwrap();
            assert_eq!(lines(&a), all, "{p:?} loses or duplicates records");
            assert!(a.iter().all(|x| !x.is_empty()));
            let b = split(records(200), &p, 5, 7).unwrap();
            let la: Vec<Vec<usize>> = a
                .iter()
                .map(|x| x.iter().map(|r| r.line).collect())
                .collect();
            let lb: Vec<Vec<usize>> = b
                .iter()
                .map(|x| x.iter().map(|r| r.line).collect())
                .collect();
            assert_eq!(la, lb, "{p:?} is not deterministic");
        }
    }

    #[test]
    fn iid_is_balanced_and_skews_are_skewed() {
        let iid = split(records(200), &Partition::Iid, 5, 1).unwrap();
        assert!(iid.iter().all(|x| x.len() == 40));
        let q = split(records(200), &Partition::Quantity { alpha: 0.3 }, 5, 1).unwrap();
        let sizes: Vec<usize> = q.iter().map(|x| x.len()).collect();
        assert!(
            sizes.iter().max().unwrap() - sizes.iter().min().unwrap() > 20,
            "{sizes:?}"
        );
        // Label skew: with small α most clients see few topics; IID clients see all four.
        let d = split(
            records(200),
            &Partition::Dirichlet {
                alpha: 0.1,
                field: "topic".into(),
            },
            5,
            1,
        )
        .unwrap();
        let topics = |x: &Vec<RawRecord>| {
            let mut t: Vec<String> = x.iter().map(|r| r.value["topic"].to_string()).collect();
            t.sort();
            t.dedup();
            t.len()
        };
        assert!(iid.iter().all(|x| topics(x) == 4));
        let mean: f64 = d.iter().map(|x| topics(x) as f64).sum::<f64>() / 5.0;
        assert!(mean < 3.0, "mean topics per client {mean}");
    }

    #[test]
    fn a_missing_label_field_is_named() {
        let e = split(
            records(10),
            &Partition::Dirichlet {
                alpha: 1.0,
                field: "site".into(),
            },
            2,
            0,
        )
        .unwrap_err();
        assert!(e.contains("`site`"), "{e}");
    }

    #[test]
    fn hold_out_keeps_one_for_training() {
        let (t, e) = hold_out(records(10), 0.2);
        assert_eq!((t.len(), e.len()), (8, 2));
        let (t, e) = hold_out(records(2), 0.1);
        assert_eq!((t.len(), e.len()), (1, 1));
        let (t, e) = hold_out(records(1), 0.5);
        assert_eq!((t.len(), e.len()), (1, 0));
    }
}
