//! Matrix-vector (decode) and matrix-matrix (prefill) products over
//! [`Matrix`] weights, read in place.
//!
//! The public functions choose an implementation at run time; [`scalar`]
//! is the portable reference every faster kernel is tested against.

pub mod scalar;

use rayon::prelude::*;

use crate::tensor::Matrix;

/// Rows handed to one rayon task: big enough to amortise scheduling,
/// small enough to balance two to sixty-four cores.
const ROWS_PER_TASK: usize = 64;

/// `y = W x` for `W` `[rows, cols]`, `x` `[cols]`, `y` `[rows]`.
pub fn matvec(w: &Matrix, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), w.cols(), "matvec: input length");
    assert_eq!(y.len(), w.rows(), "matvec: output length");
    let prep = scalar::Prepared::new(w, x);
    y.par_chunks_mut(ROWS_PER_TASK)
        .enumerate()
        .for_each(|(ci, ys)| {
            let r0 = ci * ROWS_PER_TASK;
            for (i, yr) in ys.iter_mut().enumerate() {
                *yr = scalar::dot_row(w, r0 + i, x, &prep);
            }
        });
}

/// `Y = X Wᵀ` for `n` tokens: `x` `[n, cols]`, `y` `[n, rows]`.
pub fn matmul(w: &Matrix, x: &[f32], n: usize, y: &mut [f32]) {
    let (rows, cols) = (w.rows(), w.cols());
    assert_eq!(x.len(), n * cols, "matmul: input length");
    assert_eq!(y.len(), n * rows, "matmul: output length");
    if n == 1 {
        return matvec(w, x, y);
    }
    let preps: Vec<scalar::Prepared> = (0..n)
        .map(|t| scalar::Prepared::new(w, &x[t * cols..(t + 1) * cols]))
        .collect();
    // Each task owns a block of weight rows and computes them for every token,
    // so each weight row is read once per call.
    let blocks: Vec<(usize, Vec<f32>)> = (0..rows.div_ceil(ROWS_PER_TASK))
        .into_par_iter()
        .map(|b| {
            let r0 = b * ROWS_PER_TASK;
            let r1 = (r0 + ROWS_PER_TASK).min(rows);
            let mut out = vec![0f32; (r1 - r0) * n];
            for r in r0..r1 {
                for t in 0..n {
                    out[(r - r0) * n + t] =
                        scalar::dot_row(w, r, &x[t * cols..(t + 1) * cols], &preps[t]);
                }
            }
            (r0, out)
        })
        .collect();
    for (r0, out) in blocks {
        let nr = out.len() / n;
        for i in 0..nr {
            for t in 0..n {
                y[t * rows + r0 + i] = out[i * n + t];
            }
        }
    }
}

/// Row `r` of `W` as f32 (embedding lookup).
pub fn row(w: &Matrix, r: usize, out: &mut [f32]) {
    scalar::row(w, r, out)
}
