//! Dense row-major `f32` matrices and the linear algebra the rules need: products, Frobenius
//! inner products, thin QR and SVD (through `faer`, in f64), and a randomized truncated SVD for
//! dense results.

use faer::Mat;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

/// Below this many values, element-wise loops run on the calling thread.
pub const PAR_MIN: usize = 1 << 16;

/// A dense row-major matrix of `f32`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Matrix {
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// `rows × cols` values, row-major.
    pub data: Vec<f32>,
}

impl Matrix {
    /// A matrix from row-major data.
    ///
    /// # Panics
    /// When `data.len() != rows * cols`.
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        assert_eq!(data.len(), rows * cols, "matrix data length");
        Matrix { rows, cols, data }
    }

    /// A matrix of zeros.
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Matrix {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    /// `(rows, cols)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Element `(i, j)`.
    pub fn get(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.cols + j]
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    /// The transpose.
    pub fn transpose(&self) -> Matrix {
        let mut out = vec![0.0; self.data.len()];
        for i in 0..self.rows {
            for j in 0..self.cols {
                out[j * self.rows + i] = self.data[i * self.cols + j];
            }
        }
        Matrix::new(self.cols, self.rows, out)
    }

    /// Multiplies every element by `s`.
    pub fn scaled(&self, s: f32) -> Matrix {
        Matrix::new(
            self.rows,
            self.cols,
            self.data.iter().map(|v| v * s).collect(),
        )
    }

    /// Frobenius norm (accumulated in f64).
    pub fn norm(&self) -> f64 {
        let sq = |&v: &f32| (v as f64) * (v as f64);
        // Small matrices stay on the calling thread: handing them to the pool costs more than
        // the work (it dominated the coordinator's time per update with many small adapters).
        if self.data.len() < PAR_MIN {
            return self.data.iter().map(sq).sum::<f64>().sqrt();
        }
        self.data.par_iter().map(sq).sum::<f64>().sqrt()
    }

    /// Whether every value is finite.
    pub fn is_finite(&self) -> bool {
        if self.data.len() < PAR_MIN {
            return self.data.iter().all(|v| v.is_finite());
        }
        self.data.par_iter().all(|v| v.is_finite())
    }

    /// Stacks matrices vertically (same column count).
    pub fn vcat(parts: &[&Matrix]) -> Matrix {
        let cols = parts.first().map_or(0, |m| m.cols);
        let mut data = Vec::with_capacity(parts.iter().map(|m| m.data.len()).sum());
        for p in parts {
            assert_eq!(p.cols, cols, "vcat column count");
            data.extend_from_slice(&p.data);
        }
        Matrix::new(data.len() / cols.max(1), cols, data)
    }

    /// Stacks matrices horizontally (same row count).
    pub fn hcat(parts: &[&Matrix]) -> Matrix {
        let rows = parts.first().map_or(0, |m| m.rows);
        let cols: usize = parts.iter().map(|m| m.cols).sum();
        let mut data = Vec::with_capacity(rows * cols);
        for i in 0..rows {
            for p in parts {
                assert_eq!(p.rows, rows, "hcat row count");
                data.extend_from_slice(p.row(i));
            }
        }
        Matrix::new(rows, cols, data)
    }

    /// `self · other`.
    pub fn matmul(&self, other: &Matrix) -> Matrix {
        assert_eq!(self.cols, other.rows, "matmul inner dimension");
        let out = to_faer(self) * to_faer(other);
        from_faer(&out)
    }
}

/// Converts to a column-major f64 `faer` matrix.
pub fn to_faer(m: &Matrix) -> Mat<f64> {
    Mat::from_fn(m.rows, m.cols, |i, j| m.data[i * m.cols + j] as f64)
}

/// Converts a `faer` matrix back to row-major f32.
pub fn from_faer(m: &Mat<f64>) -> Matrix {
    let (r, c) = (m.nrows(), m.ncols());
    let mut data = vec![0f32; r * c];
    for j in 0..c {
        let col = m.col_as_slice(j);
        for i in 0..r {
            data[i * c + j] = col[i] as f32;
        }
    }
    Matrix::new(r, c, data)
}

/// A low-rank matrix `B·A` (`B` `[out, r]`, `A` `[r, in]`) split back into factors by
/// [`refactor`], with the fraction of energy (squared singular values) kept.
#[derive(Debug, Clone)]
pub struct Refactored {
    /// `[r, in]`.
    pub a: Matrix,
    /// `[out, r]`.
    pub b: Matrix,
    /// `Σ_{i<r} σᵢ² / Σ σᵢ²` (1 when nothing was dropped).
    pub retained_energy: f64,
    /// All singular values, descending.
    pub singular_values: Vec<f64>,
}

/// Truncated SVD of `B·A` without forming the `out × in` product: thin QR of `B` and of `Aᵀ`,
/// then an SVD of the small `R_B·R_Aᵀ` core (at most `R × R` for inner rank `R`).
///
/// `B·A = Q_B R_B R_Aᵀ Q_Aᵀ = (Q_B U) Σ (Q_A V)ᵀ`; the top `rank` components are returned as
/// `B' = Q_B U √Σ`, `A' = √Σ Vᵀ Q_Aᵀ` (the square root balances the two factors for further
/// training). `rank = None` keeps every non-zero component (exact).
pub fn refactor(b: &Matrix, a: &Matrix, rank: Option<usize>) -> Refactored {
    assert_eq!(b.cols, a.rows, "inner ranks of B and A");
    let (out, inner, inp) = (b.rows, b.cols, a.cols);
    let qr_b = to_faer(b).qr();
    let qr_a = to_faer(&a.transpose()).qr();
    let qb = qr_b.compute_thin_Q();
    let qa = qr_a.compute_thin_Q();
    let rb = qr_b.thin_R().to_owned();
    let ra = qr_a.thin_R().to_owned();
    let core = &rb * ra.transpose();
    let svd = core
        .thin_svd()
        .expect("SVD of a small finite core converges");
    let s: Vec<f64> = (0..svd.S().dim()).map(|i| svd.S()[i]).collect();
    let total: f64 = s.iter().map(|v| v * v).sum();
    let max_rank = s.len().min(out).min(inp).min(inner);
    let keep = rank.unwrap_or(max_rank).min(max_rank).max(1);
    let kept: f64 = s[..keep].iter().map(|v| v * v).sum();
    let u = svd.U();
    let v = svd.V();
    let bq = &qb * u.get(.., ..keep);
    let aq = &qa * v.get(.., ..keep);
    let sqrt: Vec<f64> = s[..keep].iter().map(|x| x.sqrt()).collect();
    let b_new = Mat::from_fn(out, keep, |i, j| bq[(i, j)] * sqrt[j]);
    let a_new = Mat::from_fn(keep, inp, |i, j| aq[(j, i)] * sqrt[i]);
    Refactored {
        a: from_faer(&a_new),
        b: from_faer(&b_new),
        retained_energy: if total > 0.0 { kept / total } else { 1.0 },
        singular_values: s,
    }
}

/// Randomized truncated SVD of a dense matrix (Halko, Martinsson & Tropp 2011, with
/// `power_iters` subspace iterations and 8 columns of oversampling), returned as balanced
/// factors like [`refactor`]. `retained_energy` is the kept fraction of `‖M‖_F²`.
pub fn dense_refactor(m: &Matrix, rank: usize, power_iters: usize, seed: u64) -> Refactored {
    let (rows, cols) = m.shape();
    let k = (rank + 8).min(rows).min(cols).max(1);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let omega = Mat::<f64>::from_fn(cols, k, |_, _| StandardNormal.sample(&mut rng));
    let mf = to_faer(m);
    let mut y = &mf * &omega;
    for _ in 0..power_iters {
        let q = y.qr().compute_thin_Q();
        let z = mf.transpose() * &q;
        let qz = z.qr().compute_thin_Q();
        y = &mf * &qz;
    }
    let q = y.qr().compute_thin_Q();
    // M ≈ Q (Qᵀ M) = Q · B_small, B_small = Qᵀ M  [k × cols]; M = I_rows·M exactly factors
    // as (Q)·(QᵀM) on the range, so refactor that product.
    let small = q.transpose() * &mf;
    let r = refactor(&from_faer(&q), &from_faer(&small), Some(rank));
    let total = m.norm().powi(2);
    let kept: f64 = r.singular_values[..r.a.rows].iter().map(|v| v * v).sum();
    Refactored {
        retained_energy: if total > 0.0 {
            (kept / total).min(1.0)
        } else {
            1.0
        },
        ..r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand_matrix(rows: usize, cols: usize, seed: u64) -> Matrix {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Matrix::new(
            rows,
            cols,
            (0..rows * cols)
                .map(|_| StandardNormal.sample(&mut rng))
                .collect(),
        )
    }

    fn max_diff(a: &Matrix, b: &Matrix) -> f32 {
        a.data
            .iter()
            .zip(&b.data)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn refactor_at_full_rank_is_exact() {
        let b = rand_matrix(30, 5, 1);
        let a = rand_matrix(5, 40, 2);
        let r = refactor(&b, &a, None);
        let want = b.matmul(&a);
        assert!(max_diff(&r.b.matmul(&r.a), &want) < 1e-4);
        assert!((r.retained_energy - 1.0).abs() < 1e-12);
        assert_eq!(r.a.rows, 5);
    }

    #[test]
    fn truncation_keeps_the_top_components() {
        let b = rand_matrix(20, 6, 3);
        let a = rand_matrix(6, 25, 4);
        let r = refactor(&b, &a, Some(2));
        assert_eq!((r.b.cols, r.a.rows), (2, 2));
        let s = &r.singular_values;
        let want = (s[0] * s[0] + s[1] * s[1]) / s.iter().map(|v| v * v).sum::<f64>();
        assert!((r.retained_energy - want).abs() < 1e-12);
        // The error of the best rank-2 approximation is the dropped energy.
        let full = b.matmul(&a);
        let approx = r.b.matmul(&r.a);
        let err: f64 = full
            .data
            .iter()
            .zip(&approx.data)
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum();
        let dropped: f64 = s[2..].iter().map(|v| v * v).sum();
        assert!((err - dropped).abs() / dropped < 1e-3, "{err} vs {dropped}");
    }

    #[test]
    fn randomized_svd_recovers_a_low_rank_matrix() {
        let m = rand_matrix(50, 4, 5).matmul(&rand_matrix(4, 60, 6));
        let r = dense_refactor(&m, 4, 2, 7);
        assert!(max_diff(&r.b.matmul(&r.a), &m) < 1e-3);
        assert!(r.retained_energy > 0.9999);
    }
}
