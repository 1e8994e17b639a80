//! Arithmetic on sums of low-rank terms `Σ cₖ·sₖ·Bₖ·Aₖ` without forming dense matrices:
//! exact stacking (FLoRA), Frobenius inner products through `r × r` Gram matrices, and norms
//! of differences — what lets exact FedAvg, Krum and norm bounding scale to 4096×14336
//! projections.

use rayon::prelude::*;

use crate::matrix::{Matrix, Refactored, refactor};
use crate::update::LoraFactors;

/// `⟨s₁B₁A₁, s₂B₂A₂⟩_F = s₁s₂·tr((B₁ᵀB₂)(A₂A₁ᵀ))`, in f64.
pub fn inner(x: &LoraFactors, y: &LoraFactors) -> f64 {
    let (r1, r2) = (x.rank(), y.rank());
    // G_B = B₁ᵀB₂ [r1 × r2], G_A = A₁A₂ᵀ [r1 × r2]; tr(G_B G_Aᵀ) = Σ G_B ⊙ G_A.
    let gram = |p: &Matrix, q: &Matrix, by_rows: bool| -> Vec<f64> {
        let mut g = vec![0f64; r1 * r2];
        if by_rows {
            // p, q are [r, n]: g[i][j] = Σ_n p[i][n] q[j][n]
            g.par_chunks_mut(r2).enumerate().for_each(|(i, gi)| {
                let pi = p.row(i);
                for (j, gij) in gi.iter_mut().enumerate() {
                    let qj = q.row(j);
                    *gij = pi.iter().zip(qj).map(|(a, b)| *a as f64 * *b as f64).sum();
                }
            });
        } else {
            // p, q are [n, r]: g[i][j] = Σ_n p[n][i] q[n][j]
            for n in 0..p.rows {
                let pn = p.row(n);
                let qn = q.row(n);
                for i in 0..r1 {
                    let a = pn[i] as f64;
                    for j in 0..r2 {
                        g[i * r2 + j] += a * qn[j] as f64;
                    }
                }
            }
        }
        g
    };
    let gb = gram(&x.b, &y.b, false);
    let ga = gram(&x.a, &y.a, true);
    let tr: f64 = gb.iter().zip(&ga).map(|(a, b)| a * b).sum();
    x.scale as f64 * y.scale as f64 * tr
}

/// `‖Σ cₖ·ΔWₖ‖_F²` for a combination of low-rank terms.
pub fn combination_norm_sq(terms: &[(f64, &LoraFactors)]) -> f64 {
    let mut total = 0.0;
    for i in 0..terms.len() {
        let (ci, xi) = terms[i];
        total += ci * ci * inner(xi, xi);
        for &(cj, xj) in &terms[i + 1..] {
            total += 2.0 * ci * cj * inner(xi, xj);
        }
    }
    total.max(0.0)
}

/// The exact stacked factors of `Σ cₖ·sₖ·Bₖ·Aₖ`: `A* = vcat(cₖAₖ)`, `B* = hcat(sₖBₖ)`, so that
/// `B*A* = Σ cₖsₖBₖAₖ` at rank `Σ rₖ` (scale 1).
pub fn stack(terms: &[(f64, &LoraFactors)]) -> LoraFactors {
    stack_scaled(terms, 1.0)
}

/// [`stack`] with `B*` divided by `scale` (so that `scale·B*A* = Σ cₖsₖBₖAₖ`), in one copy.
pub fn stack_scaled(terms: &[(f64, &LoraFactors)], scale: f32) -> LoraFactors {
    let inp = terms.first().map_or(0, |t| t.1.a.cols);
    let out = terms.first().map_or(0, |t| t.1.b.rows);
    let rank: usize = terms.iter().map(|t| t.1.rank()).sum();
    let mut a = Vec::with_capacity(rank * inp);
    for (c, f) in terms {
        let c = *c as f32;
        a.extend(f.a.data.iter().map(|v| v * c));
    }
    let mut b = vec![0f32; out * rank];
    b.par_chunks_mut(rank.max(1))
        .enumerate()
        .for_each(|(i, row)| {
            let mut col = 0;
            for (_, f) in terms {
                let s = f.scale / scale;
                let r = f.rank();
                for (dst, v) in row[col..col + r].iter_mut().zip(f.b.row(i)) {
                    *dst = v * s;
                }
                col += r;
            }
        });
    LoraFactors {
        a: Matrix::new(rank, inp, a),
        b: Matrix::new(out, rank, b),
        scale,
    }
}

/// `Σ cₖ·sₖ·Bₖ·Aₖ` as factors: exactly stacked (`rank = None`) or re-factorised to `rank` by
/// truncated SVD (QR of the stacked factors, SVD of the small core). The scale of the result is
/// `scale`; `B` absorbs `1/scale`.
pub fn combine(
    terms: &[(f64, &LoraFactors)],
    rank: Option<usize>,
    scale: f32,
) -> (LoraFactors, f64) {
    if rank.is_none() {
        return (stack_scaled(terms, scale), 1.0);
    }
    let stacked = stack(terms);
    let (b, a, energy) = match rank {
        None => unreachable!("handled above"),
        Some(r) => {
            let Refactored {
                a,
                b,
                retained_energy,
                ..
            } = refactor(&stacked.b, &stacked.a, Some(r));
            (b, a, retained_energy)
        }
    };
    (
        LoraFactors {
            a,
            b: b.scaled(1.0 / scale),
            scale,
        },
        energy,
    )
}
