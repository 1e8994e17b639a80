//! Magnitude thresholds for trimming task vectors (TIES, breadcrumbs): for each of several
//! tensors `τₖ = xₖ − base`, the `keep`-th largest magnitude, found in streaming passes with
//! O(bin) memory — a 65 536-bin histogram of the float bit patterns and a selection inside one
//! bin, or, for large tensors, a sampled bracket checked by one pass over all tensors together.

use rayon::prelude::*;

/// Elements per parallel work item.
const CHUNK: usize = 1 << 12;

/// For every client, the smallest magnitude kept when trimming `τₖ = xₖ − base` to its
/// `keep` largest magnitudes.
///
/// A sample of 2^20 magnitudes per client (16-element runs at a regular stride) brackets its
/// threshold; one pass over all
/// clients together (reading the base once) counts the values above each bracket and collects
/// those inside it, and a selection inside the bracket gives the exact value. When a sample's
/// bracket misses (a vanishing probability) or the tensor is small, the exact histogram method
/// ([`trim_threshold`]) decides.
pub(crate) fn trim_thresholds(models: &[&[f32]], base: Option<&[f32]>, keep: usize) -> Vec<f32> {
    const SAMPLE: usize = 1 << 20;
    let n = models[0].len();
    if keep >= n {
        return vec![0.0; models.len()];
    }
    if n <= 8 * SAMPLE {
        return models
            .iter()
            .map(|m| trim_threshold(m, base, keep))
            .collect();
    }
    let p = keep as f64 / n as f64;
    // The ±0.2% bracket around the target quantile is ≈ 5 standard errors of a 2^20 sample.
    let brackets: Vec<(f32, f32)> = models
        .par_iter()
        .map(|x| {
            // 16-element runs at a regular stride: one cache line per 16 samples.
            const RUN: usize = 16;
            let stride = n / (SAMPLE / RUN);
            let mut sample: Vec<f32> = (0..SAMPLE)
                .map(|s| {
                    let i = (s / RUN) * stride + s % RUN;
                    (x[i] - base.map_or(0.0, |b| b[i])).abs()
                })
                .collect();
            // Ranks counted from the largest.
            let rank = |q: f64| ((q * SAMPLE as f64) as usize).min(SAMPLE - 1);
            let (hi_rank, lo_rank) = (rank((p - 0.002).max(0.0)), rank((p + 0.002).min(1.0)));
            let desc = |a: &f32, b: &f32| b.total_cmp(a);
            let lo = *sample.select_nth_unstable_by(lo_rank, desc).1;
            let hi = *sample[..lo_rank.max(1)]
                .select_nth_unstable_by(hi_rank.min(lo_rank.max(1) - 1), desc)
                .1;
            (lo, hi.max(lo))
        })
        .collect();
    let k_n = models.len();
    // Per chunk of 16 Ki elements: counts and candidates for every client. Collected once and
    // concatenated once (a tree reduction would copy the candidates at every level).
    const BIG: usize = CHUNK * 4;
    let per_chunk: Vec<(Vec<usize>, Vec<Vec<f32>>)> = (0..n.div_ceil(BIG))
        .into_par_iter()
        .map(|c| {
            let r = c * BIG..((c + 1) * BIG).min(n);
            let b = base.map(|b| &b[r.clone()]);
            let mut above = vec![0usize; k_n];
            let mut inside = Vec::with_capacity(k_n);
            for (k, x) in models.iter().enumerate() {
                let (lo, hi) = brackets[k];
                let (a, i) = count_bracket(&x[r.clone()], b, lo, hi);
                above[k] = a;
                inside.push(i);
            }
            (above, inside)
        })
        .collect();
    let above: Vec<usize> = (0..k_n)
        .map(|k| per_chunk.iter().map(|(a, _)| a[k]).sum())
        .collect();
    let inside: Vec<Vec<f32>> = (0..k_n)
        .into_par_iter()
        .map(|k| {
            let mut v = Vec::with_capacity(per_chunk.iter().map(|(_, i)| i[k].len()).sum());
            for (_, i) in &per_chunk {
                v.extend_from_slice(&i[k]);
            }
            v
        })
        .collect();
    let mut inside = inside;
    (0..k_n)
        .map(|k| {
            let (a, mut ins) = (above[k], std::mem::take(&mut inside[k]));
            if a < keep && a + ins.len() >= keep {
                let idx = ins.len() - (keep - a);
                let (_, v, _) = ins.select_nth_unstable_by(idx, f32::total_cmp);
                *v
            } else {
                trim_threshold(models[k], base, keep)
            }
        })
        .collect()
}

/// The smallest magnitude kept when trimming `τ = x − base` to its `keep` largest magnitudes
/// (exact, from a histogram of the float bit patterns).
pub(crate) fn trim_threshold(x: &[f32], base: Option<&[f32]>, keep: usize) -> f32 {
    trim_threshold_histogram(x, base, keep)
}

/// Counts `|x − b| > hi` and collects the magnitudes in `[lo, hi]`.
fn count_bracket(x: &[f32], b: Option<&[f32]>, lo: f32, hi: f32) -> (usize, Vec<f32>) {
    #[inline(always)]
    fn body(x: &[f32], b: Option<&[f32]>, lo: f32, hi: f32) -> (usize, Vec<f32>) {
        let zero;
        let b = match b {
            Some(b) => b,
            None => {
                zero = vec![0f32; x.len()];
                &zero
            }
        };
        // Vectorised pass: count above the bracket, mark candidates with a byte flag; then scan
        // the flags 8 at a time as u64 words (candidates are rare, so few words are non-zero).
        let mut above = 0u32;
        let mut flags = vec![0u8; x.len()];
        for ((f, v), bb) in flags.iter_mut().zip(x).zip(b) {
            let m = (v - bb).abs();
            above += u32::from(m > hi);
            *f = u8::from(m >= lo && m <= hi);
        }
        let mut inside = Vec::new();
        for (w, word) in flags.chunks(8).enumerate() {
            let bits = match <[u8; 8]>::try_from(word) {
                Ok(bytes) => u64::from_ne_bytes(bytes),
                Err(_) => 1, // the short tail: just scan it
            };
            if bits != 0 {
                for (j, f) in word.iter().enumerate() {
                    if *f != 0 {
                        let i = w * 8 + j;
                        inside.push((x[i] - b[i]).abs());
                    }
                }
            }
        }
        (above as usize, inside)
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2(x: &[f32], b: Option<&[f32]>, lo: f32, hi: f32) -> (usize, Vec<f32>) {
        body(x, b, lo, hi)
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the features were detected at run time.
        return unsafe { avx2(x, b, lo, hi) };
    }
    body(x, b, lo, hi)
}

/// Exact threshold from a histogram of the float bit patterns (two passes).
fn trim_threshold_histogram(x: &[f32], base: Option<&[f32]>, keep: usize) -> f32 {
    let n = x.len();
    if keep >= n {
        return 0.0;
    }
    if keep == 0 {
        return f32::INFINITY;
    }
    let mag = |i: usize| -> u32 {
        let t = x[i] - base.map_or(0.0, |b| b[i]);
        t.abs().to_bits()
    };
    // Pass 1: histogram of the top 16 bits of |τ| (monotone in |τ| for non-negative floats),
    // one histogram per worker.
    let hist = (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .fold(
            || vec![0u32; 1 << 16],
            |mut h, c| {
                for i in c * CHUNK..((c + 1) * CHUNK).min(n) {
                    h[(mag(i) >> 16) as usize] += 1;
                }
                h
            },
        )
        .reduce(
            || vec![0u32; 1 << 16],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            },
        );
    // The bin holding the keep-th largest value, and how many lie above it.
    let mut above = 0usize;
    let mut bin = 0usize;
    for b in (0..1 << 16).rev() {
        let c = hist[b] as usize;
        if above + c >= keep {
            bin = b;
            break;
        }
        above += c;
    }
    // Pass 2: select inside that bin.
    let mut inside: Vec<u32> = (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .flat_map_iter(|c| {
            (c * CHUNK..((c + 1) * CHUNK).min(n))
                .map(mag)
                .filter(|m| (*m >> 16) as usize == bin)
                .collect::<Vec<_>>()
        })
        .collect();
    let want = keep - above; // 1-based rank inside the bin, from the top
    let idx = inside.len() - want;
    let (_, v, _) = inside.select_nth_unstable(idx);
    f32::from_bits(*v)
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    #[test]
    fn threshold_is_the_kth_largest_magnitude() {
        let x: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 1000) as f32 - 500.0)
            .collect();
        let mut mags: Vec<f32> = x.iter().map(|v| v.abs()).collect();
        mags.sort_by(|a, b| b.partial_cmp(a).unwrap());
        for keep in [1, 10, 400, 999] {
            assert_eq!(
                trim_threshold(&x, None, keep),
                mags[keep - 1],
                "keep {keep}"
            );
        }
    }

    #[test]
    fn sampled_thresholds_equal_the_exact_histogram_ones() {
        let n = 9 << 20; // above 8·2^20: the sampled path
        let mk = |seed: u64| -> Vec<f32> {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
        };
        let (a, b, base) = (mk(1), mk(2), mk(3));
        for keep in [1, 1000, n / 5, n / 2 + 3, n - 1] {
            let fast = trim_thresholds(&[&a, &b], Some(&base), keep);
            let exact = [
                trim_threshold(&a, Some(&base), keep),
                trim_threshold(&b, Some(&base), keep),
            ];
            assert_eq!(fast, exact, "keep {keep}");
        }
    }
}
