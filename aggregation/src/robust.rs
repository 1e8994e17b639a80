//! Byzantine-robust rules.
//!
//! - **Coordinate-wise median** and **trimmed mean** (Yin et al. 2018, arXiv 1803.01498): per
//!   coordinate, the median of the n values (mean of the two middle ones for even n), or the
//!   mean after dropping the ⌊βn⌋ smallest and largest. Unweighted, as in the paper. Applied to
//!   dense `ΔW` (or to `B` under FFA-LoRA) where coordinates are well defined: `(BG, G⁻¹A)`
//!   gives the same `ΔW` as `(B, A)`, so a coordinate of a factor means nothing.
//! - **Krum / Multi-Krum** (Blanchard et al. 2017): `scoreᵢ = Σ ‖xᵢ − xⱼ‖²` over the `n − f − 2`
//!   nearest others; Krum picks the lowest score, Multi-Krum averages the `m` lowest (example
//!   weighted, as Flower does). Needs `n ≥ 2f + 3`. Distances between adapters are computed in
//!   product space from `r × r` Gram matrices, never densely.
//! - **Norm bounding** (Sun et al. 2019, arXiv 1911.07963): each update `τₖ` (relative to the
//!   round's global adapter) is scaled by `min(1, M/‖τₖ‖)`.

use rayon::prelude::*;

use crate::error::{AggregationError, Result};
use crate::lowrank::combination_norm_sq;
use crate::update::Adapter;

/// Coordinate-wise median of same-length vectors.
pub fn median(values: &[&[f32]]) -> Vec<f32> {
    coordinatewise(values, |v| {
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            ((v[n / 2 - 1] as f64 + v[n / 2] as f64) / 2.0) as f32
        }
    })
}

/// Coordinate-wise trimmed mean dropping `⌊βn⌋` values at each end.
pub fn trimmed_mean(values: &[&[f32]], beta: f64) -> Result<Vec<f32>> {
    let n = values.len();
    let cut = (beta * n as f64).floor() as usize;
    if !(0.0..0.5).contains(&beta) || 2 * cut >= n {
        return Err(AggregationError::Config(format!(
            "trimmed mean with beta {beta} leaves nothing of {n} updates"
        )));
    }
    Ok(coordinatewise(values, move |v| {
        let kept = &v[cut..v.len() - cut];
        (kept.iter().map(|x| *x as f64).sum::<f64>() / kept.len() as f64) as f32
    }))
}

/// Batcher's odd–even merge sorting network for `n` inputs: comparators `(i, j)`, `i < j`.
fn sorting_network(n: usize) -> Vec<(usize, usize)> {
    let mut pairs = Vec::new();
    let mut p = 1;
    while p < n {
        let mut k = p;
        while k >= 1 {
            let mut j = k % p;
            while j + k < n {
                for i in 0..k.min(n - j - k) {
                    if (i + j) / (2 * p) == (i + j + k) / (2 * p) {
                        pairs.push((i + j, i + j + k));
                    }
                }
                j += 2 * k;
            }
            k /= 2;
        }
        p *= 2;
    }
    pairs
}

/// Sorts the `n` values of every coordinate with a sorting network applied lane-wise over a
/// chunk of coordinates (branch-free min/max that the compiler vectorises), then reduces each
/// coordinate's sorted column.
fn coordinatewise(values: &[&[f32]], reduce: impl Fn(&[f32]) -> f32 + Sync) -> Vec<f32> {
    const CHUNK: usize = 1 << 10;
    let n = values.len();
    let len = values.first().map_or(0, |v| v.len());
    let network = sorting_network(n);
    let mut out = vec![0f32; len];
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let start = c * CHUNK;
            let w = chunk.len();
            // rows[k] = values[k][start..start + w]
            let mut rows: Vec<Vec<f32>> = values
                .iter()
                .map(|v| v[start..start + w].to_vec())
                .collect();
            for &(i, j) in &network {
                let (lo, hi) = rows.split_at_mut(j);
                let (a, b) = (&mut lo[i], &mut hi[0]);
                for (x, y) in a.iter_mut().zip(b.iter_mut()) {
                    let (mn, mx) = (x.min(*y), x.max(*y));
                    *x = mn;
                    *y = mx;
                }
            }
            let mut col = vec![0f32; n];
            for (j, o) in chunk.iter_mut().enumerate() {
                for (k, r) in rows.iter().enumerate() {
                    col[k] = r[j];
                }
                *o = reduce(&col);
            }
        });
    out
}

/// Squared distance between two adapters over all modules (product space) and dense tensors.
pub fn distance_sq(x: &Adapter, y: &Adapter) -> f64 {
    let mut d = 0.0;
    for (name, mx) in &x.modules {
        if let Some(my) = y.modules.get(name) {
            d += combination_norm_sq(&[(1.0, mx), (-1.0, my)]);
        }
    }
    for (name, dx) in &x.dense {
        if let Some(dy) = y.dense.get(name) {
            d += dx
                .data
                .iter()
                .zip(&dy.data)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>();
        }
    }
    d
}

/// Krum scores of `updates` assuming at most `f` Byzantine ones; returns indices sorted by
/// score (best first) and the scores.
pub fn krum_ranking(updates: &[&Adapter], f: usize) -> Result<Vec<(usize, f64)>> {
    let n = updates.len();
    if n < 2 * f + 3 {
        return Err(AggregationError::Config(format!(
            "Krum with f = {f} needs at least {} updates, got {n}",
            2 * f + 3
        )));
    }
    let pairs: Vec<(usize, usize)> = (0..n)
        .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
        .collect();
    let dists: Vec<f64> = pairs
        .par_iter()
        .map(|&(i, j)| distance_sq(updates[i], updates[j]))
        .collect();
    let mut d = vec![vec![0.0; n]; n];
    for (&(i, j), v) in pairs.iter().zip(dists) {
        d[i][j] = v;
        d[j][i] = v;
    }
    let nearest = n - f - 2;
    let mut scores: Vec<(usize, f64)> = (0..n)
        .map(|i| {
            let mut others: Vec<f64> = (0..n).filter(|&j| j != i).map(|j| d[i][j]).collect();
            others.sort_by(f64::total_cmp);
            (i, others[..nearest].iter().sum())
        })
        .collect();
    scores.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    Ok(scores)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorting_networks_sort_every_small_input() {
        for n in 1..=17 {
            let net = sorting_network(n);
            // 0/1 principle on random inputs suffices in practice; use many permutations.
            for seed in 0..200u64 {
                let mut v: Vec<u64> = (0..n as u64)
                    .map(|i| (i * 2654435761 + seed * 97) % 1000)
                    .collect();
                let mut want = v.clone();
                want.sort();
                for &(i, j) in &net {
                    if v[i] > v[j] {
                        v.swap(i, j);
                    }
                }
                assert_eq!(v, want, "n = {n}");
            }
        }
    }

    #[test]
    fn median_and_trimmed_mean_of_small_sets() {
        let a = [1.0f32, 9.0];
        let b = [5.0f32, -3.0];
        let c = [3.0f32, 4.0];
        let d = [100.0f32, 2.0];
        assert_eq!(median(&[&a, &b, &c]), vec![3.0, 4.0]);
        assert_eq!(median(&[&a, &b, &c, &d]), vec![4.0, 3.0]);
        assert_eq!(
            trimmed_mean(&[&a, &b, &c, &d], 0.25).unwrap(),
            vec![4.0, 3.0]
        );
    }
}
